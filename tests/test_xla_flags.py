"""The XLA flags cace_jax sets by default: when they are added, and that they take effect."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cace_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = xla_flags.FAST_CONVOLUTIONS
# A convolution, compiled; prints whether XLA handed it to YNNPACK.
PROBE = """
import cace_jax
import jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
print('ynn_fusion' in conv.lower(jnp.ones((2, 16, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text())
"""


def conv_uses_ynnpack() -> bool:
  conv = jax.jit(
    lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
  )
  text = conv.lower(jnp.ones((2, 16, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
  return 'ynn_fusion' in text


def run_probe(**env_changes: str | None) -> bool:
  env = dict(os.environ)
  for key, value in env_changes.items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  result = subprocess.run(
    [sys.executable, '-c', PROBE], capture_output=True, text=True, env=env, cwd=ROOT, check=True
  )
  return result.stdout.strip().splitlines()[-1] == 'True'


def test_the_suite_itself_runs_convolutions_off_ynnpack():
  assert FAST in os.environ['XLA_FLAGS']
  assert not conv_uses_ynnpack()


@pytest.mark.parametrize(
  'env_changes, ynnpack',
  [
    ({'XLA_FLAGS': None, xla_flags.OPT_OUT: None}, False),  # the default
    ({'XLA_FLAGS': None, xla_flags.OPT_OUT: '0'}, True),  # turned off
    # The user's own value wins (here jaxlib's default set, written out).
    (
      {
        'XLA_FLAGS': f'{xla_flags.FUSION_FLAG}=individual_dot,individual_convolution,reduce',
        xla_flags.OPT_OUT: None,
      },
      True,
    ),
  ],
  ids=['default', 'opt_out', 'user_value'],
)
def test_importing_cace_jax_sets_the_flag_before_jax_starts(env_changes, ynnpack):
  assert run_probe(**env_changes) is ynnpack


def test_user_flags_are_kept_and_the_default_appended():
  value, _ = xla_flags.default_xla_flags(
    {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}, '0.10.2', False
  )
  assert value == f'--xla_force_host_platform_device_count=4 {FAST}'
  value, _ = xla_flags.default_xla_flags({}, '0.11.2', False)
  assert value == FAST


@pytest.mark.parametrize(
  'environ, version, accelerator, why',
  [
    ({'XLA_FLAGS': f'{xla_flags.FUSION_FLAG}=dot'}, '0.10.2', False, 'already sets'),
    ({xla_flags.OPT_OUT: 'off'}, '0.10.2', False, 'defaults kept'),
    ({}, '0.8.3', False, 'not known'),  # XLA would abort on the unknown flag
    ({}, '0.13.0', False, 'not known'),
    ({}, None, False, 'not known'),
    ({}, '0.10.2', True, 'accelerator'),  # a GPU/TPU plugin is installed
    ({'JAX_PLATFORMS': 'cuda'}, '0.10.2', False, 'accelerator'),
  ],
)
def test_the_flag_is_left_out(environ, version, accelerator, why):
  value, reason = xla_flags.default_xla_flags(environ, version, accelerator)
  assert value is None
  assert why in reason


def test_cpu_only_platforms_get_the_flag_beside_an_installed_plugin():
  value, _ = xla_flags.default_xla_flags({'JAX_PLATFORMS': 'cpu'}, '0.10.2', True)
  assert value == FAST


@pytest.mark.parametrize(
  'text, parsed',
  [('0.10.2', (0, 10, 2)), ('0.12.0.1', (0, 12, 0, 1)), ('0.11.0rc1', (0, 11, 0)), ('', ())],
)
def test_parse_version(text, parsed):
  assert xla_flags.parse_version(text) == parsed


def test_every_entry_point_imports_cace_jax():
  """An entry point that never imports cace_jax would run with jaxlib's slow default."""
  entry_points = ['train.py', 'eval.py'] + glob.glob(os.path.join(ROOT, 'tools', '[!_]*.py'))
  entry_points += glob.glob(os.path.join(ROOT, 'benchmarks', '[!_]*.py'))
  assert len(entry_points) > 10
  for path in entry_points:
    with open(os.path.join(ROOT, path)) as f:
      tree = ast.parse(f.read())
    imported = {
      node.module.split('.')[0]
      for node in tree.body
      if isinstance(node, ast.ImportFrom) and node.module
    } | {
      alias.name.split('.')[0]
      for node in tree.body
      if isinstance(node, ast.Import)
      for alias in node.names
    }
    assert imported & {'cace_jax', 'benchmarks', 'tools'}, path

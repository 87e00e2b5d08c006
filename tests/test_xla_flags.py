"""The XLA flags cace_jax sets by default: when they are added, and that they take effect."""

from __future__ import annotations

import ast
import glob
import json
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
compiled = conv.lower(jnp.ones((2, 16, 8, 32)), jnp.ones((3, 3, 32, 32))).compile()
print(cace_jax.xla_flags.count_ynnpack_convolutions(compiled.as_text()) == 1)
"""


def conv_uses_ynnpack() -> bool:
  conv = jax.jit(
    lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
  )
  text = conv.lower(jnp.ones((2, 16, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
  return xla_flags.count_ynnpack_convolutions(text) == 1


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


def test_convolutions_are_counted_apart_from_matrix_products():
  def conv_then_dot(x, w, m):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return y.reshape(-1, 32) @ m

  args = (jnp.ones((2, 16, 8, 32)), jnp.ones((3, 3, 32, 32)), jnp.ones((32, 32)))
  text = jax.jit(conv_then_dot).lower(*args).compile().as_text()
  assert 'ynn_fusion' in text  # the product still goes to YNNPACK, as jaxlib does by default
  assert xla_flags.count_ynnpack_convolutions(text) == 0


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
    ({}, '0.9.2', False, 'not known'),  # has the flag, but was never run with it
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
  scripts = ['train.py', 'eval.py'] + glob.glob(os.path.join(ROOT, 'tools', '[!_]*.py'))
  scripts += glob.glob(os.path.join(ROOT, 'benchmarks', '[!_]*.py'))
  entry_points = {}
  for path in scripts:  # the files a user runs; the modules beside them are imported by those
    with open(os.path.join(ROOT, path)) as f:
      text = f.read()
    if "if __name__ == '__main__':" in text:
      entry_points[path] = text
  assert len(entry_points) > 10
  for path, text in entry_points.items():
    tree = ast.parse(text)
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


def test_cpu_step_benchmark_measures_both_paths_against_float64(tmp_path):
  """The benchmark behind the docs' table: each variant in its own process, on the right path,
  and a float64 reference with no float32 left in it (the child checks its HLO)."""
  out = tmp_path / 'cpu_step.json'
  command = [sys.executable, 'benchmarks/cpu_step.py', '--depth=tiny', '--height=32', '--width=16']
  command += ['--steps_of=cacenet_gem', '--variants=ynnpack,fast,fast_bf16', '--steps=1']
  result = subprocess.run(
    command + [f'--out={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['results']['cacenet_gem']
  assert 'failed' not in rows['float64'], rows['float64']
  assert rows['ynnpack']['ynnpack_convolutions'] > 5 and rows['fast']['ynnpack_convolutions'] == 0
  assert FAST not in rows['ynnpack']['xla_flags'] and FAST in rows['fast']['xla_flags']
  for name in ('ynnpack', 'fast'):  # float32 is close to float64; bfloat16 is not as close
    assert 0 < rows[name]['max_relative_to_float64'] < 1e-3
    assert rows[name]['max_relative_to_float64'] < rows['fast_bf16']['max_relative_to_float64']
    assert rows[name]['step_s'] > 0 and rows[name]['speed_over_ynnpack'] > 0

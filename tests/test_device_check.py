"""The accelerator check (`benchmarks/device_check.py --tiny`) runs as the GPU host would run it.

The host has no TensorFlow and no TFDS: the check runs in a subprocess that
refuses both, on the suite's four CPU devices, and must pass every section
and report every figure the issue asks for.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from refused_imports import ON_THE_ACCELERATOR_HOST, prelude

from benchmarks import common
from cace_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CHECK = """
import runpy
sys.argv = ['benchmarks/device_check.py'] + {args}
runpy.run_path('benchmarks/device_check.py', run_name='__main__')
"""


def run_check(args: list[str]) -> subprocess.CompletedProcess:
  code = prelude(ON_THE_ACCELERATOR_HOST) + RUN_CHECK.format(args=args)
  return subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=900
  )


def test_tiny_device_check_passes_without_tensorflow_and_reports_every_figure(tmp_path):
  out = tmp_path / 'check.json'
  result = run_check(['--tiny', '--steps=2', f'--out={out}'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'device check passed' in result.stdout
  report = json.loads(out.read_text())
  assert report['platform']['local_devices'] == 4
  # On a CPU the check runs with cace_jax's convolutions, as training here does.
  assert xla_flags.FAST_CONVOLUTIONS in report['platform']['xla_flags']
  assert set(report['section_seconds']) == {'correctness', 'train', 'eval'}

  correctness = report['correctness']
  assert {'fast_vs_direct_avg_float32', 'fast_vs_direct_gem_bfloat16'} <= set(correctness)
  assert all(row['passed'] for row in correctness.values())
  # The float32 paths agree far inside their tolerance: the check can tell them apart.
  assert correctness['fast_vs_direct_gem_float32']['largest_relative_difference'] < 1e-5
  loss = correctness['bf16_20_steps_lower_the_loss']
  assert loss['last_loss'] < loss['first_loss']

  ((name, row),) = report['train'].items()
  assert name == 'gem_bf16_p4' and row['per_device_batch'] == 4  # P 2 × K 2 in tiny
  # XLA's count of the step with the pair loop unrolled, against the CPU's measured peak.
  assert row['gflop_per_device_step'] > 0 and 0 < row['mfu'] < 1
  assert row['peak_source'].startswith('measured matmul')
  assert row['program_memory_bytes'] > 0
  assert row['step_over_backbone'] > 1 and math.isfinite(row['loss'])

  for pooling in ('avg', 'gem'):
    evaluation = report['eval'][pooling]
    assert evaluation['stage1_images_per_s'] > 0 and evaluation['cache_bytes_per_image'] > 0
    assert all(evaluation[f'stage2_ms_per_query_k{k}'] > 0 for k in (5, 10, 100))
  # GeM caches the pixel-wise nodes, average pooling only their mean.
  cache_bytes = {p: report['eval'][p]['cache_bytes_per_image'] for p in ('avg', 'gem')}
  assert cache_bytes['gem'] > cache_bytes['avg']


def test_device_check_refuses_an_unknown_section_in_one_line(tmp_path):
  result = run_check(['--tiny', '--sections=train,speed', f'--out={tmp_path / "check.json"}'])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: --sections=speed')
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'check.json').exists()


def test_a_deadline_skips_what_has_not_started_and_still_reports(tmp_path):
  out = tmp_path / 'check.json'
  result = run_check(['--tiny', '--sections=eval', '--deadline_s=0', f'--out={out}'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'skipped: eval avg, eval gem' in result.stdout
  report = json.loads(out.read_text())
  assert report['eval']['gem'] == {'skipped': 'not started before --deadline_s'}


def test_the_cpu_client_counts_a_lowered_program_as_the_backend_does():
  """The count the check uses for plugins (which analyse no lowered program) on a known one."""
  lowered = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(jnp.ones((64, 32)), jnp.ones((32, 16)))
  flops = common.flops_counted_on_cpu(lowered)
  assert flops == lowered.cost_analysis()['flops'] >= 2 * 64 * 32 * 16

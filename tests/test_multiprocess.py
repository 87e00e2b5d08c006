"""Real processes: two over gloo (CPU collectives) train and evaluate like one with 4 devices."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest

from cace_jax.evaluation import diagnostics
from cace_jax.runs import checkpoint
from conftest import run_train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_params(workdir):
  step, state, _ = checkpoint.read_checkpoint(workdir)
  return step, state['params']


def tiny_cli_args(data_dir, workdir):
  return [
    '--config',
    'configs/tiny.py',
    '--workdir',
    workdir,
    f'--config.data.data_dir={data_dir}',
    '--config.train.eval_every_epochs=0',
  ]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def two_processes(args: list[str], tool: str = 'train.py') -> list[subprocess.Popen]:
  """`tool` in two processes of two CPU devices each, joined over gloo."""
  port = free_port()
  return [
    run_train_cli(
      args + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      devices=2,
      tool=tool,
    )
    for i in range(2)
  ]


@pytest.mark.slow
def test_two_processes_over_gloo_match_one_process(tiny_data_dir, tmp_path):
  """Training and evaluation in two processes over gloo equal one process's (4 devices each).

  Evaluation keeps each process's gallery-cache rows where they were computed and
  scores each stage-2 pair on the process holding its gallery row.
  """
  multi = str(tmp_path / 'multi')
  # All-reduces over gloo and within one process sum in different orders. Those
  # last-bit differences can flip a batch-hard triplet's choice among near-equal
  # distances (at initialisation all distances are close), a discrete jump in the
  # update; the smooth losses (ID and mix-up) carry the comparison instead.
  stable = [
    '--config.optim.lr_per_16=0.001',
    '--config.train.num_steps=3',
    '--config.train.checkpoint_every=1',
    '--config.loss.weights.triplet=0',
    '--config.loss.weights.pair_triplet=0',
    '--config.train.eval_at_end=False',  # three processes evaluating would double the test's time
    # o starts at LeCun scale, not at zero: after three steps from zero, f(q|g) - f(q) is
    # ~4e-7 on unit vectors, float32 rounding itself, and the conditioning strength (a
    # ratio of such differences) would compare rounding noise, not the two evaluations.
    '--config.model.gcn_output_init=1.0',
  ]
  workers = two_processes(tiny_cli_args(tiny_data_dir, multi) + stable)
  single = run_train_cli(tiny_cli_args(tiny_data_dir, str(tmp_path / 'single')) + stable, devices=4)
  for process in workers + [single]:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  step_multi, params_multi = final_params(multi)
  step_single, params_single = final_params(str(tmp_path / 'single'))
  assert step_multi == step_single == 3
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_multi, params_single
  )
  # Not vacuous: training moved the parameters far more than the tolerance.
  _, earlier, _ = checkpoint.read_checkpoint(str(tmp_path / 'single'), step=1)
  moved = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(params_single), jax.tree.leaves(earlier['params']))
  )
  assert moved > 1e-3, moved

  # Both evaluate the two-process run's checkpoint (a copy, for its own results.json).
  alone = str(tmp_path / 'multi_evaluated_alone')
  shutil.copytree(os.path.join(multi, 'checkpoints'), os.path.join(alone, 'checkpoints'))
  evaluations = two_processes(tiny_cli_args(tiny_data_dir, multi), tool='eval.py')
  evaluations.append(run_train_cli(tiny_cli_args(tiny_data_dir, alone), devices=4, tool='eval.py'))
  for process in evaluations:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  reports = [json.loads(open(os.path.join(d, 'results.json')).read()) for d in (multi, alone)]
  assert reports[0]['results'].keys() == reports[1]['results'].keys() >= {'individual', 'cacenet'}
  for row, values in reports[1]['results'].items():
    for name, value in values.items():
      assert reports[0]['results'][row][name] == pytest.approx(value, abs=1e-6), (row, name)
  # The diagnostics (hard pairs, the probe's blocks) are assembled across processes too.
  flat = [diagnostics.flatten(report['diagnostics'], sep='/') for report in reports]
  assert flat[0].keys() == flat[1].keys() and flat[1], flat
  for name, value in flat[1].items():
    assert flat[0][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
  # Every pair scored once, by the process holding its gallery row; each holds a share.
  info = [report['info'] for report in reports]
  assert [i['processes'] for i in info] == [2, 1]
  multi_info, alone_info = info
  (scored,), by_process = (
    alone_info['stage2_pairs_scored_by_process'],
    multi_info['stage2_pairs_scored_by_process'],
  )
  assert len(by_process) == 2 and min(by_process) > 0 and sum(by_process) == scored, by_process
  (rows,), held = (
    alone_info['gallery_cache_rows_by_process'],
    multi_info['gallery_cache_rows_by_process'],
  )
  assert len(held) == 2 and sum(held) == rows and max(held) < rows, held
  for phase in ('stage1', 'stage2_pairs'):  # each process timed its own share
    times = multi_info['seconds_by_process'][phase]
    assert len(times) == 2 and min(times) > 0, (phase, times)

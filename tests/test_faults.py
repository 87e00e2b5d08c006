"""Faults a long run meets: kills, damaged checkpoints, full disks, a second run, stale locks.

One reference run (configs/tiny.py for 10 steps on 4 devices: checkpoints
at 3, 4, 6, 8, 9 and 10, all kept, a periodic evaluation at step 8, the
final one at 10) is what every interrupted or damaged run must reproduce bit for bit.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_bad_input import damage_checkpoint, snapshot

from cace_jax.data import catalog
from cace_jax.evaluation import ranking
from cace_jax.runs import checkpoint, workdir_lock
from cace_jax.train import train_lib
from conftest import pipeline_fixture_files, run_tool, write_files
from tools import prepare as prepare_tool
import train as train_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
  'train.num_steps': 10,
  'train.checkpoint_every': 3,
  'train.eval_every_epochs': 2,  # 4 steps per epoch on 4 devices: evaluates at step 8
  'train.keep_last': 10,  # keeps them all: the tests start from several
  'eval.diagnostics': False,
}


def reference_config(data_dir, **overrides):
  from configs import tiny  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  config.data.data_dir = data_dir
  for path, value in {**SETTINGS, **overrides}.items():
    section, field = path.split('.')
    setattr(config[section], field, value)
  return config


def cli_overrides(data_dir, **overrides):
  values = {'data.data_dir': data_dir, **SETTINGS, **overrides}
  return [f'--config.{path}={value}' for path, value in values.items()]


@pytest.fixture(scope='module')
def reference_run(tiny_data_dir, tmp_path_factory):
  """The uninterrupted run every fault must reproduce."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train_lib.train_and_evaluate(reference_config(tiny_data_dir), workdir)
  return workdir


def final_state(workdir):
  step, state, _ = checkpoint.read_checkpoint(workdir)
  return step, state['params']


def assert_same_params(workdir_a, workdir_b):
  step_a, params_a = final_state(workdir_a)
  step_b, params_b = final_state(workdir_b)
  assert step_a == step_b == SETTINGS['train.num_steps']
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)['results']


def logged_line(workdir, step):
  """The step's train scalars as logged, without the wall-clock throughput."""
  lines = [
    line.split('"images_per_s"')[0]
    for line in open(os.path.join(workdir, 'train.log'))
    if f'"step": {step},' in line and '"split": "train"' in line
  ]
  return lines[-1]


def kill_during_checkpoint_write(workdir, data_dir, min_step=3):
  """Starts train.py and kill -9s it while orbax writes a checkpoint of step >= min_step.

  Returns:
    The step whose write was interrupted.
  """
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  # Checkpoints at every step: each is a chance to land inside a write.
  args = ['--config', 'configs/tiny.py', '--workdir', workdir]
  args += cli_overrides(data_dir, **{'train.checkpoint_every': 1})
  process = subprocess.Popen(
    [sys.executable, 'train.py', *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  directory = os.path.join(workdir, 'checkpoints')
  try:
    while process.poll() is None:
      writing = glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*'))
      steps = [int(os.path.basename(p).split('.')[0]) for p in writing]
      if steps and max(steps) >= min_step:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return max(steps)
      time.sleep(0.001)
  finally:
    if process.poll() is None:
      process.kill()
  raise AssertionError(f'no checkpoint write was caught: {process.stderr.read()[-2000:]}')


class Killed(KeyboardInterrupt):
  """A stand-in for SIGKILL inside this process: nothing after it runs."""


REAL_EXTRACT_BOTH = ranking.extract_both


def kill_inside_evaluation(monkeypatch, calls_before_kill: int):
  """Makes the evaluation after `calls_before_kill` complete ones die midway.

  Midway: once stage-1 features of query and gallery are extracted, before
  stage 2, the tables and any file are written.
  """
  real = REAL_EXTRACT_BOTH
  count = {'n': 0}

  def dying(*args, **kwargs):
    outputs = real(*args, **kwargs)
    count['n'] += 1
    if count['n'] > calls_before_kill:
      raise Killed
    return outputs

  monkeypatch.setattr(ranking, 'extract_both', dying)


def test_killed_anywhere_resumes_to_the_same_run(
  reference_run, tiny_data_dir, tmp_path, monkeypatch
):
  """Kill during a checkpoint write, during the periodic and during the final evaluation."""
  workdir = str(tmp_path / 'killed')
  config = reference_config(tiny_data_dir)
  killed_step = kill_during_checkpoint_write(workdir, tiny_data_dir)
  complete = checkpoint.list_steps(workdir)
  assert killed_step not in complete and max(complete) == killed_step - 1 and killed_step < 8
  # Every step checkpointed until the kill; the settings below keep fewer: only
  # which checkpoints exist differs, not what is trained.
  kill_inside_evaluation(monkeypatch, calls_before_kill=0)  # the periodic one, at step 8
  with pytest.raises(Killed):
    train_lib.train_and_evaluate(config, workdir)
  assert max(checkpoint.list_steps(workdir)) < 8  # step 8 is saved after its evaluation
  kill_inside_evaluation(monkeypatch, calls_before_kill=1)  # step 8 again, then the final one
  with pytest.raises(Killed):
    train_lib.train_and_evaluate(config, workdir)
  assert max(checkpoint.list_steps(workdir)) == 9 and not os.path.exists(
    os.path.join(workdir, 'results.json')
  )
  monkeypatch.setattr(ranking, 'extract_both', REAL_EXTRACT_BOTH)
  train_lib.train_and_evaluate(config, workdir)
  assert_same_params(reference_run, workdir)
  assert results(workdir) == results(reference_run)
  assert logged_line(workdir, 10) == logged_line(reference_run, 10)


def test_resume_skips_a_damaged_checkpoint_and_keeps_it(
  reference_run, tiny_data_dir, tmp_path, capsys
):
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(reference_run, workdir)
  os.remove(os.path.join(workdir, 'results.json'))
  damage_checkpoint(workdir, 10)
  damaged = snapshot([os.path.join(workdir, 'checkpoints', '10')])
  config = reference_config(tiny_data_dir, **{'train.eval_at_end': False})
  train_lib.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert 'checkpoint step 10 cannot be restored' in out and 'resumed from' in out
  kept = os.path.join(workdir, checkpoint.DAMAGED_DIR, '10')
  moved = snapshot([kept])
  assert sorted(moved.values()) == sorted(damaged.values())  # kept byte for byte, not deleted
  assert_same_params(reference_run, workdir)  # retrained from step 9


def test_a_run_checkpointed_in_ocdbt_format_resumes(
  reference_run, tiny_data_dir, tmp_path, monkeypatch
):
  """Runs saved before checkpoints left OCDBT (`checkpoint.USE_OCDBT`) still restore and resume."""
  workdir = str(tmp_path / 'ocdbt')
  step, state, record = checkpoint.read_checkpoint(reference_run, step=9)
  with monkeypatch.context() as old_format:
    old_format.setattr(checkpoint, 'USE_OCDBT', True)
    manager = checkpoint.create_manager(workdir)
    checkpoint.save_checkpoint(manager, step, state, record)
    manager.close()
  stored = glob.glob(
    os.path.join(workdir, 'checkpoints', '9', 'state', '**', 'manifest.ocdbt'), recursive=True
  )
  assert stored, 'not an OCDBT checkpoint'
  config = reference_config(tiny_data_dir, **{'train.eval_at_end': False})
  train_lib.train_and_evaluate(config, workdir)
  assert_same_params(reference_run, workdir)  # step 10 trained from the OCDBT step 9
  # ...and the new step is written in the new format.
  assert not glob.glob(
    os.path.join(workdir, 'checkpoints', '10', '**', 'manifest.ocdbt'), recursive=True
  )


# Reading a damaged checkpoint leaves tensorstore callbacks firing into a closed
# event loop; the command line silences them (test_bad_input), a direct call does not.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_evaluation_names_a_damaged_step_and_reads_only_complete_ones(reference_run, tmp_path):
  workdir = str(tmp_path / 'being_written')
  shutil.copytree(reference_run, workdir)
  # What a training run writing step 11 looks like to a reader: orbax's temporary directory.
  shutil.copytree(
    os.path.join(workdir, 'checkpoints', '10'),
    os.path.join(workdir, 'checkpoints', '11.orbax-checkpoint-tmp-1234'),
  )
  assert checkpoint.read_checkpoint(workdir)[0] == 10
  damage_checkpoint(workdir, 10)
  with pytest.raises(checkpoint.CheckpointError, match=r'step 10 .* cannot be read') as error:
    checkpoint.read_checkpoint(workdir)
  assert '--checkpoint=9' in str(error.value)
  assert checkpoint.read_checkpoint(workdir, 9)[0] == 9


class SmallDisk:
  """A directory on a filesystem that can be filled: a 48 MiB tmpfs where mounting is
  allowed (root on Linux), otherwise ENOSPC injected at orbax's and TFDS's writes."""

  def __init__(self, path, monkeypatch):
    self.path, self.monkeypatch, self.filler = str(path), monkeypatch, None
    os.makedirs(self.path)
    mounted = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=48m', 'tmpfs', self.path], capture_output=True
    )
    self.real = mounted.returncode == 0

  def fill(self, leave_bytes: int) -> None:
    """Leaves about `leave_bytes` free (real), or makes checkpoint writes fail (injected)."""
    if self.real:
      free = shutil.disk_usage(self.path).free
      self.filler = os.path.join(self.path, 'filler')
      with open(self.filler, 'wb') as f:
        f.write(b'\0' * max(free - leave_bytes, 0))
      return

    def no_space(*args, **kwargs):
      raise OSError(errno.ENOSPC, 'No space left on device')

    self.monkeypatch.setattr(ocp.CheckpointManager, 'save', no_space)
    self.monkeypatch.setattr(catalog.tfds.core.DatasetBuilder, 'download_and_prepare', no_space)

  def free(self) -> None:
    if self.real:
      os.remove(self.filler)
    else:
      self.monkeypatch.undo()

  def close(self) -> None:
    if self.real:
      subprocess.run(['umount', self.path], check=False)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
  disk = SmallDisk(tmp_path / 'disk', monkeypatch)
  print(f'full-disk test on {"a real 48 MiB tmpfs" if disk.real else "injected ENOSPC"}')
  yield disk
  disk.close()


def test_full_disk_while_checkpointing_keeps_the_last_one_and_resumes(
  reference_run, tiny_data_dir, small_disk, capsys
):
  workdir = os.path.join(small_disk.path, 'run')
  shutil.copytree(reference_run, workdir)
  for step in checkpoint.list_steps(workdir):
    if step > 6:  # as if the run had reached step 6
      shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  os.remove(os.path.join(workdir, 'results.json'))
  before = snapshot([os.path.join(workdir, 'checkpoints', '6')])
  small_disk.fill(leave_bytes=256 * 1024)  # logs fit, a 1.5 MB checkpoint does not
  args = ['--config', os.path.join(ROOT, 'configs/tiny.py'), '--workdir', workdir]
  args += cli_overrides(tiny_data_dir, **{'train.eval_every_epochs': 0, 'train.eval_at_end': False})
  assert run_tool(train_tool, args) == 1
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith('error: no space left on the device') and 'resumes from step 6' in last
  assert checkpoint.list_steps(workdir) == [3, 4, 6]
  assert snapshot([os.path.join(workdir, 'checkpoints', '6')]) == before
  small_disk.free()
  assert run_tool(train_tool, args) == 0
  assert_same_params(reference_run, workdir)


def test_full_disk_while_preparing_keeps_prepared_data_and_reruns(
  tiny_data_dir, small_disk, tmp_path, capsys
):
  data_dir = os.path.join(small_disk.path, 'data')
  shutil.copytree(tiny_data_dir, data_dir)
  before = snapshot([data_dir])
  manual = str(tmp_path / 'manual')
  write_files(manual, pipeline_fixture_files('Market-1501-v15.09.15'))
  small_disk.fill(leave_bytes=64 * 1024)
  args = ['--dataset=market1501', '--data_dir', data_dir, '--manual_dir', manual]
  assert run_tool(prepare_tool, args) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith('error: no space left')
  after = snapshot([data_dir])
  assert {path: after.get(path) for path in before} == before
  builder = catalog.tfds.builder('market1501', data_dir=data_dir)
  assert not builder.is_prepared()
  small_disk.free()
  assert run_tool(prepare_tool, args) == 0
  assert catalog.tfds.builder('market1501', data_dir=data_dir).is_prepared()


def test_interrupted_preparation_is_never_taken_for_a_prepared_dataset(tmp_path):
  """kill -9 at several moments of generating and preparing; then a rerun succeeds."""
  data_dir = str(tmp_path / 'data')
  command = [sys.executable, 'tools/prepare.py', '--dataset=synthetic_details/tiny']
  command += ['--data_dir', data_dir]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  marks = []
  # On 2 idle cores images are generated about 3.5 s after the start, records written 4-10 s.
  for delay in (3.5, 7.0):
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(delay)
    finished = process.poll() is not None
    process.kill()
    process.wait()
    marks.append((delay, finished, sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []))
    builder = catalog.tfds.builder('synthetic_details/tiny', data_dir=data_dir)
    if builder.is_prepared():  # only ever complete: every split reads in full
      assert finished or all(
        info.num_examples == len(list(builder.as_dataset(split=split)))
        for split, info in builder.info.splits.items()
      )
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  builder = catalog.tfds.builder('synthetic_details/tiny', data_dir=data_dir)
  splits = {s: len(list(builder.as_dataset(split=s))) for s in builder.info.splits}
  assert splits == {s: i.num_examples for s, i in builder.info.splits.items()}, marks
  assert all(v > 0 for v in splits.values())


def test_a_second_run_is_refused_and_a_killed_runs_lock_taken_over(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; sys.path.insert(0, sys.argv[1]); '
      'from cace_jax.runs import workdir_lock\n'
      'with workdir_lock.hold(sys.argv[2]):\n  print("held", flush=True); time.sleep(600)',
      ROOT,
      workdir,
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f'pid {holder.pid} on '):
      with workdir_lock.hold(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  said = []
  with workdir_lock.hold(workdir, log=said.append):  # stale: its holder is dead
    with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
      assert json.load(f)['pid'] == os.getpid()
  assert len(said) == 1 and f'pid {holder.pid}' in said[0] and 'no longer alive' in said[0]
  with workdir_lock.hold(workdir, log=said.append):  # a clean exit leaves nothing to take over
    pass
  assert len(said) == 1


def test_saving_logs_no_ocdbt_merge_warning(reference_run, tmp_path, caplog):
  """Orbax's "Skipping merge of OCDBT checkpoints", logged at every non-OCDBT save, is hidden."""
  step, state, record = checkpoint.read_checkpoint(reference_run, step=9)
  manager = checkpoint.create_manager(str(tmp_path))
  with caplog.at_level('WARNING'):
    checkpoint.save_checkpoint(manager, step, state, record)
  manager.close()
  assert os.path.isdir(tmp_path / 'checkpoints' / str(step))
  assert 'OCDBT' not in caplog.text

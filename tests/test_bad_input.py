"""Bad input to every entry point: one `error:` line naming it, the right exit code, nothing lost.

Each case runs a command in this process (`cli.run`, as `python <tool>`
does) and asserts: the exit code (2 for bad input, 1 for a failure of the
run), that the last line of stderr is the `error:` line and names the
offending field, file or value, that no traceback was printed, and that no
file that existed before (a trained run, a prepared dataset, the inputs) was
changed. `test_real_processes_end_in_the_error_line` checks the same for a
few cases as real processes, including what orbax's threads print.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from bad_input_cases import CASES, ROOT, eval_args, fresh
from cace_jax.runs.workdir_lock import LOCK_FILE
from conftest import MARKET_NAME, make_jpeg, run_tool
import eval as eval_tool


class Evil:
  """Unpickling this would run a shell command."""

  def __reduce__(self):
    return (os.system, ('echo unsafe',))


def damage_checkpoint(workdir: str, step: int) -> None:
  """Truncates every array's data to half its size (a disk or copy accident).

  The data are each array's zarr chunk files (digits and dots: `0`, `0.0`)
  or, in an OCDBT checkpoint, the files of its `d/` folders.
  """
  state_dir = os.path.join(workdir, 'checkpoints', str(step), 'state')
  truncated = 0
  for folder, _, files in os.walk(state_dir):
    for name in files:
      if os.path.basename(folder) == 'd' or set(name) <= set('0123456789.'):
        path = os.path.join(folder, name)
        os.truncate(path, os.path.getsize(path) // 2)
        truncated += 1
  assert truncated, f'no array data found under {state_dir}'


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, trained_workdir, tiny_data_dir):
  """Files of every kind of bad input, a damaged copy of a run, an empty run and a lock holder."""
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  base = tmp_path_factory.mktemp('bad_input')
  files = {
    'file': base / 'a_file',
    'text_pth': base / 'notes.pth',
    'evil_pth': base / 'evil.pth',
    'r18': base / 'resnet18.pth',
    'empty_run': base / 'empty_run',
    'damaged_run': base / 'damaged_run',
    'ckpt_file_run': base / 'ckpt_file_run',
    'busy_run': base / 'busy_run',
    'escaping_manual': base / 'escaping_manual',
  }
  files['file'].write_text('not a directory\n')
  files['text_pth'].write_text('these are not weights\n')
  torch.save({'weights': Evil()}, files['evil_pth'])
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), files['r18'])
  files['empty_run'].mkdir()
  shutil.copytree(trained_workdir, files['damaged_run'])
  damage_checkpoint(str(files['damaged_run']), 2)
  files['ckpt_file_run'].mkdir()
  (files['ckpt_file_run'] / 'checkpoints').write_text('')
  files['busy_run'].mkdir()
  files['escaping_manual'].mkdir()
  with zipfile.ZipFile(files['escaping_manual'] / 'Market-1501-v15.09.15.zip', 'w') as archive:
    for folder in ('bounding_box_train', 'query', 'bounding_box_test'):
      name = MARKET_NAME.format(pid=1, cam=1, n=1)
      archive.writestr(f'Market-1501-v15.09.15/{folder}/{name}', make_jpeg(1))
    archive.writestr('../../outside.jpg', make_jpeg(2))
  paths = {key: str(value) for key, value in files.items()}
  paths.update(base=str(base), run=trained_workdir, data=tiny_data_dir)
  return paths


def snapshot(roots) -> dict[str, str]:
  """Hashes of every file under `roots` (what a bad command must leave as it was)."""
  hashes = {}
  for root in roots:
    for folder, _, files in os.walk(root):
      for name in files:
        path = os.path.join(folder, name)
        with open(path, 'rb') as f:
          hashes[path] = hashlib.sha1(f.read()).hexdigest()
  return hashes


@pytest.fixture
def busy_lock(inputs):
  """A live holder of busy_run's lock (this process, through another open file)."""
  with open(os.path.join(inputs['busy_run'], LOCK_FILE), 'a+') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write('{"pid": 1, "host": "elsewhere", "command": "train.py (the test)"}')
    handle.flush()
    yield
    fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.mark.parametrize('name,tool,make_argv,code,expected', CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_error_line(
  inputs, busy_lock, capsys, name, tool, make_argv, code, expected
):
  del name
  roots = [inputs['base'], inputs['run'], inputs['data']]
  before = snapshot(roots)
  assert run_tool(tool, make_argv(inputs)) == code
  err = capsys.readouterr().err
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  after = snapshot(roots)
  assert {path: after.get(path) for path in before} == before  # nothing changed or removed
  assert not os.path.exists(fresh(inputs))  # nothing made for a command that failed


def test_the_table_covers_every_entry_point():
  tools = {tool.__name__ for _, tool, *_ in CASES}
  assert tools >= {
    'train',
    'eval',
    'tools.port',
    'tools.prepare',
    'tools.deploy',
    'cace_jax.search',
  }
  assert len(CASES) >= 30


def test_debug_shows_the_traceback(inputs, capsys):
  assert run_tool(eval_tool, [*eval_args(inputs, inputs['run'], '--checkpoint=99'), '--debug']) == 2
  err = capsys.readouterr().err
  assert 'Traceback' in err and err.strip().splitlines()[-1].startswith('error: ')


def test_real_processes_end_in_the_error_line(inputs):
  """As processes: orbax's threads, TF and absl print nothing after the error line."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  commands = [
    (
      [sys.executable, 'eval.py', *eval_args(inputs, inputs['damaged_run'])],
      2,
      'checkpoint step 2',
    ),
    (
      [
        sys.executable,
        'tools/port.py',
        'torchvision',
        inputs['evil_pth'],
        '--depth',
        '18',
        '--out',
        fresh(inputs),
      ],
      2,
      'refused for safety',
    ),
  ]
  for argv, code, expected in commands:
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and expected in last, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr and 'weights_only=False' not in result.stderr
    assert 'unsafe' not in result.stdout  # the pickle's command never ran

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

from cace_jax import search as search_tool
from cace_jax.workdir_lock import LOCK_FILE
from conftest import MARKET_NAME, make_jpeg, run_tool
import eval as eval_tool
from tools import deploy as deploy_tool
from tools import port as port_tool
from tools import prepare as prepare_tool
import train as train_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def train_args(p, workdir, *overrides):
  return [
    '--config',
    os.path.join(ROOT, 'configs/tiny.py'),
    '--workdir',
    workdir,
    f'--config.data.data_dir={p["data"]}',
    '--config.train.eval_every_epochs=0',
    *overrides,
  ]


def eval_args(p, workdir, *overrides):
  config = os.path.join(ROOT, 'configs/tiny.py')
  return [
    '--config',
    config,
    '--workdir',
    workdir,
    f'--config.data.data_dir={p["data"]}',
    *overrides,
  ]


def fresh(p):
  return os.path.join(p['base'], 'never_created')


# (id, tool, argv from the inputs, exit code, text the error line must hold)
CASES = [
  ('train-no-workdir', train_tool, lambda p: ['--config', 'configs/tiny.py'], 2, '--workdir'),
  (
    'train-config-missing',
    train_tool,
    lambda p: ['--config', 'nope.py', '--workdir', fresh(p)],
    2,
    'nope.py',
  ),
  ('train-workdir-is-file', train_tool, lambda p: train_args(p, p['file']), 2, '--workdir='),
  (
    'train-checkpoints-is-file',
    train_tool,
    lambda p: train_args(p, p['ckpt_file_run']),
    2,
    'checkpoints',
  ),
  (
    'train-image-size-int',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.data.image_size=64'),
    2,
    'data.image_size=(64,)',
  ),
  (
    'train-depth-unknown',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.model.depth=77'),
    2,
    "model.depth='77'",
  ),
  (
    'train-checkpoint-every-0',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.train.checkpoint_every=0'),
    2,
    'train.checkpoint_every=0',
  ),
  (
    'train-num-steps-negative',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.train.num_steps=-5'),
    2,
    'train.num_steps=-5',
  ),
  (
    'train-pooling-unknown',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.model.pooling=max'),
    2,
    "model.pooling='max'",
  ),
  (
    'train-adjacency-unknown',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.model.adjacency=foo'),
    2,
    "model.adjacency='foo'",
  ),
  (
    'train-gcn-unknown',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.model.gcn=foo'),
    2,
    "model.gcn='foo'",
  ),
  (
    'train-pair-path-unknown',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.model.pair_path=slow'),
    2,
    "model.pair_path='slow'",
  ),
  (
    'train-dtype-unknown',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.model.dtype=float16'),
    2,
    "model.dtype='float16'",
  ),
  (
    'train-data-dir-is-file',
    train_tool,
    lambda p: train_args(p, fresh(p), f'--config.data.data_dir={p["file"]}'),
    2,
    'data.data_dir=',
  ),
  (
    'train-dataset-unknown',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.data.dataset=nope'),
    2,
    "'nope'",
  ),
  (
    'train-p-too-small',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.data.p=1'),
    2,
    'data.p=1',
  ),
  ('train-stray-argument', train_tool, lambda p: train_args(p, fresh(p), 'stray'), 2, 'stray'),
  (
    'train-unknown-field',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.nope.x=1'),
    2,
    "'nope.x'",
  ),
  (
    'train-field-wrong-type',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.model.embed_dim=abc'),
    2,
    'model.embed_dim=abc',
  ),
  (
    'train-erasing-out-of-range',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.data.erasing_probability=2'),
    2,
    'data.erasing_probability=2',
  ),
  (
    'train-lr-negative',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.optim.lr_per_16=-1'),
    2,
    'optim.lr_per_16=-1',
  ),
  (
    'train-mix-out-of-range',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.eval.stage2_mix=2'),
    2,
    'eval.stage2_mix=2',
  ),
  (
    'train-backbone-missing',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.init.backbone=/nope.pth'),
    2,
    '/nope.pth',
  ),
  (
    'train-init-checkpoint-missing',
    train_tool,
    lambda p: train_args(p, fresh(p), '--config.init.checkpoint=/nope'),
    2,
    'init.checkpoint=/nope',
  ),
  (
    'train-backbone-half-width',
    train_tool,
    lambda p: train_args(
      p,
      fresh(p),
      f'--config.init.backbone={p["r18"]}',
      '--config.model.depth=18',
      '--config.model.width=32',
    ),
    2,
    'model.width=64',
  ),
  (
    'train-resume-another-model',
    train_tool,
    lambda p: train_args(p, p['run'], '--config.model.embed_dim=64'),
    2,
    'model.embed_dim=64',
  ),
  (
    'train-workdir-busy',
    train_tool,
    lambda p: train_args(p, p['busy_run']),
    2,
    'being trained by another run',
  ),
  ('eval-no-checkpoint', eval_tool, lambda p: eval_args(p, p['empty_run']), 2, 'no checkpoint in'),
  ('eval-workdir-missing', eval_tool, lambda p: eval_args(p, fresh(p)), 2, 'no such directory'),
  ('eval-workdir-is-file', eval_tool, lambda p: eval_args(p, p['file']), 2, '--workdir='),
  (
    'eval-step-missing',
    eval_tool,
    lambda p: eval_args(p, p['run'], '--checkpoint=99'),
    2,
    'step 99',
  ),
  (
    'eval-model-mismatch',
    eval_tool,
    lambda p: eval_args(p, p['run'], '--config.model.embed_dim=64'),
    2,
    'model.embed_dim=64 (the checkpoint has 32)',
  ),
  (
    'eval-depth-mismatch',
    eval_tool,
    lambda p: eval_args(p, p['run'], '--config.model.depth=18'),
    2,
    "model.depth='18'",
  ),
  (
    'eval-damaged-checkpoint',
    eval_tool,
    lambda p: eval_args(p, p['damaged_run']),
    2,
    'checkpoint step 2',
  ),
  (
    'port-file-missing',
    port_tool,
    lambda p: ['torchvision', '/nope.pth', '--depth', '18', '--out', fresh(p)],
    2,
    '/nope.pth: no such file',
  ),
  (
    'port-not-a-torch-file',
    port_tool,
    lambda p: ['torchvision', p['text_pth'], '--depth', '18', '--out', fresh(p)],
    2,
    'not a torch file',
  ),
  (
    'port-refused-pickle',
    port_tool,
    lambda p: ['torchvision', p['evil_pth'], '--depth', '18', '--out', fresh(p)],
    2,
    'refused for safety',
  ),
  (
    'port-wrong-kind',
    port_tool,
    lambda p: ['official', p['r18'], '--out', fresh(p)],
    2,
    'embedding_layer',
  ),
  (
    'port-wrong-depth',
    port_tool,
    lambda p: ['torchvision', p['r18'], '--depth', '50', '--out', fresh(p)],
    2,
    'ResNet-18',
  ),
  ('port-no-command', port_tool, lambda p: ['--out', fresh(p)], 2, 'expected a command'),
  (
    'port-out-holds-checkpoints',
    port_tool,
    lambda p: ['torchvision', p['r18'], '--depth', '18', '--out', p['run']],
    2,
    'already holds checkpoints',
  ),
  (
    'port-out-is-file',
    port_tool,
    lambda p: ['torchvision', p['r18'], '--depth', '18', '--out', p['file']],
    2,
    '--out=',
  ),
  (
    'port-export-no-checkpoint',
    port_tool,
    lambda p: ['to_torch', p['empty_run'], '--out', os.path.join(p['base'], 'x.safetensors')],
    2,
    'no checkpoint in',
  ),
  (
    'prepare-unknown',
    prepare_tool,
    lambda p: ['--dataset=nope', '--data_dir', fresh(p)],
    2,
    "'nope'",
  ),
  ('prepare-data-dir-is-file', prepare_tool, lambda p: ['--data_dir', p['file']], 2, 'data_dir='),
  (
    'prepare-manual-missing',
    prepare_tool,
    lambda p: ['--dataset=market1501', '--data_dir', fresh(p)],
    2,
    'manual directory',
  ),
  (
    'prepare-zip-escapes',
    prepare_tool,
    lambda p: [
      '--dataset=market1501',
      '--data_dir',
      os.path.join(p['base'], 'records'),
      '--manual_dir',
      p['escaping_manual'],
    ],
    2,
    "'../../outside.jpg'",
  ),
  ('deploy-no-checkpoint', deploy_tool, lambda p: [p['empty_run']], 2, 'no checkpoint in'),
  (
    'deploy-image-size',
    deploy_tool,
    lambda p: [p['run'], '--image_size=abc'],
    2,
    '--image_size=abc',
  ),
  (
    'deploy-damaged-checkpoint',
    deploy_tool,
    lambda p: [p['damaged_run'], '--out', fresh(p)],
    2,
    'cannot be read',
  ),
  (
    'search-gallery-missing',
    search_tool,
    lambda p: ['--workdir', p['run'], '--gallery', '/nope', '--query', '/nope', '--out', fresh(p)],
    2,
    '--gallery=/nope',
  ),
]


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

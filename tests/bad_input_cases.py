"""The table of bad inputs, one per entry point and mistake, that `test_bad_input` runs.

Each case is (id, tool, argv from the test's inputs, exit code, text the
error line must hold); the inputs are the files `test_bad_input.inputs` makes.
"""

from __future__ import annotations

import os

from cace_jax import search as search_tool
import eval as eval_tool
from tools import deploy as deploy_tool
from tools import port as port_tool
from tools import prepare as prepare_tool
import train as train_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    'prepare-reid-folder-manual-missing',
    prepare_tool,
    lambda p: ['--dataset=reid_folder/mine', '--data_dir', fresh(p)],
    2,
    'no dataset found in',
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

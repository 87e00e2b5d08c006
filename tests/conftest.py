"""Shared test fixtures: small on-disk datasets in the real layouts."""

from __future__ import annotations

# torchvision (CUDA build of torch 2.14.1) segfaults inside triton when imported
# after TensorFlow; imported first, both work. The porting tests need it.
import torch  # pylint: disable=unused-import
import torchvision  # pylint: disable=unused-import

import atexit
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# Multi-device paths run on 4 fake CPU devices (`make test` sets this too), and
# identical programs compiled by several tests (or their subprocesses) are
# compiled once. Both must be set before JAX initialises.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # the suite's own, removed when it ends
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jax_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Tests import `configs` the way train.py does, from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The project's default XLA flags join the ones above, as in every entry point.
import cace_jax

import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_jpeg(seed: int, size=(32, 16)) -> bytes:
  """A small JPEG whose colour depends on `seed` (so images differ)."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def write_files(root: str, files: dict[str, bytes]) -> None:
  for relpath, data in files.items():
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)


def write_zip(zip_path: str, files: dict[str, bytes]) -> None:
  with zipfile.ZipFile(zip_path, 'w') as archive:
    for relpath, data in files.items():
      archive.writestr(relpath, data)


def market_style_files(root: str, name_format: str) -> dict[str, bytes]:
  """A Market/Duke-layout dataset under folder `root` with junk and distractors.

  Train: pids 2, 7, 9 (3 images each) plus a junk image. Query: pids 3, 5.
  Gallery: pids 3, 5 (2 each, other cameras), a distractor (pid 0) and junk.
  """
  names = {
    'bounding_box_train': [
      (2, 1),
      (2, 2),
      (2, 3),
      (7, 1),
      (7, 4),
      (7, 4),
      (9, 2),
      (9, 5),
      (9, 6),
      (-1, 1),
    ],
    'query': [(3, 1), (5, 2)],
    'bounding_box_test': [(3, 2), (3, 3), (5, 1), (5, 6), (0, 3), (-1, 2)],
  }
  files = {}
  seed = 0
  for folder, entries in names.items():
    for pid, cam in entries:
      seed += 1
      files[f'{root}/{folder}/{name_format.format(pid=pid, cam=cam, n=seed)}'] = make_jpeg(seed)
  files[f'{root}/bounding_box_train/Thumbs.db'] = b'not an image'
  files[f'{root}/readme.txt'] = b'fixture'
  return files


MARKET_NAME = '{pid:04d}_c{cam}s1_{n:06d}_01.jpg'
DUKE_NAME = '{pid:04d}_c{cam}_f{n:07d}.jpg'


def msmt_files(root: str, train_dir: str, test_dir: str) -> dict[str, bytes]:
  """An MSMT17-layout dataset: list files `<pid dir>/<name> <pid>` over train/test dirs."""
  files = {}
  lists = {'list_train.txt': [], 'list_val.txt': [], 'list_query.txt': [], 'list_gallery.txt': []}
  entries = {
    'list_train.txt': (train_dir, [(0, 1), (0, 3), (1, 2), (1, 15)]),
    'list_val.txt': (train_dir, [(2, 4), (2, 5)]),
    'list_query.txt': (test_dir, [(0, 7), (1, 8)]),
    'list_gallery.txt': (test_dir, [(0, 9), (1, 10), (1, 11)]),
  }
  seed = 100
  for list_name, (folder, items) in entries.items():
    for index, (pid, cam) in enumerate(items):
      seed += 1
      relpath = f'{pid:04d}/{pid:04d}_{index:03d}_{cam:02d}_0303morning_{seed:04d}_0.jpg'
      files[f'{root}/{folder}/{relpath}'] = make_jpeg(seed)
      lists[list_name].append(f'{relpath} {pid}')
  for list_name, lines in lists.items():
    files[f'{root}/{list_name}'] = ('\n'.join(lines) + '\n').encode()
  return files


def run_tool(tool, argv) -> int:
  """Runs an entry point (`tools/*.py`, train.py, eval.py) in this process; its exit code.

  `sys.argv` is set too: ml_collections reads it to find `--config.*` overrides.
  """
  from cace_jax.commands import cli

  saved, sys.argv = sys.argv, ['prog', *argv]
  try:
    return cli.run(list(sys.argv), tool.define_flags, tool.main, tool.__doc__)
  finally:
    sys.argv = saved


@pytest.fixture
def market_manual_dir(tmp_path):
  """A manual dir holding an extracted Market-1501 folder."""
  manual = tmp_path / 'manual'
  write_files(str(manual), market_style_files('Market-1501-v15.09.15', MARKET_NAME))
  return str(manual)


def pipeline_fixture_files(root: str) -> dict[str, bytes]:
  """A Market-layout set sized for sampler tests: 8 train ids with 2-7 images each."""
  files = {}
  seed = 1000
  for pid, count in zip(range(1, 9), (5, 4, 7, 2, 4, 6, 3, 4)):
    for i in range(count):
      seed += 1
      name = MARKET_NAME.format(pid=pid, cam=i % 6 + 1, n=seed)
      files[f'{root}/bounding_box_train/{name}'] = make_jpeg(seed, size=(48, 24))
  for folder, pids in (('query', (20, 21, 22)), ('bounding_box_test', (20, 21, 22, 23, 24))):
    for pid in pids:
      for cam in (1, 2):
        seed += 1
        name = MARKET_NAME.format(pid=pid, cam=cam, n=seed)
        files[f'{root}/{folder}/{name}'] = make_jpeg(seed, size=(48, 24))
  return files


@pytest.fixture(scope='session')
def pipeline_builder(tmp_path_factory):
  """A prepared market1501 builder over `pipeline_fixture_files`."""
  from cace_jax.data import catalog

  base = tmp_path_factory.mktemp('pipeline')
  write_files(str(base / 'manual'), pipeline_fixture_files('Market-1501-v15.09.15'))
  return catalog.prepare_dataset('market1501', str(base / 'records'), str(base / 'manual'))


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  """A data dir with synthetic_details/tiny prepared (the tiny config's dataset)."""
  from cace_jax.data import catalog

  data_dir = str(tmp_path_factory.mktemp('tiny_data'))
  catalog.prepare_dataset('synthetic_details/tiny', data_dir)
  return data_dir


@pytest.fixture(scope='session')
def trained_workdir(tiny_data_dir, tmp_path_factory):
  """A workdir holding a 2-step configs/tiny.py checkpoint (no results.json)."""
  from cace_jax.train import train_lib
  from configs import tiny

  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.train.num_steps = 2
  config.train.eval_every_epochs = 0
  workdir = str(tmp_path_factory.mktemp('trained'))
  train_lib.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, 'results.json'))
  return workdir


def run_train_cli(args, env=None, devices=4, tool='train.py'):
  """Starts `python <tool> args` from the repository root on `devices` fake CPU devices."""
  env = dict(os.environ, **(env or {}))
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return subprocess.Popen(
    [sys.executable, tool, *args],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )

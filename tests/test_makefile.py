"""The Makefile picks a Python interpreter that requires-python in pyproject.toml allows."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE = shutil.which('make')
pytestmark = pytest.mark.skipif(MAKE is None, reason='make is not installed')


def dry_run(tmp_path, pythons: dict, *args, requires: str | None = None):
  """`make -n demo` in a copy of the Makefile, with only `pythons` (name -> answer) on PATH.

  Each stand-in interpreter prints its answer to any command (the Makefile
  asks python3 for its minor version); sed is the one real tool on PATH.
  """
  repo, path = tmp_path / 'repo', tmp_path / 'bin'
  repo.mkdir(parents=True)
  path.mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, 'Makefile'), repo)
  with open(os.path.join(ROOT, 'pyproject.toml')) as f:
    pyproject = f.read()
  if requires is not None:
    pyproject = re.sub(r'(?m)^requires-python = .*$', f'requires-python = "{requires}"', pyproject)
  (repo / 'pyproject.toml').write_text(pyproject)
  os.symlink(shutil.which('sed'), path / 'sed')
  for name, answer in pythons.items():
    (path / name).write_text(f'#!/bin/sh\necho {answer}\n')
    (path / name).chmod(0o755)
  return subprocess.run(
    [MAKE, '-n', 'demo', *args], cwd=repo, env={'PATH': str(path)}, capture_output=True, text=True
  )


def venv_python(done) -> str:
  assert done.returncode == 0, done.stderr
  return done.stdout.splitlines()[0].removesuffix(' -m venv .venv')


def test_the_first_supported_interpreter_on_path_creates_the_venv(tmp_path):
  assert venv_python(dry_run(tmp_path / 'a', {'python3.12': ''})) == 'python3.12'
  # 3.11, the version the pins were verified on, comes first.
  assert venv_python(dry_run(tmp_path / 'b', {'python3.12': '', 'python3.11': ''})) == 'python3.11'
  # python3 only when its version is supported.
  assert venv_python(dry_run(tmp_path / 'c', {'python3': 12})) == 'python3'
  assert venv_python(dry_run(tmp_path / 'd', {'python3': 12}, 'PYTHON=/opt/py')) == '/opt/py'


@pytest.mark.parametrize('pythons', [{}, {'python3': 10, 'python3.10': ''}])
def test_no_supported_interpreter_stops_with_one_line_naming_the_versions(pythons, tmp_path):
  done = dry_run(tmp_path, pythons)
  assert done.returncode == 2 and not done.stdout
  assert len(done.stderr.strip().splitlines()) == 1
  assert 'no supported Python on PATH: expected python3.11 or python3.12' in done.stderr


def test_requires_python_is_the_one_list_of_versions(tmp_path):
  wider = '>=3.11,<3.14'
  assert venv_python(dry_run(tmp_path / 'a', {'python3.13': ''}, requires=wider)) == 'python3.13'
  done = dry_run(tmp_path / 'b', {}, requires=wider)
  assert 'expected python3.11 or python3.12 or python3.13' in done.stderr
  done = dry_run(tmp_path / 'c', {'python3.12': ''}, requires='>=3.11')
  assert done.returncode == 2 and 'cannot read the supported versions' in done.stderr

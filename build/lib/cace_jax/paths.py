"""Paths a command will write under: checked before any work, named when wrong.

Below every module that takes a directory from the user (the config checks,
dataset preparation, porting), so that a file standing where a directory
should be is one clear line, not a `NotADirectoryError` after minutes of work.
"""

from __future__ import annotations

import os

from cace_jax.errors import UserError


def check_directory(path: str, what: str, must_exist: bool = False) -> None:
  """Raises UserError unless `path` is a directory, or (unless `must_exist`) could be made one.

  Catches a file standing where a workdir, data dir or checkpoint directory
  should be (`NotADirectoryError` after training for a while, otherwise).
  """
  if os.path.isdir(path):
    return
  if os.path.exists(path):
    raise UserError(f'{what}={path}: expected a directory, found a file')
  if must_exist:
    raise UserError(f'{what}={path}: no such directory')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f'{what}={path}: cannot be created, {parent} is a file')

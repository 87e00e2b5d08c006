"""`model.plugins`: the user's modules that register graph variants, imported before a model exists.

A plugin is a module name importable from `sys.path` (`my_lab.graphs`) or a
path to a `.py` file; `model.plugins` holds one or several, separated by
commas. Importing one runs its `register_adjacency` / `register_operator` /
`register_onnx_*` calls. The config check imports them before it reads
`model.adjacency` or `model.gcn`, and `build_model` imports the ones a
checkpoint's record names, so training, evaluation, the search API and
export see the same kinds. File paths are made absolute when a config is
checked, so the run's record finds them from any directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys

from cace_jax.errors import ConfigError


def split(plugins: str) -> tuple[str, ...]:
  """'a.py, pkg.mod' -> ('a.py', 'pkg.mod')."""
  return tuple(name.strip() for name in (plugins or '').split(',') if name.strip())


def is_file(name: str) -> bool:
  return name.endswith('.py')


def resolve(plugins: str) -> str:
  """The same plugins with file paths made absolute (against the current directory)."""
  return ','.join(os.path.abspath(name) if is_file(name) else name for name in split(plugins))


def load(plugins: str) -> None:
  """Imports every plugin once; ConfigError naming one that cannot be imported.

  A file is imported under a name derived from its absolute path, so loading
  it again (a second model, a resumed run) does not register its kinds twice.
  """
  for name in split(plugins):
    if is_file(name):
      _load_file(name)
      continue
    if name in sys.modules:
      continue
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as error:
      raise ConfigError(
        f'model.plugins: cannot import {name!r} ({error}); give a module on sys.path or a .py file'
      ) from error


def _load_file(path: str) -> None:
  path = os.path.abspath(path)
  digest = hashlib.sha1(path.encode()).hexdigest()[:12]
  module_name = f'cace_jax_plugin_{os.path.splitext(os.path.basename(path))[0]}_{digest}'
  if module_name in sys.modules:
    return
  if not os.path.isfile(path):
    raise ConfigError(f'model.plugins: no such file {path}')
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]  # a fixed file can be loaded again
    raise

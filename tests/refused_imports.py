"""Python source that makes some top-level packages unimportable, for subprocess tests.

`prelude(names)` returns code to run first in `python -c`: it installs an
import hook that fails for `names` as a missing package would, and checks
that it does. The accelerator host has no TensorFlow, no TFDS and (unless a
wheel is carried) no ml_collections; the tests run the code meant for it so.
"""

from __future__ import annotations

ON_THE_ACCELERATOR_HOST = ('tensorflow', 'tensorflow_datasets')

_PRELUDE = """
import importlib, importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {names}:
      raise ModuleNotFoundError(f'No module named {{name!r}} (refused by the test)', name=name)

sys.meta_path.insert(0, Refuse())
for refused in {names}:
  try:
    importlib.import_module(refused)
  except ModuleNotFoundError:
    pass
  else:
    raise SystemExit(f'the refusal of {{refused}} did not work')
"""


def prelude(names) -> str:
  """Code that makes importing any of `names` (top-level packages) raise ModuleNotFoundError."""
  return _PRELUDE.format(names=tuple(names))

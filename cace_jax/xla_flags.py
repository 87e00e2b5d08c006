"""The XLA flags cace_jax sets by default, before JAX starts its backend.

One flag today: convolutions on the CPU are compiled by XLA itself rather than
handed to YNNPACK. jaxlib 0.10 to 0.12 send every convolution to YNNPACK by
default (`--xla_cpu_experimental_ynn_fusion_type` holds `individual_convolution`),
and that path trains a ResNet-50 at half the speed of XLA's own
convolutions on an AVX-512 CPU; `docs/cpu.md` has the measurements and the
accuracy against a float64 reference. Matrix products and reductions keep
jaxlib's defaults.

XLA reads `XLA_FLAGS` once, when the first computation starts the backend, so
the flag is added to the environment when `cace_jax` is imported, which every
entry point (train.py, eval.py, tools/, benchmarks/, the API, the tests) does
before it computes anything. It is left out when:

- the user's `XLA_FLAGS` already sets `--xla_cpu_experimental_ynn_fusion_type`
  (their value wins);
- `CACE_JAX_DEFAULT_XLA_FLAGS=0` is set (jaxlib's own defaults);
- the installed jaxlib is outside the versions known to accept the flag (XLA
  aborts at start on a flag it does not know);
- JAX will run on a GPU or TPU: an accelerator plugin is installed and
  `JAX_PLATFORMS` does not ask for the CPU alone. The flag only concerns the
  CPU compiler, and an accelerator's plugin parses `XLA_FLAGS` too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from typing import Mapping

FUSION_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
# `-x` removes x from jaxlib's default set; dots and reductions stay with YNNPACK.
FAST_CONVOLUTIONS = f'{FUSION_FLAG}=-individual_convolution'
OPT_OUT = 'CACE_JAX_DEFAULT_XLA_FLAGS'
# jaxlib releases whose XLA takes the flag with its `-` edits: 0.10.2 (Python 3.11,
# the pinned set), 0.11.2 and 0.12.0.1 (Python 3.12) were run. 0.9 ships the flag
# too, but was not run: outside this range nothing is added.
KNOWN_JAXLIB = ((0, 10), (0, 13))
_ACCELERATOR_MODULES = ('jax_plugins', 'libtpu')

_log = logging.getLogger(__name__)
_outcome = 'not applied yet'


def parse_version(text: str) -> tuple[int, ...]:
  """'0.10.2' -> (0, 10, 2); stops at the first part that is not a number ('0.11.0rc1')."""
  numbers = []
  for part in text.split('.'):
    digits = part[: len(part) - len(part.lstrip('0123456789'))]
    if not digits:
      break
    numbers.append(int(digits))
    if digits != part:
      break
  return tuple(numbers)


def jaxlib_knows_flag(jaxlib_version: str) -> bool:
  """Whether this jaxlib release is one run with the flag (`KNOWN_JAXLIB`)."""
  low, high = KNOWN_JAXLIB
  return low <= parse_version(jaxlib_version)[:2] < high


def default_xla_flags(
  environ: Mapping[str, str], jaxlib_version: str | None, accelerator_installed: bool
) -> tuple[str | None, str]:
  """What `XLA_FLAGS` should become, and why.

  Args:
    environ: the process environment (read only).
    jaxlib_version: the installed jaxlib's version, None when it is not installed.
    accelerator_installed: whether a GPU or TPU plugin for JAX is installed.

  Returns:
    (new value of XLA_FLAGS, or None to leave it as it is; a one-line reason).
  """
  current = environ.get('XLA_FLAGS', '')
  if environ.get(OPT_OUT, '').strip().lower() in ('0', 'false', 'no', 'off'):
    return None, f"{OPT_OUT}={environ[OPT_OUT]}: jaxlib's own defaults kept"
  if any(f.split('=', 1)[0] == FUSION_FLAG for f in current.split()):
    return None, f'XLA_FLAGS already sets {FUSION_FLAG}'
  if jaxlib_version is None or not jaxlib_knows_flag(jaxlib_version):
    return None, f'jaxlib {jaxlib_version} is not known to accept {FUSION_FLAG}'
  platforms = environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms != 'cpu' and (accelerator_installed or platforms not in ('', 'cpu')):
    return None, 'JAX runs on an accelerator here; the flag is for the CPU compiler'
  return ' '.join(f for f in (current, FAST_CONVOLUTIONS) if f), f'added {FAST_CONVOLUTIONS}'


def _installed_jaxlib() -> str | None:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return None


def _backend_started() -> bool:
  if 'jax' not in sys.modules:  # nothing can have started it
    return False
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  return xla_bridge.backends_are_initialized()


def apply_default_xla_flags() -> str:
  """Adds the project's default flags to `os.environ['XLA_FLAGS']`; returns the reason.

  Called when `cace_jax` is imported. Warns once when JAX's backend already
  runs: the flags then change nothing in this process.
  """
  global _outcome
  accelerator = any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES)
  value, _outcome = default_xla_flags(os.environ, _installed_jaxlib(), accelerator)
  if value is None:
    return _outcome
  os.environ['XLA_FLAGS'] = value
  if _backend_started():
    _log.warning(
      'JAX started before cace_jax was imported, so %s does not apply in this process '
      '(CPU convolutions stay on YNNPACK, about half as fast): import cace_jax first.',
      FAST_CONVOLUTIONS,
    )
  return _outcome


def outcome() -> str:
  """What the import of cace_jax did with the default flags (benchmarks record it)."""
  return _outcome


def count_ynnpack_convolutions(hlo_text: str) -> int:
  """Convolutions that a compiled program hands to YNNPACK, from `compiled.as_text()`.

  YNNPACK's fusions are named `ynn_fusion` and call a computation; matrix
  products go there too by default, so only fusions whose computation holds a
  convolution count.
  """
  bodies, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    if line.startswith('%') and line.rstrip().endswith('{'):
      name, lines = line.split()[0][1:], []
    elif line.startswith('}') and name is not None:
      bodies[name], name = '\n'.join(lines), None
    elif name is not None:
      lines.append(line)
  count = 0
  for line in hlo_text.splitlines():
    if '= ' in line and 'ynn_fusion' in line.split('= ', 1)[0] and 'calls=%' in line:
      called = line.split('calls=%', 1)[1].split(',', 1)[0].split()[0]
      count += ' convolution(' in bodies.get(called, '')
  return count

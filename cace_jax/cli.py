"""The command line every entry point shares: absl flags, process set-up, one-line errors.

`train.py`, `eval.py`, `tools/*.py` and `benchmarks/*.py` each define their
flags on a fresh `FlagValues` and hand them to `run`, so that a bad flag, a
mistyped `--config.` field or a user error (`errors.UserError`) ends in one
`error:` line and exit code 2, the same way everywhere. Fresh flag sets also
let tests call several entry points in one process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Sequence

from absl import flags, logging
import jax
import ml_collections

from cace_jax.errors import UserError

_OVERRIDE_PREFIX = '--config.'
_HELP = ('-h', '--help', '--helpfull')


def run(
  argv: Sequence[str],
  define_flags: Callable[[flags.FlagValues], None],
  main: Callable[[flags.FlagValues, list[str]], None],
  usage: str = '',
) -> int:
  """Parses `argv` with the flags `define_flags` defines, then calls `main(flags, positional)`.

  Returns the exit code: 0, or 2 after printing one `error:` line for a bad
  flag, an unknown config field or a user error (also a non-finite loss and
  a missing file). `--help` prints `usage` and the flags.
  """
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  if any(arg in _HELP for arg in argv[1:]):
    print(usage.strip() + '\n\n' + flag_values.get_help(include_special_flags=False))
    return 0
  try:
    positional = flag_values(list(argv))[1:]
  except Exception as e:  # noqa: BLE001  (absl and ml_collections raise several kinds)
    return _report(_explain_config_override(argv) or str(e))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging asks for parsed global flags
  try:
    main(flag_values, positional)
  except (UserError, FloatingPointError, FileNotFoundError) as e:
    return _report(str(e))
  return 0


def _report(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 2


def expect_arguments(positional: Sequence[str], names: Sequence[str]) -> None:
  """Fails with a usage error unless exactly the positional arguments `names` were given."""
  if len(positional) != len(names):
    expected = ' '.join(names) or 'none'
    raise UserError(
      f'expected positional arguments: {expected}; got {" ".join(positional) or "none"}'
    )


def _explain_config_override(argv: Sequence[str]) -> str | None:
  """The first `--config.a.b=v` whose path is not in the config, explained.

  ml_collections reports an unknown field as a bare KeyError; users need the
  field and the list of valid names, on one line.
  """
  config_path = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      config_path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      config_path = argv[i + 1]
  if config_path is None:
    return None
  try:
    config = load_config(config_path)
  except Exception as e:  # noqa: BLE001  (any failure of user code in the config file)
    return f'cannot load config {config_path}: {e}'
  for arg in argv:
    if not arg.startswith(_OVERRIDE_PREFIX):
      continue
    path = arg[len(_OVERRIDE_PREFIX) :].split('=', 1)[0]
    node, walked = config, []
    for name in path.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        where = '.'.join(walked) or 'the config'
        valid = (
          ', '.join(sorted(node.keys()))
          if isinstance(node, ml_collections.ConfigDict)
          else '(not a section)'
        )
        return f'unknown config field {path!r} in {config_path}; valid fields of {where}: {valid}'
      node, walked = node[name], walked + [name]
  return None


def load_config(config_arg: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way `config_flags` does (for error messages)."""
  path, _, arg = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location('_config_for_errors', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def init_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts JAX's multi-process runtime when asked to, and keeps TF off accelerators.

  With explicit flags, connects to the coordinator; with none, initialises
  only where the environment describes a cluster (JAX_COORDINATOR_ADDRESS,
  or a TPU pod / SLURM job JAX detects). On CPU, collectives go through gloo
  so one machine can run several processes. Call it before any JAX computation.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)  # TFDS logs every file it opens at INFO.
  # tf.data only needs the CPU; it must not take GPU memory from JAX. TF is
  # heavy and only input pipelines need it, so only this function imports it.
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')
  explicit = coordinator_address is not None
  if explicit or os.environ.get('JAX_COORDINATOR_ADDRESS') or _in_cluster():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def _in_cluster() -> bool:
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ

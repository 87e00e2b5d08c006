"""The command line every entry point shares: absl flags, process set-up, one-line errors.

`train.py`, `eval.py`, `tools/*.py`, `python -m cace_jax.search` and
`benchmarks/*.py` each define their flags on a fresh `FlagValues` and hand
them to `run`, so that every way a command can end badly (a bad flag, a
mistyped `--config.` field, a user error, a failure of the run) ends in one
`error:` line and one exit code, the same way everywhere. Fresh flag sets
also let tests call several entry points in one process.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import sys
import traceback
from typing import Callable, Sequence

from absl import flags, logging
import jax
import ml_collections

from cace_jax.errors import RunFailure, UserError, is_disk_full

_OVERRIDE_PREFIX = '--config.'
_HELP = ('-h', '--help', '--helpfull')


DEBUG_FLAG = '--debug'
DEBUG_ENV = 'CACE_JAX_DEBUG'
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
_MAX_MESSAGE = 2000  # characters of one error line; --debug shows everything


def run(
  argv: Sequence[str],
  define_flags: Callable[[flags.FlagValues], None],
  main: Callable[[flags.FlagValues, list[str]], None],
  usage: str = '',
) -> int:
  """Parses `argv` with the flags `define_flags` defines, then calls `main(flags, positional)`.

  Every entry point goes through here, so every error ends the same way: one
  line `error: ...` on stderr, nothing after it, no traceback unless
  `--debug` (or the environment variable CACE_JAX_DEBUG=1) asks for one.

  Returns:
    The exit code: 0; 2 for bad input (a flag, a config field, a file, a
    dataset: `errors.UserError` and missing or misplaced paths); 1 for a
    failure of the run (a non-finite loss, a full disk, anything
    unexpected); 130 when interrupted. `--help` prints `usage` and the flags.
  """
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  flags.DEFINE_boolean(
    'debug', False, f'Print tracebacks (or set {DEBUG_ENV}=1).', flag_values=flag_values
  )
  debug = DEBUG_FLAG in argv[1:] or os.environ.get(DEBUG_ENV, '') not in ('', '0')
  if not debug:
    # A failed orbax restore leaves tensorstore callbacks that fire into a closed
    # event loop, from C++ threads, until exit: hundreds of "unraisable"
    # tracebacks around the one error line. They repeat the error; --debug shows them.
    sys.unraisablehook = _ignore_unraisable
    # Orbax's writes run as asyncio tasks; when one fails (a full disk), every
    # sibling logs "Task exception was never retrieved" with its traceback.
    std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)
  if any(arg in _HELP for arg in argv[1:]):
    print(usage.strip() + '\n\n' + flag_values.get_help(include_special_flags=False))
    return 0
  try:
    positional = flag_values(list(argv))[1:]
    for name in flag_values:  # a config file that failed to load fails here, as bad input
      if type(flag_values[name].value).__name__ == '_ErrorConfig':  # ml_collections' stand-in
        raise OSError(f'--{name}: cannot load the config file')
  except Exception as e:  # noqa: BLE001  (absl and ml_collections raise several kinds)
    if debug:
      traceback.print_exc()
    return _report(_explain_config_override(argv) or _flag_error(e), EXIT_BAD_INPUT)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging asks for parsed global flags
  try:
    main(flag_values, positional)
  except KeyboardInterrupt:
    return _report(
      'interrupted; complete checkpoints and prepared datasets are kept, and the same '
      'command resumes',
      EXIT_INTERRUPTED,
    )
  except Exception as e:  # noqa: BLE001  (the one place every failure is reported)
    if debug:
      traceback.print_exc()
    code, message = describe_error(e)
    return _report(message, code)
  return 0


def _ignore_unraisable(unraisable) -> None:
  del unraisable


def describe_error(error: Exception) -> tuple[int, str]:
  """The exit code and the one-line message for an exception that ended a command."""
  if isinstance(error, UserError):
    return EXIT_BAD_INPUT, str(error)
  if isinstance(error, (FloatingPointError, RunFailure)):
    return EXIT_FAILURE, str(error)
  if is_disk_full(error):
    where = _filename_in(error)
    return EXIT_FAILURE, (
      f'no space left on the device{f" ({where})" if where else ""}: free some space and run '
      'the command again; complete checkpoints and prepared datasets are kept'
    )
  if isinstance(error, tuple(_PATH_ERRORS)):
    if not error.filename:
      return EXIT_BAD_INPUT, str(error)
    return EXIT_BAD_INPUT, (
      f'{(error.strerror or type(error).__name__).lower()} ({error.filename}): '
      + next(advice for kind, advice in _PATH_ERRORS.items() if isinstance(error, kind))
    )
  first_line = (str(error).strip().splitlines() or [''])[0]
  return EXIT_FAILURE, (
    f'unexpected {type(error).__name__}: {first_line} (run again with {DEBUG_FLAG} or '
    f'{DEBUG_ENV}=1 for the traceback)'
  )


_PATH_ERRORS = {
  FileNotFoundError: 'expected an existing file or directory there',
  NotADirectoryError: 'a file stands where a directory is expected',
  IsADirectoryError: 'a directory stands where a file is expected',
  FileExistsError: 'something already exists there; it is never overwritten',
  PermissionError: 'this process may not read or write there',
}


def _filename_in(error: BaseException) -> str | None:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.filename:
      return str(error.filename)
    error = error.__cause__ or error.__context__
  return None


def _flag_error(error: Exception) -> str:
  # absl says "flag --x=None: Flag --x must have a value other than None."
  message = str(error)
  if 'must have a value other than None' in message:
    name = message.split('=', 1)[0].removeprefix('flag ')
    return f'{name} is required (see --help)'
  return message


def _report(message: str, code: int) -> int:
  """Prints `error: message` as the last line of stderr and returns `code`."""
  sys.stdout.flush()
  message = ' '.join(str(message).split())  # one line, whatever the exception held
  if len(message) > _MAX_MESSAGE:
    message = message[:_MAX_MESSAGE] + f' ... ({len(message) - _MAX_MESSAGE} more characters)'
  print(f'error: {message}', file=sys.stderr, flush=True)
  return code


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


def define_distributed_flags(flag_values: flags.FlagValues) -> None:
  """--coordinator_address, --num_processes and --process_id, for `init_distributed`."""
  flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (multi-host).', flag_values=flag_values
  )
  flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (multi-host).', flag_values=flag_values
  )
  flags.DEFINE_integer('process_id', None, 'This process (multi-host).', flag_values=flag_values)


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
  # heavy and only input pipelines need it, so only this function imports it,
  # and only where it is installed (an accelerator check runs without it).
  try:
    import tensorflow as tf  # deferred: heavy, and absent on accelerator-check hosts
  except ModuleNotFoundError as error:
    if error.name != 'tensorflow':  # TensorFlow is there but broken: say so
      raise
  else:
    tf.config.set_visible_devices([], 'GPU')
  explicit = coordinator_address is not None
  if explicit or os.environ.get('JAX_COORDINATOR_ADDRESS') or _in_cluster():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def _in_cluster() -> bool:
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ

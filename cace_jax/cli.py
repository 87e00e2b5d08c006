"""What train.py and eval.py share: flag parsing, process set-up, error reporting."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging
import jax
import ml_collections

_OVERRIDE_PREFIX = '--config.'


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing that names a bad `--config.` override and its valid siblings.

  ml_collections reports an unknown field as a bare KeyError; users need the
  field and the list of valid names, on one line, with a non-zero exit.
  """
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = _explain_config_override(argv) or str(e)
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def _explain_config_override(argv: Sequence[str]) -> str | None:
  """The first `--config.a.b=v` whose path is not in the config, explained."""
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
  except Exception as e:  # pylint: disable=broad-except
    return f'cannot load config {config_path}: {e}'
  for arg in argv:
    if not arg.startswith(_OVERRIDE_PREFIX):
      continue
    path = arg[len(_OVERRIDE_PREFIX):].split('=', 1)[0]
    node, walked = config, []
    for name in path.split('.'):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        where = '.'.join(walked) or 'the config'
        valid = ', '.join(sorted(node.keys())) if isinstance(
            node, ml_collections.ConfigDict) else '(not a section)'
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


def init_distributed(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
  """Starts JAX's multi-process runtime when asked to, and keeps TF off accelerators.

  With explicit flags, connects to the coordinator; with none, initialises
  only where the environment describes a cluster (JAX_COORDINATOR_ADDRESS,
  or a TPU pod / SLURM job JAX detects). On CPU, collectives go through gloo
  so one machine can run several processes.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)  # TFDS logs every file it opens at INFO.
  # tf.data only needs the CPU; it must not take GPU memory from JAX.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], 'GPU')
  explicit = coordinator_address is not None
  if explicit or os.environ.get('JAX_COORDINATOR_ADDRESS') or _in_cluster():
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def _in_cluster() -> bool:
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in os.environ


def run_reporting_errors(function: Callable, *args) -> int:
  """Runs `function(*args)`; known user errors become one `error:` line and exit 2."""
  from cace_jax.datasets.manual_source import DatasetError  # pylint: disable=import-outside-toplevel
  from cace_jax.port import PortError  # pylint: disable=import-outside-toplevel
  from cace_jax.train_lib import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    function(*args)
  except (DatasetError, ConfigError, PortError, FloatingPointError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0

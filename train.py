"""Train CACE-Net: python train.py --config configs/market.py --workdir runs/market

Any config field can be overridden, e.g. `--config.optim.lr_per_16=0.0125`;
`--config configs/file.py:arg` passes `arg` to the file's get_config. A run
resumes from the latest checkpoint in --workdir. Multi-host: pass
--coordinator_address, --num_processes and --process_id (or set the
environment JAX expects, e.g. on TPU pods or SLURM) and start one process per
host.
"""

import sys

from absl import flags
from ml_collections import config_flags

from cace_jax.commands import cli
from cace_jax.train import train_lib


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, logs and results.', flag_values=flag_values
  )
  cli.define_distributed_flags(flag_values)
  config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py[:arg]).', flag_values=flag_values, lock_config=True
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  cli.init_distributed(args.coordinator_address, args.num_processes, args.process_id)
  train_lib.train_and_evaluate(args.config, args.workdir)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

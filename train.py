"""Train CACE-Net: python train.py --config configs/market.py --workdir runs/market

Any config field can be overridden, e.g. `--config.optim.lr_per_16=0.0125`;
`--config configs/file.py:arg` passes `arg` to the file's get_config. A run
resumes from the latest checkpoint in --workdir. Multi-host: pass
--coordinator_address, --num_processes and --process_id (or set the
environment JAX expects, e.g. on TPU pods or SLURM) and start one process per
host.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cace_jax import cli

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from cace_jax import train_lib  # pylint: disable=import-outside-toplevel
  return cli.run_reporting_errors(train_lib.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  sys.exit(app.run(main, flags_parser=cli.parse_flags))

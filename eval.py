"""Evaluate a run: python eval.py --config configs/market.py --workdir runs/market

Evaluates the latest checkpoint of --workdir (or --checkpoint=STEP) on the
query/gallery splits with the paper's two-stage inference, prints the results
table and writes <workdir>/results.json. Config overrides work as in train.py
(e.g. `--config.eval.stage2_k=50`).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cace_jax import cli

flags.DEFINE_string('workdir', None, 'The training run directory.')
flags.DEFINE_integer('checkpoint', None, 'Step to evaluate (default: the latest).')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.init_distributed(None, None, None)
  from cace_jax import eval_lib  # pylint: disable=import-outside-toplevel
  return cli.run_reporting_errors(eval_lib.evaluate_checkpoint, FLAGS.config, FLAGS.workdir,
                                  FLAGS.checkpoint)


if __name__ == '__main__':
  sys.exit(app.run(main, flags_parser=cli.parse_flags))

"""Evaluate a run: python eval.py --config configs/market.py --workdir runs/market

Evaluates the latest checkpoint of --workdir (or --checkpoint=STEP) on the
query/gallery splits with the paper's two-stage inference, prints the results
table and writes <workdir>/results.json and the figures. Config overrides
work as in train.py (e.g. `--config.eval.stage2_k=50`). Multi-host as in
train.py (--coordinator_address, --num_processes, --process_id): every
process embeds its share of each batch and scores its share of the stage-2
pairs; process 0 writes the results.
"""

import sys

from absl import flags
from ml_collections import config_flags

from cace_jax.commands import cli
from cace_jax.evaluation import command


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'The training run directory.', flag_values=flag_values)
  flags.DEFINE_integer(
    'checkpoint', None, 'Step to evaluate (default: the latest).', flag_values=flag_values
  )
  cli.define_distributed_flags(flag_values)
  config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py[:arg]).', flag_values=flag_values, lock_config=True
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  cli.init_distributed(args.coordinator_address, args.num_processes, args.process_id)
  command.evaluate_checkpoint(args.config, args.workdir, args.checkpoint)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

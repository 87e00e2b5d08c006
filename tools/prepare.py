"""Prepare a dataset as TFDS records: python tools/prepare.py --dataset market1501

NAME is a builder name, optionally with its config: market1501, dukemtmc_reid,
msmt17, msmt17/trainval, occluded_duke, synthetic_details (= /default),
synthetic_details/occluded, synthetic_details/tiny. Downloads are read from
<data_dir>/manual (or --manual_dir). A dataset that is already prepared is
left as it is; a failed preparation leaves no partial records. Training
prepares its dataset on first use, so this is only needed to do it ahead.
"""

import sys
import time

from absl import flags

from cace_jax.commands import cli
from cace_jax.data import catalog


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'dataset', 'synthetic_details', 'Builder name with optional /config.', flag_values=flag_values
  )
  flags.DEFINE_string(
    'data_dir', catalog.DEFAULT_DATA_DIR, 'Where TFDS records go.', flag_values=flag_values
  )
  flags.DEFINE_string(
    'manual_dir', None, 'Where downloads are (default: <data_dir>/manual).', flag_values=flag_values
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  start = time.time()
  builder = catalog.prepare_dataset(args.dataset, args.data_dir, args.manual_dir)
  splits = ', '.join(
    f'{split} {info.num_examples}' for split, info in sorted(builder.info.splits.items())
  )
  print(
    f'{builder.info.full_name} ready in {builder.data_dir} ({splits}) '
    f'after {time.time() - start:.1f}s'
  )


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

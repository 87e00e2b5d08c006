"""Generate the synthetic_details dataset: python tools/synthetic.py --out DIR [--preview grid.png]

Writes Market-1501's layout and file names into --out (which must not hold
anything else); `tools/prepare.py --dataset synthetic_details` and training
do this by themselves under data/manual/.
"""

import dataclasses
import sys
import time

from absl import flags

from cace_jax.commands import cli
from cace_jax.data.synthetic_details import generator
from cace_jax.errors import DatasetError


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('out', None, 'Output folder (Market-1501 layout).', flag_values=flag_values)
  flags.DEFINE_enum(
    'preset', 'default', sorted(generator.PRESETS), 'Dataset preset.', flag_values=flag_values
  )
  flags.DEFINE_integer('seed', None, "Overrides the preset's seed.", flag_values=flag_values)
  flags.DEFINE_string('preview', None, 'Also save a preview PNG here.', flag_values=flag_values)
  flags.mark_flag_as_required('out', flag_values=flag_values)


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  config = generator.PRESETS[args.preset]
  if args.seed is not None:
    config = dataclasses.replace(config, seed=args.seed)
  start = time.time()
  try:
    counts = generator.generate_dataset(args.out, config)
  except FileExistsError as e:  # something else lives there: never overwrite it
    raise DatasetError(str(e)) from e
  for split, c in counts.items():
    print(
      f'{split:8s} {c["images"]:5d} images {c["ids"]:4d} ids (junk {c["junk"]}, '
      f'distractors {c["distractors"]}, occluded {c["occluded"]})'
    )
  print(f'{args.out} ready after {time.time() - start:.1f}s')
  if args.preview:
    print(f'preview: {generator.save_preview(args.preview, config)}')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

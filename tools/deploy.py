"""Deployment models of a run: python tools/deploy.py runs/market [--out DIR] [--step N]

Writes both stages of the paper's inference, each as ONNX (opset 17) and as a
serialized `jax.export` module, into --out (default WORKDIR/export), with
export.json recording the shapes and the onnxruntime-vs-JAX differences; an
ONNX model that misses JAX by more than --tolerance ends the command with
exit 1. Ported checkpoints need --image_size=384,128. Needs the onnx extra.
"""

import json
import sys

from absl import flags

from cace_jax.commands import cli
from cace_jax.errors import UserError
from cace_jax.evaluation import records
from cace_jax.interop import deployment


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('out', None, 'Directory (default WORKDIR/export).', flag_values=flag_values)
  flags.DEFINE_integer(
    'step', None, 'The checkpoint (default: the latest).', flag_values=flag_values
  )
  flags.DEFINE_list(
    'image_size', None, "H,W (default: the training config's).", flag_values=flag_values
  )
  flags.DEFINE_boolean(
    'no_flip',
    False,
    "No flip averaging (default: the config's eval.flip).",
    flag_values=flag_values,
  )
  flags.DEFINE_enum(
    'stage2',
    'validation',
    records.SERVING_POLICIES,
    "export.json's stage 2: the run's choice on validation, else none ('validation'), or "
    "its config's ('config').",
    flag_values=flag_values,
  )
  flags.DEFINE_boolean('no_verify', False, 'Skip the onnxruntime check.', flag_values=flag_values)
  flags.DEFINE_float(
    'tolerance',
    deployment.VERIFY_TOLERANCE,
    'Largest onnxruntime-vs-JAX difference accepted; larger exits 1.',
    flag_values=flag_values,
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, ['WORKDIR'])
  image_size = None
  if args.image_size:
    if len(args.image_size) != 2 or not all(v.isdigit() for v in args.image_size):
      raise UserError(f'--image_size={",".join(args.image_size)}: expected H,W, e.g. 384,128')
    image_size = tuple(int(v) for v in args.image_size)
  summary = deployment.export_deployment(
    positional[0],
    args.out,
    args.step,
    image_size,
    flip=False if args.no_flip else None,
    verify=not args.no_verify,
    tolerance=args.tolerance,
    stage2=args.stage2,
  )
  print(json.dumps(summary, indent=2))


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

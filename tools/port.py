"""PyTorch weights in and out of orbax checkpoints.

  python tools/port.py torchvision resnet50.pth --depth 50 --out runs/r50_ported [--no_fc]
  python tools/port.py official cacenet_market.pth --out runs/cacenet_official
  python tools/port.py to_torch runs/market --out cacenet.safetensors [--step N]   # or .pth

`torchvision` and `official` write a checkpoint (step 0) that eval.py,
tools/deploy.py and `--config.init.checkpoint` read like a training run;
the official model's config is inferred from the file and stored with it.
`to_torch` writes a run (trained or ported) back with official key names
(the `module.` prefix), or torchvision's for a torchvision port.
"""

import json
import sys

from absl import flags

from cace_jax.commands import cli
from cace_jax.errors import UserError
from cace_jax.interop import torch_export, torch_weights

COMMANDS = ('torchvision', 'official', 'to_torch')


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'out',
    None,
    'Workdir to write (torchvision, official) or the *.safetensors / *.pth file (to_torch).',
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    'depth', None, 'ResNet depth of a torchvision file.', flag_values=flag_values
  )
  flags.DEFINE_boolean(
    'no_fc', False, 'torchvision: drop the ImageNet classifier.', flag_values=flag_values
  )
  flags.DEFINE_integer(
    'step', None, 'to_torch: the checkpoint (default: the latest).', flag_values=flag_values
  )
  flags.mark_flag_as_required('out', flag_values=flag_values)


def main(args: flags.FlagValues, positional: list[str]) -> None:
  if not positional or positional[0] not in COMMANDS:
    raise UserError(
      f'expected a command, one of {", ".join(COMMANDS)}; got '
      f'{positional[0] if positional else "none"}'
    )
  command = positional[0]
  cli.expect_arguments(positional[1:], ['WORKDIR' if command == 'to_torch' else 'FILE'])
  source = positional[1]
  if command == 'torchvision':
    if args.depth is None:
      raise UserError('torchvision needs --depth (18, 34, 50 or 101)')
    variables = torch_weights.load_torchvision_resnet(source, args.depth, include_fc=not args.no_fc)
    model = {'resnet_depth': args.depth, 'include_fc': not args.no_fc}
    torch_weights.write_ported_checkpoint(args.out, variables, model, source)
  elif command == 'official':
    variables, model = torch_weights.load_official_cacenet(source)
    torch_weights.write_ported_checkpoint(args.out, variables, model, source)
  else:
    torch_export.export_checkpoint(source, args.out, args.step)
  print(json.dumps({'command': command, 'out': args.out}))


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

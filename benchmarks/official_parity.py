"""One training forward of the official CACENET module beside ours: every loss part and BN buffer.

  git clone https://github.com/TencentYoutuResearch/PersonReID-YouReID /tmp/official
  python benchmarks/official_parity.py --official=/tmp/official

Needs the torch extra. Builds the official `models/cacenet.py` CACENET
(ResNet-50, non-local blocks, GeM, as `example/cacenet/cacenet.yaml`) with
random weights (its ImageNet download is switched off; the pair graph and the
non-local outputs, zero at init, are perturbed so that they matter, and the BN
buffers are randomised), ports its state_dict into our CACENet, runs one
training-mode forward of both on the same images and prints:

  * each part of the official `compute_loss` beside ours (dropout off on
    both sides, so the logits are comparable), and our triplets without the
    ReLU that the official in-place `nn.ReLU` applies, to show it matters;
  * the largest relative gap over all 54 BatchNorms' running mean and
    variance after the forward (backbone BNs once, the embedding BN three
    times, unbiased variance).

The official code is read, never copied: it stays in its own directory.
The tests check the same against a PyTorch model written after it
(`tests/test_port_official.py`), so they do not need this download.
"""

from __future__ import annotations

import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.errors import ConfigError  # pylint: disable=wrong-import-position
from cace_jax.interop import (
  torch_export,
  torch_weights,  # pylint: disable=wrong-import-position
)
from cace_jax.models import (
  CACENet,  # pylint: disable=wrong-import-position
  losses,  # pylint: disable=wrong-import-position
)

# Official compute_loss names -> ours (its f_0 is f(v|u) of our pair (u, v)).
LOSS_NAMES = {
  'cls_loss': 'id',
  'mixup_loss_0': 'mixup_vu',
  'mixup_loss_1': 'mixup_uv',
  'tri_loss': 'triplet',
  'pair_tri_loss': 'pair_triplet',
}


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'official', None, 'A checkout of PersonReID-YouReID.', flag_values=flag_values
  )
  flags.DEFINE_integer('batch', 4, 'Images (2 identities).', flag_values=flag_values)
  flags.DEFINE_string(
    'out', 'benchmarks/results/official_parity.json', 'JSON report.', flag_values=flag_values
  )
  flags.mark_flags_as_required(['official'], flag_values=flag_values)


def official_module(path: str):
  """The official CACENET class, importable offline and on a CPU."""
  if not os.path.exists(os.path.join(path, 'models', 'cacenet.py')):
    raise ConfigError(
      f'--official={path}: no models/cacenet.py there (a PersonReID-YouReID checkout)'
    )
  import torch  # optional: the torch extra

  sys.path.insert(0, path)
  from models import cacenet  # the official package  # pylint: disable=import-outside-toplevel
  from models.backbones import resnet  # pylint: disable=import-outside-toplevel

  resnet.ResNet.load_pretrain = lambda self, model_path='': None  # no ImageNet download
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # its losses move targets to the GPU
  return cacenet.CACENET


def random_official_net(cacenet_class, seed: int = 0):
  """CACENET of the official config with non-trivial weights and BN buffers, dropout off."""
  import torch  # optional: the torch extra

  torch.manual_seed(seed)
  net = cacenet_class(num_classes=5, num_layers='resnet50', pool_type='gemm', use_non_local=True)
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, tensor in net.named_parameters():
      if name.startswith('pair_graph') or '.W.' in name:  # zero-initialised officially
        tensor.copy_(0.02 * torch.randn(tensor.shape, generator=generator))
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
  net.fc_layer[1].p = 0.0
  net.pair_fc_layer[1].p = 0.0
  return net


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  import torch  # optional: the torch extra

  net = random_official_net(official_module(args.official))
  before = {k: v.detach().clone().numpy() for k, v in net.state_dict().items()}
  variables, config = torch_weights.load_official_cacenet(net.state_dict())
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, 3, 64, 32)).astype(np.float32)
  labels = np.repeat(np.arange(args.batch // 2), 2)

  net.train()
  official_losses, names = net.compute_loss(net(torch.from_numpy(images)), torch.from_numpy(labels))
  official_losses = {n: float(value.detach()) for n, value in zip(names, official_losses)}
  after = {f'module.{k}': v.detach().numpy() for k, v in net.state_dict().items()}

  model = CACENet(**config, dropout_rate=0.0)
  outputs, updates = jax.jit(
    lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
    )
  )(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
  _, parts = losses.total_loss(outputs, jnp.asarray(labels))
  _, unrectified = losses.total_loss(outputs, jnp.asarray(labels), rectified_triplets=False)

  exported = torch_export.export_official_cacenet({**variables, **updates}, model)
  buffers = [k for k in exported if k.endswith(('running_mean', 'running_var'))]
  gaps = {k: float(np.abs(exported[k] - after[k]).max() / np.abs(after[k]).max()) for k in buffers}
  moved = min(float(np.abs(before[k[len('module.') :]] - after[k]).max()) for k in buffers)
  worst = max(gaps, key=gaps.get)

  print(f'{"loss part":<14} {"official":>10} {"ours":>10}')
  report = {'losses': {}, 'unrectified_triplets': {}}
  for official_name, ours_name in LOSS_NAMES.items():
    ours = float(parts[ours_name])
    print(f'{official_name:<14} {official_losses[official_name]:10.6f} {ours:10.6f}')
    report['losses'][official_name] = {'official': official_losses[official_name], 'ours': ours}
  for name in ('triplet', 'pair_triplet'):
    report['unrectified_triplets'][name] = float(unrectified[name])
  print(
    f'without the ReLU our triplets would be {float(unrectified["triplet"]):.6f} and '
    f'{float(unrectified["pair_triplet"]):.6f}'
  )
  print(
    f'{len(buffers)} BN buffers: largest relative gap {gaps[worst]:.2g} ({worst}); '
    f'every buffer moved by at least {moved:.3g} in the forward'
  )
  report.update(buffers=len(buffers), worst_buffer=worst, worst_gap=gaps[worst], min_move=moved)
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

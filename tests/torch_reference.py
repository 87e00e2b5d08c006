"""PyTorch references for the porting tests: torchvision ResNets and the official CACE-Net.

The official network is written here in PyTorch from the official
repository's `models/cacenet.py` and `core/layers.py` (non-local blocks,
GeM, the projected pair graph, heads), so that its checkpoints can be made
and run without that repository.

Parity tolerance: max |ours - torch| <= 1e-4 * max |torch| on every compared
output (float32 on CPU; both sides sum the same products in different
orders, so the observed gap is ~1e-6 relative). Round trips are exact.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

RELATIVE_TOLERANCE = 1e-4
IMAGES_NCHW = np.random.default_rng(0).normal(size=(2, 3, 64, 32)).astype(np.float32)
IMAGES_NHWC = jnp.asarray(IMAGES_NCHW.transpose(0, 2, 3, 1))
jit = functools.partial(
  jax.jit, static_argnums=(0,), compiler_options={'xla_backend_optimization_level': 0}
)


def assert_close(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  scale = np.abs(reference).max()
  gap = np.abs(ours - reference).max()
  assert gap <= RELATIVE_TOLERANCE * scale, f'max diff {gap:.3g} vs scale {scale:.3g}'


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Non-trivial BN affine parameters and running statistics, so the port of each is tested."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        size = module.num_features
        module.weight.copy_(0.5 + torch.rand(size, generator=generator))
        module.bias.copy_(0.1 * torch.randn(size, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
  return model.eval()


def torchvision_resnet(depth: int, last_stride: int = 2, seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = getattr(torchvision.models, f'resnet{depth}')(weights=None)
  if last_stride == 1:
    first = model.layer4[0]
    # torchvision puts the stride on conv2 of a Bottleneck, on conv1 of a BasicBlock.
    (first.conv2 if depth >= 50 else first.conv1).stride = (1, 1)
    first.downsample[0].stride = (1, 1)
  return randomize_batchnorm(model, seed)


def numpy_state(model: torch.nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def backbone_forward(model, images):
  return torch.nn.Sequential(*list(model.children())[:-2])(images)


def fill_abstract(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)


class TorchNonLocal(torch.nn.Module):
  """The official backbone's non-local block (g/theta/phi/W 1x1 convs with bias)."""

  def __init__(self, channels):
    super().__init__()
    inner = channels // 16
    self.g, self.theta, self.phi = (torch.nn.Conv2d(channels, inner, 1) for _ in range(3))
    self.W = torch.nn.Conv2d(inner, channels, 1)  # pylint: disable=invalid-name

  def forward(self, x):
    batch, channels, height, width = x.shape
    g = self.g(x).flatten(2).transpose(1, 2)
    theta = self.theta(x).flatten(2).transpose(1, 2)
    phi = self.phi(x).flatten(2)
    y = torch.softmax(theta @ phi, dim=-1) @ g
    return x + self.W(y.transpose(1, 2).reshape(batch, -1, height, width))


class TorchGeM(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.p = torch.nn.Parameter(torch.tensor([3.4]))

  def forward(self, x):
    return x.clamp(min=1e-6).pow(self.p).mean((2, 3), keepdim=True).pow(1.0 / self.p)


class TorchPairGraph(torch.nn.Module):
  """Official pair graph from DESIGN.md sec. 4, on width-concatenated pairs [N, C, h, 2w]."""

  def __init__(self, channels):
    super().__init__()
    inner = channels // 16
    self.y = torch.nn.Conv2d(channels, inner, 1, bias=False)
    self.g = torch.nn.Conv2d(channels, inner, 1, bias=False)
    self.o = torch.nn.Conv2d(inner, channels, 1, bias=False)

  def forward(self, x):
    num, _, height, width = x.shape
    y = F.normalize(self.y(x).flatten(2), dim=1)  # [N, r, n]
    adjacency = torch.relu(y.transpose(1, 2) @ y)  # [N, n, n]
    eye = torch.eye(adjacency.shape[-1])
    adjacency = adjacency * (1 - eye)
    degree = adjacency.sum(-1)
    norm = torch.where(degree > 1e-3, degree, torch.ones_like(degree)).rsqrt()
    laplacian = norm[:, :, None] * (torch.diag_embed(degree) - adjacency) * norm[:, None, :]
    mixed = self.g(x).flatten(2) @ laplacian  # [N, r, n]
    return x + self.o(mixed.reshape(num, -1, height, width))


class TorchCACENet(torch.nn.Module):
  """Eval-mode official CACE-Net with its state_dict key names."""

  def __init__(self, num_classes=5, embed_dim=768, seed=0):
    super().__init__()
    self.resnet = torchvision_resnet(50, last_stride=1, seed=seed)
    del self.resnet.fc
    for stage, index in (('layer2', 2), ('layer3', 4), ('layer4', 1)):
      block = getattr(self.resnet, stage)[index]
      block.non_local_block = TorchNonLocal(block.conv3.out_channels)
      block.register_forward_hook(lambda module, _, out: module.non_local_block(out))
    self.gemp = TorchGeM()
    self.pair_graph = TorchPairGraph(2048)
    self.embedding_layer = torch.nn.Sequential(
      torch.nn.Conv2d(2048, embed_dim, 1, bias=False), torch.nn.BatchNorm2d(embed_dim)
    )
    self.fc_layer = torch.nn.Sequential(
      torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(embed_dim, num_classes, bias=False)
    )
    self.pair_fc_layer = torch.nn.Sequential(
      torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(embed_dim, num_classes, bias=False)
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # zero-initialised in the official code: make them matter.
      for name, tensor in self.named_parameters():
        if 'non_local_block.W' in name or name.startswith('pair_graph'):
          tensor.copy_(0.02 * torch.randn(tensor.shape, generator=generator))
    randomize_batchnorm(self, seed)

  def backbone(self, images):
    r = self.resnet
    x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
    return r.layer4(r.layer3(r.layer2(r.layer1(x))))

  def head(self, fmap):
    return self.embedding_layer(self.gemp(fmap)).flatten(1)

  def forward(self, images):
    x = self.backbone(images)
    b, width = x.shape[0], x.shape[-1]
    pairs = torch.cat([x.repeat(b, 1, 1, 1), x.repeat_interleave(b, dim=0)], dim=-1)
    pairs = self.pair_graph(pairs)
    return x, self.head(x), self.head(pairs[..., :width]), self.head(pairs[..., width:])


@functools.lru_cache(maxsize=None)
def official_case():
  model = TorchCACENet().eval()
  with torch.no_grad():
    outputs = [t.numpy() for t in model(torch.from_numpy(IMAGES_NCHW))]
  return model, outputs


def save_official(model, path):
  state = {f'module.{k}': v for k, v in model.state_dict().items()}
  torch.save(
    {'epoch': 80, 'state_dict': state, 'optimizer': {'state': {}, 'param_groups': []}}, path
  )

"""ResNet backbones in NHWC, laid out like torchvision so weights port one-to-one.

Module names follow torchvision's state_dict keys with dots turned into
underscores inside a stage: `conv1`, `bn1`, `layer1_0` ... `layer4_2`, and in
each block `conv1/bn1/conv2/bn2(/conv3/bn3)` and `downsample_conv` /
`downsample_bn` (torchvision's `downsample.0` / `downsample.1`). The optional
classifier is `fc`. A ported kernel is the torch weight transposed
(O, I, kh, kw) -> (kh, kw, I, O); BatchNorm `weight/bias/running_mean/
running_var` map to `scale/bias` (params) and `mean/var` (batch_stats).

Differences from torchvision that matter for parity:
  * `last_stride` (default 1, the ReID convention) sets the stride of
    layer4; use 2 for ImageNet parity.
  * Optional non-local blocks (the official CACE-Net backbone), see
    `NonLocal` and `non_local_positions`.

BatchNorm is `layers.BatchNorm`, not flax's: its running averages follow
PyTorch's (unbiased variance from two-pass statistics), so a training step
leaves the buffers torchvision's would.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cace_jax.models.layers import BatchNorm, torch_default_bias_init, torch_default_kernel_init

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# depth -> (blocks per stage, block type). 'tiny' is a 4-block bottleneck net for
# tests; pair it with a small `width`.
RESNET_SPECS = {
  18: ((2, 2, 2, 2), 'basic'),
  34: ((3, 4, 6, 3), 'basic'),
  50: ((3, 4, 6, 3), 'bottleneck'),
  101: ((3, 4, 23, 3), 'bottleneck'),
  'tiny': ((1, 1, 1, 1), 'bottleneck'),
}
_EXPANSION = {'basic': 1, 'bottleneck': 4}


def output_channels(depth: int | str, width: int = 64) -> int:
  """Channels C of the final feature map of a ResNet of `depth` and base `width`."""
  _, block = RESNET_SPECS[depth]
  return width * 8 * _EXPANSION[block]


def feature_map_shape(
  image_size: Sequence[int], depth: int | str, width: int = 64, last_stride: int = 1
) -> tuple[int, int, int]:
  """(h, w, C) of the final maps for images of `image_size` (H, W).

  Each stride-2 layer (conv1, the max pool, layer2, layer3 and layer4 unless
  `last_stride` is 1) rounds its input size up, as padded convolutions do.
  """
  strides = (2, 2, 2, 2, last_stride)
  height, width_px = image_size
  for stride in strides:
    height, width_px = -(-height // stride), -(-width_px // stride)
  return height, width_px, output_channels(depth, width)


def non_local_positions(stage_sizes: Sequence[int]) -> tuple[str, ...]:
  """Blocks followed by a non-local block: the second-to-last block of stages 2-4.

  For ResNet-50 (3, 4, 6, 3) these are layer2_2, layer3_4 and layer4_1, the
  positions of the official CACE-Net backbone; other depths get the analogous
  block (ResNet-18/34: layer2_0/layer3_0/layer4_0 and layer2_2/layer3_4/
  layer4_1; ResNet-101: layer2_2, layer3_21, layer4_1; one-block stages use
  their only block).
  """
  return tuple(f'layer{stage + 1}_{max(stage_sizes[stage] - 2, 0)}' for stage in (1, 2, 3))


class NonLocal(nn.Module):
  """Embedded-Gaussian non-local block: x + W(softmax(theta(x) phi(x)^T) g(x)).

  g, theta, phi (C -> C/16) and W (C/16 -> C) are 1x1 convs with bias, as in the
  official backbone. W starts at zero (kernel and bias), so the block starts as
  the identity and an ImageNet-initialised backbone is unchanged at step 0
  (the official code zeroes W's weight only; its bias keeps torch's default).
  g/theta/phi use torch's default conv init.
  """

  reduction: int = 16
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: [B, h, w, C]
    batch, height, width, channels = x.shape
    inner = max(channels // self.reduction, 1)
    conv = functools.partial(
      nn.Conv,
      features=inner,
      kernel_size=(1, 1),
      use_bias=True,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(channels),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    g = conv(name='g')(x).reshape(batch, height * width, inner)
    theta = conv(name='theta')(x).reshape(batch, height * width, inner)
    phi = conv(name='phi')(x).reshape(batch, height * width, inner)
    # Softmax over key positions in float32: logits are unscaled sums over C/16.
    logits = jnp.einsum('bic,bjc->bij', theta, phi).astype(jnp.float32)
    attention = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum('bij,bjc->bic', attention, g).reshape(batch, height, width, inner)
    w_y = nn.Conv(
      channels,
      (1, 1),
      use_bias=True,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='W',
    )(y)
    return x + w_y


class BasicBlock(nn.Module):
  """torchvision BasicBlock: two 3x3 convs; stride on conv1."""

  planes: int
  stride: int
  downsample: bool
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    out = self.conv(
      self.planes, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)), name='conv1'
    )(x)
    out = nn.relu(self.norm(name='bn1')(out))
    out = self.conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(out)
    out = self.norm(name='bn2')(out)
    if self.downsample:
      x = self.conv(self.planes, (1, 1), (self.stride, self.stride), name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (carries the stride) -> 1x1 (x4)."""

  planes: int
  stride: int
  downsample: bool
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    out = nn.relu(self.norm(name='bn1')(self.conv(self.planes, (1, 1), name='conv1')(x)))
    out = self.conv(
      self.planes, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)), name='conv2'
    )(out)
    out = nn.relu(self.norm(name='bn2')(out))
    out = self.norm(name='bn3')(self.conv(self.planes * 4, (1, 1), name='conv3')(out))
    if self.downsample:
      x = self.conv(self.planes * 4, (1, 1), (self.stride, self.stride), name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """torchvision-compatible ResNet.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    block: 'basic' or 'bottleneck'.
    width: channels of the stem and of stage 1's inner convs (64 in torchvision).
    last_stride: stride of layer4 (1 for ReID, 2 for torchvision parity).
    non_local: insert non-local blocks after `non_local_positions(stage_sizes)`.
    num_classes: if set, global-average-pool and a 1000-way style `fc` head.
    dtype: compute dtype (float32 or bfloat16); parameters stay `param_dtype`.
    bn_axis_name: mapped axis to average BatchNorm statistics over (sync BN);
      None keeps per-device statistics.
  """

  stage_sizes: Sequence[int]
  block: str = 'bottleneck'
  width: int = 64
  last_stride: int = 1
  non_local: bool = False
  num_classes: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Runs the network.

    Args:
      x: images [B, H, W, 3].
      train: use batch statistics in BatchNorm (and update them).

    Returns:
      `(out, features)`: `out` is the logits [B, num_classes] if `num_classes`
      is set, else the final feature map [B, h, w, C]; `features` holds
      'stem', 'layer1' ... 'layer4' and 'fmap' (the layer4 output).
    """
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      kernel_init=conv_kernel_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    norm = functools.partial(
      BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      axis_name=self.bn_axis_name,
    )
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    expansion = _EXPANSION[self.block]
    non_local_after = non_local_positions(self.stage_sizes) if self.non_local else ()

    features = {}
    x = x.astype(self.dtype)
    x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features['stem'] = x
    in_channels = self.width
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**stage
      stage_stride = 1 if stage == 0 else (self.last_stride if stage == 3 else 2)
      for index in range(num_blocks):
        stride = stage_stride if index == 0 else 1
        name = f'layer{stage + 1}_{index}'
        x = block_cls(
          planes=planes,
          stride=stride,
          downsample=index == 0 and (stride != 1 or in_channels != planes * expansion),
          conv=conv,
          norm=norm,
          name=name,
        )(x)
        in_channels = planes * expansion
        if name in non_local_after:
          x = NonLocal(dtype=self.dtype, param_dtype=self.param_dtype, name=f'nl_{name}')(x)
      features[f'layer{stage + 1}'] = x
    features['fmap'] = x
    if self.num_classes is None:
      return x, features
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(
      self.num_classes,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(in_channels),
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      name='fc',
    )(pooled)
    return logits, features


def make_resnet(depth: int | str = 50, **kwargs) -> ResNet:
  """A ResNet of torchvision depth 18/34/50/101 (or 'tiny'); kwargs go to `ResNet`."""
  stage_sizes, block = RESNET_SPECS[depth]
  return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)

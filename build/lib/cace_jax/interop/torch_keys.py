"""The one table between PyTorch state_dict keys and Flax variable paths, and its tensor layouts.

Every conversion, in and out (`torch_weights`), goes through one explicit
table from torch keys to Flax paths (`resnet_key_table`, `cacenet_key_table`);
each row says how to turn the tensor around:

  'conv'   torch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]
  'linear' torch linear weight [O, I]       -> Flax kernel [I, O]
  'copy'   unchanged (biases, BN scale/bias/mean/var, GeM's p)

Official CACE-Net checkpoints (TencentYoutuResearch/PersonReID-YouReID,
models/cacenet.py) use torchvision's ResNet-50 whose bottlenecks layer2.2,
layer3.4 and layer4.1 own a `non_local_block` (g/theta/phi/W, 1x1 convs with
bias) applied after the block's last ReLU:
`resnet.layer2.2.non_local_block.W.weight` <-> our `backbone/nl_layer2_2/W`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cace_jax.errors import PortError
from cace_jax.models.resnet import RESNET_SPECS, non_local_positions

TORCH_BN_TAIL = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}
# Bookkeeping buffers that carry no weights; dropped on the way in.
IGNORED_SUFFIXES = ('num_batches_tracked',)
NON_LOCAL_CONVS = ('g', 'theta', 'phi', 'W')
OFFICIAL_PREFIX = 'module.'


def _conv_rows(torch_prefix: str, flax_path: tuple, bias: bool = False) -> dict:
  rows = {f'{torch_prefix}.weight': (('params',) + flax_path + ('kernel',), 'conv')}
  if bias:
    rows[f'{torch_prefix}.bias'] = (('params',) + flax_path + ('bias',), 'copy')
  return rows


def _bn_rows(torch_prefix: str, flax_path: tuple) -> dict:
  return {
    f'{torch_prefix}.{name}': ((collection,) + flax_path + (leaf,), 'copy')
    for name, (collection, leaf) in TORCH_BN_TAIL.items()
  }


def resnet_key_table(
  depth: int,
  include_fc: bool = True,
  non_local: bool = False,
  non_local_name: str = 'non_local_block',
) -> dict:
  """torch key -> (Flax path, transform) for a torchvision ResNet of `depth`.

  Args:
    depth: 18, 34, 50 or 101.
    include_fc: include the ImageNet classifier `fc.weight` / `fc.bias`.
    non_local: include the official non-local blocks, keyed
      `layerS.I.<non_local_name>.{g,theta,phi,W}.{weight,bias}`.
    non_local_name: attribute name of the block inside the bottleneck.

  Returns:
    dict torch key -> ((collection, *flax path), transform), transform in
    {'conv', 'linear', 'copy'}; paths start with 'params' or 'batch_stats'.
  """
  if depth not in RESNET_SPECS or not isinstance(depth, int):
    raise PortError(f'depth {depth!r}: torchvision ResNets are 18, 34, 50 or 101')
  stage_sizes, block = RESNET_SPECS[depth]
  convs = ('conv1', 'conv2') if block == 'basic' else ('conv1', 'conv2', 'conv3')
  table = {**_conv_rows('conv1', ('conv1',)), **_bn_rows('bn1', ('bn1',))}
  non_local_after = non_local_positions(stage_sizes) if non_local else ()
  for stage, num_blocks in enumerate(stage_sizes):
    for index in range(num_blocks):
      torch_block, flax_block = f'layer{stage + 1}.{index}', f'layer{stage + 1}_{index}'
      for number, conv in enumerate(convs, start=1):
        table.update(_conv_rows(f'{torch_block}.{conv}', (flax_block, conv)))
        table.update(_bn_rows(f'{torch_block}.bn{number}', (flax_block, f'bn{number}')))
      # torchvision: a projection shortcut exactly on each stage's first block
      # (stage 1 of bottleneck nets changes width, later stages stride).
      if index == 0 and (stage > 0 or block == 'bottleneck'):
        table.update(_conv_rows(f'{torch_block}.downsample.0', (flax_block, 'downsample_conv')))
        table.update(_bn_rows(f'{torch_block}.downsample.1', (flax_block, 'downsample_bn')))
      if flax_block in non_local_after:
        for conv in NON_LOCAL_CONVS:
          table.update(
            _conv_rows(
              f'{torch_block}.{non_local_name}.{conv}', (f'nl_{flax_block}', conv), bias=True
            )
          )
  if include_fc:
    table['fc.weight'] = (('params', 'fc', 'kernel'), 'linear')
    table['fc.bias'] = (('params', 'fc', 'bias'), 'copy')
  return table


def cacenet_key_table(
  depth: int = 50, non_local: bool = True, pooling: str = 'gem', num_classes: bool = True
) -> dict:
  """torch key (without `module.`) -> (Flax path, transform) for an official CACE-Net.

  The official model (`CACENET`): `resnet` (backbone), `gemp.p`, `pair_graph`
  with bias-free 1x1 convs y/g/o, `embedding_layer` = Sequential(Conv2d 1x1
  no bias, BatchNorm2d), `fc_layer` / `pair_fc_layer` = Sequential(ReLU,
  Dropout, Linear no bias). Only the projected-cosine adjacency, one GCN layer
  and GeM or avg||max pooling exist there.
  """
  table = {}
  for key, (path, how) in resnet_key_table(depth, include_fc=False, non_local=non_local).items():
    table[f'resnet.{key}'] = ((path[0], 'backbone') + path[1:], how)
  if pooling == 'gem':
    table['gemp.p'] = (('params', 'gemp', 'p'), 'copy')
  table.update(_conv_rows('pair_graph.y', ('pair_attention', 'y')))
  table.update(_conv_rows('pair_graph.g', ('pair_graph', 'g')))
  table.update(_conv_rows('pair_graph.o', ('pair_graph', 'o')))
  table.update(_conv_rows('embedding_layer.0', ('embedding_conv',)))
  table.update(_bn_rows('embedding_layer.1', ('embedding_bn',)))
  if num_classes:
    table['fc_layer.2.weight'] = (('params', 'classifier', 'kernel'), 'linear')
    table['pair_fc_layer.2.weight'] = (('params', 'pair_classifier', 'kernel'), 'linear')
  return table


def torch_to_flax(array: np.ndarray, how: str) -> np.ndarray:
  """One torch tensor (numpy) -> the Flax layout named by `how`."""
  if how == 'conv':
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array
  if how == 'linear':
    return np.transpose(array) if array.ndim == 2 else array
  return array


def flax_to_torch(array: np.ndarray, how: str) -> np.ndarray:
  """Inverse of `torch_to_flax`."""
  if how == 'conv':
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array
  if how == 'linear':
    return np.transpose(array) if array.ndim == 2 else array
  return array


def expected_torch_shape(shape: tuple, how: str) -> tuple:
  """The torch shape of a Flax leaf of `shape` under transform `how`."""
  if how == 'conv' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if how == 'linear' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def get_path(tree: Mapping, path: tuple):
  """The leaf at `path` of a nested mapping, or None."""
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def set_path(tree: dict, path: tuple, value) -> None:
  """Sets the leaf at `path`, creating the dicts on the way."""
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def leaf_paths(tree: Mapping, prefix: tuple = ()) -> list:
  """Every leaf's path (a tuple of names) in a nested mapping."""
  paths = []
  for name, value in tree.items():
    if isinstance(value, Mapping):
      paths.extend(leaf_paths(value, prefix + (name,)))
    else:
      paths.append(prefix + (name,))
  return paths


def copy_tree(tree: Mapping) -> dict:
  """A copy of the nested dicts (leaves shared)."""
  return {k: copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}

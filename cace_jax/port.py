"""PyTorch <-> JAX weights: torchvision ResNets and official CACE-Net checkpoints.

Every conversion goes through one explicit table from torch keys to Flax
paths (`resnet_key_table`, `cacenet_key_table`); each row says how to turn
the tensor around:

  'conv'   torch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]
  'linear' torch linear weight [O, I]       -> Flax kernel [I, O]
  'copy'   unchanged (biases, BN scale/bias/mean/var, GeM's p)

Loading merges the converted tensors into an *initialised* variable tree and
raises `PortError` listing every missing key, unexpected key and shape
mismatch: a partial load would train or evaluate a half-random network
without a word. Torch is imported only inside the functions that need it;
.safetensors files are read and written with `safetensors.numpy` (no torch).

Official CACE-Net checkpoints (TencentYoutuResearch/PersonReID-YouReID,
models/cacenet.py; saved from DDP) hold {'epoch', 'state_dict', 'optimizer'}
with keys prefixed `module.`. Their backbone is torchvision's ResNet-50 whose
bottlenecks layer2.2, layer3.4 and layer4.1 own a `non_local_block`
(g/theta/phi/W, 1x1 convs with bias) applied after the block's last ReLU:
`resnet.layer2.2.non_local_block.W.weight` <-> our `backbone/nl_layer2_2/W`.

Command line:
  python -m cace_jax.port torchvision resnet50.pth --depth 50 --out runs/r50_ported
  python -m cace_jax.port official cacenet_market.pth --out runs/cacenet_official
  python -m cace_jax.port export runs/train_dir --out model.safetensors [--step N]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from typing import Mapping

import numpy as np

from cace_jax.models.resnet import RESNET_SPECS, non_local_positions

TORCH_BN_TAIL = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                 'running_mean': ('batch_stats', 'mean'),
                 'running_var': ('batch_stats', 'var')}
# Bookkeeping buffers that carry no weights; dropped on the way in.
IGNORED_SUFFIXES = ('num_batches_tracked',)
NON_LOCAL_CONVS = ('g', 'theta', 'phi', 'W')
OFFICIAL_PREFIX = 'module.'


class PortError(ValueError):
  """A checkpoint that does not fit the model; the message names every offending key."""


# ----------------------------------------------------------------------------- key tables


def _conv_rows(torch_prefix: str, flax_path: tuple, bias: bool = False) -> dict:
  rows = {f'{torch_prefix}.weight': (('params',) + flax_path + ('kernel',), 'conv')}
  if bias:
    rows[f'{torch_prefix}.bias'] = (('params',) + flax_path + ('bias',), 'copy')
  return rows


def _bn_rows(torch_prefix: str, flax_path: tuple) -> dict:
  return {f'{torch_prefix}.{name}': ((collection,) + flax_path + (leaf,), 'copy')
          for name, (collection, leaf) in TORCH_BN_TAIL.items()}


def resnet_key_table(depth: int, include_fc: bool = True, non_local: bool = False,
                     non_local_name: str = 'non_local_block') -> dict:
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
          table.update(_conv_rows(f'{torch_block}.{non_local_name}.{conv}',
                                  (f'nl_{flax_block}', conv), bias=True))
  if include_fc:
    table['fc.weight'] = (('params', 'fc', 'kernel'), 'linear')
    table['fc.bias'] = (('params', 'fc', 'bias'), 'copy')
  return table


def cacenet_key_table(depth: int = 50, non_local: bool = True, pooling: str = 'gem',
                      num_classes: bool = True) -> dict:
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


# ----------------------------------------------------------------------------- tensors


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


def _expected_torch_shape(shape: tuple, how: str) -> tuple:
  if how == 'conv' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if how == 'linear' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _get_path(tree: Mapping, path: tuple):
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _set_path(tree: dict, path: tuple, value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _leaf_paths(tree: Mapping, prefix: tuple = ()) -> list:
  paths = []
  for name, value in tree.items():
    if isinstance(value, Mapping):
      paths.extend(_leaf_paths(value, prefix + (name,)))
    else:
      paths.append(prefix + (name,))
  return paths


def _copy_tree(tree: Mapping) -> dict:
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# ----------------------------------------------------------------------------- reading files


def read_state_dict(source: str | os.PathLike | Mapping) -> dict:
  """A torch state_dict (or official checkpoint) as {key: float32 numpy array}.

  Args:
    source: a mapping of tensors/arrays, a .safetensors file (read without
      torch) or a torch pickle (.pth/.pt/.tar) read with `weights_only=True`.
      A dict holding 'state_dict' (the official checkpoints) is unwrapped.

  Raises:
    PortError: the file is refused by the safe unpickler (it tries to build
      objects other than tensors, e.g. run code) or holds no tensors.
  """
  if isinstance(source, Mapping):
    state = source
  elif str(source).endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    state = load_file(str(source))
  else:
    import torch  # pylint: disable=import-outside-toplevel
    try:
      state = torch.load(str(source), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
      raise PortError(
          f'{source}: refused to unpickle: the file holds objects other than tensors '
          f'(weights_only=True); it may try to run code. Only load files you trust, or '
          f'convert them to .safetensors. Loader said: {str(error).splitlines()[0]}') from error
  if isinstance(state, Mapping) and isinstance(state.get('state_dict'), Mapping):
    state = state['state_dict']
  if not isinstance(state, Mapping):
    raise PortError(f'{source}: expected a state_dict (a mapping of tensors), got '
                    f'{type(state).__name__}')
  return {key: _to_numpy(value) for key, value in state.items()}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu().float().numpy() if value.is_floating_point() else \
        value.detach().cpu().numpy()
  return np.asarray(value)


def strip_prefix(state: Mapping, prefix: str = OFFICIAL_PREFIX) -> dict:
  """Drops a DDP `module.` prefix from every key that has it."""
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


# ----------------------------------------------------------------------------- merging


def merge_state_dict(state: Mapping, table: Mapping, target: Mapping) -> dict:
  """Converts `state` through `table` into a copy of the initialised `target`.

  Args:
    state: torch key -> numpy array.
    table: torch key -> ((collection, *path), transform), from a key table.
    target: initialised variables {'params': ..., 'batch_stats': ...}; only
      leaves named in `table` are replaced, the rest keep their values.

  Returns:
    New variables with the same tree, shapes and dtypes as `target`.

  Raises:
    PortError: listing all missing keys, unexpected keys and shape mismatches.
  """
  state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
  missing = sorted(set(table) - set(state))
  unexpected = sorted(set(state) - set(table))
  mismatched, not_in_model = [], []
  merged = _copy_tree(target)
  for key in sorted(set(table) & set(state)):
    path, how = table[key]
    leaf = _get_path(target, path)
    if leaf is None:
      not_in_model.append(f'{key} -> {"/".join(path)}')
      continue
    value = torch_to_flax(np.asarray(state[key]), how)
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f'{key}: file {tuple(state[key].shape)}, model expects '
                        f'{_expected_torch_shape(tuple(leaf.shape), how)} '
                        f'({"/".join(path)} {tuple(leaf.shape)})')
      continue
    _set_path(merged, path, np.asarray(value, dtype=leaf.dtype))
  problems = []
  for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('shape mismatches', mismatched),
                       ('keys whose model path does not exist', not_in_model)):
    if items:
      problems.append(f'{len(items)} {title}:\n    ' + '\n    '.join(items))
  if problems:
    raise PortError('state_dict does not fit the model; ' + '\n  '.join(problems))
  return merged




def _abstract_variables(model, image_shape=(1, 64, 32, 3)) -> dict:
  """Shapes and dtypes of `model`'s variables without computing them."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  init = lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                            jnp.zeros(image_shape, jnp.float32), train=False)
  return dict(jax.eval_shape(init))


def _check_complete(variables: Mapping, what: str) -> dict:
  """Fails if any leaf is still abstract (no table row filled it)."""
  import jax  # pylint: disable=import-outside-toplevel
  empty = ['/'.join(p) for collection in variables
           for p in _leaf_paths(variables[collection], (collection,))
           if isinstance(_get_path(variables, p), jax.ShapeDtypeStruct)]
  if empty:
    raise PortError(f'{what}: no tensor for {len(empty)} model variables: {empty}')
  return {collection: _copy_tree(tree) for collection, tree in variables.items()}


# ----------------------------------------------------------------------------- public API


def load_torchvision_resnet(source, depth: int, include_fc: bool = True) -> dict:
  """A torchvision ResNet state_dict -> variables of `make_resnet(depth, ...)`.

  Use them as `make_resnet(depth, last_stride=2, num_classes=1000).apply(
  variables, images_nhwc, train=False)` (with `include_fc=False`:
  `num_classes=None`, any `last_stride`: strides carry no weights).

  Args:
    source: .pth / .safetensors path or a state_dict mapping.
    depth: 18, 34, 50 or 101.
    include_fc: port the ImageNet classifier; False drops `fc.*` from the file.

  Returns:
    {'params': ..., 'batch_stats': ...} of numpy arrays.

  Raises:
    PortError: unreadable/unsafe file, missing, unexpected or mis-shaped keys.
  """
  from cace_jax.models.resnet import make_resnet  # pylint: disable=import-outside-toplevel
  state = read_state_dict(source)
  num_classes = None
  if include_fc:
    if 'fc.weight' not in state:
      raise PortError(f'{_name(source)}: no fc.weight; pass include_fc=False for a backbone')
    num_classes = int(state['fc.weight'].shape[0])
  else:
    state = {k: v for k, v in state.items() if not k.startswith('fc.')}
  table = resnet_key_table(depth, include_fc=include_fc)
  target = _abstract_variables(make_resnet(depth, last_stride=2, num_classes=num_classes))
  return _check_complete(merge_state_dict(state, table, target), _name(source))


def load_backbone_into(params: Mapping, batch_stats: Mapping, source, depth: int
                       ) -> tuple[dict, dict]:
  """Replaces a CACENet's `backbone` weights with a torchvision ResNet's (training init).

  The ImageNet `fc` is dropped; non-local blocks (absent from torchvision)
  and all heads keep their initialised values. Fails loudly if any
  torchvision tensor has no place in the backbone or vice versa (e.g. wrong
  depth, or `model.width` != 64).

  Args:
    params, batch_stats: initialised CACENet variables (TrainState fields).
    source: torchvision .pth / .safetensors path or state_dict.
    depth: the backbone depth (18, 34, 50 or 101).

  Returns:
    (params, batch_stats): new trees of the same structure; replaced leaves
    are numpy arrays, the rest are the original leaves.
  """
  state = {k: v for k, v in strip_prefix(read_state_dict(source)).items()
           if not k.startswith('fc.')}
  table = {key: ((path[0], 'backbone') + path[1:], how)
           for key, (path, how) in resnet_key_table(depth, include_fc=False).items()}
  merged = merge_state_dict(state, table, {'params': params, 'batch_stats': batch_stats})
  return merged['params'], merged['batch_stats']


def infer_official_config(state: Mapping) -> dict:
  """CACENet constructor arguments matching an official state_dict (prefix stripped)."""
  for key in ('embedding_layer.0.weight', 'pair_graph.y.weight', 'resnet.conv1.weight'):
    if key not in state:
      raise PortError(f'not an official CACE-Net state_dict: no {key}')
  blocks = lambda stage: len({k.split('.')[2] for k in state if k.startswith(f'resnet.layer{stage}.')})
  stage_sizes = tuple(blocks(stage) for stage in (1, 2, 3, 4))
  depths = [d for d, (sizes, kind) in RESNET_SPECS.items()
            if tuple(sizes) == stage_sizes and isinstance(d, int)
            and (kind == 'bottleneck') == any('.conv3.' in k for k in state)]
  if not depths:
    raise PortError(f'backbone with blocks per stage {stage_sizes} is no torchvision ResNet')
  embed_dim, pooled_dim = state['embedding_layer.0.weight'].shape[:2]
  channels = state['pair_graph.y.weight'].shape[1]
  config = {
      'depth': depths[0], 'width': 64, 'last_stride': 1,
      'non_local': any('non_local_block' in k for k in state),
      'pooling': 'gem' if 'gemp.p' in state else ('avgmax' if pooled_dim == 2 * channels else 'avg'),
      'embed_dim': int(embed_dim), 'adjacency': 'projected', 'gcn': 'discrepancy',
      'gcn_depth': 1, 'reduction': int(channels // state['pair_graph.y.weight'].shape[0]),
      'num_classes': int(state['fc_layer.2.weight'].shape[0]) if 'fc_layer.2.weight' in state
                     else None}
  return config


def load_official_cacenet(source) -> tuple[dict, dict]:
  """An official CACE-Net checkpoint -> (variables, CACENet keyword arguments).

  `CACENet(**kwargs).apply(variables, images, train=False)` then reproduces
  the official network (eval mode). The optimizer state and epoch are ignored.
  """
  from cace_jax.models.cacenet import CACENet  # pylint: disable=import-outside-toplevel
  state = strip_prefix(read_state_dict(source))
  config = infer_official_config(state)
  table = cacenet_key_table(config['depth'], config['non_local'], config['pooling'],
                            config['num_classes'] is not None)
  target = _abstract_variables(CACENet(**config))
  return _check_complete(merge_state_dict(state, table, target), _name(source)), config


def write_ported_checkpoint(workdir: str, variables: Mapping, model_config: Mapping,
                            source: str = '') -> None:
  """Saves ported variables as an orbax checkpoint (step 0) in `<workdir>/checkpoints`.

  The state holds only {'step', 'params', 'batch_stats'} (no optimizer state:
  nothing was trained); `checkpoint.read_checkpoint(workdir)` reads it, and
  the record carries 'model' (CACENet kwargs), 'num_classes' and
  'ported_from'. It is not a TrainState, so `train.py` cannot resume from it;
  fine-tune through `config.init` instead.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cace_jax import checkpoint  # pylint: disable=import-outside-toplevel
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'batch_stats': variables.get('batch_stats', {})}
  record = {'step': 0, 'ported_from': str(source), 'model': dict(model_config),
            'num_classes': model_config.get('num_classes')}
  manager = checkpoint.create_manager(workdir, keep_best=False)
  try:
    checkpoint.save_checkpoint(manager, 0, state, record)
  finally:
    manager.close()


def _name(source) -> str:
  return '<state_dict>' if isinstance(source, Mapping) else str(source)


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> None:
  """`python -m cace_jax.port {torchvision,official,export} ...` (see module docstring)."""
  parser = argparse.ArgumentParser(prog='python -m cace_jax.port', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  tv = sub.add_parser('torchvision', help='torchvision ResNet file -> orbax checkpoint')
  tv.add_argument('path')
  tv.add_argument('--depth', type=int, required=True)
  tv.add_argument('--no-fc', action='store_true', help='drop the ImageNet classifier')
  tv.add_argument('--out', required=True, help='workdir to write checkpoints/0 into')
  off = sub.add_parser('official', help='official CACE-Net checkpoint -> orbax checkpoint')
  off.add_argument('path')
  off.add_argument('--out', required=True)
  ex = sub.add_parser('export', help='our checkpoint -> .safetensors or .pth (official keys)')
  ex.add_argument('workdir')
  ex.add_argument('--step', type=int, default=None)
  ex.add_argument('--out', required=True, help='*.safetensors, or *.pth (needs torch)')
  args = parser.parse_args(argv)

  if args.command == 'torchvision':
    variables = load_torchvision_resnet(args.path, args.depth, include_fc=not args.no_fc)
    config = {'resnet_depth': args.depth, 'include_fc': not args.no_fc}
    write_ported_checkpoint(args.out, variables, config, args.path)
  elif args.command == 'official':
    variables, config = load_official_cacenet(args.path)
    write_ported_checkpoint(args.out, variables, config, args.path)
  else:
    from cace_jax import export  # pylint: disable=import-outside-toplevel
    export.export_checkpoint(args.workdir, args.out, args.step)
  print(json.dumps({'command': args.command, 'out': args.out}))


if __name__ == '__main__':
  main()

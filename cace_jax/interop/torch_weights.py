"""PyTorch weights in: torchvision ResNets and official CACE-Net checkpoints.

In: a torch file is read (`read_state_dict`), converted through a key table
of `torch_keys` and merged into an *initialised* variable tree; every
missing key, unexpected key and shape mismatch raises one `PortError`
listing them all, since a partial load would train or evaluate a
half-random network without a word. Ports are written as orbax checkpoints
that `checkpoint.load_run` reads like a training run.

Out is `torch_export`: a checkpoint goes back through the same table
(`torch_keys.flax_to_torch`), so port-in then export-out gives back the same
tensors bit for bit.

Official checkpoints were saved from DDP: {'epoch', 'state_dict',
'optimizer'} with keys prefixed `module.`. Torch is imported only inside the
functions that read or write .pth files; .safetensors files are read and
written with `safetensors.numpy` (no torch).
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cace_jax.errors import PortError
from cace_jax.interop.torch_keys import (
  IGNORED_SUFFIXES,
  OFFICIAL_PREFIX,
  cacenet_key_table,
  copy_tree,
  expected_torch_shape,
  get_path,
  leaf_paths,
  resnet_key_table,
  set_path,
  torch_to_flax,
)
from cace_jax.models import build_model, make_resnet
from cace_jax.models.resnet import RESNET_SPECS
from cace_jax.paths import check_directory
from cace_jax.runs import checkpoint
from cace_jax.runs.run_record import RunRecord


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
    from safetensors.numpy import load_file  # optional: the torch extra

    state = load_file(str(source))
  else:
    state = _load_torch_file(str(source))
  if isinstance(state, Mapping) and isinstance(state.get('state_dict'), Mapping):
    state = state['state_dict']
  if not isinstance(state, Mapping):
    raise PortError(
      f'{source}: expected a state_dict (a mapping of tensors), got {type(state).__name__}'
    )
  return {key: _to_numpy(value) for key, value in state.items()}


def _load_torch_file(path: str):
  """`torch.load` with the weights-only unpickler, its failures as one PortError each."""
  import torch  # optional (the torch extra); only .pth files need it

  if not os.path.isfile(path):
    raise PortError(f'{path}: no such file')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if not (magic.startswith(b'PK') or magic.startswith(b'\x80')):  # a zip (torch.save) or a pickle
    raise PortError(
      f'{path}: not a torch file (expected a torch.save archive or pickle, or a .safetensors file)'
    )
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    # Name what the file would have built, not torch's advice on loading it anyway.
    found = re.search(r'GLOBAL ([\w.]+)', str(error))
    operand = re.search(r'Unsupported operand \d+', str(error))
    if found:
      reason = f'it would build {found.group(1)}'
    else:
      reason = operand.group(0) if operand else 'objects other than tensors'
    raise PortError(
      f"{path}: refused for safety: torch's weights-only loader, which never runs code from "
      f'the file, rejected it ({reason}); only tensors and plain containers are ever read '
      'from .pth files'
    ) from None
  except (RuntimeError, EOFError, ValueError, IndexError, OSError) as error:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise PortError(f'{path}: cannot be read as a torch file ({first_line})') from None


def describe_resnet(state: Mapping) -> tuple[int | None, int] | None:
  """(depth, stem width) of a torchvision ResNet state_dict, or None if it is not one.

  Depth is None for a block layout torchvision does not have.
  """
  if 'conv1.weight' not in state:
    return None
  width = int(state['conv1.weight'].shape[0])
  blocks = tuple(
    len({key.split('.')[1] for key in state if key.startswith(f'layer{stage}.')})
    for stage in range(1, 5)
  )
  kind = 'bottleneck' if 'layer1.0.conv3.weight' in state else 'basic'
  for depth, spec in RESNET_SPECS.items():
    if isinstance(depth, int) and spec == (blocks, kind):
      return depth, width
  return None, width


def check_resnet_fits(state: Mapping, depth: int, width: int, name: str) -> None:
  """Raises a PortError saying which ResNet the file holds, when it is not the one asked for."""
  found = describe_resnet(state)
  if found is None or found[0] is None or found == (depth, width):
    return  # not a torchvision layout: the key-by-key merge lists what does not fit
  found_depth, found_width = found
  raise PortError(
    f'{name} holds a ResNet-{found_depth} of width {found_width}; the model is a '
    f'ResNet-{depth} of width {width} (torchvision ResNets have width 64)'
  )


def _to_numpy(value) -> np.ndarray:
  """A numpy copy: ported values must not alias a live module's tensors, whose
  BN buffers a training forward updates in place."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = (
      value.detach().cpu().float().numpy()
      if value.is_floating_point()
      else value.detach().cpu().numpy()
    )
  return np.array(value)


def strip_prefix(state: Mapping, prefix: str = OFFICIAL_PREFIX) -> dict:
  """Drops a DDP `module.` prefix from every key that has it."""
  return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def merge_state_dict(
  state: Mapping, table: Mapping, target: Mapping, name: str | None = None
) -> dict:
  """Converts `state` through `table` into a copy of the initialised `target`.

  Args:
    state: torch key -> numpy array.
    table: torch key -> ((collection, *path), transform), from a key table.
    target: initialised variables {'params': ..., 'batch_stats': ...}; only
      leaves named in `table` are replaced, the rest keep their values.
    name: the file `state` was read from, named by the error (`_file_of`).

  Returns:
    New variables with the same tree, shapes and dtypes as `target`.

  Raises:
    PortError: listing all missing keys, unexpected keys and shape mismatches.
  """
  state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
  missing = sorted(set(table) - set(state))
  unexpected = sorted(set(state) - set(table))
  mismatched, not_in_model = [], []
  merged = copy_tree(target)
  for key in sorted(set(table) & set(state)):
    path, how = table[key]
    leaf = get_path(target, path)
    if leaf is None:
      not_in_model.append(f'{key} -> {"/".join(path)}')
      continue
    value = torch_to_flax(np.asarray(state[key]), how)
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(
        f'{key}: file {tuple(state[key].shape)}, model expects '
        f'{expected_torch_shape(tuple(leaf.shape), how)} '
        f'({"/".join(path)} {tuple(leaf.shape)})'
      )
      continue
    set_path(merged, path, np.asarray(value, dtype=leaf.dtype))
  problems = []
  for title, items in (
    ('missing keys', missing),
    ('unexpected keys', unexpected),
    ('shape mismatches', mismatched),
    ('keys whose model path does not exist', not_in_model),
  ):
    if items:
      problems.append(f'{len(items)} {title}:\n    ' + '\n    '.join(items))
  if problems:
    # One error line for a whole port: it must say which file did not fit.
    where = f'{name}: ' if name else ''
    raise PortError(f'{where}state_dict does not fit the model; ' + '\n  '.join(problems))
  return merged


def _abstract_variables(model, image_shape=(1, 64, 32, 3)) -> dict:
  """Shapes and dtypes of `model`'s variables without computing them."""
  init = lambda: model.init(
    {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
    jnp.zeros(image_shape, jnp.float32),
    train=False,
  )
  return dict(jax.eval_shape(init))


def _check_complete(variables: Mapping, what: str) -> dict:
  """Fails if any leaf is still abstract (no table row filled it)."""
  empty = [
    '/'.join(p)
    for collection in variables
    for p in leaf_paths(variables[collection], (collection,))
    if isinstance(get_path(variables, p), jax.ShapeDtypeStruct)
  ]
  if empty:
    raise PortError(f'{what}: no tensor for {len(empty)} model variables: {empty}')
  return {collection: copy_tree(tree) for collection, tree in variables.items()}


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
  state = read_state_dict(source)
  num_classes = None
  if include_fc:
    if 'fc.weight' not in state:
      raise PortError(f'{_name(source)}: no fc.weight; pass include_fc=False for a backbone')
    num_classes = int(state['fc.weight'].shape[0])
  else:
    state = {k: v for k, v in state.items() if not k.startswith('fc.')}
  check_resnet_fits(state, depth, 64, _name(source))
  table = resnet_key_table(depth, include_fc=include_fc)
  target = _abstract_variables(make_resnet(depth, last_stride=2, num_classes=num_classes))
  merged = merge_state_dict(state, table, target, _file_of(source))
  return _check_complete(merged, _name(source))


def load_backbone_into(
  params: Mapping, batch_stats: Mapping, source, depth: int
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
  state = {
    k: v for k, v in strip_prefix(read_state_dict(source)).items() if not k.startswith('fc.')
  }
  check_resnet_fits(
    state, depth, int(params['backbone']['conv1']['kernel'].shape[-1]), _name(source)
  )
  table = {
    key: ((path[0], 'backbone') + path[1:], how)
    for key, (path, how) in resnet_key_table(depth, include_fc=False).items()
  }
  target = {'params': params, 'batch_stats': batch_stats}
  merged = merge_state_dict(state, table, target, _file_of(source))
  return merged['params'], merged['batch_stats']


def infer_official_config(state: Mapping, name: str | None = None) -> dict:
  """CACENet constructor arguments matching an official state_dict (prefix stripped).

  `name`: the file `state` was read from, named by the errors (`_file_of`).
  """
  where = f'{name}: ' if name else ''
  for key in ('embedding_layer.0.weight', 'pair_graph.y.weight', 'resnet.conv1.weight'):
    if key not in state:
      raise PortError(f'{where}not an official CACE-Net state_dict: no {key}')
  blocks = lambda stage: len(
    {k.split('.')[2] for k in state if k.startswith(f'resnet.layer{stage}.')}
  )
  stage_sizes = tuple(blocks(stage) for stage in (1, 2, 3, 4))
  depths = [
    d
    for d, (sizes, kind) in RESNET_SPECS.items()
    if tuple(sizes) == stage_sizes
    and isinstance(d, int)
    and (kind == 'bottleneck') == any('.conv3.' in k for k in state)
  ]
  if not depths:
    raise PortError(f'{where}backbone with blocks per stage {stage_sizes} is no torchvision ResNet')
  embed_dim, pooled_dim = state['embedding_layer.0.weight'].shape[:2]
  channels = state['pair_graph.y.weight'].shape[1]
  config = {
    'depth': depths[0],
    'width': 64,
    'last_stride': 1,
    'non_local': any('non_local_block' in k for k in state),
    'pooling': 'gem' if 'gemp.p' in state else ('avgmax' if pooled_dim == 2 * channels else 'avg'),
    'embed_dim': int(embed_dim),
    'adjacency': 'projected',
    'gcn': 'discrepancy',
    'gcn_depth': 1,
    'reduction': int(channels // state['pair_graph.y.weight'].shape[0]),
    'num_classes': int(state['fc_layer.2.weight'].shape[0])
    if 'fc_layer.2.weight' in state
    else None,
  }
  return config


def load_official_cacenet(source) -> tuple[dict, dict]:
  """An official CACE-Net checkpoint -> (variables, CACENet keyword arguments).

  `build_model(kwargs).apply(variables, images, train=False)` then reproduces
  the official network (eval mode). The optimizer state and epoch are ignored.
  """
  state = strip_prefix(read_state_dict(source))
  config = infer_official_config(state, _file_of(source))
  table = cacenet_key_table(
    config['depth'], config['non_local'], config['pooling'], config['num_classes'] is not None
  )
  target = _abstract_variables(build_model(config))
  merged = merge_state_dict(state, table, target, _file_of(source))
  return _check_complete(merged, _name(source)), config


def write_ported_checkpoint(
  workdir: str, variables: Mapping, model_config: Mapping, source: str = ''
) -> None:
  """Saves ported variables as an orbax checkpoint (step 0) in `<workdir>/checkpoints`.

  The state holds only {'step', 'params', 'batch_stats'} (no optimizer state:
  nothing was trained); `checkpoint.read_checkpoint(workdir)` reads it, and
  the record carries 'model' (CACENet kwargs), 'num_classes' and
  'ported_from'. It is not a TrainState, so `train.py` cannot resume from it;
  fine-tune through `config.init` instead.

  Raises:
    UserError: `workdir` is a file or already holds checkpoints (nothing is
      overwritten).
  """
  check_directory(workdir, '--out')
  existing = checkpoint.list_steps(workdir)
  if existing:
    raise PortError(
      f'--out={workdir} already holds checkpoints (steps {existing}); nothing is overwritten: '
      'choose another --out'
    )
  state = {
    'step': jnp.zeros((), jnp.int32),
    'params': variables['params'],
    'batch_stats': variables.get('batch_stats', {}),
  }
  record = RunRecord(
    step=0,
    num_classes=model_config.get('num_classes'),
    model=dict(model_config),
    ported_from=str(source),
  )
  manager = checkpoint.create_manager(workdir, keep_best=False)
  try:
    checkpoint.save_checkpoint(manager, 0, state, record)
  finally:
    manager.close()


def _name(source) -> str:
  return '<state_dict>' if isinstance(source, Mapping) else str(source)


def _file_of(source) -> str | None:
  # A state_dict handed over in memory has no file to name; callers say where it came from.
  return None if isinstance(source, Mapping) else str(source)

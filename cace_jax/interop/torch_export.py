"""JAX variables out to PyTorch: torchvision and official state_dicts, .safetensors and .pth files.

The inverse of `torch_weights`, through the same key tables (`torch_keys`):
a port followed by an export gives back the file's tensors exactly.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from cace_jax.errors import PortError
from cace_jax.interop.torch_keys import (
  OFFICIAL_PREFIX,
  cacenet_key_table,
  flax_to_torch,
  get_path,
  leaf_paths,
  resnet_key_table,
)
from cace_jax.models import CACENet, ResNet
from cace_jax.models.resnet import RESNET_SPECS
from cace_jax.paths import check_directory
from cace_jax.runs import checkpoint


def torchvision_depth(model: ResNet) -> int:
  """The torchvision depth (18, 34, 50 or 101) of a `make_resnet` model.

  `ResNet` keeps its blocks per stage and block type, not the depth it was made from.

  Raises:
    PortError: the blocks are no torchvision ResNet's (e.g. depth 'tiny').
  """
  layout = (tuple(model.stage_sizes), model.block)
  for depth, spec in RESNET_SPECS.items():
    if isinstance(depth, int) and spec == layout:
      return depth
  raise PortError(
    f'a ResNet of {layout[1]} blocks {layout[0]} per stage is no torchvision ResNet '
    '(18, 34, 50 or 101); torchvision keys cannot express it'
  )


def export_state_dict(variables: Mapping, table: Mapping, prefix: str = '') -> dict:
  """Our variables -> {torch key: numpy array in torch layout} through `table`.

  Raises:
    PortError: when a table row has no leaf in `variables`, or a leaf of
      `variables` is covered by no row (it would be silently lost).
  """
  out, missing = {}, []
  for key, (path, how) in table.items():
    leaf = get_path(variables, path)
    if leaf is None:
      missing.append(f'{key} <- {"/".join(path)}')
      continue
    out[prefix + key] = np.ascontiguousarray(flax_to_torch(np.asarray(leaf), how))
  covered = {path for path, _ in table.values()}
  uncovered = [
    '/'.join(p)
    for collection in ('params', 'batch_stats')
    for p in leaf_paths(variables.get(collection, {}), (collection,))
    if p not in covered
  ]
  if missing or uncovered:
    raise PortError(
      f'variables do not fit the key table: missing {missing}; not exportable {uncovered}'
    )
  return out


def export_torchvision_resnet(variables: Mapping, depth: int, include_fc: bool = True) -> dict:
  """`make_resnet` variables -> torchvision state_dict (numpy, torch layout)."""
  return export_state_dict(variables, resnet_key_table(depth, include_fc=include_fc))


def export_official_cacenet(
  variables: Mapping, model: CACENet, prefix: str = OFFICIAL_PREFIX
) -> dict:
  """CACENet variables -> official state_dict keys (with the DDP `module.` prefix).

  Only configurations the official code can express export: projected
  adjacency, one discrepancy GCN layer, GeM or avg||max pooling, width 64,
  a torchvision depth.
  """
  official = {'adjacency': 'projected', 'gcn': 'discrepancy', 'gcn_depth': 1, 'width': 64}
  wrong = {k: getattr(model, k) for k, v in official.items() if getattr(model, k) != v}
  if not isinstance(model.depth, int):
    wrong['depth'] = model.depth
  if wrong or model.pooling not in ('gem', 'avgmax'):
    raise PortError(
      f'the official CACE-Net cannot express {wrong or model.pooling}; '
      f'it needs {official}, a torchvision depth and pooling gem or avgmax'
    )
  table = cacenet_key_table(model.depth, model.non_local, model.pooling, bool(model.num_classes))
  return export_state_dict(variables, table, prefix)


def to_torch_state_dict(state: Mapping) -> dict:
  """{key: numpy} -> {key: torch.Tensor} (for `model.load_state_dict`)."""
  import torch  # optional: the torch extra

  return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


def save_safetensors(state: Mapping, path: str) -> None:
  """Writes {key: numpy} as .safetensors (no torch needed)."""
  from safetensors.numpy import save_file  # optional: the torch extra

  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))


def export_checkpoint(workdir: str, out: str, step: int | None = None) -> dict:
  """Writes a checkpoint of `workdir` as torch weights: `out` *.safetensors or *.pth.

  A torchvision port goes back to torchvision keys; a CACE-Net (ported or
  trained) goes to official keys with the `module.` prefix; a .pth holds
  {'epoch', 'state_dict'} like the official files.

  Returns:
    The exported {key: numpy array}.
  """
  check_directory(os.path.dirname(os.path.abspath(out)), '--out directory')
  run = checkpoint.load_run(workdir, step)
  if isinstance(run.model, ResNet):
    exported = export_torchvision_resnet(
      run.variables, torchvision_depth(run.model), include_fc=run.model.num_classes is not None
    )
  else:
    exported = export_official_cacenet(run.variables, run.model)
  if str(out).endswith('.safetensors'):
    save_safetensors(exported, out)
  else:
    import torch  # optional: the torch extra

    torch.save({'epoch': run.record.epoch, 'state_dict': to_torch_state_dict(exported)}, out)
  return exported

"""Our models out: PyTorch state_dicts (torchvision / official keys), .safetensors, ONNX.

The key tables live in `cace_jax.port`; exporting runs them backwards
(`port.flax_to_torch`), so port-in then export-out gives back the same
tensors bit for bit. Exporting refuses variables the table does not cover
entirely (a silently dropped tensor would make a different network).
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from cace_jax.port import (OFFICIAL_PREFIX, PortError, _get_path, _leaf_paths, cacenet_key_table,
                           flax_to_torch, resnet_key_table)


def export_state_dict(variables: Mapping, table: Mapping, prefix: str = '') -> dict:
  """Our variables -> {torch key: numpy array in torch layout} through `table`.

  Raises:
    PortError: when a table row has no leaf in `variables`, or a leaf of
      `variables` is covered by no row (it would be silently lost).
  """
  out, missing = {}, []
  for key, (path, how) in table.items():
    leaf = _get_path(variables, path)
    if leaf is None:
      missing.append(f'{key} <- {"/".join(path)}')
      continue
    out[prefix + key] = np.ascontiguousarray(flax_to_torch(np.asarray(leaf), how))
  covered = {path for path, _ in table.values()}
  uncovered = ['/'.join(p) for collection in ('params', 'batch_stats')
               for p in _leaf_paths(variables.get(collection, {}), (collection,))
               if p not in covered]
  if missing or uncovered:
    raise PortError(f'variables do not fit the key table: missing {missing}; '
                    f'not exportable {uncovered}')
  return out


def export_torchvision_resnet(variables: Mapping, depth: int, include_fc: bool = True) -> dict:
  """`make_resnet` variables -> torchvision state_dict (numpy, torch layout)."""
  return export_state_dict(variables, resnet_key_table(depth, include_fc=include_fc))


def export_official_cacenet(variables: Mapping, config: Mapping, prefix: str = OFFICIAL_PREFIX
                            ) -> dict:
  """CACENet variables -> official state_dict keys (with the DDP `module.` prefix).

  Only configurations the official code can express export: projected
  adjacency, one discrepancy GCN layer, GeM or avg||max pooling, width 64.
  """
  official = {'adjacency': 'projected', 'gcn': 'discrepancy', 'gcn_depth': 1, 'width': 64}
  wrong = {k: config.get(k) for k, v in official.items() if config.get(k, v) != v}
  if wrong or config.get('pooling') not in ('gem', 'avgmax'):
    raise PortError(f'the official CACE-Net cannot express {wrong or config.get("pooling")}; '
                    f'it needs {official} and pooling gem or avgmax')
  table = cacenet_key_table(int(config['depth']), bool(config['non_local']), config['pooling'],
                            bool(config.get('num_classes')))
  return export_state_dict(variables, table, prefix)


def to_torch_state_dict(state: Mapping) -> dict:
  """{key: numpy} -> {key: torch.Tensor} (for `model.load_state_dict`)."""
  import torch  # pylint: disable=import-outside-toplevel
  return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


def save_safetensors(state: Mapping, path: str) -> None:
  """Writes {key: numpy} as .safetensors (no torch needed)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))




def model_config_from_record(record: Mapping) -> dict:
  """CACENet kwargs of a checkpoint: a ported one's record['model'], or a training config."""
  if record.get('model'):
    return dict(record['model'])
  model = json.loads(record['config'])['model']
  keys = ('depth', 'width', 'last_stride', 'non_local', 'pooling', 'embed_dim', 'adjacency',
          'gcn', 'gcn_depth', 'reduction')
  config = {k: model[k] for k in keys}
  if not str(config['depth']).isdigit():
    raise PortError(f'depth {config["depth"]!r} has no torchvision/official counterpart')
  config['depth'] = int(config['depth'])
  config['num_classes'] = record.get('num_classes')
  return config


def export_checkpoint(workdir: str, out: str, step: int | None = None) -> dict:
  """Writes a checkpoint of `workdir` as torch weights: `out` *.safetensors or *.pth.

  A torchvision port goes back to torchvision keys; a CACE-Net (ported or
  trained) goes to official keys with the `module.` prefix; a .pth holds
  {'epoch', 'state_dict'} like the official files.

  Returns:
    The exported {key: numpy array}.
  """
  from cace_jax import checkpoint  # pylint: disable=import-outside-toplevel
  _, state, record = checkpoint.read_checkpoint(workdir, step)
  config = model_config_from_record(record)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  if 'resnet_depth' in config:
    exported = export_torchvision_resnet(variables, config['resnet_depth'], config['include_fc'])
  else:
    exported = export_official_cacenet(variables, config)
  if str(out).endswith('.safetensors'):
    save_safetensors(exported, out)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    torch.save({'epoch': record.get('epoch', 0), 'state_dict': to_torch_state_dict(exported)}, out)
  return exported

"""Our models out: PyTorch state_dicts, .safetensors, ONNX and `jax.export` artifacts.

Torch weights: the key tables live in `cace_jax.port`; exporting runs them
backwards (`port.flax_to_torch`), so port-in then export-out gives back the
same tensors bit for bit. Exporting refuses variables the table does not
cover entirely (a silently dropped tensor would make a different network).

Deployment (`export_deployment`): the two stages of the paper's inference as
two models each, ONNX (`onnx_graph`, for onnxruntime / TensorRT) and
serialized `jax.export` modules (for JAX serving, no Python model code needed):

  features  images [batch, H, W, 3] RGB 0-255 -> embedding [batch, E], fmap [batch, h, w, C]
  pair      fmap_query, fmap_gallery [pairs, h, w, C] -> distance [pairs] (+ f(q|g), f(g|q))

Command line:

  python -m cace_jax.export deploy runs/market [--out DIR] [--step N]

(Torch weights go out through `python -m cace_jax.port export`.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

from cace_jax.models.resnet import feature_map_shape
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


# ----------------------------------------------------------------------------- deployment


def model_from_record(record: Mapping):
  """(CACENet in float32, image size or None, flip) of a trained or ported checkpoint."""
  from cace_jax import train_lib  # pylint: disable=import-outside-toplevel
  from cace_jax.models import CACENet  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  if record.get('model'):
    kwargs = dict(record['model'])
    if 'resnet_depth' in kwargs:
      raise PortError('the checkpoint holds a bare torchvision ResNet; deployment export needs '
                      'a CACE-Net checkpoint (trained, or ported with `port official`)')
    return CACENet(**kwargs), None, True
  config = ml_collections.ConfigDict(json.loads(record['config']))
  model = train_lib.create_model(config, record.get('num_classes'), sync_bn=False)
  # Exported graphs compute in float32 whatever the training compute dtype was.
  return model.clone(dtype=np.float32), tuple(config.data.image_size), bool(config.eval.flip)


def feature_function(model, variables: Mapping, flip: bool) -> Callable:
  """images [B, H, W, 3] RGB 0-255 -> (L2-normalised embedding [B, E], fmap [B, h, w, C]).

  The same embedding `eval_lib` ranks with (flip-averaged if `flip`); the map
  is the unflipped image's, the pair stage's input.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from cace_jax.losses import l2_normalize  # pylint: disable=import-outside-toplevel
  from cace_jax.augment import IMAGENET_MEAN_PIXEL, IMAGENET_STD_PIXEL  # pylint: disable=import-outside-toplevel
  from cace_jax.eval_lib import embedding_and_maps  # pylint: disable=import-outside-toplevel
  mean, std = np.float32(IMAGENET_MEAN_PIXEL), np.float32(IMAGENET_STD_PIXEL)

  def features(images):
    normalized = (images - mean) / std  # augment.normalize, as the eval pipeline
    embedding, fmap = model.apply(variables, normalized, method=embedding_and_maps)
    embedding = l2_normalize(embedding)
    if flip:
      mirrored, _ = model.apply(variables, normalized[:, :, ::-1], method=embedding_and_maps)
      embedding = l2_normalize(embedding + l2_normalize(mirrored))
    return embedding, fmap.astype(jnp.float32)

  return features


def pair_function(model, variables: Mapping) -> Callable:
  """(fmap_query, fmap_gallery) [N, h, w, C] -> (distance [N], f(q|g) [N, E], f(g|q) [N, E])."""
  from cace_jax.pair_scoring import embedding_distance  # pylint: disable=import-outside-toplevel

  def embed_pairs(module, fmap_query, fmap_gallery):
    return module.embed_cached_pairs(module.compute_image_cache(fmap_query),
                                     module.compute_image_cache(fmap_gallery))

  def pair(fmap_query, fmap_gallery):
    out = model.apply(variables, fmap_query, fmap_gallery, method=embed_pairs)
    return (embedding_distance(out['embedding_uv'], out['embedding_vu']),
            out['embedding_uv'], out['embedding_vu'])

  return pair


def export_jax_functions(model, variables: Mapping, image_size: Sequence[int], flip: bool,
                         platforms: Sequence[str] = ('cpu', 'cuda', 'tpu')) -> dict:
  """Serialized `jax.export` modules {'features', 'pair'} with symbolic batch axes.

  Weights are embedded as constants; `jax.export.deserialize(data).call(...)`
  runs them on any of `platforms` without this package. No 'pair' for a
  model without a pair stage (gcn 'none').
  """
  import jax  # pylint: disable=import-outside-toplevel
  height, width = image_size
  fmap_shape = feature_map_shape(image_size, model.depth, model.width, model.last_stride)
  batch, = jax.export.symbolic_shape('batch')
  pairs, = jax.export.symbolic_shape('pairs')
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  features = jax.export.export(jax.jit(feature_function(model, variables, flip)),
                               platforms=platforms)(spec(batch, height, width, 3))
  if model.gcn == 'none':
    return {'features': features.serialize()}
  pair = jax.export.export(jax.jit(pair_function(model, variables)), platforms=platforms)(
      spec(pairs, *fmap_shape), spec(pairs, *fmap_shape))
  return {'features': features.serialize(), 'pair': pair.serialize()}


def verify_onnx(model, variables: Mapping, image_size: Sequence[int], flip: bool,
                features_path: str, pair_path: str | None, batch: int = 3, seed: int = 0
                ) -> dict:
  """Runs the ONNX models in onnxruntime and JAX on the same random images.

  Returns:
    Largest absolute differences: 'embedding' (unit vectors), 'fmap'
    (relative to the map's largest value) and, with `pair_path`, 'distance'
    (pairs of the images with each other).
  """
  import onnxruntime  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(seed).uniform(0, 255, (batch, *image_size, 3)).astype(np.float32)
  embedding, fmap = map(np.asarray, feature_function(model, variables, flip)(images))
  run = lambda path, feeds: onnxruntime.InferenceSession(
      path, providers=['CPUExecutionProvider']).run(None, feeds)
  onnx_embedding, onnx_fmap = run(features_path, {'images': images})
  gaps = {'embedding': float(np.abs(onnx_embedding - embedding).max()),
          'fmap': float(np.abs(onnx_fmap - fmap).max() / max(np.abs(fmap).max(), 1e-12))}
  if pair_path:
    query, gallery = np.arange(batch), np.roll(np.arange(batch), 1)
    distance = np.asarray(pair_function(model, variables)(fmap[query], fmap[gallery])[0])
    onnx_distance = run(pair_path, {'fmap_query': fmap[query],
                                    'fmap_gallery': fmap[gallery]})[0]
    gaps['distance'] = float(np.abs(onnx_distance - distance).max())
  return gaps


def export_deployment(workdir: str, out: str | None = None, step: int | None = None,
                      image_size: Sequence[int] | None = None, flip: bool | None = None,
                      verify: bool = True) -> dict:
  """Writes features/pair models of a checkpoint as ONNX and `jax.export` files.

  Files in `out` (default `<workdir>/export`): features.onnx, pair.onnx,
  features.jax_export, pair.jax_export (no pair.* for gcn 'none') and
  export.json (shapes, the source checkpoint and, with `verify`, the
  onnxruntime-vs-JAX differences). Existing files of the same names are
  replaced; nothing else is touched.

  Args:
    image_size: (H, W); needed for ported checkpoints, else the training config's.
    flip: flip-average the embedding; None: the config's `eval.flip` (True for ports).
  """
  from cace_jax import checkpoint  # pylint: disable=import-outside-toplevel
  try:
    from cace_jax import onnx_graph  # pylint: disable=import-outside-toplevel
    if verify:
      import onnxruntime  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise PortError(f'deployment export needs the onnx extra ({e}): '
                    "pip install -e '.[onnx]'") from e
  step, state, record = checkpoint.read_checkpoint(workdir, step)
  model, trained_size, config_flip = model_from_record(record)
  flip = config_flip if flip is None else flip
  image_size = tuple(image_size or trained_size or ())
  if len(image_size) != 2:
    raise PortError(f'{workdir} holds a ported checkpoint: give --image_size H W')
  stages = ('features', 'pair') if model.gcn != 'none' else ('features',)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  out = out or os.path.join(workdir, 'export')
  os.makedirs(out, exist_ok=True)
  paths = {f'{stage}.{kind}': os.path.join(out, f'{stage}.{kind}')
           for stage in stages for kind in ('onnx', 'jax_export')}
  fmap_shape = feature_map_shape(image_size, model.depth, model.width, model.last_stride)
  _write_bytes(paths['features.onnx'],
               onnx_graph.feature_graph(model, variables, image_size, flip).SerializeToString())
  if 'pair' in stages:
    _write_bytes(paths['pair.onnx'],
                 onnx_graph.pair_graph(model, variables, fmap_shape).SerializeToString())
  for name, data in export_jax_functions(model, variables, image_size, flip).items():
    _write_bytes(paths[f'{name}.jax_export'], bytes(data))
  summary = {'workdir': workdir, 'step': step, 'image_size': list(image_size), 'flip': flip,
             'fmap_shape': list(fmap_shape), 'embed_dim': model.embed_dim,
             'files': sorted(paths)}
  if verify:
    summary['max_abs_diff_onnx_vs_jax'] = verify_onnx(
        model, variables, image_size, flip, paths['features.onnx'], paths.get('pair.onnx'))
  with open(os.path.join(out, 'export.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  return summary


def _write_bytes(path: str, data: bytes) -> None:
  """Writes atomically, so an interrupted export never leaves half a model."""
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def main(argv=None) -> int:
  """`python -m cace_jax.export deploy WORKDIR ...` (see module docstring)."""
  parser = argparse.ArgumentParser(prog='python -m cace_jax.export', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  deploy = sub.add_parser('deploy', help='ONNX + jax.export models of both inference stages')
  deploy.add_argument('workdir')
  deploy.add_argument('--out', default=None, help='directory (default WORKDIR/export)')
  deploy.add_argument('--step', type=int, default=None)
  deploy.add_argument('--image_size', type=int, nargs=2, default=None, metavar=('H', 'W'))
  deploy.add_argument('--no_flip', action='store_true',
                      help='no flip averaging (default: the config\'s eval.flip)')
  deploy.add_argument('--no_verify', action='store_true', help='skip the onnxruntime check')
  args = parser.parse_args(argv)
  from cace_jax.cli import run_reporting_errors  # pylint: disable=import-outside-toplevel

  def run():
    summary = export_deployment(args.workdir, args.out, args.step, args.image_size,
                                flip=False if args.no_flip else None, verify=not args.no_verify)
    print(json.dumps(summary, indent=2))

  return run_reporting_errors(run)


if __name__ == '__main__':
  sys.exit(main())

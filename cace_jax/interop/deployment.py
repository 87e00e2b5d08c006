"""Deployment: both stages of the paper's inference as ONNX and `jax.export` models.

`export_deployment` writes, for a checkpoint, two models in two formats:
ONNX (`onnx_graph`, for onnxruntime / TensorRT) and serialized `jax.export`
modules (for JAX serving; no Python model code needed):

  features  images [batch, H, W, 3] RGB 0-255 -> embedding [batch, E], fmap [batch, h, w, C]
  pair      fmap_query, fmap_gallery [pairs, h, w, C] -> distance [pairs] (+ f(q|g), f(g|q))

and export.json, whose 'stage2' says how to rank with them as the search API
does: K, the mix w and the query gate, as the run's final evaluation chose
them on validation, else a gate that re-sorts no query (`stage2_policy`).

(Torch weights go out through `torch_export.export_checkpoint`.)
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cace_jax.data import augment
from cace_jax.errors import PortError, RunFailure
from cace_jax.evaluation import records
from cace_jax.evaluation.stage2 import embedding_distance
from cace_jax.models import CACENet, ResNet, feature_map_shape, l2_normalize
from cace_jax.runs import checkpoint

try:  # the onnx extra is optional: without it, `export_deployment` says how to install it
  from cace_jax.interop import onnx_graph
except ImportError as _error:
  onnx_graph, _ONNX_MISSING = None, _error


# onnxruntime against JAX on the same inputs, both float32: the observed gaps are ~1e-6
# (BatchNorm folded into the convolutions rounds differently); an exported graph that
# computes another model misses by orders of magnitude more.
VERIFY_TOLERANCE = 1e-4
# Which exported model each verified output belongs to.
VERIFIED_PARTS = {'embedding': 'features.onnx', 'fmap': 'features.onnx', 'distance': 'pair.onnx'}


def feature_function(model, variables: Mapping, flip: bool) -> Callable:
  """images [B, H, W, 3] RGB 0-255 -> (L2-normalised embedding [B, E], fmap [B, h, w, C]).

  The same embedding stage 1 ranks with (flip-averaged if `flip`); the map
  is the unflipped image's, the pair stage's input.
  """
  mean, std = np.float32(augment.IMAGENET_MEAN_PIXEL), np.float32(augment.IMAGENET_STD_PIXEL)

  def features(images):
    normalized = (images - mean) / std  # augment.normalize, as the eval pipeline
    embedding, fmap = model.apply(variables, normalized, flip, method=CACENet.features)
    return l2_normalize(embedding), fmap.astype(jnp.float32)

  return features


def pair_function(model, variables: Mapping) -> Callable:
  """(fmap_query, fmap_gallery) [N, h, w, C] -> (distance [N], f(q|g) [N, E], f(g|q) [N, E])."""

  def embed_pairs(module, fmap_query, fmap_gallery):
    return module.embed_cached_pairs(
      module.compute_image_cache(fmap_query), module.compute_image_cache(fmap_gallery)
    )

  def pair(fmap_query, fmap_gallery):
    out = model.apply(variables, fmap_query, fmap_gallery, method=embed_pairs)
    return (
      embedding_distance(out['embedding_uv'], out['embedding_vu']),
      out['embedding_uv'],
      out['embedding_vu'],
    )

  return pair


def export_jax_functions(
  model,
  variables: Mapping,
  image_size: Sequence[int],
  flip: bool,
  platforms: Sequence[str] = ('cpu', 'cuda', 'tpu'),
) -> dict:
  """Serialized `jax.export` modules {'features', 'pair'} with symbolic batch axes.

  Weights are embedded as constants; `jax.export.deserialize(data).call(...)`
  runs them on any of `platforms` without this package. No 'pair' for a
  model without a pair stage (gcn 'none').
  """
  height, width = image_size
  fmap_shape = feature_map_shape(image_size, model.depth, model.width, model.last_stride)
  (batch,) = jax.export.symbolic_shape('batch')
  (pairs,) = jax.export.symbolic_shape('pairs')
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  features = jax.export.export(
    jax.jit(feature_function(model, variables, flip)), platforms=platforms
  )(spec(batch, height, width, 3))
  if model.gcn == 'none':
    return {'features': features.serialize()}
  pair = jax.export.export(jax.jit(pair_function(model, variables)), platforms=platforms)(
    spec(pairs, *fmap_shape), spec(pairs, *fmap_shape)
  )
  return {'features': features.serialize(), 'pair': pair.serialize()}


def verify_onnx(
  model,
  variables: Mapping,
  image_size: Sequence[int],
  flip: bool,
  features_path: str,
  pair_path: str | None,
  batch: int = 3,
  seed: int = 0,
) -> dict:
  """Runs the ONNX models in onnxruntime and JAX on the same random images.

  Returns:
    Largest absolute differences: 'embedding' (unit vectors), 'fmap'
    (relative to the map's largest value) and, with `pair_path`, 'distance'
    (pairs of the images with each other).
  """
  import onnxruntime  # optional: the onnx extra

  images = np.random.default_rng(seed).uniform(0, 255, (batch, *image_size, 3)).astype(np.float32)
  embedding, fmap = map(np.asarray, feature_function(model, variables, flip)(images))
  run = lambda path, feeds: onnxruntime.InferenceSession(
    path, providers=['CPUExecutionProvider']
  ).run(None, feeds)
  onnx_embedding, onnx_fmap = run(features_path, {'images': images})
  gaps = {
    'embedding': float(np.abs(onnx_embedding - embedding).max()),
    'fmap': float(np.abs(onnx_fmap - fmap).max() / max(np.abs(fmap).max(), 1e-12)),
  }
  if pair_path:
    query, gallery = np.arange(batch), np.roll(np.arange(batch), 1)
    distance = np.asarray(pair_function(model, variables)(fmap[query], fmap[gallery])[0])
    onnx_distance = run(pair_path, {'fmap_query': fmap[query], 'fmap_gallery': fmap[gallery]})[0]
    gaps['distance'] = float(np.abs(onnx_distance - distance).max())
  return gaps


def stage2_policy(config, workdir: str, stage2: str = 'validation') -> dict | None:
  """How a deployment ranks in two stages, as the search API does: export.json's 'stage2'.

  {'k', 'mix', 'max_similarity', 'from'}: each query whose nearest gallery
  image is at most `max_similarity` cosine-similar has its `k` nearest
  re-sorted by (1 - mix) d_individual + mix `distance` (the pair model's),
  ahead of the rest of its stage-1 list; other queries keep stage 1.
  `stage2` and 'from' are `records.served_stage2`'s: the choice the run's
  final evaluation made on its validation split, else none (`max_similarity`
  `records.NO_QUERY`: stage 1 alone), or with 'config' the config's values.
  None for a port, which has no config.
  """
  if config is None:
    return None
  config, stage2_from = records.served_stage2(config, workdir, stage2)
  return {
    'k': int(config.eval.stage2_k),
    'mix': float(config.eval.stage2_mix),
    'max_similarity': float(config.eval.stage2_max_similarity),
    'from': stage2_from,
  }


def export_deployment(
  workdir: str,
  out: str | None = None,
  step: int | None = None,
  image_size: Sequence[int] | None = None,
  flip: bool | None = None,
  verify: bool = True,
  tolerance: float = VERIFY_TOLERANCE,
  stage2: str = 'validation',
) -> dict:
  """Writes features/pair models of a checkpoint as ONNX and `jax.export` files.

  Files in `out` (default `<workdir>/export`): features.onnx, pair.onnx,
  features.jax_export, pair.jax_export (no pair.* for gcn 'none') and
  export.json (shapes, the source checkpoint, the stage-2 policy
  `stage2_policy` with a pair stage and, with `verify`, the
  onnxruntime-vs-JAX differences). Existing files of the same names are
  replaced; nothing else is touched.

  Args:
    image_size: (H, W); needed for ported checkpoints, else the training config's.
    flip: flip-average the embedding; None: the config's `eval.flip` (True for ports).
    tolerance: the largest onnxruntime-vs-JAX difference `verify` accepts.
    stage2: which stage 2 export.json prescribes (`stage2_policy`):
      'validation' (the run's choice, else none) or 'config'.

  Raises:
    RunFailure: when an ONNX model misses JAX's outputs by more than `tolerance`
      (the files and export.json, with the differences, are kept for inspection).
  """
  try:
    if onnx_graph is None:
      raise _ONNX_MISSING
    if verify:
      import onnxruntime  # noqa: F401  (optional, the onnx extra: only checked for here)
  except ImportError as e:
    raise PortError(
      f"deployment export needs the onnx extra ({e}): pip install -e '.[onnx]'"
    ) from e
  run = checkpoint.load_run(workdir, step)
  if isinstance(run.model, ResNet):
    raise PortError(
      'the checkpoint holds a bare torchvision ResNet; deployment export needs '
      'a CACE-Net checkpoint (trained, or ported with `tools/port.py official`)'
    )
  # Exported graphs compute in float32 whatever the training compute dtype was.
  model, variables, step = run.model.clone(dtype=jnp.float32), run.variables, run.step
  trained_size = tuple(run.config.data.image_size) if run.config else ()
  if flip is None:
    flip = bool(run.config.eval.flip) if run.config else True
  image_size = tuple(image_size or trained_size)
  if len(image_size) != 2:
    raise PortError(f'{workdir} holds a ported checkpoint: give --image_size=H,W')
  onnx_graph.check_exportable(model)  # before anything is written
  stages = ('features', 'pair') if model.pair_stage else ('features',)
  out = out or os.path.join(workdir, 'export')
  os.makedirs(out, exist_ok=True)
  paths = {
    f'{stage}.{kind}': os.path.join(out, f'{stage}.{kind}')
    for stage in stages
    for kind in ('onnx', 'jax_export')
  }
  fmap_shape = feature_map_shape(image_size, model.depth, model.width, model.last_stride)
  _write_bytes(
    paths['features.onnx'],
    onnx_graph.feature_graph(model, variables, image_size, flip).SerializeToString(),
  )
  if 'pair' in stages:
    _write_bytes(
      paths['pair.onnx'], onnx_graph.pair_graph(model, variables, fmap_shape).SerializeToString()
    )
  for name, data in export_jax_functions(model, variables, image_size, flip).items():
    _write_bytes(paths[f'{name}.jax_export'], bytes(data))
  summary = {
    'workdir': workdir,
    'step': step,
    'image_size': list(image_size),
    'flip': flip,
    'fmap_shape': list(fmap_shape),
    'embed_dim': model.embed_dim,
    'files': sorted(paths),
  }
  if model.pair_stage:
    summary['stage2'] = stage2_policy(run.config, workdir, stage2)
  misses = {}
  if verify:
    gaps = verify_onnx(
      model, variables, image_size, flip, paths['features.onnx'], paths.get('pair.onnx')
    )
    misses = {part: gap for part, gap in gaps.items() if not gap <= tolerance}  # NaN misses
    summary.update(max_abs_diff_onnx_vs_jax=gaps, tolerance=tolerance, verified=not misses)
  with open(os.path.join(out, 'export.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  if misses:
    part, gap = max(misses.items(), key=lambda item: item[1])
    raise RunFailure(
      f'{os.path.join(out, VERIFIED_PARTS[part])} does not compute what JAX computes: '
      f'{part} differs by {gap:.3g} (tolerance {tolerance:g}); the files and export.json are '
      'kept for inspection'
    )
  return summary


def _write_bytes(path: str, data: bytes) -> None:
  """Writes atomically, so an interrupted export never leaves half a model."""
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)

"""Use a trained model from Python: embed images, index a gallery on disk, search it in two stages.

  import cace_jax
  reid = cace_jax.load('runs/synthetic')
  index = reid.index(gallery_paths, 'runs/synthetic/gallery_index')
  hits = reid.search(['query.jpg'], index, top_k=10)

Every image goes through the evaluation's own path (`stage1.embed_batches`
over the eval tf.data pipeline, `pipeline.eval_batches`: same resize,
normalisation and flip averaging), so an embedding here is the embedding
`eval.py` computes for the same file, and `search` ranks as one of eval's
rows: its `cacenet` row (`two_stage.TwoStageRanker`) where the run chose stage
2 on validation, else its `individual` row (`load`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from cace_jax import sharding
from cace_jax.data import pipeline, split_data
from cace_jax.data.manual_source import to_rgb_jpeg
from cace_jax.errors import ConfigError, DatasetError
from cace_jax.evaluation import metrics, records, stage1, stage2, two_stage
from cace_jax.models import CACENet
from cace_jax.runs import checkpoint

INDEX_VERSION = 1
INDEX_CHUNK = 256  # images embedded (and committed to disk) per step of `index`


def load(
  workdir: str,
  step: int | None = None,
  config: ml_collections.ConfigDict | None = None,
  stage2: str = 'validation',
) -> ReID:
  """The model of a training run (or a port) ready to embed and search.

  Args:
    workdir: a training run's directory, or a ported checkpoint's.
    step: which checkpoint; the latest if None.
    config: image size, flip and stage-2 settings (`data.image_size`,
      `eval.flip`, `eval.stage2_k`, `eval.stage2_mix`,
      `eval.stage2_max_similarity`, ...) and the model; None uses the run's
      own. A port has none: pass one.
    stage2: 'validation' (the default) searches with the stage-2 K, w and
      query gate the run's final evaluation chose on validation, and by
      stage 1 alone if it chose none (a port never has); 'config' with the
      config's own (`records.served_stage2`).
  """
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(workdir, step, config.model if config else None, mesh)
  if config is None:
    if run.config is None:
      raise ConfigError(
        f'{workdir} is a port without a training config: pass load(workdir, config=...), '
        'e.g. configs/market.py get_config()'
      )
    config = run.config
  config, stage2_from = records.served_stage2(config, workdir, stage2)
  return ReID(run.model, run.variables, config, mesh, workdir, run.step, stage2_from)


@dataclasses.dataclass
class GalleryIndex:
  """An on-disk gallery: paths, embeddings [N, E] and stage-2 caches, memory-mapped.

  Attributes:
    directory: where it lives (`index.json`, `embeddings.npy`, `cache_<name>.npy`).
    paths: the N gallery images, in index order.
    embeddings: [N, E] individual embeddings as eval computes them (ranked
      by cosine distance; `ReID.embed` returns them L2-normalised).
    caches: {name: [N, ...]} stage-2 caches (empty for a model without pair stage).
  """

  directory: str
  paths: list[str]
  embeddings: np.ndarray
  caches: dict

  def __len__(self) -> int:
    return len(self.paths)


@dataclasses.dataclass
class ReID:
  """A loaded model with the evaluation's preprocessing (see `load`).

  Attributes:
    model, variables: the network and its variables (replicated over `mesh`).
    config: the settings `embed` and `search` use (image size, flip, stage 2).
    workdir, step: where the checkpoint came from (an index records both).
    stage2_from: where `config`'s stage 2 came from: 'validation', 'config',
      or `records.STAGE1_ONLY` (none: stage 1 alone).
  """

  model: CACENet
  variables: dict
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  workdir: str
  step: int
  stage2_from: str = 'config'

  def embed(self, images) -> np.ndarray:
    """L2-normalised individual embeddings [N, E] of file paths or uint8 [H, W, 3] arrays.

    Arrays are stored as the dataset builders store PNG images (RGB JPEG,
    quality 95), so an array embeds like its saved file would once prepared.
    """
    embeddings = self._extract(images, with_cache=False).embeddings
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)

  def _extract(self, images, with_cache: bool, cache_dir: str | None = None):
    data = as_split(images)
    batches = pipeline.eval_batches(data, self.config.data)
    return stage1.embed_batches(
      self.model, self.variables, batches, len(data), self.config, self.mesh, with_cache, cache_dir
    )

  def index(self, gallery_paths, directory: str, progress: bool = True) -> GalleryIndex:
    """Builds (or resumes, or reloads) the on-disk index of `gallery_paths` in `directory`.

    Images are embedded INDEX_CHUNK at a time into memory-mapped `.npy`
    files; `index.json` records how many are done after each chunk, so an
    interrupted build resumes where it stopped. An index of other paths or
    another checkpoint in `directory` is an error, never overwritten.
    """
    paths = [os.fspath(p) for p in gallery_paths]
    if not paths:
      raise DatasetError('index: no gallery images given')
    os.makedirs(directory, exist_ok=True)
    record_path = os.path.join(directory, 'index.json')
    with_cache = self.model.pair_stage
    identity = {'version': INDEX_VERSION, 'workdir': os.path.abspath(self.workdir)}
    identity.update(step=self.step, image_size=list(self.config.data.image_size))
    identity.update(flip=bool(self.config.eval.flip), paths=paths)
    record = read_index_record(record_path)
    if record is not None and {k: record.get(k) for k in identity} != identity:
      raise DatasetError(
        f'{record_path}: an index of other images or another checkpoint is there; '
        'choose another directory'
      )
    done = record['done'] if record else 0
    if done == len(paths):
      return load_index(directory)
    arrays = None
    bar = tqdm.tqdm(total=len(paths), initial=done, disable=not progress, desc='index')
    while done < len(paths):
      chunk = paths[done : done + INDEX_CHUNK]
      embeddings, caches, _ = self._extract(chunk, with_cache)
      if arrays is None:
        shapes = {'embeddings': embeddings.shape[1:]}
        shapes.update({f'cache_{k}': v.shape[1:] for k, v in caches.items()})
        dtypes = {'embeddings': embeddings.dtype}
        dtypes.update({f'cache_{k}': v.dtype for k, v in caches.items()})
        arrays = open_index_arrays(directory, shapes, dtypes, len(paths), fresh=record is None)
        if record is None:
          record = {**identity, 'done': 0, 'arrays': {k: str(v) for k, v in dtypes.items()}}
      stop = done + len(chunk)
      arrays['embeddings'][done:stop] = embeddings
      for name, value in caches.items():
        arrays[f'cache_{name}'][done:stop] = stored_view(value)
      for array in arrays.values():
        array.flush()
      done = record['done'] = stop
      write_index_record(record_path, record)
      bar.update(len(chunk))
    bar.close()
    return load_index(directory)

  def search(self, queries, index: GalleryIndex, top_k: int = 10) -> list[list[dict]]:
    """Two-stage ranking of `index` for each query (file paths or arrays).

    Stage 1 ranks the whole gallery by the cosine distance of individual
    embeddings; stage 2 re-sorts each query's `eval.stage2_k` nearest by
    (1 - w) d_individual + w d_conditional (w = `eval.stage2_mix`), as eval
    does, if the query's nearest image is at most `eval.stage2_max_similarity`
    similar (each query is gated on its own, so a query's hits do not depend
    on the others searched with it). Returns per query its `top_k` hits, best
    first, each {'rank', 'path', 'index', 'individual_distance',
    'conditional_distance' (with a pair stage; hits stage 2 did not re-sort
    keep their stage-1 place but are scored too), 'resorted' (whether stage
    2 placed it)}.
    """
    if top_k < 1:
      raise ConfigError(f'top_k={top_k}: expected >= 1')
    k = min(self.config.eval.stage2_k, len(index)) if self.model.pair_stage else 0
    with tempfile.TemporaryDirectory(prefix='search_') as scratch:
      q_emb, q_cache, _ = self._extract(queries, self.model.pair_stage, scratch)
      individual = metrics.cosine_distance(q_emb, np.asarray(index.embeddings))
      ranked, conditional, resorted = individual, {}, set()
      if self.model.pair_stage:
        # Stage 2 only permutes each query's first K, which stay ahead of the rest: the
        # hits shown are among its first max(K, top_k) stage-1 neighbours, scored once.
        pair_distances = stage2.make_pair_distances(
          self.model, self.variables, stage2.conditional_distance, q_cache, index.caches, self.mesh
        )
        ranker = two_stage.TwoStageRanker(individual, pair_distances, max(k, top_k))
        gate = two_stage.least_confident(individual, self.config.eval.stage2_max_similarity)
        ranked = ranker.distances(k, self.config.eval.stage2_mix, gate)
        pairs = list(zip(ranker.query_index.tolist(), ranker.gallery_index.tolist()))
        conditional = dict(zip(pairs, ranker.scores.tolist()))
        placed = ranker.within(k) & gate[ranker.query_index]
        resorted = {pair for pair, inside in zip(pairs, placed) if inside}
    order = np.argsort(ranked, axis=1, kind='stable')[:, :top_k]
    results = []
    for q, row in enumerate(order):
      hits = []
      for rank, g in enumerate(row.tolist(), 1):
        hit = {'rank': rank, 'path': index.paths[g], 'index': g}
        hit['individual_distance'] = float(individual[q, g])
        if self.model.pair_stage:
          hit['conditional_distance'] = float(conditional[(q, g)])
          hit['resorted'] = (q, g) in resorted
        hits.append(hit)
      results.append(hits)
    return results


def as_split(images) -> split_data.SplitData:
  """Encoded images as an evaluation split (labels -1); DatasetError naming a bad image."""
  if isinstance(images, (str, os.PathLike, np.ndarray)) and np.ndim(images) < 4:
    images = [images]
  encoded, names = [], []
  for i, image in enumerate(images):
    if isinstance(image, (str, os.PathLike)):
      path = os.fspath(image)
      try:
        with open(path, 'rb') as f:
          data = f.read()
      except OSError as e:
        raise DatasetError(f'cannot read {path}: {e}') from e
      encoded.append(to_rgb_jpeg(data, path))
      names.append(path)
    else:
      array = np.asarray(image)
      if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise DatasetError(
          f'image {i}: expected a file path or a uint8 [H, W, 3] array, got '
          f'{array.dtype} {list(array.shape)}'
        )
      buffer = io.BytesIO()
      Image.fromarray(array).save(buffer, format='PNG')
      encoded.append(to_rgb_jpeg(buffer.getvalue(), f'image {i}'))
      names.append(f'array_{i:06d}')
  if not encoded:
    raise DatasetError('no images given')
  n = len(encoded)
  return split_data.SplitData(
    images=np.array(encoded, dtype=object),
    labels=np.full(n, -1, np.int32),
    pids=np.zeros(n, np.int32),
    camids=np.zeros(n, np.int32),
    file_names=np.array(names, dtype=object),
  )


def read_index_record(path: str) -> dict | None:
  """The index's `index.json`, or None if there is none yet."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DatasetError(f'{path}: unreadable index record ({e}); choose another directory') from e


def write_index_record(path: str, record: dict) -> None:
  """Writes `index.json` atomically (a crash leaves the previous record)."""
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f)
  os.replace(path + '.tmp', path)


def stored_view(array: np.ndarray) -> np.ndarray:
  """`array` as `.npy` files can hold it: bfloat16 (which .npy cannot name) as uint16 bits."""
  array = np.asarray(array)
  return array.view(np.uint16) if array.dtype == jnp.bfloat16 else array


def open_index_arrays(directory, shapes, dtypes, num_images, fresh: bool) -> dict:
  """The index's `.npy` files as writable memory maps (created when `fresh`)."""
  arrays = {}
  for name, shape in shapes.items():
    path = os.path.join(directory, f'{name}.npy')
    if fresh or not os.path.exists(path):
      dtype = np.uint16 if dtypes[name] == jnp.bfloat16 else dtypes[name]
      arrays[name] = np.lib.format.open_memmap(
        path, mode='w+', dtype=dtype, shape=(num_images, *shape)
      )
    else:
      arrays[name] = np.load(path, mmap_mode='r+')
  return arrays


def load_index(directory: str) -> GalleryIndex:
  """Reloads a complete index read-only (memory-mapped); DatasetError if it is unfinished."""
  record_path = os.path.join(directory, 'index.json')
  record = read_index_record(record_path)
  if record is None:
    raise DatasetError(f'{record_path} not found: build the index with ReID.index first')
  if record['done'] < len(record['paths']):
    raise DatasetError(
      f'{directory}: index holds {record["done"]} of {len(record["paths"])} images; '
      'run ReID.index again to finish it'
    )
  arrays = {}
  for name, dtype in record['arrays'].items():
    stored = np.load(os.path.join(directory, f'{name}.npy'), mmap_mode='r')
    arrays[name] = stored.view(jnp.dtype(dtype)) if dtype == 'bfloat16' else stored
  caches = {name[len('cache_') :]: v for name, v in arrays.items() if name.startswith('cache_')}
  return GalleryIndex(directory, list(record['paths']), arrays['embeddings'], caches)

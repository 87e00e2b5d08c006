"""Evaluation: features of every query and gallery image, ranking, metrics, a table.

The paper's two-stage inference (Sec. 3.5): stage 1 extracts individual
embeddings of all images (batched per device over the `data` mesh) and ranks
by cosine distance; stage 2 (`pair_scoring`) re-sorts each query's top-K by
conditional embeddings computed from compact per-image caches. Each row of the
results table is one way of scoring pairs.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from cace_jax import input_pipeline, metrics, pair_scoring, rerank
from cace_jax.losses import l2_normalize
from cace_jax.models import CACENet

AXIS = 'data'
RANKS = (1, 5, 10)
STAGE2_PAIRS_PER_CALL = 256  # rounded up to a multiple of the device count


def embedding_and_maps(model: CACENet, images):
  """Eval-mode (individual embeddings [B, E], backbone maps [B, h, w, C]), no pair stage.

  Used as `model.apply(variables, images, method=embedding_and_maps)`.
  """
  fmap, _ = model.backbone(images, train=False)
  batch, height, width, channels = fmap.shape
  nodes = fmap.reshape(batch, height * width, channels).astype(jnp.float32)
  _, embedding = model.embed(model.pool(nodes), train=False)
  return embedding, fmap


def individual_features(model: CACENet, images, with_cache: bool = False):
  """Eval-mode individual embeddings [B, E], skipping the pair stage.

  Used as `model.apply(variables, images, method=individual_features)`. With
  `with_cache`, also returns the compact per-image cache stage 2 needs.
  """
  embedding, fmap = embedding_and_maps(model, images)
  if with_cache:
    return embedding, model.compute_image_cache(fmap)
  return embedding


@functools.lru_cache(maxsize=4)  # periodic evaluations reuse one compiled step
def make_embed_step(model: CACENet, mesh: jax.sharding.Mesh, flip: bool, with_cache: bool):
  """Jitted (variables, images [devices, b, H, W, 3]) -> (embeddings [devices, b, E], cache).

  With `flip`, the embedding is the renormalised mean of the L2-normalised
  embeddings of the image and its mirror (flip test-time augmentation); the
  stage-2 cache ({} unless `with_cache`) comes from the unflipped image,
  without 'query' where the adjacency uses one array as query and key.
  """

  def device_fn(variables, images):
    images = images[0]
    if with_cache:
      embedding, cache = model.apply(variables, images, True, method=individual_features)
      if cache['query'] is cache['key']:  # one traced value: keep one copy
        cache = {name: value for name, value in cache.items() if name != 'query'}
    else:
      embedding, cache = model.apply(variables, images, method=individual_features), {}
    if flip:
      mirrored = model.apply(variables, images[:, :, ::-1], method=individual_features)
      embedding = l2_normalize(l2_normalize(embedding) + l2_normalize(mirrored))
    add_device_axis = lambda tree: jax.tree.map(lambda x: x[None], tree)
    return add_device_axis(embedding), add_device_axis(cache)

  spec = jax.sharding.PartitionSpec
  return jax.jit(jax.shard_map(device_fn, mesh=mesh, in_specs=(spec(), spec(AXIS)),
                               out_specs=spec(AXIS)))


def extract_features(embed_step, variables, data: input_pipeline.SplitData,
                     config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     cache_dir: str | None = None) -> tuple[np.ndarray, dict]:
  """Embeddings [N, E] and stage-2 caches (leading axis N) of every image, in order.

  The caches are stored in `config.eval.cache_dtype` as they arrive, in
  memory, or as memory-mapped files in `cache_dir` when they would exceed
  `config.eval.cache_memory_gb` (`pair_scoring.allocate_host_cache`).
  """
  dataset = input_pipeline.create_eval_dataset(
      data, image_size=config.data.image_size, batch_size=config.data.eval_batch_size,
      num_devices=jax.device_count(), local_devices=jax.local_device_count(),
      process_index=jax.process_index())
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  embeddings, caches = None, None
  for batch in input_pipeline.iterate_numpy(dataset):
    images = jax.make_array_from_process_local_data(sharding, batch['image'])
    index = jax.make_array_from_process_local_data(sharding, batch['index'])
    output, cache = embed_step(variables, images)
    flat = lambda x: _to_host(x).reshape((-1,) + x.shape[2:])
    output, cache, index = flat(output), jax.tree.map(flat, cache), flat(index)
    if embeddings is None:
      embeddings = np.zeros((len(data), output.shape[-1]), np.float32)
      caches = pair_scoring.allocate_host_cache(
          {name: value.shape[1:] for name, value in cache.items()}, len(data),
          jnp.dtype(config.eval.cache_dtype), cache_dir, config.eval.cache_memory_gb)
    valid = index >= 0
    embeddings[index[valid]] = output[valid]
    for stored, new in zip(jax.tree.leaves(caches), jax.tree.leaves(cache)):
      stored[index[valid]] = new[valid]
  return embeddings, caches


def _to_host(array: jax.Array) -> np.ndarray:
  """A global array's full value on every process."""
  if jax.process_count() == 1:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def summarize(result: dict) -> dict:
  """Rank-1/5/10, mAP, mINP (percent) from `metrics.evaluate_rank` output."""
  cmc = result['cmc']
  summary = {f'rank{r}': 100.0 * float(cmc[min(r, len(cmc)) - 1]) for r in RANKS}
  summary.update(mAP=100.0 * result['mAP'], mINP=100.0 * result['mINP'])
  return summary


@functools.lru_cache(maxsize=2)  # periodic evaluations read the splits once
def load_eval_splits(data_dir: str):
  """(query, gallery) `SplitData` of the prepared dataset in `data_dir`."""
  builder = tfds.builder_from_directory(data_dir)
  return input_pipeline.load_split(builder, 'query'), input_pipeline.load_split(builder, 'gallery')


def evaluate(model: CACENet, variables: dict, builder, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh, figures_dir: str | None = None,
             scratch_dir: str | None = None) -> dict:
  """Evaluates the model's `variables` (params, batch_stats) on `builder`'s query/gallery.

  Rows (each a way of scoring pairs; stage-2 rows re-sort each query's
  `config.eval.stage2_k` nearest gallery images and need a pair stage):
    'individual': cosine distance of individual embeddings (stage 1).
    'clue_alignment': adjacency-weighted similarity of aligned pixel pairs
      (Table 1's "+ visual clue alignment"; adjacencies that compare features).
    'cacenet': distance between f(q|g) and f(g|q) (the full two-stage inference).
    '<row>+kr' with `config.eval.rerank`: the same after k-reciprocal re-ranking
      of stage 1 (k1 20, k2 6, lambda 0.3).

  With `figures_dir`, also writes the figures of `eval_figures` for the last
  row (the full model's ranking when it has a pair stage). Stage-2 caches too
  large for memory go to a temporary directory in `scratch_dir` (the system's
  temporary directory if None), removed afterwards.

  Returns:
    {row: {'rank1', 'rank5', 'rank10', 'mAP', 'mINP'}} in percent, plus
    '_info' with cache bytes per image and K.
  """
  if scratch_dir:
    os.makedirs(scratch_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix='stage2_cache_', dir=scratch_dir) as cache_dir:
    return _evaluate(model, variables, builder, config, mesh, figures_dir, cache_dir)


def _evaluate(model, variables, builder, config, mesh, figures_dir, cache_dir) -> dict:
  """`evaluate` with the stage-2 cache files (if any) in `cache_dir`."""
  query, gallery = load_eval_splits(str(builder.data_dir))
  k = config.eval.stage2_k if model.gcn != 'none' else 0
  embed_step = make_embed_step(model, mesh, config.eval.flip, with_cache=k > 0)
  q_emb, q_cache = extract_features(embed_step, variables, query, config, mesh,
                                    os.path.join(cache_dir, 'query'))
  g_emb, g_cache = extract_features(embed_step, variables, gallery, config, mesh,
                                    os.path.join(cache_dir, 'gallery'))
  distmat = metrics.cosine_distance(q_emb, g_emb)
  last = {}

  def rank(distances):
    last.update(distmat=distances, result=metrics.evaluate_rank(
        distances, query.pids, gallery.pids, query.camids, gallery.camids))
    return summarize(last['result'])

  stage1 = {'individual': distmat}
  if config.eval.rerank:  # k-reciprocal re-ranking of stage 1; stage 2 then re-sorts its top-K
    stage1['individual+kr'] = rerank.k_reciprocal_rerank_features(q_emb, g_emb, metric='cosine')
  results = {name: rank(d) for name, d in stage1.items()}
  if k > 0:
    scorers = {'cacenet': pair_scoring.conditional_distance}
    if pair_scoring.has_alignment_keys(q_cache):
      scorers = {'clue_alignment': pair_scoring.alignment_distance, **scorers}
    # One process: the pairs of each call are split over the devices. Several
    # processes each hold all caches and score all pairs, as one replicated program.
    pair_mesh = mesh if jax.process_count() == 1 else None
    pairs_per_call = -(-STAGE2_PAIRS_PER_CALL // mesh.size) * mesh.size
    for row, score in scorers.items():
      step = pair_scoring.make_pair_step(model, score, pair_mesh)
      pair_distances = lambda q, g, step=step: step(
          variables, jax.tree.map(lambda c: c[q], q_cache), jax.tree.map(lambda c: c[g], g_cache))
      for name, base in stage1.items():
        suffix = name[len('individual'):]
        results[row + suffix] = rank(pair_scoring.rerank_top_k(base, k, pair_distances,
                                                               pairs_per_call))
    results['_info'] = {'stage2_k': k, 'cache_bytes_per_image': pair_scoring.cache_nbytes(
        g_cache, len(gallery)), 'cache_on_disk': isinstance(
            jax.tree.leaves(g_cache)[0], np.memmap)}
  if figures_dir and jax.process_index() == 0:
    from cace_jax import eval_figures  # pylint: disable=import-outside-toplevel
    if config.eval.rerank:  # the last row is then k-reciprocal; show the plain one
      rank(pair_scoring.rerank_top_k(distmat, k, pair_distances, pairs_per_call)
           if k > 0 else distmat)
    eval_figures.write_figures(model, variables, query, gallery, last['distmat'],
                               last['result']['per_query_ap'], config.data.image_size,
                               figures_dir)
  return results


def flatten_results(results: dict) -> dict:
  """{'individual': {'mAP': x}} -> {'individual/mAP': x} (for scalar logging)."""
  return {f'{row}/{name}': value for row, values in results.items()
          if not row.startswith('_') for name, value in values.items()}


def format_table(results: dict, title: str = '') -> str:
  """A fixed-width results table (percent)."""
  columns = [f'rank{r}' for r in RANKS] + ['mAP', 'mINP']
  width = max([len(row) for row in results] + [10])
  lines = [title] if title else []
  lines.append(f'{"":<{width}}  ' + '  '.join(f'{c:>7}' for c in
                                             ['R-1', 'R-5', 'R-10', 'mAP', 'mINP']))
  for row, values in results.items():
    if row.startswith('_'):
      continue
    lines.append(f'{row:<{width}}  ' + '  '.join(f'{values[c]:7.2f}' for c in columns))
  return '\n'.join(lines)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict:
  """Evaluates a checkpoint of `workdir`, writes `<workdir>/results.json`, prints the table.

  Args:
    config: the run's config (model fields must match the checkpoint).
    workdir: the training run's directory.
    step: which checkpoint; the latest if None.
  """
  from cace_jax import checkpoint, train_lib  # pylint: disable=import-outside-toplevel
  step, state, record = checkpoint.read_checkpoint(workdir, step)
  model = train_lib.create_model(config, record['num_classes'])
  builder = train_lib.prepare_on_first_process(config)
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put({'params': state['params'], 'batch_stats': state['batch_stats']},
                             replicated)
  results = evaluate(model, variables, builder, config, mesh, figures_dir=workdir,
                     scratch_dir=workdir)
  if jax.process_index() == 0:
    print(format_table(results, title=f'{config.data.dataset}, {workdir} step {step}'))
    with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
      json.dump({'step': step, 'dataset': config.data.dataset, 'results': results}, f,
                indent=2)
  return results

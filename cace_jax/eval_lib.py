"""Evaluation: features of every query and gallery image, ranking, metrics, a table.

Stage 1 of the paper's inference (Sec. 3.5): individual embeddings of all
images (batched per device over the `data` mesh), cosine distances, the
standard metrics. Each row of the results table is one way of scoring pairs.
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from cace_jax import input_pipeline, metrics
from cace_jax.models import CACENet

AXIS = 'data'
RANKS = (1, 5, 10)


def _l2_normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def individual_features(model: CACENet, images):
  """Eval-mode individual embeddings only, skipping the pair stage: images -> [B, E].

  Used as `model.apply(variables, images, method=individual_features)`.
  """
  fmap, _ = model.backbone(images, train=False)
  batch, height, width, channels = fmap.shape
  nodes = fmap.reshape(batch, height * width, channels).astype(jnp.float32)
  _, embedding = model.embed(model.pool(nodes), train=False)
  return embedding


def make_embed_step(model: CACENet, mesh: jax.sharding.Mesh, flip: bool):
  """Jitted (variables, images [devices, b, H, W, 3]) -> embeddings [devices, b, E].

  With `flip`, the embedding is the renormalised mean of the L2-normalised
  embeddings of the image and its mirror (flip test-time augmentation).
  """

  def device_fn(variables, images):
    images = images[0]
    embed = lambda x: model.apply(variables, x, method=individual_features)
    embedding = embed(images)
    if flip:
      embedding = _l2_normalize(_l2_normalize(embedding) + _l2_normalize(embed(images[:, :, ::-1])))
    return embedding[None]

  spec = jax.sharding.PartitionSpec
  return jax.jit(jax.shard_map(device_fn, mesh=mesh, in_specs=(spec(), spec(AXIS)),
                               out_specs=spec(AXIS)))


def extract_embeddings(embed_step, variables, data: input_pipeline.SplitData,
                       config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> np.ndarray:
  """Embeddings [N, E] of every image of `data`, in split order, on every process."""
  dataset = input_pipeline.create_eval_dataset(
      data, image_size=config.data.image_size, batch_size=config.data.eval_batch_size,
      num_devices=jax.device_count(), local_devices=jax.local_device_count(),
      process_index=jax.process_index())
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  embeddings = None
  for batch in input_pipeline.iterate_numpy(dataset):
    images = jax.make_array_from_process_local_data(sharding, batch['image'])
    index = jax.make_array_from_process_local_data(sharding, batch['index'])
    output = embed_step(variables, images)
    output, index = _to_host(output), _to_host(index)
    output, index = output.reshape(-1, output.shape[-1]), index.reshape(-1)
    if embeddings is None:
      embeddings = np.zeros((len(data), output.shape[-1]), np.float32)
    valid = index >= 0
    embeddings[index[valid]] = output[valid]
  return embeddings


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


def evaluate(model: CACENet, state, builder, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> dict:
  """Evaluates `state` on the query/gallery splits of `builder`.

  Returns:
    {row name: {'rank1', 'rank5', 'rank10', 'mAP', 'mINP'}} in percent; row
    'individual' ranks by the cosine distance of individual embeddings.
  """
  query = input_pipeline.load_split(builder, 'query')
  gallery = input_pipeline.load_split(builder, 'gallery')
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  embed_step = make_embed_step(model, mesh, config.eval.flip)
  q_emb = extract_embeddings(embed_step, variables, query, config, mesh)
  g_emb = extract_embeddings(embed_step, variables, gallery, config, mesh)
  distmat = metrics.cosine_distance(q_emb, g_emb)
  individual = metrics.evaluate_rank(distmat, query.pids, gallery.pids, query.camids,
                                     gallery.camids)
  return {'individual': summarize(individual)}


def flatten_results(results: dict) -> dict:
  """{'individual': {'mAP': x}} -> {'individual/mAP': x} (for scalar logging)."""
  return {f'{row}/{name}': value for row, values in results.items()
          for name, value in values.items()}


def format_table(results: dict, title: str = '') -> str:
  """A fixed-width results table (percent)."""
  columns = [f'rank{r}' for r in RANKS] + ['mAP', 'mINP']
  width = max([len(row) for row in results] + [10])
  lines = [title] if title else []
  lines.append(f'{"":<{width}}  ' + '  '.join(f'{c:>7}' for c in
                                             ['R-1', 'R-5', 'R-10', 'mAP', 'mINP']))
  for row, values in results.items():
    lines.append(f'{row:<{width}}  ' + '  '.join(f'{values[c]:7.2f}' for c in columns))
  return '\n'.join(lines)

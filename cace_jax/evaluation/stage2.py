"""Stage 2 of the paper's inference (Sec. 3.5): re-sort each query's top-K by pairs.

Stage 1 ranks the gallery by individual embeddings. Stage 2 takes, for each
query, its K nearest gallery images, forms the K (query, gallery) pairs,
computes the conditional embeddings f(q|g) and f(g|q) from the compact
per-image caches (`CACENet.compute_image_cache`, stored by `stage1`), and
re-sorts those K by the distance between the two; the rest of the list keeps
its stage-1 order.

The same top-K machinery scores the "+ visual clue alignment" row of the
paper's Table 1: the mean similarity of the aligned cross-image pixel pairs,
weighted by the adjacency, with no GCN.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cace_jax import sharding
from cace_jax.models import CACENet, cross_block, l2_normalize

# Re-sorted entries are moved below every stage-1 distance (cosine distances
# lie in [0, 2]) so they stay ahead of the rest of the list.
_TOPK_OFFSET = -10.0
PAIRS_PER_CALL = 256  # rounded up to a multiple of the device count


def conditional_distance(module: CACENet, cache_q: dict, cache_g: dict):
  """Cosine distance between f(q|g) and f(g|q) for pairs (cache_q[i], cache_g[i]) -> [N].

  The same distance the pair triplet loss trains (Euclidean distance of the
  L2-normalised embeddings is a monotone function of it).
  """
  out = module.embed_cached_pairs(cache_q, cache_g)
  return embedding_distance(out['embedding_uv'], out['embedding_vu'])


def embedding_distance(embedding_uv, embedding_vu):
  """Cosine distance of f(u|v) and f(v|u), row by row: [N, E] x 2 -> [N]."""
  return 1.0 - jnp.sum(l2_normalize(embedding_uv) * l2_normalize(embedding_vu), axis=-1)


def alignment_distance(module: CACENet, cache_q: dict, cache_g: dict):
  """1 − adjacency-weighted mean cosine similarity of aligned cross-image pixels -> [N].

  The pixels are compared through the features the alignment itself uses
  (the cache's keys, normalised here: backbone features for the
  correspondence kinds and 'topk', projections for 'projected').
  """
  cross = cross_block(module.adjacency, cache_q['query'], cache_g['key'], module.topk)
  similarity = jnp.einsum(
    '...ik,...jk->...ij', l2_normalize(cache_q['key']), l2_normalize(cache_g['key'])
  )
  weight = jnp.sum(cross, axis=(-2, -1))
  score = jnp.sum(cross * similarity, axis=(-2, -1)) / jnp.maximum(weight, 1e-12)
  return 1.0 - score


def has_alignment_keys(cache: dict) -> bool:
  """Whether the adjacency compares pixel features (not a fixed pattern)."""
  return cache['key'].shape[-1] > 0


def pair_scorers(cache: dict) -> dict[str, Callable]:
  """The stage-2 rows a model's caches support: {row name: scoring method}.

  'clue_alignment' (Table 1's "+ visual clue alignment") exists only for
  adjacencies that compare pixel features; 'cacenet' (conditional embeddings)
  always.
  """
  scorers = {'cacenet': conditional_distance}
  if has_alignment_keys(cache):
    scorers = {'clue_alignment': alignment_distance, **scorers}
  return scorers


def compact_cache(cache: dict, dtype=np.float32) -> dict:
  """The form a gallery cache is kept in on the host between the two stages.

  Drops 'query' where it is the same array as 'key' (the projected-cosine
  adjacency compares one projection with itself) and stores floats as
  `dtype` (bfloat16 halves the bytes). `expand_cache` undoes both.
  """
  stored = dict(cache)
  if 'query' in stored and np.array_equal(stored['query'], stored['key']):
    del stored['query']
  return {name: np.asarray(value).astype(dtype) for name, value in stored.items()}


def expand_cache(cache: dict) -> dict:
  """The model's cache form (float32, with 'query') from `compact_cache`'s."""
  expanded = {name: jnp.asarray(value, jnp.float32) for name, value in cache.items()}
  expanded.setdefault('query', expanded['key'])
  return expanded


@functools.lru_cache(maxsize=4)  # periodic evaluations reuse one compiled step
def make_pair_step(
  model: CACENet, score: Callable, mesh: jax.sharding.Mesh | None = None
) -> Callable:
  """Jitted (variables, cache_q, cache_g) -> [N] distances with `score` as the method.

  The caches may be in `compact_cache` form; they are expanded on the device.
  With a `data` mesh, the N pairs are split over its devices (N a multiple
  of the mesh size) and the caches given are this process's share of the N
  rows (`local_share`; all N in a single process); the distances returned
  are all N, on every process. Variables are replicated.
  """

  def score_pairs(variables, cache_q, cache_g):
    return model.apply(variables, expand_cache(cache_q), expand_cache(cache_g), method=score)

  if mesh is None:
    return jax.jit(score_pairs)
  spec = jax.sharding.PartitionSpec
  pairs = spec(sharding.AXIS)
  step = jax.jit(
    jax.shard_map(score_pairs, mesh=mesh, in_specs=(spec(), pairs, pairs), out_specs=pairs)
  )

  def sharded_step(variables, local_cache_q, local_cache_g):
    distances = step(
      sharding.replicate(variables, mesh),
      sharding.global_batch(local_cache_q, mesh),
      sharding.global_batch(local_cache_g, mesh),
    )
    return sharding.to_host(distances)

  return sharded_step


def local_share(num_rows: int, mesh: jax.sharding.Mesh) -> slice:
  """The rows of a `num_rows` array split over `mesh`'s `data` axis that this process holds.

  A process's devices are consecutive in a mesh over the devices of several
  processes (`sharding.make_mesh`), so it holds one block, the one that
  `sharding.global_batch` assembles from it; `num_rows` must be a multiple
  of the mesh size.
  """
  per_device = num_rows // mesh.size
  here = jax.process_index()
  mine = [i for i, device in enumerate(mesh.devices.flat) if device.process_index == here]
  return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


class PairDistances:
  """(query index [M], gallery index [M]) -> distances [M] of those pairs, on every process.

  The M pairs of a call are split over all devices of the mesh, of every
  process: each process reads the cache rows of its own share of the pairs
  from its host caches and scores them on its devices, and only the M
  distances are gathered. M must be a multiple of the mesh size
  (`make_pair_distances` gives the call size). Counts the pairs this process
  scored, for reports of how the work divides.
  """

  def __init__(self, model: CACENet, variables, score: Callable, cache_q, cache_g, mesh):
    self.step = make_pair_step(model, score, mesh)
    self.variables, self.cache_q, self.cache_g, self.mesh = variables, cache_q, cache_g, mesh
    self.pairs_scored_here = 0

  def __call__(self, query_index: np.ndarray, gallery_index: np.ndarray) -> np.ndarray:
    mine = local_share(len(query_index), self.mesh)
    query_index, gallery_index = query_index[mine], gallery_index[mine]
    self.pairs_scored_here += len(query_index)
    return self.step(
      self.variables,
      jax.tree.map(lambda c: c[query_index], self.cache_q),
      jax.tree.map(lambda c: c[gallery_index], self.cache_g),
    )


def make_pair_distances(
  model: CACENet, variables, score: Callable, cache_q: dict, cache_g: dict, mesh: jax.sharding.Mesh
) -> tuple[PairDistances, int]:
  """(`PairDistances` of the host caches scored with `score`, its call size M)."""
  call_size = -(-PAIRS_PER_CALL // mesh.size) * mesh.size
  return PairDistances(model, variables, score, cache_q, cache_g, mesh), call_size


def rerank_top_k(
  distmat: np.ndarray,
  k: int,
  pair_distances: Callable[[np.ndarray, np.ndarray], np.ndarray],
  batch_size: int = 256,
  mix: float = 1.0,
) -> np.ndarray:
  """Stage 2: re-sorts each query's k nearest gallery images by pair distances.

  Args:
    distmat: [Nq, Ng] stage-1 distances.
    k: how many top gallery images per query are re-sorted; 0 returns a copy.
    pair_distances: (query_index [M], gallery_index [M]) -> distances [M].
    batch_size: pairs scored per call (fixed, so the scoring compiles once).
    mix: w of the re-sorting score (1 - w) d_stage1 + w d_pair (`fuse`);
      1 re-sorts by pair distances alone.

  Returns:
    [Nq, Ng] distances whose ascending order is stage 2's ranking (`resort`).
  """
  query_index, gallery_index = top_k_pairs(distmat, k)
  scores = score_pairs(pair_distances, query_index, gallery_index, batch_size)
  return resort(distmat, query_index, gallery_index, scores, mix)


def top_k_pairs(distmat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(query index, gallery index), each [Nq * k]: every query's k nearest, nearest first.

  The order is stable, so for each query the pairs of a smaller k are a
  prefix of its pairs for a larger one.
  """
  k = max(min(k, distmat.shape[1]), 0)
  top = np.argsort(distmat, axis=1, kind='stable')[:, :k]  # [Nq, k]
  return np.repeat(np.arange(distmat.shape[0]), k), top.reshape(-1)


def within_first(num_pairs: int, num_queries: int, k: int) -> np.ndarray:
  """[num_pairs] mask of the `top_k_pairs` pairs among their query's first k (a prefix each)."""
  per_query = num_pairs // max(num_queries, 1)
  return np.arange(num_pairs) % max(per_query, 1) < k


def fuse(stage1_distances, pair_distances, mix: float) -> np.ndarray:
  """The score stage 2 sorts by: (1 - w) d_stage1 + w d_pair, with w = `mix`.

  The paper re-sorts the top-K "by the similarity of coupled features" and
  describes its inference as using both individual and conditional features
  (Sec. 3.5). w = 1 is the conditional distance alone; w < 1 keeps part of
  the individual one. Both are cosine distances, so they share a scale.
  """
  pair_distances = np.asarray(pair_distances, np.float32)
  if mix == 1.0:
    return pair_distances
  return ((1.0 - mix) * np.asarray(stage1_distances) + mix * pair_distances).astype(np.float32)


def resort(
  distmat: np.ndarray,
  query_index: np.ndarray,
  gallery_index: np.ndarray,
  pair_distances: np.ndarray,
  mix: float = 1.0,
) -> np.ndarray:
  """A copy of `distmat` whose listed (query, gallery) entries hold their fused score.

  The replaced entries also get an offset that puts them ahead of every other
  entry of their row: they are re-sorted among themselves, and the rest of
  the list keeps its stage-1 order.
  """
  resorted = np.array(distmat, dtype=np.float32, copy=True)
  if len(query_index):
    scores = fuse(resorted[query_index, gallery_index], pair_distances, mix)
    resorted[query_index, gallery_index] = scores + _TOPK_OFFSET
  return resorted


def score_pairs(
  pair_fn: Callable, query_index: np.ndarray, gallery_index: np.ndarray, batch_size: int = 256
):
  """`pair_fn` over any number of pairs, in calls of `batch_size` (so it compiles once).

  Args:
    pair_fn: (query index [batch_size], gallery index [batch_size]) -> a
      pytree of arrays with leading axis batch_size.
    query_index, gallery_index: [M] the pairs.

  Returns:
    The outputs for the M pairs, concatenated (the last call is padded with
    its last pair and the padding dropped).
  """
  outputs = []
  for start in range(0, len(query_index), batch_size):
    stop = min(start + batch_size, len(query_index))
    pad = batch_size - (stop - start)
    q = np.pad(query_index[start:stop], (0, pad), mode='edge')
    g = np.pad(gallery_index[start:stop], (0, pad), mode='edge')
    outputs.append(jax.tree.map(lambda x: np.asarray(x)[: stop - start], pair_fn(q, g)))
  if not outputs:
    return np.zeros(0, np.float32)
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def cache_nbytes(cache: dict, num_images: int) -> int:
  """Bytes per image of a host-side cache of `num_images` images."""
  return sum(np.asarray(v).nbytes for v in jax.tree.leaves(cache)) // max(num_images, 1)


@functools.lru_cache(maxsize=4)
def make_pair_probe(model: CACENet) -> Callable:
  """Jitted (variables, cache_q, cache_g) -> what the diagnostics read of N pairs (q, g).

  Returns a dict: 'cross' [N, n, n] the cross block A_qg of each pair graph,
  'intra' [N, n, n] q's intra block A_qq, 'conditional' [N, E] f(q|g) and
  'individual' [N, E] f(q), all eval mode.
  """

  def probe(variables, cache_q, cache_g):
    cache_q, cache_g = expand_cache(cache_q), expand_cache(cache_g)
    embeddings = model.apply(variables, cache_q, cache_g, method=CACENet.embed_cached_pairs)
    return {
      'cross': cross_block(model.adjacency, cache_q['query'], cache_g['key'], model.topk),
      'intra': cache_q['intra'],
      'conditional': embeddings['embedding_uv'],
      'individual': model.apply(variables, cache_q, method=CACENet.embed_cache),
    }

  return jax.jit(probe)

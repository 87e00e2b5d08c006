"""Stage 2 of the paper's inference (Sec. 3.5): re-sort each query's top-K by pairs.

Stage 1 ranks the gallery by individual embeddings. Stage 2 takes, for each
query, its K nearest gallery images, forms the K (query, gallery) pairs,
computes the conditional embeddings f(q|g) and f(g|q) from the compact
per-image caches (`CACENet.compute_image_cache`, stored by `stage1`), and
re-sorts those K by the distance between the two; the rest of the list keeps
its stage-1 order.

Stage 2 may be selective: only the queries stage 1 is least sure of, those
whose nearest gallery image is at most `max_similarity` similar
(`least_confident`), are re-sorted; the others keep their stage-1 ranking.
The official maintainers report that conditional embeddings for the few
queries with the lowest top-1 similarity already reach the paper's numbers.

The same top-K machinery scores the "+ visual clue alignment" row of the
paper's Table 1: the mean similarity of the aligned cross-image pixel pairs,
weighted by the adjacency, with no GCN.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from cace_jax import sharding
from cace_jax.evaluation.records import NO_QUERY  # the gate of a fraction of 0
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
  With a `data` mesh of this process's devices (`sharding.local_mesh`), the N
  pairs are split over them (N a multiple of the mesh size): host caches in,
  host distances out. Variables are replicated.
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
  split = sharding.split_over_data(mesh)

  def sharded_step(variables, cache_q, cache_g):
    distances = step(
      sharding.replicate(variables, mesh),
      jax.device_put(cache_q, split),
      jax.device_put(cache_g, split),
    )
    return np.asarray(distances)

  return sharded_step


class PairFunction:
  """(query index [M], gallery index [M]) -> `fn`'s outputs for those M pairs, on every process.

  `fn` maps the cache rows of `call_size` pairs, (query rows, gallery rows)
  as {name: [call_size, ...]}, to a pytree of host arrays with leading axis
  `call_size`; pairs go to it in calls of that size (the last one padded),
  so it compiles once. M may be any size.

  With several processes, each holds every query row and only its own
  gallery rows (`held_g`, from `stage1.SplitFeatures`). A pair is computed
  by the process holding its gallery row, on that process's devices with no
  collective, and only the outputs are gathered: no cache row leaves the
  process that computed it. Every process must make the same calls.
  Counts the pairs this process computed and the seconds it spent on them
  (gathers excluded), for reports of how work divides.
  """

  def __init__(
    self, fn: Callable, cache_q: dict, cache_g: dict, call_size: int, held_g: np.ndarray | None
  ):
    self.fn, self.cache_q, self.cache_g, self.call_size = fn, cache_q, cache_g, call_size
    self.held_g = held_g if jax.process_count() > 1 else None
    self.pairs_scored_here, self.seconds_here = 0, 0.0
    self._no_rows = None  # the outputs' structure with zero rows, once known

  def _compute(self, query_index: np.ndarray, gallery_index: np.ndarray):
    def on_rows(q, g):
      return self.fn(
        jax.tree.map(lambda c: c[q], self.cache_q), jax.tree.map(lambda c: c[g], self.cache_g)
      )

    start = time.perf_counter()
    outputs = jax.block_until_ready(
      call_in_batches(on_rows, query_index, gallery_index, self.call_size)
    )
    self.seconds_here += time.perf_counter() - start
    return outputs

  def __call__(self, query_index: np.ndarray, gallery_index: np.ndarray):
    if self.held_g is None or not len(query_index):
      self.pairs_scored_here += len(query_index)
      return self._compute(query_index, gallery_index)
    mine = np.flatnonzero(self.held_g[gallery_index])
    self.pairs_scored_here += len(mine)
    if len(mine):
      outputs = self._compute(query_index[mine], gallery_index[mine])
    elif self._no_rows is not None:
      outputs = self._no_rows
    else:  # the structure is not known yet: one pair is computed for it and dropped
      outputs = self._compute(query_index[:1], gallery_index[:1])
    self._no_rows = jax.tree.map(lambda x: x[:0], outputs)
    return gather_rows(outputs, mine, len(query_index))


def gather_rows(local, rows: np.ndarray, num_rows: int):
  """Every process's `local` outputs for its `rows` of `num_rows`, assembled on every process.

  Each row must come from exactly one process. The processes' shares are
  padded to the largest and allgathered, so the traffic is about `num_rows`
  rows whatever the process count.
  """
  counts = sharding.per_process(len(rows))
  capacity = max(max(counts), 1)
  padded_rows = np.pad(rows.astype(np.int32), (0, capacity - len(rows)))
  pad = lambda x: np.pad(x, [(0, capacity - len(x))] + [(0, 0)] * (x.ndim - 1))
  padded = jax.tree.map(pad, local)
  all_rows = multihost_utils.process_allgather(padded_rows)  # [processes, capacity]
  everyone = multihost_utils.process_allgather(padded)  # leaves [processes, capacity, ...]

  def assemble(gathered):
    out = np.zeros((num_rows, *gathered.shape[2:]), gathered.dtype)
    for process, count in enumerate(counts):
      out[all_rows[process, :count]] = gathered[process, :count]
    return out

  return jax.tree.map(assemble, everyone)


class PairDistances(PairFunction):
  """(query index [M], gallery index [M]) -> distances [M] of those pairs, on every process.

  `PairFunction` of `score` (a `CACENet` method over cache rows), each call
  split over this process's devices.
  """

  def __init__(
    self, model: CACENet, variables, score: Callable, cache_q, cache_g, mesh, held_g=None
  ):
    local = sharding.local_mesh(mesh)
    step = make_pair_step(model, score, local)
    if jax.process_count() > 1:  # the global copy would compute over every process's devices
      variables = sharding.replicate(sharding.host_copy(variables), local)
    call_size = -(-PAIRS_PER_CALL // local.size) * local.size
    super().__init__(functools.partial(step, variables), cache_q, cache_g, call_size, held_g)


def make_pair_distances(
  model: CACENet,
  variables,
  score: Callable,
  cache_q: dict,
  cache_g: dict,
  mesh: jax.sharding.Mesh,
  held_g: np.ndarray | None = None,
) -> PairDistances:
  """`PairDistances` of the host caches scored with `score` (gallery rows `held_g` here)."""
  return PairDistances(model, variables, score, cache_q, cache_g, mesh, held_g)


class TwoStageRanker:
  """The two-stage ranking of a query x gallery distance matrix, its pairs scored once.

  Stage 1's distances order each query's gallery; each query's first `depth`
  gallery images (`top_k_pairs`) are scored by `pair_distances` once, when
  the ranker is made. `distances(k, mix)` then re-sorts each query's first
  k <= depth of them: a grid of (K, w), or the pair scores of hits below K,
  cost no further scoring. Evaluation, the choice of K and w, and the API's
  search all rank through it.

  Attributes:
    stage1: [Nq, Ng] stage-1 distances.
    query_index, gallery_index: [Nq * depth] the scored pairs, each query's
      nearest first (depth is cut to Ng).
    scores: [Nq * depth] their pair distances.
  """

  def __init__(
    self,
    stage1: np.ndarray,
    pair_distances: Callable[[np.ndarray, np.ndarray], np.ndarray],
    depth: int,
  ):
    """Scores each query's first `depth` stage-1 neighbours.

    Args:
      stage1: [Nq, Ng] stage-1 distances.
      pair_distances: (query_index [M], gallery_index [M]) -> distances [M],
        for any M (`PairDistances` calls its step in fixed-size calls).
      depth: how many of each query's nearest gallery images are scored.
    """
    self.stage1 = stage1
    self.query_index, self.gallery_index = top_k_pairs(stage1, depth)
    self.scores = np.asarray(pair_distances(self.query_index, self.gallery_index))

  def within(self, k: int) -> np.ndarray:
    """[Nq * depth] bool: the scored pairs among their query's first k (a prefix of each)."""
    per_query = len(self.query_index) // max(self.stage1.shape[0], 1)
    return np.arange(len(self.query_index)) % max(per_query, 1) < k

  def distances(self, k: int, mix: float = 1.0, queries: np.ndarray | None = None) -> np.ndarray:
    """Stage 2 at K = k, w = mix: [Nq, Ng] distances whose ascending order is its ranking.

    Each query's first k stage-1 neighbours are re-sorted by (1 - w)
    d_stage1 + w d_pair (`fuse`) and stay ahead of the rest, which keeps its
    stage-1 order (`resort`); k = 0 or w = 0 gives stage 1's order.
    `queries` ([Nq] bool, e.g. `least_confident`) limits the re-sorting to
    the queries it marks (None: every query).
    """
    first = self.within(k)
    if queries is not None:
      first &= np.asarray(queries, bool)[self.query_index]
    return resort(
      self.stage1, self.query_index[first], self.gallery_index[first], self.scores[first], mix
    )


def top1_similarity(stage1: np.ndarray) -> np.ndarray:
  """[Nq] each query's cosine similarity to its nearest gallery image, 1 − min_g d(q, g).

  Stage 1's confidence in its first answer: what selective stage 2 gates on.
  """
  stage1 = np.asarray(stage1)
  if not stage1.shape[1]:
    return np.full(stage1.shape[0], -1.0, np.float32)
  return (1.0 - stage1.min(axis=1)).astype(np.float32)


def least_confident(stage1: np.ndarray, max_similarity: float) -> np.ndarray:
  """[Nq] bool: the queries stage 2 re-sorts, those whose top-1 similarity is <= `max_similarity`.

  `max_similarity` >= 1 marks every query (cosine similarity is at most 1;
  rounding may put a duplicate image a hair above), < -1 none.
  """
  if max_similarity >= 1.0:
    return np.ones(np.shape(stage1)[0], bool)
  return top1_similarity(stage1) <= max_similarity


def gate_for_fraction(similarities: np.ndarray, fraction: float) -> float:
  """The `max_similarity` that marks the least confident `fraction` of these queries.

  With `similarities` the top-1 similarities of a validation split's queries,
  the gate that `least_confident` applies to other queries, one at a time if
  need be (a search, a deployed model): round(fraction · Nq) of these
  queries fall at or below it (more on ties). 1 marks every query, and
  `NO_QUERY` none.
  """
  if fraction >= 1.0:
    return 1.0
  count = int(round(fraction * len(similarities)))
  if count == 0:
    return NO_QUERY
  return float(np.sort(np.asarray(similarities, np.float32))[count - 1])


def top_k_pairs(distmat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(query index, gallery index), each [Nq * k]: every query's k nearest, nearest first.

  The order is stable, so for each query the pairs of a smaller k are a
  prefix of its pairs for a larger one.
  """
  k = max(min(k, distmat.shape[1]), 0)
  top = np.argsort(distmat, axis=1, kind='stable')[:, :k]  # [Nq, k]
  return np.repeat(np.arange(distmat.shape[0]), k), top.reshape(-1)


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


def call_in_batches(
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


PROBE_OUTPUTS = ('cross', 'intra', 'conditional', 'individual')


@functools.lru_cache(maxsize=4)
def make_pair_probe(model: CACENet, outputs: tuple[str, ...] = PROBE_OUTPUTS) -> Callable:
  """Jitted (variables, cache_q, cache_g) -> what the diagnostics read of N pairs (q, g).

  Returns a dict of the `outputs` named among: 'cross' [N, n, n] the cross
  block A_qg of each pair graph, 'intra' [N, n, n] q's intra block A_qq,
  'conditional' [N, E] f(q|g) and 'individual' [N, E] f(q), all eval mode
  (what is not asked for is not computed).
  """

  def probe(variables, cache_q, cache_g):
    cache_q, cache_g = expand_cache(cache_q), expand_cache(cache_g)
    embeddings = model.apply(variables, cache_q, cache_g, method=CACENet.embed_cached_pairs)
    found = {
      'cross': cross_block(model.adjacency, cache_q['query'], cache_g['key'], model.topk),
      'intra': cache_q['intra'],
      'conditional': embeddings['embedding_uv'],
      'individual': model.apply(variables, cache_q, method=CACENet.embed_cache),
    }
    return {name: found[name] for name in outputs}

  return jax.jit(probe)


def pair_probe(
  model: CACENet,
  variables,
  cache_q: dict,
  cache_g: dict,
  held_g: np.ndarray | None = None,
  outputs: tuple[str, ...] = PROBE_OUTPUTS,
  call_size: int = PAIRS_PER_CALL,
) -> PairFunction:
  """`make_pair_probe`'s `outputs` of any pairs of the host caches, as a `PairFunction`."""
  probe = make_pair_probe(model, tuple(outputs))
  if jax.process_count() > 1:  # the global copy would compute over every process's devices
    variables = jax.device_put(sharding.host_copy(variables), jax.local_devices()[0])
  return PairFunction(functools.partial(probe, variables), cache_q, cache_g, call_size, held_g)

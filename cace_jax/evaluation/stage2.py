"""Stage 2 of the paper's inference (Sec. 3.5): the distance of a (query, gallery) pair.

For each query's K nearest gallery images, stage 2 forms the K (query,
gallery) pairs and computes the conditional embeddings f(q|g) and f(g|q)
from the compact per-image caches (`CACENet.compute_image_cache`, stored by
`stage1`); the distance between the two is the pair's distance. This module
scores pairs, in fixed-size device calls over sharded caches;
`two_stage.TwoStageRanker` re-sorts each query's top K by those distances.

The same machinery scores the "+ visual clue alignment" row of the paper's
Table 1: the mean similarity of the aligned cross-image pixel pairs, weighted
by the adjacency, with no GCN.
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
from cace_jax.models import CACENet, cross_block, l2_normalize

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

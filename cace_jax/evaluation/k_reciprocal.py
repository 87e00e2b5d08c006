"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), in numpy and scipy.sparse.

"Re-ranking Person Re-identification with k-reciprocal Encoding". All query and
gallery images form one set of N = Nq + Ng items with an "original" distance d.
For each item i:

- N(i, k): its k + 1 nearest items (itself included) by d.
- R(i, k) = {j in N(i, k) : i in N(j, k)}, the k-reciprocal neighbours.
- R*(i): R(i, k1), plus R(c, round(k1 / 2)) for every c in R(i, k1) with
  |R(c, k1/2) ∩ R(i, k1)| > 2/3 |R(c, k1/2)| (the expansion rule).
- V[i, j] = exp(-d(i, j)) / Σ_{j' ∈ R*(i)} exp(-d(i, j')) for j in R*(i), else 0.
- Local query expansion: V[i] ← mean of V[j] over the k2 nearest j (i included).
- Jaccard distance 1 − Σ min(V[i], V[j]) / Σ max(V[i], V[j]); as the rows sum
  to 1, Σ max = 2 − Σ min.
- final = (1 − λ) · jaccard + λ · d, restricted to query × gallery.

As in the reference code (and torchreid, fast-reid), d is the distance divided by
each row's maximum over all N items, so d(i, ·) is in [0, 1]; rounding of
k1 / 2 is numpy's (half to even: k1 = 5 gives 2).

Convention for the original distance: the given distances are used AS THEY ARE;
nothing is squared. The authors' code and torchreid square their input because
they expect plain Euclidean distances (the paper's working distance is the
squared Euclidean one); torchreid then squares its own default, which is already
squared, giving a fourth power. Squaring is the caller's choice here because the
same function must serve cosine distances (this project's stage 1) and distances
from other scorers (stage-2 pair distances), where a square has no meaning. To
reproduce torchreid exactly, pass `dist ** 2`; for the paper's convention from
features, use `metric='sqeuclidean'`.

Both entry points share one memory-bounded core: distance rows are produced a
chunk at a time and reduced to the k1 + 1 nearest neighbours, V is a sparse
matrix, and Jaccard sums use V's columns as the inverted index. Nothing N × N
is ever held, beyond what the caller passes in.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.sparse

# Rows × N distance elements computed at once (float32: ~32 MB, ~100 MB with temporaries).
_CHUNK_ELEMENTS = 8_000_000
# (query, shared item, gallery) triples gathered at once for the Jaccard sums
# (~50 bytes each with temporaries: ~200 MB).
_TRIPLE_BUDGET = 4_000_000
# Pairs whose distance is recomputed from features at once (two [P, D] gathers).
_PAIR_BATCH = 65_536
# Guards the row normalisation against an all-zero row (identical items).
_TINY = 1e-12

RowsFn = Callable[[int, int], np.ndarray]  # (start, stop) -> [stop - start, N] float32
PairsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (i [P], j [P]) -> [P]


def rerank_distances(
  q_g_dist: np.ndarray,
  q_q_dist: np.ndarray,
  g_g_dist: np.ndarray,
  k1: int = 20,
  k2: int = 6,
  lambda_value: float = 0.3,
  chunk_size: int | None = None,
) -> np.ndarray:
  """Re-ranked query × gallery distances from the three distance blocks.

  The original distance is the block matrix [[q_q, q_g], [q_gᵀ, g_g]], used
  unsquared (see the module docstring) and normalised by each row's maximum.
  Rows are assembled from the blocks a chunk at a time, so beyond the inputs the
  peak memory is that of `rerank_features`.

  Args:
    q_g_dist: [Nq, Ng] query-to-gallery distances.
    q_q_dist: [Nq, Nq] query-to-query distances (symmetric, zero diagonal).
    g_g_dist: [Ng, Ng] gallery-to-gallery distances (symmetric, zero diagonal).
    k1: size of the k-reciprocal neighbourhoods (20 in the paper).
    k2: neighbours averaged by local query expansion, the item included; 1
      disables it. At most k1 + 1.
    lambda_value: weight λ of the original distance in the result.
    chunk_size: rows of the N × N distance handled at once; by default as many
      as fit in about 8M elements.

  Returns:
    float32 [Nq, Ng]: (1 − λ) · jaccard + λ · (row-normalised original).
  """
  q_g = np.asarray(q_g_dist, np.float32)
  q_q = np.asarray(q_q_dist, np.float32)
  g_g = np.asarray(g_g_dist, np.float32)
  num_query, num_gallery = q_g.shape
  if q_q.shape != (num_query, num_query) or g_g.shape != (num_gallery, num_gallery):
    raise ValueError(
      f'q_g_dist {q_g.shape}, q_q_dist {q_q.shape} and g_g_dist {g_g.shape} do not fit together'
    )

  def distance_rows(start, stop):
    query_rows = np.arange(start, min(stop, num_query))
    gallery_rows = np.arange(max(start, num_query), stop) - num_query
    return np.concatenate(
      [
        np.concatenate([q_q[query_rows], q_g[query_rows]], axis=1),
        np.concatenate([q_g[:, gallery_rows].T, g_g[gallery_rows]], axis=1),
      ],
      axis=0,
    )

  def distance_pairs(i, j):
    # One block lookup per quadrant of the joint matrix.
    result = np.empty(len(i), np.float32)
    i_query, j_query = i < num_query, j < num_query
    for mask, block, rows, cols in (
      (i_query & j_query, q_q, i, j),
      (i_query & ~j_query, q_g, i, j - num_query),
      (~i_query & j_query, q_g, j, i - num_query),
      (~i_query & ~j_query, g_g, i - num_query, j - num_query),
    ):
      result[mask] = block[rows[mask], cols[mask]]
    return result

  return _rerank_rows(
    distance_rows, distance_pairs, num_query, num_gallery, k1, k2, lambda_value, chunk_size
  )


def rerank_features(
  query_features: np.ndarray,
  gallery_features: np.ndarray,
  k1: int = 20,
  k2: int = 6,
  lambda_value: float = 0.3,
  metric: str = 'cosine',
  q_g_dist: np.ndarray | None = None,
  chunk_size: int | None = None,
) -> np.ndarray:
  """Re-ranked query × gallery distances from features, without any N × N matrix.

  Distances are computed from the features in row chunks (float32 BLAS), once to
  find every item's k1 + 1 nearest neighbours and row maximum, and otherwise
  only for the O(N · k1²) pairs that V needs.

  Peak memory, N = Nq + Ng, D the feature size, K = k1 + 1, h = round(k1/2) + 1:
  4·Nq·Ng bytes for the result (unavoidable), plus O(N·D + N·K + chunk_size·N
  + N·|R*|·k2) working memory: the features (4·N·D), neighbour lists (~8·N·K),
  one distance chunk (~12·chunk_size·N; ~100 MB by default), V and its query
  expansion (~16·N·|R*|·(1 + k2), where |R*| ≤ K·(1 + h) but is typically
  20-60), and the Jaccard gathers (fixed budget, ~250 MB). Measured with random
  256-d features at Market-1501 size (3,368 × 15,913): peak RSS 0.56 GB, of
  which 0.21 GB is the result and 0.05 GB the interpreter. MSMT17 (11,659 ×
  82,161) needs 3.8 GB for the result itself and a few hundred MB besides.
  Args:
    query_features: [Nq, D] query embeddings.
    gallery_features: [Ng, D] gallery embeddings.
    k1, k2, lambda_value, chunk_size: as in `rerank_distances`.
    metric: 'cosine' (1 − cosine similarity, this project's stage-1 distance),
      'sqeuclidean' (the paper's squared Euclidean distance, as fast-reid), or
      'euclidean'.
    q_g_dist: optional [Nq, Ng] distances that replace the query × gallery block
      (and, transposed, gallery × query) of the original distance everywhere:
      neighbour lists, row maxima, weights and the final blend. Query × query
      and gallery × gallery stay from the features, so they should be on a
      comparable scale (e.g. stage-2 pair distances from the same embedding).

  Returns:
    float32 [Nq, Ng] re-ranked distances.
  """
  query = np.asarray(query_features, np.float32)
  gallery = np.asarray(gallery_features, np.float32)
  if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
    raise ValueError(f'features {query.shape} and {gallery.shape} must be [N, D] alike')
  if metric not in ('cosine', 'sqeuclidean', 'euclidean'):
    raise ValueError(f"metric must be 'cosine', 'sqeuclidean' or 'euclidean', got {metric!r}")
  num_query, num_gallery = len(query), len(gallery)
  features = np.concatenate([query, gallery])
  if metric == 'cosine':
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), _TINY)
  squares = np.sum(features**2, axis=1)
  if q_g_dist is not None:
    q_g_dist = np.asarray(q_g_dist, np.float32)
    if q_g_dist.shape != (num_query, num_gallery):
      raise ValueError(f'q_g_dist {q_g_dist.shape} is not [{num_query}, {num_gallery}]')

  def from_dots(dots, square_rows, square_cols):
    # Same formulas for whole rows and single pairs, so both agree to rounding;
    # in place, as on whole rows every extra pass over [chunk, N] counts.
    if metric == 'cosine':
      np.subtract(1.0, dots, out=dots)
    else:
      dots *= -2.0
      dots += square_rows
      dots += square_cols
      np.maximum(dots, 0.0, out=dots)
      if metric == 'euclidean':
        np.sqrt(dots, out=dots)
    return dots

  def distance_rows(start, stop):
    dist = from_dots(features[start:stop] @ features.T, squares[start:stop, None], squares[None, :])
    # An item is at distance exactly 0 from itself, as in a given distance matrix.
    dist[np.arange(stop - start), np.arange(start, stop)] = 0.0
    rows = np.arange(start, stop)
    if q_g_dist is not None:
      query_rows = rows[rows < num_query]
      gallery_rows = rows[rows >= num_query] - num_query
      dist[: len(query_rows), num_query:] = q_g_dist[query_rows]
      dist[len(query_rows) :, :num_query] = q_g_dist[:, gallery_rows].T
    return dist

  def distance_pairs(i, j):
    result = np.empty(len(i), np.float32)
    for start in range(0, len(i), _PAIR_BATCH):
      a, b = i[start : start + _PAIR_BATCH], j[start : start + _PAIR_BATCH]
      result[start : start + len(a)] = from_dots(
        np.einsum('pd,pd->p', features[a], features[b]), squares[a], squares[b]
      )
    result[i == j] = 0.0
    if q_g_dist is not None:
      forward = (i < num_query) & (j >= num_query)
      backward = (i >= num_query) & (j < num_query)
      result[forward] = q_g_dist[i[forward], j[forward] - num_query]
      result[backward] = q_g_dist[j[backward], i[backward] - num_query]
    return result

  return _rerank_rows(
    distance_rows, distance_pairs, num_query, num_gallery, k1, k2, lambda_value, chunk_size
  )


def _rerank_rows(
  distance_rows: RowsFn,
  distance_pairs: PairsFn,
  num_query: int,
  num_gallery: int,
  k1: int,
  k2: int,
  lambda_value: float,
  chunk_size: int | None,
) -> np.ndarray:
  """The algorithm over N = Nq + Ng items, given raw distances by rows and pairs."""
  if k1 < 1 or not 1 <= k2 <= k1 + 1:
    raise ValueError(f'need k1 >= 1 and 1 <= k2 <= k1 + 1, got k1={k1}, k2={k2}')
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f'lambda_value must be in [0, 1], got {lambda_value}')
  if num_query == 0 or num_gallery == 0:
    raise ValueError(f'empty query ({num_query}) or gallery ({num_gallery})')
  num_total = num_query + num_gallery
  chunk_size = chunk_size or max(1, _CHUNK_ELEMENTS // num_total)
  # The result starts as the normalised original distance and is blended in place.
  result = np.empty((num_query, num_gallery), np.float32)
  neighbors, row_max = find_neighbors(
    distance_rows, num_total, num_query, k1 + 1, chunk_size, result
  )
  half = int(np.around(k1 / 2.0))
  reciprocal = mark_reciprocal(neighbors, k1 + 1, chunk_size)
  reciprocal_half = mark_reciprocal(neighbors, half + 1, chunk_size)
  rows, cols = expand_reciprocal_sets(neighbors, reciprocal, reciprocal_half, half + 1, chunk_size)
  weights = build_weights(rows, cols, distance_pairs, row_max, num_total)
  if k2 > 1:
    weights = expand_query(weights, neighbors[:, :k2])
  blend_jaccard(weights, num_query, lambda_value, result)
  return result


def find_neighbors(
  distance_rows: RowsFn,
  num_total: int,
  num_query: int,
  keep: int,
  chunk_size: int,
  result: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """Every item's `keep` nearest items and row maximum, in one pass of row chunks.

  Also writes the row-normalised query × gallery distances into `result`
  [Nq, Ng], so they need not be computed again.

  Returns:
    neighbors: int32 [N, min(keep, N)], ascending by distance, ties by index
      (but see `select_nearest` on ties at the cut).
    row_max: float32 [N], the normaliser of each row.
  """
  keep = min(keep, num_total)
  neighbors = np.empty((num_total, keep), np.int32)
  row_max = np.empty(num_total, np.float32)
  for start in range(0, num_total, chunk_size):
    stop = min(start + chunk_size, num_total)
    dist = distance_rows(start, stop)
    row_max[start:stop] = np.maximum(dist.max(axis=1), _TINY)
    neighbors[start:stop] = select_nearest(dist, keep)
    query_stop = min(stop, num_query)
    if start < query_stop:
      result[start:query_stop] = (
        dist[: query_stop - start, num_query:] / row_max[start:query_stop, None]
      )
  return neighbors, row_max


def select_nearest(dist: np.ndarray, keep: int) -> np.ndarray:
  """int32 [rows, keep]: each row's `keep` smallest columns, ascending, ties by index.

  A partition of whole rows is the slowest step of the algorithm, so columns are
  dealt into B groups (column c in group c mod B, so that the group minima are
  one vectorised pass): the `keep` groups with the smallest minima hold all of
  the `keep` nearest (each of those is at most the keep-th group minimum), and
  only their elements, plus the < N/B columns left over, are searched.
  Exact ties at the cut may be resolved differently from a full sort.
  """
  num_rows, num_cols = dist.shape
  group_size = max(1, int(np.sqrt(num_cols / keep)))
  num_groups = num_cols // group_size
  if num_groups <= keep:
    candidates = np.broadcast_to(np.arange(num_cols), dist.shape)
  else:
    covered = num_groups * group_size
    minima = dist[:, :covered].reshape(num_rows, group_size, num_groups).min(axis=1)
    groups = np.argpartition(minima, keep - 1, axis=1)[:, :keep]
    members = (groups[:, :, None] + num_groups * np.arange(group_size)).reshape(num_rows, -1)
    leftover = np.broadcast_to(np.arange(covered, num_cols), (num_rows, num_cols - covered))
    candidates = np.concatenate([members, leftover], axis=1)
  candidate_dist = np.take_along_axis(dist, candidates, axis=1)
  if candidates.shape[1] > keep:
    nearest = np.argpartition(candidate_dist, keep - 1, axis=1)[:, :keep]
    candidates = np.take_along_axis(candidates, nearest, axis=1)
    candidate_dist = np.take_along_axis(candidate_dist, nearest, axis=1)
  order = np.lexsort((candidates, candidate_dist), axis=1)
  return np.take_along_axis(candidates, order, axis=1).astype(np.int32)


def mark_reciprocal(neighbors: np.ndarray, size: int, chunk_size: int) -> np.ndarray:
  """bool [N, size']: whether neighbors[i, a] has i among its own first `size`.

  With size = k + 1 this marks R(i, k) within N(i, k) = neighbors[i, :k + 1].
  """
  heads = neighbors[:, :size]
  marks = np.empty(heads.shape, bool)
  for start in range(0, len(heads), chunk_size):
    stop = min(start + chunk_size, len(heads))
    backward = heads[heads[start:stop]]  # [chunk, size, size]
    marks[start:stop] = np.any(backward == np.arange(start, stop)[:, None, None], axis=2)
  return marks


def expand_reciprocal_sets(
  neighbors: np.ndarray,
  reciprocal: np.ndarray,
  reciprocal_half: np.ndarray,
  half_size: int,
  chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
  """R*(i) for every item, as sorted (row, column) pairs of V's nonzeros.

  Args:
    neighbors: int32 [N, K], K = k1 + 1 nearest items.
    reciprocal: bool [N, K], R(i, k1) within neighbors[i].
    reciprocal_half: bool [N, half_size], R(i, round(k1/2)) within neighbors[i].
    half_size: round(k1/2) + 1.
    chunk_size: items handled at once.

  Returns:
    rows, cols: int64 [nnz], row-major and unique.
  """
  num_total, size = neighbors.shape
  half_size = min(half_size, size)
  all_rows, all_cols = [], []
  for start in range(0, num_total, chunk_size):
    stop = min(start + chunk_size, num_total)
    own = np.where(reciprocal[start:stop], neighbors[start:stop], -1)  # [c, K]; -1 = none
    candidates = neighbors[start:stop]
    their = neighbors[candidates, :half_size]  # [c, K, h]: R(cand, k1/2) members
    their_mask = reciprocal_half[candidates]
    in_own = np.any(their[..., None] == own[:, None, None, :], axis=3) & their_mask
    # Integer form of |R(c) ∩ R(i)| > 2/3 |R(c)|: exact, and the same as the
    # float comparison for any realistic set size.
    accept = (own >= 0) & (3 * in_own.sum(axis=2) > 2 * their_mask.sum(axis=2))
    added = np.where(accept[..., None] & their_mask, their, -1)
    members = np.concatenate([own, added.reshape(len(own), -1)], axis=1)
    members.sort(axis=1)
    # Unique per row: keep the first of each run, drop the -1 padding.
    keep = members >= 0
    keep[:, 1:] &= members[:, 1:] != members[:, :-1]
    all_rows.append(np.nonzero(keep)[0] + start)
    all_cols.append(members[keep])
  return np.concatenate(all_rows).astype(np.int64), np.concatenate(all_cols).astype(np.int64)


def build_weights(
  rows: np.ndarray, cols: np.ndarray, distance_pairs: PairsFn, row_max: np.ndarray, num_total: int
) -> scipy.sparse.csr_matrix:
  """Sparse V [N, N] (float32): Gaussian-kernel weights on R*(i), each row summing to 1."""
  dist = distance_pairs(rows, cols) / row_max[rows]
  # Every row holds itself at distance 0, so exp(-d) sums to at least 1: no underflow.
  kernel = np.exp(-dist.astype(np.float64))
  totals = np.bincount(rows, weights=kernel, minlength=num_total)
  values = (kernel / totals[rows]).astype(np.float32)
  indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_total))])
  return scipy.sparse.csr_matrix((values, cols, indptr), shape=(num_total, num_total))


def expand_query(weights: scipy.sparse.csr_matrix, nearest: np.ndarray) -> scipy.sparse.csr_matrix:
  """Local query expansion: row i becomes the mean of the rows `nearest[i]` [N, k2]."""
  num_total, k2 = nearest.shape
  averaging = scipy.sparse.csr_matrix(
    (
      np.full(nearest.size, 1.0 / k2, np.float32),
      nearest.ravel(),
      np.arange(0, nearest.size + 1, k2),
    ),
    shape=(num_total, num_total),
  )
  expanded = (averaging @ weights).tocsr()
  expanded.sort_indices()
  return expanded


def blend_jaccard(
  weights: scipy.sparse.csr_matrix, num_query: int, lambda_value: float, result: np.ndarray
) -> None:
  """result ← (1 − λ) · jaccard + λ · result, for query rows × gallery columns.

  Σ_k min(V[q, k], V[g, k]) only involves items k where both are nonzero, so
  each query walks its nonzeros k and, through V's columns (the inverted index),
  the gallery items g that share k. Triples (q, k, g) are gathered for blocks of
  queries under a fixed budget, and summed with one bincount per block.
  """
  num_gallery = result.shape[1]
  query_weights = weights[:num_query]
  gallery_columns = weights[num_query:].tocsc()  # column k: gallery items with V[g, k] > 0
  column_sizes = np.diff(gallery_columns.indptr)
  row_ids = np.repeat(np.arange(num_query), np.diff(query_weights.indptr))
  triples_per_query = np.bincount(
    row_ids, weights=column_sizes[query_weights.indices], minlength=num_query
  )
  max_rows = max(1, _TRIPLE_BUDGET // num_gallery)  # also bounds the [block, Ng] sums
  start = 0
  while start < num_query:
    # Grow the block while it stays under budget; always take at least one query.
    cumulative = np.cumsum(triples_per_query[start : start + max_rows])
    stop = start + max(1, int(np.searchsorted(cumulative, _TRIPLE_BUDGET, side='right')))
    low, high = query_weights.indptr[start], query_weights.indptr[stop]
    shared = query_weights.indices[low:high]
    sizes = column_sizes[shared]
    total = int(sizes.sum())
    # Positions in gallery_columns of every (entry, member of its column), flattened.
    offsets = np.repeat(gallery_columns.indptr[shared] - np.cumsum(sizes) + sizes, sizes)
    offsets += np.arange(total)
    minima = np.minimum(
      np.repeat(query_weights.data[low:high], sizes), gallery_columns.data[offsets]
    )
    flat = (
      np.repeat(row_ids[low:high] - start, sizes) * num_gallery + gallery_columns.indices[offsets]
    )
    overlap = np.bincount(flat, weights=minima, minlength=(stop - start) * num_gallery)
    overlap = overlap.reshape(stop - start, num_gallery)
    jaccard = 1.0 - overlap / (2.0 - overlap)
    result[start:stop] = (1.0 - lambda_value) * jaccard + lambda_value * result[start:stop]
    start = stop

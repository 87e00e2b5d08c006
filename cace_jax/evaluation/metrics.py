"""Standard ReID retrieval metrics (CMC, mAP, mINP) and feature distances, in numpy.

`evaluate_rank` follows the Market-1501 protocol used by torchreid and
fast-reid, vectorised over chunks of queries so that MSMT17-sized problems
(11,659 × 82,161) stay within a few hundred MB.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from cace_jax.models import l2_normalize

# Query × gallery elements handled at once: about 300 MB of temporaries.
_CHUNK_ELEMENTS = 8_000_000


def evaluate_rank(
  distmat: np.ndarray,
  q_pids: np.ndarray,
  g_pids: np.ndarray,
  q_camids: np.ndarray,
  g_camids: np.ndarray,
  max_rank: int = 50,
  chunk_size: int | None = None,
) -> dict:
  """CMC, mAP and mINP of a query × gallery distance matrix.

  Protocol (Market-1501, as torchreid and fast-reid):
  - Each query ranks the gallery by ascending distance; ties keep gallery
    order (stable sort).
  - Gallery items with the query's pid AND camera are removed from that
    query's list (same-camera views are too easy); everything else,
    distractors included, is ranked.
  - A query with no true match left is excluded from every average.
  - CMC[r] is the fraction of queries whose first true match is within the
    top r+1. AP is the mean, over the true matches, of the precision at each
    match's rank. INP is (number of true matches) / (rank of the last true
    match): how far down one must read to find them all.
  - If the gallery is smaller than `max_rank`, the CMC is cut to its size.

  Args:
    distmat: [num_query, num_gallery] distances (smaller is closer).
    q_pids, q_camids: [num_query] identities and cameras of the queries.
    g_pids, g_camids: [num_gallery] identities and cameras of the gallery.
    max_rank: length of the CMC curve.
    chunk_size: queries processed at once (bounds memory); by default as many
      as fit in about 8M query × gallery elements.

  Returns:
    {'cmc': float [min(max_rank, num_gallery)], 'mAP': float, 'mINP': float,
     'num_valid_queries': int, 'per_query_ap': float [num_query] (NaN for
     queries left out)}. Metrics are fractions in [0, 1].

  Raises:
    ValueError: shapes disagree, or no query has a true match.
  """
  distmat = np.asarray(distmat)
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
  num_q, num_g = distmat.shape
  if (q_pids.shape, q_camids.shape) != ((num_q,), (num_q,)) or (g_pids.shape, g_camids.shape) != (
    (num_g,),
    (num_g,),
  ):
    raise ValueError(
      f'distmat {distmat.shape} does not match query ids {q_pids.shape}, '
      f'cameras {q_camids.shape} and gallery ids {g_pids.shape}, cameras '
      f'{g_camids.shape}'
    )
  if num_q == 0 or num_g == 0:
    raise ValueError(f'empty query or gallery: distmat {distmat.shape}')
  max_rank = min(max_rank, num_g)
  chunk_size = chunk_size or max(1, _CHUNK_ELEMENTS // max(num_g, 1))
  # Only gallery items sharing the query's pid matter individually (true matches
  # and removed same-camera views); everything else only needs counting, which a
  # sorted row answers by binary search. This avoids a full argsort per query.
  same_pid_index, same_pid_valid = _same_pid_gallery(q_pids, g_pids)

  def evaluate_chunk(start):
    rows = np.asarray(distmat[start : start + chunk_size])
    index = same_pid_index[start : start + len(rows)]
    valid = same_pid_valid[start : start + len(rows)]
    same_cam = g_camids[index] == q_camids[start : start + len(rows), None]
    removed, matches = valid & same_cam, valid & ~same_cam
    position = _stable_positions(rows, index, valid)
    removed_before = np.sum(
      removed[:, None, :] & (position[:, None, :] < position[:, :, None]), axis=2
    )
    kept_rank = np.where(matches, position - removed_before + 1, num_g + 1)
    num_matches = matches.sum(axis=1)
    has_match = num_matches > 0
    ranks = np.sort(kept_rank[has_match], axis=1)  # true-match ranks first, ascending
    num_matches = num_matches[has_match]
    nth = np.arange(ranks.shape[1])[None, :]
    precision = np.where(nth < num_matches[:, None], (nth + 1) / ranks, 0.0)
    last = ranks[np.arange(len(ranks)), num_matches - 1]
    return ranks[:, 0], precision.sum(axis=1) / num_matches, num_matches / last, has_match

  # numpy's sort releases the GIL: chunks run on all cores.
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    results = list(pool.map(evaluate_chunk, range(0, num_q, chunk_size)))
  first_match, average_precision, inverse_negative, has_match = zip(*results)
  per_query_ap = np.full(num_q, np.nan)
  per_query_ap[np.concatenate(has_match)] = np.concatenate(average_precision)
  first_match = np.concatenate(first_match)
  if first_match.size == 0:
    raise ValueError(
      'no query has a true match in the gallery (after removing same-identity same-camera images)'
    )
  cmc = np.mean(first_match[:, None] <= np.arange(1, max_rank + 1)[None, :], axis=0)
  return {
    'cmc': cmc.astype(np.float64),
    'mAP': float(np.mean(np.concatenate(average_precision))),
    'mINP': float(np.mean(np.concatenate(inverse_negative))),
    'num_valid_queries': int(first_match.size),
    'per_query_ap': per_query_ap,
  }


def cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """1 − cosine similarity: [Nq, D] × [Ng, D] → [Nq, Ng] in [0, 2]."""
  query = np.asarray(l2_normalize(np.asarray(query, np.float32)))
  gallery = np.asarray(l2_normalize(np.asarray(gallery, np.float32)))
  return 1.0 - query @ gallery.T


def euclidean_distance(query: np.ndarray, gallery: np.ndarray, squared: bool = False) -> np.ndarray:
  """Euclidean distance [Nq, Ng]; `squared` skips the square root (torchreid's default)."""
  query = np.asarray(query, np.float32)
  gallery = np.asarray(gallery, np.float32)
  squares = (
    np.sum(query**2, axis=1)[:, None]
    + np.sum(gallery**2, axis=1)[None, :]
    - 2.0 * query @ gallery.T
  )
  squares = np.maximum(squares, 0.0)
  return squares if squared else np.sqrt(squares)


def top_ranking(distmat: np.ndarray, top: int, chunk_elements: int = _CHUNK_ELEMENTS) -> np.ndarray:
  """[Nq, top] gallery indices of each row's smallest distances: a stable argsort's first `top`.

  Exact, ties included (the lower index first), without sorting whole rows:
  each row keeps the entries below its top-th smallest value, then the first
  entries equal to it, and sorts only those. Rows go in chunks of about
  `chunk_elements` entries (MSMT17's matrix has ~1e9).
  """
  top = min(top, distmat.shape[1])
  rows = max(1, chunk_elements // distmat.shape[1])
  ranking = np.empty((distmat.shape[0], top), np.int64)
  for start in range(0, distmat.shape[0], rows):
    chunk = np.asarray(distmat[start : start + rows])
    kth = np.partition(chunk, top - 1, axis=1)[:, top - 1 : top]
    below, ties = chunk < kth, chunk == kth
    needed = top - below.sum(axis=1, keepdims=True)
    chosen = below | (ties & (np.cumsum(ties, axis=1) <= needed))
    index = np.nonzero(chosen)[1].reshape(len(chunk), top)  # ascending gallery index
    order = np.argsort(np.take_along_axis(chunk, index, axis=1), axis=1, kind='stable')
    ranking[start : start + len(chunk)] = np.take_along_axis(index, order, axis=1)
  return ranking


def _same_pid_gallery(q_pids: np.ndarray, g_pids: np.ndarray):
  """For each query, the gallery indices sharing its pid, padded.

  Returns:
    index: [num_query, M] int gallery indices in gallery order (0 where padded).
    valid: [num_query, M] bool, False on padding. M is the largest group.
  """
  order = np.argsort(g_pids, kind='stable')
  unique, starts, counts = np.unique(g_pids[order], return_index=True, return_counts=True)
  slot = np.clip(np.searchsorted(unique, q_pids), 0, max(len(unique) - 1, 0))
  found = (unique[slot] == q_pids) if len(unique) else np.zeros(len(q_pids), bool)
  count = np.where(found, counts[slot], 0)
  width = max(int(count.max(initial=0)), 1)
  offsets = np.arange(width)[None, :]
  valid = offsets < count[:, None]
  index = order[np.minimum(starts[slot][:, None] + offsets, len(order) - 1)]
  return np.where(valid, index, 0), valid


def _stable_positions(rows: np.ndarray, index: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """0-based positions of gallery items `index` in each row's stable ascending order.

  Position = (# items strictly closer) + (# items equally close with a smaller
  gallery index), which is what a stable argsort would give.
  """
  values = np.take_along_axis(rows, index, axis=1)
  sorted_rows = np.sort(rows, axis=1)
  position = np.zeros(index.shape, np.int64)
  for q in range(len(rows)):
    left = np.searchsorted(sorted_rows[q], values[q], side='left')
    right = np.searchsorted(sorted_rows[q], values[q], side='right')
    position[q] = left
    for m in np.flatnonzero(valid[q] & (right - left > 1)):  # ties: rare, count exactly
      position[q, m] += np.count_nonzero(rows[q, : index[q, m]] == values[q, m])
  return position

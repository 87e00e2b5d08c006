"""The two-stage ranking: stage 1's distances, each query's top K re-sorted by pair distances.

Stage 1 ranks the gallery by individual embeddings. Stage 2 (Sec. 3.5) takes,
for each query, its K nearest gallery images and re-sorts them by a distance
between the pair's conditional embeddings; the rest of the list keeps its
stage-1 order. How a pair's distance is computed from the model is
`stage2`'s job; this module only orders: it is numpy, and takes the pair
distances as a function of (query index, gallery index).

Stage 2 may be selective: only the queries stage 1 is least sure of, those
whose nearest gallery image is at most `max_similarity` similar
(`least_confident`), are re-sorted; the others keep their stage-1 ranking.
The official maintainers report that conditional embeddings for the few
queries with the lowest top-1 similarity already reach the paper's numbers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cace_jax.evaluation.records import NO_QUERY  # the gate of a fraction of 0

# Re-sorted entries are moved below every stage-1 distance (cosine distances
# lie in [0, 2]) so they stay ahead of the rest of the list.
_TOPK_OFFSET = -10.0


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

"""Stage 2's re-sort: it moves each query's top K only, blends by w, gates queries one by one."""

from __future__ import annotations

import numpy as np
import pytest

from cace_jax.evaluation import records, two_stage


def random_distmat(seed=0, shape=(6, 20)):
  return np.random.default_rng(seed).uniform(0, 2, size=shape).astype(np.float32)


def test_stage2_with_k_zero_is_stage1():
  distmat = random_distmat()
  out = two_stage.TwoStageRanker(distmat, lambda q, g: np.zeros(len(q)), 0).distances(0)
  np.testing.assert_array_equal(out, distmat)


@pytest.mark.parametrize('k', [1, 5, 20])
def test_stage2_only_reorders_within_top_k(k):
  distmat = random_distmat(1)
  rng = np.random.default_rng(2)
  table = rng.uniform(size=distmat.shape).astype(np.float32)
  out = two_stage.TwoStageRanker(distmat, lambda q, g: table[q, g], k).distances(k)
  before = np.argsort(distmat, axis=1, kind='stable')
  after = np.argsort(out, axis=1, kind='stable')
  for row in range(len(distmat)):
    assert set(before[row, :k]) == set(after[row, :k])
    np.testing.assert_array_equal(before[row, k:], after[row, k:])
    # Within the top-k, the order is the pair scores' order.
    scores = table[row, after[row, :k]]
    assert np.all(np.diff(scores) >= 0)


def test_stage2_mix_blends_the_two_distances_within_the_top_k():
  distmat = random_distmat(3)
  table = np.random.default_rng(4).uniform(size=distmat.shape).astype(np.float32)
  pair = lambda q, g: table[q, g]
  k = 6
  top = np.argsort(distmat, axis=1, kind='stable')[:, :k]
  # w = 0 keeps stage 1's order; w = 1 is the pair order; w = 0.5 the mean's.
  for mix, score in [(0.0, distmat), (1.0, table), (0.5, (distmat + table) / 2)]:
    out = two_stage.TwoStageRanker(distmat, pair, k).distances(k, mix)
    after = np.argsort(out, axis=1, kind='stable')[:, :k]
    for row in range(len(distmat)):
      assert set(after[row]) == set(top[row])
      assert np.all(np.diff(score[row, after[row]]) >= 0)
  # The pairs of a smaller K are each query's first pairs of a larger one.
  q5, g5 = two_stage.top_k_pairs(distmat, 5)
  q9, g9 = two_stage.top_k_pairs(distmat, 9)
  np.testing.assert_array_equal(g5.reshape(-1, 5), g9.reshape(-1, 9)[:, :5])
  np.testing.assert_array_equal(q5, np.repeat(np.arange(len(distmat)), 5))


def test_selective_stage2_resorts_only_the_least_confident_queries():
  distmat = random_distmat(5, shape=(10, 20))
  table = np.random.default_rng(6).uniform(size=distmat.shape).astype(np.float32)
  ranker = two_stage.TwoStageRanker(distmat, lambda q, g: table[q, g], 6)
  similarity = two_stage.top1_similarity(distmat)
  np.testing.assert_allclose(similarity, 1.0 - distmat.min(axis=1))
  # A fraction is carried by a gate on top-1 similarity: the least confident first.
  for fraction, count in [(0.0, 0), (0.1, 1), (0.25, 2), (0.5, 5), (1.0, 10)]:
    gate = two_stage.gate_for_fraction(similarity, fraction)
    chosen = two_stage.least_confident(distmat, gate)
    assert chosen.sum() == count
    assert set(np.flatnonzero(chosen)) == set(np.argsort(similarity)[:count])
  assert two_stage.gate_for_fraction(similarity, 1.0) == 1.0
  assert not two_stage.least_confident(distmat, records.NO_QUERY).any()
  # Gated queries get the full stage-2 ranking; the others keep stage 1's, row by row.
  gate = two_stage.least_confident(distmat, two_stage.gate_for_fraction(similarity, 0.5))
  order = lambda d: np.argsort(d, axis=1, kind='stable')
  selective, everyone, none = (
    order(ranker.distances(6, 1.0, queries)) for queries in (gate, None, np.zeros(10, bool))
  )
  np.testing.assert_array_equal(selective[gate], everyone[gate])
  np.testing.assert_array_equal(selective[~gate], order(distmat)[~gate])
  np.testing.assert_array_equal(none, order(distmat))
  # Each query is gated on its own row: the same query alone gets the same answer.
  np.testing.assert_array_equal(
    two_stage.least_confident(distmat[3:4], 0.5), two_stage.least_confident(distmat, 0.5)[3:4]
  )

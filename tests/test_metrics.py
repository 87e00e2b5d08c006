"""Retrieval metrics on hand-computed cases and against a slow reference."""

from __future__ import annotations

import numpy as np
import pytest

from cace_jax.evaluation import metrics


def reference_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
  """One query at a time, the obvious way."""
  cmcs, aps, inps = [], [], []
  for q in range(len(q_pids)):
    order = np.argsort(distmat[q], kind='stable')
    kept = [g for g in order if not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
    hits = [g_pids[g] == q_pids[q] for g in kept]
    if not any(hits):
      continue
    positions = [i + 1 for i, hit in enumerate(hits) if hit]
    aps.append(np.mean([(n + 1) / pos for n, pos in enumerate(positions)]))
    inps.append(len(positions) / positions[-1])
    cmcs.append([1.0 if positions[0] <= r else 0.0 for r in range(1, max_rank + 1)])
  return np.mean(cmcs, axis=0), np.mean(aps), np.mean(inps)


def test_same_pid_same_camera_is_removed():
  # Gallery: [pid1 cam1 (same camera: removed), pid2 cam2, pid1 cam2].
  distmat = np.array([[0.1, 0.2, 0.3]])
  result = metrics.evaluate_rank(
    distmat, np.array([1]), np.array([1, 2, 1]), np.array([1]), np.array([1, 2, 2]), max_rank=2
  )
  # Ranked after removal: pid2 (wrong), pid1 (right at rank 2).
  np.testing.assert_allclose(result['cmc'], [0.0, 1.0])
  assert result['mAP'] == pytest.approx(0.5)
  assert result['mINP'] == pytest.approx(0.5)


def test_query_without_valid_match_is_left_out():
  distmat = np.array([[0.1, 0.2], [0.3, 0.1]])
  # Query 0 (pid 1, cam 1) only matches a same-camera image: left out.
  result = metrics.evaluate_rank(
    distmat, np.array([1, 2]), np.array([1, 2]), np.array([1, 1]), np.array([1, 2]), max_rank=2
  )
  assert result['num_valid_queries'] == 1
  assert np.isnan(result['per_query_ap'][0]) and result['per_query_ap'][1] == 1.0
  np.testing.assert_allclose(result['cmc'], [1.0, 1.0])
  assert result['mAP'] == 1.0
  with pytest.raises(ValueError, match='no query has a true match'):
    metrics.evaluate_rank(
      distmat[:1], np.array([1]), np.array([1, 2]), np.array([1]), np.array([1, 2])
    )


def test_ties_keep_gallery_order():
  distmat = np.array([[0.5, 0.5, 0.5]])
  result = metrics.evaluate_rank(
    distmat, np.array([7]), np.array([3, 7, 7]), np.array([1]), np.array([2, 2, 3]), max_rank=3
  )
  # Order stays [wrong, right, right]: AP = (1/2 + 2/3) / 2, INP = 2/3.
  assert result['mAP'] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert result['mINP'] == pytest.approx(2 / 3)
  np.testing.assert_allclose(result['cmc'], [0, 1, 1])


def test_max_rank_larger_than_gallery_cuts_cmc():
  distmat = np.array([[0.2, 0.1]])
  result = metrics.evaluate_rank(
    distmat, np.array([1]), np.array([1, 2]), np.array([1]), np.array([2, 2]), max_rank=50
  )
  assert result['cmc'].shape == (2,)
  np.testing.assert_allclose(result['cmc'], [0.0, 1.0])


def test_minp_uses_hardest_match():
  # Matches at ranks 1 and 4 → INP 2/4, AP (1/1 + 2/4)/2.
  distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
  result = metrics.evaluate_rank(
    distmat,
    np.array([5]),
    np.array([5, 1, 2, 5]),
    np.array([1]),
    np.array([2, 2, 2, 3]),
    max_rank=4,
  )
  assert result['mINP'] == pytest.approx(0.5)
  assert result['mAP'] == pytest.approx(0.75)


@pytest.mark.parametrize('chunk_size', [None, 7])
def test_matches_slow_reference_on_random_data(chunk_size):
  rng = np.random.default_rng(0)
  num_q, num_g = 40, 120
  q_pids, g_pids = rng.integers(0, 15, num_q), rng.integers(0, 15, num_g)
  q_cams, g_cams = rng.integers(1, 4, num_q), rng.integers(1, 4, num_g)
  # Quantised distances create ties on purpose.
  distmat = np.round(rng.uniform(size=(num_q, num_g)), 2)
  result = metrics.evaluate_rank(
    distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk_size=chunk_size
  )
  cmc, mean_ap, minp = reference_rank(distmat, q_pids, g_pids, q_cams, g_cams, 20)
  np.testing.assert_allclose(result['cmc'], cmc, atol=1e-12)
  assert result['mAP'] == pytest.approx(mean_ap, abs=1e-6)
  assert result['mINP'] == pytest.approx(minp, abs=1e-6)


def test_shape_mismatch_is_reported():
  with pytest.raises(ValueError, match='does not match'):
    metrics.evaluate_rank(np.zeros((2, 3)), np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(3))


def test_distances():
  rng = np.random.default_rng(1)
  q, g = rng.normal(size=(5, 8)), rng.normal(size=(6, 8))
  expected = np.linalg.norm(q[:, None] - g[None], axis=-1)
  np.testing.assert_allclose(metrics.euclidean_distance(q, g), expected, rtol=1e-4)
  np.testing.assert_allclose(metrics.euclidean_distance(q, g, squared=True), expected**2, rtol=1e-4)
  cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
    g / np.linalg.norm(g, axis=1, keepdims=True)
  ).T
  np.testing.assert_allclose(metrics.cosine_distance(q, g), 1 - cos, atol=1e-6)


def test_top_ranking_is_the_stable_argsort():
  rng = np.random.default_rng(0)
  distmat = rng.integers(0, 5, size=(7, 40)).astype(np.float32)  # many ties
  expected = np.argsort(distmat, axis=1, kind='stable')[:, :12]
  np.testing.assert_array_equal(metrics.top_ranking(distmat, 12), expected)
  np.testing.assert_array_equal(metrics.top_ranking(distmat, 12, chunk_elements=50), expected)
  np.testing.assert_array_equal(
    metrics.top_ranking(distmat[:, :5], 12), np.argsort(distmat[:, :5], axis=1, kind='stable')
  )

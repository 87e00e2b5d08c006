"""k-reciprocal re-ranking against a loop-by-loop reading of the paper, and its variants."""

from __future__ import annotations

import numpy as np
import pytest

from cace_jax.evaluation import k_reciprocal, metrics
from cace_jax.models import l2_normalize


def reference_rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value):
  """Zhong et al. 2017, Sec. 3-4, with sets and loops (slow; small inputs only)."""
  dist = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float64)
  dist = dist / dist.max(axis=1, keepdims=True)
  num_query, num_total = len(q_q_dist), len(dist)
  rank = np.argsort(dist, axis=1, kind='stable')

  def nearest(i, k):  # N(i, k): the k + 1 closest, i itself included.
    return set(rank[i, : k + 1].tolist())

  def reciprocal(i, k):  # R(i, k), Eq. 4.
    return {j for j in nearest(i, k) if i in nearest(j, k)}

  half = int(np.around(k1 / 2))
  weights = np.zeros((num_total, num_total))
  for i in range(num_total):
    own = reciprocal(i, k1)
    expanded = set(own)
    for candidate in own:  # Eq. 6.
      theirs = reciprocal(candidate, half)
      if len(theirs & own) > 2 / 3 * len(theirs):
        expanded |= theirs
    members = sorted(expanded)
    kernel = np.exp(-dist[i, members])  # Eq. 7.
    weights[i, members] = kernel / kernel.sum()
  if k2 > 1:  # Eq. 12.
    weights = np.stack([weights[rank[i, :k2]].mean(axis=0) for i in range(num_total)])
  jaccard = np.zeros((num_query, num_total))
  for i in range(num_query):  # Eq. 10-11.
    for j in range(num_total):
      jaccard[i, j] = 1 - (
        np.minimum(weights[i], weights[j]).sum() / np.maximum(weights[i], weights[j]).sum()
      )
  final = (1 - lambda_value) * jaccard + lambda_value * dist[:num_query]  # Eq. 13.
  return final[:, num_query:]


def random_problem(seed, num_query=30, num_gallery=80, dim=16, num_ids=12):
  """Clustered features (so reciprocal sets are not trivial) and their distance blocks."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_ids, dim))
  query = centers[rng.integers(num_ids, size=num_query)] + 0.6 * rng.normal(size=(num_query, dim))
  gallery = centers[rng.integers(num_ids, size=num_gallery)] + 0.6 * rng.normal(
    size=(num_gallery, dim)
  )
  return query.astype(np.float32), gallery.astype(np.float32)


def distance_blocks(query, gallery, metric='sqeuclidean'):
  """q_g, q_q, g_g in float64, symmetric with an exactly zero diagonal."""
  query, gallery = query.astype(np.float64), gallery.astype(np.float64)
  if metric == 'cosine':
    query, gallery = np.asarray(l2_normalize(query)), np.asarray(l2_normalize(gallery))
    dist = lambda a, b: 1.0 - a @ b.T
  else:
    dist = lambda a, b: np.sum((a[:, None] - b[None]) ** 2, axis=2)
  q_q, g_g = dist(query, query), dist(gallery, gallery)
  np.fill_diagonal(q_q, 0.0)
  np.fill_diagonal(g_g, 0.0)
  return dist(query, gallery), (q_q + q_q.T) / 2, (g_g + g_g.T) / 2


@pytest.mark.parametrize(
  'k1, k2, lambda_value', [(5, 3, 0.3), (6, 1, 0.3), (4, 5, 0.0), (1, 2, 0.5)]
)
def test_dense_matches_reference(k1, k2, lambda_value):
  q_g, q_q, g_g = distance_blocks(*random_problem(0, num_query=12, num_gallery=40))
  result = k_reciprocal.rerank_distances(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
  assert result.shape == (12, 40) and result.dtype == np.float32
  expected = reference_rerank(q_g, q_q, g_g, k1, k2, lambda_value)
  np.testing.assert_allclose(result, expected, atol=1e-5)


@pytest.mark.parametrize('num_cols, keep', [(7, 3), (7, 7), (50, 1), (1003, 21), (4000, 11)])
def test_select_nearest_matches_a_full_sort(num_cols, keep):
  dist = np.random.default_rng(num_cols).random((9, num_cols), dtype=np.float32)
  dist[:, 1] -= 1.0
  dist[:, 0] = dist[:, 1]  # A tie inside the selection is broken by index.
  expected = np.argsort(dist, axis=1, kind='stable')[:, :keep]
  np.testing.assert_array_equal(k_reciprocal.select_nearest(dist, keep), expected)


def test_small_chunks_change_nothing():
  q_g, q_q, g_g = distance_blocks(*random_problem(1))
  whole = k_reciprocal.rerank_distances(q_g, q_q, g_g, k1=5, k2=3)
  chunked = k_reciprocal.rerank_distances(q_g, q_q, g_g, k1=5, k2=3, chunk_size=7)
  np.testing.assert_allclose(chunked, whole, atol=1e-6)


@pytest.mark.parametrize('metric', ['sqeuclidean', 'cosine'])
def test_features_variant_matches_dense(metric):
  query, gallery = random_problem(2)
  q_g, q_q, g_g = distance_blocks(query, gallery, metric)
  dense = k_reciprocal.rerank_distances(q_g, q_q, g_g, k1=5, k2=3, lambda_value=0.3)
  bounded = k_reciprocal.rerank_features(
    query, gallery, k1=5, k2=3, lambda_value=0.3, metric=metric, chunk_size=16
  )
  assert bounded.shape == (30, 80)
  np.testing.assert_allclose(bounded, dense, atol=1e-5)


def test_euclidean_metric_is_the_square_root():
  query, gallery = random_problem(3)
  q_g, q_q, g_g = distance_blocks(query, gallery)
  dense = k_reciprocal.rerank_distances(np.sqrt(q_g), np.sqrt(q_q), np.sqrt(g_g), k1=5, k2=3)
  bounded = k_reciprocal.rerank_features(query, gallery, k1=5, k2=3, metric='euclidean')
  np.testing.assert_allclose(bounded, dense, atol=1e-5)


def test_given_query_gallery_distances_replace_the_feature_ones():
  query, gallery = random_problem(4)
  _, q_q, g_g = distance_blocks(query, gallery)
  # Distances from "another scorer": the feature ones, perturbed and rescaled.
  other = distance_blocks(query, gallery)[0] * 1.3 + np.random.default_rng(4).uniform(
    0, 2, size=(30, 80)
  )
  dense = k_reciprocal.rerank_distances(other, q_q, g_g, k1=5, k2=3)
  bounded = k_reciprocal.rerank_features(
    query, gallery, k1=5, k2=3, metric='sqeuclidean', q_g_dist=other
  )
  np.testing.assert_allclose(bounded, dense, atol=1e-5)
  plain = k_reciprocal.rerank_features(query, gallery, k1=5, k2=3, metric='sqeuclidean')
  assert np.abs(plain - bounded).max() > 1e-2


def test_lambda_one_gives_the_normalised_original():
  q_g, q_q, g_g = distance_blocks(*random_problem(5))
  result = k_reciprocal.rerank_distances(q_g, q_q, g_g, k1=5, k2=3, lambda_value=1.0)
  row_max = np.maximum(q_g.max(axis=1), q_q.max(axis=1))
  np.testing.assert_allclose(result, q_g / row_max[:, None], rtol=1e-6)


def test_k2_one_skips_query_expansion():
  q_g, q_q, g_g = distance_blocks(*random_problem(6))
  result = k_reciprocal.rerank_distances(q_g, q_q, g_g, k1=5, k2=1, lambda_value=0.0)
  assert np.all(np.isfinite(result)) and result.min() >= 0.0 and result.max() <= 1.0
  # Without expansion a query's Jaccard distance is 1 outside R*'s reach: many exact ones.
  assert np.mean(result == 1.0) > 0.5
  np.testing.assert_allclose(result, reference_rerank(q_g, q_q, g_g, 5, 1, 0.0), atol=1e-5)


@pytest.mark.parametrize('k2', [1, 3])
def test_rerank_fixes_a_lone_impostor(k2):
  # 1-D positions. Identity A: the query at 0 and a tight gallery group around 1.1.
  # The impostor sits at -1.0, nearer to the query than any A image, but its own
  # neighbours are its identity B group around -1.7, so it is not reciprocal.
  # (k2 = 2 would average the query's V with its nearest item, the impostor.)
  query = np.array([[0.0]], np.float32)
  gallery = np.array(
    [
      [1.05],
      [1.1],
      [1.15],
      [1.2],  # A: true matches
      [-1.0],  # B: the impostor
      [-1.6],
      [-1.65],
      [-1.7],
      [-1.75],
      [-1.8],
    ],
    np.float32,
  )  # B
  truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
  raw = metrics.euclidean_distance(query, gallery)
  assert np.argmin(raw[0]) == 4  # The impostor is ranked first by raw distance.
  q_g, q_q, g_g = distance_blocks(query, gallery)
  result = k_reciprocal.rerank_distances(
    np.sqrt(q_g), np.sqrt(q_q), np.sqrt(g_g), k1=4, k2=k2, lambda_value=0.3
  )
  order = np.argsort(result[0], kind='stable')
  assert truth[order[0]]
  raw_ap = metrics.evaluate_rank(
    raw, np.array([1]), np.where(truth, 1, 2), np.array([0]), np.ones(10, int), max_rank=10
  )['mAP']
  new_ap = metrics.evaluate_rank(
    result, np.array([1]), np.where(truth, 1, 2), np.array([0]), np.ones(10, int), max_rank=10
  )['mAP']
  assert new_ap > raw_ap and new_ap == pytest.approx(1.0)


def test_bad_arguments_are_rejected():
  query, gallery = random_problem(7, num_query=3, num_gallery=5)
  with pytest.raises(ValueError, match='k2'):
    k_reciprocal.rerank_features(query, gallery, k1=2, k2=4)
  with pytest.raises(ValueError, match='metric'):
    k_reciprocal.rerank_features(query, gallery, metric='manhattan')
  with pytest.raises(ValueError, match='fit together'):
    k_reciprocal.rerank_distances(np.zeros((3, 5)), np.zeros((3, 3)), np.zeros((4, 4)))
  with pytest.raises(ValueError, match='q_g_dist'):
    k_reciprocal.rerank_features(query, gallery, q_g_dist=np.zeros((5, 3)))

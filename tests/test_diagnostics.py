"""Pair-stage diagnostics on hand-made cases whose answers are known."""

import numpy as np
import pytest

from cace_jax.data import catalog
from cace_jax.data.synthetic_details import generator
from cace_jax.evaluation import diagnostics


def test_roc_auc_known_values():
  assert diagnostics.roc_auc([0.1, 0.2], [0.5, 0.6, 0.7]) == 1.0
  assert diagnostics.roc_auc([0.9], [0.5, 0.6]) == 0.0
  assert diagnostics.roc_auc([0.5], [0.5]) == 0.5  # a tie counts half
  # 0.3 beats 2 of 3 negatives, ties none; 0.55 beats 1, ties 1: (2 + 1.5) / 6.
  assert diagnostics.roc_auc([0.3, 0.55], [0.2, 0.55, 0.6]) == pytest.approx(1.5 / 6 + 2 / 6)
  assert np.isnan(diagnostics.roc_auc([], [0.1]))


def test_family_restriction_removes_the_other_families_impostors():
  # Query 0 (pid 1, family 0). Gallery: pid 5 of family 1 ranks first, then the
  # true match, then pid 2 of family 0. Within the family the match is first.
  distmat = np.array([[0.1, 0.2, 0.3]])
  args = dict(
    query_pids=np.array([1]),
    gallery_pids=np.array([5, 1, 2]),
    query_camids=np.array([1]),
    gallery_camids=np.array([2, 2, 2]),
  )
  fam_q, fam_g = np.array([0]), np.array([1, 0, 0])
  result = diagnostics.family_retrieval(
    distmat, **args, query_families=fam_q, gallery_families=fam_g
  )
  assert result == {'mAP': 100.0, 'rank1': 100.0}
  # Without the restriction the impostor of the other family wins.
  whole = diagnostics.family_retrieval(
    distmat, **args, query_families=fam_q, gallery_families=np.zeros(3, int)
  )
  assert whole == {'mAP': 50.0, 'rank1': 0.0}
  # Distractors (family -1) never count as family members.
  pushed = diagnostics.restrict_to_families(distmat, fam_q, np.array([-1, 0, 0]))
  assert pushed[0, 0] > pushed[0, 2]
  # Far-negative entries (stage 2's re-sorted ones) are pushed behind the family too.
  shifted = np.array([[-10.0 + 0.1, 1.9, -10.0 + 0.3]])
  pushed = diagnostics.restrict_to_families(shifted, fam_q, fam_g)
  assert pushed[0, 0] > max(pushed[0, 1], pushed[0, 2])


def test_hard_pairs_are_same_family_and_skip_the_same_view():
  pairs, is_match = diagnostics.hard_pairs(
    query_pids=np.array([1, 3]),
    gallery_pids=np.array([1, 1, 2, 3, 0]),
    query_camids=np.array([1, 1]),
    gallery_camids=np.array([1, 2, 2, 2, 2]),
    query_families=np.array([0, 1]),
    gallery_families=np.array([0, 0, 0, 1, -1]),
  )
  # Query 0: gallery 0 is its own camera (left out), 1 a match, 2 a family impostor.
  assert pairs.tolist() == [[0, 1], [0, 2], [1, 3]]
  assert is_match.tolist() == [True, False, True]


def test_alignment_selectivity_uniform_one_hot_and_empty_rows():
  n = 4
  assert diagnostics.alignment_selectivity(np.ones((2, n, n))) == pytest.approx(1.0)
  assert diagnostics.alignment_selectivity(np.eye(n)[None] * 7.0) == pytest.approx(1 / n)
  half = np.zeros((n, n))
  half[:, :2] = 3.0  # each pixel split evenly over two partners
  with_empty = np.concatenate([half, np.zeros((1, n))])[None]  # an edgeless row is skipped
  assert diagnostics.alignment_selectivity(with_empty[:, :, :n]) == pytest.approx(2 / n)
  assert np.isnan(diagnostics.alignment_selectivity(np.zeros((1, n, n))))


def test_conditioning_strength_is_zero_for_an_offset_that_ignores_the_gallery():
  rng = np.random.default_rng(0)
  individual = rng.normal(size=(3, 8))
  offset = rng.normal(size=(3, 1, 8))
  constant = individual[:, None] + offset + np.zeros((3, 5, 8))
  assert diagnostics.conditioning_strength(constant, individual) == pytest.approx(0.0, abs=1e-12)
  # Two conditionals, e1 and e2 around f(q) = e0: spread 1/sqrt(2), offset sqrt(2).
  eye = np.eye(3)
  value = diagnostics.conditioning_strength(eye[None, 1:], eye[None, 0])
  assert value == pytest.approx((1 / np.sqrt(2)) / np.sqrt(2))
  assert np.isnan(diagnostics.conditioning_strength(eye[None, :1].repeat(2, 1), eye[None, 0]))


def test_synthetic_families_follow_the_generator_layout():
  config = generator.PRESETS['tiny']  # 3 identities per family
  families = generator.identity_families(np.array([1, 3, 4, 9, 0, -1]), config)
  assert families.tolist() == [0, 0, 1, 2, -1, -1]
  np.testing.assert_array_equal(
    catalog.dataset_families('synthetic_details/tiny', np.array([4])), [1]
  )
  assert catalog.dataset_families('market1501', np.array([4])) is None


def test_probed_matches_take_every_querys_first_match_before_any_second():
  from cace_jax.data.pipeline import SplitData  # pylint: disable=import-outside-toplevel
  from cace_jax.evaluation import diagnose  # pylint: disable=import-outside-toplevel

  def split(pids, camids):
    n = len(pids)
    return SplitData(
      images=np.empty(n, object),
      labels=np.full(n, -1, np.int32),
      pids=np.asarray(pids),
      camids=np.asarray(camids),
      file_names=np.empty(n, object),
    )

  query = split([1, 2, 3], [1, 1, 1])
  # Query 0 has matches at 0 and 2 (gallery 1 is its own camera); query 1 none; query 2 at 3.
  gallery = split([1, 1, 1, 3, 0], [2, 1, 3, 2, 2])
  pairs = diagnose.true_match_pairs(query, gallery, limit=10)
  assert pairs.tolist() == [[0, 0], [2, 3], [0, 2]]
  assert diagnose.true_match_pairs(query, gallery, limit=1).tolist() == [[0, 0]]
  assert diagnose.true_match_pairs(query, split([5], [2]), limit=4).shape == (0, 2)


def test_cross_share_is_the_fraction_of_each_pixels_degree_across_images():
  n = 4
  intra, cross = np.ones((1, n, n)), np.ones((1, n, n))
  assert diagnostics.cross_share(intra, cross) == pytest.approx(0.5)
  assert diagnostics.cross_share(intra * 3.0, cross) == pytest.approx(0.25)
  assert diagnostics.cross_share(np.zeros((1, n, n)), cross) == pytest.approx(1.0)
  # A pixel with no edge at all is left out, not counted as 0.
  intra, cross = np.zeros((1, 2, 2)), np.array([[[1.0, 0.0], [0.0, 0.0]]])
  assert diagnostics.cross_share(intra, cross) == pytest.approx(1.0)
  assert np.isnan(diagnostics.cross_share(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))))

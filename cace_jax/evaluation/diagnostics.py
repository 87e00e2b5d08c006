"""Does the pair stage do its job? Measures of alignment and conditioning, from numbers only.

Each function takes arrays that the evaluation already has (distances,
identities, families, adjacency blocks, embeddings) and returns plain floats;
`diagnose.run_diagnostics` gathers the arrays from a model. The questions:

  family-restricted retrieval  Each query ranks only its own family's gallery
      images, so only details separate the candidates (synthetic data, whose
      identities come in families that share clothing colours). CACE-Net is
      meant to win here.
  hard-pair separability  ROC-AUC of a distance over true-match pairs against
      same-family, different-identity pairs: the probability that a random
      true match is closer than a random family impostor (0.5 = chance).
  alignment selectivity  exp(entropy) of each row of the cross-image block
      A_uv, normalised to sum 1, as a fraction of the n pixels it could link
      to: the effective number of partners per pixel. 1.0 is a uniform
      (unaligned) row, 1/n a single partner.
  cross-image share  The fraction of each pixel's degree that goes to the
      other image: A_uv's row sum over (A_uu's + A_uv's). The GCN's
      discrepancy compares a pixel with the mean of its neighbours, so with a
      share near 0 it compares the image with itself and f(u|v) cannot
      depend much on v.
  conditioning strength  For one query q and its top-K gallery images g, the
      spread of f(q|g) around its mean over g, relative to how far f(q|g) is
      from f(q). 0 means f(q|g) = f(q) + an offset that ignores g: the
      conditional embedding does not look at the other image.
"""

from __future__ import annotations

import numpy as np

from cace_jax.evaluation import metrics


def same_family(query_families: np.ndarray, gallery_families: np.ndarray) -> np.ndarray:
  """[Nq, Ng] bool: the gallery image is of the query's family (family < 0: of none)."""
  return (query_families[:, None] == gallery_families[None, :]) & (gallery_families[None, :] >= 0)


def flatten(found: dict, sep: str = '/') -> dict:
  """Nested diagnostics as one level: {'family_retrieval/cacenet/mAP': value, ...}."""
  flat = {}
  for name, value in found.items():
    if not isinstance(value, dict):
      flat[name] = value
      continue
    for row, entry in value.items():
      for metric, number in entry.items() if isinstance(entry, dict) else [('', entry)]:
        flat[sep.join(p for p in (name, row, metric) if p)] = number
  return flat


def restrict_to_families(
  distmat: np.ndarray, query_families: np.ndarray, gallery_families: np.ndarray
) -> np.ndarray:
  """distmat with every other-family gallery entry pushed behind all same-family ones.

  Entries of another family (and gallery images of no family, family < 0)
  get a distance above every real one, whatever the real ones' sign (stage
  2's re-sorted entries lie far below zero). They are never true matches, so
  they then change no metric of `metrics.evaluate_rank`: ranking the pushed
  matrix equals ranking each query's own family alone.
  """
  distmat = np.asarray(distmat, np.float64)
  beyond = distmat.max() - distmat.min() + 1.0  # + the smallest entry exceeds the largest
  return np.where(same_family(query_families, gallery_families), distmat, beyond + distmat)


def roc_auc(positive_distances: np.ndarray, negative_distances: np.ndarray) -> float:
  """P(a positive pair is closer than a negative one), ties counting 1/2 (Mann-Whitney U).

  Returns NaN when either set is empty.
  """
  positive = np.asarray(positive_distances, np.float64).ravel()
  negative = np.asarray(negative_distances, np.float64).ravel()
  if not len(positive) or not len(negative):
    return float('nan')
  negative = np.sort(negative)
  farther = len(negative) - np.searchsorted(negative, positive, side='right')
  tied = np.searchsorted(negative, positive, side='right') - np.searchsorted(negative, positive)
  return float((farther + 0.5 * tied).sum() / (len(positive) * len(negative)))


def hard_pairs(
  query_pids: np.ndarray,
  gallery_pids: np.ndarray,
  query_camids: np.ndarray,
  gallery_camids: np.ndarray,
  query_families: np.ndarray,
  gallery_families: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """(query index, gallery index) of every same-family pair, and whether it is a true match.

  As in retrieval, a gallery image of the query's identity and camera is left
  out; gallery images of no family (family < 0) are never paired.

  Returns:
    (pairs [M, 2] int, is_match [M] bool).
  """
  same_pid = query_pids[:, None] == gallery_pids[None, :]
  same_view = same_pid & (query_camids[:, None] == gallery_camids[None, :])
  query_index, gallery_index = np.nonzero(
    same_family(query_families, gallery_families) & ~same_view
  )
  return np.stack([query_index, gallery_index], 1), same_pid[query_index, gallery_index]


def family_retrieval(
  distmat: np.ndarray,
  query_pids: np.ndarray,
  gallery_pids: np.ndarray,
  query_camids: np.ndarray,
  gallery_camids: np.ndarray,
  query_families: np.ndarray,
  gallery_families: np.ndarray,
) -> dict:
  """{'mAP', 'rank1'} in percent of retrieval within each query's family."""
  result = metrics.evaluate_rank(
    restrict_to_families(distmat, query_families, gallery_families),
    query_pids,
    gallery_pids,
    query_camids,
    gallery_camids,
  )
  return {'mAP': 100.0 * result['mAP'], 'rank1': 100.0 * float(result['cmc'][0])}


def alignment_selectivity(cross_blocks: np.ndarray) -> float:
  """Mean over rows of exp(entropy(row / row sum)) / n for cross blocks [..., n, n].

  Rows without any edge (sum 0) have no distribution and are left out;
  returns NaN if no row has one.
  """
  blocks = np.asarray(cross_blocks, np.float64)
  rows = blocks.reshape(-1, blocks.shape[-1])
  total = rows.sum(-1)
  rows, total = rows[total > 0], total[total > 0]
  if not len(rows):
    return float('nan')
  p = rows / total[:, None]
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return float(np.mean(np.exp(entropy)) / blocks.shape[-1])


def cross_share(intra_blocks: np.ndarray, cross_blocks: np.ndarray) -> float:
  """Mean over pixels of cross degree / (intra + cross degree), blocks [..., n, n].

  Pixels without any edge are left out; NaN if none has one.
  """
  intra = np.asarray(intra_blocks, np.float64).sum(-1).ravel()
  cross = np.asarray(cross_blocks, np.float64).sum(-1).ravel()
  total = intra + cross
  if not np.any(total > 0):
    return float('nan')
  return float(np.mean(cross[total > 0] / total[total > 0]))


def conditioning_strength(conditional: np.ndarray, individual: np.ndarray) -> float:
  """Mean over queries of spread_g f(q|g) / mean_g ||f(q|g) - f(q)||, on unit vectors.

  Args:
    conditional: [Q, K, E] f(q|g) for each query's K gallery images.
    individual: [Q, E] f(q).

  The spread is the mean distance of the f(q|g) to their mean over g. Both
  are L2-normalised first (retrieval compares directions). Queries whose
  conditional embeddings all equal f(q) are left out; NaN if all are.
  """
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  conditional = unit(np.asarray(conditional, np.float64))
  individual = unit(np.asarray(individual, np.float64))
  spread = np.linalg.norm(conditional - conditional.mean(1, keepdims=True), axis=-1).mean(1)
  offset = np.linalg.norm(conditional - individual[:, None], axis=-1).mean(1)
  keep = offset > 1e-9
  if not keep.any():
    return float('nan')
  return float(np.mean(spread[keep] / offset[keep]))

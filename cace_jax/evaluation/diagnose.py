"""The pair-stage diagnostics of one evaluation: the arrays gathered from a model, then measured.

`diagnostics` measures from numbers only; this module gets those numbers:
distances of the rows `ranking.evaluate` scored, the splits' identity
families (`SplitData.families`), and the adjacency blocks and embeddings of
chosen pairs, computed by the pair stage from the stage-2 caches.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections
import numpy as np

from cace_jax.data import split_data
from cace_jax.evaluation import diagnostics, metrics, stage2
from cace_jax.models import CACENet

PROBED_MATCHES = 512  # true-match pairs whose adjacency `probe_pair_stage` reads


class Probe(NamedTuple):
  """What the pair stage is run on to look inside it: the variables and both splits' caches.

  variables: the model's variables.
  query_cache, gallery_cache: the host caches of `stage1.SplitFeatures`.
  gallery_held: [Ng] bool, the gallery rows this process holds
    (`stage1.SplitFeatures.held`); None when it holds every row.
  """

  variables: dict
  query_cache: dict
  gallery_cache: dict
  gallery_held: np.ndarray | None


def run_diagnostics(
  model: CACENet,
  query: split_data.SplitData,
  gallery: split_data.SplitData,
  config: ml_collections.ConfigDict,
  distmat: np.ndarray,
  conditional: stage2.PairDistances | None,
  probe: Probe | None,
) -> dict:
  """The pair-stage diagnostics of `diagnostics`, for one evaluation.

  Args:
    model, query, gallery, config: as `ranking.evaluate`'s.
    distmat: [Nq, Ng] stage-1 (individual) cosine distances.
    conditional: the pair distances of the conditional embeddings; None
      without a pair stage.
    probe: what to run the pair stage on; None without a pair stage.

  Returns:
    {'family_retrieval': {'individual'[, 'cacenet']: {'mAP', 'rank1'}},
     'hard_pair_auc': {'individual'[, 'cacenet']: AUC}} where the splits
    carry identity families (`SplitData.families`), and with a pair stage
    those of `probe_pair_stage`.
  """
  found = {}
  if query.families is not None and gallery.families is not None:
    found.update(compare_within_families(query, gallery, distmat, conditional))
  if probe is not None:
    found.update(probe_pair_stage(model, query, gallery, distmat, config.eval.stage2_k, probe))
  return found


def compare_within_families(
  query: split_data.SplitData,
  gallery: split_data.SplitData,
  distmat: np.ndarray,
  conditional: stage2.PairDistances | None,
) -> dict:
  """Retrieval within each query's family, and match vs family-impostor AUC, per row.

  Only same-family pairs are scored by the pair stage: the rest of each
  row keeps its stage-1 distance, which `diagnostics.restrict_to_families`
  pushes behind every family member anyway.
  """
  ids = (query.pids, gallery.pids, query.camids, gallery.camids)
  families = (query.families, gallery.families)
  pairs, is_match = diagnostics.hard_pairs(*ids, *families)
  scored = {'individual': distmat[pairs[:, 0], pairs[:, 1]]}
  if conditional is not None:
    scored['cacenet'] = conditional(pairs[:, 0], pairs[:, 1])
  found = {'family_retrieval': {}, 'hard_pair_auc': {}}
  for row, distances in scored.items():
    row_matrix = np.array(distmat, np.float64)
    row_matrix[pairs[:, 0], pairs[:, 1]] = distances
    found['family_retrieval'][row] = diagnostics.family_retrieval(row_matrix, *ids, *families)
    found['hard_pair_auc'][row] = diagnostics.roc_auc(distances[is_match], distances[~is_match])
  return found


def probe_pair_stage(
  model: CACENet,
  query: split_data.SplitData,
  gallery: split_data.SplitData,
  distmat: np.ndarray,
  stage2_k: int,
  probe: Probe,
) -> dict:
  """What the pair stage does with the pairs it is given.

  Returns:
    'alignment_selectivity' and 'cross_share' (on up to PROBED_MATCHES
    true-match pairs, one per query first; absent without any), and
    'conditioning_strength' (over each query's top `stage2_k`, at least 2,
    stage-1 neighbours).
  """
  found = {}
  caches = (probe.variables, probe.query_cache, probe.gallery_cache, probe.gallery_held)
  matches = true_match_pairs(query, gallery, PROBED_MATCHES)
  if len(matches):
    blocks = stage2.pair_probe(model, *caches, ('cross', 'intra'))(*matches.T)
    found['alignment_selectivity'] = diagnostics.alignment_selectivity(blocks['cross'])
    found['cross_share'] = diagnostics.cross_share(blocks['intra'], blocks['cross'])
  top = metrics.top_ranking(distmat, max(2, stage2_k))  # [Nq, k]
  probed = stage2.pair_probe(model, *caches, ('conditional', 'individual'))(
    np.repeat(np.arange(len(top)), top.shape[1]), top.ravel()
  )
  found['conditioning_strength'] = diagnostics.conditioning_strength(
    probed['conditional'].reshape(*top.shape, -1), probed['individual'][:: top.shape[1]]
  )
  return found


def true_match_pairs(
  query: split_data.SplitData, gallery: split_data.SplitData, limit: int
) -> np.ndarray:
  """Up to `limit` (query, gallery) index pairs of one identity in different cameras, [M, 2].

  Every query's first match comes before any query's second, so the pairs
  spread over as many queries as possible; only the queries needed are
  searched (no query x gallery matrix, which MSMT17 makes 1e9 entries).
  """
  hits = []  # (query index, its matches in gallery order)
  for q in range(len(query)):
    found = np.flatnonzero((gallery.pids == query.pids[q]) & (gallery.camids != query.camids[q]))
    if len(found):
      hits.append((q, found))
    if len(hits) == limit:
      break
  pairs = []
  for nth in range(max((len(found) for _, found in hits), default=0)):
    pairs += [(q, found[nth]) for q, found in hits if nth < len(found)]
  return np.asarray(pairs[:limit], np.int64).reshape(-1, 2)

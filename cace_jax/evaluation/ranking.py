"""Evaluation: rank the gallery for every query in each way of scoring pairs, then measure.

The paper's two-stage inference (Sec. 3.5): `stage1` embeds every query and
gallery image and ranks by cosine distance; `stage2` re-sorts each query's
top-K by conditional embeddings computed from compact per-image caches. Each
way of scoring is one row: its distances give a ranking, the ranking gives
metrics. `evaluate` returns all of them, with how they were measured kept
apart (`records`).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import ml_collections
import numpy as np

from cace_jax import sharding
from cace_jax.data import pipeline, split_data
from cace_jax.evaluation import diagnose, k_reciprocal, metrics, records, stage1, stage2, two_stage
from cace_jax.models import CACENet

RANKS = (1, 5, 10)
TOP = 50  # gallery indices kept per query and row (the figures show the top 10)


def summarize(result: dict) -> dict:
  """Rank-1/5/10, mAP, mINP (percent) from `metrics.evaluate_rank` output."""
  cmc = result['cmc']
  summary = {f'rank{r}': 100.0 * float(cmc[min(r, len(cmc)) - 1]) for r in RANKS}
  summary.update(mAP=100.0 * result['mAP'], mINP=100.0 * result['mINP'])
  return summary


def measure(
  distmat: np.ndarray, query: split_data.SplitData, gallery: split_data.SplitData
) -> tuple[dict, np.ndarray, np.ndarray]:
  """(summary metrics, top ranking [Nq, TOP], AP per query) of one row's distances."""
  result = metrics.evaluate_rank(distmat, query.pids, gallery.pids, query.camids, gallery.camids)
  return summarize(result), metrics.top_ranking(distmat, TOP), result['per_query_ap']


def extract_both(
  model: CACENet,
  variables: dict,
  splits: tuple[split_data.SplitData, split_data.SplitData],
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  with_cache: bool,
  cache_dir: str,
) -> tuple[stage1.SplitFeatures, stage1.SplitFeatures]:
  """Stage-1 embeddings of a (query, gallery) pair of splits, and their stage-2 caches.

  Each split is read by tf.data (`pipeline.eval_batches`) and embedded
  by `stage1.embed_batches`. The caches are empty without `with_cache`, and
  go under `cache_dir` when too large for memory. Every process holds every
  query row; with several processes, each holds only its own rows of the
  gallery cache (the larger one), and stage 2 scores each pair where its
  gallery row is (`stage2.PairFunction`).
  """

  def embed(data: split_data.SplitData, name: str, gather_cache: bool):
    batches = pipeline.eval_batches(data, config.data)
    cache_dir_of_split = os.path.join(cache_dir, name)
    return stage1.embed_batches(
      model,
      variables,
      batches,
      len(data),
      config,
      mesh,
      with_cache,
      cache_dir_of_split,
      gather_cache,
    )

  query, gallery = splits
  return embed(query, 'query', True), embed(gallery, 'gallery', False)


def rank_stage1(q: stage1.SplitFeatures, g: stage1.SplitFeatures, rerank: bool) -> dict:
  """Stage 1's rows {'individual'[, 'individual+kr' with `rerank`]}: [Nq, Ng] distances each."""
  rows = {'individual': metrics.cosine_distance(q.embeddings, g.embeddings)}
  if rerank:  # k-reciprocal re-ranking of stage 1; stage 2 re-sorts its top-K
    rows['individual+kr'] = k_reciprocal.rerank_features(
      q.embeddings, g.embeddings, metric='cosine'
    )
  return rows


def evaluate(
  model: CACENet,
  variables: dict,
  query: split_data.SplitData,
  gallery: split_data.SplitData,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  scratch_dir: str | None = None,
) -> records.Evaluation:
  """Evaluates the model's `variables` (replicated over `mesh`) on a query/gallery split.

  Rows (stage-2 rows re-sort each query's `config.eval.stage2_k` nearest
  gallery images and need a pair stage):
    'individual': cosine distance of individual embeddings (stage 1).
    'clue_alignment': adjacency-weighted similarity of aligned pixel pairs
      (Table 1's "+ visual clue alignment"; adjacencies that compare features).
    'cacenet': (1 - w) d_individual + w d(f(q|g), f(g|q)), w = `eval.stage2_mix`
      (the full two-stage inference; w = 1 is the conditional distance alone),
      for the queries whose top-1 individual similarity is at most
      `eval.stage2_max_similarity` (the others keep their stage-1 ranking).
    '<row>+kr' with `config.eval.rerank`: the same after k-reciprocal re-ranking
      of stage 1 (k1 20, k2 6, lambda 0.3).

  Stage-2 caches too large for memory go to a temporary directory in
  `scratch_dir` (the system's temporary directory if None), removed afterwards.
  """
  if scratch_dir:
    os.makedirs(scratch_dir, exist_ok=True)
  k = config.eval.stage2_k if model.pair_stage else 0
  with tempfile.TemporaryDirectory(prefix='stage2_cache_', dir=scratch_dir) as cache_dir:
    start = time.perf_counter()
    q, g = extract_both(model, variables, (query, gallery), config, mesh, k > 0, cache_dir)
    # Wall time of this process's stage 1 (compiling included), and below of its pair
    # scoring (gathers excluded): with several processes, how the work divides.
    seconds = {'stage1': sharding.per_process(time.perf_counter() - start, np.float32)}
    stage1_rows = rank_stage1(q, g, config.eval.rerank)
    measured = {row: measure(d, query, gallery) for row, d in stage1_rows.items()}
    scorers = {}  # {stage-2 row: its pair distances}
    # The queries the 'cacenet' row re-sorts: its gate reads the individual ranking's
    # confidence (the re-ranked rows' distances are not cosine similarities).
    resorted = two_stage.least_confident(
      stage1_rows['individual'], config.eval.stage2_max_similarity
    )
    if k > 0:
      for row, score in stage2.pair_scorers(q.cache).items():
        scorers[row] = stage2.make_pair_distances(
          model, variables, score, q.cache, g.cache, mesh, g.held
        )
        # The mix and the gate belong to the inference; clue alignment is an ablation row.
        mix, queries = (config.eval.stage2_mix, resorted) if row == 'cacenet' else (1.0, None)
        for name, base in stage1_rows.items():
          # Measured as they come: each row's [Nq, Ng] matrix is dropped once measured.
          ranked = two_stage.TwoStageRanker(base, scorers[row], k).distances(k, mix, queries)
          measured[row + name[len('individual') :]] = measure(ranked, query, gallery)
    info = describe_measurement(k, seconds, scorers, g, len(gallery), config, resorted)
    found = {}
    if config.eval.diagnostics:
      probe = diagnose.Probe(variables, q.cache, g.cache, g.held) if k > 0 else None
      found = diagnose.run_diagnostics(
        model, query, gallery, config, stage1_rows['individual'], scorers.get('cacenet'), probe
      )
  return records.Evaluation(
    metrics={row: m[0] for row, m in measured.items()},
    rankings={row: m[1] for row, m in measured.items()},
    per_query_ap={row: m[2] for row, m in measured.items()},
    info=info,
    diagnostics=found,
  )


def describe_measurement(
  k: int,
  seconds: dict,
  scorers: dict[str, stage2.PairDistances],
  g: stage1.SplitFeatures,
  num_gallery: int,
  config: ml_collections.ConfigDict,
  resorted: np.ndarray,
) -> records.EvaluationInfo:
  """How `evaluate` measured, with the share of stage 2 when it scored pairs (`scorers`).

  `resorted` marks the queries the 'cacenet' row re-sorted.

  Every process must call it at the same point: the per-process figures are
  gathered from all of them.
  """
  if not scorers:
    return records.EvaluationInfo(stage2_k=k, seconds_by_process=seconds)
  scoring_seconds = sum(pair_distances.seconds_here for pair_distances in scorers.values())
  scored_here = sum(pair_distances.pairs_scored_here for pair_distances in scorers.values())
  seconds = {**seconds, 'stage2_pairs': sharding.per_process(scoring_seconds, np.float32)}
  return records.EvaluationInfo(
    stage2_k=k,
    seconds_by_process=seconds,
    stage2_mix=config.eval.stage2_mix,
    stage2_max_similarity=config.eval.stage2_max_similarity,
    # w = 0 sorts the top K by the individual distance again: no query is changed.
    stage2_queries=int(resorted.sum()) if config.eval.stage2_mix > 0 else 0,
    num_query=len(resorted),
    processes=jax.process_count(),
    # Each process scores the pairs whose gallery row it holds, and holds only those rows.
    stage2_pairs_scored_by_process=sharding.per_process(scored_here),
    gallery_cache_rows_by_process=sharding.per_process(
      num_gallery if g.held is None else g.held.sum()
    ),
    cache_bytes_per_image=stage2.cache_nbytes(g.cache, num_gallery),
    cache_on_disk=isinstance(jax.tree.leaves(g.cache)[0], np.memmap),
  )

"""Stage 2's K, mix w and query fraction, chosen on a validation split: the best mAP of the grid.

The validation split is carved from the training identities
(`data.validation_ids`), so the choice never looks at the test split. It is
recorded as a `records.Stage2Choice` in every test set's info, and the API
searches with it (`api.load`).
"""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import ml_collections

from cace_jax.data import split_data
from cace_jax.evaluation import diagnose, metrics, ranking, records, stage2, two_stage
from cace_jax.models import CACENet


def select_stage2(
  model: CACENet,
  variables: dict,
  validation: tuple[split_data.SplitData, split_data.SplitData],
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  scratch_dir: str | None = None,
) -> records.Stage2Choice:
  """Chooses stage 2's K, mix w and query fraction on a validation split: the best mAP.

  The pair distances of every query's largest-K neighbours are computed
  once; each (K, w, fraction) of `eval.stage2_k_grid` x `eval.stage2_mix_grid`
  x `eval.stage2_fraction_grid` then re-sorts a prefix of them
  (`two_stage.TwoStageRanker`) for the least confident `fraction` of the
  queries (`two_stage.gate_for_fraction`; the others keep their stage-1
  ranking). Ties go to the smaller K, then the smaller w, then the smaller
  fraction (w = 0 or fraction 0 keeps the individual ranking: stage 2 is not
  used when it does not help on validation).

  Returns:
    The choice, with the grid it was chosen from, the validation split's
    stage-1 metrics and size, and its diagnostics at the chosen K ({}
    without `eval.diagnostics`). `choice.configure(config)` evaluates with it.
  """
  query, gallery = validation
  k_grid = sorted({int(k) for k in config.eval.stage2_k_grid})
  mixes = sorted({float(w) for w in config.eval.stage2_mix_grid})
  fractions = sorted({float(f) for f in config.eval.stage2_fraction_grid})
  with tempfile.TemporaryDirectory(prefix='stage2_cache_', dir=scratch_dir) as cache_dir:
    q, g = ranking.extract_both(model, variables, validation, config, mesh, True, cache_dir)
    base = metrics.cosine_distance(q.embeddings, g.embeddings)
    pair_distances = stage2.make_pair_distances(
      model, variables, stage2.conditional_distance, q.cache, g.cache, mesh, g.held
    )
    ranker = two_stage.TwoStageRanker(base, pair_distances, k_grid[-1])  # scored once
    similarities = two_stage.top1_similarity(base)
    gates = {f: two_stage.gate_for_fraction(similarities, f) for f in fractions}
    grid = []
    for k in k_grid:
      for mix in mixes:
        for fraction, gate in gates.items():
          resorted = two_stage.least_confident(base, gate)
          found = ranking.measure(ranker.distances(k, mix, resorted), query, gallery)[0]
          grid.append(
            {
              'k': k,
              'mix': mix,
              'fraction': fraction,
              'max_similarity': gate,
              'mAP': found['mAP'],
              'rank1': found['rank1'],
            }
          )
    best = best_row(grid)
    choice = records.Stage2Choice(
      stage2_k=best['k'],
      stage2_mix=best['mix'],
      stage2_fraction=best['fraction'],
      stage2_max_similarity=best['max_similarity'],
    )
    validation_diagnostics = {}
    if config.eval.diagnostics:  # for choosing recipe knobs without looking at the test split
      probe = diagnose.Probe(variables, q.cache, g.cache, g.held)
      validation_diagnostics = diagnose.run_diagnostics(
        model, query, gallery, choice.configure(config), base, pair_distances, probe
      )
  return dataclasses.replace(
    choice,
    individual=ranking.measure(base, query, gallery)[0],
    grid=grid,
    num_query=len(query),
    num_gallery=len(gallery),
    pids=sorted({int(p) for p in gallery.pids}),
    diagnostics=validation_diagnostics,
  )


def best_row(grid: list[dict]) -> dict:
  """The grid row with the best validation mAP, then R-1; the first of equals in grid order."""
  return max(grid, key=lambda row: (row['mAP'], row['rank1']))


def format_selection(choice: records.Stage2Choice) -> str:
  """One line: what validation chose and the validation mAP it gave."""
  return (
    f'validation ({choice.num_query} queries, {choice.num_gallery} gallery): '
    f'stage2_k={choice.stage2_k}, stage2_mix={choice.stage2_mix:g}, '
    f'stage2_fraction={choice.stage2_fraction:g} '
    f'(stage2_max_similarity={choice.stage2_max_similarity:.4f}; '
    f'mAP {choice.grid_row()["mAP"]:.2f}; individual {choice.individual["mAP"]:.2f})'
  )

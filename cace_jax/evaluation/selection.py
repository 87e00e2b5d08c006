"""Stage 2's K and mix w, chosen on a validation split: the best mAP over their grid.

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
from cace_jax.evaluation import diagnose, metrics, ranking, records, stage2
from cace_jax.models import CACENet


def select_stage2(
  model: CACENet,
  variables: dict,
  validation: tuple[split_data.SplitData, split_data.SplitData],
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  scratch_dir: str | None = None,
) -> records.Stage2Choice:
  """Chooses stage 2's K and mix w on a validation split: the best mAP over their grids.

  The pair distances of every query's largest-K neighbours are computed
  once; each (K, w) of `eval.stage2_k_grid` x `eval.stage2_mix_grid` then
  re-sorts a prefix of them (`stage2.TwoStageRanker`). Ties go to the
  smaller K, then the smaller w (w = 0 keeps the individual ranking: stage 2
  is not used when it does not help on validation).

  Returns:
    The choice, with the grid it was chosen from, the validation split's
    stage-1 metrics and size, and its diagnostics at the chosen K ({}
    without `eval.diagnostics`). `choice.configure(config)` evaluates with it.
  """
  query, gallery = validation
  k_grid = sorted({int(k) for k in config.eval.stage2_k_grid})
  mixes = sorted({float(w) for w in config.eval.stage2_mix_grid})
  with tempfile.TemporaryDirectory(prefix='stage2_cache_', dir=scratch_dir) as cache_dir:
    q, g = ranking.extract_both(model, variables, validation, config, mesh, True, cache_dir)
    base = metrics.cosine_distance(q.embeddings, g.embeddings)
    pair_distances = stage2.make_pair_distances(
      model, variables, stage2.conditional_distance, q.cache, g.cache, mesh, g.held
    )
    ranker = stage2.TwoStageRanker(base, pair_distances, k_grid[-1])  # scored once
    grid = []
    for k in k_grid:
      for mix in mixes:
        found = ranking.measure(ranker.distances(k, mix), query, gallery)[0]
        grid.append({'k': k, 'mix': mix, 'mAP': found['mAP'], 'rank1': found['rank1']})
    best = max(grid, key=lambda row: (row['mAP'], row['rank1']))  # first of equals wins
    choice = records.Stage2Choice(stage2_k=best['k'], stage2_mix=best['mix'])
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


def format_selection(choice: records.Stage2Choice) -> str:
  """One line: what validation chose and the validation mAP it gave."""
  best = next(
    row for row in choice.grid if (row['k'], row['mix']) == (choice.stage2_k, choice.stage2_mix)
  )
  return (
    f'validation ({choice.num_query} queries, {choice.num_gallery} gallery): '
    f'stage2_k={choice.stage2_k}, stage2_mix={choice.stage2_mix:g} '
    f'(mAP {best["mAP"]:.2f}; individual {choice.individual["mAP"]:.2f})'
  )

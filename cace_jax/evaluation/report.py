"""What an evaluation shows: the printed table, the logged scalars, results.json and the figures."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from cace_jax.data import split_data
from cace_jax.evaluation import diagnostics, figures, ranking, records, selection
from cace_jax.models import CACENet


def flatten_metrics(evaluation: records.Evaluation) -> dict:
  """{'individual/mAP': x, ...} for scalar logging, with any validation choice and diagnostics."""
  flat = {
    f'{row}/{name}': value
    for row, values in evaluation.metrics.items()
    for name, value in values.items()
  }
  for name, value in diagnostics.flatten(evaluation.diagnostics, sep='_').items():
    flat[f'diagnostics/{name}'] = value
  choice = evaluation.info.selection
  if choice is not None:
    for name, value in diagnostics.flatten(choice.diagnostics, sep='_').items():
      flat[f'validation_diagnostics/{name}'] = value
    flat['validation/stage2_k'], flat['validation/stage2_mix'] = choice.stage2_k, choice.stage2_mix
    flat['validation/stage2_fraction'] = choice.stage2_fraction
  if evaluation.info.stage2_queries is not None:
    flat['stage2/queries_resorted'] = evaluation.info.stage2_queries
  return flat


def format_table(evaluation: records.Evaluation, title: str = '') -> str:
  """A fixed-width results table (percent), with the lines that say how it was measured."""
  columns = [f'rank{r}' for r in ranking.RANKS] + ['mAP', 'mINP']
  width = max([len(row) for row in evaluation.metrics] + [10])
  lines = [title] if title else []
  lines.append(
    f'{"":<{width}}  ' + '  '.join(f'{c:>7}' for c in ['R-1', 'R-5', 'R-10', 'mAP', 'mINP'])
  )
  for row, values in evaluation.metrics.items():
    lines.append(f'{row:<{width}}  ' + '  '.join(f'{values[c]:7.2f}' for c in columns))
  if evaluation.info.cameras is not None:
    lines.append(f'cameras: {evaluation.info.cameras}')
  info = evaluation.info
  if info.stage2_queries is not None and info.stage2_queries < info.num_query:
    lines.append(
      f'cacenet: stage 2 re-sorted {info.stage2_queries} of {info.num_query} queries '
      f'(top-1 similarity <= {info.stage2_max_similarity:.4f}), the rest kept stage 1'
    )
  lines.extend(format_diagnostics(evaluation.diagnostics))
  choice = evaluation.info.selection
  if choice is not None:
    lines.append(selection.format_selection(choice))
    lines.extend('  ' + line for line in format_diagnostics(choice.diagnostics))
  return '\n'.join(lines)


def format_diagnostics(found: dict) -> list[str]:
  """The lines printed under the table for `diagnose.run_diagnostics`'s results (none if empty)."""
  lines = []
  for row, values in found.get('family_retrieval', {}).items():
    lines.append(
      f'within-family retrieval, {row}: mAP {values["mAP"]:.2f}, R-1 {values["rank1"]:.2f}'
    )
  for row, value in found.get('hard_pair_auc', {}).items():
    lines.append(f'hard-pair ROC-AUC (match vs family impostor), {row}: {value:.4f}')
  if 'alignment_selectivity' in found:
    lines.append(
      f'alignment selectivity (effective partners / n, 1 = uniform): '
      f'{found["alignment_selectivity"]:.3f}'
    )
  if 'cross_share' in found:
    lines.append(
      f'cross-image share of the degree (0 = only intra-image edges): {found["cross_share"]:.3f}'
    )
  if 'conditioning_strength' in found:
    lines.append(
      f'conditioning strength (spread of f(q|g) / |f(q|g) - f(q)|, 0 = ignores g): '
      f'{found["conditioning_strength"]:.3f}'
    )
  return lines


def write_report(
  workdir: str,
  step: int,
  config: ml_collections.ConfigDict,
  evaluations: dict[str, records.Evaluation],
  model: CACENet,
  variables: dict,
  builders: dict,
) -> None:
  """Writes `<workdir>/results.json` and the figures of `figures` (process 0 only).

  results.json holds {'step', 'dataset', 'results': metrics per row,
  'diagnostics', 'info'} of the first test set and, when there are several
  (`data.dataset` 'a+b'), 'test_sets': {name: {'results', 'diagnostics',
  'info'}} for each (`records.Evaluation.to_json`). The figures show the
  first test set.
  """
  if jax.process_index() != 0:
    return
  first = next(iter(evaluations))
  evaluation = evaluations[first]
  query, gallery = split_data.load_eval_splits(builders[first], first)
  row = evaluation.figure_row
  figures.write_figures(
    model,
    variables,
    query,
    gallery,
    evaluation.rankings[row],
    evaluation.per_query_ap[row],
    config.data.image_size,
    workdir,
  )
  report = {'step': step, 'dataset': config.data.dataset, **evaluation.to_json()}
  if len(evaluations) > 1:
    report['test_sets'] = {name: e.to_json() for name, e in evaluations.items()}
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)

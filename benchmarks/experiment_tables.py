"""Figures of the training studies and the demo, as markdown tables rendered from their JSON.

The study tables read `benchmarks/ablations.py` reports: each row's mean and
std over seeds, and each seed's own stage-2 difference; the paired studies'
tables add `benchmarks/paired.py`'s differences with their intervals, and
`benchmarks/stage2_policies.py` reports.
"""

from __future__ import annotations

import os
import statistics

from benchmarks import paired
from benchmarks.result_tables import RESULTS, cell, header, load, provenance


def demo_results() -> str:
  """The demo's results table (cace_jax's default CPU settings, seed 0)."""
  run = load('demo.json')['runs']['default']
  k = run['stage2_k']
  names = {
    'individual': 'individual embeddings (stage 1)',
    'clue_alignment': f'+ clue alignment (top-{k} re-sorted)',
    'cacenet': f'+ conditional embeddings (CACE-Net, top-{k})',
  }
  lines = header('scoring', 'Rank-1', 'Rank-5', 'Rank-10', 'mAP', 'mINP')
  for row, name in names.items():
    m = run['results'][row]
    lines.append(
      f'| {name} | {m["rank1"]:.1f} | {m["rank5"]:.1f} | {m["rank10"]:.1f} | '
      f'{m["mAP"]:.1f} | {m["mINP"]:.1f} |'
    )
  return '\n'.join(lines) + provenance('demo.json')


def demo_time() -> str:
  """The demo's wall time with jaxlib's and with cace_jax's CPU defaults."""
  report = load('demo.json')
  runs = report['runs']
  names = {
    'ynnpack': 'jaxlib default (YNNPACK convolutions)',
    'default': 'cace_jax default (XLA convolutions)',
    'default_again': 'cace_jax default, again',
  }
  lines = header(
    'demo run (training and evaluation)', 'wall time', '× jaxlib default', 'individual mAP'
  )
  for name, label in names.items():
    run = runs[name]
    speed = runs['ynnpack']['wall_s'] / run['wall_s']
    lines.append(
      f'| {label} | {run["wall_s"] / 60:.1f} min | {speed:.2f} | '
      f'{run["results"]["individual"]["mAP"]:.2f} |'
    )
  same = 'identical' if report['train_log_identical'] else 'NOT identical'
  lines.append(f"\nThe two default runs' train.log: {same} ({report['logged_steps']} records).")
  for name, note in report.get('notes', {}).items():
    lines.append(f'{names[name]}: {note}.')
  return '\n'.join(lines)


def graph_conformance() -> str:
  """Adjacency x operator: the largest gap between the pair stage's paths, and ONNX's."""
  report = load('graph_conformance.json')
  gaps: dict = {}
  for key, found in report['matrix'].items():
    adjacency, operator, _ = key.split('/')
    paths = max(found['fast-direct embedding'], found['fast-direct gradient'], found['cache-dense'])
    onnx = found['onnx-jax']
    before = gaps.get((adjacency, operator), (0.0, 0.0))
    gaps[adjacency, operator] = (
      max(before[0], paths),
      None if onnx is None else max(before[1], onnx),
    )
  operators = list(dict.fromkeys(operator for _, operator in gaps))
  lines = header('adjacency', *operators)
  for adjacency in dict.fromkeys(adjacency for adjacency, _ in gaps):
    cells = []
    for operator in operators:
      paths, onnx = gaps[adjacency, operator]
      cells.append(f'{paths:.0e} · ' + ('no ONNX form' if onnx is None else f'{onnx:.0e}'))
    lines.append(f'| {adjacency} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def mean_std(values: list[float], digits: int = 2) -> str:
  values = [v for v in values if v == v]  # NaN: a row without that quantity
  if not values:
    return '–'
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}'


def study_table(name: str) -> str:
  """One line per row of a training study: its rankings and the pair-stage diagnostics.

  'stage 2 − individual' is the mean ± std over seeds of each seed's own
  difference (the same trained model scored two ways).
  """
  report = load(f'ablations_{name}.json')
  lines = header(
    'row',
    'overrides',
    'individual mAP',
    'cacenet mAP',
    'stage 2 − individual, mAP',
    'within family mAP, individual / cacenet',
    'selectivity',
    'conditioning',
  )
  for row, found in report['rows'].items():
    results, diagnostics = found['results'], found.get('diagnostics', {})
    overrides = ', '.join(f'`{k}={v}`' for k, v in report['overrides'][row].items()) or 'the config'
    individual = results['individual']['mAP']['values']
    cacenet = results.get('cacenet', {}).get('mAP', {}).get('values')
    gain = mean_std([c - i for c, i in zip(cacenet, individual)]) if cacenet else '–'
    family = [
      diagnostics.get(f'family_retrieval/{scoring}/mAP', {}).get('values', [])
      for scoring in ('individual', 'cacenet')
    ]
    lines.append(
      f'| {row} | {overrides} | {mean_std(individual)} | '
      f'{mean_std(cacenet) if cacenet else "–"} | {gain} | '
      f'{mean_std(family[0])} / {mean_std(family[1])} | '
      f'{mean_std(diagnostics.get("alignment_selectivity", {}).get("values", []), 3)} | '
      f'{mean_std(diagnostics.get("conditioning_strength", {}).get("values", []))} |'
    )
  seeds = ', '.join(map(str, report['seeds']))
  return (
    f'Study `{name}` on `{report["config"]}`, seeds {seeds}, test split (reported, never '
    'used to choose).\n\n' + '\n'.join(lines) + provenance(f'ablations_{name}.json')
  )


def explorations() -> str:
  """Single-seed changes of the demo, from their recorded summaries."""
  report = load('explorations.json')
  lines = header(
    'change from the demo',
    'individual mAP',
    'cacenet mAP',
    'within family, individual / cacenet',
    'selectivity',
    'conditioning',
  )
  for row in report['rows']:
    lines.append(
      f'| {row["change"]} | {row["individual_mAP"]:.2f} | {row["cacenet_mAP"]:.2f} | '
      f'{row["family_individual_mAP"]:.2f} / {row["family_cacenet_mAP"]:.2f} | '
      f'{row["selectivity"]:.3f} | {row["conditioning"]:.2f} |'
    )
  return '\n'.join(lines) + provenance('explorations.json')


def stage2_k() -> str:
  """mAP and Rank-1 of both stage-2 rows for every K, on one trained run."""
  report = load('stage2_k.json')
  base = report['individual']
  lines = [
    f'{report["num_query"]} queries, {report["num_gallery"]} gallery images; stage 1 alone: '
    f'mAP {base["mAP"]:.2f}, Rank-1 {base["rank1"]:.1f}.',
    '',
    *header('K', 'cacenet mAP', 'cacenet Rank-1', 'clue_alignment mAP', 'stage 2 ms per query'),
  ]
  for k, found in report['rows']['cacenet'].items():
    alignment = report['rows'].get('clue_alignment', {}).get(k, {})
    lines.append(
      f'| {k} | {found["mAP"]:.2f} | {found["rank1"]:.1f} | {cell(alignment.get("mAP"))} | '
      f'{1000 * found["stage2_s_per_query"]:.2f} |'
    )
  return '\n'.join(lines) + provenance('stage2_k.json')


def full_or_partial(stem: str) -> str:
  """A report's file: `<stem>.json`, else the one of the seeds finished so far (`.partial`)."""
  full = f'{stem}.json'
  return full if os.path.exists(os.path.join(RESULTS, full)) else f'{stem}.partial.json'


def paired_study(name: str) -> str:
  """A paired study: each row's own embedding over seeds, then every pair of rows seed by seed."""
  source = full_or_partial(f'ablations_{name}')
  report = load(source)
  lines = header(
    'row', 'overrides', 'seeds', 'individual mAP', 'individual R-1', 'within family mAP'
  )
  for row, found in report['rows'].items():
    overrides = ', '.join(f'`{k}={v}`' for k, v in report['overrides'][row].items()) or 'the config'
    individual = found['results']['individual']
    family = found['diagnostics'].get('family_retrieval/individual/mAP', {}).get('values', [])
    lines.append(
      f'| {row} | {overrides} | {len(report["seeds_by_row"][row])} | '
      f'{mean_std(individual["mAP"]["values"])} | {mean_std(individual["rank1"]["values"])} | '
      f'{mean_std(family)} |'
    )
  return (
    f'Study `{name}` on `{report["config"]}`, test split (reported, never used to choose); '
    'percent, mean ± std over seeds.\n\n'
    + '\n'.join(lines)
    + '\n\nEach pair of rows, seed by seed (b − a: mean difference [95% t interval]):\n\n'
    + '\n'.join(paired.markdown_lines(report['paired']))
    + provenance(source)
  )


def policies_markdown(report: dict) -> str:
  """A `stage2_policies.py` report: per test set, every (row, policy) and the paired differences."""
  lines = []
  for test, found in report['tests'].items():
    lines += [f'Test split of `{test}`:', '']
    lines += header('row / policy', 'mAP', 'R-1', 'test queries re-sorted, %')
    for label, values in found['rows'].items():
      share = values.get('queries_resorted')
      share = f'{share["mean"]:.0f} ± {share["std"]:.0f}' if share else '–'
      cells = [f'{values[m]["mean"]:.2f} ± {values[m]["std"]:.2f}' for m in ('mAP', 'rank1')]
      lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {share} |')
    lines += ['', *paired.markdown_lines(found['paired'], name_eval_row=False), '']
  seeds = ', '.join(map(str, report['seeds']))
  return f'Study `{report["study"]}`, seeds {seeds}; percent.\n\n' + '\n'.join(lines).rstrip()


def stage2_policies(name: str) -> str:
  """Stage 2 within each model of a study, per test set (`stage2_policies_<study>.json`).

  The comparisons a reader of claim 2 needs: each model's selective and
  blanket stage 2 against its own individual embedding and against each
  other, and, on a shifted test set, the models' individual embeddings
  against each other. The script's own .md has every row and comparison.
  """
  source = full_or_partial(f'stage2_policies_{name}')
  report = load(source)
  lines = header(
    'test split', 'b − a (same seeds)', 'seeds', 'mAP', 'R-1', 'within family mAP',
    'test queries re-sorted by b, %',
  )  # fmt: skip
  own_test = next(iter(report['tests']))  # the runs' own test set comes first
  for test, found in report['tests'].items():
    for comparison in found['paired']:
      (row_a, policy_a), (row_b, policy_b) = (comparison[s].split(' / ') for s in ('a', 'b'))
      within_model = row_a == row_b and policy_b != 'individual'
      across_models = test != own_test and policy_a == policy_b == 'individual'
      if not (within_model or across_models):
        continue
      label = f'{row_b}: {policy_b} − {policy_a}' if within_model else f'{row_b} − {row_a}'
      share = found['rows'][comparison['b']].get('queries_resorted')
      cells = [
        paired.format_difference(comparison[m]) if m in comparison else '–'
        for m in ('mAP', 'rank1', 'family_mAP')
      ]
      share = f'{share["mean"]:.0f} ± {share["std"]:.0f}' if share else '–'
      lines.append(
        f'| `{test}` | {label} | {len(comparison["seeds"])} | '
        + ' | '.join(cells)
        + f' | {share} |'
      )
  return (
    'Mean paired difference [95% t interval], percent; "individual" is a model\'s own '
    'embedding (stage 1).\n\n' + '\n'.join(lines) + provenance(source)
  )


# The comparisons that answer the two claims (docs/experiments.md): (claim, what it
# asks, report stem, test split, a, b), for b − a. `ablations.py` reports hold the
# study's own test split only; `stage2_policies.py` reports hold each split they scored.
CLAIM_COMPARISONS = (
  ('1', 'pair branch vs none', 'ablations_regulariser', 'synthetic_details',
   'individual', 'cacenet'),
  ('1', 'intra-image GCN vs none', 'ablations_regulariser', 'synthetic_details',
   'individual', 'individual_gcn'),
  ('1', 'pair branch vs intra-image GCN', 'ablations_regulariser', 'synthetic_details',
   'individual_gcn', 'cacenet'),
  ('1', 'pair branch vs none, shifted to occlusion', 'stage2_policies_regulariser',
   'synthetic_details/occluded', 'individual / individual', 'cacenet / individual'),
  ('1', 'intra-image GCN vs none, shifted to occlusion', 'stage2_policies_regulariser',
   'synthetic_details/occluded', 'individual / individual', 'individual_gcn / individual'),
  ('1', 'pair branch vs intra-image GCN, shifted to occlusion', 'stage2_policies_regulariser',
   'synthetic_details/occluded', 'individual_gcn / individual', 'cacenet / individual'),
  ('1', 'pair branch vs none, trained on occlusion', 'ablations_occlusion',
   'synthetic_details/occluded', 'individual', 'cacenet'),
  ('2', 'selective stage 2 vs stage 1', 'stage2_policies_regulariser', 'synthetic_details',
   'cacenet / individual', 'cacenet / selective'),
  ('2', 'selective vs blanket stage 2', 'stage2_policies_regulariser', 'synthetic_details',
   'cacenet / blanket', 'cacenet / selective'),
  ('2', 'selective stage 2 vs stage 1, shifted to occlusion', 'stage2_policies_regulariser',
   'synthetic_details/occluded', 'cacenet / individual', 'cacenet / selective'),
  ('2', 'selective vs blanket, shifted to occlusion', 'stage2_policies_regulariser',
   'synthetic_details/occluded', 'cacenet / blanket', 'cacenet / selective'),
  ('2', 'selective stage 2 vs stage 1, trained on occlusion', 'stage2_policies_occlusion',
   'synthetic_details/occluded', 'cacenet / individual', 'cacenet / selective'),
  ('2', 'selective vs blanket, trained on occlusion', 'stage2_policies_occlusion',
   'synthetic_details/occluded', 'cacenet / blanket', 'cacenet / selective'),
)  # fmt: skip


def verdict(difference: dict) -> str:
  """What a paired mAP difference's interval says: above zero, below zero, or either."""
  if difference['low'] is None:
    return 'one seed: no interval'
  if not any(difference['values']):
    return 'the same ranking quality on every seed'
  if difference['low'] > 0:
    return '**b better** (interval above 0)'
  if difference['high'] < 0:
    return '**b worse** (interval below 0)'
  return 'undecided (interval contains 0)'


def ranking_label(name: str) -> str:
  """'cacenet / selective' as 'cacenet, selective stage 2'; a bare row: its model's stage 1."""
  if ' / ' not in name:
    return f'{name}, stage 1'
  row, policy = name.split(' / ')
  return f'{row}, ' + ('stage 1' if policy == 'individual' else f'{policy} stage 2')


def claims() -> str:
  """The answer to each claim: every comparison that tests it, its interval and what it says.

  Claim 1 compares models by their individual embeddings; claim 2 compares
  rankings of one CACE-Net model ('individual' there is its stage 1). The
  verdict reads the mAP interval.
  """
  lines = header('claim', 'question', 'a → b', 'test split', 'seeds', 'mAP', 'R-1', 'the seeds say')
  reports = {}  # {source file: its report}, each read once
  for claim, question, stem, test, a, b in CLAIM_COMPARISONS:
    source = full_or_partial(stem)
    if source not in reports:
      reports[source] = load(source)
    report = reports[source]
    found = report['tests'][test]['paired'] if 'tests' in report else report['paired']
    comparison = next(c for c in found if (c['a'], c['b']) == (a, b))
    lines.append(
      f'| {claim} | {question} | {ranking_label(a)} → {ranking_label(b)} | `{test}` | '
      f'{len(comparison["seeds"])} | '
      f'{paired.format_difference(comparison["mAP"])} | '
      f'{paired.format_difference(comparison["rank1"])} | {verdict(comparison["mAP"])} |'
    )
  return (
    'Mean paired difference b − a [95% t interval], percent.\n\n'
    + '\n'.join(lines)
    + provenance(*reports)
  )

"""A study's report: mean ± std over seeds of every row, its claims checked, as markdown.

`benchmarks/ablations.py` trains a study's rows and calls these on the
summaries it keeps (`summary_of`); `benchmarks/stage2_policies.py` uses
`mean_std`. Numbers are percent, on the dataset's test split.
"""

from __future__ import annotations

import numpy as np

from benchmarks import paired
from cace_jax.evaluation import diagnostics

METRICS = ('rank1', 'mAP', 'mINP')


def mean_std(values: list[float]) -> dict:
  """{'mean', 'std' (ddof 1; 0 for one value), 'values'}."""
  spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {'mean': float(np.mean(values)), 'std': spread, 'values': [float(v) for v in values]}


def summarise(per_seed: dict[int, dict]) -> dict:
  """Mean ± std over the seeds of every evaluation row's metrics (percent) and every diagnostic.

  Returns:
    {'results': {eval row: {metric: mean_std}}, 'diagnostics': {name: mean_std}}
    (diagnostics that some seed lacks are left out).
  """
  seeds = sorted(per_seed)
  results = {
    row: {m: mean_std([per_seed[s]['results'][row][m] for s in seeds]) for m in METRICS}
    for row in per_seed[seeds[0]]['results']
  }
  flat = [diagnostics.flatten(per_seed[s].get('diagnostics', {})) for s in seeds]
  shared = set.intersection(*(set(f) for f in flat))
  found = {name: mean_std([f[name] for f in flat]) for name in sorted(shared)}
  gains = {}
  if 'cacenet' in results:  # what stage 2 adds within each trained model, seed by seed
    read = lambda row: [per_seed[s]['results'][row]['mAP'] for s in seeds]
    gains['mAP'] = paired.paired_difference(read('individual'), read('cacenet'))
    within = 'family_retrieval/individual/mAP', 'family_retrieval/cacenet/mAP'
    if all(name in shared for name in within):
      gains['family_mAP'] = paired.paired_difference(*([f[w] for f in flat] for w in within))
  return {'results': results, 'diagnostics': found, 'gains': gains}


def headline_row(summary: dict) -> str:
  """The row a model is scored by: stage 2 ('cacenet', its K and w chosen on
  validation) when it has one, else 'individual'. Never the best row on the test split."""
  return 'cacenet' if 'cacenet' in summary['results'] else 'individual'


def check_ordering(ordering: tuple, report: dict) -> list[dict]:
  """A study's claims about its rows (`Study.ordering`), each compared on headline mAP means.

  Returns:
    [{'claim', 'lower', 'higher' (mean_std of mAP), 'holds', 'margin_over_std'}]
    for the claims whose rows were run. 'margin_over_std' is the difference
    of the means over the larger of the two seed spreads (> 1: clear).
  """
  rows = report['rows']
  checks = []
  for lower, relation, higher in ordering:
    if lower not in rows or higher not in rows:
      continue
    a = rows[lower]['results'][headline_row(rows[lower])]['mAP']
    b = rows[higher]['results'][headline_row(rows[higher])]['mAP']
    difference = b['mean'] - a['mean']
    holds = difference > 0 if relation == '<' else difference >= 0
    spread = max(a['std'], b['std'], 1e-9)
    checks.append(
      {
        'claim': f'{lower} {relation} {higher}',
        'lower': a,
        'higher': b,
        'holds': bool(holds),
        'margin_over_std': difference / spread,
      }
    )
  return checks


def markdown_table(study: str, report: dict) -> str:
  """Rows: study row x evaluation row; columns: R-1, mAP, mINP as mean ± std (percent)."""
  lines = [
    f'Study `{study}` on {report["config"]}, seeds {report["seeds"]} (test split, percent)',
    '',
    '| row | scored by | R-1 | mAP | mINP |',
    '|---|---|---|---|---|',
  ]
  for row, summary in report['rows'].items():
    for scored_by, values in summary['results'].items():
      cells = [f'{values[m]["mean"]:.2f} ± {values[m]["std"]:.2f}' for m in METRICS]
      lines.append(f'| {row} | {scored_by} | ' + ' | '.join(cells) + ' |')
  names = sorted({n for summary in report['rows'].values() for n in summary['diagnostics']})
  if names:
    lines += ['', '| row | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    for row, summary in report['rows'].items():
      found = summary['diagnostics']
      cells = [
        f'{found[n]["mean"]:.3f} ± {found[n]["std"]:.3f}' if n in found else '' for n in names
      ]
      lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
  with_gains = {
    row: summary['gains'] for row, summary in report['rows'].items() if summary.get('gains')
  }
  if with_gains:
    lines += [
      '',
      '| row | cacenet − individual, mAP [95% interval] | within family, mAP | '
      'every seed positive |',
      '|---|---|---|---|',
    ]
    for row, gains in with_gains.items():
      cells = [
        paired.format_difference(gains[name]) if name in gains else ''
        for name in ('mAP', 'family_mAP')
      ]
      positive = all(v > 0 for v in gains['mAP']['values'])
      lines.append(f'| {row} | ' + ' | '.join(cells) + f' | {"yes" if positive else "no"} |')
  if report.get('paired'):
    lines += [
      '',
      'Rows compared seed by seed (same batches, same shared initial values), '
      'mean difference [95% t interval]:',
      '',
      *paired.markdown_lines(report['paired']),
    ]
  if report.get('ordering'):
    lines += ['', "The paper's ordering (headline mAP: cacenet if the model has a pair stage):"]
    for check in report['ordering']:
      lower, higher = check['lower'], check['higher']
      verdict = 'holds' if check['holds'] else 'does not hold'
      lines.append(
        f'- {check["claim"]}: {lower["mean"]:.2f} ± {lower["std"]:.2f} vs '
        f'{higher["mean"]:.2f} ± {higher["std"]:.2f}: {verdict} '
        f'(difference / spread {check["margin_over_std"]:+.1f})'
      )
  return '\n'.join(lines) + '\n'

"""Training studies: rows of config overrides trained over seeds; mean ± std, printed and saved.

  python benchmarks/ablations.py --study=attention --seeds=0,1,2
  python benchmarks/ablations.py --study=attention --seeds=0 --rows=raw_correspondence

Each (row, seed) trains `--config` (default configs/synthetic.py, the demo)
with the row's overrides and `config.seed`, by running train.py into
`<runs>/<study>/<row>/seed<k>`, final evaluation included. A run whose
results.json exists is not trained again, so an interrupted study resumes
where it stopped (and train.py resumes an interrupted run from its last
checkpoint). Runs go seed by seed, so a study cut short is still balanced.

The report averages every evaluation row (individual, clue_alignment,
cacenet) and every diagnostic (`cace_jax/evaluation/diagnostics.py`) over the
seeds: `<out>.json` and a markdown table `<out>.md`. The numbers are on the
dataset's test split: they report, they do not choose. A run trained before
the diagnostics existed gets them by deleting its results.json: train.py then
finds the run finished and only evaluates it again.

Studies:
  attention  the adjacency of the pair graph: the official projected cosine
             (the demo's), the paper's eq. 2-4 on raw features, and the same
             on L2-normalised pixels (issue 12).
  table1     the paper's Table 1 on configs/synthetic_pairs.py: individual
             only, individual-GCN, normal GCN, discrepancy GCN (the
             "+ clue alignment" row is every pair model's clue_alignment row).
  table2     the paper's Table 2 on the same config: the discrepancy GCN
             over fixed adjacencies (none, part, top-k, full), the paper's
             correspondence attention and the official projected form.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import cli  # pylint: disable=wrong-import-position
from cace_jax.errors import ConfigError  # pylint: disable=wrong-import-position
from cace_jax.evaluation import diagnostics  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Study:
  """Rows of config overrides trained on one base config.

  Attributes:
    config: the base config file (`--config` overrides it).
    rows: {row name: {config field: value}}.
    ordering: the paper's claim about the rows, as (lower row, relation,
      higher row) triples compared on each row's best-scored mAP (`best_map`).
  """

  config: str
  rows: dict
  ordering: tuple = ()


STUDIES = {
  'attention': Study(
    'configs/synthetic.py',
    {
      'projected': {'model.adjacency': 'projected'},
      'raw_correspondence': {'model.adjacency': 'raw_correspondence'},
      'cosine_correspondence': {'model.adjacency': 'cosine_correspondence'},
    },
  ),
  # Table 1: the stages of CACE-Net. "+ clue alignment" is the clue_alignment
  # row of every model with a pair stage (adjacency-weighted pixel similarity, no GCN).
  'table1': Study(
    'configs/synthetic_pairs.py',
    {
      'individual': {'model.gcn': 'none'},
      'individual_gcn': {'model.adjacency': 'cosine_intra'},
      'normal_gcn': {'model.gcn': 'normal'},
      'discrepancy_gcn': {},
    },
    (
      ('individual', '<', 'individual_gcn'),
      ('individual_gcn', '<=', 'normal_gcn'),
      ('normal_gcn', '<', 'discrepancy_gcn'),
    ),
  ),
  # Table 2: the cross-image adjacency of the discrepancy GCN.
  'table2': Study(
    'configs/synthetic_pairs.py',
    {
      'none': {'model.adjacency': 'none'},
      'part': {'model.adjacency': 'part'},
      'topk': {'model.adjacency': 'topk'},
      'full': {'model.adjacency': 'full'},
      'correspondence': {},
      'projected': {'model.adjacency': 'projected'},
    },
    tuple((fixed, '<=', 'correspondence') for fixed in ('none', 'part', 'topk', 'full')),
  ),
}
METRICS = ('rank1', 'mAP', 'mINP')


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_enum('study', None, list(STUDIES), 'Which study.', flag_values=flag_values)
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.', flag_values=flag_values)
  flags.DEFINE_string('rows', '', 'Comma-separated rows (default: all).', flag_values=flag_values)
  flags.DEFINE_string(
    'config', '', "Base config (default: the study's own).", flag_values=flag_values
  )
  flags.DEFINE_string('runs', 'runs/ablations', 'Directory of the runs.', flag_values=flag_values)
  flags.DEFINE_string(
    'out',
    '',
    'Report path without extension (default benchmarks/results/ablations_<study>).',
    flag_values=flag_values,
  )
  flags.mark_flags_as_required(['study'], flag_values=flag_values)


def train_command(config: str, overrides: dict, seed: int, workdir: str) -> list[str]:
  """The train.py command line of one (row, seed)."""
  command = [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}']
  command += [f'--config.{key}={value}' for key, value in overrides.items()]
  return command + [f'--config.seed={seed}', f'--workdir={workdir}']


def run_once(config: str, overrides: dict, seed: int, workdir: str) -> dict:
  """Trains one (row, seed) unless its results.json exists; returns that file's contents."""
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    os.makedirs(workdir, exist_ok=True)
    command = train_command(config, overrides, seed, workdir)
    print(' '.join(command), flush=True)
    start = time.time()
    with open(os.path.join(workdir, 'train.log'), 'a', encoding='utf-8') as log:
      code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0 or not os.path.exists(results):
      raise ConfigError(f'training failed (exit {code}); see {os.path.join(workdir, "train.log")}')
    print(f'  done in {time.time() - start:.0f} s', flush=True)
  with open(results, encoding='utf-8') as f:
    return json.load(f)


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
    gains['mAP'] = mean_std([stage2_gain(per_seed[s]['results']) for s in seeds])
    within = 'family_retrieval/cacenet/mAP', 'family_retrieval/individual/mAP'
    if all(name in shared for name in within):
      gains['family_mAP'] = mean_std([f[within[0]] - f[within[1]] for f in flat])
  return {'results': results, 'diagnostics': found, 'gains': gains}


def stage2_gain(results: dict) -> float:
  """mAP of the cacenet row minus the individual row of the same run."""
  return results['cacenet']['mAP'] - results['individual']['mAP']


def headline_row(summary: dict) -> str:
  """The row a model is scored by: stage 2 ('cacenet', its K and w chosen on
  validation) when it has one, else 'individual'. Never the best row on the test split."""
  return 'cacenet' if 'cacenet' in summary['results'] else 'individual'


def check_ordering(study: Study, report: dict) -> list[dict]:
  """The paper's claims about the rows, each compared on headline mAP means.

  Returns:
    [{'claim', 'lower', 'higher' (mean_std of mAP), 'holds', 'margin_over_std'}]
    for the claims whose rows were run. 'margin_over_std' is the difference
    of the means over the larger of the two seed spreads (> 1: clear).
  """
  rows = report['rows']
  checks = []
  for lower, relation, higher in study.ordering:
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
      '| row | cacenet − individual, mAP | within family, mAP | every seed positive |',
      '|---|---|---|---|',
    ]
    for row, gains in with_gains.items():
      cells = [
        f'{gains[name]["mean"]:+.2f} ± {gains[name]["std"]:.2f}' if name in gains else ''
        for name in ('mAP', 'family_mAP')
      ]
      positive = all(v > 0 for v in gains['mAP']['values'])
      lines.append(f'| {row} | ' + ' | '.join(cells) + f' | {"yes" if positive else "no"} |')
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


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  study = STUDIES[args.study]
  config = args.config or study.config
  rows = [r for r in args.rows.split(',') if r] or list(study.rows)
  unknown = [r for r in rows if r not in study.rows]
  if unknown:
    raise ConfigError(
      f'--rows: {unknown[0]!r} is not a row of {args.study}; rows: {list(study.rows)}'
    )
  try:
    seeds = [int(s) for s in args.seeds.split(',')]
  except ValueError as e:
    raise ConfigError(f'--seeds={args.seeds!r}: expected comma-separated integers') from e
  runs = {row: {} for row in rows}
  for seed in seeds:  # seed-major: a study cut short stays balanced across rows
    for row in rows:
      workdir = os.path.join(args.runs, args.study, row, f'seed{seed}')
      runs[row][seed] = run_once(config, study.rows[row], seed, workdir)
  report = {
    'study': args.study,
    'config': config,
    'seeds': seeds,
    'overrides': {row: study.rows[row] for row in rows},
    'rows': {row: summarise(runs[row]) for row in rows},
  }
  report['ordering'] = check_ordering(study, report)
  out = args.out or os.path.join(ROOT, 'benchmarks', 'results', f'ablations_{args.study}')
  table = markdown_table(args.study, report)
  print(table)
  save_report(report, out + '.json')
  with open(out + '.md', 'w', encoding='utf-8') as f:
    f.write(table)
  print(f'saved {out}.md')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, usage=__doc__))

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
"""

from __future__ import annotations

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

STUDIES = {
  'attention': {
    'projected': {'model.adjacency': 'projected'},
    'raw_correspondence': {'model.adjacency': 'raw_correspondence'},
    'cosine_correspondence': {'model.adjacency': 'cosine_correspondence'},
  },
}
METRICS = ('rank1', 'mAP', 'mINP')


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_enum('study', None, list(STUDIES), 'Which study.', flag_values=flag_values)
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.', flag_values=flag_values)
  flags.DEFINE_string('rows', '', 'Comma-separated rows (default: all).', flag_values=flag_values)
  flags.DEFINE_string('config', 'configs/synthetic.py', 'Base config.', flag_values=flag_values)
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
  return {'results': results, 'diagnostics': found}


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
  return '\n'.join(lines) + '\n'


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  study = STUDIES[args.study]
  rows = [r for r in args.rows.split(',') if r] or list(study)
  unknown = [r for r in rows if r not in study]
  if unknown:
    raise ConfigError(f'--rows: {unknown[0]!r} is not a row of {args.study}; rows: {list(study)}')
  try:
    seeds = [int(s) for s in args.seeds.split(',')]
  except ValueError as e:
    raise ConfigError(f'--seeds={args.seeds!r}: expected comma-separated integers') from e
  runs = {row: {} for row in rows}
  for seed in seeds:  # seed-major: a study cut short stays balanced across rows
    for row in rows:
      workdir = os.path.join(args.runs, args.study, row, f'seed{seed}')
      runs[row][seed] = run_once(args.config, study[row], seed, workdir)
  report = {
    'study': args.study,
    'config': args.config,
    'seeds': seeds,
    'overrides': {row: study[row] for row in rows},
    'rows': {row: summarise(runs[row]) for row in rows},
  }
  out = args.out or os.path.join(ROOT, 'benchmarks', 'results', f'ablations_{args.study}')
  table = markdown_table(args.study, report)
  print(table)
  save_report(report, out + '.json')
  with open(out + '.md', 'w', encoding='utf-8') as f:
    f.write(table)
  print(f'saved {out}.md')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, usage=__doc__))

"""Training studies: rows of config overrides trained over seeds; mean ± std, printed and saved.

  python benchmarks/ablations.py --study=attention --seeds=0,1,2
  python benchmarks/ablations.py --study=attention --seeds=0 --rows=raw_correspondence
  python benchmarks/ablations.py --study=table2 --row mutual=model.adjacency=mutual_topk
  python benchmarks/ablations.py --study=my_study.py          # a study file of your own

A study is a file (`configs/studies/<name>.py`, or any path) whose
`get_study()` returns {'config': base config file, 'rows': {row name:
{config field: value}}, 'ordering': ((lower row, '<' or '<=', higher row),
...)}. `--row name=field=value,field=value` adds a row (or replaces one) from
the command line; `--rows` trains a subset; `--report_only` trains nothing
and reports what is kept (e.g. while the study runs elsewhere).

Each (row, seed) trains the base config (`--config` replaces it) with the
row's overrides and `config.seed`, by running train.py into
`<runs>/<study>/<row>/seed<k>`, final evaluation included. What a finished
run reports (its evaluation rows and diagnostics, a few KB) is kept in the
repository, `benchmarks/results/studies/<study>/<row>/seed<k>.json` (`--kept`
puts them elsewhere, e.g. for a study of your own): a row
whose seeds are kept there is not trained again, so a new row joins a
study's table without retraining the others, and an interrupted study
resumes where it stopped (train.py also resumes an interrupted run from its
last checkpoint). A kept summary whose overrides or base config differ from
the row's is an error, not a silent reuse. Runs go seed by seed, so a study
cut short is still balanced.

The report (`benchmarks/study_report.py`) averages every evaluation row
(individual, clue_alignment, cacenet) and every diagnostic
(`cace_jax/evaluation/diagnostics.py`) over the seeds of every row kept for
the study, and compares every pair of rows seed by seed on their individual
embeddings (the rows of one seed share batches and initial values;
`benchmarks/paired.py`: mean difference and 95% t interval, overall and
within families): `<out>.json` and a markdown table `<out>.md`. A report
that lacks a row of the study file or a seed of a row is written beside them
as `<out>.partial.json` / `.md`, never over them. The numbers are on the
dataset's test split: they report, they do not choose. Relative paths are
the caller's: `--runs`, `--out`, `--kept`, `--config` and a study file are
resolved against the directory the command runs in.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import paired, study_report  # pylint: disable=wrong-import-position
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import plugins  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.errors import ConfigError, RunFailure  # pylint: disable=wrong-import-position
from cace_jax.evaluation import diagnostics  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_DIR = os.path.join(ROOT, 'configs', 'studies')
KEPT = os.path.join(ROOT, 'benchmarks', 'results', 'studies')


@dataclasses.dataclass(frozen=True)
class Study:
  """Rows of config overrides trained on one base config.

  Attributes:
    name: the study's name (its file's, without .py).
    config: the base config file (`--config` overrides it).
    rows: {row name: {config field: value}}.
    ordering: the paper's claim about the rows, as (lower row, relation,
      higher row) triples compared on each row's headline mAP (`headline_row`).
  """

  name: str
  config: str
  rows: dict
  ordering: tuple = ()


def study_names() -> list[str]:
  """The studies of configs/studies/."""
  return sorted(
    os.path.basename(path)[:-3]
    for path in glob.glob(os.path.join(STUDY_DIR, '*.py'))
    if not os.path.basename(path).startswith('_')
  )


def load_study(spec: str) -> Study:
  """A study by name (configs/studies/<name>.py) or by file path (the caller's directory)."""
  path = spec if spec.endswith('.py') else os.path.join(STUDY_DIR, f'{spec}.py')
  if not os.path.isfile(path):
    raise ConfigError(
      f'--study={spec}: no such study file; the studies are {", ".join(study_names())} '
      '(or give a .py file)'
    )
  name = os.path.basename(path)[:-3]
  module_spec = importlib.util.spec_from_file_location(f'study_{name}', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    found = module.get_study()
    study = Study(name, found['config'], dict(found['rows']), tuple(found.get('ordering', ())))
  except (AttributeError, KeyError, TypeError, SyntaxError) as e:
    raise ConfigError(
      f'{path}: a study file defines get_study() returning {{"config", "rows"[, "ordering"]}} '
      f'({type(e).__name__}: {e})'
    ) from e
  for row, overrides in study.rows.items():
    if not isinstance(overrides, dict):
      raise ConfigError(f'{path}: row {row!r}: expected a dict of config overrides')
  return study


def parse_row(text: str) -> tuple[str, dict]:
  """'name=model.gcn=none,model.topk=2' -> ('name', {'model.gcn': 'none', 'model.topk': '2'})."""
  name, _, rest = text.partition('=')
  overrides = {}
  for item in filter(None, rest.split(',')):
    field, equals, value = item.partition('=')
    if not equals or not field:
      raise ConfigError(f'--row={text}: expected name=field=value[,field=value...]')
    overrides[field] = value
  if not name or not name.replace('_', '').isalnum():
    raise ConfigError(f'--row={text}: the row name must be letters, digits and _')
  return name, overrides


def studies_help() -> str:
  """The studies and their rows, for --help."""
  lines = ['Studies (configs/studies/):']
  for name in study_names():
    try:
      study = load_study(name)
    except ConfigError as e:
      lines.append(f'  {name}: {e}')
      continue
    lines.append(f'  {name} (on {study.config}): ' + ', '.join(study.rows))
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'study', None, 'A study name (listed above) or a study .py file.', flag_values=flag_values
  )
  flags.DEFINE_multi_string(
    'row',
    [],
    'An extra row: name=field=value[,field=value...] (repeatable).',
    flag_values=flag_values,
  )
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.', flag_values=flag_values)
  flags.DEFINE_string(
    'rows', '', 'Comma-separated rows to train (default: all).', flag_values=flag_values
  )
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
  flags.DEFINE_string(
    'kept',
    '',
    "Where finished runs' summaries are kept (default benchmarks/results/studies).",
    flag_values=flag_values,
  )
  flags.DEFINE_boolean(
    'report_only',
    False,
    'Train nothing: report the seeds kept so far (a study still running elsewhere).',
    flag_values=flag_values,
  )
  flags.mark_flags_as_required(['study'], flag_values=flag_values)


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' -> [0, 1, 2]; ConfigError naming --seeds otherwise."""
  try:
    return [int(s) for s in text.split(',')]
  except ValueError as e:
    raise ConfigError(f'--seeds={text!r}: expected comma-separated integers') from e


def train_command(config: str, overrides: dict, seed: int, workdir: str) -> list[str]:
  """The train.py command line of one (row, seed)."""
  command = [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}']
  command += [f'--config.{key}={value}' for key, value in overrides.items()]
  return command + [f'--config.seed={seed}', f'--workdir={workdir}']


def kept_path(study: str, row: str, seed: int, kept: str | None = None) -> str:
  """Where what one (row, seed) run reported is kept (the repository's `KEPT` by default)."""
  return os.path.join(kept or KEPT, study, row, f'seed{seed}.json')


def as_strings(overrides: dict) -> dict:
  """Overrides as the command line gives them (what kept summaries are compared by)."""
  return {field: str(value) for field, value in overrides.items()}


def summary_of(saved: dict, config: str, overrides: dict) -> dict:
  """What a kept summary holds of a run's results.json: metrics, flat diagnostics, K and w."""
  info = saved.get('info', {})
  return {
    'config': config,
    'overrides': as_strings(overrides),
    'step': saved.get('step'),
    'results': saved['results'],
    'diagnostics': diagnostics.flatten(saved.get('diagnostics', {})),
    'info': {k: info[k] for k in ('stage2_k', 'stage2_mix') if k in info},
  }


def run_once(
  study: str,
  row: str,
  config: str,
  overrides: dict,
  seed: int,
  workdir: str,
  kept: str | None = None,
) -> dict:
  """One (row, seed): its kept summary, else its run's results.json, else a training; kept after.

  Raises:
    ConfigError: a kept summary of this row and seed was made with other
      overrides or another base config.
    RunFailure: the training failed.
  """
  kept = kept_path(study, row, seed, kept)
  if os.path.exists(kept):
    with open(kept, encoding='utf-8') as f:
      summary = json.load(f)
    if summary['config'] != config or summary['overrides'] != as_strings(overrides):
      raise ConfigError(
        f'{kept} was made by {summary["config"]} with {summary["overrides"]}, but row {row!r} is '
        f'{config} with {as_strings(overrides)}: name the row differently, or delete that file '
        'to train it again'
      )
    return summary
  results = os.path.join(workdir, 'results.json')
  if not os.path.exists(results):
    os.makedirs(workdir, exist_ok=True)
    command = train_command(config_file(config), overrides, seed, workdir)
    print(' '.join(command), flush=True)
    start = time.time()
    with open(os.path.join(workdir, 'train.log'), 'a', encoding='utf-8') as log:
      code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0 or not os.path.exists(results):
      raise RunFailure(
        f'training {row} seed {seed} failed (exit {code}, no {results}); '
        f'see {os.path.join(workdir, "train.log")}'
      )
    print(f'  done in {time.time() - start:.0f} s', flush=True)
  with open(results, encoding='utf-8') as f:
    summary = summary_of(json.load(f), config, overrides)
  return save_report(summary, kept)  # as kept: dated, naming its command


def config_file(config: str) -> str:
  """A config path as train.py (run from the repository root) finds it: the repository's
  configs first, else the caller's directory."""
  if os.path.isabs(config):
    return config
  in_repository = os.path.join(ROOT, config)
  return in_repository if os.path.exists(in_repository) else os.path.abspath(config)


def with_callers_plugins(overrides: dict) -> dict:
  """Overrides with `model.plugins` files read as the caller's paths (`as_given`)."""
  if 'model.plugins' not in overrides:
    return overrides
  names = plugins.split(str(overrides['model.plugins']))
  given = [as_given(name) if plugins.is_file(name) else name for name in names]
  return {**overrides, 'model.plugins': ','.join(given)}


def as_given(path: str) -> str:
  """A path of the caller's, absolute; inside the repository, relative to its root (kept so)."""
  path = os.path.abspath(path)
  inside = os.path.relpath(path, ROOT)
  return path if inside.startswith('..') else inside


def kept_rows(study: str, kept: str | None = None) -> list[str]:
  directory = os.path.join(kept or KEPT, study)
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def kept_seeds(study: str, row: str, seeds: list[int], kept: str | None = None) -> dict[int, dict]:
  found = {}
  for seed in seeds:
    path = kept_path(study, row, seed, kept)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        found[seed] = json.load(f)
  return found


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  study = load_study(args.study)
  rows = dict(study.rows)
  for text in args.row:
    name, overrides = parse_row(text)
    rows[name] = overrides
  rows = {name: with_callers_plugins(overrides) for name, overrides in rows.items()}
  config = as_given(args.config) if args.config else study.config
  if not os.path.isfile(config_file(config)):
    raise ConfigError(f'{config}: no such config file (the base config of {study.name})')
  to_train = [r for r in args.rows.split(',') if r] or list(rows)
  unknown = [r for r in to_train if r not in rows]
  if unknown:
    raise ConfigError(
      f'--rows: {unknown[0]!r} is not a row of {study.name}; rows: {", ".join(rows)}'
    )
  seeds = parse_seeds(args.seeds)
  runs_dir = os.path.abspath(args.runs)
  kept = os.path.abspath(args.kept) if args.kept else None  # None: the repository's KEPT
  for seed in seeds if not args.report_only else ():  # seed-major: a cut-short study stays balanced
    for row in to_train:
      workdir = os.path.join(runs_dir, study.name, row, f'seed{seed}')
      run_once(study.name, row, config, rows[row], seed, workdir, kept)
  # The table: every row of the study file, every row trained now, every row kept before.
  shown = list(rows) + [r for r in kept_rows(study.name, kept) if r not in rows]
  per_row = {row: kept_seeds(study.name, row, seeds, kept) for row in shown}
  per_row = {row: found for row, found in per_row.items() if found}
  complete = set(study.rows) <= set(per_row) and all(
    sorted(found) == sorted(seeds) for found in per_row.values()
  )
  report = {
    'study': study.name,
    'config': config,
    'seeds': seeds,
    'overrides': {row: next(iter(found.values()))['overrides'] for row, found in per_row.items()},
    'seeds_by_row': {row: sorted(found) for row, found in per_row.items()},
    'rows': {row: study_report.summarise(found) for row, found in per_row.items()},
  }
  report['ordering'] = study_report.check_ordering(study.ordering, report)
  report['paired'] = paired.compare(per_row)  # every pair of rows, on their own embeddings
  out = args.out or os.path.join(ROOT, 'benchmarks', 'results', f'ablations_{study.name}')
  out = os.path.abspath(out) + ('' if complete else '.partial')
  table = study_report.markdown_table(study.name, report)
  print(table)
  if not complete:
    print(f'not every row of {study.name} has every seed: the report goes beside the full one')
  save_report(report, out + '.json')
  with open(out + '.md', 'w', encoding='utf-8') as f:
    f.write(table)
  print(f'saved {out}.md')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, usage=__doc__ + '\n' + studies_help()))

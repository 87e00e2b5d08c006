"""Stage 2 as a policy, over a study's trained runs: every query, or only the least confident ones.

  python benchmarks/stage2_policies.py --study=occlusion --seeds=0,1,2,3,4,5,6,7
  python benchmarks/stage2_policies.py --study=regulariser --seeds=0,1,2,3,4,5,6,7 \\
      --shift=synthetic_details/occluded

For every (row, seed) that `ablations.py` trained into `<runs>/<study>/<row>/seed<k>`,
on its last checkpoint:
  * on the run's own validation split, the (K, w, fraction) grid of
    `selection.select_stage2` is scored once; 'blanket' is its best row that
    re-sorts every query (fraction 1: what the paper's inference does),
    'selective' its best row overall (the fraction may be anything in
    `eval.stage2_fraction_grid`, 0 included);
  * each test set (the run's own dataset and, with `--shift`, another
    dataset's test split: the same model, no training on it) is embedded and
    its pairs scored once, and ranked by the individual embedding and by both
    policies, with the gates validation chose. Within-family retrieval is
    measured on the same rankings (`diagnostics.family_retrieval`).
Models without a pair stage get the individual row only.

Each (row, seed) is kept as `benchmarks/results/studies/<study>/<row>/seed<k>.policies.json`
(not evaluated again; `--kept` moves them) and the report, `<out>.json` and
`<out>.md` (default `benchmarks/results/stage2_policies_<study>`), gives per
row and test set the mean ± std of every policy and the paired differences
(`paired.py`: same seeds, 95% t interval): each policy against the
individual embedding of the same model and of every row without a pair
stage, and selective against blanket. Validation chooses; the test split
only reports.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
import tempfile

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import ablations, experiment_tables, paired, study_report  # pylint: disable=wrong-import-position
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import sharding  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.data import split_data  # pylint: disable=wrong-import-position
from cace_jax.errors import ConfigError  # pylint: disable=wrong-import-position
from cace_jax.evaluation import (  # pylint: disable=wrong-import-position
  diagnostics,
  metrics,
  ranking,
  records,
  selection,
  stage2,
  two_stage,
)
from cace_jax.runs import checkpoint  # pylint: disable=wrong-import-position
from configs import default  # pylint: disable=wrong-import-position

POLICIES = ('blanket', 'selective')


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('study', None, 'A study name or .py file.', flag_values=flag_values)
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.', flag_values=flag_values)
  flags.DEFINE_string(
    'runs', 'runs/ablations', "Directory of the study's runs.", flag_values=flag_values
  )
  flags.DEFINE_string(
    'shift', '', 'Another dataset whose test split every run is also scored on.',
    flag_values=flag_values,
  )  # fmt: skip
  flags.DEFINE_string('out', '', 'Report path without extension.', flag_values=flag_values)
  flags.DEFINE_string(
    'kept', '', 'Where per-run results are kept (default benchmarks/results/studies).',
    flag_values=flag_values,
  )  # fmt: skip
  flags.mark_flags_as_required(['study'], flag_values=flag_values)


def blanket_and_selective(choice: records.Stage2Choice) -> dict[str, dict]:
  """{'blanket', 'selective'}: the best grid row at fraction 1, and the best row of all.

  Both by validation mAP then R-1, the first of equals in grid order (smaller
  K, w, fraction), as `select_stage2` chooses.
  """
  every_query = [row for row in choice.grid if row['fraction'] == 1.0]
  return {'blanket': selection.best_row(every_query), 'selective': choice.grid_row()}


def rank_metrics(distmat, query, gallery) -> dict:
  """{'mAP', 'rank1', 'family_mAP', 'family_rank1'} (percent) of one ranking.

  Within families: the same ranking restricted to each query's family.
  """
  found = ranking.measure(distmat, query, gallery)[0]
  scores = {'mAP': found['mAP'], 'rank1': found['rank1']}
  if query.families is not None and gallery.families is not None:
    ids = (query.pids, gallery.pids, query.camids, gallery.camids)
    within = diagnostics.family_retrieval(distmat, *ids, query.families, gallery.families)
    scores.update(family_mAP=within['mAP'], family_rank1=within['rank1'])
  return scores


def score_test_set(run, splits, config, mesh, policies: dict[str, dict]) -> dict:
  """The individual row and each policy's row on one test set, pairs scored once.

  Returns:
    {'individual': rank_metrics, policy: {**rank_metrics, 'k', 'mix',
    'fraction', 'max_similarity', 'queries_resorted', 'num_query'}}.
  """
  query, gallery = splits
  pair_stage = bool(policies)
  with tempfile.TemporaryDirectory(prefix='policies_') as cache_dir:
    q, g = ranking.extract_both(
      run.model, run.variables, splits, config, mesh, pair_stage, cache_dir
    )
    base = metrics.cosine_distance(q.embeddings, g.embeddings)
    found = {'individual': rank_metrics(base, query, gallery)}
    if pair_stage:
      pair_distances = stage2.make_pair_distances(
        run.model, run.variables, stage2.conditional_distance, q.cache, g.cache, mesh, g.held
      )
      ranker = two_stage.TwoStageRanker(
        base, pair_distances, max(p['k'] for p in policies.values())
      )
      for name, policy in policies.items():
        gate = two_stage.least_confident(base, policy['max_similarity'])
        ranked = ranker.distances(policy['k'], policy['mix'], gate)
        found[name] = {
          **rank_metrics(ranked, query, gallery),
          **{key: policy[key] for key in ('k', 'mix', 'fraction', 'max_similarity')},
          'queries_resorted': int(gate.sum()) if policy['mix'] > 0 else 0,  # w = 0: none
          'num_query': len(gate),
        }
  return found


def evaluate_run(workdir: str, shift: str, mesh) -> dict:
  """What one trained run gives under each policy, on its test set and on `shift`'s."""
  run = checkpoint.load_run(workdir, None, None, mesh)
  config = copy.deepcopy(run.config)
  config.eval.diagnostics = False
  # Runs recorded before selective stage 2 read as fraction 1 only: score today's grid.
  config.eval.stage2_fraction_grid = default.get_config().eval.stage2_fraction_grid
  builder = split_data.prepare_on_first_process(config)
  policies, choice = {}, None
  if run.model.pair_stage:
    validation = split_data.load_training_splits(builder, config.data).validation
    if validation is None:
      raise ConfigError(f'{workdir}: trained without data.validation_ids; nothing to choose on')
    choice = selection.select_stage2(run.model, run.variables, validation, config, mesh)
    policies = blanket_and_selective(choice)
  tests = {config.data.dataset: split_data.load_eval_splits(builder, config.data.dataset)}
  if shift:
    shifted = split_data.prepare_on_first_process(config, shift)
    tests[shift] = split_data.load_eval_splits(shifted, shift)
  return {
    'workdir': workdir,
    'step': run.step,
    'validation': {
      'individual': choice.individual if choice else None,
      **{name: dict(row) for name, row in policies.items()},
    },
    'tests': {
      name: score_test_set(run, splits, config, mesh, policies) for name, splits in tests.items()
    },
  }


def policies_path(study: str, row: str, seed: int, kept: str | None) -> str:
  return ablations.kept_path(study, row, seed, kept)[: -len('.json')] + '.policies.json'


def has_tests(path: str, shift: str) -> bool:
  """Whether a kept result exists and has the shifted test set asked for."""
  if not os.path.exists(path):
    return False
  with open(path, encoding='utf-8') as f:
    return not shift or shift in json.load(f)['tests']


def policy_rows(found: dict) -> list[str]:
  """The rows a run was scored by: 'individual', then the policies it has."""
  return ['individual'] + [name for name in POLICIES if name in found]


def report_of(study: str, per_row: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
  """Mean ± std of each (row, test set, policy), and the paired differences that matter."""
  # In the order the runs hold them: each run's own test set first, then the shift.
  tests = dict.fromkeys(
    name for runs in per_row.values() for r in runs.values() for name in r['tests']
  )
  report = {'study': study, 'seeds': seeds, 'tests': {}}
  for test in tests:
    scores = {  # {(row, policy): {seed: {'results': {'individual': metrics}, 'diagnostics': ...}}}
      (row, policy): {
        seed: as_summary(found['tests'][test][policy]) for seed, found in runs.items()
      }
      for row, runs in per_row.items()
      for policy in policy_rows(next(iter(runs.values()))['tests'][test])
    }
    rows = {
      f'{row} / {policy}': {
        name: study_report.mean_std([s['results']['individual'][name] for s in by_seed.values()])
        for name in ('mAP', 'rank1')
      }
      for (row, policy), by_seed in scores.items()
    }
    for (row, policy), label in zip(scores, rows):
      if policy != 'individual':  # the share of the test queries the gate passed
        found = [run['tests'][test][policy] for run in per_row[row].values()]
        shares = [100.0 * f['queries_resorted'] / f['num_query'] for f in found]
        rows[label]['queries_resorted'] = study_report.mean_std(shares)
    pairs = []
    for (row_a, policy_a), (row_b, policy_b) in itertools.combinations(scores, 2):
      same_model = row_a == row_b
      individual_only = (row_a, 'blanket') not in scores  # a model without a pair stage
      against_individual_only = individual_only and policy_b != 'individual'
      both_individual = policy_a == policy_b == 'individual'
      if same_model or against_individual_only or both_individual:
        pairs.append((f'{row_a} / {policy_a}', f'{row_b} / {policy_b}'))
    # Each model's own embeddings first, then stage 2 within each model, then against
    # the models without a pair stage.
    order = lambda pair: (
      not pair[0].endswith('/ individual') or not pair[1].endswith('/ individual'),
      pair[0].split(' / ')[0] != pair[1].split(' / ')[0],
    )
    pairs.sort(key=order)
    named = {f'{row} / {policy}': by_seed for (row, policy), by_seed in scores.items()}
    report['tests'][test] = {'rows': rows, 'paired': paired.compare(named, pairs)}
  return report


def as_summary(scored: dict) -> dict:
  """One policy's scores in the kept-summary form `paired.compare` reads."""
  return {
    'results': {'individual': {'mAP': scored['mAP'], 'rank1': scored['rank1']}},
    'diagnostics': {
      f'family_retrieval/individual/{name}': scored[f'family_{name}']
      for name in ('mAP', 'rank1')
      if f'family_{name}' in scored
    },
  }


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  study = ablations.load_study(args.study)
  seeds = ablations.parse_seeds(args.seeds)
  kept = os.path.abspath(args.kept) if args.kept else None
  mesh = sharding.make_mesh()
  per_row = {}
  for seed in seeds:
    for row in study.rows:
      path = policies_path(study.name, row, seed, kept)
      workdir = os.path.join(os.path.abspath(args.runs), study.name, row, f'seed{seed}')
      if not has_tests(path, args.shift):
        if not os.path.exists(os.path.join(workdir, 'results.json')):
          print(f'{row} seed {seed}: not trained yet ({workdir}); left out', flush=True)
          continue
        print(f'{row} seed {seed}: scoring {workdir}', flush=True)
        save_report(evaluate_run(workdir, args.shift, mesh), path)
      with open(path, encoding='utf-8') as f:
        per_row.setdefault(row, {})[seed] = json.load(f)
  if not per_row:
    raise ConfigError(f'{study.name}: no trained run under {args.runs} for seeds {seeds}')
  report = report_of(study.name, per_row, seeds)
  complete = set(per_row) == set(study.rows) and all(sorted(r) == seeds for r in per_row.values())
  out = args.out or os.path.join(
    ablations.ROOT, 'benchmarks', 'results', f'stage2_policies_{study.name}'
  )
  out = os.path.abspath(out) + ('' if complete else '.partial')
  table = experiment_tables.policies_markdown(report)
  print(table)
  save_report(report, out + '.json')
  with open(out + '.md', 'w', encoding='utf-8') as f:
    f.write(table)
  print(f'saved {out}.md')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, usage=__doc__))

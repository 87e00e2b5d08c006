"""benchmarks/ablations.py and paired.py: study bookkeeping and statistics (no training here)."""

import json
import os

import jax
import numpy as np
import pytest

from benchmarks import ablations, paired, study_report
from cace_jax.models import build_model
from cace_jax.train import train_step
from configs import tiny


def fake_results(map_value, selectivity=None):
  metrics = {'rank1': map_value + 5, 'rank5': 99.0, 'rank10': 99.5, 'mAP': map_value, 'mINP': 50.0}
  found = {'hard_pair_auc': {'individual': 0.9}}
  if selectivity is not None:
    found['alignment_selectivity'] = selectivity
  return {'results': {'individual': metrics, 'cacenet': metrics}, 'diagnostics': found}


def test_summary_is_mean_and_sample_std_over_seeds_with_shared_diagnostics():
  summary = study_report.summarise({0: fake_results(80.0, 0.5), 1: fake_results(84.0)})
  entry = summary['results']['cacenet']['mAP']
  assert entry['mean'] == 82.0 and entry['std'] == pytest.approx(np.std([80, 84], ddof=1))
  assert entry['values'] == [80.0, 84.0]
  # alignment_selectivity is missing for seed 1: left out rather than averaged over one seed.
  assert set(summary['diagnostics']) == {'hard_pair_auc/individual'}
  table = study_report.markdown_table(
    'attention', {'config': 'c.py', 'seeds': [0, 1], 'rows': {'projected': summary}}
  )
  assert '| projected | cacenet | 87.00 ± 2.83 | 82.00 ± 2.83 | 50.00 ± 0.00 |' in table
  assert '0.900 ± 0.000' in table


def test_a_run_with_results_is_kept_and_not_trained_again(tmp_path, monkeypatch):
  monkeypatch.setattr(ablations, 'KEPT', str(tmp_path / 'kept'))
  workdir = tmp_path / 'row' / 'seed0'
  workdir.mkdir(parents=True)
  (workdir / 'results.json').write_text(json.dumps(fake_results(70.0)))
  monkeypatch.setattr(ablations.subprocess, 'call', lambda *a, **k: pytest.fail('trained again'))
  overrides = {'model.topk': 2}
  found = ablations.run_once('s', 'row', 'configs/synthetic.py', overrides, 0, str(workdir))
  assert found['results']['cacenet']['mAP'] == 70.0
  assert found['diagnostics'] == {'hard_pair_auc/individual': 0.9}  # flat, as summarise reads
  kept = ablations.kept_path('s', 'row', 0)
  assert json.load(open(kept))['overrides'] == {'model.topk': '2'}
  # Kept: found again without the run; a different row of the same name is refused.
  os.remove(workdir / 'results.json')
  again = ablations.run_once('s', 'row', 'configs/synthetic.py', {'model.topk': '2'}, 0, 'gone')
  assert again == found
  with pytest.raises(ablations.ConfigError, match='name the row differently'):
    ablations.run_once('s', 'row', 'configs/synthetic.py', {'model.topk': 3}, 0, 'gone')
  command = ablations.train_command('configs/synthetic.py', {'model.gcn': 'none'}, 2, 'w')
  assert command[1:] == [
    os.path.join(ablations.ROOT, 'train.py'),
    '--config=configs/synthetic.py',
    '--config.model.gcn=none',
    '--config.seed=2',
    '--workdir=w',
  ]


STUDY_FILE = """
def get_study():
  return {'config': 'configs/synthetic.py', 'rows': {'a': {}, 'b': {'model.gcn': 'none'}}}
"""


def test_a_new_row_joins_the_table_without_retraining_the_others(tmp_path, monkeypatch, capsys):
  """Rows from the command line; kept rows reused; relative paths are the caller's; a partial
  report goes beside the full one."""
  from conftest import run_tool

  monkeypatch.setattr(ablations, 'KEPT', str(tmp_path / 'kept'))
  caller = tmp_path / 'caller'
  caller.mkdir()
  (caller / 'mine.py').write_text(STUDY_FILE)
  for row, value in (('a', 80.0), ('b', 70.0)):
    for seed in (0, 1):
      kept = ablations.summary_of(fake_results(value + seed), 'configs/synthetic.py', {})
      kept['overrides'] = ablations.as_strings(
        ablations.load_study(str(caller / 'mine.py')).rows[row]
      )
      ablations.save_report(kept, ablations.kept_path('mine', row, seed))
  trained = []

  def fake_train(command, stdout, stderr, cwd):  # writes what train.py would
    workdir = command[-1].split('=', 1)[1]
    assert os.path.isabs(workdir) and workdir.startswith(str(caller / 'runs')), workdir
    trained.append(command)
    results = fake_results(90.0 + int(command[-2].split('=')[1]))
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f)
    return 0

  monkeypatch.setattr(ablations.subprocess, 'call', fake_train)
  monkeypatch.chdir(caller)
  args = ['--study=mine.py', '--runs=runs', '--out=report', '--seeds=0,1']
  assert run_tool(ablations, args + ['--row=c=model.topk=2', '--rows=c']) == 0
  assert [c[2:4] for c in trained] == [
    ['--config=' + os.path.join(ablations.ROOT, 'configs/synthetic.py'), '--config.model.topk=2']
  ] * 2
  report = json.load(open(caller / 'report.json'))
  assert list(report['rows']) == ['a', 'b', 'c']
  assert report['rows']['c']['results']['cacenet']['mAP']['values'] == [90.0, 91.0]
  assert report['rows']['a']['results']['cacenet']['mAP']['values'] == [80.0, 81.0]
  assert '| c | cacenet |' in (caller / 'report.md').read_text()
  # A seed that rows a and b lack: the report is partial and does not replace the full one.
  full = (caller / 'report.md').read_text()
  assert run_tool(ablations, args[:3] + ['--seeds=0,1,2', '--row=c=model.topk=2', '--rows=c']) == 0
  assert (caller / 'report.md').read_text() == full
  partial = json.load(open(caller / 'report.partial.json'))
  assert partial['seeds_by_row'] == {'a': [0, 1], 'b': [0, 1], 'c': [0, 1, 2]}
  assert 'the report goes beside the full one' in capsys.readouterr().out
  # --report_only trains nothing: seed 3 is simply not there yet.
  trained.clear()
  assert run_tool(ablations, args[:3] + ['--seeds=0,1,3', '--report_only']) == 0
  assert not trained
  partial = json.load(open(caller / 'report.partial.json'))
  assert partial['seeds_by_row'] == {'a': [0, 1], 'b': [0, 1], 'c': [0, 1]}
  assert [(p['a'], p['b'], p['seeds']) for p in partial['paired']] == [
    ('a', 'b', [0, 1]),
    ('a', 'c', [0, 1]),
    ('b', 'c', [0, 1]),
  ]


def test_study_errors_name_the_problem(tmp_path):
  from conftest import run_tool

  assert run_tool(ablations, ['--study=nonsense']) == 2
  with pytest.raises(
    ablations.ConfigError, match='the studies are attention, occlusion, regulariser, table1, table2'
  ):
    ablations.load_study('nonsense')
  with pytest.raises(ablations.ConfigError, match='expected name=field=value'):
    ablations.parse_row('x=model.gcn')
  assert ablations.parse_row('x=model.gcn=none,model.topk=2') == (
    'x',
    {'model.gcn': 'none', 'model.topk': '2'},
  )
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_study():\n  return {"rows": {}}\n')
  with pytest.raises(ablations.ConfigError, match='broken.py: a study file defines get_study'):
    ablations.load_study(str(broken))


def test_help_lists_the_studies_and_their_rows():
  listed = ablations.studies_help()
  assert 'table1 (on configs/synthetic_pairs.py): individual, individual_gcn' in listed
  assert 'attention' in listed and 'table2' in listed


def scored(individual, cacenet=None, family=None):
  """A results.json with an individual row, optionally a cacenet row and family retrieval."""
  row = lambda m: {'rank1': m, 'rank5': m, 'rank10': m, 'mAP': m, 'mINP': m}
  results = {'individual': row(individual)}
  found = {}
  if cacenet is not None:
    results['cacenet'] = row(cacenet)
  if family is not None:
    found['family_retrieval'] = {
      'individual': {'mAP': family[0], 'rank1': 0.0},
      'cacenet': {'mAP': family[1], 'rank1': 0.0},
    }
  return {'results': results, 'diagnostics': found}


def test_gains_are_per_seed_differences_within_each_run():
  summary = study_report.summarise(
    {0: scored(80.0, 83.0, (70.0, 76.0)), 1: scored(82.0, 81.0, (72.0, 74.0))}
  )
  assert summary['gains']['mAP']['values'] == [3.0, -1.0]
  assert summary['gains']['family_mAP']['values'] == [6.0, 2.0]
  table = study_report.markdown_table(
    'table1', {'config': 'c', 'seeds': [0, 1], 'rows': {'x': summary}}
  )
  # Two seeds: t(0.975, 1) = 12.71, so the interval is wide and crosses zero.
  assert '| x | +1.00 [-24.41, +26.41] | +4.00 [-21.41, +29.41] | no |' in table
  assert study_report.summarise({0: scored(80.0)})['gains'] == {}


def test_ordering_compares_headline_rows_and_says_whether_each_claim_holds():
  rows = {
    'individual': study_report.summarise({0: scored(80.0), 1: scored(82.0)}),
    # Its individual row is higher, but a pair model is scored by its cacenet row.
    'individual_gcn': study_report.summarise({0: scored(95.0, 81.0), 1: scored(95.0, 83.0)}),
    'normal_gcn': study_report.summarise({0: scored(80.0, 79.0), 1: scored(80.0, 81.0)}),
  }
  checks = study_report.check_ordering(ablations.load_study('table1').ordering, {'rows': rows})
  assert [c['claim'] for c in checks] == [
    'individual < individual_gcn',
    'individual_gcn <= normal_gcn',
  ]  # discrepancy_gcn was not run: its claim is left out
  assert checks[0]['holds'] and checks[0]['lower']['mean'] == 81.0
  assert checks[0]['higher']['mean'] == 82.0
  assert not checks[1]['holds']
  report = {'config': 'c', 'seeds': [0, 1], 'rows': rows, 'ordering': checks}
  table = study_report.markdown_table('table1', report)
  assert '- individual < individual_gcn: 81.00 ± 1.41 vs 82.00 ± 1.41: holds' in table
  assert 'individual_gcn <= normal_gcn: 82.00 ± 1.41 vs 80.00 ± 1.41: does not hold' in table


def test_every_study_row_names_config_fields_that_exist():
  from configs import default

  fields = default.get_config()
  for name in ablations.study_names():
    study = ablations.load_study(name)
    assert os.path.exists(os.path.join(ablations.ROOT, study.config)), name
    for row, overrides in study.rows.items():
      for path in overrides:
        section, field = path.split('.')
        assert field in fields[section], (name, row, path)


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
  found = paired.paired_difference([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 3.0, 7.0])
  # Differences 1, 2, 0, 3: mean 1.5, s 1.291; t(0.975, 3) = 3.182; half width 2.054.
  assert found['values'] == [1.0, 2.0, 0.0, 3.0] and found['n'] == 4
  assert found['mean'] == pytest.approx(1.5) and found['std'] == pytest.approx(1.2910, abs=1e-4)
  assert (found['low'], found['high']) == pytest.approx((-0.554, 3.554), abs=1e-3)
  assert not found['excludes_zero']
  # The same differences shifted up by 3 exclude zero; each row's own spread does not matter.
  assert paired.paired_difference([0.0, 10.0, 20.0, 30.0], [4.0, 15.0, 23.0, 36.0])['excludes_zero']
  one = paired.paired_difference([1.0], [2.0])
  assert one['low'] is None and not one['excludes_zero']
  assert paired.format_difference(one) == '+1.00'
  with pytest.raises(ValueError, match='equal, non-zero lengths'):
    paired.paired_difference([1.0], [1.0, 2.0])


def test_compare_pairs_rows_on_the_seeds_both_have():
  per_row = {
    'individual': {0: scored(70.0, family=(60.0, 0.0)), 1: scored(72.0, family=(61.0, 0.0))},
    'cacenet': {
      0: scored(71.0, 80.0, (62.0, 0.0)),
      1: scored(75.0, 80.0, (63.0, 0.0)),
      2: scored(99.0, 99.0, (99.0, 0.0)),  # no partner seed: left out
    },
  }
  per_row = {
    row: {seed: {**found, 'diagnostics': flat(found)} for seed, found in seeds.items()}
    for row, seeds in per_row.items()
  }
  (found,) = paired.compare(per_row)
  assert (found['a'], found['b'], found['seeds']) == ('individual', 'cacenet', [0, 1])
  assert found['mAP']['values'] == [1.0, 3.0]  # individual rows of both models
  assert found['family_mAP']['values'] == [2.0, 2.0]
  line = paired.markdown_lines([found])[-1]
  assert line.startswith('| cacenet − individual (individual) | 2 | +2.00 [')


def flat(found):
  from cace_jax.evaluation import diagnostics

  return diagnostics.flatten(found['diagnostics'])


def test_rows_of_one_seed_start_from_the_same_shared_parameters():
  """What makes a paired comparison paired: a row's extra modules do not move the others' init."""
  config = tiny.get_config()

  def initial(seed, **overrides):
    model = build_model({**config.model.to_dict(), **overrides}, num_classes=9)
    keys = jax.random.split(jax.random.key(seed), 3)
    variables = train_step.init_variables(model, {'params': keys[0], 'dropout': keys[1]}, (64, 32))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(variables)}

  individual, cacenet = initial(0, gcn='none'), initial(0)
  intra = initial(0, adjacency='cosine_intra')
  assert set(individual) < set(cacenet) and set(individual) < set(intra)
  for name, value in individual.items():
    np.testing.assert_array_equal(value, cacenet[name], err_msg=name)
    np.testing.assert_array_equal(value, intra[name], err_msg=name)
  other_seed = initial(1, gcn='none')
  assert any(not np.array_equal(value, other_seed[name]) for name, value in individual.items())

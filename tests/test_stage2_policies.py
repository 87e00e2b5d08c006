"""benchmarks/stage2_policies.py: blanket and selective stage 2 over a study's runs."""

import numpy as np
import pytest

from benchmarks import experiment_tables, paired, stage2_policies
from cace_jax import sharding
from cace_jax.data import split_data
from cace_jax.evaluation import records
from cace_jax.runs import checkpoint
from configs import tiny


def grid_row(k, mix, fraction, mAP, rank1=50.0):
  gate = 1.0 if fraction == 1.0 else 0.5
  return {'k': k, 'mix': mix, 'fraction': fraction, 'max_similarity': gate, 'mAP': mAP,
          'rank1': rank1}  # fmt: skip


def test_blanket_is_the_best_row_at_fraction_one_selective_the_best_of_all():
  grid = [grid_row(5, 0.0, 1.0, 60.0), grid_row(5, 1.0, 1.0, 61.0), grid_row(5, 1.0, 0.25, 63.0)]
  grid += [grid_row(10, 1.0, 1.0, 61.0)]  # equal to an earlier row: the smaller K wins
  choice = records.Stage2Choice(5, 1.0, 0.25, 0.5, grid=grid)
  found = stage2_policies.blanket_and_selective(choice)
  assert found['blanket'] == grid[1] and found['selective'] == grid[2]


def test_within_family_metrics_read_the_ranking_not_stage2_offsets():
  """Stage 2 moves its re-sorted entries far below every distance; within a family only
  the order may count (an offset entry of another family must not jump a family member)."""
  query = split_data.SplitData(
    images=np.array([b''], object),
    labels=np.zeros(1, np.int32),
    pids=np.array([1]),
    camids=np.array([0]),
    file_names=np.array(['q'], object),
    families=np.array([0]),
  )
  gallery = split_data.SplitData(
    images=np.array([b''] * 3, object),
    labels=np.zeros(3, np.int32),
    pids=np.array([2, 1, 3]),
    camids=np.array([1, 1, 1]),
    file_names=np.array(['a', 'b', 'c'], object),
    families=np.array([1, 0, 0]),
  )
  # Gallery 0 (another family) was re-sorted into first place; 2 is a family impostor ahead
  # of the match 1, so within the family the match comes second.
  ranked = np.array([[-10.0 + 0.3, 1.9, 1.5]])
  found = stage2_policies.rank_metrics(ranked, query, gallery)
  assert found['rank1'] == 0.0 and found['mAP'] == pytest.approx(100 / 3)
  assert found['family_rank1'] == 0.0 and found['family_mAP'] == pytest.approx(50.0)


def test_policies_rank_the_test_set_as_their_gates_say(trained_workdir, tiny_data_dir):
  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.eval.diagnostics = False
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(trained_workdir, None, None, mesh)
  builder = split_data.prepare_on_first_process(config)
  splits = split_data.load_eval_splits(builder, 'synthetic_details/tiny')
  policies = {'blanket': grid_row(3, 1.0, 1.0, 0.0), 'selective': grid_row(3, 1.0, 0.5, 0.0)}
  policies['none'] = {**grid_row(3, 1.0, 0.0, 0.0), 'max_similarity': records.NO_QUERY}
  found = stage2_policies.score_test_set(run, splits, config, mesh, policies)
  num_query = len(splits[0])
  assert found['blanket']['queries_resorted'] == found['blanket']['num_query'] == num_query
  assert found['none']['queries_resorted'] == 0
  assert {k: found['none'][k] for k in found['individual']} == found['individual']
  assert 0 <= found['selective']['queries_resorted'] <= num_query
  assert set(found['individual']) == {'mAP', 'rank1', 'family_mAP', 'family_rank1'}


def run_result(individual, blanket=None, selective=None, test='d'):
  scores = lambda m: {'mAP': m, 'rank1': m, 'family_mAP': m, 'family_rank1': m}
  found = {'individual': scores(individual)}
  for name, value in (('blanket', blanket), ('selective', selective)):
    if value is not None:
      found[name] = {**scores(value), 'queries_resorted': 5, 'num_query': 10}
  return {'tests': {test: found}}


def test_report_compares_policies_within_each_model_and_against_the_individual_only_model():
  per_row = {
    'individual': {0: run_result(70.0), 1: run_result(72.0)},
    'cacenet': {0: run_result(71.0, 71.5, 72.0), 1: run_result(73.0, 73.0, 74.5)},
  }
  report = stage2_policies.report_of('s', per_row, [0, 1])
  found = report['tests']['d']
  assert found['rows']['cacenet / selective']['mAP']['values'] == [72.0, 74.5]
  pairs = {(p['a'], p['b']): p['mAP']['values'] for p in found['paired']}
  assert pairs[('cacenet / blanket', 'cacenet / selective')] == [0.5, 1.5]
  assert pairs[('individual / individual', 'cacenet / selective')] == [2.0, 2.5]
  assert pairs[('individual / individual', 'cacenet / individual')] == [1.0, 1.0]
  assert len(pairs) == 6  # 3 within cacenet, 3 against the individual-only model
  table = experiment_tables.policies_markdown(report)
  assert '| cacenet / selective | 73.25 ± 1.77 | 73.25 ± 1.77 | 50 ± 0 |' in table
  assert '| cacenet / individual | 72.00 ± 1.41 | 72.00 ± 1.41 | – |' in table


def test_the_claims_verdict_reads_the_interval_and_names_rankings():
  def verdict(a, b):
    return experiment_tables.verdict(paired.paired_difference(a, b))

  assert verdict([1, 2, 3], [2, 3, 4.5]).startswith('**b better**')
  assert verdict([2, 3, 4.5], [1, 2, 3]).startswith('**b worse**')
  assert verdict([1, 2, 3], [2, 1, 3.5]).startswith('undecided')
  assert verdict([1, 2, 3], [1, 2, 3]) == 'the same ranking quality on every seed'
  assert verdict([1], [2]) == 'one seed: no interval'
  assert experiment_tables.ranking_label('cacenet / selective') == 'cacenet, selective stage 2'
  assert experiment_tables.ranking_label('cacenet / individual') == 'cacenet, stage 1'
  assert experiment_tables.ranking_label('individual') == 'individual, stage 1'

"""Two-stage evaluation: compact caches, results.json, eval.py, K and w chosen on validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cace_jax import sharding
from cace_jax.data import split_data
from cace_jax.errors import ConfigError
from cace_jax.evaluation import (
  command,
  diagnostics,
  ranking,
  records,
  report,
  selection,
  stage2,
  two_stage,
)
from cace_jax.models import CACENet, build_model
from cace_jax.runs import checkpoint
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_is_written_as_results_json_has_always_held_it(tmp_path):
  """The record's JSON is the dict evaluation used to fill: its keys, their order, its values."""
  stage1_only = records.EvaluationInfo(stage2_k=0, seconds_by_process={'stage1': [1.5]})
  assert json.dumps(stage1_only.to_json()) == json.dumps(
    {'stage2_k': 0, 'seconds_by_process': {'stage1': [1.5]}}
  )
  choice = records.Stage2Choice(
    stage2_k=3,
    stage2_mix=0.5,
    individual={'rank1': 50.0, 'mAP': 40.0},
    grid=[{'k': 3, 'mix': 0.5, 'mAP': 45.0, 'rank1': 55.0}],
    num_query=2,
    num_gallery=5,
    pids=[1, 2],
  )
  full = records.EvaluationInfo(
    stage2_k=3,
    seconds_by_process={'stage1': [1.5], 'stage2_pairs': [0.25]},
    stage2_mix=0.5,
    stage2_max_similarity=0.8,
    stage2_queries=1,
    num_query=2,
    processes=1,
    stage2_pairs_scored_by_process=[6],
    gallery_cache_rows_by_process=[5],
    cache_bytes_per_image=128,
    cache_on_disk=False,
    selection=choice,
    cameras=command.NO_CAMERAS,
  )
  expected = {
    'stage2_k': 3,
    'seconds_by_process': {'stage1': [1.5], 'stage2_pairs': [0.25]},
    'stage2_mix': 0.5,
    'stage2_max_similarity': 0.8,
    'stage2_queries': 1,
    'num_query': 2,
    'processes': 1,
    'stage2_pairs_scored_by_process': [6],
    'gallery_cache_rows_by_process': [5],
    'cache_bytes_per_image': 128,
    'cache_on_disk': False,
    'selection': {
      'stage2_k': 3,
      'stage2_mix': 0.5,
      'stage2_fraction': 1.0,
      'stage2_max_similarity': 1.0,
      'individual': {'rank1': 50.0, 'mAP': 40.0},
      'grid': [{'k': 3, 'mix': 0.5, 'mAP': 45.0, 'rank1': 55.0}],
      'num_query': 2,
      'num_gallery': 5,
      'pids': [1, 2],
      'diagnostics': {},
    },
    'cameras': command.NO_CAMERAS,
  }
  assert json.dumps(full.to_json()) == json.dumps(expected)
  evaluation = records.Evaluation({'individual': {'mAP': 1.0}}, {}, {}, full, {'cross_share': 0.5})
  assert list(evaluation.to_json()) == ['results', 'diagnostics', 'info']
  # The API reads the choice back from results.json; a run without one has none.
  path = tmp_path / 'results.json'
  path.write_text(json.dumps({'step': 2, **evaluation.to_json()}))
  assert records.Stage2Choice.from_results(str(path)) == choice
  path.write_text(json.dumps({'info': stage1_only.to_json()}))
  assert records.Stage2Choice.from_results(str(path)) is None
  assert records.Stage2Choice.from_results(str(tmp_path / 'missing.json')) is None
  # A choice written before stage 2 could be selective re-sorted every query.
  older = {k: v for k, v in choice.to_json().items() if not k.startswith('stage2_f')}
  del older['stage2_max_similarity']
  path.write_text(json.dumps({'info': {'selection': older}}))
  assert records.Stage2Choice.from_results(str(path)) == choice
  assert choice.configure(tiny.get_config()).eval.stage2_max_similarity == 1.0


@pytest.mark.parametrize('pooling,adjacency', [('avg', 'projected'), ('gem', 'raw_correspondence')])
def test_compact_cache_equals_full_feature_maps(pooling, adjacency):
  model = CACENet(
    depth='tiny',
    width=8,
    non_local=False,
    pooling=pooling,
    embed_dim=16,
    num_classes=5,
    adjacency=adjacency,
  )
  images = jax.random.normal(jax.random.key(0), (4, 64, 32, 3))
  variables = model.init(jax.random.key(1), images, train=False)
  # o starts at zero (conditional = individual) and W' at ones (query = key):
  # perturb them so the GCN matters and the cache's query differs from its key.
  perturbed = lambda path: any(
    name in jax.tree_util.keystr(path) for name in ('pair_graph', 'w_inter')
  )
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: (
      x + 0.05 * jax.random.normal(jax.random.key(2), x.shape) if perturbed(path) else x
    ),
    variables['params'],
  )
  variables = {'params': params, 'batch_stats': variables['batch_stats']}
  fmap = model.apply(variables, images, train=False)['fmap']
  q, g = jnp.array([0, 0, 1, 3]), jnp.array([1, 2, 3, 2])
  cache = model.apply(variables, fmap, method=CACENet.compute_image_cache)
  take = lambda index: jax.tree.map(lambda c: c[index], cache)
  compact = model.apply(variables, take(q), take(g), method=stage2.conditional_distance)
  full = model.apply(variables, fmap[q], fmap[g], method=CACENet.pair_features)
  normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  expected = 1 - jnp.sum(normalize(full['embedding_uv']) * normalize(full['embedding_vu']), -1)
  np.testing.assert_allclose(compact, expected, rtol=1e-4, atol=1e-5)
  assert float(jnp.std(compact)) > 1e-4  # the pairs really differ

  # The host form between the stages: exact in float32 (with 'query' dropped when it
  # repeats 'key'), close in bfloat16 at half the bytes or less.
  step = stage2.make_pair_step(model, stage2.conditional_distance)
  host = jax.device_get(cache)
  for dtype, tolerance in ((np.float32, 1e-6), (jnp.bfloat16, 2e-2)):
    stored = stage2.compact_cache(host, dtype)
    assert ('query' in stored) == (adjacency == 'raw_correspondence')
    pick = lambda index: jax.tree.map(lambda c: c[np.asarray(index)], stored)
    np.testing.assert_allclose(step(variables, pick(q), pick(g)), compact, atol=tolerance)
  assert stage2.cache_nbytes(
    stage2.compact_cache(host, jnp.bfloat16), 4
  ) <= 0.5 * stage2.cache_nbytes(host, 4)

  # Split over the 4 devices, the same pairs give the same distances.
  mesh = sharding.make_mesh()
  sharded = stage2.make_pair_step(model, stage2.conditional_distance, mesh)
  np.testing.assert_allclose(sharded(variables, take(q), take(g)), compact, atol=1e-6)


def test_eval_py_end_to_end(trained_workdir, tiny_data_dir):
  result = subprocess.run(
    [
      sys.executable,
      'eval.py',
      '--config',
      'configs/tiny.py',
      '--workdir',
      trained_workdir,
      f'--config.data.data_dir={tiny_data_dir}',
      '--config.eval.stage2_k=5',
      '--config.eval.rerank=True',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'cacenet' in result.stdout and 'mAP' in result.stdout
  with open(os.path.join(trained_workdir, 'results.json')) as f:
    saved = json.load(f)
  assert saved['step'] == 2
  assert set(saved['results']) == {
    'individual',
    'clue_alignment',
    'cacenet',
    'individual+kr',
    'clue_alignment+kr',
    'cacenet+kr',
  }
  assert list(saved['info']) == [  # the keys, in results.json's order
    'stage2_k',
    'seconds_by_process',
    'stage2_mix',
    'stage2_max_similarity',
    'stage2_queries',
    'num_query',
    'processes',
    'stage2_pairs_scored_by_process',
    'gallery_cache_rows_by_process',
    'cache_bytes_per_image',
    'cache_on_disk',
  ]
  assert saved['info']['stage2_k'] == 5 and saved['info']['stage2_mix'] == 1.0
  # Stage 2 re-sorted every query (the default gate passes all).
  assert saved['info']['stage2_queries'] == saved['info']['num_query'] > 0
  assert list(saved['info']['seconds_by_process']) == ['stage1', 'stage2_pairs']
  assert saved['info']['cache_bytes_per_image'] > 0
  for figure in ('ranked_lists.png', 'correspondences.png', 'conditional_maps.png'):
    path = os.path.join(trained_workdir, figure)
    assert os.path.getsize(path) > 1000, figure
  for row in ('individual', 'clue_alignment', 'cacenet', 'individual+kr', 'cacenet+kr'):
    values = saved['results'][row]
    assert 0 <= values['mAP'] <= 100 and values['rank1'] <= values['rank5'] <= values['rank10']
  # Diagnostics: in results.json and printed under the table.
  found = saved['diagnostics']
  assert set(found) == {
    'family_retrieval',
    'hard_pair_auc',
    'alignment_selectivity',
    'cross_share',
    'conditioning_strength',
  }
  for row in ('individual', 'cacenet'):
    assert 0 < found['family_retrieval'][row]['mAP'] <= 100
    assert 0 <= found['hard_pair_auc'][row] <= 1
  # Restricted to the family, the impostors of other families are gone.
  assert found['family_retrieval']['individual']['mAP'] >= saved['results']['individual']['mAP']
  assert 0 < found['alignment_selectivity'] <= 1 and found['conditioning_strength'] >= 0
  assert 0 <= found['cross_share'] <= 1
  assert 'within-family retrieval, cacenet' in result.stdout
  assert 'alignment selectivity' in result.stdout


def test_eval_py_missing_checkpoint_is_one_line_error(tmp_path, tiny_data_dir):
  result = subprocess.run(
    [
      sys.executable,
      'eval.py',
      '--config',
      'configs/tiny.py',
      '--workdir',
      str(tmp_path),
      f'--config.data.data_dir={tiny_data_dir}',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  assert f'error: no checkpoint in {tmp_path}' in result.stderr


def test_stage2_caches_stream_from_disk_with_the_same_results(
  trained_workdir, tiny_data_dir, tmp_path
):
  """Caches over `eval.cache_memory_gb` become memory-mapped files, removed afterwards."""
  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.eval.stage2_k = 5
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(trained_workdir, model_config=config.model, mesh=mesh)
  builder = split_data.prepare_on_first_process(config)
  query, gallery = split_data.load_eval_splits(builder, config.data.dataset)
  results = {}
  for limit in (8.0, 0.0):
    config.eval.cache_memory_gb = limit
    results[limit] = ranking.evaluate(
      run.model, run.variables, query, gallery, config, mesh, scratch_dir=str(tmp_path)
    )
  assert not results[8.0].info.cache_on_disk and results[0.0].info.cache_on_disk
  info = lambda r: {
    k: v for k, v in r.info.to_json().items() if k not in ('cache_on_disk', 'seconds_by_process')
  }
  assert info(results[8.0]) == info(results[0.0])
  for row in ('individual', 'clue_alignment', 'cacenet'):
    assert results[8.0].metrics[row] == results[0.0].metrics[row], row
    np.testing.assert_array_equal(results[8.0].rankings[row], results[0.0].rankings[row])
  assert os.listdir(tmp_path) == []


def test_model_without_pair_stage_evaluates_stage_one_only(tiny_data_dir):
  """gcn 'none' (Table 1's baseline): no caches are computed and only 'individual' is reported."""
  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.model.gcn = 'none'
  model = build_model(config.model, num_classes=4)
  mesh = sharding.make_mesh()
  variables = sharding.replicate(model.init(jax.random.key(0), jnp.zeros((1, 64, 32, 3))), mesh)
  builder = split_data.prepare_on_first_process(config)
  query, gallery = split_data.load_eval_splits(builder, config.data.dataset)
  evaluation = ranking.evaluate(model, variables, query, gallery, config, mesh)
  assert set(evaluation.metrics) == set(evaluation.rankings) == {'individual'}
  info = evaluation.info.to_json()
  assert list(info) == ['stage2_k', 'seconds_by_process'] and info['stage2_k'] == 0
  assert list(info['seconds_by_process']) == ['stage1'] and evaluation.figure_row == 'individual'
  # Family diagnostics need no pair stage; alignment and conditioning do.
  assert set(evaluation.diagnostics) == {'family_retrieval', 'hard_pair_auc'}
  assert set(evaluation.diagnostics['family_retrieval']) == {'individual'}
  flat = report.flatten_metrics(evaluation)
  assert flat['diagnostics/family_retrieval_individual_mAP'] == pytest.approx(
    evaluation.diagnostics['family_retrieval']['individual']['mAP']
  )
  assert 0 < evaluation.metrics['individual']['mAP'] <= 100
  assert evaluation.rankings['individual'].shape == (len(query), min(ranking.TOP, len(gallery)))


def test_stage2_choice_on_validation_is_the_best_of_its_grid(
  trained_workdir, tiny_data_dir, monkeypatch
):
  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.data.validation_ids = 3
  config.eval.stage2_k_grid = (2, 4)
  config.eval.stage2_mix_grid = (0.0, 0.5, 1.0)
  config.eval.stage2_fraction_grid = (0.0, 0.5, 1.0)
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(trained_workdir, None, config.model, mesh)
  builder = split_data.prepare_on_first_process(config)
  validation = split_data.load_training_splits(builder, config.data).validation
  ranked = []  # the (K, w, queries re-sorted) of each ranking: all through the one ranker
  real_distances = two_stage.TwoStageRanker.distances

  def spy(self, k, mix=1.0, queries=None):
    count = len(self.stage1) if queries is None else int(np.sum(queries))
    ranked.append((k, mix, count))
    return real_distances(self, k, mix, queries)

  monkeypatch.setattr(two_stage.TwoStageRanker, 'distances', spy)
  choice = selection.select_stage2(run.model, run.variables, validation, config, mesh)
  grid = {(row['k'], row['mix'], row['fraction']): row['mAP'] for row in choice.grid}
  fractions = (0.0, 0.5, 1.0)
  assert set(grid) == {(k, w, f) for k in (2, 4) for w in (0.0, 0.5, 1.0) for f in fractions}
  # Each fraction re-sorted that share of the validation queries (ties aside), least
  # confident first; the gate that selects them is what the choice records.
  num_query = len(validation[0])
  assert {(k, w, round(f * num_query)) for k, w, f in grid} == set(ranked)
  gates = {row['fraction']: row['max_similarity'] for row in choice.grid}
  assert gates[1.0] == 1.0 and gates[0.0] == records.NO_QUERY
  best = (choice.stage2_k, choice.stage2_mix, choice.stage2_fraction)
  assert grid[best] == max(grid.values())
  assert choice.stage2_max_similarity == gates[choice.stage2_fraction]
  chosen = choice.configure(config)
  assert (chosen.eval.stage2_k, chosen.eval.stage2_mix) == best[:2]
  assert chosen.eval.stage2_max_similarity == choice.stage2_max_similarity
  assert config.eval.stage2_k == 5 and config.eval.stage2_mix == 1.0  # the input is untouched
  assert config.eval.stage2_max_similarity == 1.0
  # w = 0 or fraction 0 is stage 1 whatever K; the chosen (K, w, gate) evaluated
  # afresh gives its grid mAP, re-sorting the queries the fraction named.
  individual = choice.individual['mAP']
  assert grid[(2, 0.0, 1.0)] == grid[(4, 0.0, 0.5)] == grid[(4, 1.0, 0.0)] == individual
  ranked.clear()
  again = ranking.evaluate(run.model, run.variables, *validation, chosen, mesh)
  assert again.metrics['cacenet']['mAP'] == pytest.approx(grid[best], abs=1e-4)
  assert (*best[:2], round(best[2] * num_query)) in ranked  # the cacenet row's
  # The queries it re-sorted (at w = 0, none: the individual order is kept).
  assert again.info.stage2_queries == (round(best[2] * num_query) if best[1] > 0 else 0)
  assert again.info.num_query == num_query
  # The diagnostics of the validation split are those of evaluating it at the chosen K.
  found, direct = map(diagnostics.flatten, (choice.diagnostics, again.diagnostics))
  assert 'family_retrieval/cacenet/mAP' in found and 'alignment_selectivity' in found
  assert found == pytest.approx(direct, abs=1e-5)
  info = records.EvaluationInfo(stage2_k=best[0], seconds_by_process={}, selection=choice)
  logged = report.flatten_metrics(records.Evaluation(again.metrics, {}, {}, info, {}))
  assert logged['validation/stage2_k'] == best[0]
  assert logged['validation_diagnostics/alignment_selectivity'] == found['alignment_selectivity']
  table = report.format_table(records.Evaluation(again.metrics, {}, {}, info))
  assert selection.format_selection(choice) in table.splitlines()
  # Held-out identities are whole families of the training split.
  assert len(choice.pids) == 3


def test_training_with_validation_holds_it_out_and_chooses_stage2_on_it(
  tiny_data_dir, trained_workdir, tmp_path
):
  from cace_jax.train import train_lib

  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.data.validation_ids = 3
  config.eval.stage2_k_grid = (2, 3)
  config.eval.diagnostics = False
  config.train.num_steps = 2
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  selection = saved['info']['selection']
  assert list(saved['info'])[-1] == 'selection'  # after the fields of stage 2, as always
  assert list(selection) == [
    'stage2_k',
    'stage2_mix',
    'stage2_fraction',
    'stage2_max_similarity',
    'individual',
    'grid',
    'num_query',
    'num_gallery',
    'pids',
    'diagnostics',
  ]
  assert (saved['info']['stage2_k'], saved['info']['stage2_mix']) == (
    selection['stage2_k'],
    selection['stage2_mix'],
  )
  run = checkpoint.load_run(workdir)
  assert run.record.num_classes == 6  # 9 training identities, one family of 3 held out
  # eval.py's path carves the same split and makes the same choice.
  again = command.evaluate_checkpoint(config, workdir)
  assert again.info.selection == records.Stage2Choice.from_json(selection)
  assert again.info.selection.to_json() == selection
  # A run that did not hold those identities out cannot be evaluated with them held out.
  with pytest.raises(ConfigError, match='was not trained with these identities held out'):
    command.evaluate_checkpoint(config, trained_workdir)

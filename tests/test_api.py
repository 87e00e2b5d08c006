"""The Python API (`cace_jax.load`, embed, index, search) and `python -m cace_jax.search`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest

import cace_jax
from cace_jax import sharding
from cace_jax.data import pipeline, split_data
from cace_jax.errors import DatasetError
from cace_jax.evaluation import ranking, records, stage1, two_stage
from cace_jax.runs import checkpoint
from cace_jax.serve import api
from configs import tiny


@pytest.fixture(scope='module')
def eval_files(tiny_data_dir, tmp_path_factory):
  """The tiny dataset's query and gallery written out as files, in split order."""
  builder = split_data.prepare_on_first_process(config_for(tiny_data_dir))
  query, gallery = split_data.load_eval_splits(builder, 'synthetic_details/tiny')
  root = tmp_path_factory.mktemp('files')
  paths = {}
  for name, split in (('query', query), ('gallery', gallery)):
    os.makedirs(root / name)
    paths[name] = []
    for i, data in enumerate(split.images):
      path = str(root / name / f'{i:04d}.jpg')
      with open(path, 'wb') as f:
        f.write(data)
      paths[name].append(path)
  return query, gallery, paths


def config_for(data_dir):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  return config


# What orbax says when a run is read read-only: nothing a user of load or search can act on.
ORBAX_NOTICES = (
  'Given directory is read only',
  'Metadata file does not exist',
  'read_only=True, setting',
)


def test_loading_a_run_logs_no_orbax_notices_and_silences_nothing_else(trained_workdir, caplog):
  with caplog.at_level(logging.INFO):
    cace_jax.load(trained_workdir)
    logged = caplog.text
    # The filter holds only while the run is read.
    absl_logging.warning('Metadata file does not exist: %s', 'elsewhere')
  assert not [notice for notice in ORBAX_NOTICES if notice in logged]
  assert 'Metadata file does not exist: elsewhere' in caplog.text


def test_embeddings_are_evals_and_arrays_embed_like_their_files(
  trained_workdir, tiny_data_dir, eval_files, tmp_path
):
  query, _, paths = eval_files
  reid = cace_jax.load(trained_workdir)
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(trained_workdir, None, None, mesh)
  config = config_for(tiny_data_dir)
  batches = pipeline.eval_batches(query, config.data)
  expected = stage1.embed_batches(
    run.model, run.variables, batches, len(query), config, mesh, False
  ).embeddings
  found = reid.embed(paths['query'])
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, rtol=1e-5)
  # An array is stored as a prepared PNG would be: it embeds like that PNG file.
  array = np.asarray(Image.open(paths['query'][0]).convert('RGB'))
  Image.fromarray(array).save(tmp_path / 'q.png')
  np.testing.assert_array_equal(reid.embed(array), reid.embed([str(tmp_path / 'q.png')]))
  with pytest.raises(DatasetError, match=r'image 0: expected a file path or a uint8 \[H, W, 3\]'):
    reid.embed([np.zeros((4, 4), np.float32)])
  with pytest.raises(DatasetError, match='cannot read .*missing.jpg'):
    reid.embed([str(tmp_path / 'missing.jpg')])


def test_search_ranks_as_evals_stage2_and_the_index_resumes(
  trained_workdir, tiny_data_dir, eval_files, tmp_path, monkeypatch
):
  query, gallery, paths = eval_files
  reid = api.load(trained_workdir, stage2='config')  # the run has no validation choice
  assert reid.model.pair_stage and reid.config.eval.stage2_k == 5
  assert reid.stage2_from == 'config'
  # An index built in chunks and interrupted resumes where it stopped.
  monkeypatch.setattr(api, 'INDEX_CHUNK', 7)
  calls = {'n': 0}
  extract = api.ReID._extract

  def failing(self, images, with_cache, cache_dir=None):
    calls['n'] += 1
    if calls['n'] == 4:
      raise KeyboardInterrupt
    return extract(self, images, with_cache, cache_dir)

  monkeypatch.setattr(api.ReID, '_extract', failing)
  directory = str(tmp_path / 'index')
  with pytest.raises(KeyboardInterrupt):
    reid.index(paths['gallery'], directory, progress=False)
  with open(os.path.join(directory, 'index.json')) as f:
    assert json.load(f)['done'] == 21  # three chunks of 7, then the interruption
  with pytest.raises(DatasetError, match='holds 21 of'):
    api.load_index(directory)
  index = reid.index(paths['gallery'], directory, progress=False)
  monkeypatch.setattr(api.ReID, '_extract', extract)
  fresh = reid.index(paths['gallery'], str(tmp_path / 'fresh'), progress=False)
  np.testing.assert_array_equal(index.embeddings, fresh.embeddings)
  for name in fresh.caches:
    np.testing.assert_array_equal(index.caches[name], fresh.caches[name])
  with pytest.raises(DatasetError, match='an index of other images'):
    reid.index(paths['gallery'][:-1], directory, progress=False)
  # The two-stage ranking is eval's, both through the one ranker, at a w that fuses the
  # two distances.
  ranked = []  # the (K, w) of each ranking made
  real_distances = two_stage.TwoStageRanker.distances

  def spy(self, k, mix=1.0, queries=None):
    ranked.append((k, mix))
    return real_distances(self, k, mix, queries)

  monkeypatch.setattr(two_stage.TwoStageRanker, 'distances', spy)
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(trained_workdir, None, None, mesh)
  config = config_for(tiny_data_dir)
  config.eval.diagnostics = False
  config.eval.stage2_mix = reid.config.eval.stage2_mix = 0.5
  expected = ranking.evaluate(run.model, run.variables, query, gallery, config, mesh)
  assert (5, 0.5) in ranked
  ranked.clear()
  hits = reid.search(paths['query'], api.load_index(directory), top_k=8)
  assert ranked == [(5, 0.5)]
  found = np.array([[hit['index'] for hit in row] for row in hits])
  np.testing.assert_array_equal(found, expected.rankings['cacenet'][:, :8])
  for row in hits:
    assert [hit['resorted'] for hit in row] == [True] * 5 + [False] * 3
    fused = [(hit['individual_distance'] + hit['conditional_distance']) / 2 for hit in row]
    # Stage 2 sorts the first K by the fused distance (to float32's rounding near -10).
    assert np.all(np.diff(fused[:5]) >= -1e-5)
    assert [hit['rank'] for hit in row] == list(range(1, 9))
  # Selective stage 2: a gate that passes about half the queries re-sorts those, as eval
  # does, and leaves the others in their stage-1 order.
  # (The stage-1 nearest is among the first K, so among the hits shown.)
  similarity = np.array([1.0 - min(hit['individual_distance'] for hit in row) for row in hits])
  gate = float(np.median(similarity))
  config.eval.stage2_max_similarity = reid.config.eval.stage2_max_similarity = gate
  expected = ranking.evaluate(run.model, run.variables, query, gallery, config, mesh)
  hits = reid.search(paths['query'], api.load_index(directory), top_k=8)
  found = np.array([[hit['index'] for hit in row] for row in hits])
  np.testing.assert_array_equal(found, expected.rankings['cacenet'][:, :8])
  gated = similarity <= gate
  assert expected.info.stage2_queries == gated.sum() and 0 < gated.sum() < len(gated)
  for row, resorted in zip(hits, gated):
    assert [hit['resorted'] for hit in row] == [bool(resorted)] * 5 + [False] * 3
    if not resorted:
      assert np.all(np.diff([hit['individual_distance'] for hit in row]) >= 0)
  # By default a run without a validation choice is searched by stage 1 alone: eval's
  # individual ranking, conditional distances still shown.
  default = api.load(trained_workdir)
  assert default.stage2_from == records.STAGE1_ONLY
  # A config passed in (as a port needs) follows the same rule.
  given = api.load(trained_workdir, config=config)
  assert given.stage2_from == records.STAGE1_ONLY
  assert given.config.eval.stage2_max_similarity == records.NO_QUERY
  assert api.load(trained_workdir, config=config, stage2='config').stage2_from == 'config'
  hits = default.search(paths['query'], api.load_index(directory), top_k=8)
  found = np.array([[hit['index'] for hit in row] for row in hits])
  np.testing.assert_array_equal(found, expected.rankings['individual'][:, :8])
  assert not any(hit['resorted'] for row in hits for hit in row)
  assert all('conditional_distance' in hit for row in hits for hit in row)


def test_search_command_writes_results_and_figures(trained_workdir, eval_files, tmp_path):
  _, _, paths = eval_files
  out = tmp_path / 'out'
  command = [sys.executable, '-m', 'cace_jax.search', f'--workdir={trained_workdir}']
  command += [f'--gallery={os.path.dirname(paths["gallery"][0])}', f'--out={out}', '--top_k=4']
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
    command + [f'--query={paths["query"][0]}', '--stage2=config'],
    capture_output=True,
    text=True,
    cwd=root,
  )
  assert done.returncode == 0, done.stderr
  assert not [notice for notice in ORBAX_NOTICES if notice in done.stdout + done.stderr]
  with open(out / 'results.json') as f:
    results = json.load(f)
  assert [len(q['hits']) for q in results['queries']] == [4]
  # The run has no validation choice (it would search by stage 1 alone): the config's
  # stage 2, asked for, re-sorts every query.
  assert results['stage2_max_similarity'] == 1.0 and results['stage2_from'] == 'config'
  assert results['queries'][0]['stage2']
  assert results['queries'][0]['hits'][0]['path'].startswith(os.path.dirname(paths['gallery'][0]))
  assert os.path.getsize(out / 'ranked_0.png') > 0
  bad = subprocess.run(
    command + [f'--query={tmp_path / "nothing"}'], capture_output=True, text=True, cwd=root
  )
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith('error: --query=')

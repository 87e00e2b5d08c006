"""benchmarks/ablations.py: the study's bookkeeping (no training here)."""

import json
import os

import numpy as np
import pytest

from benchmarks import ablations


def fake_results(map_value, selectivity=None):
  metrics = {'rank1': map_value + 5, 'rank5': 99.0, 'rank10': 99.5, 'mAP': map_value, 'mINP': 50.0}
  found = {'hard_pair_auc': {'individual': 0.9}}
  if selectivity is not None:
    found['alignment_selectivity'] = selectivity
  return {'results': {'individual': metrics, 'cacenet': metrics}, 'diagnostics': found}


def test_summary_is_mean_and_sample_std_over_seeds_with_shared_diagnostics():
  summary = ablations.summarise({0: fake_results(80.0, 0.5), 1: fake_results(84.0)})
  entry = summary['results']['cacenet']['mAP']
  assert entry['mean'] == 82.0 and entry['std'] == pytest.approx(np.std([80, 84], ddof=1))
  assert entry['values'] == [80.0, 84.0]
  # alignment_selectivity is missing for seed 1: left out rather than averaged over one seed.
  assert set(summary['diagnostics']) == {'hard_pair_auc/individual'}
  table = ablations.markdown_table(
    'attention', {'config': 'c.py', 'seeds': [0, 1], 'rows': {'projected': summary}}
  )
  assert '| projected | cacenet | 87.00 ± 2.83 | 82.00 ± 2.83 | 50.00 ± 0.00 |' in table
  assert '0.900 ± 0.000' in table


def test_a_run_with_results_is_not_trained_again(tmp_path, monkeypatch):
  workdir = tmp_path / 'row' / 'seed0'
  workdir.mkdir(parents=True)
  (workdir / 'results.json').write_text(json.dumps(fake_results(70.0)))
  monkeypatch.setattr(ablations.subprocess, 'call', lambda *a, **k: pytest.fail('trained again'))
  assert ablations.run_once('configs/synthetic.py', {}, 0, str(workdir))['results']
  command = ablations.train_command('configs/synthetic.py', {'model.gcn': 'none'}, 2, 'w')
  assert command[1:] == [
    os.path.join(ablations.ROOT, 'train.py'),
    '--config=configs/synthetic.py',
    '--config.model.gcn=none',
    '--config.seed=2',
    '--workdir=w',
  ]

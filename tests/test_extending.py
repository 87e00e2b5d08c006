"""docs/extending.md, run as written: its code is the example file's, and its commands succeed.

The page's bash commands run from the repository root with `runs/extending`
moved to a temporary directory: train the tiny config on the two variants
registered from `examples/graph_variants.py`, a two-row study of them, and
their export (checked by onnxruntime against JAX).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, 'docs', 'extending.md')
EXAMPLE = os.path.join(ROOT, 'examples', 'graph_variants.py')


def blocks(language: str) -> list[str]:
  with open(PAGE, encoding='utf-8') as f:
    return re.findall(rf'```{language}\n(.*?)```', f.read(), re.S)


def commands() -> list[str]:
  found = []
  for block in blocks('bash'):
    found += [line for line in block.replace('\\\n', ' ').splitlines() if line.strip()]
  return found


def test_the_page_shows_code_that_runs():
  """The variants are the example file's as they are; the loss is the one a registry test trains."""
  variants, loss = blocks('python')
  with open(EXAMPLE, encoding='utf-8') as f:
    assert variants.strip() in f.read()
  with open(os.path.join(ROOT, 'tests', 'test_graph_registry.py'), encoding='utf-8') as f:
    tested = [line.strip() for line in f]
  assert all(line.strip() in tested for line in loss.strip().splitlines())


def test_the_page_runs_train_study_and_export(tmp_path):
  found = commands()
  assert [shlex.split(c)[1] for c in found] == [
    'train.py',
    'benchmarks/ablations.py',
    'tools/deploy.py',
  ]
  runs = str(tmp_path / 'extending')
  for command in found:
    argv = [sys.executable] + shlex.split(command.replace('runs/extending', runs))[1:]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f'{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
  with open(os.path.join(runs, 'two_hop', 'results.json'), encoding='utf-8') as f:
    results = json.load(f)
  assert {'individual', 'cacenet'} <= set(results['results'])
  with open(os.path.join(runs, 'report.json'), encoding='utf-8') as f:
    report = json.load(f)
  assert set(report['rows']) == {'topk', 'mutual_two_hop'}
  assert report['overrides']['mutual_two_hop']['model.gcn'] == 'two_hop'
  with open(os.path.join(runs, 'two_hop', 'export', 'export.json'), encoding='utf-8') as f:
    export = json.load(f)
  assert export['verified'] is True


def test_a_variant_without_its_plugin_is_a_config_error(tmp_path):
  argv = [sys.executable, 'train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}']
  argv += ['--config.model.adjacency=mutual_topk', '--config.model.gcn=two_hop']
  done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 2
  assert "model.adjacency='mutual_topk': expected one of" in done.stderr
  assert not os.listdir(tmp_path)  # nothing prepared, nothing compiled

"""Markdown tables of measured figures, generated from the JSON in benchmarks/results/.

    python benchmarks/tables.py            # rewrite every generated table in README.md and docs/
    python benchmarks/tables.py --check    # exit 1 when a page's table differs from its JSON

A page marks a generated table with two comments, and whatever stands between
them is replaced:

    <!-- table: cpu_speed -->
    ...
    <!-- /table -->

`TABLES` maps each name to the function that renders it from its JSON, so a
figure in the docs is never typed by hand; the suite runs `--check`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Callable

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cace_jax import cli  # noqa: E402
from cace_jax.errors import RunFailure, UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
MARKER = re.compile(r'(<!-- table: (\w+) -->\n)(.*?)(<!-- /table -->)', re.DOTALL)
STEP_NAMES = {
  'backbone': 'ResNet-50 backbone, train step',
  'cacenet_gem': 'CACE-Net (GeM, non-local), train step',
  'cacenet_avg': 'CACE-Net (average pooling, non-local), train step',
  'stage1': 'stage-1 extraction (embeddings + cache)',
}
# What the PyTorch column runs for each step (benchmarks/cpu_step.py's run_torch).
TORCH_NAMES = {
  'backbone': 'torchvision resnet50',
  'cacenet_gem': 'official CACENET + compute_loss',
  'cacenet_avg': 'official CACENET (avgpool) + compute_loss',
  'stage1': "official CACENET.eval() forward, which also builds the batch's B² pair graphs",
}
VARIANT_NAMES = {
  'ynnpack': 'jaxlib default (YNNPACK convolutions)',
  'fast': 'cace_jax default (XLA convolutions)',
  'ynnpack_bf16': 'YNNPACK, bfloat16',
  'fast_bf16': 'XLA convolutions, bfloat16',
  'fast_onednn': '+ oneDNN custom call',
  'fast_eigen1': '+ single-threaded Eigen',
  'fast_concurrency': '+ concurrency-optimised scheduler',
}


def load(name: str) -> dict:
  with open(os.path.join(RESULTS, name), encoding='utf-8') as f:
    return json.load(f)


def rows_of(report: dict, step: str) -> dict:
  return {k: v for k, v in report['results'][step].items() if isinstance(v, dict)}


def cpu_speed() -> str:
  """Step times: jaxlib's default, ours and PyTorch, with the ratios."""
  report = load('cpu_step.json')
  lines = [
    '| step | images | jaxlib default, s | cace_jax default, s | PyTorch, s | '
    '× jaxlib default | × PyTorch | PyTorch runs |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for step, rows in report['results'].items():
    rows = rows_of(report, step)
    images = report['shape']['stage1_batch' if step == 'stage1' else 'batch']
    ynnpack, fast, torch = (rows.get(k, {}).get('step_s') for k in ('ynnpack', 'fast', 'torch'))
    cell = lambda x: '–' if x is None else f'{x:.2f}'
    lines.append(
      f'| {STEP_NAMES[step]} | {images} | {cell(ynnpack)} | {cell(fast)} | {cell(torch)} | '
      f'{cell(ynnpack / fast if ynnpack and fast else None)} | '
      f'{cell(torch / fast if torch and fast else None)} | {TORCH_NAMES[step]} |'
    )
  return '\n'.join(lines)


def cpu_options() -> str:
  """Every variant's speed over ours and its accuracy against the float64 reference."""
  report = load('cpu_step_variants.json')
  shape = report['shape']
  lines = [
    f'Batch {shape["batch"]} at {shape["height"]}×{shape["width"]}, ResNet-{shape["depth"]}; '
    f'{report["date"]}, `{report["command"]}`.',
    '',
    '| step | variant | s/step | × cace_jax default | gradient vs float64, max | '
    'gradient vs float64, L2 |',
    '|---|---|---|---|---|---|',
  ]
  for step in report['results']:
    rows = rows_of(report, step)
    fast_s = rows.get('fast', {}).get('step_s')
    for name, row in rows.items():
      if name not in VARIANT_NAMES:
        continue
      if 'step_s' not in row:
        lines.append(f'| {STEP_NAMES[step]} | {VARIANT_NAMES[name]} | failed | | | |')
        continue
      speed = f'{fast_s / row["step_s"]:.2f}' if fast_s else '–'
      lines.append(
        f'| {STEP_NAMES[step]} | {VARIANT_NAMES[name]} | {row["step_s"]:.2f} | {speed} | '
        f'{row.get("max_relative_to_float64", float("nan")):.1e} | '
        f'{row.get("l2_relative_to_float64", float("nan")):.1e} |'
      )
  return '\n'.join(lines)


def demo_results() -> str:
  """The demo's results table (cace_jax's default CPU settings, seed 0)."""
  run = load('demo.json')['runs']['default']
  k = run['stage2_k']
  names = {
    'individual': 'individual embeddings (stage 1)',
    'clue_alignment': f'+ clue alignment (top-{k} re-sorted)',
    'cacenet': f'+ conditional embeddings (CACE-Net, top-{k})',
  }
  lines = ['| scoring | Rank-1 | Rank-5 | Rank-10 | mAP | mINP |', '|---|---|---|---|---|---|']
  for row, name in names.items():
    m = run['results'][row]
    lines.append(
      f'| {name} | {m["rank1"]:.1f} | {m["rank5"]:.1f} | {m["rank10"]:.1f} | '
      f'{m["mAP"]:.1f} | {m["mINP"]:.1f} |'
    )
  return '\n'.join(lines)


def demo_time() -> str:
  """The demo's wall time with jaxlib's and with cace_jax's CPU defaults."""
  report = load('demo.json')
  runs = report['runs']
  names = {
    'ynnpack': 'jaxlib default (YNNPACK convolutions)',
    'default': 'cace_jax default (XLA convolutions)',
    'default_again': 'cace_jax default, again',
  }
  lines = [
    '| demo run (training and evaluation) | wall time | × jaxlib default | individual mAP |',
    '|---|---|---|---|',
  ]
  for name, label in names.items():
    run = runs[name]
    speed = runs['ynnpack']['wall_s'] / run['wall_s']
    lines.append(
      f'| {label} | {run["wall_s"] / 60:.1f} min | {speed:.2f} | '
      f'{run["results"]["individual"]["mAP"]:.2f} |'
    )
  same = 'identical' if report['train_log_identical'] else 'NOT identical'
  lines.append(f"\nThe two default runs' train.log: {same} ({report['logged_steps']} records).")
  for name, note in report.get('notes', {}).items():
    lines.append(f'{names[name]}: {note}.')
  return '\n'.join(lines)


def graph_conformance() -> str:
  """Adjacency x operator: the largest gap between the pair stage's paths, and ONNX's."""
  report = load('graph_conformance.json')
  gaps: dict = {}
  for key, found in report['matrix'].items():
    adjacency, operator, _ = key.split('/')
    paths = max(found['fast-direct embedding'], found['fast-direct gradient'], found['cache-dense'])
    onnx = found['onnx-jax']
    before = gaps.get((adjacency, operator), (0.0, 0.0))
    gaps[adjacency, operator] = (
      max(before[0], paths),
      None if onnx is None else max(before[1], onnx),
    )
  operators = list(dict.fromkeys(operator for _, operator in gaps))
  lines = ['| adjacency | ' + ' | '.join(operators) + ' |', '|---|' + '---|' * len(operators)]
  for adjacency in dict.fromkeys(adjacency for adjacency, _ in gaps):
    cells = []
    for operator in operators:
      paths, onnx = gaps[adjacency, operator]
      cells.append(f'{paths:.0e} · ' + ('no ONNX form' if onnx is None else f'{onnx:.0e}'))
    lines.append(f'| {adjacency} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


TABLES: dict[str, Callable[[], str]] = {
  'cpu_speed': cpu_speed,
  'cpu_options': cpu_options,
  'demo_results': demo_results,
  'demo_time': demo_time,
  'graph_conformance': graph_conformance,
}


def pages() -> list[str]:
  return [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def render_page(text: str, path: str) -> str:
  """The page with every marked table rendered anew."""

  def replace(match: re.Match) -> str:
    name = match.group(2)
    if name not in TABLES:
      raise UserError(f'{path}: unknown table {name!r}; expected one of {", ".join(TABLES)}')
    return f'{match.group(1)}{TABLES[name]()}\n{match.group(4)}'

  return MARKER.sub(replace, text)


def stale_pages() -> list[str]:
  """Pages whose generated tables differ from their JSON."""
  stale = []
  for path in pages():
    with open(path, encoding='utf-8') as f:
      text = f.read()
    if render_page(text, path) != text:
      stale.append(os.path.relpath(path, ROOT))
  return stale


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_boolean(
    'check', False, 'Only check; exit 1 when a table is stale.', flag_values=flag_values
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  if args.check:
    stale = stale_pages()
    if stale:
      raise RunFailure(
        f'{", ".join(stale)}: a generated table differs from its JSON '
        '(python benchmarks/tables.py rewrites it)'
      )
    print('every generated table matches its JSON')
    return
  for path in pages():
    with open(path, encoding='utf-8') as f:
      text = f.read()
    rendered = render_page(text, path)
    if rendered != text:
      with open(path, 'w', encoding='utf-8') as f:
        f.write(rendered)
      print(f'rewrote {os.path.relpath(path, ROOT)}')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

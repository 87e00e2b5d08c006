"""Markdown tables of measured figures, generated from the JSON in benchmarks/results/.

    python benchmarks/tables.py            # rewrite the generated tables of every page
    python benchmarks/tables.py --check    # exit 1 when a page's table differs from its JSON

A page marks a generated table with two comments, and whatever stands between
them is replaced:

    <!-- table: cpu_speed -->
    ...
    <!-- /table -->

`TABLES` maps each name to the function that renders it from its JSON
(`result_tables`: measurements; `experiment_tables`: studies and the demo),
so a figure in the docs is never typed by hand; the suite checks that every
page matches.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Callable

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import experiment_tables, result_tables  # noqa: E402
from cace_jax.commands import cli  # noqa: E402
from cace_jax.errors import RunFailure, UserError  # noqa: E402

ROOT = result_tables.ROOT
MARKER = re.compile(r'(<!-- table: (\w+) -->\n)(.*?)(<!-- /table -->)', re.DOTALL)
TABLES: dict[str, Callable[[], str]] = {
  'cpu_speed': result_tables.cpu_speed,
  'cpu_options': result_tables.cpu_options,
  'demo_results': experiment_tables.demo_results,
  'demo_time': experiment_tables.demo_time,
  'graph_conformance': experiment_tables.graph_conformance,
  'study_attention': lambda: experiment_tables.study_table('attention'),
  'study_table1': lambda: experiment_tables.study_table('table1'),
  'study_table2': lambda: experiment_tables.study_table('table2'),
  'claims': experiment_tables.claims,
  'study_regulariser': lambda: experiment_tables.paired_study('regulariser'),
  'policies_regulariser': lambda: experiment_tables.stage2_policies('regulariser'),
  'study_occlusion': lambda: experiment_tables.paired_study('occlusion'),
  'policies_occlusion': lambda: experiment_tables.stage2_policies('occlusion'),
  'explorations': experiment_tables.explorations,
  'stage2_k': experiment_tables.stage2_k,
  'memory_growth': result_tables.memory_growth,
  'memory_parts': result_tables.memory_parts,
  'eval_cost': result_tables.eval_cost,
  'deploy_speed': result_tables.deploy_speed,
  'multihost_eval': result_tables.multihost_eval,
  'device_check_cpu': result_tables.device_check_cpu,
  'throughput': result_tables.throughput,
  'official_parity': result_tables.official_parity,
}


def pages() -> list[str]:
  """The pages that may hold generated tables: README.md, docs/ and benchmarks/README.md."""
  return [
    os.path.join(ROOT, 'README.md'),
    *sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))),
    os.path.join(ROOT, 'benchmarks', 'README.md'),
  ]


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

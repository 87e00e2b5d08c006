"""The package's import graph, read from the source with `ast` (nothing is imported).

The modules must form a DAG (no import cycle), and an import inside a
function is only for an optional or heavy dependency, never for a module of
this package (except a package's lazy `__getattr__`), with a comment saying why.
And the core (models, losses, the train step, the evaluation steps) imports
on a machine without TensorFlow or ml_collections: that one is imported, in
a subprocess that refuses them.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from refused_imports import ON_THE_ACCELERATOR_HOST, prelude

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'cace_jax'


def module_files() -> dict[str, str]:
  """{dotted module name: path} of every module of the package (a package is its __init__)."""
  modules = {}
  for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for file in files:
      if file.endswith('.py'):
        relative = os.path.relpath(os.path.join(directory, file), ROOT)[:-3].split(os.sep)
        if relative[-1] == '__init__':
          relative = relative[:-1]
        modules['.'.join(relative)] = os.path.join(directory, file)
  return modules


def imported_modules(node: ast.AST, modules: dict[str, str]) -> list[str]:
  """The package modules an import statement loads (a `from a import b` may name module a.b)."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    names = [
      f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules else node.module
      for alias in node.names
    ]
  else:
    return []
  return [name for name in names if name in modules]


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
  """{module: the package modules it imports}, with each package's face (`__init__`) as a node."""
  graph = {}
  for name, path in modules.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    graph[name] = {
      target
      for node in ast.walk(tree)
      for target in imported_modules(node, modules)
      if target != name
    }
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None when the graph is a DAG."""
  state, stack = {}, []  # state: 1 on the current path, 2 finished

  def visit(node):
    state[node] = 1
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        return stack[stack.index(target) :] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_finds_a_cycle_when_there_is_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_package_has_no_import_cycle():
  modules = module_files()
  graph = import_graph(modules)
  assert {
    'cace_jax.train.train_lib',
    'cace_jax.evaluation.command',
    'cace_jax.models.cacenet',
    'cace_jax.interop.deployment',
  } <= set(graph)
  assert (
    'cace_jax.models.cacenet' in graph['cace_jax.evaluation.stage1'] | graph['cace_jax.models']
  )  # the graph sees imports through a package's face
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_evaluation_reads_datasets_only_through_the_splits():
  """Families and cameras come with the data (`data.split_data`), never from a dataset's name."""
  graph = import_graph(module_files())
  evaluation = [name for name in graph if name.startswith(f'{PACKAGE}.evaluation')]
  assert f'{PACKAGE}.evaluation.stage2' in evaluation
  reaching = {
    name: sorted(t for t in graph[name] if t.startswith(f'{PACKAGE}.datasets'))
    for name in evaluation
  }
  assert {name: found for name, found in reaching.items() if found} == {}


def test_deferred_imports_are_external_and_explained():
  modules = module_files()
  problems = []
  for path in modules.values():
    with open(path, encoding='utf-8') as f:
      source = f.read()
    lines = source.splitlines()
    for function in ast.walk(ast.parse(source, path)):
      if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      # A package's face may expose a module lazily (PEP 562 `__getattr__`): `cace_jax.load`
      # without `import cace_jax` importing the API's TensorFlow and orbax; the graph keeps it.
      lazy_face = function.name == '__getattr__' and path.endswith('__init__.py')
      for node in ast.walk(function):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
          continue
        where = f'{os.path.relpath(path, ROOT)}:{node.lineno}'
        if imported_modules(node, modules) and not lazy_face:
          problems.append(f'{where}: imports a package module inside {function.name}()')
        line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
        if '#' not in line and not above.startswith('#') and '#' not in above:
          problems.append(f'{where}: deferred import without a comment saying why')
  assert not problems, '\n'.join(problems)


# What an accelerator machine without TensorFlow, TFDS or ml_collections runs
# (`benchmarks/device_check.py`): the model, its losses, the train step and
# optimizer, and the evaluation steps.
CORE = (
  'cace_jax.models',
  'cace_jax.models.losses',
  'cace_jax.sharding',
  'cace_jax.train.train_step',
  'cace_jax.evaluation.stage1',
  'cace_jax.evaluation.stage2',
  'cace_jax.evaluation.metrics',
)
REFUSED = (*ON_THE_ACCELERATOR_HOST, 'ml_collections')

IMPORT_CORE = """
for name in {core}:
  importlib.import_module(name)
print(sorted(m for m in sys.modules if m.split('.')[0] in {refused}))
"""


def test_the_core_imports_without_tensorflow_or_ml_collections():
  code = prelude(REFUSED) + IMPORT_CORE.format(refused=REFUSED, core=CORE)
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == '[]'

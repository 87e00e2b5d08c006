"""The docs hold: generated tables match their JSON, links resolve, commands parse."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import sys

from absl import flags
import pytest

from benchmarks import tables
from cace_jax.errors import UserError


def test_every_generated_table_matches_its_json():
  assert tables.stale_pages() == []


def test_the_pages_hold_generated_tables():
  marked = set()
  for path in tables.pages():
    with open(path, encoding='utf-8') as f:
      marked |= {match.group(2) for match in tables.MARKER.finditer(f.read())}
  assert marked == set(tables.TABLES)  # every table is shown somewhere


def test_a_stale_table_is_found_and_rewritten():
  name = next(iter(tables.TABLES))
  page = f'intro\n<!-- table: {name} -->\n| typed by hand |\n<!-- /table -->\noutro\n'
  rendered = tables.render_page(page, 'page.md')
  assert '| typed by hand |' not in rendered and rendered.startswith('intro\n')
  assert rendered.endswith('<!-- /table -->\noutro\n')
  assert tables.render_page(rendered, 'page.md') == rendered


def test_an_unknown_table_is_named():
  with pytest.raises(UserError, match="page.md: unknown table 'nonsense'"):
    tables.render_page('<!-- table: nonsense -->\n<!-- /table -->\n', 'page.md')


# ---- Links and commands: every page's relative links resolve, every command parses.

ROOT = tables.ROOT
LINK = re.compile(r'\]\(([^)\s]+)\)')
FENCE = re.compile(r'```(\w*)\n(.*?)```', re.DOTALL)
PYTHONS = ('python', '.venv/bin/python', '$(BIN)/python')


def doc_pages() -> list[str]:
  names = ['README.md', 'CHANGELOG.md', 'benchmarks/README.md', 'data/README.md']
  return [os.path.join(ROOT, n) for n in names] + sorted(
    glob.glob(os.path.join(ROOT, 'docs', '*.md'))
  )


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path: str) -> set[str]:
  with open(path, encoding='utf-8') as f:
    text = FENCE.sub('', f.read())  # a '#' comment in a code block is not a heading
  return {slug(m.group(1)) for m in re.finditer(r'^#+ (.+)$', text, re.MULTILINE)}


def broken_links(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    text = FENCE.sub('', f.read())
  broken = []
  for target in LINK.findall(text):
    if re.match(r'[a-z]+:', target):  # https:, mailto:
      continue
    file_part, _, anchor = target.partition('#')
    resolved = (
      os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    )
    if not os.path.exists(resolved):
      broken.append(f'{target} (no such file)')
    elif anchor and resolved.endswith('.md') and anchor not in anchors(resolved):
      broken.append(f'{target} (no such heading)')
  return broken


def shell_commands(path: str) -> list[str]:
  """The commands in a page's bash blocks, continuation lines joined, comments dropped."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  commands = []
  for language, body in FENCE.findall(text):
    if language not in ('bash', 'sh'):
      continue
    body = body.replace('\\\n', ' ')
    for line in body.splitlines():
      line = line.split(' # ')[0].strip()
      if line and not line.startswith('#'):
        commands.append(line)
  return commands


def script_of(words: list[str]) -> tuple[str, list[str]] | None:
  """(the script's file, its arguments) for `python FILE ...` or `python -m cace_jax.X ...`."""
  if not words or words[0] not in PYTHONS or len(words) < 2:
    return None
  if words[1] == '-m':
    if not words[2].startswith('cace_jax'):
      return None  # pytest, pip: not ours
    return os.path.join(ROOT, *words[2].split('.')) + '.py', words[3:]
  return os.path.join(ROOT, words[1]), words[2:]


def parse_command(script: str, arguments: list[str]) -> None:
  """Parses `arguments` with the flags the script defines (a config file is loaded, not run)."""
  spec = importlib.util.spec_from_file_location(f'doc_command_{abs(hash(script))}', script)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  flag_values = flags.FlagValues()
  cwd, argv = os.getcwd(), sys.argv
  os.chdir(ROOT)  # config paths in the docs are relative to the repository root
  sys.argv = [script, *arguments]  # ml_collections finds `--config.*` overrides in sys.argv
  try:
    module.define_flags(flag_values)
    flags.DEFINE_boolean('debug', False, '', flag_values=flag_values)
    flag_values([script, *arguments])
  finally:
    os.chdir(cwd)
    sys.argv = argv


@pytest.mark.parametrize('page', doc_pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
  assert broken_links(page) == []


def test_a_broken_link_and_anchor_are_found(tmp_path):
  (tmp_path / 'other.md').write_text('# A heading: with `code`\n')
  page = tmp_path / 'page.md'
  page.write_text(
    '[ok](other.md#a-heading-with-code) [gone](missing.md) [bad](other.md#nope) [web](https://x.y)\n'
  )
  assert broken_links(str(page)) == ['missing.md (no such file)', 'other.md#nope (no such heading)']


def commands_of_pages() -> list[tuple[str, str]]:
  found = []
  for page in [
    os.path.join(ROOT, 'README.md'),
    *sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))),
  ]:
    found += [(os.path.relpath(page, ROOT), command) for command in shell_commands(page)]
  return found


@pytest.mark.parametrize('page,command', commands_of_pages())
def test_every_command_shown_names_a_file_and_flags_that_exist(page, command):
  words = shlex.split(command)
  if words[0] == 'make':
    with open(os.path.join(ROOT, 'Makefile'), encoding='utf-8') as f:
      targets = set(re.findall(r'^([\w.-]+):', f.read(), re.MULTILINE))
    assert set(w for w in words[1:] if '=' not in w) <= targets
    return
  found = script_of(words)
  if found is None:
    return  # pip, pytest, shell built-ins: not our commands
  script, arguments = found
  assert os.path.isfile(script), f'{page}: {command}: no file {os.path.relpath(script, ROOT)}'
  parse_command(script, arguments)


def test_a_command_with_an_unknown_flag_or_config_field_fails_to_parse():
  train = os.path.join(ROOT, 'train.py')
  parse_command(train, ['--config', 'configs/tiny.py', '--workdir', 'w'])
  with pytest.raises(flags.Error):
    parse_command(train, ['--config', 'configs/tiny.py', '--workdir', 'w', '--no_such_flag=1'])
  with pytest.raises(Exception, match='no_such_field'):
    parse_command(
      train, ['--config', 'configs/tiny.py', '--workdir', 'w', '--config.no_such_field=1']
    )

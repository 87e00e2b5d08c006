"""Figures in the docs are generated from the committed JSON, never typed."""

from __future__ import annotations

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

"""Tests of the synthetic_details generator (tiny preset; a few seconds in all)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import re

import numpy as np
from PIL import Image
import pytest

from cace_jax.data.synthetic_details import generator
from conftest import run_tool
from tools import synthetic as synthetic_tool

TINY = generator.PRESETS['tiny']
MARKET_NAME = re.compile(r'([-\d]+)_c(\d)s(\d)_(\d+)_(\d+)\.jpg')


def read_tree(root) -> dict[str, bytes]:
  """Every file under `root` by relative path."""
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, root)] = f.read()
  return files


def parse_split(root, split) -> list[tuple[int, int]]:
  """(pid, camera) of every image in one split's folder, checking the name."""
  entries = []
  for name in sorted(os.listdir(root / generator.SPLIT_FOLDERS[split])):
    match = MARKET_NAME.fullmatch(name)
    assert match, name
    pid, cam, seq = int(match.group(1)), int(match.group(2)), int(match.group(3))
    assert 1 <= cam <= TINY.num_cameras and 1 <= seq <= 6, name
    assert name.startswith('-1_' if pid == -1 else f'{pid:04d}_'), name
    entries.append((pid, cam))
  return entries


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic') / 'tiny'
  counts = generator.generate_dataset(root, TINY)
  return root, counts


def test_generation_is_deterministic_per_seed(tiny_dir, tmp_path):
  root, _ = tiny_dir
  first = read_tree(root)
  generator.generate_dataset(tmp_path / 'again', TINY)
  assert read_tree(tmp_path / 'again') == first
  other_seed = dataclasses.replace(TINY, seed=1)
  generator.generate_dataset(tmp_path / 'seed1', other_seed)
  other = read_tree(tmp_path / 'seed1')
  shared = set(other) & set(first) - {generator.CONFIG_FILE}
  assert other.keys() != first.keys() or any(other[k] != first[k] for k in shared)


def test_layout_names_and_counts(tiny_dir):
  root, counts = tiny_dir
  assert sorted(p.name for p in root.iterdir()) == sorted(
    [*generator.SPLIT_FOLDERS.values(), generator.CONFIG_FILE]
  )
  num_train_ids = TINY.num_train_families * TINY.ids_per_family
  num_test_ids = TINY.num_test_families * TINY.ids_per_family
  for split in generator.SPLIT_FOLDERS:
    entries = parse_split(root, split)
    assert counts[split]['images'] == len(entries)
    assert counts[split]['ids'] == len({pid for pid, _ in entries if pid > 0})
  assert counts['train']['images'] == num_train_ids * TINY.images_per_id
  assert counts['query']['images'] + counts['gallery']['images'] == (
    num_test_ids * TINY.images_per_id + TINY.num_junk + TINY.num_distractors
  )
  with Image.open(next((root / 'query').iterdir())) as image:
    assert image.size == (TINY.image_width, TINY.image_height) and image.format == 'JPEG'


def test_splits_follow_the_market_protocol(tiny_dir):
  root, _ = tiny_dir
  train, query, gallery = (parse_split(root, s) for s in ('train', 'query', 'gallery'))
  train_pids = {pid for pid, _ in train}
  test_pids = {pid for pid, _ in query + gallery if pid > 0}
  assert min(train_pids) == 1 and not train_pids & test_pids
  assert {pid for pid, _ in query} == test_pids
  # Every query has a true match in the gallery under another camera.
  gallery_cams = collections.defaultdict(set)
  for pid, cam in gallery:
    gallery_cams[pid].add(cam)
  for pid, cam in query:
    assert gallery_cams[pid] - {cam}, (pid, cam)
  # Every identity is seen by at least two cameras; one query per (id, camera).
  assert len(query) == len(set(query))
  for pids in (train_pids, test_pids):
    for pid in pids:
      cams = {c for p, c in train + query + gallery if p == pid}
      assert len(cams) >= 2
  # Junk and distractors: gallery only.
  assert sum(pid == -1 for pid, _ in gallery) == TINY.num_junk
  assert sum(pid == 0 for pid, _ in gallery) == TINY.num_distractors
  assert all(pid > 0 for pid, _ in train + query)


def test_families_share_main_look_and_differ_in_details():
  people = generator.identity_attributes(generator.PRESETS['default'])
  assert people == generator.identity_attributes(generator.PRESETS['default'])
  families = collections.defaultdict(list)
  for attrs in people.values():
    families[attrs.family].append(attrs)
  assert len(families) == 55 and all(len(m) == 4 for m in families.values())
  shared = (
    'torso_color',
    'torso_style',
    'legs_color',
    'legs_style',
    'build',
    'skin',
    'backpack_color',
  )
  for members in families.values():
    for a, b in itertools.combinations(members, 2):
      assert all(getattr(a, f) == getattr(b, f) for f in shared)
      diffs = generator.detail_differences(a, b)
      assert len(diffs) >= 2 and set(diffs) & set(generator.VISIBLE_SLOTS), (a.pid, b.pid)
  for f, g in itertools.combinations(families, 2):
    a, b = families[f][0], families[g][0]
    gap = np.linalg.norm(np.subtract(a.torso_color, b.torso_color)) + np.linalg.norm(
      np.subtract(a.legs_color, b.legs_color)
    )
    assert gap > 40, (f, g)


def test_family_members_differ_in_few_pixels():
  """Rendered identically, family members differ only where their details are."""
  config = generator.PRESETS['default']
  people, cams = generator.identity_attributes(config), generator.camera_styles(config)
  families = collections.defaultdict(list)
  for attrs in people.values():
    families[attrs.family].append(attrs)

  def changed_fraction(a, b, view):
    x, y = (
      generator.render_person(p, view, cams[view.camera], 128, 64).astype(int) for p in (a, b)
    )
    return float(np.mean(np.abs(x - y).max(-1) > 30))

  rng = np.random.default_rng(0)
  for view_name in ('front', 'back', 'side'):
    cam = int(rng.integers(config.num_cameras))
    view = dataclasses.replace(generator.sample_view(rng, cam, cams[cam], 0.0), view=view_name)
    same = [
      changed_fraction(a, b, view)
      for f in range(6)
      for a, b in itertools.combinations(families[f], 2)
    ]
    other = [
      changed_fraction(families[f][0], families[g][0], view)
      for f, g in itertools.combinations(range(6), 2)
    ]
    assert min(same) > 0.002, view_name  # a detail is always visible
    assert max(same) < 0.12 and np.mean(same) < 0.4 * np.mean(other), (view_name, same, other)


def test_views_mirror_side_accessories():
  config = generator.PRESETS['default']
  cams = generator.camera_styles(config)
  person = next(
    a
    for a in generator.identity_attributes(config).values()
    if a.bag_side == 'left' and a.backpack_color is None and a.hat_style is None
  )
  rng = np.random.default_rng(1)
  view = dataclasses.replace(
    generator.sample_view(rng, 0, cams[0], 0.0), center_x=0.5, arm_swing=(0.1, 0.1)
  )

  def bag_side(view_name):
    """Which image half the bag is in: where removing it changes pixels."""
    with_bag, without = (
      generator.render_person(p, dataclasses.replace(view, view=view_name), cams[0], 128, 64)
      for p in (person, dataclasses.replace(person, bag_side=None))
    )
    changed = np.abs(with_bag.astype(int) - without.astype(int)).max(-1) > 30
    cols = np.nonzero(changed.any(0))[0]
    assert len(cols), view_name
    return 'right' if cols.mean() > 32 else 'left'

  # The person's left is the image's right from the front and its left from behind.
  assert bag_side('front') == 'right'
  assert bag_side('back') == 'left'


def test_occluded_preset_occludes_every_query():
  preset = generator.PRESETS['occluded']
  assert preset.query_occlusion and 0 < preset.occlusion_prob < 0.5
  config = dataclasses.replace(TINY, query_occlusion=True, occlusion_prob=0.1)
  records = generator.plan_images(config)
  queries = [r for r in records if r.split == 'query']
  assert queries and all(r.view.occluded for r in queries)
  assert not any(r.view.occluded for r in generator.plan_images(TINY))
  # Occlusion changes only the occluder: everything else about the image is the same.
  plain = {
    r.filename: r for r in generator.plan_images(dataclasses.replace(config, query_occlusion=False))
  }
  cams = generator.camera_styles(config)
  for r in queries[:3]:
    assert dataclasses.replace(r.view, occluded=False) == plain[r.filename].view
    covered = (
      np.abs(
        generator.render_record(r, cams, config).astype(int)
        - generator.render_record(plain[r.filename], cams, config)
      ).max(-1)
      > 30
    )
    assert 0.03 < covered.mean() < 0.7


def test_rerun_is_a_no_op(tmp_path):
  root = tmp_path / 'tiny'
  counts = generator.generate_dataset(root, TINY)
  stamps = {p: p.stat().st_mtime_ns for p in root.rglob('*')}
  assert generator.generate_dataset(root, TINY) == json.loads(json.dumps(counts))
  assert {p: p.stat().st_mtime_ns for p in root.rglob('*')} == stamps


def test_foreign_content_is_never_overwritten(tmp_path):
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not a synthetic dataset'):
    generator.generate_dataset(foreign, TINY)
  assert [p.name for p in foreign.iterdir()] == ['notes.txt']
  other = tmp_path / 'other'
  generator.generate_dataset(other, TINY)
  with pytest.raises(FileExistsError, match='another config'):
    generator.generate_dataset(other, dataclasses.replace(TINY, seed=3))
  # An empty folder is fine to fill.
  (tmp_path / 'empty').mkdir()
  assert generator.generate_dataset(tmp_path / 'empty', TINY)['train']['images'] > 0


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
  calls = []

  def failing_render(*args):
    calls.append(1)
    if len(calls) > 10:
      raise KeyboardInterrupt
    return np.zeros((TINY.image_height, TINY.image_width, 3), np.uint8)

  monkeypatch.setattr(generator, 'render_record', failing_render)
  with pytest.raises(KeyboardInterrupt):
    generator.generate_dataset(tmp_path / 'out', TINY)
  assert list(tmp_path.iterdir()) == []


def test_config_is_validated():
  with pytest.raises(ValueError, match='num_cameras'):
    generator.SyntheticConfig(num_cameras=10)
  with pytest.raises(ValueError, match='images_per_id'):
    generator.SyntheticConfig(images_per_id=3)


def test_cli_and_preview(tmp_path, capsys):
  assert (
    run_tool(
      synthetic_tool,
      ['--out', str(tmp_path / 'd'), '--preset', 'tiny', '--preview', str(tmp_path / 'p.png')],
    )
    == 0
  )
  out = capsys.readouterr().out
  assert 'train' in out and 'ready after' in out
  with Image.open(tmp_path / 'p.png') as preview:
    assert preview.width > 8 * TINY.image_width and preview.height > 8 * TINY.image_height
  assert (
    run_tool(synthetic_tool, ['--out', str(tmp_path / 'd'), '--preset', 'tiny', '--seed', '5']) == 2
  )

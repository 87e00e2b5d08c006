"""The custom builder `reid_folder` on small datasets rearranged from the synthetic generator."""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import numpy as np
from PIL import Image
import pytest

from cace_jax.data import catalog, folder_spec, pipeline, query_split, split_data
from cace_jax.errors import DatasetError
from conftest import make_jpeg, run_tool, write_files
from tools import prepare as prepare_tool

MARKET_FOLDERS = {'train': 'bounding_box_train', 'query': 'query', 'gallery': 'bounding_box_test'}
NAME = re.compile(r'^(-?\d+)_c(\d+)')


@pytest.fixture(scope='module')
def tiny_images(tiny_data_dir):
  """{split: [(path, pid, camid)]} of the generated synthetic_details/tiny (Market layout)."""
  root = os.path.join(tiny_data_dir, 'manual', 'synthetic_details', 'tiny')
  found = {}
  for split, folder in MARKET_FOLDERS.items():
    rows = []
    for name in sorted(os.listdir(os.path.join(root, folder))):
      pid, camid = map(int, NAME.match(name).groups())
      if pid > 0:  # junk and distractors stay out of the custom copies
        rows.append((os.path.join(root, folder, name), pid, camid))
    found[split] = rows
  return found


def write_spec(root, spec: dict) -> None:
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, folder_spec.SPEC_FILE), 'w') as f:
    json.dump(spec, f)


def copy(path: str, target: str) -> None:
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copy(path, target)


def prepared_splits(tmp_path, name='mine'):
  builder = catalog.prepare_dataset(
    f'reid_folder/{name}', str(tmp_path / 'data'), str(tmp_path / 'manual')
  )
  train = split_data.load_split(builder, 'train')
  query, gallery = split_data.load_eval_splits(builder, f'reid_folder/{name}')
  return builder, {'train': train, 'query': query, 'gallery': gallery}


def identities(rows) -> set:
  return {pid for _, pid, _ in rows}


def test_names_layout_with_own_pattern(tiny_images, tmp_path):
  root = tmp_path / 'manual' / 'mine'
  for split, rows in tiny_images.items():
    for path, pid, camid in rows:
      copy(path, str(root / split / f'cam{camid}-person{pid:04d}-{os.path.basename(path)}'))
  write_spec(
    root,
    {
      'layout': 'names',
      'splits': {'train': 'train', 'query': 'query', 'gallery': 'gallery'},
      'name_pattern': r'^cam(?P<camid>\d+)-person(?P<pid>\d+)-',
    },
  )
  builder, splits = prepared_splits(tmp_path)
  for split, rows in tiny_images.items():
    assert len(splits[split]) == len(rows)
    assert set(splits[split].pids.tolist()) == identities(rows)
    assert sorted(splits[split].camids.tolist()) == sorted(c for _, _, c in rows)
  # Training labels are 0..N-1 over the sorted training identities.
  assert sorted(set(splits['train'].labels.tolist())) == list(
    range(len(identities(tiny_images['train'])))
  )
  assert split_data.has_cameras(builder)


@pytest.mark.parametrize('camera', ['name', 'subfolder', 'none'])
def test_folder_per_identity_layouts(camera, tiny_images, tmp_path):
  root = tmp_path / 'manual' / 'mine'
  for split, rows in tiny_images.items():
    for path, pid, camid in rows:
      folder = root / split / f'person_{pid}'  # not integers: numbered by sorted name
      if camera == 'subfolder':
        folder = folder / f'cam{camid}'
      copy(path, str(folder / os.path.basename(path)))
  spec = {'layout': 'folders', 'camera': camera}
  if camera == 'name':
    spec['name_pattern'] = r'_c(?P<camid>\d+)s'
  write_spec(root, spec)
  builder, splits = prepared_splits(tmp_path)
  for split, rows in tiny_images.items():
    assert len(splits[split]) == len(rows)
    assert len(set(splits[split].pids.tolist())) == len(identities(rows))
  # Query and gallery folders of one name are one identity.
  by_name = lambda data: {f.split('/')[1]: int(p) for f, p in zip(data.file_names, data.pids)}
  q, g = by_name(splits['query']), by_name(splits['gallery'])
  assert all(q[name] == g[name] for name in q)
  if camera == 'none':
    assert not split_data.has_cameras(builder)
    assert set(splits['query'].camids.tolist()) == {query_split.NO_CAMERA_QUERY}
    assert set(splits['gallery'].camids.tolist()) == {query_split.NO_CAMERA_GALLERY}
  else:
    for split, rows in tiny_images.items():
      assert sorted(splits[split].camids.tolist()) == sorted(c for _, _, c in rows)


def test_list_files_with_and_without_camera_column(tiny_images, tmp_path):
  root = tmp_path / 'manual' / 'mine'

  def write_lists(with_camera):
    for split, rows in tiny_images.items():
      lines = []
      for i, (path, pid, camid) in enumerate(rows):
        relpath = f'images/{split}_{i:03d}.jpg'  # nothing in the name
        copy(path, str(root / relpath))
        lines.append(f'{relpath} {pid} {camid}' if with_camera[split] else f'{relpath} {pid}')
      (root / f'{split}.txt').write_text('\n'.join(lines) + '\n\n')

  write_lists({'train': True, 'query': True, 'gallery': True})
  write_spec(root, {'layout': 'lists'})
  builder, splits = prepared_splits(tmp_path, 'mine')
  assert split_data.has_cameras(builder)
  for split, rows in tiny_images.items():
    assert sorted(zip(splits[split].pids.tolist(), splits[split].camids.tolist())) == sorted(
      (p, c) for _, p, c in rows
    )
  # A list without the camera column, and no camera in the file names.
  shutil.rmtree(tmp_path / 'data')
  write_lists({'train': False, 'query': True, 'gallery': True})
  write_spec(root, {'layout': 'lists', 'name_pattern': r'(?P<pid>\d+)'})
  with pytest.raises(DatasetError, match=r'train.txt line 1: no camera column'):
    prepared_splits(tmp_path)
  write_spec(root, {'layout': 'lists', 'camera': 'none'})
  builder, splits = prepared_splits(tmp_path, 'mine')
  assert not split_data.has_cameras(builder)
  for split, rows in tiny_images.items():
    assert sorted(splits[split].pids.tolist()) == sorted(p for _, p, _ in rows)


def test_list_file_errors_name_file_and_line(tiny_images, tmp_path):
  root = tmp_path / 'manual' / 'mine'
  path, pid, camid = tiny_images['train'][0]
  copy(path, str(root / 'a.jpg'))
  for split in ('train', 'query', 'gallery'):
    (root / f'{split}.txt').write_text(f'a.jpg {pid} {camid}\n')
  (root / 'gallery.txt').write_text('a.jpg 3 1\nmissing.jpg 4 1\n')
  write_spec(root, {'layout': 'lists'})
  with pytest.raises(DatasetError, match=r'gallery.txt line 2: missing.jpg not found'):
    prepared_splits(tmp_path)
  (root / 'gallery.txt').write_text('a.jpg three 1\n')
  with pytest.raises(DatasetError, match=r'gallery.txt line 1: expected "relpath pid \[camid\]"'):
    prepared_splits(tmp_path)


def write_single_set(tiny_images, root, **split):
  rows = [r for split_rows in tiny_images.values() for r in split_rows]
  pids = sorted(identities(rows))
  for path, _, _ in rows:
    copy(path, str(root / 'images' / os.path.basename(path)))
  write_spec(root, {'splits': {'all': 'images'}, **split})
  return pids


def test_single_set_split_by_identity_is_seeded_and_recorded(tiny_images, tmp_path):
  found = {}
  for seed in (0, 0, 1):
    case = tmp_path / f'run{len(found)}_{seed}'
    pids = write_single_set(tiny_images, case / 'manual' / 'mine', split_seed=seed, test_ids=0.4)
    builder, splits = prepared_splits(case)
    test = sorted(set(splits['query'].pids.tolist()) | set(splits['gallery'].pids.tolist()))
    train = set(splits['train'].pids.tolist())
    assert not train & set(test) and train | set(test) == set(pids)
    assert len(test) == round(0.4 * len(pids))
    # Market's rule: one query per identity and camera, the rest gallery.
    query = splits['query']
    keys = list(zip(query.pids.tolist(), query.camids.tolist()))
    assert len(keys) == len(set(keys))
    recorded = dict(builder.info.metadata)
    assert recorded['test_pids'] == test and recorded['spec']['split_seed'] == seed
    found.setdefault(seed, []).append(test)
  assert found[0][0] == found[0][1]  # same seed, same split
  assert found[0][0] != found[1][0]  # another seed, another split


def test_png_grayscale_and_any_size_become_3_channel_images(tiny_images, tmp_path):
  root = tmp_path / 'manual' / 'mine'
  for split, rows in tiny_images.items():
    for i, (path, _, _) in enumerate(rows):
      image = Image.open(path)
      name = os.path.basename(path)
      if i % 3 == 1:  # PNG of another size
        image, name = image.resize((40, 90)), name.replace('.jpg', '.png')
      elif i % 3 == 2:  # grayscale JPEG
        image = image.convert('L')
      os.makedirs(root / MARKET_FOLDERS[split], exist_ok=True)
      image.save(str(root / MARKET_FOLDERS[split] / name))
  _, splits = prepared_splits(tmp_path)  # no spec: Market's layout
  assert len(splits['train']) == len(tiny_images['train'])
  for encoded in splits['train'].images:
    assert np.asarray(Image.open(io.BytesIO(encoded))).shape[-1] == 3
  batch = next(
    pipeline.iterate_numpy(
      pipeline.create_eval_dataset(
        splits['train'], image_size=(32, 16), batch_size=8, num_devices=1, local_devices=1
      )
    )
  )
  assert batch['image'].shape == (8, 32, 16, 3)


def test_unreadable_image_is_named_and_prepared_data_survives(tiny_images, tmp_path):
  root = tmp_path / 'manual' / 'mine'
  for split, rows in tiny_images.items():
    for path, _, _ in rows:
      copy(path, str(root / MARKET_FOLDERS[split] / os.path.basename(path)))
  builder, _ = prepared_splits(tmp_path)
  before = sorted(os.listdir(builder.data_dir))
  broken = tmp_path / 'manual' / 'other'
  shutil.copytree(root, broken)
  bad = broken / 'query' / os.path.basename(tiny_images['query'][0][0])
  bad.write_bytes(b'not an image')
  with pytest.raises(DatasetError, match=re.escape(f'unreadable image {bad}: not an image')) as e:
    prepared_splits(tmp_path, 'other')
  assert '<_io' not in str(e.value)  # PIL's name for the bytes it was given
  assert sorted(os.listdir(builder.data_dir)) == before
  assert not os.path.exists(tmp_path / 'data' / 'reid_folder' / 'other')  # not even empty


def identity_folders(root, folders, pids, images=2, broken=None) -> None:
  """`<folder>/<pid>/<n>.jpg` for each folder and pid, `layout: folders`; `broken` not an image."""
  files = {
    f'{folder}/{pid}/{n}.jpg': make_jpeg(i, size=(16, 8))
    for i, (folder, pid, n) in enumerate(
      (folder, pid, n) for folder in folders for pid in pids for n in range(images)
    )
  }
  if broken:
    files[broken] = b'not an image'
  write_files(str(root), files)


@pytest.mark.parametrize('splits', [None, {'all': 'images'}])
def test_integer_identity_folders_keep_their_numbers_and_negative_ones_are_dropped(
  splits, tmp_path
):
  root = tmp_path / 'manual' / 'mine'
  folders = ['images'] if splits else ['train', 'query', 'gallery']
  identity_folders(root, folders, ['-1', '3', '7', '12', '40'])  # '-1': Market's junk
  write_spec(root, {'layout': 'folders', **({'splits': splits, 'test_ids': 2} if splits else {})})
  _, found = prepared_splits(tmp_path)
  seen = set()
  for data in found.values():
    assert [name.split('/')[1] for name in data.file_names] == [str(p) for p in data.pids]
    seen |= set(data.pids.tolist())
  assert seen == {3, 7, 12, 40}
  if not splits:
    assert sorted(found['gallery'].pids.tolist()) == [3, 3, 7, 7, 12, 12, 40, 40]


def test_two_folders_of_one_number_are_refused_not_merged(tmp_path):
  root = tmp_path / 'manual' / 'mine'
  identity_folders(root, ['train', 'query', 'gallery'], ['3', '12', '0012'])
  write_spec(root, {'layout': 'folders'})
  with pytest.raises(DatasetError, match="identity folders '0012' and '12' are both number 12"):
    prepared_splits(tmp_path)
  assert not (tmp_path / 'data' / 'reid_folder').exists()


def test_a_failed_preparation_leaves_no_folder_it_created(tmp_path, capsys):
  root = tmp_path / 'manual' / 'mine'
  identity_folders(root, ['train', 'query', 'gallery'], ['1', '2'], broken='query/2/x.jpg')
  write_spec(root, {'layout': 'folders'})
  kept = tmp_path / 'kept' / 'reid_folder' / 'mine'  # existed before, though empty
  kept.mkdir(parents=True)
  fresh = tmp_path / 'fresh' / 'data'
  for data_dir in (fresh, tmp_path / 'kept'):
    argv = ['--dataset=reid_folder/mine', f'--data_dir={data_dir}', f'--manual_dir={root.parent}']
    assert run_tool(prepare_tool, argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f'error: corrupt or unreadable image {root / "query/2/x.jpg"}: ')
    assert 'not an image format PIL can identify' in line and '<_io' not in line
  assert not (tmp_path / 'fresh').exists()
  assert [str(p.relative_to(tmp_path)) for p in sorted((tmp_path / 'kept').rglob('*'))] == [
    'kept/reid_folder',
    'kept/reid_folder/mine',
  ]


def test_spec_errors_and_a_changed_spec_name_the_file_and_key(tiny_images, tmp_path):
  root = tmp_path / 'manual' / 'mine'
  for split, rows in tiny_images.items():
    for path, _, _ in rows:
      copy(path, str(root / MARKET_FOLDERS[split] / os.path.basename(path)))
  for spec, message in [
    ({'layot': 'names'}, "unknown key 'layot'"),
    ({'layout': 'tree'}, "layout='tree'"),
    ({'camera': 'subfolder'}, "camera='subfolder'"),
    ({'name_pattern': '(?P<camid>\\d+)'}, 'needs a named group'),
    ({'splits': {'all': 'x'}, 'test_ids': 1.5}, 'test_ids=1.5'),
    ({'test_ids': 3}, 'apply only to splits'),
  ]:
    write_spec(root, spec)
    with pytest.raises(DatasetError, match=re.escape(message)) as error:
      prepared_splits(tmp_path)
    assert folder_spec.SPEC_FILE in str(error.value)
  os.remove(root / folder_spec.SPEC_FILE)
  builder, splits = prepared_splits(tmp_path)
  write_spec(root, {'camera': 'none'})
  with pytest.raises(DatasetError, match='prepared with another reid_dataset.json .camera differ'):
    prepared_splits(tmp_path)
  assert builder.is_prepared()
  with pytest.raises(DatasetError, match='expected reid_folder/<name>'):
    catalog.prepare_dataset('reid_folder', str(tmp_path / 'data'), str(tmp_path / 'manual'))


def test_validation_split_without_cameras_uses_one_query_per_identity():
  rows = 12
  train = split_data.SplitData(
    images=np.array([b''] * rows, dtype=object),
    labels=np.repeat(np.arange(4), 3).astype(np.int32),
    pids=np.repeat([10, 11, 12, 13], 3).astype(np.int32),
    camids=np.ones(rows, np.int32),
    file_names=np.array([f'{i:02d}.jpg' for i in range(rows)], dtype=object),
  )
  rest, query, gallery, held = split_data.hold_out_identities(train, 2, seed=0)
  assert len(held) == 2 and len(rest) == 6
  assert sorted(query.pids.tolist()) == held.tolist()  # one query per identity
  assert len(gallery) == 4
  assert set(query.camids.tolist()) == {query_split.NO_CAMERA_QUERY}
  assert set(gallery.camids.tolist()) == {query_split.NO_CAMERA_GALLERY}


def test_choose_queries_follows_market_rule():
  pids = np.array([1, 1, 1, 1, 2, 2, 3])
  camids = np.array([1, 1, 2, 2, 1, 1, 1])
  names = np.array(['b', 'a', 'c', 'd', 'e', 'f', 'g'], dtype=object)
  is_query, is_gallery = query_split.choose_queries(pids, camids, names)
  # pid 1: first of camera 1 ('a', index 1) and of camera 2 ('c'); pid 2 and 3 one camera: out.
  np.testing.assert_array_equal(is_query, [0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(is_gallery, [1, 0, 0, 1, 0, 0, 0])
  is_query, is_gallery = query_split.choose_queries(pids, camids, names, per_camera=False)
  np.testing.assert_array_equal(is_query, [0, 1, 0, 0, 1, 0, 0])  # pid 3 has one image: out
  np.testing.assert_array_equal(is_gallery, [1, 0, 1, 1, 0, 1, 0])


def test_training_on_a_dataset_without_cameras_says_how_it_was_evaluated(tiny_images, tmp_path):
  from cace_jax.train import train_lib
  from configs import tiny

  root = tmp_path / 'manual' / 'mine'
  for split, rows in tiny_images.items():
    for path, pid, _ in rows:
      copy(path, str(root / split / f'{pid:04d}' / os.path.basename(path)))
  write_spec(root, {'layout': 'folders'})  # no camera anywhere
  config = tiny.get_config()
  config.data.dataset = 'reid_folder/mine'
  config.data.data_dir, config.data.manual_dir = str(tmp_path / 'data'), str(root.parent)
  config.data.validation_ids = 3
  config.eval.stage2_k_grid = (2,)
  config.eval.diagnostics = False
  config.train.num_steps = 2
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  assert saved['info']['cameras'].startswith('none: query and gallery taken as different')
  # The validation split held out identities with one query each.
  assert saved['info']['selection']['num_query'] == len(saved['info']['selection']['pids'])
  assert saved['results']['individual']['mAP'] > 0


def test_two_datasets_train_together_and_are_each_evaluated(tiny_data_dir, tmp_path):
  from cace_jax.runs import checkpoint
  from cace_jax.train import train_lib
  from configs import tiny

  # A second dataset: the tiny one's files again, as a custom dataset in Market's layout.
  shutil.copytree(
    os.path.join(tiny_data_dir, 'manual', 'synthetic_details', 'tiny'),
    tmp_path / 'manual' / 'copy',
    ignore=shutil.ignore_patterns('synthetic_config.json'),
  )
  shutil.copytree(
    os.path.join(tiny_data_dir, 'manual', 'synthetic_details'),
    tmp_path / 'manual' / 'synthetic_details',
  )
  config = tiny.get_config()
  config.data.dataset = 'synthetic_details/tiny+reid_folder/copy'
  config.data.data_dir = str(tmp_path / 'data')
  config.data.manual_dir = str(tmp_path / 'manual')
  config.data.validation_ids = 3
  config.eval.stage2_k_grid = (2,)
  config.eval.diagnostics = False
  config.train.num_steps = 2
  builders = split_data.prepare_datasets(config)
  alone = split_data.load_split(builders['synthetic_details/tiny'], 'train')
  union = split_data.load_training_splits(builders, config.data)
  # Identities and classes of the two never coincide; classes are the sum less the held out.
  train = union.train
  first = np.char.startswith(train.file_names.astype(str), 'synthetic_details/tiny/')
  assert not set(train.pids[first].tolist()) & set(train.pids[~first].tolist())
  assert not set(train.labels[first].tolist()) & set(train.labels[~first].tolist())
  classes = len(np.unique(alone.labels))
  assert len(np.unique(train.labels)) == 2 * classes - len(union.validation_pids)
  workdir = str(tmp_path / 'run')
  train_lib.train_and_evaluate(config, workdir)
  assert checkpoint.load_run(workdir).record.num_classes == 2 * classes - 3
  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  assert list(saved['test_sets']) == ['synthetic_details/tiny', 'reid_folder/copy']
  tables = saved['test_sets']
  assert saved['results'] == tables['synthetic_details/tiny']['results']
  # The same images under two names: the same model scores them the same.
  assert tables['reid_folder/copy']['results']['individual'] == pytest.approx(
    tables['synthetic_details/tiny']['results']['individual']
  )
  with pytest.raises(Exception, match='distinct names joined by'):
    split_data.dataset_names('market1501++dukemtmc_reid')

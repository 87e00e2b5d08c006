"""The TFDS builders on small fixture folders with the real naming conventions."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cace_jax.data import catalog
from cace_jax.errors import DatasetError
from conftest import DUKE_NAME, MARKET_NAME, market_style_files, msmt_files, write_files, write_zip


def read_split(builder, split):
  rows = []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    rows.append(
      {
        k: (v.decode() if isinstance(v, bytes) and k == 'file_name' else v)
        for k, v in example.items()
      }
    )
  return sorted(rows, key=lambda r: r['file_name'])


def files_under(path):
  return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


def summary(builder):
  return {
    split: [
      (os.path.basename(r['file_name']), int(r['pid']), int(r['label']), int(r['camid']))
      for r in read_split(builder, split)
    ]
    for split in ('train', 'query', 'gallery')
  }


def test_market_folder_drops_junk_keeps_distractors(market_manual_dir, tmp_path):
  builder = catalog.prepare_dataset('market1501', str(tmp_path / 'records'), market_manual_dir)
  rows = summary(builder)
  assert [r[1] for r in rows['train']] == [2, 2, 2, 7, 7, 7, 9, 9, 9]
  assert [r[2] for r in rows['train']] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert [(r[1], r[3]) for r in rows['query']] == [(3, 1), (5, 2)]
  assert sorted(r[1] for r in rows['gallery']) == [0, 3, 3, 5, 5]
  assert all(r[2] == -1 for r in rows['query'] + rows['gallery'])
  image = read_split(builder, 'train')[0]['image']
  assert image.shape == (32, 16, 3) and image.dtype == np.uint8


def test_market_zip_with_nested_root_reads_the_same(market_manual_dir, tmp_path):
  zip_manual = tmp_path / 'zip_manual'
  zip_manual.mkdir()
  write_zip(
    str(zip_manual / 'Market-1501-v15.09.15.zip'),
    market_style_files('Market-1501-v15.09.15', MARKET_NAME),
  )
  from_zip = catalog.prepare_dataset('market1501', str(tmp_path / 'a'), str(zip_manual))
  from_dir = catalog.prepare_dataset('market1501', str(tmp_path / 'b'), market_manual_dir)
  assert summary(from_zip) == summary(from_dir)
  zipped, extracted = read_split(from_zip, 'gallery'), read_split(from_dir, 'gallery')
  np.testing.assert_array_equal(zipped[0]['image'], extracted[0]['image'])


@pytest.mark.parametrize(
  'name,folder', [('dukemtmc_reid', 'DukeMTMC-reID'), ('occluded_duke', 'Occluded_Duke')]
)
def test_duke_style_builders(name, folder, tmp_path):
  manual = tmp_path / 'manual'
  write_files(str(manual), market_style_files(folder, DUKE_NAME))
  builder = catalog.prepare_dataset(name, str(tmp_path / 'records'), str(manual))
  rows = summary(builder)
  assert len(rows['train']) == 9 and len(rows['query']) == 2 and len(rows['gallery']) == 5
  assert rows['train'][0][0].endswith('_c1_f0000001.jpg') and rows['train'][0][3] == 1


@pytest.mark.parametrize(
  'version,train_dir,test_dir',
  [('MSMT17_V1', 'train', 'test'), ('MSMT17_V2', 'mask_train_v2', 'mask_test_v2')],
)
def test_msmt17_layouts_and_trainval(version, train_dir, test_dir, tmp_path):
  manual = tmp_path / 'manual'
  write_files(str(manual), msmt_files(version, train_dir, test_dir))
  builder = catalog.prepare_dataset('msmt17', str(tmp_path / 'records'), str(manual))
  rows = summary(builder)
  assert [(r[1], r[2], r[3]) for r in rows['train']] == [
    (0, 0, 1),
    (0, 0, 3),
    (1, 1, 2),
    (1, 1, 15),
  ]
  assert [(r[1], r[3]) for r in rows['query']] == [(0, 7), (1, 8)]
  assert len(rows['gallery']) == 3
  combined = summary(
    catalog.prepare_dataset('msmt17/trainval', str(tmp_path / 'records'), str(manual))
  )
  assert sorted({(r[1], r[2]) for r in combined['train']}) == [(0, 0), (1, 1), (2, 2)]
  assert len(combined['train']) == 6
  with pytest.raises(DatasetError, match='msmt17/combineall is now msmt17/trainval'):
    catalog.prepare_dataset('msmt17/combineall', str(tmp_path / 'records'), str(manual))


def test_count_mismatch_is_a_warning(market_manual_dir, tmp_path, caplog):
  with caplog.at_level('WARNING'):
    catalog.prepare_dataset('market1501', str(tmp_path / 'records'), market_manual_dir)
  assert any('official release has 12936 / 751' in m for m in caplog.messages)


@pytest.mark.parametrize(
  'where',
  [
    'my_market',  # a renamed folder under data/manual
    'my_market.zip',  # a renamed zip
    'reid-data/market1501/Market-1501-v15.09.15',  # torchreid's tree, its root as manual_dir
    'reid-data/anything/renamed',  # a renamed copy two levels down
  ],
)
def test_market_found_wherever_users_keep_it(where, tmp_path):
  manual = tmp_path / 'manual'
  if where.endswith('.zip'):
    manual.mkdir()
    write_zip(str(manual / where), market_style_files('inside', MARKET_NAME))
  else:
    parent, name = os.path.split(where)
    write_files(str(manual / parent), market_style_files(name, MARKET_NAME))
  # Neither the synthetic data nor a custom dataset in the same layout is taken for Market.
  write_files(str(manual / 'synthetic_details'), market_style_files('default', MARKET_NAME))
  write_files(
    str(manual), {**market_style_files('mine', MARKET_NAME), 'mine/reid_dataset.json': b'{}'}
  )
  manual_dir = str(manual / 'reid-data') if where.startswith('reid-data') else str(manual)
  builder = catalog.prepare_dataset('market1501', str(tmp_path / 'records'), manual_dir)
  assert [r[1] for r in summary(builder)['train']] == [2, 2, 2, 7, 7, 7, 9, 9, 9]


def test_two_renamed_copies_are_named_not_guessed(tmp_path):
  manual = tmp_path / 'manual'
  for name in ('copy_a', 'copy_b'):
    write_files(str(manual), market_style_files(name, MARKET_NAME))
  with pytest.raises(DatasetError, match='several datasets .*copy_a.*copy_b.*point --manual_dir'):
    catalog.prepare_dataset('market1501', str(tmp_path / 'records'), str(manual))


def test_missing_dataset_names_path_and_expectation(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  (manual / 'unrelated.txt').write_text('x')
  with pytest.raises(DatasetError) as error:
    catalog.prepare_dataset('dukemtmc_reid', str(tmp_path / 'records'), str(manual))
  message = str(error.value)
  assert str(manual) in message and 'bounding_box_train' in message
  assert 'DukeMTMC-reID' in message and '\n' not in message
  assert files_under(tmp_path / 'records' / 'dukemtmc_reid') == []


def test_cli_error_is_one_line_and_nonzero(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      'tools/prepare.py',
      '--dataset',
      'market1501',
      '--data_dir',
      str(tmp_path / 'records'),
      '--manual_dir',
      str(tmp_path / 'nowhere'),
    ],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert result.returncode == 2
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and str(tmp_path / 'nowhere') in error_lines[0]


def test_malformed_file_name_is_named(tmp_path):
  manual = tmp_path / 'manual'
  files = market_style_files('Market-1501-v15.09.15', MARKET_NAME)
  files['Market-1501-v15.09.15/query/person_one.jpg'] = next(iter(files.values()))
  write_files(str(manual), files)
  with pytest.raises(DatasetError, match='person_one.jpg'):
    catalog.prepare_dataset('market1501', str(tmp_path / 'records'), str(manual))


def test_corrupt_image_is_named_and_prepared_data_survives(market_manual_dir, tmp_path):
  records = str(tmp_path / 'records')
  builder = catalog.prepare_dataset('market1501', records, market_manual_dir)
  before = summary(builder)
  # Another dataset with a truncated image must fail naming the file, leave no partial
  # records, and leave the dataset prepared before intact.
  corrupt_manual = tmp_path / 'corrupt'
  files = market_style_files('DukeMTMC-reID', DUKE_NAME)
  victim = sorted(f for f in files if f.endswith('.jpg') and '/query/' in f)[0]
  files[victim] = files[victim][:40]
  write_files(str(corrupt_manual), files)
  with pytest.raises(DatasetError, match=os.path.basename(victim)):
    catalog.prepare_dataset('dukemtmc_reid', records, str(corrupt_manual))
  assert not tfds.builder('dukemtmc_reid', data_dir=records).is_prepared()
  assert files_under(os.path.join(records, 'dukemtmc_reid')) == []
  # Preparing again is a no-op on the finished dataset, whatever the manual folder holds.
  again = catalog.prepare_dataset('market1501', records, str(corrupt_manual))
  assert summary(again) == before


def test_synthetic_details_is_generated_and_read_by_the_market_code_path(tmp_path):
  manual = str(tmp_path / 'manual')
  builder = catalog.prepare_dataset('synthetic_details/tiny', str(tmp_path / 'records'), manual)
  rows = summary(builder)
  raw = os.path.join(manual, 'synthetic_details', 'tiny', 'bounding_box_train')
  raw_train = [n for n in os.listdir(raw) if n.endswith('.jpg') and not n.startswith('-1')]
  assert sorted(r[0] for r in rows['train']) == sorted(raw_train)
  assert sorted({r[2] for r in rows['train']}) == list(range(len({r[1] for r in rows['train']})))
  assert {r[1] for r in rows['query']} <= {r[1] for r in rows['gallery']}
  assert 0 in {r[1] for r in rows['gallery']}  # distractors kept
  image = read_split(builder, 'query')[0]['image']
  assert image.shape == (128, 64, 3)

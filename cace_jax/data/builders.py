"""TFDS builders: Market-1501, DukeMTMC-reID, MSMT17, Occluded-Duke, synthetic, your own data.

Importing this module registers the builders with TFDS, so
`tfds.builder('market1501', data_dir='data')` works. Each reads the official
zip or extracted folder from the manual directory (`data/manual/` by default);
see `data/README.md` for where each file goes.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from cace_jax.data import folder_spec
from cace_jax.data.manual_source import ManualSource, find_source
from cace_jax.data.reid_builder import Record, ReIDBuilder, list_market_style_split
from cace_jax.data.synthetic_details import generator
from cace_jax.errors import DatasetError

_MARKET_STYLE_FOLDERS = {
  'train': 'bounding_box_train',
  'query': 'query',
  'gallery': 'bounding_box_test',
}


class _MarketStyleBuilder(ReIDBuilder):
  """Datasets in Market-1501's folder layout; subclasses name their folders."""

  SOURCE_CANDIDATES: tuple[str, ...] = ()

  def _find_records(self, manual_dir: str):
    source = find_source(
      manual_dir,
      self.SOURCE_CANDIDATES,
      _MARKET_STYLE_FOLDERS.values(),
      self.MANUAL_DOWNLOAD_INSTRUCTIONS,
    )
    return source, _list_market_style(source)


def _list_market_style(source: ManualSource) -> dict[str, list[Record]]:
  return {
    split: list_market_style_split(source, folder, keep_distractors=split == 'gallery')
    for split, folder in _MARKET_STYLE_FOLDERS.items()
  }


class Market1501(_MarketStyleBuilder):
  """Market-1501 (v15.09.15): 1,501 identities, 6 cameras."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Download Market-1501-v15.09.15.zip (https://zheng-lab-anu.github.io/Project/'
    'project_reid.html) and place the zip, or the folder extracted from it, in '
    'the manual directory (default data/manual/).'
  )
  SOURCE_CANDIDATES = ('Market-1501-v15.09.15', 'Market-1501', 'market1501')
  EXPECTED_COUNTS = {'train': (12936, 751), 'query': (3368, 750), 'gallery': (15913, 751)}


class DukemtmcReid(_MarketStyleBuilder):
  """DukeMTMC-reID: 1,404 identities plus distractors, 8 cameras."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Place DukeMTMC-reID.zip, or the folder DukeMTMC-reID/ extracted from it '
    '(bounding_box_train/, query/, bounding_box_test/), in the manual directory '
    '(default data/manual/).'
  )
  SOURCE_CANDIDATES = ('DukeMTMC-reID', 'dukemtmc-reid', 'dukemtmc_reid')
  EXPECTED_COUNTS = {'train': (16522, 702), 'query': (2228, 702), 'gallery': (17661, 1110)}


class OccludedDuke(_MarketStyleBuilder):
  """Occluded-DukeMTMC: DukeMTMC re-split so that every query is occluded."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Build Occluded_Duke from DukeMTMC-reID with the official script '
    '(https://github.com/lightas/Occluded-DukeMTMC-Dataset) and place Occluded_Duke/ '
    '(bounding_box_train/, query/, bounding_box_test/) or its zip in the manual '
    'directory (default data/manual/).'
  )
  SOURCE_CANDIDATES = ('Occluded_Duke', 'Occluded-Duke', 'occluded_duke')
  EXPECTED_COUNTS = {'train': (15618, 702), 'query': (2210, 519), 'gallery': (17661, 1110)}


class Msmt17Config(tfds.core.BuilderConfig):
  """`trainval` adds list_val.txt to the training split (off by convention)."""

  def __init__(self, *, trainval: bool, **kwargs):
    super().__init__(**kwargs)
    self.trainval = trainval


class Msmt17(ReIDBuilder):
  """MSMT17 (V1 or V2 layout): 4,101 identities, 15 cameras, list files."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Request MSMT17 from its authors (https://www.pkuvmc.com/dataset.html) and place '
    'MSMT17_V1/ (train/, test/, list_*.txt) or MSMT17_V2/ (mask_train_v2/, '
    'mask_test_v2/, list_*.txt), or their zip, in the manual directory '
    '(default data/manual/).'
  )
  BUILDER_CONFIGS = [
    Msmt17Config(
      name='default',
      trainval=False,
      description='train = list_train.txt (the standard protocol).',
    ),
    Msmt17Config(
      name='trainval', trainval=True, description='train = list_train.txt + list_val.txt.'
    ),
  ]
  _LISTS = ('list_train.txt', 'list_query.txt', 'list_gallery.txt')

  def _expected_counts(self):
    train = (32621, 1041) if self.builder_config.trainval else (30248, 1041)
    return {'train': train, 'query': (11659, 3060), 'gallery': (82161, 3060)}

  def _find_records(self, manual_dir: str):
    source = find_source(
      manual_dir,
      ('MSMT17_V1', 'MSMT17_V2', 'MSMT17'),
      self._LISTS,
      self.MANUAL_DOWNLOAD_INSTRUCTIONS,
    )
    train_dir = _first_existing(source, ('train', 'mask_train_v2'))
    test_dir = _first_existing(source, ('test', 'mask_test_v2'))
    train_lists = ['list_train.txt']
    if self.builder_config.trainval:
      if not source.exists('list_val.txt'):
        raise DatasetError(f'trainval needs {source.describe("list_val.txt")}, not found')
      train_lists.append('list_val.txt')
    records = {
      'train': [r for name in train_lists for r in _read_msmt_list(source, name, train_dir)],
      'query': _read_msmt_list(source, 'list_query.txt', test_dir),
      'gallery': _read_msmt_list(source, 'list_gallery.txt', test_dir),
    }
    return source, records


def _first_existing(source: ManualSource, folders: tuple[str, ...]) -> str:
  for folder in folders:
    if source.exists(folder):
      return folder
  raise DatasetError(f'expected one of {", ".join(folders)} in {source.describe()}')


def _read_msmt_list(source: ManualSource, list_name: str, image_dir: str) -> list[Record]:
  """Records of an MSMT17 list file: lines `<relpath> <pid>`.

  The camera is the third `_` field of the file name
  (`0000_000_01_0303morning_0015_0.jpg` -> camera 1).
  """
  records = []
  for line_number, line in enumerate(source.read_text(list_name).splitlines(), 1):
    if not line.strip():
      continue
    try:
      relpath, pid = line.split()
      camid = int(relpath.rsplit('/', 1)[-1].split('_')[2])
      records.append(Record(f'{image_dir}/{relpath}', int(pid), camid))
    except (ValueError, IndexError) as e:
      raise DatasetError(
        f'{source.describe(list_name)} line {line_number}: expected '
        f"'<pid dir>/<pid>_<index>_<camera>_....jpg <pid>', got {line!r}"
      ) from e
  return records


class SyntheticDetailsConfig(tfds.core.BuilderConfig):
  """One preset of the procedural generator (`synthetic_details.generator.PRESETS`)."""


class SyntheticDetails(ReIDBuilder):
  """Procedural pedestrians in families that differ only in details.

  The generator writes Market-1501's layout and file names into
  `<manual_dir>/synthetic_details/<config>/`; this builder then reads it with
  the Market-1501 code path, so every demo and test exercises the real loader.
  `cace_jax.data.catalog` runs the generator first.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Nothing to download: run `python tools/prepare.py --dataset '
    'synthetic_details` to generate and prepare it.'
  )
  BUILDER_CONFIGS = [
    SyntheticDetailsConfig(name=name, description=f'preset {name!r}') for name in generator.PRESETS
  ]

  def _find_records(self, manual_dir: str):
    folder = raw_synthetic_dir(manual_dir, self.builder_config.name)
    if not os.path.isdir(folder):
      raise DatasetError(f'{folder} not found: {self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    source = find_source(
      folder, (), _MARKET_STYLE_FOLDERS.values(), self.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
    return source, _list_market_style(source)


class ReidFolderConfig(tfds.core.BuilderConfig):
  """One custom dataset, named after its folder or zip under the manual directory."""


class ReidFolder(ReIDBuilder):
  """Your own data: `<manual_dir>/<name>/` (or `<name>.zip`) read as its spec says.

  `reid_dataset.json` at the dataset's root (`folder_spec`) chooses the layout
  (Market-style names, a folder per identity, list files), the camera rule
  and, for one labelled set, the seeded identity split. How the records were
  made (the spec, whether there are cameras, the test identities of a split)
  is kept with the prepared data as TFDS metadata (`metadata.json`), so that
  a later change of the spec is noticed instead of silently re-splitting.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Put the dataset in <manual_dir>/<name>/ (a folder or <name>.zip; default '
    'data/manual/) with a reid_dataset.json at its root unless it is laid out '
    'like Market-1501; see docs/datasets.md, "Your own data".'
  )

  def _info_extras(self) -> dict:
    return {'metadata': tfds.core.MetadataDict()}

  def _find_records(self, manual_dir: str):
    source = find_custom_source(manual_dir, self.builder_config.name)
    records, about = folder_spec.list_records(source, folder_spec.read_spec(source))
    self.info.metadata.update(about)
    return source, records


def find_custom_source(manual_dir: str, name: str) -> ManualSource:
  """The root of custom dataset `name`: `<manual_dir>/<name>/` or `<name>.zip`.

  A root is recognised by its spec file or, without one, by Market-1501's folders.
  """
  try:
    return find_source(manual_dir, (name,), [folder_spec.SPEC_FILE], '', search_contents=False)
  except DatasetError:
    return find_source(
      manual_dir,
      (name,),
      _MARKET_STYLE_FOLDERS.values(),
      ReidFolder.MANUAL_DOWNLOAD_INSTRUCTIONS,
      search_contents=False,
    )


def raw_synthetic_dir(manual_dir: str, preset: str) -> str:
  """Where the generator writes a preset's Market-layout folders."""
  return os.path.join(manual_dir, 'synthetic_details', preset)


BUILDERS = {
  'market1501': Market1501,
  'dukemtmc_reid': DukemtmcReid,
  'msmt17': Msmt17,
  'occluded_duke': OccludedDuke,
  'synthetic_details': SyntheticDetails,
  'reid_folder': ReidFolder,
}

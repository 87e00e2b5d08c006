"""Custom datasets: the spec file beside the images, and the records each layout yields.

A custom dataset is a folder (or zip) `<manual_dir>/<name>/` prepared as
`reid_folder/<name>`. An optional `reid_dataset.json` at its root says how
to read it; without one it is read as Market-1501. Keys (all optional):

  layout        'names'   each split is one folder of images whose file names
                          carry the identity (and camera): Market-1501, Duke;
                'folders' each split holds one folder per identity
                          (`train/<pid>/*.jpg`);
                'lists'   each split is a list file of `relpath pid [camid]`
                          lines, paths relative to the root (MSMT17, fast-reid).
  splits        {'train', 'query', 'gallery'} -> folder or list file; or
                {'all': ...}: one labelled set, split by identity with a seed.
                Defaults: Market's folders; train/query/gallery;
                train.txt/query.txt/gallery.txt.
  name_pattern  a regular expression searched in each file name, with named
                groups `pid` (layout 'names') and `camid`; default Market's
                '^(?P<pid>-?\\d+)_c(?P<camid>\\d+)'.
  camera        'name' (the pattern's `camid` group; or the list's third
                column), 'subfolder' (layout 'folders': `<pid>/<camera>/*.jpg`)
                or 'none'. Default: 'name' for 'names' and 'lists', and for
                'folders' given a name_pattern with `camid`; else 'none'.
  split_seed, test_ids, query
                for 'all': the seed of the identity split (default 0), the
                test identities as a fraction (default 0.5) or a count, and
                'camera' (one query per identity and camera, Market's rule;
                the default with cameras) or 'identity' (one per identity).

Identities below 0 are junk and dropped (Market's -1). Without cameras,
evaluation follows torchreid's convention: query and gallery are taken to be
different cameras (`query_split.NO_CAMERA_*`), so the same-camera rule is off.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from cace_jax.data import query_split
from cace_jax.data.manual_source import CUSTOM_SPEC, ManualSource
from cace_jax.data.reid_builder import SPLITS, Record
from cace_jax.errors import DatasetError

SPEC_FILE = CUSTOM_SPEC
LAYOUTS = ('names', 'folders', 'lists')
CAMERAS = ('name', 'subfolder', 'none')
MARKET_PATTERN = r'^(?P<pid>-?\d+)_c(?P<camid>\d+)'
DEFAULT_SPLITS = {
  'names': {'train': 'bounding_box_train', 'query': 'query', 'gallery': 'bounding_box_test'},
  'folders': {'train': 'train', 'query': 'query', 'gallery': 'gallery'},
  'lists': {'train': 'train.txt', 'query': 'query.txt', 'gallery': 'gallery.txt'},
}
KEYS = ('layout', 'splits', 'name_pattern', 'camera', 'split_seed', 'test_ids', 'query')


def read_spec(source: ManualSource) -> dict[str, Any]:
  """The root's spec with every default filled in; DatasetError naming a bad key or value."""
  where = source.describe(SPEC_FILE)
  given = {}
  if source.exists(SPEC_FILE):
    try:
      given = json.loads(source.read_text(SPEC_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DatasetError(f'{where}: not valid JSON ({e})') from e
    if not isinstance(given, dict):
      raise DatasetError(f'{where}: expected a JSON object of {", ".join(KEYS)}')
  return normalize_spec(given, where)


def normalize_spec(given: dict, where: str) -> dict[str, Any]:
  """Checks a spec's keys and values and fills in the defaults (see the module docstring)."""
  unknown = sorted(set(given) - set(KEYS))
  if unknown:
    raise DatasetError(f'{where}: unknown key {unknown[0]!r}; expected some of {", ".join(KEYS)}')
  layout = given.get('layout', 'names')
  if layout not in LAYOUTS:
    raise DatasetError(f'{where}: layout={layout!r}; expected one of {", ".join(LAYOUTS)}')
  splits = given.get('splits', DEFAULT_SPLITS[layout])
  if not isinstance(splits, dict) or set(splits) not in ({'all'}, set(SPLITS)):
    raise DatasetError(
      f'{where}: splits={splits!r}; expected {{"train", "query", "gallery"}} or {{"all"}}, '
      'each a folder or list file under the root'
    )
  pattern = given.get('name_pattern', MARKET_PATTERN)
  try:
    groups = re.compile(pattern).groupindex
  except (re.error, TypeError) as e:
    raise DatasetError(f'{where}: name_pattern={pattern!r} is not a regular expression: {e}') from e
  if layout == 'names' and 'pid' not in groups:
    raise DatasetError(f'{where}: name_pattern={pattern!r} needs a named group (?P<pid>...)')
  # Folders of identities rarely carry cameras in their file names: ask for it.
  named = 'camid' in groups and (layout == 'names' or 'name_pattern' in given)
  default_camera = 'name' if named or layout == 'lists' else 'none'
  camera = given.get('camera', default_camera)
  if camera not in CAMERAS or (camera == 'subfolder' and layout != 'folders'):
    raise DatasetError(
      f'{where}: camera={camera!r}; expected one of {", ".join(CAMERAS)} '
      "('subfolder' only with layout 'folders')"
    )
  if camera == 'name' and layout != 'lists' and 'camid' not in groups:
    raise DatasetError(f"{where}: camera='name' needs a group (?P<camid>...) in name_pattern")
  spec = {'layout': layout, 'splits': dict(splits), 'name_pattern': pattern, 'camera': camera}
  if 'all' in splits:
    seed, test_ids = given.get('split_seed', 0), given.get('test_ids', 0.5)
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise DatasetError(f'{where}: split_seed={seed!r}; expected an integer')
    if isinstance(test_ids, bool) or not (
      (isinstance(test_ids, float) and 0 < test_ids < 1)
      or (isinstance(test_ids, int) and test_ids >= 1)
    ):
      raise DatasetError(
        f'{where}: test_ids={test_ids!r}; expected a fraction in (0, 1) or a count >= 1'
      )
    query = given.get('query', 'identity' if camera == 'none' else 'camera')
    if query not in ('camera', 'identity') or (query == 'camera' and camera == 'none'):
      raise DatasetError(
        f"{where}: query={query!r}; expected 'camera' or 'identity' ('identity' without cameras)"
      )
    spec.update(split_seed=seed, test_ids=test_ids, query=query)
  elif {'split_seed', 'test_ids', 'query'} & set(given):
    raise DatasetError(f"{where}: split_seed, test_ids and query apply only to splits {{'all'}}")
  return spec


def list_records(source: ManualSource, spec: dict) -> tuple[dict[str, list[Record]], dict]:
  """Every split's records, and what to record about how they were made.

  Returns:
    ({'train', 'query', 'gallery': [Record]}, {'spec', 'cameras' (bool) and,
    for a split of 'all', 'test_pids'}). Without cameras, records carry the
    no-camera convention's camera ids.
  """
  numbers = number_folders(source, spec) if spec['layout'] == 'folders' else {}
  found = {
    split: read_split(source, spec, where, numbers) for split, where in spec['splits'].items()
  }
  cameras = spec['camera'] != 'none'
  about = {'spec': spec, 'cameras': cameras}
  if 'all' in found:
    found, about['test_pids'] = split_by_identity(found['all'], spec)
  if not cameras:
    camera_of = {'train': 1, 'query': query_split.NO_CAMERA_QUERY}
    camera_of['gallery'] = query_split.NO_CAMERA_GALLERY
    found = {
      split: [Record(r.relpath, r.pid, camera_of[split]) for r in records]
      for split, records in found.items()
    }
  return found, about


def read_split(
  source: ManualSource, spec: dict, where: str, numbers: dict[str, int]
) -> list[Record]:
  """The records of one split's folder or list file; junk identities (< 0) dropped.

  `numbers`: the folder numbers of layout 'folders' (`number_folders`).
  """
  if not source.exists(where):
    raise DatasetError(f"{source.describe(where)} not found: the spec's splits name it")
  if spec['layout'] == 'lists':
    records = read_list(source, spec, where)
  elif spec['layout'] == 'folders':
    records = read_identity_folders(source, spec, where, numbers)
  else:
    pattern = re.compile(spec['name_pattern'])
    records = []
    for relpath in source.list_images(where):
      match = match_name(source, pattern, relpath)
      camid = int(match.group('camid')) if spec['camera'] == 'name' else 0
      records.append(Record(relpath, int(match.group('pid')), camid))
  return [r for r in records if r.pid >= 0]


def match_name(source: ManualSource, pattern: re.Pattern, relpath: str) -> re.Match:
  """The pattern's match in a file name; DatasetError naming the file if none."""
  match = pattern.search(relpath.rsplit('/', 1)[-1])
  if match is None:
    raise DatasetError(
      f'{source.describe(relpath)}: file name does not match name_pattern {pattern.pattern!r}'
    )
  return match


def read_identity_folders(
  source: ManualSource, spec: dict, where: str, numbers: dict[str, int]
) -> list[Record]:
  """`<where>/<identity>/*.jpg`, or `<where>/<identity>/<camera>/*.jpg` with cameras by folder.

  `numbers` maps every identity and camera folder name to its number (`number_folders`).
  """
  pattern = re.compile(spec['name_pattern'])
  records = []
  for folder in source.list_folders(where):
    pid = numbers[folder.rsplit('/', 1)[-1]]
    if spec['camera'] == 'subfolder':
      images = [
        (path, numbers['camera:' + cam.rsplit('/', 1)[-1]])
        for cam in source.list_folders(folder)
        for path in source.list_images(cam)
      ]
    else:
      images = [(path, 0) for path in source.list_images(folder)]
    for path, camid in images:
      if spec['camera'] == 'name':
        camid = int(match_name(source, pattern, path).group('camid'))
      records.append(Record(path, pid, camid))
  return records


def number_folders(source: ManualSource, spec: dict) -> dict[str, int]:
  """Numbers of the identity folders (and camera folders, as 'camera:<name>') of every split.

  Folders named by integers keep them; otherwise names are numbered in their
  sorted order over all splits (identities from 0, cameras from 1), so a
  query and a gallery folder of the same name are the same identity. An
  identity folder named by a negative integer (Market's junk `-1/`) keeps it
  whatever the other names are, so that `read_split` drops it; it takes no
  part in the numbering of the others. Two integer names of one number ('12'
  and '0012') are an error, not one identity.
  """
  identities, cameras = set(), set()
  for where in spec['splits'].values():
    for folder in source.list_folders(where):
      identities.add(folder.rsplit('/', 1)[-1])
      if spec['camera'] == 'subfolder':
        cameras.update(c.rsplit('/', 1)[-1] for c in source.list_folders(folder))
  junk = {name for name in identities if re.fullmatch(r'-\d+', name) and int(name) < 0}
  numbers = {name: int(name) for name in junk}
  for names, prefix, first in ((identities - junk, '', 0), (cameras, 'camera:', 1)):
    numeric = all(re.fullmatch(r'\d+', name) for name in names)
    for index, name in enumerate(sorted(names)):
      numbers[prefix + name] = int(name) if numeric else first + index
  named = {}
  for key, number in sorted(numbers.items()):
    kind = 'camera' if key.startswith('camera:') else 'identity'
    name = key.removeprefix('camera:')
    if (kind, number) in named:
      raise DatasetError(
        f'{source.describe()}: {kind} folders {named[kind, number]!r} and {name!r} are both '
        f'number {number}: rename one (integer names are kept as numbers)'
      )
    named[kind, number] = name
  return numbers


def read_list(source: ManualSource, spec: dict, list_name: str) -> list[Record]:
  """Lines `relpath pid [camid]` (blank lines skipped); cameras from the column or the name."""
  pattern = re.compile(spec['name_pattern'])
  records = []
  for number, line in enumerate(source.read_text(list_name).splitlines(), 1):
    fields = line.split()
    if not fields:
      continue
    try:
      if len(fields) not in (2, 3):
        raise ValueError(f'{len(fields)} fields')
      relpath, pid = fields[0], int(fields[1])
      camid = int(fields[2]) if len(fields) == 3 else None
    except ValueError as e:
      raise DatasetError(
        f'{source.describe(list_name)} line {number}: expected "relpath pid [camid]", '
        f'got {line!r} ({e})'
      ) from e
    if spec['camera'] == 'name':
      if camid is None and 'camid' not in pattern.groupindex:
        raise DatasetError(
          f'{source.describe(list_name)} line {number}: no camera column and no (?P<camid>...) '
          'in name_pattern; set "camera": "none" for a dataset without cameras'
        )
      if camid is None:
        camid = int(match_name(source, pattern, relpath).group('camid'))
    if not source.exists(relpath):
      raise DatasetError(f'{source.describe(list_name)} line {number}: {relpath} not found')
    records.append(Record(relpath, pid, camid or 0))
  return records


def split_by_identity(
  records: list[Record], spec: dict
) -> tuple[dict[str, list[Record]], list[int]]:
  """Splits one labelled set by identity, seeded: train, and query/gallery of the rest.

  A permutation seeded with `split_seed` of the sorted identities puts the
  first `test_ids` (a count, or a fraction rounded) in the test set; of
  those, `query_split.choose_queries` picks the query images and every
  other image is gallery. Returns (splits, the test identities, sorted).
  """
  pids = np.array(sorted({r.pid for r in records}))
  test_ids = spec['test_ids']
  count = test_ids if isinstance(test_ids, int) else int(round(test_ids * len(pids)))
  if not 1 <= count <= len(pids) - 1:
    raise DatasetError(
      f'test_ids={test_ids!r} gives {count} test identities of {len(pids)}: expected '
      f'1..{len(pids) - 1}'
    )
  test = np.sort(np.random.default_rng(spec['split_seed']).permutation(pids)[:count])
  is_test = np.isin([r.pid for r in records], test)
  held = [r for r, t in zip(records, is_test) if t]
  is_query, _ = query_split.choose_queries(
    np.array([r.pid for r in held]),
    np.array([r.camid for r in held]),
    np.array([r.relpath for r in held], dtype=object),
    per_camera=spec['query'] == 'camera',
  )
  splits = {
    'train': [r for r, t in zip(records, is_test) if not t],
    'query': [r for r, q in zip(held, is_query) if q],
    'gallery': [r for r, q in zip(held, is_query) if not q],
  }
  return splits, [int(p) for p in test]

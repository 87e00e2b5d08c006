"""Prepare a dataset as TFDS records (`tools/prepare.py --dataset NAME`; training does it too).

NAME is a builder name, optionally with its config: market1501, dukemtmc_reid,
msmt17, msmt17/trainval, occluded_duke, synthetic_details (= /default),
synthetic_details/occluded, synthetic_details/large_families,
synthetic_details/tiny, reid_folder/<name> (your own data in <manual_dir>/<name>;
`folder_spec`). A dataset that is already
prepared is left as it is; a failed preparation leaves no partial records.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from cace_jax.data import builders, folder_spec
from cace_jax.data.synthetic_details import generator
from cace_jax.errors import DatasetError
from cace_jax.paths import check_directory

DEFAULT_DATA_DIR = 'data'
RENAMED = {
  'msmt17/combineall': (
    "msmt17/combineall is now msmt17/trainval (list_train + list_val); torchreid's and "
    "fast-reid's combineall, which also trains on query and gallery, is not offered"
  ),
}
CUSTOM_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_-]*')


def prepare_dataset(
  name: str, data_dir: str = DEFAULT_DATA_DIR, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
  """Builds (once) and returns the TFDS builder of a dataset.

  Args:
    name: builder name with an optional `/config`, e.g. 'synthetic_details/tiny'.
    data_dir: where TFDS records go (default `data/`).
    manual_dir: where downloads are (default `<data_dir>/manual`). For
      synthetic_details the generator writes there first, if not already done.

  Returns:
    The prepared builder; `builder.as_dataset(split=...)` reads it.

  Raises:
    DatasetError: unknown name, missing or malformed download, corrupt image.
  """
  builder_name, _, config_name = name.partition('/')
  if name in RENAMED:
    raise DatasetError(RENAMED[name])
  if builder_name not in builders.BUILDERS:
    raise DatasetError(f'unknown dataset {name!r}: expected one of {", ".join(builders.BUILDERS)}')
  check_directory(data_dir, 'data_dir')
  manual_dir = manual_dir or os.path.join(data_dir, 'manual')
  check_directory(manual_dir, 'manual_dir')
  if builder_name == 'synthetic_details':
    preset = config_name or 'default'
    if preset not in generator.PRESETS:
      raise DatasetError(
        f'unknown synthetic_details preset {preset!r}: expected one of '
        f'{", ".join(generator.PRESETS)}'
      )
    raw_dir = builders.raw_synthetic_dir(manual_dir, preset)
    try:
      generator.generate_dataset(raw_dir, generator.PRESETS[preset])
    except FileExistsError as e:  # Something else lives there: never overwrite it.
      raise DatasetError(f'cannot generate synthetic_details into {raw_dir}: {e}') from e
  elif builder_name == 'reid_folder':
    return prepare_custom(config_name, data_dir, manual_dir)
  elif not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    instructions = builders.BUILDERS[builder_name].MANUAL_DOWNLOAD_INSTRUCTIONS
    raise DatasetError(f'manual directory {manual_dir} is missing or empty. {instructions}')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f'unknown dataset config {name!r}: {e}') from e
  if not builder.is_prepared():
    build_records(builder, data_dir, manual_dir)
  return builder


def prepare_custom(name: str, data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
  """Builds (once) custom dataset `reid_folder/<name>` from `<manual_dir>/<name>`.

  A prepared dataset whose recorded spec differs from the spec file now
  beside the images is an error, not a silent rebuild: its records (and any
  identity split) are what earlier runs trained and evaluated on.
  """
  if not CUSTOM_NAME.fullmatch(name or ''):
    raise DatasetError(
      f'reid_folder/{name}: expected reid_folder/<name>, <name> the folder or zip under '
      f'{manual_dir} (letters, digits, "_", "-")'
    )
  builder = builders.ReidFolder(config=builders.ReidFolderConfig(name=name), data_dir=data_dir)
  if builder.is_prepared():
    source = builders.find_custom_source(manual_dir, name)
    recorded = dict(builder.info.metadata).get('spec')
    current = folder_spec.read_spec(source)
    if recorded is not None and recorded != current:
      changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
      raise DatasetError(
        f'{builder.data_dir} was prepared with another {folder_spec.SPEC_FILE} '
        f'({", ".join(changed)} differ from {source.describe(folder_spec.SPEC_FILE)}): '
        'move the prepared folder away to prepare it again'
      )
    return builder
  # Found (or named as missing, in one line) before TFDS asserts on an empty manual_dir.
  builders.find_custom_source(manual_dir, name)
  build_records(builder, data_dir, manual_dir)
  return builder


def build_records(builder: tfds.core.DatasetBuilder, data_dir: str, manual_dir: str) -> None:
  """Prepares `builder`'s records; a failure leaves no folder it created behind.

  TFDS creates the dataset's folders (`<data_dir>/<builder>/<config>/`) and
  its download folders before it reads a single image, and on failure
  removes only its unfinished records: the empty folders would be taken for
  a dataset half prepared. Only folders that did not exist before and are
  empty again are removed (a new `data_dir` too), so nothing prepared before
  (or written by anyone else meanwhile) is ever touched.
  """
  # <data_dir>/<builder>[/<config>]/<version> is where the records go.
  parts = os.path.relpath(os.path.dirname(str(builder.data_dir)), data_dir).split(os.sep)
  parts = [] if '..' in parts or parts == ['.'] else parts
  folders = [os.path.join(data_dir, *parts[:n]) for n in range(len(parts), 0, -1)]
  folders += [os.path.join(data_dir, 'downloads', 'extracted'), os.path.join(data_dir, 'downloads')]
  folders.append(data_dir)
  parent = os.path.dirname(os.path.abspath(data_dir))
  while not os.path.lexists(parent):  # a new --data_dir's new parents
    folders.append(parent)
    parent = os.path.dirname(parent)
  created = [f for f in folders if not os.path.lexists(f)]
  tfds.disable_progress_bar()  # One line per split in logs, not a bar per shard.
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except BaseException:
    for folder in created:  # deepest first
      try:
        os.rmdir(folder)  # only ever an empty folder
      except OSError:
        pass  # not empty: something else wrote there, so it is kept
    raise


def dataset_families(name: str, pids: np.ndarray) -> np.ndarray | None:
  """The family of each identity of dataset `name`, or None if it has no families.

  Only synthetic_details has them (its identities come in families that
  differ in details); `generator.identity_families` says which is which.
  """
  builder_name, _, preset = name.partition('/')
  if builder_name != 'synthetic_details':
    return None
  return generator.identity_families(pids, generator.PRESETS[preset or 'default'])

"""Splits in memory: images, identities, cameras and families, and a validation hold-out.

A split is read once from its TFDS records into a `SplitData` (encoded
images and per-image arrays). Training removes identities too small for a
P×K batch, unites several datasets' training splits with disjoint
identities, and may hold whole identities (whole families on the synthetic
data) out as a validation split. Each split carries its identities'
families when the dataset has them, so evaluation never asks which
generator made a dataset. `pipeline` turns splits into tf.data batches.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from cace_jax.data import catalog, query_split
from cace_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SplitData:
  """One split held in memory: encoded JPEGs and their metadata, in file order.

  `families` is the family of each image's identity where the dataset has
  identity families (synthetic_details: identities that differ only in
  details), negative for an identity of none, and None for a dataset without
  them: the evaluation's family diagnostics read it.
  """

  images: np.ndarray  # [N] object (bytes)
  labels: np.ndarray  # [N] int32; -1 outside train
  pids: np.ndarray  # [N] int32
  camids: np.ndarray  # [N] int32
  file_names: np.ndarray  # [N] object (str)
  families: np.ndarray | None = None  # [N] int, or None

  def __len__(self) -> int:
    return len(self.labels)


def dataset_names(dataset: str) -> list[str]:
  """The datasets of `data.dataset`: one name, or several joined by '+' (trained on together)."""
  names = [name.strip() for name in dataset.split('+')]
  if not all(names) or len(set(names)) != len(names):
    raise ConfigError(
      f'data.dataset={dataset!r}: expected a dataset name or distinct names joined by "+" '
      '(e.g. market1501+dukemtmc_reid)'
    )
  return names


def prepare_on_first_process(
  config: ml_collections.ConfigDict, name: str | None = None
) -> tfds.core.DatasetBuilder:
  """The prepared builder of dataset `name` (default `data.dataset`), prepared by process 0 first.

  Preparing writes records; several processes doing it at once would race.
  """
  data = config.data
  name = name or data.dataset
  if '+' in name:
    raise ConfigError(f'{name!r} names several datasets: use prepare_datasets')
  manual_dir = data.manual_dir or None
  if jax.process_index() == 0:
    builder = catalog.prepare_dataset(name, data.data_dir, manual_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset prepared')
  if jax.process_index() != 0:
    builder = catalog.prepare_dataset(name, data.data_dir, manual_dir)
  return builder


def prepare_datasets(config: ml_collections.ConfigDict) -> dict[str, tfds.core.DatasetBuilder]:
  """{name: prepared builder} of every dataset of `data.dataset`, in the order named."""
  return {
    name: prepare_on_first_process(config, name) for name in dataset_names(config.data.dataset)
  }


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> SplitData:
  """Reads a prepared split without decoding images, sorted by file name.

  Encoded images are small (Market-1501's training split is ~80 MB), so holding
  them lets the sampler address any image without a shuffle buffer.
  """
  dataset = builder.as_dataset(
    split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()}
  )
  rows = sorted(tfds.as_numpy(dataset), key=lambda row: row['file_name'])
  return SplitData(
    images=np.array([r['image'] for r in rows], dtype=object),
    labels=np.array([r['label'] for r in rows], dtype=np.int32),
    pids=np.array([r['pid'] for r in rows], dtype=np.int32),
    camids=np.array([r['camid'] for r in rows], dtype=np.int32),
    file_names=np.array([r['file_name'].decode() for r in rows], dtype=object),
  )


def with_families(data: SplitData, dataset: str) -> SplitData:
  """`data` of dataset `dataset` (a name of `data.dataset`) with its identities' families."""
  return dataclasses.replace(data, families=catalog.dataset_families(dataset, data.pids))


@functools.lru_cache(maxsize=2)  # periodic evaluations read the splits once
def _load_eval_splits(data_dir: str, dataset: str) -> tuple[SplitData, SplitData]:
  builder = tfds.builder_from_directory(data_dir)
  return tuple(with_families(load_split(builder, split), dataset) for split in ('query', 'gallery'))


def load_eval_splits(
  builder: tfds.core.DatasetBuilder, dataset: str
) -> tuple[SplitData, SplitData]:
  """(query, gallery) of prepared dataset `dataset` (`builder`), with families, read once."""
  return _load_eval_splits(str(builder.data_dir), dataset)


def has_cameras(builder: tfds.core.DatasetBuilder) -> bool:
  """False for a custom dataset prepared without cameras (`folder_spec`); True otherwise."""
  metadata = getattr(builder.info, 'metadata', None) or {}
  return bool(dict(metadata).get('cameras', True))


def select(data: SplitData, keep: np.ndarray) -> SplitData:
  """The rows of `data` where the boolean mask `keep` is True."""
  return SplitData(
    **{
      f.name: None if getattr(data, f.name) is None else getattr(data, f.name)[keep]
      for f in dataclasses.fields(SplitData)
    }
  )


def hold_out_identities(
  train: SplitData, num_ids: int, seed: int = 0
) -> tuple[SplitData, SplitData, SplitData, np.ndarray]:
  """Carves a validation query/gallery split out of the training identities.

  Chooses, by a permutation seeded with `seed`, whole families when the
  split has them (`SplitData.families`; so no held-out identity has a
  relative in training, as test identities have none) until at least
  `num_ids` identities are out, else `num_ids` identities. Each held-out
  identity gives, per camera, its first image by file name to the query and
  the rest to the gallery (the Market-1501 convention); an identity seen by
  one camera only has no cross-camera match and is dropped from both. A training split without
  cameras (one camera id throughout) gives each identity's first image to
  the query instead, and the query and gallery different camera ids, as the
  custom datasets without cameras do (`folder_spec`).

  Args:
    train: the training split.
    num_ids: identities to hold out (>= 1, leaving at least 2 for training).
    seed: the permutation's seed.

  Returns:
    (train without them, validation query, validation gallery, held-out pids
    sorted). Validation rows keep their pids and families and get label -1,
    as test rows.
  """
  pids = np.unique(train.pids)
  if not 1 <= num_ids <= len(pids) - 2:
    raise ConfigError(
      f'data.validation_ids={num_ids}: expected 1..{len(pids) - 2} '
      f'(the training split has {len(pids)} identities)'
    )
  rng = np.random.default_rng(seed)
  if train.families is None:
    held = rng.permutation(pids)[:num_ids]
  else:
    family_of = dict(zip(train.pids.tolist(), np.asarray(train.families).tolist()))
    groups = {}
    for pid in pids.tolist():
      groups.setdefault(family_of[pid], []).append(pid)
    held = []
    for family in rng.permutation(sorted(groups)).tolist():
      if len(held) >= num_ids:
        break
      held += groups[family]
    held = np.asarray(held)
    if len(pids) - len(held) < 2:
      raise ConfigError(
        f'data.validation_ids={num_ids}: whole families leave fewer than 2 training identities'
      )
  held = np.sort(held)
  out = np.isin(train.pids, held)
  validation = select(train, out)
  validation = dataclasses.replace(validation, labels=np.full(len(validation), -1, np.int32))
  with_cameras = len(np.unique(train.camids)) > 1
  is_query, is_gallery = query_split.choose_queries(
    validation.pids, validation.camids, validation.file_names, per_camera=with_cameras
  )
  query, gallery = select(validation, is_query), select(validation, is_gallery)
  if not with_cameras:  # the no-camera convention: query and gallery are different cameras
    query = dataclasses.replace(
      query, camids=np.full(len(query), query_split.NO_CAMERA_QUERY, np.int32)
    )
    gallery = dataclasses.replace(
      gallery, camids=np.full(len(gallery), query_split.NO_CAMERA_GALLERY, np.int32)
    )
  return select(train, ~out), query, gallery, held


def remove_small_identities(data: SplitData, min_images: int) -> SplitData:
  """The split without identities of fewer than `min_images` images; labels renumbered.

  The official recipe's `least_image_per_class` (4): such identities leave
  training and the class count; the others keep their order, as 0..N'-1.
  """
  classes, counts = np.unique(data.labels, return_counts=True)
  kept = classes[counts >= min_images]
  kept_rows = select(data, np.isin(data.labels, kept))
  return dataclasses.replace(
    kept_rows, labels=np.searchsorted(kept, kept_rows.labels).astype(np.int32)
  )


@dataclasses.dataclass(frozen=True)
class TrainingSplits:
  """The training split and, with `data.validation_ids`, the validation split carved from it."""

  train: SplitData
  validation: tuple[SplitData, SplitData] | None  # (query, gallery)
  validation_pids: np.ndarray  # held-out identities (empty without validation)


def load_training_splits(builders, data_config: ml_collections.ConfigDict) -> TrainingSplits:
  """The prepared training split, less the validation identities and small identities.

  `builders` is one prepared builder or {name: builder} (`prepare_datasets`):
  several datasets train on the union of their training splits
  (`combine_training_splits`), with disjoint identities and labels. The
  validation identities (`data.validation_ids`, whole families on
  synthetic_details) are a fixed function of the datasets and
  `data.validation_seed`: training and every later evaluation of the run
  carve the same ones.
  """
  if not isinstance(builders, dict):
    builders = {data_config.dataset: builders}
  parts = {
    name: with_families(load_split(builder, 'train'), name) for name, builder in builders.items()
  }
  train = combine_training_splits(parts)
  validation, held = None, np.zeros(0, np.int32)
  if data_config.validation_ids:
    train, query, gallery, held = hold_out_identities(
      train, data_config.validation_ids, data_config.validation_seed
    )
    validation = (query, gallery)
  return TrainingSplits(
    remove_small_identities(train, data_config.min_images_per_id), validation, held
  )


def combine_training_splits(parts: dict[str, SplitData]) -> SplitData:
  """One training split from several datasets' splits {name: split}, in the order given.

  Each dataset's identities are shifted past the previous datasets' largest
  identity and its labels past their classes, so no two datasets share an
  identity or a class (fast-reid's multi-dataset convention); file names get
  the dataset's name in front. One dataset is returned as it is.

  The union's families are None when no dataset has any; else identities of
  a dataset without families are each their own family (negative), so
  held-out validation families never mix datasets.
  """
  if len(parts) == 1:
    return next(iter(parts.values()))
  splits, families = [], []
  pid_offset, label_offset = 0, 0
  any_families = any(split.families is not None for split in parts.values())
  for name, split in parts.items():
    pids = split.pids.astype(np.int64) + pid_offset
    if any_families:  # families of different datasets never coincide: negative for the ones without
      families.append(
        -1 - pids if split.families is None else np.asarray(split.families) + pid_offset
      )
    splits.append(
      dataclasses.replace(
        split,
        pids=pids.astype(np.int32),
        labels=(split.labels + label_offset).astype(np.int32),
        file_names=np.array([f'{name}/{f}' for f in split.file_names], dtype=object),
        families=None,
      )
    )
    pid_offset = int(pids.max()) + 1 if len(pids) else pid_offset
    label_offset += int(split.labels.max()) + 1 if len(split.labels) else 0
  arrays = {
    f.name: np.concatenate([getattr(s, f.name) for s in splits])
    for f in dataclasses.fields(SplitData)
    if f.name != 'families'
  }
  return SplitData(**arrays, families=np.concatenate(families) if any_families else None)

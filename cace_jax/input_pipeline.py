"""tf.data input: P×K identity batches for training, ordered padded batches for evaluation.

Each process yields its rows of the flat global batch, device by device:
training batches are [local_devices·P·K, H, W, 3], where the rows of each of
its devices are P whole identities with K images each, so the pair stage and
the batch-hard triplet losses see complete identities on every device
(`sharding.global_batch` makes them one array sharded over `data`).

The batch order is a deterministic function of (seed, epoch), computed
identically by every process of a multi-host run; a process reads only the
device batches of its own devices. Augmentation seeds come from an image's
position in that global stream, so a run resumed at step n sees exactly the
images and augmentations an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cace_jax import augment
from cace_jax.datasets import prepare, query_split
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
    builder = prepare.prepare_dataset(name, data.data_dir, manual_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset prepared')
  if jax.process_index() != 0:
    builder = prepare.prepare_dataset(name, data.data_dir, manual_dir)
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
  return dataclasses.replace(data, families=prepare.dataset_families(dataset, data.pids))


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


SAMPLERS = ('uniform', 'chunk')


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


def uniform_identity_batches(
  labels: np.ndarray, p: int, k: int, seed: int, epoch: int, num_batches: int
) -> np.ndarray:
  """One epoch of P×K batches, as the official sampler's `use_tf_sample` mode draws them.

  Every batch draws P distinct identities uniformly from all of them, so an
  identity's frequency does not depend on its image count. Each identity
  serves K images from a shuffled pool of its images; when fewer than K are
  left, the pool is refilled with a fresh shuffle of all of them (the
  leftovers are dropped, as officially). Pools start full at every epoch.
  An identity with fewer than K images (only when `data.min_images_per_id`
  < K) gets K draws with replacement.

  Returns:
    [num_batches, P·K] int64 indices into `labels`; deterministic in (seed, epoch).
  """
  rng = np.random.default_rng([seed, epoch])
  members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
  if len(members) < p:
    raise ValueError(f'P={p} identities per batch but the split has {len(members)}')

  def refill(images):
    if len(images) < k:
      return list(rng.choice(images, size=k, replace=True))
    return list(rng.permutation(images))

  pools = [refill(images) for images in members]
  batches = np.empty((num_batches, p * k), np.int64)
  for b in range(num_batches):
    row = []
    for identity in rng.choice(len(members), size=p, replace=False):
      if len(pools[identity]) < k:
        pools[identity] = refill(members[identity])
      row.extend(pools[identity].pop() for _ in range(k))
    batches[b] = row
  return batches


def chunk_identity_batches(labels: np.ndarray, p: int, k: int, seed: int, epoch: int) -> np.ndarray:
  """One epoch of P×K batches, as the official sampler's default (chunk) mode draws them.

  Each identity's images are shuffled and cut into chunks of K (identities
  with fewer than K images are drawn with replacement up to K); the last
  incomplete chunk is dropped. Batches take one chunk from each of P
  identities drawn at random among those with chunks left; the epoch ends
  when fewer than P identities have any. Identities thus appear in
  proportion to their image counts.

  Returns:
    [num_batches, P·K] int64 indices into `labels`; deterministic in (seed, epoch).
  """
  rng = np.random.default_rng([seed, epoch])
  chunks = {}
  for label in np.unique(labels):
    indices = np.flatnonzero(labels == label)
    if len(indices) < k:
      indices = rng.choice(indices, size=k, replace=True)
    indices = rng.permutation(indices)
    chunks[int(label)] = [indices[i : i + k] for i in range(0, len(indices) - k + 1, k)]
  if len(chunks) < p:
    raise ValueError(f'P={p} identities per batch but the split has {len(chunks)}')
  available = sorted(chunks)
  batches = []
  while len(available) >= p:
    chosen = rng.choice(len(available), size=p, replace=False)
    picked = [available[i] for i in chosen]
    batches.append(np.concatenate([chunks[label].pop() for label in picked]))
    available = [label for label in available if chunks[label]]
  return np.stack(batches).astype(np.int64)


def steps_per_epoch(
  labels: np.ndarray, p: int, k: int, num_devices: int, sampler: str = 'uniform'
) -> int:
  """Training steps of one epoch.

  'uniform': the official count, length // (P·K) + 1 batches with length =
  Σ max(n_i, K) over identities, per device batch and over all devices.
  'chunk': every identity's K-chunks, P per device batch, over all devices.
  """
  counts = np.unique(labels, return_counts=True)[1]
  if sampler == 'uniform':
    return int(np.sum(np.maximum(counts, k))) // (p * k * num_devices) + 1
  if sampler == 'chunk':
    return max(1, int(np.sum(np.maximum(counts, k) // k)) // (p * num_devices))
  raise ValueError(f'unknown sampler {sampler!r}; expected one of {SAMPLERS}')


def _device_batch_stream(labels, p, k, seed, sampler, num_devices, start: int):
  """(position, device batch) pairs of the endless stream of epochs, from `start`."""
  position, epoch = 0, 0
  num_batches = steps_per_epoch(labels, p, k, num_devices, sampler) * num_devices
  while True:
    if sampler == 'uniform':
      batches = uniform_identity_batches(labels, p, k, seed, epoch, num_batches)
    else:
      batches = chunk_identity_batches(labels, p, k, seed, epoch)
    for batch in batches:
      if position >= start:
        yield position, batch
      position += 1
    epoch += 1


def create_train_dataset(
  data: SplitData,
  recipe,
  *,
  seed: int,
  num_devices: int,
  local_devices: int,
  process_index: int = 0,
  start_step: int = 0,
) -> tf.data.Dataset:
  """Endless training batches for this process, starting at global step `start_step`.

  Args:
    data: the training split.
    recipe: `config.data`: image_size (height, width), p and k (identities
      per device batch, images per identity), sampler ('uniform', the
      official recipe, or 'chunk'; see `steps_per_epoch`), and the
      augmentation's flip, padding, erasing_probability and erasing_fill
      (`augment`).
    seed: the run's seed; fixes batch order and augmentations.
    num_devices: devices over all processes; a global step takes that many
      device batches from the stream.
    local_devices: devices of this process; it reads device batches
      [process_index·local_devices, ...) of each step.
    process_index: this process's rank.
    start_step: the global step to resume from.

  Returns:
    A dataset of dicts with 'image' [local_devices·P·K, H, W, 3] float32,
    'label', 'pid', 'camid' [local_devices·P·K] int32; rows [d·P·K, (d+1)·P·K)
    belong to this process's device d.
  """
  p, k, sampler = recipe.p, recipe.k, recipe.sampler
  batch_size = p * k
  first_device = process_index * local_devices

  def local_indices():
    stream = _device_batch_stream(
      data.labels, p, k, seed, sampler, num_devices, start_step * num_devices
    )
    for position, batch in stream:
      if first_device <= position % num_devices < first_device + local_devices:
        yield batch, np.arange(position * batch_size, (position + 1) * batch_size)

  indices = tf.data.Dataset.from_generator(
    local_indices,
    output_signature=(tf.TensorSpec([batch_size], tf.int64), tf.TensorSpec([batch_size], tf.int64)),
  )
  images = tf.constant(data.images.tolist(), dtype=tf.string)
  labels = tf.constant(data.labels)
  pids = tf.constant(data.pids)
  camids = tf.constant(data.camids)

  def load(index, stream_position):
    image_seed = tf.stack([tf.cast(seed, tf.int64), stream_position])
    image = augment.preprocess_train(
      tf.gather(images, index),
      image_seed,
      tuple(recipe.image_size),
      flip=recipe.flip,
      padding=recipe.padding,
      erasing_probability=recipe.erasing_probability,
      erasing_fill=recipe.erasing_fill,
    )
    return {
      'image': image,
      'label': tf.gather(labels, index),
      'pid': tf.gather(pids, index),
      'camid': tf.gather(camids, index),
    }

  dataset = indices.unbatch().map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size * local_devices)
  return dataset.prefetch(tf.data.AUTOTUNE)


def create_eval_dataset(
  data: SplitData,
  *,
  image_size,
  batch_size: int,
  num_devices: int,
  local_devices: int,
  process_index: int = 0,
) -> tf.data.Dataset:
  """Every image of a split exactly once, in order, in padded per-device batches.

  A global batch holds `batch_size` images per device over all devices; the
  final one is padded with copies of image 0 whose 'mask' is False (never
  dropped). Image i of the split sits at global batch i // (devices·batch),
  row i % (devices·batch), so on device (i // batch) % devices.

  Returns:
    A dataset of dicts with this process's rows: 'image' [local_devices·batch,
    H, W, 3] float32 and 'index' (position in the split, -1 for padding),
    'pid', 'camid' int32, 'mask' bool, each [local_devices·batch].
  """
  global_batch = batch_size * num_devices
  num_batches = -(-len(data) // global_batch)
  index = np.full(num_batches * global_batch, -1, np.int32)
  index[: len(data)] = np.arange(len(data))
  index = index.reshape(num_batches, num_devices, batch_size)
  local = index[:, process_index * local_devices : (process_index + 1) * local_devices]
  images = tf.constant(data.images.tolist(), dtype=tf.string)
  pids = tf.constant(data.pids)
  camids = tf.constant(data.camids)

  def load(i):
    safe = tf.maximum(i, 0)
    return {
      'image': augment.preprocess_eval(tf.gather(images, safe), image_size),
      'index': i,
      'pid': tf.where(i >= 0, tf.gather(pids, safe), -1),
      'camid': tf.where(i >= 0, tf.gather(camids, safe), -1),
      'mask': i >= 0,
    }

  dataset = tf.data.Dataset.from_tensor_slices(local.reshape(-1))
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size * local_devices)
  return dataset.prefetch(tf.data.AUTOTUNE)


def iterate_numpy(dataset: tf.data.Dataset) -> Iterator[dict]:
  """The dataset as dicts of numpy arrays (what the JAX steps consume)."""
  return iter(tfds.as_numpy(dataset))


def eval_batches(data: SplitData, data_config: ml_collections.ConfigDict) -> Iterator[dict]:
  """This process's share of every evaluation batch of a split, as numpy (`create_eval_dataset`).

  What `evaluation.stage1.embed_batches` embeds: every image once, in order,
  at `data_config.image_size`, `data_config.eval_batch_size` per device over
  all devices, the last batch padded.
  """
  dataset = create_eval_dataset(
    data,
    image_size=data_config.image_size,
    batch_size=data_config.eval_batch_size,
    num_devices=jax.device_count(),
    local_devices=jax.local_device_count(),
    process_index=jax.process_index(),
  )
  return iterate_numpy(dataset)

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

from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cace_jax.data import augment
from cace_jax.data.split_data import SplitData

SAMPLERS = ('uniform', 'chunk')


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

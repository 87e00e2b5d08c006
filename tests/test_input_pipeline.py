"""The P×K sampler, the augmentation ops and the train/eval tf.data pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from cace_jax.data import augment, split_data
from cace_jax.data import pipeline as ip
from cace_jax.errors import ConfigError
from configs import default

SIZE = (32, 16)


@pytest.fixture(scope='module')
def train_data(pipeline_builder):
  return split_data.load_split(pipeline_builder, 'train')


def check_identity_batch(labels, p, k):
  values, counts = np.unique(labels, return_counts=True)
  assert len(values) == p and np.all(counts == k), labels


def epoch_batches(sampler, labels, p, k, seed, epoch):
  if sampler == 'uniform':
    num_batches = ip.steps_per_epoch(labels, p, k, 1, 'uniform')
    return ip.uniform_identity_batches(labels, p, k, seed, epoch, num_batches)
  return ip.chunk_identity_batches(labels, p, k, seed, epoch)


@pytest.mark.parametrize('sampler', ip.SAMPLERS)
def test_sampler_batches_are_p_identities_times_k(train_data, sampler):
  for epoch in range(3):
    batches = epoch_batches(sampler, train_data.labels, 3, 2, seed=7, epoch=epoch)
    assert batches.shape[1] == 6 and len(batches) >= 1
    for batch in batches:
      check_identity_batch(train_data.labels[batch], 3, 2)
      # Images of one identity are distinct unless the identity had fewer than K.
      for label in np.unique(train_data.labels[batch]):
        members = batch[train_data.labels[batch] == label]
        if np.sum(train_data.labels == label) >= 2:
          assert len(set(members)) == 2


@pytest.mark.parametrize('sampler', ip.SAMPLERS)
def test_sampler_is_deterministic_and_epochs_differ(train_data, sampler):
  a = epoch_batches(sampler, train_data.labels, 2, 4, seed=3, epoch=0)
  b = epoch_batches(sampler, train_data.labels, 2, 4, seed=3, epoch=0)
  c = epoch_batches(sampler, train_data.labels, 2, 4, seed=3, epoch=1)
  np.testing.assert_array_equal(a, b)
  assert a.shape != c.shape or not np.array_equal(a, c)


SKEWED = np.repeat(np.arange(6), [40, 4, 4, 5, 9, 1]).astype(np.int32)  # 63 images


def test_uniform_sampler_draws_identities_uniformly_and_counts_the_official_epoch():
  p, k = 2, 4
  # Official epoch: length // (P·K) + 1 with length = sum(max(n_i, K)) = 40+4+4+5+9+4.
  assert ip.steps_per_epoch(SKEWED, p, k, 1, 'uniform') == 66 // 8 + 1 == 9
  assert ip.steps_per_epoch(SKEWED, p, k, 2, 'uniform') == 66 // 16 + 1
  drawn = np.concatenate([ip.uniform_identity_batches(SKEWED, p, k, 0, e, 9) for e in range(300)])
  counts = np.bincount(SKEWED[drawn.reshape(-1)], minlength=6) / k  # identity draws
  expected = 300 * 9 * p / 6
  # Each count is binomial(2700 batches, 1/3): a 5-sigma band around uniform.
  sigma = np.sqrt(300 * 9 * (p / 6) * (1 - p / 6))
  assert np.all(np.abs(counts - expected) < 5 * sigma), counts
  # The chunk sampler, by contrast, follows image counts: identity 0 dominates.
  chunked = np.concatenate([ip.chunk_identity_batches(SKEWED, p, k, 0, e) for e in range(50)])
  chunk_counts = np.bincount(SKEWED[chunked.reshape(-1)], minlength=6)
  assert chunk_counts[0] > 2 * chunk_counts[1]


def test_uniform_sampler_pools_serve_every_image_before_repeating():
  labels = np.repeat(np.arange(2), [8, 5]).astype(np.int32)
  batches = ip.uniform_identity_batches(labels, 2, 4, seed=1, epoch=0, num_batches=2)
  first, second = batches[0], batches[1]
  big = lambda batch: set(batch[labels[batch] == 0])
  assert not big(first) & big(second)  # 8 images: the second draw takes the other 4
  small = lambda batch: set(batch[labels[batch] == 1])
  assert len(small(first)) == len(small(second)) == 4  # 5 images: refilled after 4


def test_small_identities_are_removed_and_labels_renumbered(train_data):
  small = train_data.labels[np.flatnonzero(train_data.labels == 3)[0]]  # pid 4: 2 images
  assert np.sum(train_data.labels == small) == 2
  kept = split_data.remove_small_identities(train_data, 3)
  assert small not in train_data.labels[np.isin(train_data.pids, kept.pids)]
  assert set(np.unique(kept.labels)) == set(range(len(np.unique(train_data.labels)) - 1))
  assert 4 not in kept.pids and len(kept) == len(train_data) - 2
  # Order is kept: each identity's new label follows its old one's rank.
  old = {pid: label for pid, label in zip(train_data.pids, train_data.labels)}
  new = {pid: label for pid, label in zip(kept.pids, kept.labels)}
  assert sorted(new, key=new.get) == sorted(new, key=old.get)
  everything = split_data.remove_small_identities(train_data, 1)
  np.testing.assert_array_equal(everything.labels, train_data.labels)


@pytest.mark.parametrize('sampler', ip.SAMPLERS)
def test_identities_below_k_are_drawn_with_replacement(train_data, sampler):
  small = train_data.labels[np.flatnonzero(train_data.labels == 3)[0]]  # 2 images
  batches = epoch_batches(sampler, train_data.labels, 2, 3, seed=0, epoch=0)
  used = [b for b in batches if small in train_data.labels[b]]
  for batch in used:  # K=3 slots from its 2 images
    members = batch[train_data.labels[batch] == small]
    assert len(members) == 3 and len(set(members)) <= 2
  with pytest.raises(ValueError, match='P=9'):
    epoch_batches(sampler, train_data.labels, 9, 2, seed=0, epoch=0)


def test_train_batches_shape_dtype_and_identities(train_data):
  dataset = ip.create_train_dataset(train_data, recipe(), seed=1, num_devices=2, local_devices=2)
  for batch in dataset.take(3).as_numpy_iterator():
    assert batch['image'].shape == (8, *SIZE, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    for device in range(2):  # each device's rows are P whole identities
      check_identity_batch(batch['label'][4 * device : 4 * (device + 1)], 2, 2)
    assert np.abs(batch['image']).max() < 3.0  # ImageNet-normalised


def recipe(sampler: str = 'uniform'):
  """The default recipe's `config.data` at the tests' size, P = K = 2."""
  data = default.get_config().data
  data.update(image_size=SIZE, p=2, k=2, sampler=sampler)
  return data


def take_numpy(dataset, n):
  return list(dataset.take(n).as_numpy_iterator())


def test_processes_read_disjoint_shares_of_the_same_stream(train_data):
  kwargs = dict(seed=5, num_devices=4)
  whole = take_numpy(ip.create_train_dataset(train_data, recipe(), local_devices=4, **kwargs), 3)
  parts = [
    take_numpy(
      ip.create_train_dataset(train_data, recipe(), local_devices=2, process_index=i, **kwargs), 3
    )
    for i in (0, 1)
  ]
  for step in range(3):
    for key in ('image', 'label'):
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, whole[step][key])


@pytest.mark.parametrize('sampler', ip.SAMPLERS)
def test_resume_replays_the_same_batches(train_data, sampler):
  kwargs = dict(seed=11, num_devices=2, local_devices=2)
  steps = ip.steps_per_epoch(train_data.labels, 2, 2, num_devices=2, sampler=sampler)
  total = steps + 3  # crosses an epoch boundary
  uninterrupted = take_numpy(ip.create_train_dataset(train_data, recipe(sampler), **kwargs), total)
  resumed = take_numpy(
    ip.create_train_dataset(train_data, recipe(sampler), start_step=steps - 1, **kwargs), 4
  )
  for a, b in zip(uninterrupted[steps - 1 :], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def image_and_seed():
  rng = np.random.default_rng(0)
  image = tf.constant(rng.uniform(0, 255, size=(24, 12, 3)).astype(np.float32))
  return image, tf.constant([4, 2], tf.int64)


@pytest.mark.parametrize(
  'op',
  [
    lambda x, s: augment.random_flip(x, s),
    lambda x, s: augment.pad_and_random_crop(x, s, 4),
    lambda x, s: augment.random_erasing(x, s, probability=1.0),
  ],
)
def test_ops_equal_eagerly_and_inside_tf_data(op):
  image, seed = image_and_seed()
  for offset in range(4):
    seed_i = seed + offset
    eager = op(image, seed_i).numpy()
    graph = next(iter(tf.data.Dataset.from_tensors((image, seed_i)).map(op))).numpy()
    np.testing.assert_array_equal(eager, graph)


def test_full_train_preprocessing_equal_eagerly_and_in_tf_data(train_data):
  seed = tf.constant([1, 9], tf.int64)
  fn = lambda b, s: augment.preprocess_train(b, s, SIZE)
  eager = fn(tf.constant(train_data.images[0]), seed).numpy()
  graph = next(
    iter(tf.data.Dataset.from_tensors((tf.constant(train_data.images[0]), seed)).map(fn))
  ).numpy()
  np.testing.assert_array_equal(eager, graph)


def test_random_erasing_fills_one_box():
  image, seed = image_and_seed()
  untouched = augment.random_erasing(image, seed, probability=0.0).numpy()
  np.testing.assert_array_equal(untouched, image.numpy())
  fill = np.array([-1.0, 2.0, 300.0], np.float32)  # no pixel of `image` has these values
  fractions = []
  for i in range(20):
    out = augment.random_erasing(image, seed + i, probability=1.0, fill=fill).numpy()
    erased = np.all(out == fill, axis=-1)
    rows, cols = np.nonzero(erased)
    assert rows.size > 0
    # One axis-aligned rectangle.
    assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    fractions.append(erased.mean())
  assert 0.01 < min(fractions) and max(fractions) < 0.5


def official_erasing_box(rng, height, width):
  """(h, w) of one official RandomErasing draw (utils/my_transforms.py), or None."""
  for _ in range(100):
    target_area = rng.uniform(0.02, 0.4) * height * width
    aspect = rng.uniform(0.3, 1 / 0.3)
    h, w = int(round(np.sqrt(target_area * aspect))), int(round(np.sqrt(target_area / aspect)))
    if w < width and h < height:
      return h, w
  return None


def test_random_erasing_boxes_are_distributed_as_the_official_ones():
  height, width, draws = 64, 32, 1500
  image = tf.zeros((height, width, 3))
  ours = []
  for i in range(draws):
    erased = augment.random_erasing(image, tf.constant([7, i], tf.int64), 1.0, fill=(1, 1, 1))
    rows, cols = np.nonzero(erased.numpy()[..., 0])
    ours.append((rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))
  rng = np.random.default_rng(0)
  official = [official_erasing_box(rng, height, width) for _ in range(20000)]
  ours, official = np.array(ours), np.array([b for b in official if b is not None])
  tall = lambda boxes: np.mean(boxes[:, 0] > boxes[:, 1])
  area = lambda boxes: np.mean(boxes[:, 0] * boxes[:, 1]) / (height * width)
  # A log-uniform aspect would give about half tall boxes before the fit test;
  # the uniform one gives most. Tolerances: 4 standard errors of 1,500 draws.
  assert abs(tall(ours) - tall(official)) < 4 * np.sqrt(0.25 / draws), (tall(ours), tall(official))
  assert abs(area(ours) - area(official)) < 0.02, (area(ours), area(official))


def test_train_preprocessing_erases_after_normalisation_with_the_official_value(train_data):
  seed = tf.constant([3, 5], tf.int64)
  out = augment.preprocess_train(
    tf.constant(train_data.images[0]), seed, SIZE, erasing_probability=1.0
  ).numpy()
  value = np.array(augment.IMAGENET_MEAN, np.float32)  # written into the normalised image
  assert np.all(out == value, axis=-1).sum() > 0.02 * SIZE[0] * SIZE[1] * 0.5
  mean_fill = augment.preprocess_train(
    tf.constant(train_data.images[0]), seed, SIZE, erasing_probability=1.0, erasing_fill='mean'
  ).numpy()
  np.testing.assert_array_equal(np.all(mean_fill == 0.0, axis=-1), np.all(out == value, axis=-1))


def test_flip_and_crop_actually_change_images():
  image, seed = image_and_seed()
  flips = [
    np.array_equal(augment.random_flip(image, seed + i).numpy(), image.numpy()[:, ::-1])
    for i in range(20)
  ]
  assert 0 < sum(flips) < 20
  crops = {augment.pad_and_random_crop(image, seed + i, 4).numpy().tobytes() for i in range(10)}
  assert len(crops) > 1


@pytest.mark.parametrize('local_devices,batch', [(1, 4), (3, 2)])
def test_eval_yields_every_image_once_in_order(pipeline_builder, local_devices, batch):
  gallery = split_data.load_split(pipeline_builder, 'gallery')
  seen = []
  for step in ip.create_eval_dataset(
    gallery,
    image_size=SIZE,
    batch_size=batch,
    num_devices=local_devices,
    local_devices=local_devices,
  ).as_numpy_iterator():
    assert step['image'].shape == (local_devices * batch, *SIZE, 3)
    flat_index = step['index'].reshape(-1)
    np.testing.assert_array_equal(step['mask'].reshape(-1), flat_index >= 0)
    valid = flat_index[flat_index >= 0]
    np.testing.assert_array_equal(step['pid'].reshape(-1)[flat_index >= 0], gallery.pids[valid])
    seen.extend(valid.tolist())
  assert seen == list(range(len(gallery)))


def test_eval_shards_across_processes(pipeline_builder):
  query = split_data.load_split(pipeline_builder, 'query')
  kwargs = dict(image_size=SIZE, batch_size=1, num_devices=4)
  indices = [
    np.concatenate(
      [
        b['index']
        for b in ip.create_eval_dataset(
          query, local_devices=2, process_index=i, **kwargs
        ).as_numpy_iterator()
      ]
    )
    for i in (0, 1)
  ]
  joined = np.concatenate([indices[0].reshape(-1, 2), indices[1].reshape(-1, 2)], axis=1)
  valid = joined.reshape(-1)
  assert valid[valid >= 0].tolist() == list(range(len(query)))


def test_jpeg_decoding_equals_pil():
  """The official loader decodes with PIL; ours gives the same pixels before resizing."""
  import io  # pylint: disable=import-outside-toplevel

  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  pixels = np.clip(rng.normal(128, 60, size=(128, 64, 3)), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
  reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'), np.float32)
  ours = augment.decode_and_resize(tf.constant(buffer.getvalue()), (128, 64)).numpy()
  np.testing.assert_array_equal(ours, reference)  # same size: the resize is the identity
  fast = tf.io.decode_jpeg(buffer.getvalue(), channels=3).numpy().astype(np.float32)
  assert np.abs(fast - reference).max() >= 1  # the default IDCT would not match


def labelled_split(num_ids=12, images_per_id=6, cameras_per_id=3, families=False):
  """A hand-made training split: identity pid has its images spread over cameras.

  With `families`, identities 3f+1..3f+3 are family f.
  """
  pids = np.repeat(np.arange(1, num_ids + 1), images_per_id).astype(np.int32)
  image = np.tile(np.arange(images_per_id), num_ids)
  camids = (image % cameras_per_id + pids) % 6
  camids = np.where(pids == num_ids, 0, camids).astype(np.int32)  # the last one: one camera
  names = np.array([f'{p:04d}_c{c}_{i:02d}.jpg' for p, c, i in zip(pids, camids, image)], object)
  return split_data.SplitData(
    images=np.array([b''] * len(pids), dtype=object),
    labels=(pids - 1).astype(np.int32),
    pids=pids,
    camids=camids,
    file_names=names,
    families=(pids - 1) // 3 if families else None,
  )


def test_validation_holds_out_whole_families_and_splits_them_market_style():
  data = labelled_split(families=True)  # 4 families of 3
  train, query, gallery, held = split_data.hold_out_identities(data, 4, seed=0)
  # 4 identities asked: two whole families (6 identities) leave training.
  assert len(held) == 6
  held_families = set(((held - 1) // 3).tolist())
  assert len(held_families) == 2 and set(held.tolist()) == {
    pid for pid in range(1, 13) if (pid - 1) // 3 in held_families
  }
  assert not set(train.pids.tolist()) & set(held.tolist())
  assert len(train) + len(np.flatnonzero(np.isin(data.pids, held))) == len(data)
  # Query: each identity's first image per camera; gallery: the rest; labels -1.
  pairs = list(zip(query.pids.tolist(), query.camids.tolist()))
  assert len(pairs) == len(set(pairs))
  for pid, cam in pairs:
    rows = sorted(
      n for n, p, c in zip(data.file_names, data.pids, data.camids) if (p, c) == (pid, cam)
    )
    assert rows[0] in set(query.file_names)
  assert np.all(query.labels == -1) and np.all(gallery.labels == -1)
  assert not set(query.file_names) & set(gallery.file_names)
  # An identity seen by one camera has no cross-camera match: it is in neither.
  kept = set(query.pids.tolist()) | set(gallery.pids.tolist())
  assert kept == set(held.tolist()) - {12}
  # The families travel with the rows.
  for split in (train, query, gallery):
    np.testing.assert_array_equal(split.families, (split.pids - 1) // 3)
  # The same seed carves the same split; another seed, another one.
  assert np.array_equal(split_data.hold_out_identities(data, 4, seed=0)[3], held)
  others = {tuple(split_data.hold_out_identities(data, 4, seed=s)[3]) for s in range(1, 6)}
  assert others - {tuple(held)}


def test_validation_without_families_holds_out_exactly_that_many_identities():
  data = labelled_split()
  train, _, _, held = split_data.hold_out_identities(data, 5, seed=3)
  assert len(held) == 5 and len(np.unique(train.pids)) == 7 and train.families is None
  with pytest.raises(ConfigError, match=r'data.validation_ids=11: expected 1..10'):
    split_data.hold_out_identities(data, 11)

"""Image operations of the ReID recipe, as pure TensorFlow functions.

Every random op takes an explicit stateless seed (`[2] int32`), so the same
image, seed and arguments give the same output eagerly and inside tf.data,
whatever the parallelism, and a resumed run replays exactly the same
augmentations. Images are float32 in [0, 255] until `normalize`.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN_PIXEL = tuple(255.0 * m for m in IMAGENET_MEAN)
IMAGENET_STD_PIXEL = tuple(255.0 * s for s in IMAGENET_STD)
# What random erasing writes into the normalised image. The official transform
# erases after Normalize with mean=(0.485, 0.456, 0.406): those numbers land in
# normalised space (a light grey), not the ImageNet mean pixel ('mean' = zeros).
ERASING_FILLS = {'official': IMAGENET_MEAN, 'mean': (0.0, 0.0, 0.0)}


def decode_and_resize(image_bytes: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
  """JPEG bytes -> float32 [H, W, 3] in [0, 255], bilinearly resized to `size`.

  Decoding uses libjpeg's accurate integer IDCT, the one PIL (the official
  loader) uses; TF's default fast IDCT is about 1 grey level off on average.
  """
  image = tf.io.decode_jpeg(image_bytes, channels=3, dct_method='INTEGER_ACCURATE')
  image = tf.image.resize(tf.cast(image, tf.float32), size, method='bilinear', antialias=True)
  return tf.clip_by_value(image, 0.0, 255.0)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right with probability 0.5."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def pad_and_random_crop(image: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
  """Zero-pads `padding` pixels on every side, then crops back to the input size."""
  if padding <= 0:
    return image
  height, width, channels = image.shape
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(padded, [height, width, channels], seed)


def random_erasing(
  image: tf.Tensor,
  seed: tf.Tensor,
  probability: float = 0.5,
  area_range: Sequence[float] = (0.02, 0.4),
  min_aspect: float = 0.3,
  fill: Sequence[float] = ERASING_FILLS['official'],
  attempts: int = 100,
) -> tf.Tensor:
  """Random erasing (Zhong et al. 2020) as the official transform: with `probability`, one box.

  Each attempt draws the box's share of the image uniformly from
  `area_range` and its height/width ratio uniformly from [min_aspect,
  1/min_aspect] (uniform, not log-uniform: about 77% of the draws are tall
  boxes), and keeps the first box that fits strictly inside, at a uniformly
  drawn corner; with none of `attempts` fitting, the image is unchanged. All
  attempts are drawn at once, which keeps the op branch-free. The box is set
  to `fill` (per channel, in the units of `image`).
  """
  height, width = image.shape[0], image.shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 5)
  apply = tf.random.stateless_uniform([], seeds[0]) < probability
  area = float(height * width) * tf.random.stateless_uniform(
    [attempts], seeds[1], area_range[0], area_range[1]
  )
  aspect = tf.random.stateless_uniform([attempts], seeds[2], min_aspect, 1.0 / min_aspect)
  box_h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (box_h < height) & (box_w < width) & (box_h > 0) & (box_w > 0)
  first = tf.argmax(tf.cast(fits, tf.int32))
  box_h, box_w = box_h[first], box_w[first]
  offsets = tf.random.stateless_uniform([2], seeds[3])
  top = tf.cast(offsets[0] * tf.cast(height - box_h + 1, tf.float32), tf.int32)
  left = tf.cast(offsets[1] * tf.cast(width - box_w + 1, tf.float32), tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  erase = inside & apply & tf.reduce_any(fits)
  fill = tf.constant(fill, tf.float32)[None, None, :]
  return tf.where(erase[:, :, None], fill, image)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] -> ImageNet-normalised float32."""
  mean = tf.constant(IMAGENET_MEAN_PIXEL, tf.float32)
  std = tf.constant(IMAGENET_STD_PIXEL, tf.float32)
  return (image - mean) / std


def preprocess_train(
  image_bytes: tf.Tensor,
  seed: tf.Tensor,
  size: Sequence[int],
  flip: bool = True,
  padding: int = 10,
  erasing_probability: float = 0.5,
  erasing_fill: str = 'official',
) -> tf.Tensor:
  """The official training transform: resize, flip, pad + crop, normalise, erase.

  Erasing comes after normalisation, as officially; `erasing_fill` names the
  value written (`ERASING_FILLS`).
  """
  flip_seed, crop_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  image = decode_and_resize(image_bytes, size)
  if flip:
    image = random_flip(image, flip_seed)
  image = normalize(pad_and_random_crop(image, crop_seed, padding))
  if erasing_probability > 0:
    image = random_erasing(image, erase_seed, erasing_probability, fill=ERASING_FILLS[erasing_fill])
  return image


def preprocess_eval(image_bytes: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
  """Evaluation: resize and normalise only."""
  return normalize(decode_and_resize(image_bytes, size))

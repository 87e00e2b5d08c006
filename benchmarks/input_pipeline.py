"""Throughput of the tf.data pipelines (images/s), printed and saved as JSON.

  python benchmarks/input_pipeline.py                      # synthetic_details, 384x128
  python benchmarks/input_pipeline.py --dataset market1501 --steps 200

Measures the training pipeline (decode, resize, flip, pad+crop, random
erasing, normalise, P×K sampling) and the evaluation pipeline after a
warm-up, on whatever cores the machine has. Results go to
benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import os
import platform
import sys
import time

from absl import flags
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.data import (
  catalog,  # pylint: disable=wrong-import-position
  split_data,
)
from cace_jax.data import pipeline as ip  # pylint: disable=wrong-import-position
from configs import default  # pylint: disable=wrong-import-position


def time_batches(dataset: tf.data.Dataset, steps: int, warmup: int) -> float:
  """Seconds for `steps` batches after `warmup` batches."""
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return time.perf_counter() - start


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'dataset', 'synthetic_details', 'TFDS name, optionally with /config.', flag_values=flag_values
  )
  flags.DEFINE_string('data_dir', 'data', 'TFDS data_dir.', flag_values=flag_values)
  flags.DEFINE_integer('height', 384, 'Image height.', flag_values=flag_values)
  flags.DEFINE_integer('width', 128, 'Image width.', flag_values=flag_values)
  flags.DEFINE_integer('p', 4, 'Identities per device batch.', flag_values=flag_values)
  flags.DEFINE_integer('k', 4, 'Images per identity.', flag_values=flag_values)
  flags.DEFINE_integer('devices', 1, 'device batches per step', flag_values=flag_values)
  flags.DEFINE_integer('steps', 100, 'Timed steps.', flag_values=flag_values)
  flags.DEFINE_integer('warmup', 10, 'Untimed steps first (compilation).', flag_values=flag_values)
  flags.DEFINE_string(
    'out', 'benchmarks/results/input_pipeline.json', 'JSON report.', flag_values=flag_values
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])

  builder = catalog.prepare_dataset(args.dataset, args.data_dir)
  size = (args.height, args.width)
  train = split_data.load_split(builder, 'train')
  recipe = default.get_config().data
  recipe.update(image_size=size, p=args.p, k=args.k)
  train_ds = ip.create_train_dataset(
    train, recipe, seed=0, num_devices=args.devices, local_devices=args.devices
  )
  train_images = args.steps * args.devices * args.p * args.k
  train_seconds = time_batches(train_ds, args.steps, args.warmup)

  gallery = split_data.load_split(builder, 'gallery')
  eval_batch = args.p * args.k * 4
  eval_ds = ip.create_eval_dataset(
    gallery,
    image_size=size,
    batch_size=eval_batch,
    num_devices=args.devices,
    local_devices=args.devices,
  )
  eval_steps = max(1, min(args.steps, len(gallery) // (eval_batch * args.devices) - 2))
  eval_seconds = time_batches(eval_ds, eval_steps, 2)
  eval_images = eval_steps * eval_batch * args.devices

  result = {
    'dataset': builder.info.full_name,
    'image_size': list(size),
    'p': args.p,
    'k': args.k,
    'devices': args.devices,
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'tensorflow': tf.__version__,
    'train_images_per_s': train_images / train_seconds,
    'eval_images_per_s': eval_images / eval_seconds,
    'train_images_timed': train_images,
    'eval_images_timed': eval_images,
  }
  print(f'{result["dataset"]} at {size[0]}x{size[1]} on {os.cpu_count()} cores:')
  print(f'  train pipeline: {result["train_images_per_s"]:8.1f} images/s ({train_images} images)')
  print(f'  eval pipeline:  {result["eval_images_per_s"]:8.1f} images/s ({eval_images} images)')
  save_report(result, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

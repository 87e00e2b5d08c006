"""Throughput of the tf.data pipelines (images/s), printed and saved as JSON.

  python benchmarks/input_pipeline.py                      # synthetic_details, 384x128
  python benchmarks/input_pipeline.py --dataset market1501 --steps 200

Measures the training pipeline (decode, resize, flip, pad+crop, random
erasing, normalise, P×K sampling) and the evaluation pipeline after a
warm-up, on whatever cores the machine has. Results go to
benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import input_pipeline as ip  # pylint: disable=wrong-import-position
from cace_jax.datasets import prepare  # pylint: disable=wrong-import-position


def time_batches(dataset: tf.data.Dataset, steps: int, warmup: int) -> float:
  """Seconds for `steps` batches after `warmup` batches."""
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', default='synthetic_details')
  parser.add_argument('--data_dir', default='data')
  parser.add_argument('--height', type=int, default=384)
  parser.add_argument('--width', type=int, default=128)
  parser.add_argument('--p', type=int, default=4)
  parser.add_argument('--k', type=int, default=4)
  parser.add_argument('--devices', type=int, default=1, help='device batches per step')
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--warmup', type=int, default=10)
  parser.add_argument('--out', default='benchmarks/results/input_pipeline.json')
  args = parser.parse_args()

  builder = prepare.prepare_dataset(args.dataset, args.data_dir)
  size = (args.height, args.width)
  train = ip.load_split(builder, 'train')
  train_ds = ip.create_train_dataset(train, image_size=size, p=args.p, k=args.k, seed=0,
                                     num_devices=args.devices, local_devices=args.devices)
  train_images = args.steps * args.devices * args.p * args.k
  train_seconds = time_batches(train_ds, args.steps, args.warmup)

  gallery = ip.load_split(builder, 'gallery')
  eval_batch = args.p * args.k * 4
  eval_ds = ip.create_eval_dataset(gallery, image_size=size, batch_size=eval_batch,
                                   num_devices=args.devices, local_devices=args.devices)
  eval_steps = max(1, min(args.steps, len(gallery) // (eval_batch * args.devices) - 2))
  eval_seconds = time_batches(eval_ds, eval_steps, 2)
  eval_images = eval_steps * eval_batch * args.devices

  result = {
      'dataset': builder.info.full_name, 'image_size': list(size), 'p': args.p, 'k': args.k,
      'devices': args.devices, 'cpu_count': os.cpu_count(), 'machine': platform.machine(),
      'tensorflow': tf.__version__,
      'train_images_per_s': train_images / train_seconds,
      'eval_images_per_s': eval_images / eval_seconds,
      'train_images_timed': train_images, 'eval_images_timed': eval_images,
  }
  print(f'{result["dataset"]} at {size[0]}x{size[1]} on {os.cpu_count()} cores:')
  print(f'  train pipeline: {result["train_images_per_s"]:8.1f} images/s '
        f'({train_images} images)')
  print(f'  eval pipeline:  {result["eval_images_per_s"]:8.1f} images/s '
        f'({eval_images} images)')
  save_report(result, args.out)


if __name__ == '__main__':
  main()

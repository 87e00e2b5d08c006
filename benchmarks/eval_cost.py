"""Cost of the two-stage inference at Market-1501 size, printed and saved as JSON.

  python benchmarks/eval_cost.py                   # ResNet-50 at 384×128, avg and GeM

Measures, on this machine: stage-1 extraction time per image (backbone +
embedding + the stage-2 cache), stage-2 time per query for K = 10, 50, 100
(pairs scored from caches), the stage-2 / stage-1 ratio for a Market-sized
split (3,368 queries, 15,913 gallery images), the metric time at that size
(random distances), and the cache's bytes per gallery image (as computed on
the device, and as stored between the stages). Network weights
are random: costs do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cace_jax import eval_lib, metrics, pair_scoring, train_lib  # pylint: disable=wrong-import-position
from configs import market  # pylint: disable=wrong-import-position

NUM_QUERY, NUM_GALLERY = 3368, 15913


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_pooling(pooling: str, batch: int, repeats: int, ks) -> dict:
  """Stage-1 and stage-2 costs for one pooling choice of the market config."""
  config = market.get_config()
  config.model.pooling = pooling
  model = train_lib.create_model(config, num_classes=751)
  images = np.random.default_rng(0).normal(size=(batch, *config.data.image_size, 3)).astype(
      np.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), images[:2], train=False))()
  extract = jax.jit(lambda v, x: model.apply(v, x, True, method=eval_lib.individual_features))
  jax.block_until_ready(extract(variables, images))
  stage1 = median_time(lambda: extract(variables, images), repeats) / batch
  _, cache = extract(variables, images)
  cache = jax.device_get(cache)
  result = {'stage1_s_per_image': stage1,
            'cache_bytes_per_image': pair_scoring.cache_nbytes(cache, batch),
            'stored_cache_bytes_per_image': pair_scoring.cache_nbytes(
                pair_scoring.compact_cache(cache, jax.numpy.bfloat16), batch),
            'stage2_s_per_query': {}, 'stage2_over_stage1_market': {}}
  step = pair_scoring.make_pair_step(model, pair_scoring.conditional_distance)
  for k in ks:
    index = np.arange(k) % batch  # K pairs (query, gallery) drawn from the cached images
    pairs_q = jax.tree.map(lambda c: c[np.zeros(k, int)], cache)
    pairs_g = jax.tree.map(lambda c: c[index], cache)
    jax.block_until_ready(step(variables, pairs_q, pairs_g))
    per_query = median_time(lambda: step(variables, pairs_q, pairs_g), repeats)
    result['stage2_s_per_query'][k] = per_query
    result['stage2_over_stage1_market'][k] = (NUM_QUERY * per_query) / (
        (NUM_QUERY + NUM_GALLERY) * stage1)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--poolings', default='avg,gem')
  parser.add_argument('--out', default='benchmarks/results/eval_cost.json')
  args = parser.parse_args()
  ks = (10, 50, 100)

  rng = np.random.default_rng(0)
  distmat = rng.uniform(size=(NUM_QUERY, NUM_GALLERY)).astype(np.float32)
  start = time.perf_counter()
  metrics.evaluate_rank(distmat, rng.integers(0, 750, NUM_QUERY), rng.integers(0, 751, NUM_GALLERY),
                        rng.integers(1, 7, NUM_QUERY), rng.integers(1, 7, NUM_GALLERY))
  metric_seconds = time.perf_counter() - start

  report = {'image_size': list(market.get_config().data.image_size), 'ks': list(ks),
            'metric_s_market': metric_seconds, 'cpu_count': os.cpu_count(),
            'machine': platform.machine(), 'jax': jax.__version__,
            'load_average': os.getloadavg()[0], 'poolings': {}}
  for pooling in args.poolings.split(','):
    report['poolings'][pooling] = measure_pooling(pooling, args.batch, args.repeats, ks)

  print(f'metric (evaluate_rank) at {NUM_QUERY}×{NUM_GALLERY}: {metric_seconds:.2f} s')
  for pooling, r in report['poolings'].items():
    print(f'[{pooling}] stage 1: {r["stage1_s_per_image"] * 1e3:.0f} ms/image; cache '
          f'{r["cache_bytes_per_image"] / 1024:.0f} KiB/image on the device (float32), '
          f'{r["stored_cache_bytes_per_image"] / 1024:.0f} KiB/image stored (bfloat16)')
    for k in ks:
      print(f'[{pooling}]   K={k:3d}: stage 2 {r["stage2_s_per_query"][k] * 1e3:8.1f} ms/query, '
            f'stage2/stage1 on Market {r["stage2_over_stage1_market"][k]:.3f}')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'saved {args.out}')


if __name__ == '__main__':
  main()

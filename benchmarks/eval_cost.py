"""Cost of the two-stage inference at Market-1501 size, printed and saved as JSON.

  python benchmarks/eval_cost.py                   # ResNet-50 at 384×128, avg and GeM

Measures, on this machine: stage-1 extraction time per image (backbone +
embedding + the stage-2 cache), stage-2 time per query for K = 10, 50, 100
(pairs scored from caches), the stage-2 / stage-1 ratio for a Market-sized
split (3,368 queries, 15,913 gallery images), the metric time at that size
(random distances), and the cache's bytes per gallery image (as computed on
the device, and as stored between the stages). Network weights
are random: costs do not depend on them.

Streaming (`eval.cache_memory_gb`): the host time per query to gather its K
gallery cache rows from memory and from memory-mapped bfloat16 files read
cold (file pages evicted with posix_fadvise first), and the stored cache size
of MSMT17 (11,659 + 82,161 images) it is there for.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import median_seconds, save_report  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.evaluation import metrics, stage1, stage2  # pylint: disable=wrong-import-position
from cace_jax.models import build_model  # pylint: disable=wrong-import-position
from configs import market  # pylint: disable=wrong-import-position

NUM_QUERY, NUM_GALLERY = 3368, 15913
MSMT17_IMAGES = 11659 + 82161


def measure_pooling(pooling: str, batch: int, repeats: int, ks) -> tuple[dict, dict]:
  """Stage-1 and stage-2 costs for one pooling choice of the market config.

  Returns:
    (the figures, the `batch` images' caches in their stored bfloat16 form).
  """
  config = market.get_config()
  config.model.pooling = pooling
  model = build_model(config.model, num_classes=751)
  images = (
    np.random.default_rng(0).normal(size=(batch, *config.data.image_size, 3)).astype(np.float32)
  )
  variables = jax.jit(lambda: model.init(jax.random.key(0), images[:2], train=False))()
  extract = jax.jit(lambda v, x: model.apply(v, x, False, True, method=stage1.embed_and_cache))
  stage1 = median_seconds(lambda: extract(variables, images), repeats) / batch
  cache = jax.device_get(extract(variables, images)[1])
  on_device = stage2.compact_cache(cache)  # float32 without a repeated query, as evaluated
  stored = stage2.compact_cache(cache, jax.numpy.bfloat16)
  stored_bytes = stage2.cache_nbytes(stored, batch)
  result = {
    'stage1_s_per_image': stage1,
    'cache_bytes_per_image': stage2.cache_nbytes(on_device, batch),
    'stored_cache_bytes_per_image': stored_bytes,
    'stored_cache_gb_msmt17': stored_bytes * MSMT17_IMAGES / 2**30,
    'stage2_s_per_query': {},
    'stage2_over_stage1_market': {},
  }
  step = stage2.make_pair_step(model, stage2.conditional_distance)
  for k in ks:
    index = np.arange(k) % batch  # K pairs (query, gallery) drawn from the cached images
    pairs_q = jax.tree.map(lambda c: c[np.zeros(k, int)], cache)
    pairs_g = jax.tree.map(lambda c: c[index], cache)
    per_query = median_seconds(lambda: step(variables, pairs_q, pairs_g), repeats)
    result['stage2_s_per_query'][k] = per_query
    result['stage2_over_stage1_market'][k] = (NUM_QUERY * per_query) / (
      (NUM_QUERY + NUM_GALLERY) * stage1
    )
  return result, stored


def measure_streaming(stored: dict, ks, num_images: int, queries: int = 50) -> dict:
  """Seconds per query to gather K gallery rows: in-memory arrays vs cold memory-mapped files.

  `stored` holds a few images' caches as kept between the stages; they are
  repeated to `num_images` rows.
  """
  shapes = {name: value.shape[1:] for name, value in stored.items()}
  dtype = next(iter(stored.values())).dtype
  rng = np.random.default_rng(0)
  result = {'num_images': num_images, 'memory_s_per_query': {}, 'disk_cold_s_per_query': {}}
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(__file__))) as directory:
    on_disk = stage1.allocate_host_cache(shapes, num_images, dtype, directory, 0.0)
    in_memory = stage1.allocate_host_cache(shapes, num_images, dtype)
    batch = len(next(iter(stored.values())))
    for name, rows in stored.items():
      for start in range(0, num_images, batch):
        stop = min(start + batch, num_images)
        on_disk[name][start:stop] = in_memory[name][start:stop] = rows[: stop - start]
      on_disk[name].flush()
    for k in ks:
      picks = [rng.choice(num_images, k, replace=False) for _ in range(queries)]
      for name in on_disk:  # evict the files' pages: every read below goes to the disk
        with open(os.path.join(directory, f'{name}.bin'), 'rb') as f:
          os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
      for label, arrays in (('disk_cold_s_per_query', on_disk), ('memory_s_per_query', in_memory)):
        start = time.perf_counter()
        for index in picks:
          jax.tree.map(lambda c, index=index: np.array(c[index]), arrays)
        result[label][k] = (time.perf_counter() - start) / queries
  return result


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_integer('batch', 8, 'Images per call.', flag_values=flag_values)
  flags.DEFINE_integer('repeats', 3, 'Timed repeats (median).', flag_values=flag_values)
  flags.DEFINE_string(
    'poolings', 'avg,gem', 'Comma-separated poolings to measure.', flag_values=flag_values
  )
  flags.DEFINE_string(
    'out', 'benchmarks/results/eval_cost.json', 'JSON report.', flag_values=flag_values
  )
  flags.DEFINE_string('stream_pooling', 'gem', 'whose caches to stream', flag_values=flag_values)
  flags.DEFINE_integer(
    'stream_images',
    2000,
    'gallery rows written to the memory-mapped files',
    flag_values=flag_values,
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  ks = (10, 50, 100)

  rng = np.random.default_rng(0)
  distmat = rng.uniform(size=(NUM_QUERY, NUM_GALLERY)).astype(np.float32)
  start = time.perf_counter()
  metrics.evaluate_rank(
    distmat,
    rng.integers(0, 750, NUM_QUERY),
    rng.integers(0, 751, NUM_GALLERY),
    rng.integers(1, 7, NUM_QUERY),
    rng.integers(1, 7, NUM_GALLERY),
  )
  metric_seconds = time.perf_counter() - start

  report = {
    'image_size': list(market.get_config().data.image_size),
    'ks': list(ks),
    'metric_s_market': metric_seconds,
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'jax': jax.__version__,
    'load_average': os.getloadavg()[0],
    'poolings': {},
  }
  for pooling in args.poolings.split(','):
    report['poolings'][pooling], stored = measure_pooling(pooling, args.batch, args.repeats, ks)
    if pooling == args.stream_pooling:
      report['streaming'] = measure_streaming(stored, ks, args.stream_images)

  print(f'metric (evaluate_rank) at {NUM_QUERY}×{NUM_GALLERY}: {metric_seconds:.2f} s')
  for pooling, r in report['poolings'].items():
    print(
      f'[{pooling}] stage 1: {r["stage1_s_per_image"] * 1e3:.0f} ms/image; cache '
      f'{r["cache_bytes_per_image"] / 1024:.0f} KiB/image on the device (float32), '
      f'{r["stored_cache_bytes_per_image"] / 1024:.0f} KiB/image stored (bfloat16)'
    )
    for k in ks:
      print(
        f'[{pooling}]   K={k:3d}: stage 2 {r["stage2_s_per_query"][k] * 1e3:8.1f} ms/query, '
        f'stage2/stage1 on Market {r["stage2_over_stage1_market"][k]:.3f}'
      )
    print(f'[{pooling}]   stored caches of MSMT17: {r["stored_cache_gb_msmt17"]:.1f} GB')
  if 'streaming' in report:
    r = report['streaming']
    for k in ks:
      memory_ms = r['memory_s_per_query'][k] * 1e3
      disk_ms = r['disk_cold_s_per_query'][k] * 1e3
      print(
        f'[{args.stream_pooling} streaming] K={k:3d}: gather {memory_ms:.2f} ms/query from '
        f'memory, {disk_ms:.2f} ms/query from cold memory-mapped files'
      )
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

"""The accelerator check: the real train and evaluation steps on this machine's devices.

  python benchmarks/device_check.py --out device_check.json          # a GPU or TPU host
  python benchmarks/device_check.py --tiny --out /tmp/check.json     # a CPU, in about a minute

Made for a short, scarce session on a bare accelerator host: it needs JAX,
flax, optax, numpy and `ml_collections` (one pure-Python wheel to carry:
`pip download ml-collections==1.1.0 --no-deps`), and no TensorFlow, no
datasets, no weights (every image is random). It runs, on all local devices:

- **train**: the step `train.py` runs (`train_step.make_train_step`: the same
  `shard_map`, optax SGD and losses) of the Market-1501 recipe (ResNet-50,
  384×128, non-local blocks, P=4 × K=4 per device) with GeM and with the
  paper's average pooling, in float32 and bfloat16, and with P=8 and P=16:
  compile time, step time, img/s, peak device memory, FLOPs per step
  (XLA's count of a variant without the pair stage's `lax.map`, which XLA
  counts once), MFU, and the step's time over the backbone's alone;
- **eval**: stage 1 img/s at a large batch and the cache bytes per image;
  stage 2 ms per query re-sorting the top K = 5, 10, 100 for GAP and GeM;
- **correctness**: the fast pair path equals the materialised one (float32
  to 1e-5 relative at full matmul precision; bfloat16 to 3e-2, see
  `BF16_TOLERANCE`), and 20 bfloat16 steps on one fixed batch lower the loss.

Writes one JSON (`--out`), prints a table, and exits 1 with one line naming
what failed. `--tiny` runs every code path with the tiny model at 64×32 on
the CPU; the test suite runs it, so the check cannot rot between sessions.
"""

from __future__ import annotations

import os
import platform
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
  flops_of,
  median_seconds,
  peak_memory_bytes,
  peak_tflops,
  save_report,
)
from cace_jax import cli, sharding, train_step  # noqa: E402
from cace_jax.errors import RunFailure, UserError  # noqa: E402
from cace_jax.evaluation import stage1, stage2  # noqa: E402
from cace_jax.models import CACENet, build_model, make_resnet  # noqa: E402
from configs import market  # noqa: E402

NUM_CLASSES = 751  # Market-1501's training identities
STEPS_PER_EPOCH = 200  # only shapes the learning-rate schedule
# (name, model fields, P) of the train section. K comes from the config.
TRAIN_VARIANTS = (
  ('gem_f32_p4', dict(pooling='gem', dtype='float32'), 4),
  ('gem_bf16_p4', dict(pooling='gem', dtype='bfloat16'), 4),
  ('gem_bf16_p8', dict(pooling='gem', dtype='bfloat16'), 8),
  ('gem_bf16_p16', dict(pooling='gem', dtype='bfloat16'), 16),
  ('avg_f32_p4', dict(pooling='avg', dtype='float32'), 4),
  ('avg_bf16_p4', dict(pooling='avg', dtype='bfloat16'), 4),
)
TINY_P = {4: 2, 8: 4, 16: 8}
STAGE2_K = (5, 10, 100)
MARKET_QUERY, MARKET_GALLERY = 3368, 15913
# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%). The fast and
# the direct pair paths round at different places (pooled sums versus pixel-wise
# products, the GCN's matmuls on different operands) through ~10 bf16 operations
# each, so their difference is a few such roundings of the output's scale: 3e-2
# of the largest magnitude is ~15 roundings, a bound that a wrong path (an O(1)
# difference) cannot meet.
BF16_TOLERANCE = 3e-2
F32_TOLERANCE = 1e-5


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'out', None, 'Where the JSON report goes (required).', flag_values=flag_values
  )
  flags.DEFINE_boolean(
    'tiny', False, 'The tiny model at 64×32: every code path in seconds.', flag_values=flag_values
  )
  flags.DEFINE_list(
    'sections', ['train', 'eval', 'correctness'], 'Which sections run.', flag_values=flag_values
  )
  flags.DEFINE_integer('steps', 5, 'Timed train steps per variant.', flag_values=flag_values)
  flags.DEFINE_integer(
    'eval_batch', 512, 'Stage-1 images per step (over all devices).', flag_values=flag_values
  )


def recipe_config(tiny: bool):
  """The Market-1501 recipe; with `tiny`, its tiny-model stand-in at 64×32."""
  config = market.get_config()
  if tiny:
    config.model.depth, config.model.width, config.model.embed_dim = 'tiny', 8, 32
    config.data.image_size, config.data.k = (64, 32), 2
  return config


def random_batch(mesh, p: int, k: int, image_size, seed: int) -> dict:
  """A global P·K-per-device batch of random images, each device's P identities × K images."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate(
    [np.repeat(rng.choice(NUM_CLASSES, p, replace=False), k) for _ in range(mesh.size)]
  ).astype(np.int32)
  images = rng.standard_normal((len(labels), *image_size, 3), np.float32)
  return sharding.global_batch({'image': images, 'label': labels}, mesh)


def check_train_variant(config, fields: dict, p: int, steps: int, mesh) -> dict:
  """Compiles and times one train-step variant; its FLOPs, memory and MFU."""
  k, image_size = config.data.k, tuple(config.data.image_size)
  per_device = p * k
  model_fields = {**dict(config.model), **fields}
  model = build_model(model_fields, NUM_CLASSES)
  tx, schedule = train_step.create_optimizer(config, STEPS_PER_EPOCH, per_device * mesh.size)
  state = sharding.replicate(train_step.init_state(model, tx, image_size, 0), mesh)
  batch = random_batch(mesh, p, k, image_size, seed=0)
  step = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  # The same step with every pair row in one block: no loop for XLA to count once.
  unrolled = build_model(model_fields, NUM_CLASSES, pair_block=per_device)
  counted = train_step.make_train_step(unrolled, tx, schedule, config.loss, mesh)
  flops = flops_of(counted.lower(state, batch))
  state, metrics = compiled(state, batch)  # warm-up (donates the state)
  times = []
  for _ in range(steps):
    begin = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - begin)
  step_s = float(np.median(times))
  loss = float(jax.device_get(metrics['loss']))
  if not np.isfinite(loss):
    raise RunFailure(f'train step {fields} P={p}: non-finite loss {loss}')
  peak, peak_source = peak_tflops(jax.local_devices()[0], fields['dtype'])
  return {
    'per_device_batch': per_device,
    'compile_s': compile_s,
    'step_s': step_s,
    'images_per_s': per_device * mesh.size / step_s,
    'gflop_per_device_step': flops / 1e9,
    'peak_tflops': peak,
    'peak_source': peak_source,
    'mfu': flops / step_s / (peak * 1e12),
    'peak_memory_bytes': peak_memory_bytes(jax.local_devices()[0]),
    'loss': loss,
  }


def backbone_step_seconds(config, dtype: str, per_device: int, steps: int) -> float:
  """Forward and backward of the backbone alone on one device (a sum-of-squares loss)."""
  image_size = tuple(config.data.image_size)
  backbone = make_resnet(
    config.model.depth,
    width=config.model.width,
    last_stride=config.model.last_stride,
    non_local=config.model.non_local,
    dtype=jnp.dtype(dtype),
  )
  images = jax.random.normal(jax.random.key(0), (per_device, *image_size, 3))
  variables = jax.jit(backbone.init)(jax.random.key(1), images[:2])

  def loss_fn(params):
    (fmap, _), _ = backbone.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    return jnp.mean(jnp.square(fmap.astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss_fn))
  return median_seconds(lambda: grad(variables['params']), steps)


def check_train(config, steps: int, tiny: bool, mesh) -> dict:
  results = {}
  for name, fields, p in TRAIN_VARIANTS:
    p = TINY_P[p] if tiny else p
    results[name] = check_train_variant(config, fields, p, steps, mesh)
    backbone_s = backbone_step_seconds(
      config, fields['dtype'], results[name]['per_device_batch'], steps
    )
    results[name]['backbone_step_s'] = backbone_s
    results[name]['step_over_backbone'] = results[name]['step_s'] / backbone_s
    print(f'train {name}: {format_row(results[name])}', flush=True)
  return results


def format_row(row: dict) -> str:
  memory = row['peak_memory_bytes']
  return (
    f'{row["images_per_s"]:8.1f} img/s, step {row["step_s"] * 1e3:8.1f} ms, '
    f'compile {row["compile_s"]:5.1f} s, {row["gflop_per_device_step"]:8.1f} GFLOP, '
    f'MFU {row["mfu"] * 100:5.1f}%, ×{row["step_over_backbone"]:.2f} backbone, '
    f'peak memory {"n/a" if memory is None else f"{memory / 2**30:.2f} GiB"}'
  )


def embed_random(model, variables, mesh, batch: int, image_size, steps: int):
  """(stage-1 img/s, cache) of one global batch of random images."""
  images = jax.device_put(
    jax.random.normal(jax.random.key(3), (batch, *image_size, 3)), sharding.split_over_data(mesh)
  )
  embed = stage1.make_embed_step(model, mesh, True, True)
  seconds = median_seconds(lambda: embed(variables, images), steps)
  _, cache = embed(variables, images)
  return batch / seconds, jax.tree.map(np.asarray, cache)


def check_eval(config, steps: int, tiny: bool, eval_batch: int, mesh) -> dict:
  """Stage-1 throughput and cache size; stage-2 ms per query at each K, for GAP and GeM."""
  image_size = tuple(config.data.image_size)
  batch = -(-(8 if tiny else eval_batch) // mesh.size) * mesh.size
  results = {}
  for pooling in ('avg', 'gem'):
    model = build_model({**dict(config.model), 'pooling': pooling}, NUM_CLASSES, sync_bn=False)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, *image_size, 3)))
    variables = sharding.replicate(variables, mesh)
    images_per_s, cache = embed_random(model, variables, mesh, batch, image_size, steps)
    compact = stage2.compact_cache(cache, np.dtype(config.eval.cache_dtype))
    row = {
      'stage1_images_per_s': images_per_s,
      'stage1_batch': batch,
      'cache_bytes_per_image': stage2.cache_nbytes(compact, batch),
    }
    # Market's gallery, its rows cycling through the embedded batch: scoring a pair
    # costs the same whichever image it reads.
    num_query = 4 if tiny else 64
    gallery = MARKET_GALLERY if not tiny else 200
    rows = np.arange(gallery) % batch
    distmat = np.random.default_rng(0).random((num_query, gallery), np.float32)
    score = stage2.pair_scorers(compact)['cacenet']
    pair_distances, call_size = stage2.make_pair_distances(
      model, variables, score, compact, jax.tree.map(lambda c: c[rows], compact), mesh
    )
    for k in STAGE2_K:
      stage2.rerank_top_k(distmat[:1], k, pair_distances, call_size)  # compile
      start = time.perf_counter()
      stage2.rerank_top_k(distmat, k, pair_distances, call_size)
      row[f'stage2_ms_per_query_k{k}'] = (time.perf_counter() - start) / num_query * 1e3
    results[pooling] = row
    print(
      f'eval {pooling}: stage 1 {images_per_s:.1f} img/s, '
      f'cache {row["cache_bytes_per_image"]:,} B/image, '
      + ', '.join(f'K={k} {row[f"stage2_ms_per_query_k{k}"]:.2f} ms/query' for k in STAGE2_K),
      flush=True,
    )
  results['market_size'] = {'query': MARKET_QUERY, 'gallery': MARKET_GALLERY}
  return results


def pair_outputs(model: CACENet, variables, images) -> dict:
  outputs = model.apply(variables, images, train=False)
  return {name: value for name, value in outputs.items() if name.startswith('pair_')}


def largest_relative_difference(fast: dict, direct: dict) -> float:
  """max over outputs of max |fast - direct| / max |direct|."""
  worst = 0.0
  for name in direct:
    a, b = (np.asarray(x[name], np.float32) for x in (fast, direct))
    worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
  return worst


def check_correctness(config) -> dict:
  """The fast pair path against the materialised one; 20 bfloat16 steps lower the loss."""
  image_size = tuple(config.data.image_size)
  images = jax.random.normal(jax.random.key(5), (4, *image_size, 3))
  results = {}
  for dtype, tolerance in (('float32', F32_TOLERANCE), ('bfloat16', BF16_TOLERANCE)):
    for pooling in ('avg', 'gem'):
      fields = {**dict(config.model), 'pooling': pooling, 'dtype': dtype}
      fast = build_model(fields, NUM_CLASSES, sync_bn=False)
      direct = build_model(fields, NUM_CLASSES, sync_bn=False, pair_path='direct')
      variables = jax.jit(fast.init)(jax.random.key(0), images[:2])
      # o starts at zero (the official init): perturb it so the GCN changes the features.
      params = variables['params']
      kernel = params['pair_graph']['o']['kernel']
      params['pair_graph']['o']['kernel'] = 0.05 * jax.random.normal(
        jax.random.key(6), kernel.shape
      )
      # float32 at full precision: TF32 tensor cores (the GPU default) round to 10 bits.
      with jax.default_matmul_precision('highest' if dtype == 'float32' else 'default'):
        difference = largest_relative_difference(
          jax.jit(pair_outputs, static_argnums=0)(fast, variables, images),
          jax.jit(pair_outputs, static_argnums=0)(direct, variables, images),
        )
      results[f'fast_vs_direct_{pooling}_{dtype}'] = {
        'largest_relative_difference': difference,
        'tolerance': tolerance,
        'passed': difference <= tolerance,
      }
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  fields = {**dict(config.model), 'dtype': 'bfloat16'}
  model = build_model(fields, NUM_CLASSES)
  p, k = 2, config.data.k
  tx, schedule = train_step.create_optimizer(config, STEPS_PER_EPOCH, p * k)
  state = sharding.replicate(train_step.init_state(model, tx, image_size, 0), mesh)
  step = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
  batch = random_batch(mesh, p, k, image_size, seed=1)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(jax.device_get(metrics['loss'])))
  results['bf16_20_steps_lower_the_loss'] = {
    'first_loss': losses[0],
    'last_loss': losses[-1],
    'passed': bool(np.isfinite(losses).all() and losses[-1] < losses[0]),
  }
  for name, row in results.items():
    print(f'correctness {name}: {"ok" if row["passed"] else "FAILED"} {row}', flush=True)
  return results


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  if not args.out:
    raise UserError('--out is required: the path of the JSON report')
  unknown = sorted(set(args.sections) - {'train', 'eval', 'correctness'})
  if unknown:
    raise UserError(f'--sections={unknown[0]}: expected train, eval or correctness')
  cli.init_distributed()
  config = recipe_config(args.tiny)
  mesh = sharding.make_mesh(jax.local_devices())
  device = jax.local_devices()[0]
  report = {
    'command': ' '.join(['python', 'benchmarks/device_check.py'] + sys.argv[1:]),
    'platform': {
      'jax': jax.__version__,
      'python': platform.python_version(),
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'local_devices': jax.local_device_count(),
      'machine': platform.machine(),
    },
    'recipe': {
      'image_size': list(config.data.image_size),
      'k': config.data.k,
      'depth': config.model.depth,
      'non_local': config.model.non_local,
    },
  }
  started = time.time()
  if 'train' in args.sections:
    report['train'] = check_train(config, args.steps, args.tiny, mesh)
  if 'eval' in args.sections:
    report['eval'] = check_eval(config, args.steps, args.tiny, args.eval_batch, mesh)
  if 'correctness' in args.sections:
    report['correctness'] = check_correctness(config)
  report['seconds'] = time.time() - started
  save_report(report, args.out)
  failed = [name for name, row in report.get('correctness', {}).items() if not row['passed']]
  if failed:
    raise RunFailure(f'device check failed: {", ".join(failed)} (details in {args.out})')
  print(f'device check passed in {report["seconds"]:.0f} s')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

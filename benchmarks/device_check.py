"""The accelerator check: the real train and evaluation steps on this machine's devices.

  python benchmarks/device_check.py --out device_check.json          # a GPU or TPU host
  python benchmarks/device_check.py --tiny --out /tmp/check.json     # a CPU, in about a minute

Made for a short, scarce session on a bare accelerator host: it needs JAX,
flax, optax, numpy and `ml_collections` (one pure-Python wheel to carry:
`pip download ml-collections==1.1.0 --no-deps`), and no TensorFlow, no
datasets, no weights (every image is random). On all local devices it runs,
in this order (a check cut short still says whether the device computes
right, and the JSON is rewritten after every section):

- **correctness**: the fast pair path equals the materialised one (float32
  to 1e-5 relative at full matmul precision; bfloat16 to 3e-2, see
  `BF16_TOLERANCE`), and 20 bfloat16 steps on one fixed batch lower the loss;
- **train**: the step `train.py` runs (`train_step.make_train_step`: the same
  `shard_map`, optax SGD and losses) of the Market-1501 recipe (ResNet-50,
  384×128, non-local blocks, P=4 × K=4 per device) with GeM and with the
  paper's average pooling, in float32 and bfloat16, and with P=8 and P=16:
  compile time, step time, img/s, the program's device memory (XLA's buffer
  assignment) and the allocator's peak so far (`memory_stats`), FLOPs per
  step (XLA's count of a variant without the pair stage's `lax.map`, which
  XLA counts once), MFU, and the step's time over the backbone's alone;
- **eval**: stage 1 img/s at a large batch and the cache bytes per image;
  stage 2 ms per query re-sorting the top K = 5, 10, 100 for GAP and GeM.

Prints a table, and exits 1 with one line naming what failed. `--tiny` runs
every code path with the tiny model at 64×32 on the CPU, P and the batch
shrunk and one train variant (GeM, bfloat16: the variants differ in flags
and shapes, not in code; correctness covers both poolings and both dtypes);
the test suite runs it, so the check cannot rot between
sessions. `--compile_cache DIR` keeps XLA's programs for a second run;
`--sections` and `--variants` run a part (a rerun after a failure, say);
train variants and eval poolings not started within `--deadline_s` (8
minutes) are skipped and listed, so a slow compiler costs figures, not the
whole report.
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
  median_seconds,
  peak_memory_bytes,
  peak_tflops,
  program_memory_bytes,
  save_report,
  train_step_flops,
)
from benchmarks.device_check_parts import (  # noqa: E402
  NUM_CLASSES,
  both_pair_paths,
  format_row,
  largest_relative_difference,
  perturbed_gcn_output,
  random_batch,
  recipe_config,
)
from cace_jax import sharding, xla_flags  # noqa: E402
from cace_jax.commands import cli  # noqa: E402
from cace_jax.errors import RunFailure, UserError  # noqa: E402
from cace_jax.evaluation import stage1, stage2, two_stage  # noqa: E402
from cace_jax.models import CACENet, build_model, make_resnet  # noqa: E402
from cace_jax.train import train_step  # noqa: E402

SECTIONS = ('correctness', 'train', 'eval')
STEPS_PER_EPOCH = 200  # only shapes the learning-rate schedule
# (name, model fields, P) of the train section. K comes from the config.
# The recipe's own forms first: a run that reaches --deadline_s skips the rest.
TRAIN_VARIANTS = (
  ('gem_bf16_p4', dict(pooling='gem', dtype='bfloat16'), 4),
  ('gem_f32_p4', dict(pooling='gem', dtype='float32'), 4),
  ('avg_bf16_p4', dict(pooling='avg', dtype='bfloat16'), 4),
  ('avg_f32_p4', dict(pooling='avg', dtype='float32'), 4),
  ('gem_bf16_p8', dict(pooling='gem', dtype='bfloat16'), 8),
  ('gem_bf16_p16', dict(pooling='gem', dtype='bfloat16'), 16),
)
# --tiny: the variants differ in flags and shapes, not in code: one of them, P halved.
TINY_VARIANTS = ('gem_bf16_p4',)
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
  flags.DEFINE_list('sections', list(SECTIONS), 'Which sections run.', flag_values=flag_values)
  flags.DEFINE_list(
    'variants',
    [],
    f'Train variants to run (default: all; with --tiny {", ".join(TINY_VARIANTS)}), of '
    + ', '.join(name for name, _, _ in TRAIN_VARIANTS),
    flag_values=flag_values,
  )
  flags.DEFINE_integer('steps', 5, 'Timed train steps per variant.', flag_values=flag_values)
  flags.DEFINE_integer(
    'eval_batch', 512, 'Stage-1 images per step (over all devices).', flag_values=flag_values
  )
  flags.DEFINE_float(
    'deadline_s',
    480.0,
    'Train variants and eval poolings not started this many seconds after the start are '
    'skipped (and listed as skipped): a short session ends with a report, not a timeout.',
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    'compile_cache',
    '',
    "A directory for XLA's compiled programs, so that a second run skips compiling.",
    flag_values=flag_values,
  )


class DeviceCheck:
  """The three sections, sharing what they build: initial variables and compiled steps.

  Parameters are float32 whatever the compute dtype, so one initialisation
  serves every variant (on a CPU it costs a third of a step to compile, see
  `train_step.init_variables`).
  """

  def __init__(
    self, config, mesh, tiny: bool, steps: int, variants: list[str], deadline: float, save
  ):
    """`deadline`: time.time() after which nothing new starts; `save()` writes the report."""
    self.config, self.mesh, self.tiny, self.steps = config, mesh, tiny, steps
    self.deadline, self.save = deadline, save
    self.variant_names = variants or (TINY_VARIANTS if tiny else [n for n, _, _ in TRAIN_VARIANTS])
    self.image_size = tuple(config.data.image_size)
    self._variables = None
    self._train_steps = {}

  def model(self, **fields) -> CACENet:
    return build_model({**dict(self.config.model), **fields}, NUM_CLASSES)

  def variables(self, pooling: str) -> dict:
    """Initial variables (on the host) of the recipe's model with `pooling`.

    Flax draws each module's parameters from the module's name, so a model
    with another pooling holds the GeM model's parameters less GeM's p.
    """
    if self._variables is None:
      keys = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
      # On the host: every state made from them is a copy, so donating one is safe.
      self._variables = jax.device_get(
        train_step.init_variables(self.model(pooling='gem'), keys, self.image_size)
      )
    if pooling == 'gem':
      return self._variables
    params = {name: tree for name, tree in self._variables['params'].items() if name != 'gemp'}
    return {**self._variables, 'params': params}

  def train_step(self, fields: dict, p: int):
    """(compiled step, its compile seconds, its optimizer), memoised."""
    key = (tuple(sorted(fields.items())), p)
    if key not in self._train_steps:
      model = self.model(**fields)
      per_device = p * self.config.data.k
      tx, schedule = train_step.create_optimizer(
        self.config, STEPS_PER_EPOCH, per_device * self.mesh.size
      )
      step = train_step.make_train_step(model, tx, schedule, self.config.loss, self.mesh)
      state = self.fresh_state(fields['pooling'], tx)
      batch = random_batch(self.mesh, p, self.config.data.k, self.image_size, seed=0)
      start = time.perf_counter()
      compiled = step.lower(state, batch).compile()
      self._train_steps[key] = (compiled, time.perf_counter() - start, tx)
    return self._train_steps[key]

  def fresh_state(self, pooling: str, tx) -> train_step.TrainState:
    state = train_step.init_state(None, tx, self.image_size, 0, self.variables(pooling))
    return sharding.replicate(state, self.mesh)

  # -- correctness ------------------------------------------------------------------

  def correctness(self) -> dict:
    """The fast pair path against the materialised one; 20 bfloat16 steps lower the loss."""
    images = jax.random.normal(jax.random.key(5), (4, *self.image_size, 3))
    results = {}
    for dtype, tolerance in (('float32', F32_TOLERANCE), ('bfloat16', BF16_TOLERANCE)):
      for pooling in ('avg', 'gem'):
        fields = dict(pooling=pooling, dtype=dtype, sync_bn=False)
        variables = perturbed_gcn_output(self.variables(pooling))
        # float32 at full precision: TF32 tensor cores (the GPU default) round to 10 bits.
        with jax.default_matmul_precision('highest' if dtype == 'float32' else 'default'):
          fast, direct = jax.jit(both_pair_paths, static_argnums=(0, 1))(
            self.model(**fields), self.model(**fields, pair_path='direct'), variables, images
          )
        difference = largest_relative_difference(fast, direct)
        results[f'fast_vs_direct_{pooling}_{dtype}'] = {
          'largest_relative_difference': difference,
          'tolerance': tolerance,
          'passed': difference <= tolerance,
        }
    results['bf16_20_steps_lower_the_loss'] = self.loss_falls(20)
    for name, row in results.items():
      print(f'correctness {name}: {"ok" if row["passed"] else "FAILED"} {row}', flush=True)
    return results

  def loss_falls(self, steps: int) -> dict:
    """`steps` steps of the first bfloat16 train variant on one fixed batch: the loss must fall."""
    _, fields, p = next(v for v in self.variants() if v[1]['dtype'] == 'bfloat16')
    compiled, _, tx = self.train_step(fields, p)
    state = self.fresh_state(fields['pooling'], tx)
    batch = random_batch(self.mesh, p, self.config.data.k, self.image_size, seed=1)
    losses = []
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      losses.append(float(jax.device_get(metrics['loss'])))
    return {
      'variant': dict(fields, p=p),
      'first_loss': losses[0],
      'last_loss': losses[-1],
      'passed': bool(np.isfinite(losses).all() and losses[-1] < losses[0]),
    }

  # -- train ------------------------------------------------------------------------

  def variants(self) -> list[tuple[str, dict, int]]:
    """The train variants this run measures, P halved for `--tiny`."""
    shrink = 2 if self.tiny else 1
    return [(n, f, p // shrink) for n, f, p in TRAIN_VARIANTS if n in self.variant_names]

  def train(self, results: dict) -> None:
    """Fills `results` {variant: row}, saving the report after each variant."""
    for name, fields, p in self.variants():
      if time.time() > self.deadline:
        results[name] = {'skipped': 'not started before --deadline_s'}
        print(f'train {name}: skipped (--deadline_s)', flush=True)
        continue
      results[name] = self.train_variant(fields, p)
      print(f'train {name}: {format_row(results[name])}', flush=True)
      self.save()

  def train_variant(self, fields: dict, p: int) -> dict:
    """Times one train-step variant; its FLOPs, memory, MFU and cost over the backbone's."""
    per_device = p * self.config.data.k
    compiled, compile_s, tx = self.train_step(fields, p)
    model_fields = {**dict(self.config.model), **fields}
    try:
      flops = train_step_flops(self.config, model_fields, NUM_CLASSES, per_device, self.mesh)
      flops_error = None
    except Exception as error:  # pylint: disable=broad-except  # a count must not end the check
      flops, flops_error = float('nan'), f'{type(error).__name__}: {error}'[:300]
    state = self.fresh_state(fields['pooling'], tx)
    batch = random_batch(self.mesh, p, self.config.data.k, self.image_size, seed=0)
    state, metrics = compiled(state, batch)  # warm-up (donates the state)
    times = []
    for _ in range(self.steps):
      begin = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - begin)
    step_s = float(np.median(times))
    loss = float(jax.device_get(metrics['loss']))
    if not np.isfinite(loss):
      raise RunFailure(f'train step {fields} P={p}: non-finite loss {loss}')
    peak, peak_source = peak_tflops(jax.local_devices()[0], fields['dtype'])
    backbone_s = self.backbone_step_seconds(fields['dtype'], per_device)
    return {
      'per_device_batch': per_device,
      'compile_s': compile_s,
      'step_s': step_s,
      'images_per_s': per_device * self.mesh.size / step_s,
      'gflop_per_device_step': flops / 1e9,
      'peak_tflops': peak,
      'peak_source': peak_source,
      'mfu': flops / step_s / (peak * 1e12),
      'flops_error': flops_error,
      'program_memory_bytes': program_memory_bytes(compiled),
      'allocator_peak_bytes': peak_memory_bytes(jax.local_devices()[0]),
      'backbone_step_s': backbone_s,
      'step_over_backbone': step_s / backbone_s,
      'loss': loss,
    }

  def backbone_step_seconds(self, dtype: str, per_device: int) -> float:
    """Forward and backward of the backbone alone on one device (a sum-of-squares loss)."""
    model = self.model(dtype=dtype)  # the config's fields as CACENet reads them (depth '50': 50)
    backbone = make_resnet(
      model.depth,
      width=model.width,
      last_stride=model.last_stride,
      non_local=model.non_local,
      dtype=jnp.dtype(dtype),
    )
    images = jax.random.normal(jax.random.key(0), (per_device, *self.image_size, 3))
    # The recipe model's own backbone variables: no second initialisation to compile.
    variables = self.variables('avg')
    params, batch_stats = variables['params']['backbone'], variables['batch_stats']['backbone']

    def loss_fn(params):
      (fmap, _), _ = backbone.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
      )
      return jnp.mean(jnp.square(fmap.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss_fn))
    return median_seconds(lambda: grad(params), self.steps)

  # -- eval -------------------------------------------------------------------------

  def eval(self, results: dict, eval_batch: int) -> None:
    """Fills `results` with stage-1 throughput and cache size, stage-2 ms per query at each K."""
    batch = -(-(8 if self.tiny else eval_batch) // self.mesh.size) * self.mesh.size
    results['market_size'] = {'query': MARKET_QUERY, 'gallery': MARKET_GALLERY}
    for pooling in ('avg', 'gem'):
      if time.time() > self.deadline:
        results[pooling] = {'skipped': 'not started before --deadline_s'}
        print(f'eval {pooling}: skipped (--deadline_s)', flush=True)
        continue
      model = self.model(pooling=pooling, sync_bn=False)
      variables = sharding.replicate(self.variables(pooling), self.mesh)
      images = jax.device_put(
        jax.random.normal(jax.random.key(3), (batch, *self.image_size, 3)),
        sharding.split_over_data(self.mesh),
      )
      embed = stage1.make_embed_step(model, self.mesh, True, True)
      seconds = median_seconds(lambda: embed(variables, images), self.steps)
      cache = jax.tree.map(np.asarray, embed(variables, images)[1])
      compact = stage2.compact_cache(cache, np.dtype(self.config.eval.cache_dtype))
      row = {
        'stage1_images_per_s': batch / seconds,
        'stage1_batch': batch,
        'cache_bytes_per_image': stage2.cache_nbytes(compact, batch),
      }
      # Market's gallery and some queries, their rows cycling through the embedded
      # batch: scoring a pair costs the same whichever images it reads.
      num_query = 4 if self.tiny else 64
      gallery = 200 if self.tiny else MARKET_GALLERY
      cycled = lambda n: jax.tree.map(lambda c: c[np.arange(n) % batch], compact)
      distmat = np.random.default_rng(0).random((num_query, gallery), np.float32)
      score = stage2.pair_scorers(compact)['cacenet']
      pair_distances = stage2.make_pair_distances(
        model, variables, score, cycled(num_query), cycled(gallery), self.mesh
      )
      for k in STAGE2_K:
        two_stage.TwoStageRanker(distmat[:1], pair_distances, k)  # compile
        start = time.perf_counter()
        two_stage.TwoStageRanker(distmat, pair_distances, k).distances(k)
        row[f'stage2_ms_per_query_k{k}'] = (time.perf_counter() - start) / num_query * 1e3
      results[pooling] = row
      print(
        f'eval {pooling}: stage 1 {row["stage1_images_per_s"]:.1f} img/s, '
        f'cache {row["cache_bytes_per_image"]:,} B/image, '
        + ', '.join(f'K={k} {row[f"stage2_ms_per_query_k{k}"]:.2f} ms/query' for k in STAGE2_K),
        flush=True,
      )
      self.save()


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  if not args.out:
    raise UserError('--out is required: the path of the JSON report')
  unknown = sorted(set(args.sections) - set(SECTIONS))
  if unknown:
    raise UserError(f'--sections={unknown[0]}: expected {", ".join(SECTIONS)}')
  names = [name for name, _, _ in TRAIN_VARIANTS]
  unknown = sorted(set(args.variants) - set(names))
  if unknown:
    raise UserError(f'--variants={unknown[0]}: expected some of {", ".join(names)}')
  if (
    'correctness' in args.sections and args.variants and not any('bf16' in v for v in args.variants)
  ):
    raise UserError(
      f'--variants={",".join(args.variants)}: correctness trains a bfloat16 variant; name one'
    )
  if args.compile_cache:
    jax.config.update('jax_compilation_cache_dir', args.compile_cache)
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
      # What importing cace_jax did with its default XLA flags (none on GPUs and TPUs).
      'default_xla_flags': xla_flags.outcome(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
    },
    'recipe': {
      'image_size': list(config.data.image_size),
      'k': config.data.k,
      'depth': config.model.depth,
      'non_local': config.model.non_local,
    },
    'section_seconds': {},
  }
  started = time.time()

  def save():  # after every variant and section: a run cut short keeps what it measured
    report['seconds'] = time.time() - started
    save_report(report, args.out)

  check = DeviceCheck(
    config, mesh, args.tiny, args.steps, args.variants, started + args.deadline_s, save
  )
  for section in SECTIONS:
    if section not in args.sections:
      continue
    begin = time.time()
    if section == 'correctness':
      report[section] = check.correctness()
    elif section == 'train':
      check.train(report.setdefault(section, {}))
    else:
      check.eval(report.setdefault(section, {}), args.eval_batch)
    report['section_seconds'][section] = time.time() - begin
    save()
  failed = [name for name, row in report.get('correctness', {}).items() if not row['passed']]
  if failed:
    raise RunFailure(f'device check failed: {", ".join(failed)} (details in {args.out})')
  skipped = [
    f'{section} {name}'
    for section in ('train', 'eval')
    for name, row in report.get(section, {}).items()
    if 'skipped' in row
  ]
  print(
    f'device check passed in {report["seconds"]:.0f} s'
    + (f'; past --deadline_s, skipped: {", ".join(skipped)}' if skipped else '')
  )


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

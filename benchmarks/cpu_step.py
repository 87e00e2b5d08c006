r"""The train step on the CPU: each XLA:CPU set-up's speed against PyTorch and accuracy vs float64.

    # speed against PyTorch (what docs/cpu.md shows), ~20 min on 2 cores:
    python benchmarks/cpu_step.py --official=<PersonReID-YouReID checkout> \
        --steps_of=backbone,cacenet_gem,stage1 --variants=ynnpack,fast,torch --rounds=2 --noaccuracy
    # accuracy against float64 and the other options, at 128x64, ~15 min:
    python benchmarks/cpu_step.py --steps_of=backbone,cacenet_gem,cacenet_avg \
        --variants=ynnpack,fast,ynnpack_bf16,fast_bf16,fast_onednn,fast_eigen1 --steps=2 \
        --height=128 --width=64 --out=benchmarks/results/cpu_step_variants.json

(A float64 ResNet-50 gradient at 256x128 takes many minutes on a CPU: XLA's
float64 convolutions are slow, hence the smaller size for accuracy.)

Steps (batch 16 = P 4 × K 4 identities at 256×128, train mode, gradients of
every parameter; `stage1` is evaluation's forward):
  backbone     ResNet-50 (last stride 1), mean of squares of the map.
               torch: torchvision's resnet50 with the same loss.
  cacenet_gem  the official recipe's CACE-Net: non-local blocks, GeM, the
               projected-cosine pair graph, every loss (dropout off, so the
               float64 reference draws no different masks). torch: the official
               CACENET module and its compute_loss (needs --official).
  cacenet_avg  the same with average pooling (the fast linear pair path).
  stage1       cacenet_gem's stage-1 extraction of 32 images: embeddings and
               the stage-2 cache (what evaluation runs).
               torch: the official CACENET in eval mode.
Variants (each step × variant runs in a fresh process, since XLA reads its
flags once per process):
  ynnpack      jaxlib's own defaults: convolutions go to YNNPACK
               (CACE_JAX_DEFAULT_XLA_FLAGS=0).
  fast         cace_jax's default: convolutions compiled by XLA itself.
  *_bf16       the same with model.dtype=bfloat16.
  fast_onednn  + --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true
  fast_eigen1  + --xla_cpu_multi_thread_eigen=false (Eigen's own operations on one thread)
  fast_concurrency  + --xla_cpu_enable_concurrency_optimized_scheduler=true
  torch        the PyTorch counterpart (oneDNN; torch's default threads).

Accuracy: every JAX variant's gradient (stage1: embeddings) is compared with
the same step computed in float64: the same program, run with
jax_enable_x64 and every float32 in the model read as float64, whose HLO is
checked to hold no float32 value. Figures: the largest difference over the
whole gradient relative to the reference's largest magnitude (the form of
the parity tests' tolerances) and the relative L2 norm of the difference.
All variants start from one set of initial values (written by a first
child process). Timed variants run round-robin, `--rounds` times, and each
figure is the median step time. Writes --out (JSON).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Nothing here may import cace_jax.models: the float64 child must patch jnp.float32 first.
from cace_jax import xla_flags  # noqa: E402
from cace_jax.commands import cli  # noqa: E402
from cace_jax.errors import UserError  # noqa: E402

IDENTITIES, INSTANCES = 4, 4
BATCH = IDENTITIES * INSTANCES
STAGE1_BATCH = 32
NUM_CLASSES = 751  # Market-1501's training identities
STEPS = ('backbone', 'cacenet_gem', 'cacenet_avg', 'stage1')
# name: (extra XLA flags, compute dtype, keep jaxlib's defaults)
VARIANTS = {
  'ynnpack': ('', 'float32', True),
  'fast': ('', 'float32', False),
  'ynnpack_bf16': ('', 'bfloat16', True),
  'fast_bf16': ('', 'bfloat16', False),
  'fast_onednn': (
    '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true',
    'float32',
    False,
  ),
  'fast_eigen1': ('--xla_cpu_multi_thread_eigen=false', 'float32', False),
  'fast_concurrency': (
    '--xla_cpu_enable_concurrency_optimized_scheduler=true',
    'float32',
    False,
  ),
  'torch': (None, 'float32', False),
}
INTERNAL = ('init', 'float64')  # child jobs that are not timed variants


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_list('steps_of', list(STEPS), 'Steps to measure.', flag_values=flag_values)
  flags.DEFINE_list('variants', list(VARIANTS), 'Variants to run.', flag_values=flag_values)
  flags.DEFINE_string('depth', '50', "ResNet depth ('tiny' for tests).", flag_values=flag_values)
  flags.DEFINE_integer('height', 256, 'Image height.', flag_values=flag_values)
  flags.DEFINE_integer('width', 128, 'Image width.', flag_values=flag_values)
  flags.DEFINE_integer('rounds', 1, 'Round-robin rounds.', flag_values=flag_values)
  flags.DEFINE_integer('steps', 3, 'Timed steps per variant and round.', flag_values=flag_values)
  flags.DEFINE_boolean(
    'accuracy', True, 'Compare with the float64 reference.', flag_values=flag_values
  )
  flags.DEFINE_string(
    'official',
    None,
    'A PersonReID-YouReID checkout (torch, cacenet steps).',
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    'out', 'benchmarks/results/cpu_step.json', 'JSON report.', flag_values=flag_values
  )
  # Internal: a child process runs one job.
  flags.DEFINE_string('child', None, 'Run this variant (internal).', flag_values=flag_values)
  flags.DEFINE_string('step', None, 'Of this step (internal).', flag_values=flag_values)
  flags.DEFINE_string('scratch', None, 'Shared files (internal).', flag_values=flag_values)


# ---------------------------------------------------------------- child jobs


def model_and_loss(step: str, dtype, depth: str):
  """(model, loss(params, batch_stats, images, labels) -> scalar or embeddings)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from cace_jax.models import (  # pylint: disable=import-outside-toplevel
    build_model,
    losses,  # pylint: disable=import-outside-toplevel
    make_resnet,
  )

  if step == 'backbone':
    resnet_depth = int(depth) if depth.isdigit() else depth
    model = make_resnet(resnet_depth, last_stride=1, non_local=False, dtype=dtype)

    def loss(params, batch_stats, images, labels):
      del labels
      (fmap, _), _ = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
      )
      return jnp.mean(jnp.square(fmap.astype(jnp.float32)))

    return model, loss
  pooling = 'avg' if step == 'cacenet_avg' else 'gem'
  model = build_model(
    dict(depth=depth, non_local=True, pooling=pooling, adjacency='projected'), NUM_CLASSES
  ).clone(dtype=dtype, dropout_rate=0.0)
  if step == 'stage1':
    from cace_jax.evaluation.stage1 import embed_and_cache  # pylint: disable=import-outside-toplevel

    def embed(params, batch_stats, images, labels):  # what evaluation runs: embeddings, caches
      del labels
      variables = {'params': params, 'batch_stats': batch_stats}
      return model.apply(variables, images, False, True, method=embed_and_cache)

    return model, embed

  def loss(params, batch_stats, images, labels):
    outputs, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    return losses.total_loss(outputs, labels)[0]

  return model, loss


def inputs(step: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  batch = STAGE1_BATCH if step == 'stage1' else BATCH
  images = np.random.default_rng(0).standard_normal((batch, height, width, 3), np.float32)
  return images, np.repeat(np.arange(batch // INSTANCES), INSTANCES)


def save_initial_values(step: str, args: flags.FlagValues) -> dict:
  """Initialises the step's model once in float32; every variant starts from these values."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  model, _ = model_and_loss(step, jnp.float32, args.depth)
  images, _ = inputs(step, args.height, args.width)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(images[:2]))
  flat = flax.traverse_util.flatten_dict(variables, sep='/')
  np.savez(
    os.path.join(args.scratch, f'{step}_init.npz'), **{k: np.asarray(v) for k, v in flat.items()}
  )
  return {'num_params': int(sum(v.size for k, v in flat.items() if k.startswith('params/')))}


def load_initial_values(step: str, scratch: str, dtype) -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  stored = np.load(os.path.join(scratch, f'{step}_init.npz'))
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(stored[k], dtype) for k in stored}, '/')


def run_jax(step: str, variant: str, args: flags.FlagValues) -> dict:
  """Compiles the step, saves its first result (for accuracy) and times `steps` more calls."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  reference = variant == 'float64'
  if reference:  # every float32 in the model becomes float64 (see the module docstring)
    jax.config.update('jax_enable_x64', True)
    jnp.float32 = jnp.float64
    dtype = jnp.float64
  else:
    dtype = jnp.dtype(VARIANTS[variant][1])
  model, loss = model_and_loss(step, dtype, args.depth)
  variables = load_initial_values(step, args.scratch, jnp.float64 if reference else jnp.float32)
  images, labels = inputs(step, args.height, args.width)
  arguments = (
    variables['params'],
    variables['batch_stats'],
    jnp.asarray(images, jnp.float64 if reference else jnp.float32),
    jnp.asarray(labels),
  )
  function = loss if step == 'stage1' else jax.grad(loss)
  start = time.perf_counter()
  lowered = jax.jit(function).lower(*arguments)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  if reference:
    text = lowered.as_text()
    if 'f32' in text:
      raise RuntimeError(f'the float64 reference of {step} still holds float32 values')
  first = jax.block_until_ready(compiled(*arguments))
  flat = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(first)])
  np.save(os.path.join(args.scratch, f'{step}_{variant}.npy'), flat)
  times = []
  for _ in range(args.steps):
    begin = time.perf_counter()
    jax.block_until_ready(compiled(*arguments))
    times.append(time.perf_counter() - begin)
  text = compiled.as_text()
  return {
    'compile_s': compile_s,
    'step_times_s': times,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'ynnpack_convolutions': xla_flags.count_ynnpack_convolutions(text),
    'onednn_calls': text.count('__onednn$'),
  }


def run_torch(step: str, args: flags.FlagValues) -> dict:
  """Step times of the PyTorch counterpart (random weights; same shapes)."""
  import torch  # pylint: disable=import-outside-toplevel

  images, labels = inputs(step, args.height, args.width)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels)
  if step == 'backbone':
    import torchvision  # pylint: disable=import-outside-toplevel

    net = getattr(torchvision.models, f'resnet{args.depth}')()
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    trunk = torch.nn.Sequential(*list(net.children())[:-2]).train()

    def run():
      trunk.zero_grad(set_to_none=True)
      torch.mean(trunk(x) ** 2).backward()
  else:
    from benchmarks.official_parity import official_module  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    pool = 'avgpool' if step == 'cacenet_avg' else 'gemm'
    net = official_module(args.official)(
      num_classes=NUM_CLASSES, num_layers=f'resnet{args.depth}', pool_type=pool, use_non_local=True
    )
    net.fc_layer[1].p = 0.0
    net.pair_fc_layer[1].p = 0.0
    if step == 'stage1':
      net.eval()

      def run():
        with torch.no_grad():
          net(x)
    else:
      net.train()

      def run():
        net.zero_grad(set_to_none=True)
        parts, _ = net.compute_loss(net(x), y)
        sum(parts).backward()

  start = time.perf_counter()
  run()  # oneDNN creates its primitives on the first call
  first_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    begin = time.perf_counter()
    run()
    times.append(time.perf_counter() - begin)
  return {
    'compile_s': first_s,
    'step_times_s': times,
    'torch': torch.__version__,
    'torch_threads': torch.get_num_threads(),
  }


def run_child(args: flags.FlagValues) -> dict:
  if args.child == 'init':
    return save_initial_values(args.step, args)
  if args.child == 'torch':
    return run_torch(args.step, args)
  return run_jax(args.step, args.child, args)


# ---------------------------------------------------------------- the parent


def spawn(step: str, job: str, args: flags.FlagValues, scratch: str, steps: int) -> dict:
  """One job in a fresh process with its variant's environment; its JSON line or its failure."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop(xla_flags.OPT_OUT, None)
  env['XLA_FLAGS'] = ''  # the parent's own additions must not leak into a variant
  if job in VARIANTS and VARIANTS[job][0] is not None:
    extra, _, jaxlib_defaults = VARIANTS[job]
    env['XLA_FLAGS'] = extra
    if jaxlib_defaults:
      env[xla_flags.OPT_OUT] = '0'
  command = [sys.executable, os.path.abspath(__file__), f'--child={job}', f'--step={step}']
  command += [f'--steps={steps}', f'--scratch={scratch}', f'--depth={args.depth}']
  command += [f'--height={args.height}', f'--width={args.width}']
  if args.official:
    command.append(f'--official={args.official}')
  result = subprocess.run(command, capture_output=True, text=True, env=env)
  if result.returncode != 0:
    lines = result.stderr.strip().splitlines() or ['no output']
    reasons = [line for line in lines if 'error' in line.lower()]
    return {'failed': (reasons or lines)[-1].strip()[:300]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def compare(scratch: str, step: str, variant: str) -> dict:
  reference = os.path.join(scratch, f'{step}_float64.npy')
  measured = os.path.join(scratch, f'{step}_{variant}.npy')
  if not (os.path.exists(reference) and os.path.exists(measured)):
    return {}
  a, b = np.load(measured), np.load(reference)
  return {
    'max_relative_to_float64': float(np.abs(a - b).max() / np.abs(b).max()),
    'l2_relative_to_float64': float(np.linalg.norm(a - b) / np.linalg.norm(b)),
  }


def check_args(args: flags.FlagValues) -> None:
  for name, given, known in (
    ('--steps_of', args.steps_of, STEPS),
    ('--variants', args.variants, VARIANTS),
  ):
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise UserError(f'{name}={unknown[0]}: expected some of {", ".join(known)}')
  wants_official = 'torch' in args.variants and set(args.steps_of) - {'backbone'}
  if wants_official and not args.official:
    raise UserError(
      '--official is needed for the torch variant of the CACE-Net steps '
      '(a PersonReID-YouReID checkout); or leave torch out of --variants'
    )


def print_table(results: dict) -> None:
  print(
    f'\n{"step":>12} {"variant":>17} | {"s/step":>7} | {"img/s":>6} | {"× ynnpack":>9} | '
    f'{"× torch":>7} | {"max rel. f64":>12} | {"L2 rel. f64":>11}'
  )
  for step, rows in results.items():
    for name, row in rows.items():
      if 'step_s' not in row:
        print(f'{step:>12} {name:>17} | {row.get("failed", "not timed")}')
        continue
      print(
        f'{step:>12} {name:>17} | {row["step_s"]:7.2f} | {row["images_per_s"]:6.2f} | '
        f'{row.get("speed_over_ynnpack", float("nan")):9.2f} | '
        f'{row.get("speed_over_torch", float("nan")):7.2f} | '
        f'{row.get("max_relative_to_float64", float("nan")):12.2e} | '
        f'{row.get("l2_relative_to_float64", float("nan")):11.2e}'
      )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  if args.child:
    print(json.dumps(run_child(args)))
    return
  check_args(args)
  from benchmarks.common import save_report  # pylint: disable=import-outside-toplevel

  load_before = os.getloadavg()[0]
  results = {}
  started = time.time()
  with tempfile.TemporaryDirectory(prefix='cpu_step_') as scratch:
    for step in args.steps_of:
      rows = results[step] = {}
      facts = spawn(step, 'init', args, scratch, 0)
      if 'failed' in facts:
        raise UserError(f'initialising {step} failed: {facts["failed"]}')
      if args.accuracy:
        rows['float64'] = spawn(step, 'float64', args, scratch, 0)
        print(f'{step} float64 reference: {rows["float64"].get("failed", "done")}', flush=True)
      for name in args.variants:
        rows[name] = {'step_times_s': [], 'compile_s': []}
      for round_index in range(args.rounds):
        for name in args.variants:
          measured = spawn(step, name, args, scratch, args.steps)
          if 'failed' in measured:
            rows[name]['failed'] = measured['failed']
            print(f'{step} {name}: failed: {measured["failed"]}', flush=True)
            continue
          rows[name]['step_times_s'] += measured.pop('step_times_s')
          rows[name]['compile_s'].append(measured.pop('compile_s'))
          rows[name].update(measured)
          print(
            f'round {round_index + 1} {step} {name}: '
            f'{statistics.median(rows[name]["step_times_s"][-args.steps :]):.2f} s/step',
            flush=True,
          )
      batch = STAGE1_BATCH if step == 'stage1' else BATCH
      for name in args.variants:
        row = rows[name]
        row.update(compare(scratch, step, name))
        if row['step_times_s']:
          row['step_s'] = statistics.median(row['step_times_s'])
          row['images_per_s'] = batch / row['step_s']
      for base in ('ynnpack', 'torch'):
        base_s = rows.get(base, {}).get('step_s')
        for row in rows.values():
          if base_s and 'step_s' in row:
            row[f'speed_over_{base}'] = base_s / row['step_s']
      rows['num_params'] = facts['num_params']
  print_table({s: {k: v for k, v in r.items() if isinstance(v, dict)} for s, r in results.items()})
  report = {
    'command': ' '.join(['python', 'benchmarks/cpu_step.py'] + sys.argv[1:]),
    'shape': {
      'depth': args.depth,
      'batch': BATCH,
      'stage1_batch': STAGE1_BATCH,
      'height': args.height,
      'width': args.width,
    },
    'variants': {
      name: {'xla_flags': VARIANTS[name][0], 'dtype': VARIANTS[name][1]} for name in args.variants
    },
    'results': results,
    'wall_s': time.time() - started,
    'load_average': {'before': load_before, 'after': os.getloadavg()[0]},
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'processor': platform.processor(),
    'date': time.strftime('%Y-%m-%d'),
  }
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

"""Forward+backward throughput of CACE-Net against its backbone.

    python benchmarks/model_step.py                       # ResNet-50, 256x128, B=16 (P=4, K=4)
    python benchmarks/model_step.py --steps 2 --height 128 --width 64   # quicker

Configurations (all train mode, jit, gradients w.r.t. all parameters):
  backbone    ResNet-50 (last stride 1) with a sum-of-squares loss on the map
  individual  + pooling/embedding/BN/classifier, label-smoothed CE + triplet
  full_avg    + pair stage over all B^2 ordered pairs, average pooling (the
              fast linear shortcut), every loss
  full_gem    the same with GeM pooling (conditional maps built one row of
              pairs at a time)

Configurations are compiled first, then timed round-robin (median of
`--steps` rounds) so that load from other processes affects all alike. Prints
a table with each configuration's step time, XLA-counted FLOPs (full_gem's
counted on a lowering without the pair loop, whose body XLA counts once)
relative to the backbone, and MFU against the device's peak (a datasheet
figure, or on a CPU a measured float32 matrix product), and writes
benchmarks/results/model_step.json. Expect 6-12 s per step on a 2-core CPU at
the default size.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import flops_of, peak_tflops, save_report  # noqa: E402
from cace_jax.commands import cli  # noqa: E402
from cace_jax.models import (  # noqa: E402
  build_model,
  losses,  # noqa: E402
  make_resnet,
)

CONFIGS = ('backbone', 'individual', 'full_avg', 'full_gem')


def build_loss_fn(name: str, args, pair_block: int | None = None):
  """(model, loss_fn(params, batch_stats, images, labels, key) -> scalar).

  `pair_block` overrides `--pair_block` for full_gem.
  """
  if name == 'backbone':
    model = make_resnet(args.depth, last_stride=1, non_local=args.non_local)

    def loss_fn(params, batch_stats, images, labels, key):
      del labels, key
      fmap, _ = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
      )[0]
      return jnp.mean(jnp.square(fmap.astype(jnp.float32)))

    return model, loss_fn
  settings = {
    'individual': dict(gcn='none', pooling='avg'),
    'full_avg': dict(pooling='avg'),
    'full_gem': dict(pooling='gem', pair_block=pair_block or args.pair_block or None),
  }[name]
  model = build_model(
    dict(depth=args.depth, non_local=args.non_local, adjacency=args.adjacency, **settings),
    args.num_classes,
  )

  def loss_fn(params, batch_stats, images, labels, key):
    outputs, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      rngs={'dropout': key},
      mutable=['batch_stats'],
    )
    return losses.total_loss(outputs, labels)[0]

  return model, loss_fn


def compile_config(name: str, args) -> dict:
  """Builds, compiles and warms up one configuration; returns its runner and static facts."""
  batch = args.identities * args.instances
  images = jax.random.uniform(jax.random.key(0), (batch, args.height, args.width, 3))
  labels = jnp.repeat(jnp.arange(args.identities), args.instances)
  model, loss_fn = build_loss_fn(name, args)
  variables = jax.jit(model.init)(jax.random.key(1), images[:2])
  params, batch_stats = variables['params'], variables['batch_stats']
  arguments = (params, batch_stats, images, labels, jax.random.key(2))
  start = time.perf_counter()
  lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(*arguments)
  step = lowered.compile()
  compile_s = time.perf_counter() - start
  if name == 'full_gem':  # count a lowering with all pair rows in one block: no loop
    lowered = jax.jit(jax.value_and_grad(build_loss_fn(name, args, batch)[1])).lower(*arguments)
  run = lambda key: jax.block_until_ready(step(params, batch_stats, images, labels, key))
  for _ in range(args.warmup):
    run(jax.random.key(2))
  return {
    'run': run,
    'batch': batch,
    'compile_s': compile_s,
    'gflop_per_step': flops_of(lowered) / 1e9,
    'num_params': sum(x.size for x in jax.tree.leaves(params)),
  }


def time_configs(names, args, peak: float) -> dict:
  """Times all configurations round-robin, so load from other processes hits all alike.

  `peak` is the device's float32 TFLOP/s, for MFU.
  """
  compiled = {}
  for name in names:
    compiled[name] = compile_config(name, args)
    print(f'compiled {name} in {compiled[name]["compile_s"]:.1f} s', flush=True)
  times = {name: [] for name in names}
  for i in range(args.steps):
    for name in names:
      start = time.perf_counter()
      compiled[name]['run'](jax.random.key(3 + i))
      times[name].append(time.perf_counter() - start)
    print(f'round {i + 1}: ' + ', '.join(f'{n} {times[n][-1]:.2f} s' for n in names), flush=True)
  results = {}
  for name in names:
    info = compiled[name]
    median = statistics.median(times[name])
    results[name] = {
      'step_time_s': median,
      'step_times_s': times[name],
      'images_per_s': info['batch'] / median,
      'compile_s': info['compile_s'],
      'gflop_per_step': info['gflop_per_step'],
      'mfu': info['gflop_per_step'] * 1e9 / median / (peak * 1e12),
      'num_params': info['num_params'],
    }
  return results


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'configs', ','.join(CONFIGS), 'Comma-separated configurations.', flag_values=flag_values
  )
  flags.DEFINE_integer('depth', 50, 'ResNet depth.', flag_values=flag_values)
  flags.DEFINE_integer('height', 256, 'Image height.', flag_values=flag_values)
  flags.DEFINE_integer('width', 128, 'Image width.', flag_values=flag_values)
  flags.DEFINE_integer('identities', 4, 'P', flag_values=flag_values)
  flags.DEFINE_integer('instances', 4, 'K', flag_values=flag_values)
  flags.DEFINE_integer(
    'num_classes', 751, 'Identities of the classifiers.', flag_values=flag_values
  )
  flags.DEFINE_string('adjacency', 'projected', 'Adjacency kind.', flag_values=flag_values)
  flags.DEFINE_boolean('non_local', False, 'official non-local backbone', flag_values=flag_values)
  flags.DEFINE_integer(
    'pair_block',
    0,
    'Pair rows per lax.map step for full_gem; 0 = the model default (one row); P*K = all '
    'pairs at once (more memory). FLOPs are counted on P*K whatever this is.',
    flag_values=flag_values,
  )
  flags.DEFINE_integer('steps', 3, 'Timed steps.', flag_values=flag_values)
  flags.DEFINE_integer('warmup', 1, 'Untimed steps first (compilation).', flag_values=flag_values)
  flags.DEFINE_string(
    'output',
    os.path.join(os.path.dirname(__file__), 'results', 'model_step.json'),
    'JSON report.',
    flag_values=flag_values,
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])

  load_before = os.getloadavg()[0]
  peak, peak_source = peak_tflops(jax.devices()[0], 'float32')
  results = time_configs(args.configs.split(','), args, peak)
  base = results.get('backbone')
  print(
    f'\n{"config":>11} | {"s/step":>7} | {"img/s":>6} | {"x time":>6} | {"GFLOP":>7} | '
    f'{"x FLOP":>6} | {"MFU":>6} | params'
  )
  print('-' * 81)
  for name, r in results.items():
    r['ratio_to_backbone'] = r['step_time_s'] / base['step_time_s'] if base else float('nan')
    r['flop_ratio_to_backbone'] = (
      r['gflop_per_step'] / base['gflop_per_step'] if base else float('nan')
    )
    print(
      f'{name:>11} | {r["step_time_s"]:7.2f} | {r["images_per_s"]:6.2f} | '
      f'{r["ratio_to_backbone"]:6.2f} | {r["gflop_per_step"]:7.1f} | '
      f'{r["flop_ratio_to_backbone"]:6.3f} | {r["mfu"] * 100:5.1f}% | {r["num_params"]:,}'
    )
  print(f'MFU against {peak:.3g} TFLOP/s float32 ({peak_source})')
  print(
    f'load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} '
    f'(2 cores; > 2 means other processes shared the CPU)'
  )
  report = {
    'command': ' '.join(['python', 'benchmarks/model_step.py'] + sys.argv[1:]),
    'settings': args.flag_values_dict() | {'batch': args.identities * args.instances},
    'load_average': {'before': load_before, 'after': os.getloadavg()[0]},
    'peak_tflops': {'float32': peak, 'source': peak_source},
    'platform': {
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'devices': [str(d) for d in jax.devices()],
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
    },
    'results': results,
  }
  save_report(report, args.output)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

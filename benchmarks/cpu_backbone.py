"""What XLA:CPU offers for the ResNet-50 train step, against torchvision's, in one run.

    python benchmarks/cpu_backbone.py                       # every variant, 2 rounds
    python benchmarks/cpu_backbone.py --variants=default,bf16,torchvision --rounds=1

Each variant is the backbone's forward and backward (ResNet-50, last stride
1 as in ReID, a sum-of-squares loss on the map, batch 16 at 256×128) in a
fresh process, since XLA reads its flags once per process: XLA flags
(oneDNN, XNNPACK and YNNPACK fusions, fast math, vector width), the
bfloat16 compute dtype (AVX-512 BF16 / AMX where the CPU has them), and
torchvision's resnet50 (last stride set to 1, the same loss) as the
reference. Variants run round-robin, `--rounds` times, so load from other
processes hits all alike; the figure is each variant's median step time.

Each JAX variant's gradient is compared with the default's: the largest
difference over the whole gradient relative to its largest magnitude (the
form of the parity tests' tolerances, which are 1e-4 to 1e-5 in float32).
A variant that is faster and stays within 1e-5 could be made the default.
Writes benchmarks/results/cpu_backbone.json.
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
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # noqa: E402
from cace_jax import cli  # noqa: E402
from cace_jax.errors import UserError  # noqa: E402
from cace_jax.models import make_resnet  # noqa: E402

# name: (XLA_FLAGS added to the default ones, compute dtype); 'torchvision' is PyTorch.
VARIANTS = {
  'default': ('', 'float32'),
  'bf16': ('', 'bfloat16'),
  'onednn': ('--xla_cpu_use_onednn=true', 'float32'),
  'onednn_bf16': ('--xla_cpu_use_onednn=true', 'bfloat16'),
  'onednn_custom_call': (
    '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true',
    'float32',
  ),
  'xnnpack': ('--xla_cpu_use_xnnpack=true', 'float32'),
  'ynn_dot_conv': ('--xla_cpu_experimental_ynn_fusion_type=dot,convolution', 'float32'),
  'fast_math': ('--xla_cpu_enable_fast_math=true', 'float32'),
  'vector_width_512': ('--xla_cpu_prefer_vector_width=512', 'float32'),
  'torchvision': (None, 'float32'),
}
BATCH, HEIGHT, WIDTH = 16, 256, 128


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_list('variants', list(VARIANTS), 'Variants to run.', flag_values=flag_values)
  flags.DEFINE_integer('rounds', 2, 'Round-robin rounds.', flag_values=flag_values)
  flags.DEFINE_integer('steps', 3, 'Timed steps per variant and round.', flag_values=flag_values)
  flags.DEFINE_string(
    'out', 'benchmarks/results/cpu_backbone.json', 'JSON report.', flag_values=flag_values
  )
  # Internal: a child process measures one variant.
  flags.DEFINE_string('child', None, 'Measure this variant (internal).', flag_values=flag_values)
  flags.DEFINE_string(
    'gradient_out', None, 'Where a child saves its gradient (internal).', flag_values=flag_values
  )


def images() -> np.ndarray:
  return np.random.default_rng(0).standard_normal((BATCH, HEIGHT, WIDTH, 3), np.float32)


def measure_jax(dtype: str, steps: int, gradient_out: str | None) -> dict:
  """Compile seconds and step times of the JAX backbone step; saves the flat gradient.

  XLA reads XLA_FLAGS when the first computation starts the backend: each
  variant runs in its own process (the parent computes nothing with JAX).
  """
  backbone = make_resnet(50, last_stride=1, non_local=False, dtype=jnp.dtype(dtype))
  x = jnp.asarray(images())
  variables = jax.jit(backbone.init)(jax.random.key(0), x[:2])

  def loss_fn(params):
    (fmap, _), _ = backbone.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=['batch_stats'],
    )
    return jnp.mean(jnp.square(fmap.astype(jnp.float32)))

  start = time.perf_counter()
  grad = jax.jit(jax.grad(loss_fn)).lower(variables['params']).compile()
  compile_s = time.perf_counter() - start
  gradient = jax.block_until_ready(grad(variables['params']))
  times = []
  for _ in range(steps):
    begin = time.perf_counter()
    jax.block_until_ready(grad(variables['params']))
    times.append(time.perf_counter() - begin)
  if gradient_out:
    np.save(gradient_out, np.concatenate([np.ravel(g) for g in jax.tree.leaves(gradient)]))
  return {'compile_s': compile_s, 'step_times_s': times}


def measure_torchvision(steps: int) -> dict:
  """Step times of torchvision's resnet50 trunk (last stride 1), the same loss."""
  import torch  # deferred: only this variant needs PyTorch
  import torchvision

  model = torchvision.models.resnet50()
  model.layer4[0].conv2.stride = (1, 1)
  model.layer4[0].downsample[0].stride = (1, 1)
  trunk = torch.nn.Sequential(*list(model.children())[:-2]).train()
  x = torch.from_numpy(images()).permute(0, 3, 1, 2).contiguous()

  def step():
    trunk.zero_grad(set_to_none=True)
    torch.mean(trunk(x) ** 2).backward()

  step()  # warm-up (oneDNN primitive creation)
  times = []
  for _ in range(steps):
    begin = time.perf_counter()
    step()
    times.append(time.perf_counter() - begin)
  return {'compile_s': 0.0, 'step_times_s': times, 'torch': torch.__version__}


def run_child(name: str, steps: int, gradient_out: str) -> dict:
  """One variant in a fresh process with its XLA flags; its measurement."""
  extra, _ = VARIANTS[name]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env['XLA_FLAGS'] = ' '.join(f for f in (os.environ.get('XLA_FLAGS', ''), extra or '') if f)
  result = subprocess.run(
    [
      sys.executable,
      os.path.abspath(__file__),
      f'--child={name}',
      f'--steps={steps}',
      f'--gradient_out={gradient_out}',
    ],
    capture_output=True,
    text=True,
    env=env,
  )
  if result.returncode != 0:  # XLA answers a bad flag with its whole usage: find the reason
    lines = result.stderr.strip().splitlines() or ['no output']
    reasons = [line for line in lines if 'error' in line.lower() or 'unknown' in line.lower()]
    return {'failed': (reasons or lines)[-1].strip()[:300]}
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  unknown = sorted(set(args.variants) - set(VARIANTS))
  if unknown:
    raise UserError(f'--variants={unknown[0]}: expected some of {", ".join(VARIANTS)}')
  if args.child:
    dtype = VARIANTS[args.child][1]
    if args.child == 'torchvision':
      row = measure_torchvision(args.steps)
    else:
      row = measure_jax(dtype, args.steps, args.gradient_out)
    print(json.dumps(row))
    return
  load_before = os.getloadavg()[0]
  rows = {name: {'step_times_s': [], 'compile_s': []} for name in args.variants}
  with tempfile.TemporaryDirectory(prefix='cpu_backbone_') as scratch:
    for round_index in range(args.rounds):
      for name in args.variants:
        measured = run_child(name, args.steps, os.path.join(scratch, f'{name}.npy'))
        if 'failed' in measured:
          rows[name]['failed'] = measured['failed']
          continue
        rows[name]['step_times_s'] += measured['step_times_s']
        rows[name]['compile_s'].append(measured['compile_s'])
        print(
          f'round {round_index + 1} {name}: '
          f'{statistics.median(measured["step_times_s"]):.2f} s/step',
          flush=True,
        )
    reference = os.path.join(scratch, 'default.npy')
    for name, row in rows.items():
      if not row['step_times_s']:
        continue
      row['step_s'] = statistics.median(row['step_times_s'])
      row['images_per_s'] = BATCH / row['step_s']
      gradient = os.path.join(scratch, f'{name}.npy')
      if name != 'torchvision' and os.path.exists(reference) and os.path.exists(gradient):
        a, b = np.load(gradient), np.load(reference)
        row['gradient_relative_difference'] = float(np.abs(a - b).max() / np.abs(b).max())
  base = {key: rows[key].get('step_s') for key in ('default', 'torchvision') if key in rows}
  print(
    f'\n{"variant":>20} | {"s/step":>7} | {"img/s":>6} | {"× default":>9} | '
    f'{"× torchvision":>13} | grad rel. diff'
  )
  for name, row in rows.items():
    if 'step_s' not in row:
      print(f'{name:>20} | failed: {row.get("failed", "no measurement")}')
      continue
    for key, reference_s in base.items():
      if reference_s:
        row[f'speed_over_{key}'] = reference_s / row['step_s']
    difference = row.get('gradient_relative_difference')
    print(
      f'{name:>20} | {row["step_s"]:7.2f} | {row["images_per_s"]:6.2f} | '
      f'{row.get("speed_over_default", float("nan")):9.2f} | '
      f'{row.get("speed_over_torchvision", float("nan")):13.2f} | '
      + ('' if difference is None else f'{difference:.1e}')
    )
  report = {
    'command': ' '.join(['python', 'benchmarks/cpu_backbone.py'] + sys.argv[1:]),
    'shape': {'batch': BATCH, 'height': HEIGHT, 'width': WIDTH},
    'variants': {
      name: {'xla_flags': VARIANTS[name][0], 'dtype': VARIANTS[name][1]} for name in args.variants
    },
    'results': rows,
    'load_average': {'before': load_before, 'after': os.getloadavg()[0]},
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
  }
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

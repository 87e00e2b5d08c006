"""End-to-end training throughput (images/s, input pipeline included), saved as JSON.

  python benchmarks/train_throughput.py            # synthetic demo + reduced market config

Runs the real training loop (`train_lib.train_and_evaluate`, evaluation off)
for a few steps per configuration and reads the throughput it logs after the
first logging interval (which absorbs compilation). "market_reduced" is the
paper's model (ResNet-50, GeM, non-local blocks, projected-cosine graph, batch
4×4) at 256×128 on the synthetic images, since Market-1501 cannot be
downloaded here; per-image cost does not depend on which pedestrians are shown.
MFU is XLA's FLOP count of the same step (`common.train_step_flops`) at the
measured rate over the device's peak (a datasheet figure, or on a CPU a
measured matrix product).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile

from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # pylint: disable=wrong-import-position
  peak_tflops,
  save_report,
  train_step_flops,
)
from cace_jax import sharding  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.runs import checkpoint  # pylint: disable=wrong-import-position
from cace_jax.train import train_lib  # pylint: disable=wrong-import-position
from configs import market, synthetic  # pylint: disable=wrong-import-position


def measure(config, steps: int, warmup: int) -> dict:
  """Images/s over steps warmup+1 .. warmup+steps of a fresh run, and its MFU."""
  config.train.num_steps = warmup + steps
  config.train.log_every = warmup
  config.train.eval_every_epochs = 0
  config.train.eval_at_end = False  # evaluation is not timed
  config.train.checkpoint_every = 10**9
  workdir = tempfile.mkdtemp(prefix='train_throughput_')
  try:
    train_lib.train_and_evaluate(config, workdir)
    rows = [
      json.loads(line) for line in open(os.path.join(workdir, 'train.log')) if line.startswith('{')
    ]
    num_classes = checkpoint.read_checkpoint(workdir)[2].num_classes  # the final step's
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  timed = [r for r in rows if r['split'] == 'train' and r['step'] == warmup + steps][-1]
  mesh = sharding.make_mesh()
  per_device = config.data.p * config.data.k
  flops = train_step_flops(config, config.model, num_classes, per_device, mesh)
  peak, peak_source = peak_tflops(jax.devices()[0], config.model.dtype)
  step_s = per_device * mesh.size / timed['images_per_s']
  return {
    'images_per_s': timed['images_per_s'],
    'gflop_per_device_step': flops / 1e9,
    'mfu': flops / step_s / (peak * 1e12),
    'peak_tflops': peak,
    'peak_source': peak_source,
  }


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_integer('steps', 20, 'Timed steps.', flag_values=flag_values)
  flags.DEFINE_integer('warmup', 3, 'Untimed steps first (compilation).', flag_values=flag_values)
  flags.DEFINE_integer(
    'market_steps', 3, 'Timed steps of the reduced market config.', flag_values=flag_values
  )
  flags.DEFINE_string(
    'out', 'benchmarks/results/train_throughput.json', 'JSON report.', flag_values=flag_values
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])

  demo = synthetic.get_config()
  reduced = market.get_config()
  reduced.data.dataset = 'synthetic_details'
  reduced.data.image_size = (256, 128)
  results = {
    'synthetic_demo': measure(demo, args.steps, args.warmup),
    'market_reduced_256x128': measure(reduced, args.market_steps, 2),
  }
  report = {
    'images_per_s': {name: row['images_per_s'] for name, row in results.items()},
    'mfu': {name: row['mfu'] for name, row in results.items()},
    'details': results,
    'devices': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'jax': jax.__version__,
    'steps': args.steps,
  }
  for name, row in results.items():
    print(
      f'{name:>24}: {row["images_per_s"]:7.2f} images/s (training, input pipeline included), '
      f'{row["gflop_per_device_step"]:.1f} GFLOP/step, MFU {row["mfu"] * 100:.1f}% '
      f'of {row["peak_tflops"]:.3g} TFLOP/s ({row["peak_source"]})'
    )
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

"""End-to-end training throughput (images/s, input pipeline included), saved as JSON.

  python benchmarks/train_throughput.py            # synthetic demo + reduced market config

Runs the real training loop (`train_lib.train_and_evaluate`, evaluation off)
for a few steps per configuration and reads the throughput it logs after the
first logging interval (which absorbs compilation). "market_reduced" is the
paper's model (ResNet-50, GeM, non-local blocks, projected-cosine graph, batch
4×4) at 256×128 on the synthetic images, since Market-1501 cannot be
downloaded here; per-image cost does not depend on which pedestrians are shown.
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
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import cli, train_lib  # pylint: disable=wrong-import-position
from configs import market, synthetic  # pylint: disable=wrong-import-position


def measure(config, steps: int, warmup: int) -> float:
  """Images/s over steps warmup+1 .. warmup+steps of a fresh run."""
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
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  timed = [r for r in rows if r['split'] == 'train' and r['step'] == warmup + steps]
  return timed[-1]['images_per_s']


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
    'images_per_s': results,
    'devices': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'jax': jax.__version__,
    'steps': args.steps,
  }
  for name, value in results.items():
    print(f'{name:>24}: {value:7.2f} images/s (training, input pipeline included)')
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

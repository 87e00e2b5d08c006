"""Which part of the training loop holds on to host memory? RSS of one part, in this process.

  python benchmarks/memory_parts.py --part=pipeline --steps 12000
  python benchmarks/memory_parts.py --part=step --steps 5000
  python benchmarks/memory_parts.py --part=checkpoint --steps 600
  python benchmarks/memory_parts.py --part=spec_json --steps 20000

`benchmarks/memory_growth.py` measures a whole `train.py` run; this one
runs a single part of its loop on configs/tiny.py (one device) and fits
the RSS slope the same way (MiB per 1000 steps, the first quarter left out):

- `pipeline`: the tf.data training stream alone, batch after batch to numpy.
- `step`: one fixed batch made a global array every step (the device
  transfer) and the jitted train step, its metrics fetched, as train.py does.
- `checkpoint`: saving the train state with the run's CheckpointManager
  (keep the last 3), once per "step" here; train.py saves at every epoch end
  (every 14 steps of configs/tiny.py on one device) and every
  `train.checkpoint_every` steps.
- `spec_json`: the one tensorstore call the checkpoint part's retained
  Python objects were traced to (tracemalloc): `ts.KvStore.Spec(...).to_json()`,
  which orbax calls while writing each array. tensorstore 0.1.72, 0.1.80 and
  0.1.86 keep every dict it returns alive (4 Python blocks per call); CPython
  does not track such dicts of strings, so `gc` cannot find or free them.

Besides RSS, each part reports the slope of `sys.getallocatedblocks()` after
`gc.collect()`: live Python objects, which tell a Python-level leak from
allocator or C++ growth.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np
import tensorstore as ts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # noqa: E402
from benchmarks.memory_growth import fit_slope, read_rss_mib  # noqa: E402
from cace_jax import sharding  # noqa: E402
from cace_jax.commands import cli  # noqa: E402
from cace_jax.data import (
  pipeline,  # noqa: E402
  split_data,
)
from cace_jax.models import build_model  # noqa: E402
from cace_jax.runs import checkpoint  # noqa: E402
from cace_jax.train import train_step  # noqa: E402
from configs import tiny  # noqa: E402

PARTS = ('pipeline', 'step', 'checkpoint', 'spec_json')


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_enum('part', 'pipeline', PARTS, 'The part of the loop.', flag_values=flag_values)
  flags.DEFINE_integer('steps', 5000, 'Batches or steps.', flag_values=flag_values)
  flags.DEFINE_string('data_dir', 'data', 'TFDS records.', flag_values=flag_values)
  flags.DEFINE_string('out', None, 'JSON report (default: none).', flag_values=flag_values)


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  cli.init_distributed()
  if args.part == 'spec_json':
    spec = {'driver': 'file', 'path': '/tmp/x/'}
    report_slopes(args, lambda step: ts.KvStore.Spec(spec).to_json(), 1000)
    return
  config = tiny.get_config()
  config.data.data_dir = args.data_dir
  data = config.data
  splits = split_data.load_training_splits(split_data.prepare_datasets(config), data)
  stream = pipeline.iterate_numpy(
    pipeline.create_train_dataset(splits.train, data, seed=0, num_devices=1, local_devices=1)
  )
  if args.part in ('step', 'checkpoint'):
    mesh = sharding.make_mesh()
    model = build_model(config.model, len(np.unique(splits.train.labels)))
    tx, schedule = train_step.create_optimizer(config, 14, data.p * data.k)
    state = sharding.replicate(train_step.init_state(model, tx, data.image_size, 0), mesh)
    step_fn = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
    first = next(stream)
    local = {'image': first['image'], 'label': first['label']}
  if args.part == 'checkpoint':
    workdir = tempfile.mkdtemp(prefix='memory_parts_')
    manager = checkpoint.create_manager(workdir, keep_last=3)
  if args.part == 'pipeline':
    run = lambda step: next(stream)  # noqa: E731
  elif args.part == 'checkpoint':
    run = lambda step: checkpoint.save_checkpoint(manager, step + 1, state, {'step': step + 1})  # noqa: E731
  else:

    def run(step):
      nonlocal state
      state, metrics = step_fn(state, sharding.global_batch(local, mesh))
      jax.device_get(metrics)

  report_slopes(args, run, 10 if args.part == 'checkpoint' else 100)
  if args.part == 'checkpoint':
    manager.close()
    shutil.rmtree(workdir, ignore_errors=True)


def report_slopes(args: flags.FlagValues, run, sample_every: int) -> None:
  """Calls `run(step)` args.steps times; fits RSS and live Python blocks per 1000 calls."""
  pid, samples, start = os.getpid(), [], time.time()
  for step in range(args.steps):
    run(step)
    if step % sample_every == 0:
      gc.collect()
      samples.append((step, read_rss_mib(pid), sys.getallocatedblocks()))
  steps, rss, blocks = (np.array(column, np.float64) for column in zip(*samples))
  in_fit = steps >= args.steps // 4
  slope, noise = fit_slope(steps[in_fit], rss[in_fit])
  block_slope, _ = fit_slope(steps[in_fit], blocks[in_fit])
  report = {
    'part': args.part,
    'steps': args.steps,
    'seconds': round(time.time() - start, 1),
    'rss_mib_fit_start': round(float(rss[in_fit][0]), 1),
    'rss_mib_fit_end': round(float(rss[-1]), 1),
    'slope_mib_per_1000_steps': round(slope, 2),
    'residual_std_mib': round(noise, 2),
    'python_blocks_per_step': round(block_slope / 1000, 2),
  }
  print(
    f'{args.part}: {args.steps} in {report["seconds"]} s; RSS {report["rss_mib_fit_start"]} → '
    f'{report["rss_mib_fit_end"]} MiB, slope {slope:+.2f} MiB per 1000 (residual std {noise:.2f}); '
    f'live Python blocks {block_slope / 1000:+.2f} per step'
  )
  if args.out:
    save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

"""Host memory over a long run: does RSS stay flat? (issue 15, "long runs")

  python benchmarks/memory_growth.py --steps 4000 [--out benchmarks/results/memory_growth.json]

Trains configs/tiny.py for --steps steps in a child `train.py` (periodic
evaluation every --eval_every_epochs epochs, logging every 10 steps, the
usual checkpoints), samples the child's resident set size every
--interval seconds from /proc, and fits a line to RSS against the step the
run has reached (read from its train.log). The first --warmup_fraction of
the steps is left out of the fit (compilation, the first evaluation and
allocator pools grow memory once), and so is the final evaluation. A leak
in the input pipeline, logging or periodic evaluation shows as a slope that
does not vanish; the report gives it in MiB per 1000 steps, with the RSS at
the start and end of the fit.
Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from benchmarks.common import save_report  # noqa: E402
from cace_jax.commands import cli  # noqa: E402
from cace_jax.errors import RunFailure  # noqa: E402


def read_rss_mib(pid: int) -> float | None:
  """Resident set size of process `pid` in MiB, or None once it has exited."""
  try:
    with open(f'/proc/{pid}/status', encoding='utf-8') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024
  except (FileNotFoundError, ProcessLookupError):
    return None
  return None


def last_logged_step(log_path: str) -> int:
  """The newest step of a 'train' scalar line in train.log (0 before the first)."""
  if not os.path.exists(log_path):
    return 0
  step = 0
  with open(log_path, encoding='utf-8') as f:
    for line in f:
      if line.startswith('{') and '"split": "train"' in line:
        step = json.loads(line)['step']
  return step


def fit_slope(steps: np.ndarray, rss: np.ndarray) -> tuple[float, float]:
  """Least-squares slope of RSS (MiB) per 1000 steps, and the residual std (MiB)."""
  slope, intercept = np.polyfit(steps / 1000.0, rss, 1)
  residual = rss - (slope * steps / 1000.0 + intercept)
  return float(slope), float(residual.std())


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_integer('steps', 4000, 'Training steps of configs/tiny.py.', flag_values=flag_values)
  flags.DEFINE_integer(
    'eval_every_epochs', 20, 'Periodic evaluation (14 steps per epoch).', flag_values=flag_values
  )
  flags.DEFINE_integer(
    'log_every', 10, 'train.log_every (logging is one suspect of a leak).', flag_values=flag_values
  )
  flags.DEFINE_float('interval', 1.0, 'Seconds between RSS samples.', flag_values=flag_values)
  flags.DEFINE_float(
    'warmup_fraction',
    0.25,
    'Leading share of the steps left out of the fit.',
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    'data_dir', os.path.join(ROOT, 'data'), 'TFDS records.', flag_values=flag_values
  )
  flags.DEFINE_string(
    'out',
    os.path.join(ROOT, 'benchmarks/results/memory_growth.json'),
    'JSON report.',
    flag_values=flag_values,
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  workdir = tempfile.mkdtemp(prefix='memory_growth_')
  command = [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config',
    os.path.join(ROOT, 'configs/tiny.py'),
    '--workdir',
    workdir,
    f'--config.data.data_dir={args.data_dir}',
    f'--config.train.num_steps={args.steps}',
    f'--config.train.eval_every_epochs={args.eval_every_epochs}',
    f'--config.train.log_every={args.log_every}',
    '--config.train.checkpoint_every=500',
    '--config.eval.diagnostics=False',
  ]
  start = time.time()
  # stderr to a file, not a pipe: the progress bar would fill a pipe nobody reads and block.
  stderr_path = os.path.join(workdir, 'stderr.txt')
  with open(stderr_path, 'wb') as stderr_file:
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr_file)
  samples = []  # (seconds, step, rss MiB)
  log_path = os.path.join(workdir, 'train.log')
  while child.poll() is None:
    rss = read_rss_mib(child.pid)
    if rss is not None:
      samples.append((time.time() - start, last_logged_step(log_path), rss))
    time.sleep(args.interval)
  with open(stderr_path, encoding='utf-8', errors='replace') as f:
    stderr = f.read()
  shutil.rmtree(workdir, ignore_errors=True)
  if child.returncode != 0:
    last = (stderr.strip().splitlines() or ['(no output)'])[-1]
    raise RunFailure(f'train.py exited {child.returncode}: {last}')

  seconds, steps, rss = (np.array(column, np.float64) for column in zip(*samples))
  # The final evaluation (after the last step) compiles new programs: not part of the trend.
  in_fit = (steps >= args.warmup_fraction * args.steps) & (steps < args.steps)
  slope, noise = fit_slope(steps[in_fit], rss[in_fit])
  report = {
    'command': ' '.join(command),
    'steps': args.steps,
    'seconds': round(float(seconds[-1]), 1),
    'samples': len(samples),
    'fit_from_step': int(steps[in_fit][0]),
    'rss_mib_peak': round(float(rss.max()), 1),
    'rss_mib_fit_start': round(float(rss[in_fit][0]), 1),
    'rss_mib_fit_end': round(float(rss[in_fit][-1]), 1),
    'slope_mib_per_1000_steps': round(slope, 2),
    'residual_std_mib': round(noise, 2),
    'trace': [[round(t, 1), int(s), round(r, 1)] for t, s, r in samples],
  }
  print(
    f'{args.steps} steps in {report["seconds"]} s; RSS {report["rss_mib_fit_start"]} → '
    f'{report["rss_mib_fit_end"]} MiB over steps {report["fit_from_step"]}-{args.steps}: '
    f'slope {slope:+.2f} MiB per 1000 steps (residual std {noise:.2f} MiB), peak '
    f'{report["rss_mib_peak"]} MiB'
  )
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

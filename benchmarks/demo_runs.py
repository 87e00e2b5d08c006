"""The demo's wall time with jaxlib's CPU defaults and with cace_jax's, and its determinism.

    python benchmarks/demo_runs.py --runs /tmp/demo_runs      # ~20 min on 2 cores

Trains `configs/synthetic.py` (what `make demo` runs: train.py with its final
evaluation) three times, one after another, each into a fresh workdir under
--runs: once with `CACE_JAX_DEFAULT_XLA_FLAGS=0` (convolutions on YNNPACK, as
jaxlib does by default) and twice with cace_jax's default. The dataset is
prepared first, so the times are training and evaluation only. Reports each
run's wall time, whether the two default runs wrote the same train.log
(every logged step, timings left out) and the demo's results table and
diagnostics. Writes --out (JSON).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # noqa: E402
from cace_jax import xla_flags  # noqa: E402
from cace_jax.commands import cli  # noqa: E402
from cace_jax.errors import RunFailure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/synthetic.py'
# name: environment changes
RUNS = {
  'ynnpack': {xla_flags.OPT_OUT: '0'},
  'default': {},
  'default_again': {},
}
TIMING_KEYS = ('images_per_s', 'steps_per_s', 'seconds', 'time')


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('runs', None, 'Directory for the three workdirs.', flag_values=flag_values)
  flags.DEFINE_string(
    'out', 'benchmarks/results/demo.json', 'JSON report.', flag_values=flag_values
  )
  flags.mark_flags_as_required(['runs'], flag_values=flag_values)


def logged_steps(workdir: str) -> list[dict]:
  """train.log's JSON records without their timings (which differ run to run)."""
  records = []
  with open(os.path.join(workdir, 'train.log'), encoding='utf-8') as f:
    for line in f:
      if not line.startswith('{'):  # the dated text lines
        continue
      record = json.loads(line)
      records.append({k: v for k, v in record.items() if not k.endswith(TIMING_KEYS)})
  return records


def train(workdir: str, env_changes: dict) -> float:
  env = {k: v for k, v in os.environ.items() if k not in (xla_flags.OPT_OUT, 'XLA_FLAGS')}
  env.update(env_changes)
  start = time.perf_counter()
  result = subprocess.run(
    [sys.executable, 'train.py', '--config', CONFIG, '--workdir', workdir],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  if result.returncode != 0:
    raise RunFailure(f'{workdir}: train.py failed: {result.stderr.strip().splitlines()[-1:]}')
  return time.perf_counter() - start


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  subprocess.run(
    [sys.executable, 'tools/prepare.py', '--dataset', 'synthetic_details'], cwd=ROOT, check=True
  )
  report = {
    'command': ' '.join(['python', 'benchmarks/demo_runs.py'] + sys.argv[1:]),
    'config': CONFIG,
    'date': time.strftime('%Y-%m-%d'),
    'machine': platform.machine(),
    'processor': platform.processor(),
    'cpu_count': os.cpu_count(),
    'runs': {},
  }
  for name, env_changes in RUNS.items():
    workdir = os.path.abspath(os.path.join(args.runs, name))
    shutil.rmtree(workdir, ignore_errors=True)
    wall_s = train(workdir, env_changes)
    with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as f:
      saved = json.load(f)
    report['runs'][name] = {
      'environment': env_changes,
      'wall_s': wall_s,
      'results': saved['results'],
      'diagnostics': saved.get('diagnostics', {}),
      'stage2_k': saved.get('info', {}).get('stage2_k'),
    }
    print(f'{name}: {wall_s:.0f} s', flush=True)
  directory = lambda name: os.path.join(args.runs, name)
  report['train_log_identical'] = logged_steps(directory('default')) == logged_steps(
    directory('default_again')
  )
  report['logged_steps'] = len(logged_steps(directory('default')))
  print(f'train.log identical in the two default runs: {report["train_log_identical"]}')
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

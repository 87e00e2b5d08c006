"""How evaluation's work divides over processes: eval.py in one process and in two, timed.

  python train.py --config configs/synthetic.py --workdir /tmp/mh \
    --config.train.num_steps=2 --config.train.eval_at_end=False
  python benchmarks/multihost_eval.py --config configs/synthetic.py --workdir /tmp/mh

Runs `eval.py` on the latest checkpoint of --workdir as one process on one
core, and as two processes (one core each, joined over gloo as on a
multi-host job) on copies of the run, alternating, after one untimed run of
each that fills a shared compilation cache. Each process has one CPU device
and is pinned to its own core with `taskset`, so a process's wall time is
its own work: with the work split, the two-process time should approach
half the one-process time, less what does not divide (start-up, restoring,
compiling, gathering, ranking on every process).

Reports the median wall time of each, their ratio, what `results.json`
records of each process (`stage2_pairs_scored_by_process`,
`gallery_cache_rows_by_process`, `seconds_by_process` of stage 1 and of
pair scoring) and whether both give the same metrics.
Extra arguments after `--` go to eval.py (e.g. `-- --config.eval.stage2_k=100`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.errors import RunFailure, UserError  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('config', None, 'Config file, as for eval.py.', flag_values=flag_values)
  flags.DEFINE_string(
    'workdir', None, 'A training run directory (its latest checkpoint).', flag_values=flag_values
  )
  flags.DEFINE_integer('repeats', 3, 'Timed runs of each layout.', flag_values=flag_values)
  flags.DEFINE_string(
    'out', 'benchmarks/results/multihost_eval.json', 'JSON report.', flag_values=flag_values
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def eval_command(config: str, workdir: str, extra: list[str]) -> list[str]:
  return [sys.executable, 'eval.py', '--config', config, '--workdir', workdir, *extra]


def run_pinned(commands: list[list[str]], env: dict) -> float:
  """Runs each command on its own core (process i on core i) at once; the wall time of all."""
  start = time.perf_counter()
  processes = [
    subprocess.Popen(
      ['taskset', '-c', str(core), *command],
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for core, command in enumerate(commands)
  ]
  failures = []
  for process in processes:
    _, stderr = process.communicate()
    if process.returncode:
      failures.append(stderr.strip().splitlines()[-1] if stderr.strip() else '(no output)')
  if failures:
    raise RunFailure(f'eval.py failed: {failures[0]}')
  return time.perf_counter() - start


def one_process(config: str, workdir: str, extra: list[str]) -> list[list[str]]:
  return [eval_command(config, workdir, extra)]


def two_processes(config: str, workdir: str, extra: list[str]) -> list[list[str]]:
  address = f'--coordinator_address=127.0.0.1:{free_port()}'
  return [
    eval_command(config, workdir, extra) + [address, '--num_processes=2', f'--process_id={i}']
    for i in range(2)
  ]


def main(args: flags.FlagValues, positional: list[str]) -> None:
  extra = list(positional)  # what follows `--` is for eval.py
  if os.cpu_count() < 2:
    raise UserError('needs at least 2 cores (one per process)')
  if not os.path.isdir(os.path.join(args.workdir, 'checkpoints')):
    raise UserError(f'no checkpoints/ in --workdir={args.workdir}: train a run first')
  scratch = tempfile.mkdtemp(prefix='multihost_eval_')
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    JAX_COMPILATION_CACHE_DIR=os.path.join(scratch, 'jax_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  layouts = {'one_process': one_process, 'two_processes': two_processes}
  workdirs = {name: os.path.join(scratch, name) for name in layouts}
  try:
    for workdir in workdirs.values():  # a copy each: each run writes its own results.json
      shutil.copytree(
        os.path.join(args.workdir, 'checkpoints'), os.path.join(workdir, 'checkpoints')
      )
    seconds = {name: [] for name in layouts}
    for round_ in range(args.repeats + 1):  # round 0 fills the compilation cache, untimed
      for name, commands in layouts.items():
        took = run_pinned(commands(args.config, workdirs[name], extra), env)
        print(f'{name:>14} run {round_}: {took:6.1f} s' + (' (untimed)' if not round_ else ''))
        if round_:
          seconds[name].append(took)
    reports = {}
    for name, workdir in workdirs.items():
      with open(os.path.join(workdir, 'results.json'), encoding='utf-8') as f:
        reports[name] = json.load(f)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  one, two = (reports[name]['results'] for name in layouts)
  differences = [
    abs(one[row][metric] - two[row][metric]) for row in one for metric in one[row] if row in two
  ]
  median = {name: float(np.median(times)) for name, times in seconds.items()}
  report = {
    'config': args.config,
    'workdir': args.workdir,
    'eval_arguments': extra,
    'seconds': seconds,
    'median_seconds': median,
    'two_over_one': median['two_processes'] / median['one_process'],
    'info': {name: r['info'] for name, r in reports.items()},
    'largest_metric_difference': max(differences) if differences else None,
  }
  print(
    f'\n{"layout":>14} {"median s":>9} {"pairs scored":>16} {"gallery rows":>12} '
    f'{"stage-1 s":>14} {"pair-scoring s":>14}   (the last run; lists by process)'
  )
  for name, r in reports.items():
    info = r['info']
    pairs = info.get('stage2_pairs_scored_by_process', [])
    rows = info.get('gallery_cache_rows_by_process', [])
    timed = {
      phase: '[' + ', '.join(f'{s:.1f}' for s in info['seconds_by_process'].get(phase, [])) + ']'
      for phase in ('stage1', 'stage2_pairs')
    }
    print(
      f'{name:>14} {median[name]:9.1f} {str(pairs):>16} {str(rows):>12} '
      f'{timed["stage1"]:>14} {timed["stage2_pairs"]:>14}'
    )
  print(
    f'two processes / one: {report["two_over_one"]:.2f} of the wall time; '
    f'largest metric difference {report["largest_metric_difference"]}'
  )
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

"""The device layout and the command line every entry point shares."""

from __future__ import annotations

from absl import flags
import jax
import numpy as np

from cace_jax import sharding
from cace_jax.commands import cli
from cace_jax.errors import ConfigError


def test_global_batch_gives_each_device_its_block_of_rows():
  mesh = sharding.make_mesh()
  rows = np.arange(4 * 3 * 2, dtype=np.float32).reshape(12, 2)  # 4 devices × 3 rows
  batch = sharding.global_batch({'x': rows}, mesh)
  assert batch['x'].shape == (12, 2)
  for shard in batch['x'].addressable_shards:
    device = list(mesh.devices.flat).index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), rows[3 * device : 3 * (device + 1)])


def test_prefetch_keeps_order_and_reads_only_two_ahead():
  mesh = sharding.make_mesh()
  fetched = []

  def local_batches():
    for i in range(5):
      fetched.append(i)
      yield {'x': np.full((4, 1), i, np.float32)}

  stream = sharding.prefetch_to_device(local_batches(), mesh, size=2)
  first = next(stream)
  assert fetched == [0, 1] and isinstance(first['x'], jax.Array)
  rest = [int(np.asarray(b['x'])[0, 0]) for b in stream]
  assert [int(np.asarray(first['x'])[0, 0])] + rest == [0, 1, 2, 3, 4]


def define_flags(flag_values):
  flags.DEFINE_integer('count', 1, 'A number.', flag_values=flag_values)


def test_cli_run_reports_bad_input_in_one_line(capsys):
  calls = []

  def main(args, positional):
    cli.expect_arguments(positional, ['NAME'])
    if args.count < 0:
      raise ConfigError(f'count={args.count}: expected >= 0')
    calls.append((args.count, positional))

  assert cli.run(['prog', 'a', '--count=3'], define_flags, main) == 0
  assert calls == [(3, ['a'])]
  for argv, message in (
    (['prog', 'a', '--count=x'], '--count'),
    (['prog', 'a', '--bogus'], 'bogus'),
    (['prog'], 'expected positional arguments: NAME'),
    (['prog', 'a', '--count=-1'], 'count=-1: expected >= 0'),
  ):
    assert cli.run(argv, define_flags, main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert cli.run(['prog', '--help'], define_flags, main, 'usage: prog NAME') == 0
  assert 'usage: prog NAME' in capsys.readouterr().out and len(calls) == 1

"""Accuracy and cost of stage 2 as a function of K, on a trained checkpoint; printed and saved.

  python benchmarks/stage2_k.py --config configs/synthetic.py --workdir runs/synthetic
  python benchmarks/stage2_k.py --config configs/market.py --workdir runs/market --ks 5,10,20,50

Extracts the query/gallery features once, then re-sorts each query's top-K
gallery images by the conditional distance (and by clue alignment) for every
K, reporting Rank-1/5/10, mAP, mINP and the stage-2 seconds per query.

With `data.validation_ids` (configs/synthetic_pairs.py) it measures on the
validation split carved from the training identities, which is where K
should be chosen (training runs with one do so themselves, with the mix w
too); without one it measures on the test split, which reports cost and
accuracy but must not be used to choose. `eval.stage2_k`'s default (5) was
set from this script's test-split figures on the demo before the validation
split existed.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import sharding  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.data import (
  pipeline,  # pylint: disable=wrong-import-position
  split_data,
)
from cace_jax.evaluation import command, metrics, ranking, stage1, stage2, two_stage  # pylint: disable=wrong-import-position
from cace_jax.runs import checkpoint  # pylint: disable=wrong-import-position


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'workdir', None, 'The training run directory (its latest checkpoint).', flag_values=flag_values
  )
  flags.DEFINE_string('ks', '1,3,5,10,20,50', 'Comma-separated K values.', flag_values=flag_values)
  flags.DEFINE_string(
    'out', 'benchmarks/results/stage2_k.json', 'JSON report.', flag_values=flag_values
  )
  config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py[:arg]).', flag_values=flag_values, lock_config=True
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  config = args.config
  ks = [int(k) for k in args.ks.split(',')]
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(args.workdir, None, config.model, mesh)
  builder = split_data.prepare_on_first_process(config)
  if config.data.validation_ids:
    command.check_held_out(config, run.config, args.workdir)
    query, gallery = split_data.load_training_splits(builder, config.data).validation
  else:
    query, gallery = split_data.load_eval_splits(builder, config.data.dataset)
  embed = lambda data: stage1.embed_batches(
    run.model,
    run.variables,
    pipeline.eval_batches(data, config.data),
    len(data),
    config,
    mesh,
  )
  (q_emb, q_cache, _), (g_emb, g_cache, _) = embed(query), embed(gallery)
  distmat = metrics.cosine_distance(q_emb, g_emb)
  rank = lambda d: ranking.measure(d, query, gallery)[0]

  report = {
    'workdir': args.workdir,
    'step': run.step,
    'dataset': config.data.dataset,
    'split': 'validation' if config.data.validation_ids else 'test',
    'num_query': len(query),
    'num_gallery': len(gallery),
    'individual': rank(distmat),
    'rows': {},
  }
  for row, score in stage2.pair_scorers(q_cache).items():
    pair_distances = stage2.make_pair_distances(
      run.model, run.variables, score, q_cache, g_cache, mesh
    )
    two_stage.TwoStageRanker(distmat[:1], pair_distances, 1)  # compile, untimed
    report['rows'][row] = {}
    for k in ks:
      start = time.perf_counter()
      resorted = two_stage.TwoStageRanker(distmat, pair_distances, k).distances(k)
      seconds = (time.perf_counter() - start) / len(query)
      report['rows'][row][k] = {**rank(resorted), 'stage2_s_per_query': seconds}

  header = f'{"":>16} {"K":>4} {"R-1":>7} {"R-5":>7} {"mAP":>7} {"mINP":>7} {"ms/query":>9}'
  print(f'{config.data.dataset} ({report["split"]}), {args.workdir} step {run.step}\n{header}')
  ind = report['individual']
  print(
    f'{"individual":>16} {"-":>4} {ind["rank1"]:7.2f} {ind["rank5"]:7.2f} '
    f'{ind["mAP"]:7.2f} {ind["mINP"]:7.2f}'
  )
  for row, by_k in report['rows'].items():
    for k, r in by_k.items():
      print(
        f'{row:>16} {k:>4} {r["rank1"]:7.2f} {r["rank5"]:7.2f} {r["mAP"]:7.2f} '
        f'{r["mINP"]:7.2f} {r["stage2_s_per_query"] * 1e3:9.2f}'
      )
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))

"""Accuracy and cost of stage 2 as a function of K, on a trained checkpoint; printed and saved.

  python benchmarks/stage2_k.py --config configs/synthetic.py --workdir runs/synthetic
  python benchmarks/stage2_k.py --config configs/market.py --workdir runs/market --ks 5,10,20,50

Extracts the query/gallery features once, then re-sorts each query's top-K
gallery images by the conditional distance (and by clue alignment) for every
K, reporting Rank-1/5/10, mAP, mINP and the stage-2 seconds per query. This
is how `eval.stage2_k`'s default was chosen; run it on your dataset to choose
yours.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import checkpoint, cli, eval_lib, metrics, pair_scoring, train_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string('workdir', None, 'The training run directory (its latest checkpoint).')
flags.DEFINE_string('ks', '1,3,5,10,20,50', 'Comma-separated K values.')
flags.DEFINE_string('out', 'benchmarks/results/stage2_k.json', 'JSON report.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config, args = FLAGS.config, FLAGS
  ks = [int(k) for k in args.ks.split(',')]

  step, state, record = checkpoint.read_checkpoint(args.workdir)
  model = train_lib.create_model(config, record['num_classes'])
  builder = train_lib.prepare_on_first_process(config)
  mesh = jax.make_mesh((jax.device_count(),), (eval_lib.AXIS,))
  variables = jax.device_put({'params': state['params'], 'batch_stats': state['batch_stats']},
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  query, gallery = eval_lib.load_eval_splits(str(builder.data_dir))
  embed_step = eval_lib.make_embed_step(model, mesh, config.eval.flip, with_cache=True)
  q_emb, q_cache = eval_lib.extract_features(embed_step, variables, query, config, mesh)
  g_emb, g_cache = eval_lib.extract_features(embed_step, variables, gallery, config, mesh)
  distmat = metrics.cosine_distance(q_emb, g_emb)
  rank = lambda d: eval_lib.summarize(metrics.evaluate_rank(
      d, query.pids, gallery.pids, query.camids, gallery.camids))

  report = {'workdir': args.workdir, 'step': step, 'dataset': config.data.dataset,
            'num_query': len(query), 'num_gallery': len(gallery),
            'individual': rank(distmat), 'rows': {}}
  scorers = {'cacenet': pair_scoring.conditional_distance}
  if pair_scoring.has_alignment_keys(q_cache):
    scorers['clue_alignment'] = pair_scoring.alignment_distance
  for row, score in scorers.items():
    pair_step = pair_scoring.make_pair_step(model, score)
    pair_distances = lambda q, g, pair_step=pair_step: pair_step(
        variables, jax.tree.map(lambda c: c[q], q_cache), jax.tree.map(lambda c: c[g], g_cache))
    pair_scoring.rerank_top_k(distmat[:1], 1, pair_distances)  # compile outside the timing
    report['rows'][row] = {}
    for k in ks:
      start = time.perf_counter()
      reranked = pair_scoring.rerank_top_k(distmat, k, pair_distances)
      seconds = (time.perf_counter() - start) / len(query)
      report['rows'][row][k] = {**rank(reranked), 'stage2_s_per_query': seconds}

  header = f'{"":>16} {"K":>4} {"R-1":>7} {"R-5":>7} {"mAP":>7} {"mINP":>7} {"ms/query":>9}'
  print(f'{config.data.dataset}, {args.workdir} step {step}\n{header}')
  ind = report['individual']
  print(f'{"individual":>16} {"-":>4} {ind["rank1"]:7.2f} {ind["rank5"]:7.2f} '
        f'{ind["mAP"]:7.2f} {ind["mINP"]:7.2f}')
  for row, by_k in report['rows'].items():
    for k, r in by_k.items():
      print(f'{row:>16} {k:>4} {r["rank1"]:7.2f} {r["rank5"]:7.2f} {r["mAP"]:7.2f} '
            f'{r["mINP"]:7.2f} {r["stage2_s_per_query"] * 1e3:9.2f}')
  save_report(report, args.out)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

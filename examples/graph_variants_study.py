"""A two-row study of the variants in examples/graph_variants.py (docs/extending.md).

  python benchmarks/ablations.py --study=examples/graph_variants_study.py --seeds=0 \
    --runs=runs/extending/study --kept=runs/extending/kept --out=runs/extending/report

The built-in 'topk' adjacency with the discrepancy operator, against the
mutual top-k adjacency with the two-hop operator, on the tiny config.
"""

PLUGIN = 'examples/graph_variants.py'


def get_study() -> dict:
  return {
    'config': 'configs/tiny.py',
    'rows': {
      'topk': {'model.adjacency': 'topk'},
      'mutual_two_hop': {
        'model.plugins': PLUGIN,
        'model.adjacency': 'mutual_topk',
        'model.gcn': 'two_hop',
      },
    },
  }

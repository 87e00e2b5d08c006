"""Study `table2`: the paper's Table 2, the cross-image adjacency of the discrepancy GCN.

  python benchmarks/ablations.py --study=table2 --seeds=0,1,2      # 18 trainings, ~1.7 h

Fixed adjacencies (none, part, top-k, full) against the paper's
correspondence attention and the official projected form, on
configs/synthetic_pairs.py (whose adjacency is the cosine correspondence).
`configs/ablations/table2.py` trains the same rows on a real dataset.
"""

FIXED = ('none', 'part', 'topk', 'full')


def get_study() -> dict:
  rows = {kind: {'model.adjacency': kind} for kind in FIXED}
  rows['correspondence'] = {}
  rows['projected'] = {'model.adjacency': 'projected'}
  return {
    'config': 'configs/synthetic_pairs.py',
    'rows': rows,
    'ordering': tuple((fixed, '<=', 'correspondence') for fixed in FIXED),
  }

"""Study `table1`: the paper's Table 1, the stages of CACE-Net, on configs/synthetic_pairs.py.

  python benchmarks/ablations.py --study=table1 --seeds=0,1,2      # 12 trainings, ~1.2 h

Individual only, the individual-GCN (intra-image edges only), the normal GCN
and the discrepancy GCN. "+ clue alignment" is every pair model's
clue_alignment row (adjacency-weighted pixel similarity, no GCN).
"""


def get_study() -> dict:
  return {
    'config': 'configs/synthetic_pairs.py',
    'rows': {
      'individual': {'model.gcn': 'none'},
      'individual_gcn': {'model.adjacency': 'cosine_intra'},
      'normal_gcn': {'model.gcn': 'normal'},
      'discrepancy_gcn': {},
    },
    # The paper's claims, compared on each row's headline mAP.
    'ordering': (
      ('individual', '<', 'individual_gcn'),
      ('individual_gcn', '<=', 'normal_gcn'),
      ('normal_gcn', '<', 'discrepancy_gcn'),
    ),
  }

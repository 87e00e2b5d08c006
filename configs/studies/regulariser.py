"""Study `regulariser`: does training with the pair branch improve the individual embedding?

  python benchmarks/ablations.py --study=regulariser --seeds=0,1,2,3,4,5,6,7   # 24 trainings, ~3 h

The official maintainers describe the conditional branch as a training-time
aid whose gain lies in the individual feature. Three models on the demo
recipe with a validation split, trained with the same seeds (the same batch
order and the same initial values of the parameters they share), compared
pair by pair on their individual rows: individual only, Table 1's
Individual-GCN (intra-image edges only; no pair can condition it) and
CACE-Net in the official form.
"""


def get_study() -> dict:
  return {
    'config': 'configs/synthetic_val.py',
    'rows': {
      'individual': {'model.gcn': 'none'},
      'individual_gcn': {'model.adjacency': 'cosine_intra'},
      'cacenet': {},
    },
  }

"""Paper Table 1 (DukeMTMC-reID): what each stage of CACE-Net adds.

  python train.py --config configs/ablations/table1.py:individual --workdir runs/t1_individual
  python train.py --config configs/ablations/table1.py:individual_gcn --workdir runs/t1_intra
  python train.py --config configs/ablations/table1.py:normal_gcn --workdir runs/t1_normal
  python train.py --config configs/ablations/table1.py:discrepancy_gcn --workdir runs/t1_full

The paper's "+ Visual Clue Alignment" row is the individual model scored by
alignment. Here alignment scoring (eval.py's 'clue_alignment' row) needs a
model that has the attention, so it is reported for every variant with
cross-image edges, not for 'individual'; the paper's row is not reproduced.
"""

from configs.ablations import paper

VARIANTS = {
  'individual': dict(gcn='none'),  # Individual feature embedding only.
  'individual_gcn': dict(adjacency='raw_intra'),  # Cross-image edges dropped.
  'normal_gcn': dict(gcn='normal'),  # Smoothing GCN (I + N A N).
  'discrepancy_gcn': dict(gcn='discrepancy'),  # The full model.
}


def get_config(arg='discrepancy_gcn'):
  """`arg`: one of VARIANTS."""
  arg = arg or 'discrepancy_gcn'
  if arg not in VARIANTS:
    raise ValueError(f'table1 variant {arg!r}: expected one of {", ".join(VARIANTS)}')
  config = paper.get_config()
  for field, value in VARIANTS[arg].items():
    setattr(config.model, field, value)
  return config

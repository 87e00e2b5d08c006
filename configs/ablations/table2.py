"""Paper Table 2 (DukeMTMC-reID): how the pair graph's adjacency is built.

  python train.py --config configs/ablations/table2.py:none --workdir runs/t2_none
  python train.py --config configs/ablations/table2.py:part --workdir runs/t2_part
  python train.py --config configs/ablations/table2.py:topk --workdir runs/t2_topk
  python train.py --config configs/ablations/table2.py:full --workdir runs/t2_full
  python train.py --config configs/ablations/table2.py:correspondence --workdir runs/t2_ca

Semantic alignment needs human-part masks from outside and is not included.
"""

from configs.ablations import paper

ADJACENCIES = ('none', 'part', 'topk', 'full', 'correspondence')


def get_config(arg='correspondence'):
  """`arg`: one of ADJACENCIES ('none' is the individual baseline)."""
  arg = arg or 'correspondence'
  if arg not in ADJACENCIES:
    raise ValueError(f'table2 adjacency {arg!r}: expected one of {", ".join(ADJACENCIES)}')
  config = paper.get_config()
  if arg == 'none':
    config.model.gcn = 'none'
  else:
    config.model.adjacency = arg
  return config

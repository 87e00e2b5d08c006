"""Paper Table 2 (DukeMTMC-reID): how the pair graph's adjacency is built.

  python train.py --config configs/ablations/table2.py:none --workdir runs/t2_none
  python train.py --config configs/ablations/table2.py:part --workdir runs/t2_part
  python train.py --config configs/ablations/table2.py:topk --workdir runs/t2_topk
  python train.py --config configs/ablations/table2.py:full --workdir runs/t2_full
  python train.py --config configs/ablations/table2.py:raw_correspondence --workdir runs/t2_ca

'raw_correspondence' is the paper's correspondence attention (eq. 2-4);
'cosine_correspondence', the same on L2-normalised pixels, is an extra row.
Semantic alignment needs human-part masks from outside and is not included.
"""

from configs.ablations import paper
from configs.studies import table2 as study

# The fixed adjacencies of the CPU study (benchmarks/ablations.py --study=table2), then the paper's.
ADJACENCIES = study.FIXED + ('raw_correspondence', 'cosine_correspondence')


def get_config(arg='raw_correspondence'):
  """`arg`: one of ADJACENCIES ('none' is the individual baseline)."""
  arg = arg or 'raw_correspondence'
  if arg not in ADJACENCIES:
    raise ValueError(f'table2 adjacency {arg!r}: expected one of {", ".join(ADJACENCIES)}')
  config = paper.get_config()
  if arg == 'none':
    config.model.gcn = 'none'
  else:
    config.model.adjacency = arg
  return config

"""Base of the ablations: the model as the paper's text describes it.

Correspondence attention with diagonal W, W' (eq. 2-4), discrepancy GCN
(eq. 7), global average pooling, no non-local blocks; dataset by argument.

  python train.py --config configs/ablations/paper.py:dukemtmc_reid --workdir runs/paper_duke

"""

from configs import default


def get_config(arg=None):
  """`arg`: TFDS dataset name (default dukemtmc_reid, the paper's ablation set)."""
  config = default.get_config()
  config.data.dataset = arg or 'dukemtmc_reid'
  config.model.adjacency = 'correspondence'
  config.model.pooling = 'avg'
  config.model.non_local = False
  return config

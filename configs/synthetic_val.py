"""The CPU demo with a validation split: what the paired studies train.

  python train.py --config configs/synthetic_val.py --workdir runs/synthetic_val
  python benchmarks/ablations.py --study=regulariser --seeds=0,1,2,3,4,5,6,7

configs/synthetic.py (the official model form, its initialisation and one
learning rate) with 5 of the 30 training families (20 identities) held out
as a validation split: the final evaluation chooses stage 2's K, its mix w
and the fraction of queries it re-sorts there, never on the test split.
Unlike configs/synthetic_pairs.py it leaves the pair branch as the official
code has it, so a study on it asks what the released recipe does.

Expected runtime: about 6 minutes of training on 2 CPU cores.
"""

from configs import synthetic


def get_config(arg=None):
  config = synthetic.get_config(arg)
  config.data.validation_ids = 20
  return config

"""configs/synthetic_val.py on the occluded preset: every query occluded.

  python train.py --config configs/synthetic_occluded.py --workdir runs/synthetic_occluded
  python benchmarks/ablations.py --study=occlusion --seeds=0,1,2,3,4,5,6,7

`synthetic_details/occluded` is the default preset with every test query
and about 10% of the training and gallery images occluded (the
Occluded-Duke protocol in miniature): the case the paper motivates its
alignment with, where one image shows parts the other does not.

Expected runtime: about 6 minutes of training on 2 CPU cores.
"""

from configs import synthetic_val


def get_config(arg=None):
  config = synthetic_val.get_config(arg)
  config.data.dataset = 'synthetic_details/occluded'
  return config

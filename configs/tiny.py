"""A one-minute smoke run: a tiny CACE-Net on the tiny synthetic preset (what tests train).

  python train.py --config configs/tiny.py --workdir runs/tiny

Expected runtime: about a minute on 2 CPU cores, mostly compilation.
"""

from configs import synthetic


def get_config(arg=None):
  config = synthetic.get_config(arg)
  config.data.dataset = 'synthetic_details/tiny'
  config.data.image_size = (64, 32)
  config.data.p = 2
  config.data.k = 2
  config.data.padding = 2
  config.data.eval_batch_size = 8

  config.model.depth = 'tiny'
  config.model.width = 8
  config.model.embed_dim = 32

  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.checkpoint_every = 3
  return config

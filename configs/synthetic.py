"""The CPU demo: a small CACE-Net trained on the generated synthetic_details dataset.

  python train.py --config configs/synthetic.py --workdir runs/synthetic
  python eval.py --config configs/synthetic.py --workdir runs/synthetic

Expected runtime: about 6 minutes of training plus 1 minute of set-up and
evaluation on 2 CPU cores (`make demo` runs both commands).
"""

from configs import default


def get_config(arg=None):
  """ResNet-18 at the dataset's native 128×64, the paper's cheap pair stage (GAP)."""
  config = default.get_config(arg)
  config.data.dataset = 'synthetic_details'
  config.data.image_size = (128, 64)
  config.data.padding = 4
  config.data.eval_batch_size = 64

  config.model.depth = '18'
  config.model.width = 32  # Half-width ResNet-18: 0.23 s per step of 16 images on 2 cores.
  config.model.non_local = False
  config.model.pooling = 'avg'
  config.model.embed_dim = 256

  config.optim.lr_per_16 = 0.01  # 0.05 collapses the embeddings from scratch (measured).
  config.optim.warmup_epochs = 1
  config.optim.epochs = 20

  config.train.log_every = 20
  config.train.checkpoint_every = 500
  config.train.eval_every_epochs = 0  # Evaluate once, at the end.
  config.eval.flip = False
  return config

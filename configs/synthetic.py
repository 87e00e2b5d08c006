"""The CPU demo on the procedurally generated synthetic_details dataset.

  python -m cace_jax.datasets.prepare --dataset synthetic_details   # < 1 min
"""

from configs import default


def get_config(arg=None):
  """Synthetic dataset at its native 128×64 resolution."""
  config = default.get_config(arg)
  config.data.dataset = 'synthetic_details'
  config.data.image_size = (128, 64)
  config.data.padding = 4
  return config

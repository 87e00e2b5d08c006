"""Base config: the paper's recipe on Market-1501; dataset configs override a few fields.

  python -m cace_jax.datasets.prepare --dataset market1501   # reads data/manual/

Only the data section exists so far; model, optimiser and schedule sections
come with the training issue.
"""

import ml_collections


def get_config(arg=None):
  """Returns the base config. `arg` is unused (kept for `file.py:arg` syntax)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'market1501'  # TFDS name, optionally with /config.
  config.data.data_dir = 'data'  # TFDS records.
  config.data.manual_dir = ''  # Downloads; '' means <data_dir>/manual.
  config.data.image_size = (384, 128)  # (height, width)
  config.data.p = 4  # Identities per device batch.
  config.data.k = 4  # Images per identity.
  config.data.drop_small_ids = False  # Else identities with < K images repeat images.
  config.data.flip = True
  config.data.padding = 10  # Pad, then random crop back to image_size.
  config.data.erasing_probability = 0.5
  config.data.eval_batch_size = 64  # Per device.
  return config.lock()

"""What the device check is built from: the recipe, random batches, pair paths, table rows.

Kept apart from `device_check.py` (the sections and the command) so that each file
holds one job; like it, this imports no TensorFlow.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cace_jax import sharding  # noqa: E402
from cace_jax.models import CACENet  # noqa: E402
from configs import market  # noqa: E402

NUM_CLASSES = 751  # Market-1501's training identities


def recipe_config(tiny: bool):
  """The Market-1501 recipe; with `tiny`, its tiny-model stand-in at 64×32."""
  config = market.get_config()
  if tiny:
    config.model.depth, config.model.width, config.model.embed_dim = 'tiny', 8, 32
    config.data.image_size, config.data.k = (64, 32), 2
  return config


def random_batch(mesh, p: int, k: int, image_size, seed: int) -> dict:
  """A global P·K-per-device batch of random images, each device's P identities × K images."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate(
    [np.repeat(rng.choice(NUM_CLASSES, p, replace=False), k) for _ in range(mesh.size)]
  ).astype(np.int32)
  images = rng.standard_normal((len(labels), *image_size, 3), np.float32)
  return sharding.global_batch({'image': images, 'label': labels}, mesh)


def format_row(row: dict) -> str:
  memory = row['program_memory_bytes']
  return (
    f'{row["images_per_s"]:8.1f} img/s, step {row["step_s"] * 1e3:8.1f} ms, '
    f'compile {row["compile_s"]:5.1f} s, {row["gflop_per_device_step"]:8.1f} GFLOP, '
    f'MFU {row["mfu"] * 100:5.1f}%, ×{row["step_over_backbone"]:.2f} backbone, '
    f'program memory {"n/a" if memory is None else f"{memory / 2**20:,.0f} MiB"}'
  )


def perturbed_gcn_output(variables: dict) -> dict:
  """`variables` with the GCN's output conv o drawn at random.

  o starts at zero (the official init), which makes the pair stage the
  identity and the comparison of its two paths empty.
  """
  params = dict(variables['params'])
  graph = dict(params['pair_graph'])
  kernel = graph['o']['kernel']
  graph['o'] = {**graph['o'], 'kernel': 0.05 * jax.random.normal(jax.random.key(6), kernel.shape)}
  params['pair_graph'] = graph
  return {**variables, 'params': params}


def both_pair_paths(fast: CACENet, direct: CACENet, variables, images) -> tuple[dict, dict]:
  """The pair outputs of `images` by the fast and by the materialised path, in one program."""

  def pair_outputs(model):
    outputs = model.apply(variables, images, train=False)
    return {name: value for name, value in outputs.items() if name.startswith('pair_')}

  return pair_outputs(fast), pair_outputs(direct)


def largest_relative_difference(fast: dict, direct: dict) -> float:
  """max over outputs of max |fast - direct| / max |direct|."""
  worst = 0.0
  for name in direct:
    a, b = (np.asarray(x[name], np.float32) for x in (fast, direct))
    worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
  return worst

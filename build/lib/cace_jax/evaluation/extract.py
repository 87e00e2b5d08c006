"""Stage 1 over a whole split: its images read by tf.data, embedded by `stage1`.

The one place evaluation touches TensorFlow: `stage1.embed_batches` takes
batches from any iterator; this module gives it the split's evaluation
stream (every image once, in order, the last batch padded).
"""

from __future__ import annotations

import jax
import ml_collections

from cace_jax import input_pipeline
from cace_jax.evaluation import stage1
from cace_jax.models import CACENet


def extract_features(
  model: CACENet,
  variables,
  data: input_pipeline.SplitData,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  with_cache: bool = True,
  cache_dir: str | None = None,
  gather_cache: bool = True,
) -> stage1.SplitFeatures:
  """Embeddings [N, E] and stage-2 caches (leading axis N) of every image of a split, in order.

  Args:
    model, variables: the network (variables replicated over `mesh`).
    data: the split.
    config: the run's config (`data.image_size`, `data.eval_batch_size`,
      `eval.flip`, `eval.cache_dtype`, `eval.cache_memory_gb`).
    with_cache: also compute the stage-2 caches ({} otherwise).
    cache_dir: where caches larger than `eval.cache_memory_gb` go as
      memory-mapped files (`stage1.allocate_host_cache`).
    gather_cache: False keeps on each process only its own rows of the
      caches (`stage1.embed_batches`).
  """
  dataset = input_pipeline.create_eval_dataset(
    data,
    image_size=config.data.image_size,
    batch_size=config.data.eval_batch_size,
    num_devices=jax.device_count(),
    local_devices=jax.local_device_count(),
    process_index=jax.process_index(),
  )
  batches = input_pipeline.iterate_numpy(dataset)
  return stage1.embed_batches(
    model, variables, batches, len(data), config, mesh, with_cache, cache_dir, gather_cache
  )

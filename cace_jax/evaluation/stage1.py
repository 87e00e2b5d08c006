"""Stage 1 of the paper's inference (Sec. 3.5): every image's embedding and stage-2 cache.

Each query and gallery image goes through the backbone once, batched over
the `data` mesh. It yields the individual embedding (ranked by cosine
distance) and, when a stage 2 follows, the compact per-image cache that
stage needs (`CACENet.compute_image_cache`), stored on the host between the
stages in `eval.cache_dtype`, in memory or as memory-mapped files.

This module needs no TensorFlow: it takes batches from any iterator.
`data.pipeline.eval_batches` gives it a split's images through tf.data.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cace_jax import sharding
from cace_jax.models import CACENet

if TYPE_CHECKING:
  from ml_collections import ConfigDict


def embed_and_cache(module: CACENet, images, flip: bool, with_cache: bool):
  """(embedding [B, E], cache) of one device's images; cache {} unless `with_cache`."""
  embedding, fmap = module.features(images, flip)
  if not with_cache:
    return embedding, {}
  cache = module.compute_image_cache(fmap)
  # The projected-cosine adjacency compares one projection with itself: while
  # tracing, 'query' and 'key' are then the very same value, and one copy is kept.
  if cache['query'] is cache['key']:
    cache = {name: value for name, value in cache.items() if name != 'query'}
  return embedding, cache


@functools.lru_cache(maxsize=4)  # periodic evaluations reuse one compiled step
def make_embed_step(model: CACENet, mesh: jax.sharding.Mesh, flip: bool, with_cache: bool):
  """Jitted (variables, images [N, H, W, 3]) -> (embeddings [N, E], caches [N, ...]).

  The N images are split over the mesh's `data` axis; with `flip`, embeddings
  are flip-averaged (`CACENet.features`); the caches come from the unflipped
  image, without 'query' where it equals 'key' (`stage2.expand_cache` restores it).
  """

  def device_fn(variables, images):
    return model.apply(variables, images, flip, with_cache, method=embed_and_cache)

  spec = jax.sharding.PartitionSpec
  return jax.jit(
    jax.shard_map(
      device_fn, mesh=mesh, in_specs=(spec(), spec(sharding.AXIS)), out_specs=spec(sharding.AXIS)
    )
  )


def allocate_host_cache(
  shapes: dict, num_images: int, dtype, directory: str | None = None, memory_limit_gb: float = 8.0
) -> dict:
  """Zeroed host arrays {name: [num_images, *shape]} of `dtype` for a split's caches.

  In memory while they fit in `memory_limit_gb`; else `np.memmap` files in
  `directory`, so caches of full maps (GeM on MSMT17: ~84 GB in bfloat16)
  stream from disk: stage 2 reads only the rows of the pairs it scores. The
  files are the caller's to delete.
  """
  dtype = np.dtype(dtype)
  total = num_images * sum(int(np.prod(shape)) for shape in shapes.values()) * dtype.itemsize
  if directory is None or total <= memory_limit_gb * 2**30:
    return {name: np.zeros((num_images, *shape), dtype) for name, shape in shapes.items()}
  os.makedirs(directory, exist_ok=True)
  return {
    name: np.memmap(
      os.path.join(directory, f'{name}.bin'), dtype=dtype, mode='w+', shape=(num_images, *shape)
    )
    for name, shape in shapes.items()
  }


class SplitFeatures(NamedTuple):
  """A split's stage-1 output on this host (`embed_batches`).

  embeddings: [N, E] every image's embedding (ranking needs them all, on
    every process).
  cache: the stage-2 caches {name: [N, ...]} ({} without them).
  held: [N] bool, the rows of `cache` this process holds (the others are
    zeros that were never written, so they take no memory); None when it
    holds every row.
  """

  embeddings: np.ndarray
  cache: dict
  held: np.ndarray | None = None


def embed_batches(
  model: CACENet,
  variables,
  batches: Iterable[dict],
  num_images: int,
  config: ConfigDict,
  mesh: jax.sharding.Mesh,
  with_cache: bool = True,
  cache_dir: str | None = None,
  gather_cache: bool = True,
) -> SplitFeatures:
  """Embeddings [N, E] and stage-2 caches (leading axis N) of images given in batches.

  Args:
    model, variables: the network (variables replicated over `mesh`).
    batches: this process's share of each global batch, as numpy:
      'image' [b, H, W, 3] and 'index' [b] (the image's row, -1 for padding).
    num_images: N, the number of rows.
    config: reads `eval.flip`, `eval.cache_dtype`, `eval.cache_memory_gb`.
    with_cache: also compute the stage-2 caches ({} otherwise).
    cache_dir: where caches larger than `eval.cache_memory_gb` go as
      memory-mapped files (`allocate_host_cache`).
    gather_cache: every process gets every cache row; if False, each keeps
      the rows of its own batches (`SplitFeatures.held`), which is what
      stage 2 reads of a gallery (`stage2.PairDistances` scores a pair on the
      process that holds its gallery row). Embeddings are always gathered.
  """
  embed_step = make_embed_step(model, mesh, config.eval.flip, with_cache)
  keep_local = not gather_cache and jax.process_count() > 1
  held = np.zeros(num_images, bool) if keep_local else None
  # A process keeping its own rows holds about its devices' share of them.
  share = jax.local_device_count() / jax.device_count() if keep_local else 1.0
  embeddings, caches = None, None
  for local in batches:
    batch = sharding.global_batch({'image': local['image'], 'index': local['index']}, mesh)
    output, cache = embed_step(variables, batch['image'])
    output, index = sharding.to_host(output), sharding.to_host(batch['index'])
    if keep_local:  # this process's rows of the batch: its devices' shards, in order
      cache = jax.tree.map(local_rows, cache)
      rows = local['index']
    else:
      cache, rows = jax.tree.map(sharding.to_host, cache), index
    if embeddings is None:
      embeddings = np.zeros((num_images, output.shape[-1]), np.float32)
      caches = allocate_host_cache(
        {name: value.shape[1:] for name, value in cache.items()},
        num_images,
        jnp.dtype(config.eval.cache_dtype),
        cache_dir,
        config.eval.cache_memory_gb / share,
      )
    valid = index >= 0  # the last batch is padded
    embeddings[index[valid]] = output[valid]
    valid = rows >= 0
    for stored, new in zip(jax.tree.leaves(caches), jax.tree.leaves(cache)):
      stored[rows[valid]] = new[valid]
    if held is not None:
      held[rows[valid]] = True
  return SplitFeatures(embeddings, caches, held)


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of an array split over `data`: its shards, in row order."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])

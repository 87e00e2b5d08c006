"""The device layout: one `data` mesh axis over all devices, batches split along it.

Every array a step takes is either replicated (the train state, model
variables) or a flat global batch `[global_batch, ...]` sharded over `data`.
Each process builds its share of a global batch from its local rows, in
device order, so device d of the mesh holds rows [d·b, (d+1)·b): the P·K
images of its own identities. Inside `jax.shard_map` a step sees exactly
that per-device block, as under pmap.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np

AXIS = 'data'


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def local_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The `data` mesh of this process's devices of `mesh` (work with no cross-process collective)."""
  here = jax.process_index()
  return make_mesh([device for device in mesh.devices.flat if device.process_index == here])


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """A full copy on every device (train state, variables)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def split_over_data(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading axis split over the `data` axis (batches)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def host_copy(tree):
  """A replicated tree's value as numpy, from this process's own copy (no cross-host transfer)."""
  return jax.tree.map(
    lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree
  )


def per_process(value, dtype=np.int32) -> list:
  """`value` (a count, or seconds with a float dtype) of every process, in process order."""
  values = [value]
  if jax.process_count() > 1:
    values = multihost_utils.process_allgather(np.array([value], dtype))[:, 0]
  return [np.asarray(v, dtype).item() for v in values]


def replicate(tree, mesh: jax.sharding.Mesh):
  """`tree` (host or device arrays) copied onto every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's rows {name: [local_rows, ...]} -> global arrays sharded over `data`."""
  sharding = split_over_data(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def prefetch_to_device(
  local_batches: Iterable[dict], mesh: jax.sharding.Mesh, size: int = 2
) -> Iterator[dict]:
  """Global batches, `size` of them already on the devices while a step runs.

  Transfers are asynchronous, so the next batch's copy overlaps the current
  step; the batches (and their order) are exactly those of `local_batches`.
  """
  queue = collections.deque()
  local_batches = iter(local_batches)

  def enqueue(count: int) -> None:
    for local in itertools.islice(local_batches, count):
      queue.append(global_batch(local, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def to_host(array: jax.Array) -> np.ndarray:
  """A global array's full value on every process (an array of this process's devices: its own)."""
  if jax.process_count() == 1 or array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))

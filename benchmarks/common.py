"""What every benchmark script shares: timing a call and saving its JSON report."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

from cace_jax import sharding
from cace_jax.models import build_model
from cace_jax.train import train_step


def median_seconds(fn: Callable, repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls, after one untimed call (compilation)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def save_report(report: dict, path: str) -> dict:
  """Writes `report` as indented JSON at `path` (creating its directory), says where, returns it.

  The report is dated (UTC) and names its command unless it already does: the
  docs' tables show a figure's date from its JSON, never from prose.
  """
  report = {
    'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    'command': ' '.join(['python', *sys.argv]),
    **report,
  }
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  print(f'saved {path}')
  return report


# Peak dense matrix-product throughput per chip, TFLOP/s (no structured sparsity),
# from the vendors' datasheets. 'float32' is what XLA uses for a float32 matmul by
# default on that chip: TF32 tensor cores on NVIDIA Ampere and later, bf16 passes
# on TPUs (also their bf16 figure). Keys match `jax.Device.device_kind` by substring.
PEAK_TFLOPS = {
  # NVIDIA H200 datasheet: SXM 1979 bf16 / 989 TF32 TFLOP/s "with sparsity", halved;
  # the NVL card 1671 / 835.
  'H200 NVL': {'bfloat16': 835.5, 'float32': 417.5},
  'H200': {'bfloat16': 989.0, 'float32': 494.5},
  # NVIDIA H100 datasheet: SXM5 as H200; PCIe 1513 / 756; NVL 1671 / 835 (sparse).
  'H100 PCIe': {'bfloat16': 756.0, 'float32': 378.0},
  'H100 NVL': {'bfloat16': 835.5, 'float32': 417.5},
  'H100': {'bfloat16': 989.0, 'float32': 494.5},
  # NVIDIA A100 datasheet (SXM4 and PCIe alike).
  'A100': {'bfloat16': 312.0, 'float32': 156.0},
  # Google Cloud TPU system architecture pages, per chip.
  'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
  'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
  'TPU v5e': {'bfloat16': 197.0, 'float32': 197.0},
  'TPU v5p': {'bfloat16': 459.0, 'float32': 459.0},
  'TPU v5': {'bfloat16': 459.0, 'float32': 459.0},
  'TPU v6 lite': {'bfloat16': 918.0, 'float32': 918.0},  # Trillium (v6e)
  'TPU v6e': {'bfloat16': 918.0, 'float32': 918.0},
}


def measured_matmul_tflops(dtype: str, size: int = 1024, repeats: int = 5) -> float:
  """TFLOP/s of one device on a [size, size] matrix product: the CPU's peak stand-in."""
  x = jax.device_put(np.ones((size, size), dtype), jax.devices()[0])
  product = jax.jit(lambda a: a @ a)
  return 2 * size**3 / median_seconds(lambda: product(x), repeats) / 1e12


def peak_tflops(device: jax.Device, dtype: str) -> tuple[float, str]:
  """(peak TFLOP/s of one device for `dtype` matrix products, where the figure comes from)."""
  for kind, peaks in PEAK_TFLOPS.items():  # the more specific names come first
    if kind.lower() in device.device_kind.lower():
      return peaks[dtype], f'datasheet ({kind})'
  if device.platform == 'cpu':
    return measured_matmul_tflops(dtype), 'measured matmul (one device)'
  return float('nan'), f'unknown device kind {device.device_kind!r}'


def flops_of(lowered) -> float:
  """FLOPs of a lowered program by XLA's cost analysis of its unoptimised HLO (nan if none).

  The count is per device for a `shard_map` program and includes what
  `jax.checkpoint` recomputes. XLA counts the body of a loop (`lax.map`,
  `scan`) once, whatever its trip count: count a variant without the loop
  (CACENet's `pair_block` = B). Plugins (CUDA, TPU) do not analyse a lowered
  program, but the HLO is the backend's input, so the CPU client counts it
  without compiling anything.
  """
  try:
    cost = lowered.cost_analysis()
  except NotImplementedError:
    return flops_counted_on_cpu(lowered)
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


def flops_counted_on_cpu(lowered) -> float:
  """XLA's FLOP count of any backend's lowered program, by the CPU client's HLO cost analysis."""
  from jax._src.lib import _jax  # deferred: a private module, only for plugins' programs

  cpu = jax.local_devices(backend='cpu')[0].client
  cost = _jax.hlo_module_cost_analysis(cpu, lowered.compiler_ir('hlo').as_hlo_module())
  return float(cost.get('flops', float('nan')))


def train_step_flops(config, model_fields: dict, num_classes: int, per_device: int, mesh) -> float:
  """FLOPs per device of one `train_step.make_train_step` step, with nothing run or compiled.

  The step of `config` (optimizer, losses) and a model of `model_fields`
  (`config.model` or a variant of it) is lowered on abstract inputs of
  `per_device` images per device, with all pair rows in one block
  (`pair_block` = the batch): XLA counts a loop body once.
  """
  model = build_model(model_fields, num_classes, pair_block=per_device)
  # The epoch length only shapes the learning-rate schedule, not the step's work.
  tx, schedule = train_step.create_optimizer(config, 100, per_device * mesh.size)
  image_size = tuple(config.data.image_size)
  images = jax.ShapeDtypeStruct((2, *image_size, 3), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  state = jax.eval_shape(lambda v: train_step.init_state(None, tx, image_size, 0, v), variables)
  replicated = sharding.replicated(mesh)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  rows, split = per_device * mesh.size, sharding.split_over_data(mesh)
  batch = {
    'image': jax.ShapeDtypeStruct((rows, *image_size, 3), np.float32, sharding=split),
    'label': jax.ShapeDtypeStruct((rows,), np.int32, sharding=split),
  }
  step = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
  return flops_of(step.lower(state, batch))


def program_memory_bytes(compiled) -> int | None:
  """Device bytes one compiled program needs: arguments + outputs − donated aliases + scratch."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  peak = getattr(stats, 'peak_memory_in_bytes', 0)
  total = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  return int(max(peak, total))


def peak_memory_bytes(device: jax.Device) -> int | None:
  """Peak bytes the device's allocator has held in this process so far (None on CPUs)."""
  stats = device.memory_stats()
  return None if not stats else int(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', 0)))

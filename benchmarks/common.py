"""What every benchmark script shares: timing a call and saving its JSON report."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np


def median_seconds(fn: Callable, repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls, after one untimed call (compilation)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def save_report(report: dict, path: str) -> None:
  """Writes `report` as indented JSON at `path` (creating its directory) and says where."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  print(f'saved {path}')


# Peak dense matrix-product throughput per chip, TFLOP/s (no structured sparsity),
# from the vendors' datasheets. 'float32' is what XLA uses for a float32 matmul by
# default on that chip: TF32 tensor cores on NVIDIA Ampere and later, bf16 passes
# on TPUs (also their bf16 figure). Keys match `jax.Device.device_kind` by substring.
PEAK_TFLOPS = {
  # NVIDIA H200 datasheet (SXM): 1979 bf16 / 989 TF32 TFLOP/s "with sparsity", halved.
  'H200': {'bfloat16': 989.0, 'float32': 494.5},
  # NVIDIA H100 datasheet (SXM5; the PCIe card is 756 / 378).
  'H100 PCIe': {'bfloat16': 756.0, 'float32': 378.0},
  'H100': {'bfloat16': 989.0, 'float32': 494.5},
  # NVIDIA A100 datasheet (SXM4 and PCIe alike).
  'A100': {'bfloat16': 312.0, 'float32': 156.0},
  # Google Cloud TPU system architecture pages, per chip.
  'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
  'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
  'TPU v5e': {'bfloat16': 197.0, 'float32': 197.0},
  'TPU v5p': {'bfloat16': 459.0, 'float32': 459.0},
  'TPU v5': {'bfloat16': 459.0, 'float32': 459.0},
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
  """FLOPs of a lowered program by XLA's cost analysis (nan when it gives none).

  XLA counts the body of a loop (`lax.map`, `scan`) once, whatever its trip
  count: count a variant without the loop (CACENet's `pair_block` = B).
  """
  cost = lowered.cost_analysis()  # None on GPU and TPU backends: compile, then count
  if not cost:
    cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


def peak_memory_bytes(device: jax.Device) -> int | None:
  """Peak bytes the device's allocator has held (None where it does not say, as on CPUs)."""
  stats = device.memory_stats()
  return None if not stats else int(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', 0)))

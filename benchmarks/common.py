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

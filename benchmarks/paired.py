"""Paired comparisons: the mean difference of rows trained with the same seeds, and its t interval.

Two rows of a study trained with seed k see the same batches in the same
order and start from the same values of every parameter they share (the
backbone, the embedding head, the classifier: `tests/test_ablations.py`
checks it). Their difference on seed k is then free of the luck they share
(which batches, which initial values), and the spread of the differences
over seeds is what decides whether a row is better, not the spread of
either row. With few seeds, equal differences give an interval of width
zero: arithmetic, not evidence. For n seeds, the 95% interval of the mean difference d̄ is

    d̄ ± t_{0.975, n−1} · s_d / √n,

s_d the standard deviation of the n differences (ddof 1): Student's t
interval, which assumes the differences are roughly normal. An interval
that excludes zero is a difference the seeds support at the 5% level; one
that crosses zero is not, whatever the sign of d̄.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats

# What each paired comparison reads from a kept summary (`ablations.summary_of`): a
# metric of an evaluation row, overall and within look-alike families (the
# `family_retrieval` diagnostic, on datasets that have families).
MEASURES = {
  'mAP': lambda summary, row: summary['results'][row]['mAP'],
  'rank1': lambda summary, row: summary['results'][row]['rank1'],
  'family_mAP': lambda summary, row: summary['diagnostics'].get(f'family_retrieval/{row}/mAP'),
  'family_rank1': lambda summary, row: summary['diagnostics'].get(f'family_retrieval/{row}/rank1'),
}


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> dict:
  """b − a seed by seed: {'mean', 'std', 'low', 'high', 'n', 'values', 'excludes_zero'}.

  `low`/`high` bound the `level` t interval of the mean difference; with one
  seed there is no interval (None) and nothing is excluded.
  """
  if len(a) != len(b) or not a:
    raise ValueError(f'paired values need equal, non-zero lengths, got {len(a)} and {len(b)}')
  values = [float(y) - float(x) for x, y in zip(a, b)]
  n, mean = len(values), float(np.mean(values))
  if n < 2:
    return {'mean': mean, 'std': 0.0, 'low': None, 'high': None, 'n': n, 'values': values,
            'excludes_zero': False}  # fmt: skip
  std = float(np.std(values, ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
  low, high = mean - half, mean + half
  return {
    'mean': mean,
    'std': std,
    'low': low,
    'high': high,
    'n': n,
    'values': values,
    'excludes_zero': bool(low > 0 or high < 0),
  }


def compare(
  per_row: dict[str, dict[int, dict]],
  pairs: list[tuple[str, str]] | None = None,
  eval_row: str = 'individual',
) -> list[dict]:
  """Paired differences of study rows on one evaluation row, over the seeds both have.

  Args:
    per_row: {study row: {seed: kept summary}}.
    pairs: (row a, row b) to compare as b − a; default every pair, in row order.
    eval_row: the evaluation row compared ('individual': each model's own embedding).

  Returns:
    [{'a', 'b', 'eval_row', 'seeds', measure: paired_difference}] for the
    measures every shared seed has (within-family ones need families).
  """
  pairs = pairs if pairs is not None else list(itertools.combinations(per_row, 2))
  found = []
  for a, b in pairs:
    seeds = sorted(set(per_row.get(a, {})) & set(per_row.get(b, {})))
    if not seeds:
      continue
    comparison = {'a': a, 'b': b, 'eval_row': eval_row, 'seeds': seeds}
    for name, read in MEASURES.items():
      values = [(read(per_row[a][s], eval_row), read(per_row[b][s], eval_row)) for s in seeds]
      if all(x is not None and y is not None for x, y in values):
        comparison[name] = paired_difference(*map(list, zip(*values)))
    found.append(comparison)
  return found


def format_difference(difference: dict, digits: int = 2) -> str:
  """'+1.23 [−0.40, +2.86]': the mean difference and its interval (mean alone for one seed)."""
  if difference['low'] is None:
    return f'{difference["mean"]:+.{digits}f}'
  return (
    f'{difference["mean"]:+.{digits}f} '
    f'[{difference["low"]:+.{digits}f}, {difference["high"]:+.{digits}f}]'
  )


def markdown_lines(comparisons: list[dict], name_eval_row: bool = True) -> list[str]:
  """A markdown table of `compare`'s output: one line per pair of rows (and the row compared)."""
  if not comparisons:
    return []
  lines = [
    '| b − a (same seeds) | seeds | mAP | R-1 | within family mAP | within family R-1 |',
    '|---|---|---|---|---|---|',
  ]
  for found in comparisons:
    cells = [
      format_difference(found[name]) if name in found else '–'
      for name in ('mAP', 'rank1', 'family_mAP', 'family_rank1')
    ]
    label = f'{found["b"]} − {found["a"]}'
    label += f' ({found["eval_row"]})' if name_eval_row else ''
    lines.append(f'| {label} | {len(found["seeds"])} | ' + ' | '.join(cells) + ' |')
  return lines

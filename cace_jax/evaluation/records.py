"""The records an evaluation returns, and their form in results.json.

`ranking.evaluate` returns an `Evaluation`, whose `EvaluationInfo` says how
it was measured; stage 2's K and w chosen on a validation split
(`selection.select_stage2`) travel as a `Stage2Choice`. Each record's
`to_json` is what results.json holds of it, and `Stage2Choice.from_results`
reads a choice back (the API configures its search with it). No TensorFlow,
no model: only numbers and their names.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import TYPE_CHECKING

from cace_jax.errors import ConfigError

if TYPE_CHECKING:
  from ml_collections import ConfigDict

# The query gate of stage 2 on no query: below every cosine similarity.
NO_QUERY = -2.0


@dataclasses.dataclass(frozen=True)
class Stage2Choice:
  """Stage 2's K, mix w and query gate as chosen on a validation split, and what they came from.

  Attributes:
    stage2_k: the chosen K (`eval.stage2_k`).
    stage2_mix: the chosen w (`eval.stage2_mix`).
    stage2_fraction: the chosen fraction of queries to re-sort, least
      confident first (1.0: every query).
    stage2_max_similarity: the gate that selects that fraction of the
      validation queries (`eval.stage2_max_similarity`, `two_stage.gate_for_fraction`):
      what carries the choice to other queries.
    individual: the validation split's stage-1 metrics {'rank1', ..., 'mAP', 'mINP'}.
    grid: [{'k', 'mix', 'fraction', 'mAP', 'rank1'}] every (K, w, fraction)
      tried, in the order tried.
    num_query, num_gallery: the validation split's size.
    pids: its identities, sorted.
    diagnostics: `diagnose.run_diagnostics` on it at the chosen K ({} without
      `eval.diagnostics`).
  """

  stage2_k: int
  stage2_mix: float
  stage2_fraction: float = 1.0  # results.json written before selective stage 2: every query
  stage2_max_similarity: float = 1.0
  individual: dict = dataclasses.field(default_factory=dict)
  grid: list = dataclasses.field(default_factory=list)
  num_query: int = 0
  num_gallery: int = 0
  pids: list = dataclasses.field(default_factory=list)
  diagnostics: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    """results.json's `info.selection`: every field, under its own name."""
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, found: dict) -> Stage2Choice:
    """The choice `to_json` wrote."""
    return cls(**found)

  @classmethod
  def from_results(cls, path: str) -> Stage2Choice | None:
    """The choice a results.json records (`info.selection`); None without the file or a choice.

    A run without a validation split records none: its configured K and w
    are the ones to use.
    """
    if not os.path.exists(path):
      return None
    with open(path, encoding='utf-8') as f:
      found = json.load(f).get('info', {}).get('selection')
    return cls.from_json(found) if found else None

  def configure(self, config: ConfigDict) -> ConfigDict:
    """A copy of `config` with `eval.stage2_k`, `stage2_mix` and `stage2_max_similarity` chosen."""
    config = copy.deepcopy(config)
    config.eval.stage2_k, config.eval.stage2_mix = self.stage2_k, self.stage2_mix
    config.eval.stage2_max_similarity = self.stage2_max_similarity
    return config

  def grid_row(self) -> dict:
    """The grid's row of this choice (what validation measured with it)."""
    chosen = (self.stage2_k, self.stage2_mix, self.stage2_fraction)
    return next(
      row for row in self.grid if (row['k'], row['mix'], row.get('fraction', 1.0)) == chosen
    )


# How a search or a deployment decides on stage 2 (`served_stage2`).
SERVING_POLICIES = ('validation', 'config')
# Where the served stage 2 came from when the run chose none: stage 1 alone.
STAGE1_ONLY = 'stage 1 (no validation choice)'


def served_stage2(
  config: ConfigDict, workdir: str, policy: str = 'validation'
) -> tuple[ConfigDict, str]:
  """(`config` with the stage 2 a search or a deployment applies, where it came from).

  'validation' (the default): the K, w and query gate the run's final
  evaluation chose on its validation split ('validation'), else no stage 2
  at all: the gate is `NO_QUERY`, every query keeps its stage-1 ranking
  (`STAGE1_ONLY`). Stage 2 is an option because the official code never
  ranks by conditional embeddings at inference, and on the data here paired
  seeds find no gain from it (docs/experiments.md). 'config': the config's
  `eval.stage2_k`, `stage2_mix` and `stage2_max_similarity` as they are
  ('config'), the stage 2 its evaluation's 'cacenet' row measured without
  a validation split.
  """
  if policy not in SERVING_POLICIES:
    raise ConfigError(f'stage2={policy!r}: expected one of {", ".join(SERVING_POLICIES)}')
  if policy == 'config':
    return config, 'config'
  # results.json's `info.selection`: none without a validation split.
  choice = Stage2Choice.from_results(os.path.join(workdir, 'results.json'))
  if choice is not None:
    return choice.configure(config), 'validation'
  config = copy.deepcopy(config)
  config.eval.stage2_max_similarity = NO_QUERY
  return config, STAGE1_ONLY


@dataclasses.dataclass(frozen=True)
class EvaluationInfo:
  """How an evaluation was measured: results.json's `info`, which leaves out fields that are None.

  The fields from `stage2_mix` to `cache_on_disk` are set only with a pair
  stage. Per-process lists are in process order: with several processes,
  how the work divided.

  Attributes:
    stage2_k: K, the gallery images stage 2 re-sorts per query (0 without a
      pair stage).
    seconds_by_process: {'stage1': [s], and with a pair stage 'stage2_pairs':
      [s]}: each process's wall time embedding (compiling included) and
      scoring pairs (gathers excluded).
    stage2_mix: w of stage 2's score (1 - w) d_individual + w d_pair.
    stage2_max_similarity: the 'cacenet' row re-sorts only the queries whose
      top-1 stage-1 similarity is at most this (1: every query).
    stage2_queries: how many queries the 'cacenet' row re-sorted, of `num_query`
      (none at w = 0, which keeps the individual order).
    num_query: the queries evaluated.
    processes: how many processes evaluated.
    stage2_pairs_scored_by_process: the pairs each process scored.
    gallery_cache_rows_by_process: the gallery-cache rows each process held.
    cache_bytes_per_image: the host cache's bytes per gallery image.
    cache_on_disk: whether the caches were memory-mapped files.
    selection: how K and w were chosen on a validation split, if they were.
    cameras: for a dataset without cameras, the convention it was scored by.
  """

  stage2_k: int
  seconds_by_process: dict
  stage2_mix: float | None = None
  stage2_max_similarity: float | None = None
  stage2_queries: int | None = None
  num_query: int | None = None
  processes: int | None = None
  stage2_pairs_scored_by_process: list | None = None
  gallery_cache_rows_by_process: list | None = None
  cache_bytes_per_image: int | None = None
  cache_on_disk: bool | None = None
  selection: Stage2Choice | None = None
  cameras: str | None = None

  def to_json(self) -> dict:
    """The fields that are set, in field order, the choice as `Stage2Choice.to_json`."""
    found = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is not None:
        found[field.name] = value.to_json() if isinstance(value, Stage2Choice) else value
    return found


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What `ranking.evaluate` measured.

  Attributes:
    metrics: {row: {'rank1', 'rank5', 'rank10', 'mAP', 'mINP'}} in percent.
    rankings: {row: [Nq, `ranking.TOP`] gallery indices, nearest first}.
    per_query_ap: {row: [Nq] average precision (NaN for queries left out)}.
    info: how it was measured.
    diagnostics: what `diagnose.run_diagnostics` measured (empty with
      `eval.diagnostics` off).
  """

  metrics: dict
  rankings: dict
  per_query_ap: dict
  info: EvaluationInfo
  diagnostics: dict = dataclasses.field(default_factory=dict)

  @property
  def figure_row(self) -> str:
    """The row the figures show: the full model's ranking when it has a pair stage."""
    return 'cacenet' if 'cacenet' in self.metrics else 'individual'

  def to_json(self) -> dict:
    """{'results', 'diagnostics', 'info'}, as results.json keeps each test set."""
    return {'results': self.metrics, 'diagnostics': self.diagnostics, 'info': self.info.to_json()}

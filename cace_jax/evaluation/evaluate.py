"""Evaluation: rank the gallery for every query in each way of scoring pairs, then measure.

The paper's two-stage inference (Sec. 3.5): `stage1` embeds every query and
gallery image and ranks by cosine distance; `stage2` re-sorts each query's
top-K by conditional embeddings computed from compact per-image caches. Each
way of scoring is one row: its distances give a ranking, the ranking gives
metrics. `evaluate` returns all of them, with an info record kept apart.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np

from cace_jax import checkpoint, config_check, input_pipeline, sharding
from cace_jax.errors import ConfigError
from cace_jax.evaluation import (
  diagnostics,
  extract,
  figures,
  k_reciprocal,
  metrics,
  stage1,
  stage2,
)
from cace_jax.models import CACENet
from cace_jax.paths import check_directory

RANKS = (1, 5, 10)
TOP = 50  # gallery indices kept per query and row (the figures show the top 10)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What `evaluate` measured.

  Attributes:
    metrics: {row: {'rank1', 'rank5', 'rank10', 'mAP', 'mINP'}} in percent.
    rankings: {row: [Nq, TOP] gallery indices, nearest first}.
    per_query_ap: {row: [Nq] average precision (NaN for queries left out)}.
    info: how it was measured: 'stage2_k', 'seconds_by_process' {'stage1'[,
      'stage2_pairs']} and, with a stage 2, 'stage2_mix', 'processes',
      'stage2_pairs_scored_by_process', 'gallery_cache_rows_by_process',
      'cache_bytes_per_image', 'cache_on_disk'; 'selection' when K and w
      were chosen on a validation split (`select_stage2`); 'cameras' for a
      dataset without cameras (`NO_CAMERAS`).
    diagnostics: what `diagnose` measured (empty with `eval.diagnostics` off).
  """

  metrics: dict
  rankings: dict
  per_query_ap: dict
  info: dict
  diagnostics: dict = dataclasses.field(default_factory=dict)

  @property
  def figure_row(self) -> str:
    """The row the figures show: the full model's ranking when it has a pair stage."""
    return 'cacenet' if 'cacenet' in self.metrics else 'individual'


def summarize(result: dict) -> dict:
  """Rank-1/5/10, mAP, mINP (percent) from `metrics.evaluate_rank` output."""
  cmc = result['cmc']
  summary = {f'rank{r}': 100.0 * float(cmc[min(r, len(cmc)) - 1]) for r in RANKS}
  summary.update(mAP=100.0 * result['mAP'], mINP=100.0 * result['mINP'])
  return summary


def top_ranking(distmat: np.ndarray, top: int = TOP, chunk_elements: int = 8_000_000) -> np.ndarray:
  """[Nq, top] gallery indices of each row's smallest distances: a stable argsort's first `top`.

  Exact, ties included (the lower index first), without sorting whole rows:
  each row keeps the entries below its top-th smallest value, then the first
  entries equal to it, and sorts only those. Rows go in chunks of about
  `chunk_elements` entries (MSMT17's matrix has ~1e9).
  """
  top = min(top, distmat.shape[1])
  rows = max(1, chunk_elements // distmat.shape[1])
  ranking = np.empty((distmat.shape[0], top), np.int64)
  for start in range(0, distmat.shape[0], rows):
    chunk = np.asarray(distmat[start : start + rows])
    kth = np.partition(chunk, top - 1, axis=1)[:, top - 1 : top]
    below, ties = chunk < kth, chunk == kth
    needed = top - below.sum(axis=1, keepdims=True)
    chosen = below | (ties & (np.cumsum(ties, axis=1) <= needed))
    index = np.nonzero(chosen)[1].reshape(len(chunk), top)  # ascending gallery index
    order = np.argsort(np.take_along_axis(chunk, index, axis=1), axis=1, kind='stable')
    ranking[start : start + len(chunk)] = np.take_along_axis(index, order, axis=1)
  return ranking


def extract_both(
  model: CACENet,
  variables: dict,
  splits: tuple[input_pipeline.SplitData, input_pipeline.SplitData],
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  with_cache: bool,
  cache_dir: str,
) -> tuple[stage1.SplitFeatures, stage1.SplitFeatures]:
  """Stage-1 embeddings of a (query, gallery) pair of splits, and their stage-2 caches.

  The caches are empty without `with_cache`, and go under `cache_dir` when
  too large for memory. Every process holds every query row; with several
  processes, each holds only its own rows of the gallery cache (the larger
  one), and stage 2 scores each pair where its gallery row is
  (`stage2.PairFunction`).
  """
  query, gallery = splits
  query_features = extract.extract_features(
    model, variables, query, config, mesh, with_cache, os.path.join(cache_dir, 'query')
  )
  gallery_features = extract.extract_features(
    model,
    variables,
    gallery,
    config,
    mesh,
    with_cache,
    os.path.join(cache_dir, 'gallery'),
    gather_cache=False,
  )
  return query_features, gallery_features


def evaluate(
  model: CACENet,
  variables: dict,
  query: input_pipeline.SplitData,
  gallery: input_pipeline.SplitData,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  scratch_dir: str | None = None,
) -> Evaluation:
  """Evaluates the model's `variables` (replicated over `mesh`) on a query/gallery split.

  Rows (stage-2 rows re-sort each query's `config.eval.stage2_k` nearest
  gallery images and need a pair stage):
    'individual': cosine distance of individual embeddings (stage 1).
    'clue_alignment': adjacency-weighted similarity of aligned pixel pairs
      (Table 1's "+ visual clue alignment"; adjacencies that compare features).
    'cacenet': (1 - w) d_individual + w d(f(q|g), f(g|q)), w = `eval.stage2_mix`
      (the full two-stage inference; w = 1 is the conditional distance alone).
    '<row>+kr' with `config.eval.rerank`: the same after k-reciprocal re-ranking
      of stage 1 (k1 20, k2 6, lambda 0.3).

  Stage-2 caches too large for memory go to a temporary directory in
  `scratch_dir` (the system's temporary directory if None), removed afterwards.
  """
  if scratch_dir:
    os.makedirs(scratch_dir, exist_ok=True)
  k = config.eval.stage2_k if model.pair_stage else 0
  with tempfile.TemporaryDirectory(prefix='stage2_cache_', dir=scratch_dir) as cache_dir:
    start = time.perf_counter()
    q, g = extract_both(model, variables, (query, gallery), config, mesh, k > 0, cache_dir)
    # Wall time of this process's stage 1 (compiling included), and below of its pair
    # scoring (gathers excluded): with several processes, how the work divides.
    seconds = {'stage1': sharding.per_process(time.perf_counter() - start, np.float32)}
    stage1_rows = {'individual': metrics.cosine_distance(q.embeddings, g.embeddings)}
    if config.eval.rerank:  # k-reciprocal re-ranking of stage 1; stage 2 re-sorts its top-K
      stage1_rows['individual+kr'] = k_reciprocal.rerank_features(
        q.embeddings, g.embeddings, metric='cosine'
      )
    measured = {row: measure(d, query, gallery) for row, d in stage1_rows.items()}
    info = {'stage2_k': k, 'seconds_by_process': seconds}
    conditional = None  # pair distances of the conditional embeddings
    if k > 0:
      scored_here, scoring_seconds = 0, 0.0
      for row, score in stage2.pair_scorers(q.cache).items():
        pair_distances = stage2.make_pair_distances(
          model, variables, score, q.cache, g.cache, mesh, g.held
        )
        if row == 'cacenet':
          conditional = pair_distances
        mix = config.eval.stage2_mix if row == 'cacenet' else 1.0
        for name, base in stage1_rows.items():
          suffix = name[len('individual') :]
          ranker = stage2.TwoStageRanker(base, pair_distances, k)
          measured[row + suffix] = measure(ranker.distances(k, mix), query, gallery)
        scored_here += pair_distances.pairs_scored_here
        scoring_seconds += pair_distances.seconds_here
      seconds['stage2_pairs'] = sharding.per_process(scoring_seconds, np.float32)
      info.update(
        stage2_mix=config.eval.stage2_mix,
        processes=jax.process_count(),
        # Each process scores the pairs whose gallery row it holds, and holds only those rows.
        stage2_pairs_scored_by_process=sharding.per_process(scored_here),
        gallery_cache_rows_by_process=sharding.per_process(
          len(gallery) if g.held is None else g.held.sum()
        ),
        cache_bytes_per_image=stage2.cache_nbytes(g.cache, len(gallery)),
        cache_on_disk=isinstance(jax.tree.leaves(g.cache)[0], np.memmap),
      )
    found = {}
    if config.eval.diagnostics:
      probe = (variables, q.cache, g.cache, g.held) if k > 0 else None
      found = diagnose(model, query, gallery, config, stage1_rows['individual'], conditional, probe)
  return Evaluation(
    metrics={row: m[0] for row, m in measured.items()},
    rankings={row: m[1] for row, m in measured.items()},
    per_query_ap={row: m[2] for row, m in measured.items()},
    info=info,
    diagnostics=found,
  )


def select_stage2(
  model: CACENet,
  variables: dict,
  validation: tuple[input_pipeline.SplitData, input_pipeline.SplitData],
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  scratch_dir: str | None = None,
) -> tuple[ml_collections.ConfigDict, dict]:
  """Chooses stage 2's K and mix w on a validation split: the best mAP over their grids.

  The pair distances of every query's largest-K neighbours are computed
  once; each (K, w) of `eval.stage2_k_grid` x `eval.stage2_mix_grid` then
  re-sorts a prefix of them. Ties go to the smaller K, then the smaller w
  (w = 0 keeps the individual ranking: stage 2 is not used when it does not
  help on validation).

  Returns:
    (a copy of `config` with `eval.stage2_k` and `eval.stage2_mix` set to the
    choice, {'stage2_k', 'stage2_mix', 'individual': validation metrics,
    'grid': [{'k', 'mix', 'mAP', 'rank1'}], 'num_query', 'num_gallery', 'pids',
    'diagnostics': `diagnose` on the validation split at the chosen K, {}
    without `eval.diagnostics`}).
  """
  query, gallery = validation
  k_grid = sorted({int(k) for k in config.eval.stage2_k_grid})
  mixes = sorted({float(w) for w in config.eval.stage2_mix_grid})
  with tempfile.TemporaryDirectory(prefix='stage2_cache_', dir=scratch_dir) as cache_dir:
    q, g = extract_both(model, variables, validation, config, mesh, True, cache_dir)
    base = metrics.cosine_distance(q.embeddings, g.embeddings)
    pair_distances = stage2.make_pair_distances(
      model, variables, stage2.conditional_distance, q.cache, g.cache, mesh, g.held
    )
    ranker = stage2.TwoStageRanker(base, pair_distances, k_grid[-1])  # scored once
    grid = []
    for k in k_grid:
      for mix in mixes:
        found = measure(ranker.distances(k, mix), query, gallery)[0]
        grid.append({'k': k, 'mix': mix, 'mAP': found['mAP'], 'rank1': found['rank1']})
    best = max(grid, key=lambda row: (row['mAP'], row['rank1']))  # first of equals wins
    chosen = copy.deepcopy(config)
    chosen.eval.stage2_k = best['k']
    chosen.eval.stage2_mix = best['mix']
    validation_diagnostics = {}
    if config.eval.diagnostics:  # for choosing recipe knobs without looking at the test split
      conditional, probe = pair_distances, (variables, q.cache, g.cache, g.held)
      validation_diagnostics = diagnose(model, query, gallery, chosen, base, conditional, probe)
  selection = {
    'stage2_k': best['k'],
    'stage2_mix': best['mix'],
    'individual': measure(base, query, gallery)[0],
    'grid': grid,
    'num_query': len(query),
    'num_gallery': len(gallery),
    'pids': sorted({int(p) for p in gallery.pids}),
    'diagnostics': validation_diagnostics,
  }
  return chosen, selection


def evaluate_datasets(
  model: CACENet,
  variables: dict,
  builders: dict,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  scratch_dir: str | None = None,
  validation: tuple[input_pipeline.SplitData, input_pipeline.SplitData] | None = None,
) -> dict[str, Evaluation]:
  """`evaluate` on the query/gallery of each prepared dataset {name: builder}, in turn.

  With a validation split and a pair stage, stage 2's K and w are chosen on
  it once first (`select_stage2`) and every test set is scored with them;
  the choice is recorded as each evaluation's info['selection'].
  """
  selection = None
  if validation is not None and model.pair_stage:
    config, selection = select_stage2(model, variables, validation, config, mesh, scratch_dir)
  evaluations = {}
  for name, builder in builders.items():
    query, gallery = input_pipeline.load_eval_splits(builder, name)
    evaluation = evaluate(model, variables, query, gallery, config, mesh, scratch_dir)
    if selection is not None:
      evaluation.info['selection'] = selection
    note_cameras(evaluation, builder)
    evaluations[name] = evaluation
  return evaluations


def format_selection(selection: dict) -> str:
  """One line: what validation chose and the validation mAP it gave."""
  best = next(
    row
    for row in selection['grid']
    if (row['k'], row['mix']) == (selection['stage2_k'], selection['stage2_mix'])
  )
  return (
    f'validation ({selection["num_query"]} queries, {selection["num_gallery"]} gallery): '
    f'stage2_k={selection["stage2_k"]}, stage2_mix={selection["stage2_mix"]:g} '
    f'(mAP {best["mAP"]:.2f}; individual {selection["individual"]["mAP"]:.2f})'
  )


PROBED_MATCHES = 512  # true-match pairs whose adjacency `diagnose` reads


def diagnose(
  model: CACENet,
  query: input_pipeline.SplitData,
  gallery: input_pipeline.SplitData,
  config: ml_collections.ConfigDict,
  distmat: np.ndarray,
  conditional: tuple | None,
  probe: tuple | None,
) -> dict:
  """The pair-stage diagnostics of `diagnostics`, for one evaluation.

  Args:
    model, query, gallery, config: as `evaluate`'s.
    distmat: [Nq, Ng] stage-1 (individual) cosine distances.
    conditional: the `stage2.PairDistances` of the conditional embeddings;
      None without a pair stage.
    probe: (variables, query cache, gallery cache, the gallery rows held here
      (`stage1.SplitFeatures.held`)); None without a pair stage.

  Returns:
    {'family_retrieval': {'individual'[, 'cacenet']: {'mAP', 'rank1'}},
     'hard_pair_auc': {'individual'[, 'cacenet']: AUC}} where the splits
    carry identity families (`SplitData.families`), and with a pair stage
    'alignment_selectivity' and 'cross_share' (on up to PROBED_MATCHES
    true-match pairs, one per query first) and 'conditioning_strength' (over each query's top
    `eval.stage2_k`, at least 2, stage-1 neighbours).
  """
  found = {}
  ids = (query.pids, gallery.pids, query.camids, gallery.camids)
  q_families, g_families = query.families, gallery.families
  if q_families is not None and g_families is not None:
    pairs, is_match = diagnostics.hard_pairs(*ids, q_families, g_families)
    scored = {'individual': distmat[pairs[:, 0], pairs[:, 1]]}
    if conditional is not None:
      scored['cacenet'] = conditional(pairs[:, 0], pairs[:, 1])
    found['family_retrieval'], found['hard_pair_auc'] = {}, {}
    for row, distances in scored.items():
      row_matrix = np.array(distmat, np.float64)
      row_matrix[pairs[:, 0], pairs[:, 1]] = distances
      found['family_retrieval'][row] = diagnostics.family_retrieval(
        row_matrix, *ids, q_families, g_families
      )
      found['hard_pair_auc'][row] = diagnostics.roc_auc(distances[is_match], distances[~is_match])
  if probe is not None:
    variables, q_cache, g_cache, g_held = probe
    matches = true_match_pairs(query, gallery, PROBED_MATCHES)
    if len(matches):
      blocks = stage2.pair_probe(model, variables, q_cache, g_cache, g_held, ('cross', 'intra'))(
        *matches.T
      )
      found['alignment_selectivity'] = diagnostics.alignment_selectivity(blocks['cross'])
      found['cross_share'] = diagnostics.cross_share(blocks['intra'], blocks['cross'])
    k = max(2, config.eval.stage2_k)
    top = top_ranking(distmat, k)
    embeddings = ('conditional', 'individual')
    probed = stage2.pair_probe(model, variables, q_cache, g_cache, g_held, embeddings)(
      np.repeat(np.arange(len(top)), top.shape[1]), top.ravel()
    )
    found['conditioning_strength'] = diagnostics.conditioning_strength(
      probed['conditional'].reshape(*top.shape, -1), probed['individual'][:: top.shape[1]]
    )
  return found


def true_match_pairs(
  query: input_pipeline.SplitData, gallery: input_pipeline.SplitData, limit: int
) -> np.ndarray:
  """Up to `limit` (query, gallery) index pairs of one identity in different cameras, [M, 2].

  Every query's first match comes before any query's second, so the pairs
  spread over as many queries as possible; only the queries needed are
  searched (no query x gallery matrix, which MSMT17 makes 1e9 entries).
  """
  hits = []  # (query index, its matches in gallery order)
  for q in range(len(query)):
    found = np.flatnonzero((gallery.pids == query.pids[q]) & (gallery.camids != query.camids[q]))
    if len(found):
      hits.append((q, found))
    if len(hits) == limit:
      break
  pairs = []
  for nth in range(max((len(found) for _, found in hits), default=0)):
    pairs += [(q, found[nth]) for q, found in hits if nth < len(found)]
  return np.asarray(pairs[:limit], np.int64).reshape(-1, 2)


def measure(
  distmat: np.ndarray, query: input_pipeline.SplitData, gallery: input_pipeline.SplitData
) -> tuple[dict, np.ndarray, np.ndarray]:
  """(summary metrics, top ranking [Nq, TOP], AP per query) of one row's distances."""
  result = metrics.evaluate_rank(distmat, query.pids, gallery.pids, query.camids, gallery.camids)
  return summarize(result), top_ranking(distmat), result['per_query_ap']


def flatten_metrics(evaluation: Evaluation) -> dict:
  """{'individual/mAP': x, ...} for scalar logging, with any validation choice and diagnostics."""
  flat = {
    f'{row}/{name}': value
    for row, values in evaluation.metrics.items()
    for name, value in values.items()
  }
  for name, value in diagnostics.flatten(evaluation.diagnostics, sep='_').items():
    flat[f'diagnostics/{name}'] = value
  selection = evaluation.info.get('selection', {})
  for name, value in diagnostics.flatten(selection.get('diagnostics', {}), sep='_').items():
    flat[f'validation_diagnostics/{name}'] = value
  if selection:
    flat['validation/stage2_k'], flat['validation/stage2_mix'] = (
      selection['stage2_k'],
      selection['stage2_mix'],
    )
  return flat


def format_table(evaluation: Evaluation, title: str = '') -> str:
  """A fixed-width results table (percent)."""
  columns = [f'rank{r}' for r in RANKS] + ['mAP', 'mINP']
  width = max([len(row) for row in evaluation.metrics] + [10])
  lines = [title] if title else []
  lines.append(
    f'{"":<{width}}  ' + '  '.join(f'{c:>7}' for c in ['R-1', 'R-5', 'R-10', 'mAP', 'mINP'])
  )
  for row, values in evaluation.metrics.items():
    lines.append(f'{row:<{width}}  ' + '  '.join(f'{values[c]:7.2f}' for c in columns))
  if 'cameras' in evaluation.info:
    lines.append(f'cameras: {evaluation.info["cameras"]}')
  lines.extend(format_diagnostics(evaluation.diagnostics))
  if 'selection' in evaluation.info:
    selection = evaluation.info['selection']
    lines.append(format_selection(selection))
    lines.extend('  ' + line for line in format_diagnostics(selection.get('diagnostics', {})))
  return '\n'.join(lines)


def format_diagnostics(found: dict) -> list[str]:
  """The lines printed under the table for `diagnose`'s results (none if empty)."""
  lines = []
  for row, values in found.get('family_retrieval', {}).items():
    lines.append(
      f'within-family retrieval, {row}: mAP {values["mAP"]:.2f}, R-1 {values["rank1"]:.2f}'
    )
  for row, value in found.get('hard_pair_auc', {}).items():
    lines.append(f'hard-pair ROC-AUC (match vs family impostor), {row}: {value:.4f}')
  if 'alignment_selectivity' in found:
    lines.append(
      f'alignment selectivity (effective partners / n, 1 = uniform): '
      f'{found["alignment_selectivity"]:.3f}'
    )
  if 'cross_share' in found:
    lines.append(
      f'cross-image share of the degree (0 = only intra-image edges): {found["cross_share"]:.3f}'
    )
  if 'conditioning_strength' in found:
    lines.append(
      f'conditioning strength (spread of f(q|g) / |f(q|g) - f(q)|, 0 = ignores g): '
      f'{found["conditioning_strength"]:.3f}'
    )
  return lines


def write_report(
  workdir: str,
  step: int,
  config: ml_collections.ConfigDict,
  evaluations: dict[str, Evaluation],
  model: CACENet,
  variables: dict,
  builders: dict,
) -> None:
  """Writes `<workdir>/results.json` and the figures of `figures` (process 0 only).

  results.json holds {'step', 'dataset', 'results': metrics per row,
  'diagnostics', 'info'} of the first test set and, when there are several
  (`data.dataset` 'a+b'), 'test_sets': {name: {'results', 'diagnostics',
  'info'}} for each. The figures show the first test set.
  """
  if jax.process_index() != 0:
    return
  first = next(iter(evaluations))
  evaluation = evaluations[first]
  query, gallery = input_pipeline.load_eval_splits(builders[first], first)
  row = evaluation.figure_row
  figures.write_figures(
    model,
    variables,
    query,
    gallery,
    evaluation.rankings[row],
    evaluation.per_query_ap[row],
    config.data.image_size,
    workdir,
  )
  report = {'step': step, 'dataset': config.data.dataset, **tables_of(evaluation)}
  if len(evaluations) > 1:
    report['test_sets'] = {name: tables_of(e) for name, e in evaluations.items()}
  with open(os.path.join(workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)


def tables_of(evaluation: Evaluation) -> dict:
  """{'results', 'diagnostics', 'info'} of one evaluation, as results.json keeps them."""
  return {
    'results': evaluation.metrics,
    'diagnostics': evaluation.diagnostics,
    'info': evaluation.info,
  }


NO_CAMERAS = 'none: query and gallery taken as different cameras (torchreid convention)'


def note_cameras(evaluation: Evaluation, builder) -> None:
  """Records in info['cameras'] that a dataset without cameras was evaluated by convention."""
  if not input_pipeline.has_cameras(builder):
    evaluation.info['cameras'] = NO_CAMERAS


def check_held_out(
  config: ml_collections.ConfigDict, trained: ml_collections.ConfigDict | None, workdir: str
) -> None:
  """Refuses to choose stage 2 on identities the checkpoint was trained on.

  A validation split is only one if the run held the same identities out:
  the same dataset, `data.validation_ids` and `data.validation_seed`.
  """
  fields = ('dataset', 'validation_ids', 'validation_seed')
  wanted = {name: config.data[name] for name in fields}
  recorded = {name: trained.data.get(name) for name in fields} if trained is not None else None
  if recorded != wanted:
    raise ConfigError(
      f'data.validation_ids={config.data.validation_ids}: {workdir} was not trained with '
      f'these identities held out (it recorded {recorded}, not {wanted}); its validation '
      'split would be made of training images. Evaluate with data.validation_ids=0'
    )


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> Evaluation:
  """Evaluates a checkpoint of `workdir`, prints the table, writes results.json and figures.

  Args:
    config: the run's config (its model fields must match the checkpoint).
    workdir: the training run's directory (or a port).
    step: which checkpoint; the latest if None.

  Raises:
    ConfigError: a config value that cannot work, or a model that does not
      fit the checkpoint (before any data is read or program compiled).
    CheckpointError: no such checkpoint, or it cannot be read.
  """
  config_check.check_config(config)
  check_directory(workdir, '--workdir', must_exist=True)
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(workdir, step, config.model, mesh)
  builders = input_pipeline.prepare_datasets(config)
  validation = None
  if config.data.validation_ids:
    check_held_out(config, run.config, workdir)
    validation = input_pipeline.load_training_splits(builders, config.data).validation
  evaluations = evaluate_datasets(
    run.model, run.variables, builders, config, mesh, workdir, validation
  )
  if jax.process_index() == 0:
    for name, evaluation in evaluations.items():
      print(format_table(evaluation, title=f'{name}, {workdir} step {run.step}'))
  write_report(workdir, run.step, config, evaluations, run.model, run.variables, builders)
  return next(iter(evaluations.values()))

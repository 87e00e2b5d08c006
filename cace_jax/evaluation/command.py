"""The evaluation command (`eval.py`, and training's evaluations): every test set of a run.

A checkpoint is loaded, stage 2's K and w are chosen on the run's
validation split when it has one (`selection`), each test set is evaluated
(`ranking`), and the tables, results.json and figures are written (`report`).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from cace_jax import sharding
from cace_jax.commands import config_check
from cace_jax.data import split_data
from cace_jax.errors import ConfigError
from cace_jax.evaluation import ranking, records, report, selection
from cace_jax.models import CACENet
from cace_jax.paths import check_directory
from cace_jax.runs import checkpoint

NO_CAMERAS = 'none: query and gallery taken as different cameras (torchreid convention)'


def evaluate_datasets(
  model: CACENet,
  variables: dict,
  builders: dict,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  scratch_dir: str | None = None,
  validation: tuple[split_data.SplitData, split_data.SplitData] | None = None,
) -> dict[str, records.Evaluation]:
  """`ranking.evaluate` on the query/gallery of each prepared dataset {name: builder}, in turn.

  With a validation split and a pair stage, stage 2's K and w are chosen on
  it once first (`selection.select_stage2`) and every test set is scored
  with them; the choice is recorded as each evaluation's `info.selection`.
  A dataset without cameras is recorded as scored by convention
  (`info.cameras`).
  """
  choice = None
  if validation is not None and model.pair_stage:
    choice = selection.select_stage2(model, variables, validation, config, mesh, scratch_dir)
    config = choice.configure(config)
  evaluations = {}
  for name, builder in builders.items():
    query, gallery = split_data.load_eval_splits(builder, name)
    evaluation = ranking.evaluate(model, variables, query, gallery, config, mesh, scratch_dir)
    cameras = None if split_data.has_cameras(builder) else NO_CAMERAS
    info = dataclasses.replace(evaluation.info, selection=choice, cameras=cameras)
    evaluations[name] = dataclasses.replace(evaluation, info=info)
  return evaluations


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
) -> records.Evaluation:
  """Evaluates a checkpoint of `workdir`, prints the table, writes results.json and figures.

  Args:
    config: the run's config (its model fields must match the checkpoint).
    workdir: the training run's directory (or a port).
    step: which checkpoint; the latest if None.

  Returns:
    The evaluation of the first test set.

  Raises:
    ConfigError: a config value that cannot work, or a model that does not
      fit the checkpoint (before any data is read or program compiled).
    CheckpointError: no such checkpoint, or it cannot be read.
  """
  config_check.check_config(config)
  check_directory(workdir, '--workdir', must_exist=True)
  mesh = sharding.make_mesh()
  run = checkpoint.load_run(workdir, step, config.model, mesh)
  builders = split_data.prepare_datasets(config)
  validation = None
  if config.data.validation_ids:
    check_held_out(config, run.config, workdir)
    validation = split_data.load_training_splits(builders, config.data).validation
  evaluations = evaluate_datasets(
    run.model, run.variables, builders, config, mesh, workdir, validation
  )
  if jax.process_index() == 0:
    for name, evaluation in evaluations.items():
      print(report.format_table(evaluation, title=f'{name}, {workdir} step {run.step}'))
  report.write_report(workdir, run.step, config, evaluations, run.model, run.variables, builders)
  return next(iter(evaluations.values()))

"""Training: the loop around the train step: data, checkpoints, logging, evaluation.

The step itself and its optimizer are `train_step` (TensorFlow-free); this
module feeds it tf.data batches over a `data` mesh, saves and resumes
checkpoints, stops on a non-finite loss and evaluates periodically and at
the end.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import ml_collections
import numpy as np

from cace_jax import sharding
from cace_jax.commands import config_check
from cace_jax.data import pipeline, split_data
from cace_jax.evaluation import command, records, report
from cace_jax.models import CACENet, build_model
from cace_jax.runs import checkpoint, workdir_lock
from cace_jax.runs.run_logger import RunLogger
from cace_jax.runs.run_record import RunRecord
from cace_jax.train import train_init
from cace_jax.train.train_step import create_optimizer, make_train_step, total_steps, variables_of


def check_finite(metrics: dict, step: int, last_checkpoint: int | None) -> None:
  """Stops training on a NaN/inf loss part, naming the step and the part."""
  for name, value in metrics.items():
    if not math.isfinite(float(value)):
      kept = (
        f'the last good checkpoint (step {last_checkpoint}) is kept'
        if last_checkpoint is not None
        else 'no checkpoint was written yet'
      )
      raise FloatingPointError(
        f'non-finite {name}={value} at step {step}; training stopped, {kept}'
      )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> records.Evaluation | None:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  `data.dataset` may name several datasets joined by '+': training uses the
  union of their training splits (disjoint identities and classes), and the
  evaluations score each test set in turn.

  Where the state starts (fresh, from init files, or resumed past damaged
  checkpoints, which are moved to `<workdir>/damaged_checkpoints/`) is
  decided by `train_init.start_state`.

  Returns:
    The final evaluation (of the first test set), or None when
    `train.eval_at_end` is off.

  Raises:
    ConfigError, DatasetError: a config value, path or dataset that cannot
      work (found before anything is compiled).
    WorkdirBusyError: another live `train.py` holds the workdir.
    CheckpointError: the workdir has checkpoints and none can be restored.
    FloatingPointError: a non-finite loss (the last good checkpoint stays).
    RunFailure: the disk filled up while checkpointing.
  """
  # Before anything expensive: a typo must not cost a dataset build or a compilation.
  config_check.check_config(config, workdir)
  train_init.check_init_files(config, workdir)
  with contextlib.ExitStack() as cleanup:
    mesh = sharding.make_mesh()
    num_devices = jax.device_count()
    builders = split_data.prepare_datasets(config)
    splits = split_data.load_training_splits(builders, config.data)
    train_data = splits.train
    num_classes = len(np.unique(train_data.labels))
    config_check.check_training_data(config, num_classes)
    # One run per workdir (process 0 holds it for all); taken once the datasets
    # are ready, so a failed preparation leaves nothing in the workdir.
    if jax.process_index() == 0:
      cleanup.enter_context(workdir_lock.hold(workdir, log=print))
    manager = checkpoint.create_manager(workdir, keep_last=config.train.keep_last)
    cleanup.callback(manager.close)

    data = config.data
    images_per_step = data.p * data.k * num_devices
    steps_per_epoch = pipeline.steps_per_epoch(
      train_data.labels, data.p, data.k, num_devices, data.sampler
    )
    num_steps = total_steps(config, steps_per_epoch)
    model = build_model(config.model, num_classes)
    tx, schedule = create_optimizer(config, steps_per_epoch, images_per_step)
    start = train_init.start_state(config, workdir, manager, model, tx, num_classes, mesh)
    state, start_step = start.state, start.step

    logger = RunLogger(workdir, num_steps, 0, images_per_step)
    cleanup.callback(logger.close)  # first to close: the bar ends before any error line
    logger.advance(start_step)
    for note in [
      *start.notes,
      f'{num_classes} identities, {len(train_data)} images, {steps_per_epoch} '
      f'steps/epoch, {num_steps} steps, {num_devices} devices × {data.p}×{data.k}',
      *model.pair_stage_notes(),
      *validation_notes(splits),
    ]:
      logger.info(note)

    train_step = make_train_step(model, tx, schedule, config.loss, mesh)
    batches = device_batches(train_data, config, start_step, mesh)
    last_checkpoint = manager.latest_step()
    eval_every = config.train.eval_every_epochs * steps_per_epoch
    evaluate_now = functools.partial(
      evaluate_and_log,
      model,
      builders=builders,
      config=config,
      mesh=mesh,
      workdir=workdir,
      logger=logger,
    )
    evaluations = {}
    for step in range(start_step + 1, num_steps + 1):
      state, metrics = train_step(state, next(batches))
      metrics = jax.device_get(metrics)
      check_finite(metrics, step, last_checkpoint)
      logger.advance(step)
      if step % config.train.log_every == 0 or step == num_steps:
        logger.scalars(step, metrics)
      metrics_for_best = None
      periodic = eval_every and step % eval_every == 0
      final = step == num_steps and config.train.eval_at_end
      if final:
        logger.end_progress()
      if periodic or final:
        evaluations = evaluate_now(
          variables_of(state), step=step, validation=splits.validation if final else None
        )
        first = next(iter(evaluations.values()))  # the first test set picks the best step
        metrics_for_best = {'mAP': first.metrics['individual']['mAP']}
      if (
        step % config.train.checkpoint_every == 0
        or step % steps_per_epoch == 0
        or step == num_steps
      ):
        record = RunRecord(
          step=step,
          epoch=step / steps_per_epoch,
          seed=config.seed,
          num_classes=num_classes,
          config=config,
        )
        checkpoint.save_checkpoint(manager, step, state, record, metrics_for_best)
        last_checkpoint = step
    if start_step >= num_steps and config.train.eval_at_end:  # Already trained: report again.
      logger.end_progress()
      logger.info(f'{workdir} is already trained to step {start_step}; evaluating it')
      evaluations = evaluate_now(variables_of(state), step=start_step, validation=splits.validation)
    if config.train.eval_at_end:  # the final evaluation ran, in the loop or just above
      report.write_report(
        workdir,
        max(start_step, num_steps),
        config,
        evaluations,
        model,
        variables_of(state),
        builders,
      )
    return next(iter(evaluations.values())) if config.train.eval_at_end else None


def validation_notes(splits: split_data.TrainingSplits) -> list[str]:
  """What the log says about a validation split held out of training (nothing without one)."""
  if splits.validation is None:
    return []
  query, gallery = splits.validation
  return [
    f'validation: {len(splits.validation_pids)} training identities held out '
    f'({len(query)} queries, {len(gallery)} gallery images)'
  ]


def device_batches(train_data, config: ml_collections.ConfigDict, start_step: int, mesh):
  """This process's training batches from `start_step` on, as arrays on the mesh's devices."""
  dataset = pipeline.create_train_dataset(
    train_data,
    config.data,
    seed=config.seed,
    num_devices=jax.device_count(),
    local_devices=jax.local_device_count(),
    process_index=jax.process_index(),
    start_step=start_step,
  )
  return sharding.prefetch_to_device(
    ({'image': b['image'], 'label': b['label']} for b in pipeline.iterate_numpy(dataset)),
    mesh,
  )


def evaluate_and_log(
  model: CACENet,
  variables: dict,
  builders: dict,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  workdir: str,
  logger: RunLogger,
  step: int,
  validation: tuple[split_data.SplitData, split_data.SplitData] | None = None,
) -> dict[str, records.Evaluation]:
  """One evaluation during training on every test set, logged as scalars and as tables.

  With `validation` (the final evaluation of a run with a validation split),
  stage 2's K and w are chosen on it first (`command.evaluate_datasets`).
  Scalars of a second and later test set are prefixed with its name.
  """
  evaluations = command.evaluate_datasets(
    model, variables, builders, config, mesh, workdir, validation
  )
  for n, (name, evaluation) in enumerate(evaluations.items()):
    prefix = 'eval' if n == 0 else f'eval_{name.replace("/", "_")}'
    logger.scalars(step, report.flatten_metrics(evaluation), prefix=prefix)
    title = f'step {step}' if len(evaluations) == 1 else f'step {step}, {name}'
    logger.info(report.format_table(evaluation, title=title))
  return evaluations

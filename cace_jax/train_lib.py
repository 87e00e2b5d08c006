"""Training: per-device CACE-Net steps over a `data` mesh, SGD, checkpoints, evaluation.

The step is written for one device's P·K batch and mapped over the devices
with `jax.shard_map` (pmap's successor): each device forms its own B² pairs,
gradients are averaged with `lax.pmean`, and BatchNorm normalises with each
device's own batch statistics (PyTorch DDP behaviour) unless
`model.sync_bn`. Running BN averages are averaged across devices after each
step so every replica holds the same state.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cace_jax import (
  checkpoint,
  config_check,
  input_pipeline,
  losses,
  sharding,
  train_init,
  workdir_lock,
)
from cace_jax.evaluation import evaluate
from cace_jax.models import CACENet, build_model
from cace_jax.run_logger import RunLogger
from cace_jax.sharding import AXIS


@struct.dataclass
class TrainState:
  """Everything a step changes. `rng` is raw key data (checkpointable)."""

  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray


def create_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int, global_batch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and coupled L2 weight decay; linear warm-up then cosine to 0.

  The learning rate is `lr_per_16` scaled linearly with the global batch.
  """
  optim = config.optim
  total = total_steps(config, steps_per_epoch)
  warmup = min(int(round(optim.warmup_epochs * steps_per_epoch)), total - 1)
  peak = optim.lr_per_16 * global_batch / 16
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=peak, warmup_steps=max(warmup, 0), decay_steps=total, end_value=0.0
  )
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  # Added to the gradient before momentum: PyTorch SGD's weight_decay, not AdamW-style.
  parts.append(optax.add_decayed_weights(optim.weight_decay))
  parts.append(optax.sgd(schedule, momentum=optim.momentum))
  if optim.pair_lr_scale != 1.0:  # only then: the optimizer state keeps its official form
    parts.append(scale_pair_stage(optim.pair_lr_scale))
  return optax.chain(*parts), schedule


PAIR_STAGE_PARAMS = train_init.PAIR_STAGE_PARAMS


def scale_pair_stage(factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of the alignment and GCN parameters by `factor`.

  These start where the official init puts them (o at zero, so the others
  get no gradient at first) and are a few thousand of the model's
  parameters; a larger step lets them move within a short CPU schedule.
  Their classifier (`pair_classifier`) keeps the base rate.
  """

  def factor_of(path) -> float:
    return factor if getattr(path[0], 'key', None) in PAIR_STAGE_PARAMS else 1.0

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(lambda path, u: u * factor_of(path), updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(config.optim.epochs * steps_per_epoch)


def init_state(
  model: CACENet, tx: optax.GradientTransformation, image_size, seed: int
) -> TrainState:
  """Initial variables (on the host; replicated by the caller)."""
  init_key, dropout_key, step_key = jax.random.split(jax.random.key(seed), 3)
  images = jnp.zeros((2, *image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
    {'params': init_key, 'dropout': dropout_key}, images
  )
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
    rng=jax.random.key_data(step_key),
  )


def loss_kwargs_from(loss_config: ml_collections.ConfigDict) -> dict:
  """`losses.total_loss` keyword arguments from `config.loss`."""
  return dict(
    label_smoothing=loss_config.label_smoothing,
    margin=loss_config.margin,
    pair_margin=loss_config.pair_margin,
    alpha=loss_config.alpha,
    weights=dict(loss_config.weights),
    rectified_triplets=loss_config.rectified_triplets,
  )


def compute_gradients(
  model: CACENet, loss_kwargs: dict, params, batch_stats, images, labels, dropout_key
):
  """One device's loss, loss parts, new BN statistics and gradients.

  Args:
    images: [P·K, H, W, 3]; labels: [P·K].

  Returns:
    (loss, parts, batch_stats, grads).
  """

  def loss_fn(params):
    outputs, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      rngs={'dropout': dropout_key},
      mutable=['batch_stats'],
    )
    loss, parts = losses.total_loss(outputs, labels, **loss_kwargs)
    return loss, (parts, updates['batch_stats'])

  (loss, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, parts, new_stats, grads


def step_dropout_key(state: TrainState, device_index):
  """Dropout key of a device at the state's step: folded from step, then device."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  return jax.random.fold_in(key, device_index)


def make_train_step(
  model: CACENet,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  loss_config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
):
  """The jitted global step: (state, batch) -> (state, metrics), state donated.

  `batch` arrays are flat global batches [devices·P·K, ...] sharded over the
  mesh's `data` axis; the state is replicated. Each device computes gradients
  on its own P·K images (its own B² pairs); the update uses their mean.
  """
  loss_kwargs = loss_kwargs_from(loss_config)

  def device_step(state: TrainState, batch: dict):
    images, labels = batch['image'], batch['label']  # this device's block: [P·K, ...]
    dropout_key = step_dropout_key(state, jax.lax.axis_index(AXIS))
    loss, parts, batch_stats, grads = compute_gradients(
      model, loss_kwargs, state.params, state.batch_stats, images, labels, dropout_key
    )
    grads = jax.lax.pmean(grads, AXIS)
    # Replicas keep identical running averages (their mean), as the state is replicated.
    batch_stats = jax.lax.pmean(batch_stats, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = jax.lax.pmean({'loss': loss, **parts}, AXIS)
    metrics['lr'] = schedule(state.step)
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics

  spec = jax.sharding.PartitionSpec
  step = jax.shard_map(
    device_step, mesh=mesh, in_specs=(spec(), spec(AXIS)), out_specs=(spec(), spec())
  )
  return jax.jit(step, donate_argnums=(0,))


def variables_of(state: TrainState) -> dict:
  """The model variables of a train state (what `model.apply` takes)."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


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
) -> evaluate.Evaluation | None:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  `data.dataset` may name several datasets joined by '+': training uses the
  union of their training splits (disjoint identities and classes), and the
  evaluations score each test set in turn.

  Resuming takes the newest checkpoint that can be restored; damaged newer
  ones are moved to `<workdir>/damaged_checkpoints/` (`train_init`).

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
  with contextlib.ExitStack() as cleanup:
    mesh = sharding.make_mesh()
    num_devices = jax.device_count()
    builders = input_pipeline.prepare_datasets(config)
    splits = input_pipeline.load_training_splits(builders, config.data)
    train_data = splits.train
    num_classes = len(np.unique(train_data.labels))
    config_check.check_training_data(config, num_classes)
    backbone = None
    if config.init.backbone and not checkpoint.list_steps(workdir):  # checked before compiling
      backbone = train_init.read_backbone(config)
    # One run per workdir (process 0 holds it for all); taken once the datasets
    # are ready, so a failed preparation leaves nothing in the workdir.
    if jax.process_index() == 0:
      cleanup.enter_context(workdir_lock.hold(workdir, log=print))
    manager = checkpoint.create_manager(workdir, keep_last=config.train.keep_last)
    cleanup.callback(manager.close)
    train_init.check_resumable(manager, config, num_classes, workdir)

    data = config.data
    images_per_step = data.p * data.k * num_devices
    steps_per_epoch = input_pipeline.steps_per_epoch(
      train_data.labels, data.p, data.k, num_devices, data.sampler
    )
    num_steps = total_steps(config, steps_per_epoch)
    model = build_model(config.model, num_classes)
    tx, schedule = create_optimizer(config, steps_per_epoch, images_per_step)
    state = sharding.replicate(init_state(model, tx, data.image_size, config.seed), mesh)

    logger = RunLogger(workdir, num_steps, 0, images_per_step)
    cleanup.callback(logger.close)  # first to close: the bar ends before any error line
    fresh_classifiers = []
    if manager.latest_step() is None:  # on resume, the run's own checkpoint wins
      if config.init.backbone:
        state = train_init.init_backbone(state, config, backbone)
      if config.init.checkpoint:
        state, fresh_classifiers = train_init.init_from_checkpoint(state, config)
      state = sharding.replicate(state, mesh)
    restored = checkpoint.restore_checkpoint(manager, state)
    if config.init.checkpoint and restored is None:
      logger.info(
        f'initialised from {config.init.checkpoint}; classifiers kept at their '
        f'initial values: {fresh_classifiers or "none"}'
      )
    if restored is not None:
      state, record, skipped = restored
      if skipped:
        train_init.set_aside_damaged(manager, skipped, logger)
      logger.info(f'resumed from {workdir} at step {record["step"]}')
    elif not (config.init.backbone or config.init.checkpoint) and isinstance(model.depth, int):
      # The official recipe always starts from ImageNet; nothing here can download it.
      logger.info(
        'the backbone starts from random weights; the official recipe starts from '
        'ImageNet: pass --config.init.backbone=<torchvision resnet .pth>'
      )
    start_step = int(state.step)
    logger.advance(start_step)
    logger.info(
      f'{num_classes} identities, {len(train_data)} images, {steps_per_epoch} '
      f'steps/epoch, {num_steps} steps, {num_devices} devices × {data.p}×{data.k}'
    )
    if splits.validation is not None:
      logger.info(
        f'validation: {len(splits.validation_pids)} training identities held out '
        f'({len(splits.validation[0])} queries, {len(splits.validation[1])} gallery images)'
      )

    train_step = make_train_step(model, tx, schedule, config.loss, mesh)
    dataset = input_pipeline.create_train_dataset(
      train_data,
      image_size=data.image_size,
      p=data.p,
      k=data.k,
      seed=config.seed,
      num_devices=num_devices,
      local_devices=jax.local_device_count(),
      process_index=jax.process_index(),
      start_step=start_step,
      sampler=data.sampler,
      flip=data.flip,
      padding=data.padding,
      erasing_probability=data.erasing_probability,
      erasing_fill=data.erasing_fill,
    )
    batches = sharding.prefetch_to_device(
      ({'image': b['image'], 'label': b['label']} for b in input_pipeline.iterate_numpy(dataset)),
      mesh,
    )
    last_checkpoint = manager.latest_step()
    eval_every = config.train.eval_every_epochs * steps_per_epoch
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
      if periodic or final:
        evaluations = evaluate_and_log(
          model,
          variables_of(state),
          builders,
          config,
          mesh,
          workdir,
          logger,
          step,
          splits.validation if final else None,
        )
        first = next(iter(evaluations.values()))  # the first test set picks the best step
        metrics_for_best = {'mAP': first.metrics['individual']['mAP']}
      if (
        step % config.train.checkpoint_every == 0
        or step % steps_per_epoch == 0
        or step == num_steps
      ):
        record = {
          'step': step,
          'epoch': step / steps_per_epoch,
          'seed': config.seed,
          'num_classes': num_classes,
          'config': config.to_json(),
        }
        checkpoint.save_checkpoint(manager, step, state, record, metrics_for_best)
        last_checkpoint = step
    if start_step >= num_steps and config.train.eval_at_end:  # Already trained: report again.
      logger.info(f'{workdir} is already trained to step {start_step}; evaluating it')
      evaluations = evaluate_and_log(
        model,
        variables_of(state),
        builders,
        config,
        mesh,
        workdir,
        logger,
        start_step,
        splits.validation,
      )
    if config.train.eval_at_end:  # the final evaluation ran, in the loop or just above
      evaluate.write_report(
        workdir,
        max(start_step, num_steps),
        config,
        evaluations,
        model,
        variables_of(state),
        builders,
      )
    return next(iter(evaluations.values())) if config.train.eval_at_end else None


def evaluate_and_log(
  model: CACENet,
  variables: dict,
  builders: dict,
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  workdir: str,
  logger: RunLogger,
  step: int,
  validation: tuple[input_pipeline.SplitData, input_pipeline.SplitData] | None = None,
) -> dict[str, evaluate.Evaluation]:
  """One evaluation during training on every test set, logged as scalars and as tables.

  With `validation` (the final evaluation of a run with a validation split),
  stage 2's K and w are chosen on it first (`evaluate.evaluate_datasets`).
  Scalars of a second and later test set are prefixed with its name.
  """
  evaluations = evaluate.evaluate_datasets(
    model, variables, builders, config, mesh, workdir, validation
  )
  for n, (name, evaluation) in enumerate(evaluations.items()):
    prefix = 'eval' if n == 0 else f'eval_{name.replace("/", "_")}'
    logger.scalars(step, evaluate.flatten_metrics(evaluation), prefix=prefix)
    title = f'step {step}' if len(evaluations) == 1 else f'step {step}, {name}'
    logger.info(evaluate.format_table(evaluation, title=title))
  return evaluations

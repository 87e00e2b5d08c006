"""The train step and its optimizer: what one step of training computes, and nothing else.

The step is written for one device's P·K batch and mapped over the devices
with `jax.shard_map` (pmap's successor): each device forms its own B² pairs,
gradients are averaged with `lax.pmean`, and BatchNorm normalises with each
device's own batch statistics (PyTorch DDP behaviour) unless
`model.sync_bn`. Running BN averages are averaged across devices after each
step so every replica holds the same state.

This module needs JAX, flax and optax only: no TensorFlow, no ml_collections
(configs are read by attribute, so any object with the fields works). The
training loop around it is `train_lib`; the accelerator check
(`benchmarks/device_check.py`) runs this step on machines without TensorFlow.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from flax import struct
import jax
import jax.numpy as jnp
import optax

from cace_jax.models import CACENet, losses
from cace_jax.sharding import AXIS

if TYPE_CHECKING:
  from ml_collections import ConfigDict

# Top-level parameter collections of the pair stage (alignment and GCN).
PAIR_STAGE_PARAMS = ('pair_attention', 'pair_graph')


@struct.dataclass
class TrainState:
  """Everything a step changes. `rng` is raw key data (checkpointable)."""

  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray


def create_optimizer(
  config: ConfigDict, steps_per_epoch: int, global_batch: int
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


def total_steps(config: ConfigDict, steps_per_epoch: int) -> int:
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(config.optim.epochs * steps_per_epoch)


def init_variables(model: CACENet, rngs, image_size) -> dict:
  """`model.init(rngs, images, train=False)` on two zero images, compiled cheaply.

  Initialisation runs once, so its own speed does not matter, but XLA:CPU
  spends ~18 s optimising the threefry draws of even the tiny model (about
  as long as compiling its train step). At LLVM optimisation level 0 the
  same program compiles in ~8 s and draws the same values to one ulp
  (floating-point contraction differs). Other backends compile as usual.
  """
  images = jnp.zeros((2, *image_size, 3), jnp.float32)
  lowered = jax.jit(functools.partial(model.init, train=False)).lower(rngs, images)
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else {}
  return lowered.compile(compiler_options=options)(rngs, images)


def init_state(
  model: CACENet | None,
  tx: optax.GradientTransformation,
  image_size,
  seed: int,
  variables: dict | None = None,
) -> TrainState:
  """The state of step 0 (on the host; replicated by the caller).

  `variables`, when given, are the initial variables and `model` is unused:
  one initialisation can then start several states.
  """
  init_key, dropout_key, step_key = jax.random.split(jax.random.key(seed), 3)
  if variables is None:
    variables = init_variables(model, {'params': init_key, 'dropout': dropout_key}, image_size)
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
    rng=jax.random.key_data(step_key),
  )


def loss_kwargs_from(loss_config: ConfigDict) -> dict:
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
  loss_config: ConfigDict,
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

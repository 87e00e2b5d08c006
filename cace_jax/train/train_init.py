"""Where a run's train state starts: ImageNet weights, another run, or its own checkpoints.

`start_state` is the one call that decides it. A fresh run starts from its
initialisation, optionally with a torchvision backbone (`init.backbone`) or
every variable of another checkpoint (`init.checkpoint`). A resumed run
starts from the newest of its own checkpoints that can be restored:
`check_resumable` first refuses a workdir trained with another model (not
damage: the wrong config), and `set_aside_damaged` keeps checkpoints that
could not be read where the user can find them and where training will not
trip over them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from cace_jax import sharding
from cace_jax.errors import CheckpointError, ConfigError, PortError
from cace_jax.interop import torch_weights
from cace_jax.runs import checkpoint
from cace_jax.runs.run_record import RunRecord
from cace_jax.train.train_step import PAIR_STAGE_PARAMS, init_state


def with_variables(state: Any, params, batch_stats) -> Any:
  """`state` with loaded (host, any float dtype) variables, as float32 jax arrays."""
  as_float32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  return state.replace(params=as_float32(params), batch_stats=as_float32(batch_stats))


def read_backbone(config: ml_collections.ConfigDict) -> dict:
  """The torchvision state_dict of `init.backbone`, checked against `config.model`.

  Read before any model is initialised or compiled, so that a file of another
  depth or stem width (torchvision's is 64) is one line naming both.
  """
  depth = config.model.depth
  if not str(depth).isdigit():
    raise ConfigError(f'init.backbone needs a torchvision depth, not model.depth={depth!r}')
  try:
    state = torch_weights.strip_prefix(torch_weights.read_state_dict(config.init.backbone))
  except (PortError, OSError) as e:
    raise ConfigError(f'init.backbone={config.init.backbone}: {e}') from e
  found = torch_weights.describe_resnet(state)
  if found is not None and found[0] is not None and found != (int(depth), config.model.width):
    raise ConfigError(
      f'init.backbone={config.init.backbone} holds a ResNet-{found[0]} of width {found[1]}: '
      f'set model.depth={found[0]} and model.width={found[1]} (this config has '
      f'{depth!r} and {config.model.width}; torchvision ResNets have width 64)'
    )
  return state


def init_backbone(state: Any, config: ml_collections.ConfigDict, weights=None) -> Any:
  """Loads ImageNet weights from a torchvision ResNet file into the backbone (`init.backbone`).

  Args:
    state: the initialised TrainState.
    config: the run's config.
    weights: the file's state_dict if already read (`read_backbone`).
  """
  weights = read_backbone(config) if weights is None else weights
  try:
    params, batch_stats = torch_weights.load_backbone_into(
      jax.device_get(state.params),
      jax.device_get(state.batch_stats),
      weights,
      int(config.model.depth),
    )
  except PortError as e:
    raise ConfigError(f'init.backbone={config.init.backbone}: {e}') from e
  return with_variables(state, params, batch_stats)


CLASSIFIERS = ('params/classifier', 'params/pair_classifier')
# A checkpoint without a pair stage (gcn 'none') may start a full model: the
# second phase of a two-phase schedule, whose first phase trains individual
# embeddings only. The pair stage then starts from its initialisation.
PAIR_STAGE = tuple(f'params/{name}' for name in PAIR_STAGE_PARAMS)


def init_from_checkpoint(state: Any, config: ml_collections.ConfigDict) -> tuple[Any, list[str]]:
  """Starts from every variable of a checkpoint (`init.checkpoint`: a workdir).

  The workdir may hold a port (`tools/port.py official ...`) or
  another run. All variables must match the model exactly, except the two
  classifiers, which are kept freshly initialised when their number of
  identities differs (fine-tuning on another dataset), and the pair stage,
  kept at its initialisation when the checkpoint has none (a gcn 'none' run
  as the first phase of a two-phase schedule). Optimizer state and step
  start afresh.

  Returns:
    (state, the classifier variables that were not loaded).
  """
  source_dir = config.init.checkpoint
  try:
    _, source, _ = checkpoint.read_checkpoint(source_dir)
    target = {
      'params': jax.device_get(state.params),
      'batch_stats': jax.device_get(state.batch_stats),
    }
    merged, kept = checkpoint.merge_variables(
      target,
      {'params': source['params'], 'batch_stats': source['batch_stats']},
      replaceable=CLASSIFIERS,
      absent=PAIR_STAGE,
    )
  except (CheckpointError, ValueError) as e:
    raise ConfigError(f'init.checkpoint={source_dir}: {e}') from e
  return with_variables(state, merged['params'], merged['batch_stats']), kept


def check_resumable(manager, config, num_classes: int, workdir: str) -> None:
  """Fails, naming the fields, when the newest checkpoint was trained with another model.

  Such a checkpoint is not damaged: it cannot hold this config's variables.
  Said before restoring, so that it is not mistaken for damage and set aside.
  """
  step = manager.latest_step()
  if step is None:
    return
  try:
    stored = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    record = RunRecord.from_json(stored['record'])
  except Exception:  # noqa: BLE001  (an unreadable record: restore_checkpoint reports it)
    return
  ours, theirs = dict(config.model), checkpoint.recorded_model(record.model_fields)
  differ = [
    f'model.{name}={ours[name]!r} (the checkpoints have {theirs[name]!r})'
    for name in sorted(ours)
    if name in theirs and ours[name] != theirs[name] and name not in RESUMABLE_MODEL_FIELDS
  ]
  if record.num_classes not in (None, num_classes):
    differ.append(f'{num_classes} training identities (the checkpoints have {record.num_classes})')
  if differ:
    raise ConfigError(
      f'{workdir} holds a run of another model: {", ".join(differ)}; resume with the '
      'config it was trained with, or use another --workdir'
    )


# Fields that do not change the variables: a resumed run may change them.
RESUMABLE_MODEL_FIELDS = ('dropout_rate', 'dtype', 'sync_bn', 'pair_path', 'plugins')


def set_aside_damaged(manager, skipped: list[tuple[int, str]]) -> list[str]:
  """Moves checkpoints that could not be restored out of the way (kept); returns why, per step.

  Training goes on from an older step and will save these steps again.
  """
  notes = []
  if jax.process_index() == 0:
    moved = checkpoint.set_aside(manager, [step for step, _ in skipped])
    for (step, why), where in zip(skipped, moved):
      notes.append(f'checkpoint step {step} cannot be restored ({why}); moved to {where}')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('set_aside_damaged')
    manager.reload()
  return notes


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts: its train state (replicated over the mesh) and what to log about it."""

  state: Any
  step: int
  notes: tuple[str, ...]


def check_init_files(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Reads `init.backbone` for a run that will start fresh, before any dataset or compilation.

  A file of another depth or width is then one line naming both, and the
  workdir is left as it was. `start_state` reads the file again to load it.
  """
  if config.init.backbone and not checkpoint.list_steps(workdir):
    read_backbone(config)


def start_state(
  config: ml_collections.ConfigDict,
  workdir: str,
  manager,
  model,
  tx,
  num_classes: int,
  mesh: jax.sharding.Mesh,
) -> Start:
  """The state a run starts from, in one place: resumed, or fresh with its initial weights.

  In order: a workdir trained with another model is refused
  (`check_resumable`); the state is initialised; a run without checkpoints
  loads `init.backbone` or `init.checkpoint` into it; then the newest
  checkpoint that can be restored replaces it, damaged newer ones being set
  aside (`set_aside_damaged`).

  Returns:
    Start(state, its step, the notes the run's log should show).

  Raises:
    ConfigError: the workdir holds a run of another model, or an init file
      does not fit.
    CheckpointError: there are checkpoints and none can be restored.
  """
  check_resumable(manager, config, num_classes, workdir)
  state = sharding.replicate(init_state(model, tx, config.data.image_size, config.seed), mesh)
  notes = []
  fresh_classifiers = []
  if manager.latest_step() is None:  # on resume, the run's own checkpoint wins
    if config.init.backbone:
      state = init_backbone(state, config)
    if config.init.checkpoint:
      state, fresh_classifiers = init_from_checkpoint(state, config)
    state = sharding.replicate(state, mesh)
  restored = checkpoint.restore_checkpoint(manager, state)
  if restored is not None:
    state, record, skipped = restored
    notes += set_aside_damaged(manager, skipped) if skipped else []
    notes.append(f'resumed from {workdir} at step {record.step}')
  elif config.init.checkpoint:
    notes.append(
      f'initialised from {config.init.checkpoint}; classifiers kept at their '
      f'initial values: {fresh_classifiers or "none"}'
    )
  elif not config.init.backbone and isinstance(model.depth, int):
    # The official recipe always starts from ImageNet; nothing here can download it.
    notes.append(
      'the backbone starts from random weights; the official recipe starts from '
      'ImageNet: pass --config.init.backbone=<torchvision resnet .pth>'
    )
  return Start(state=state, step=int(state.step), notes=tuple(notes))

"""Orbax checkpoints of a training run (the last k, plus the best by mAP), and loading a run.

A checkpoint holds the train state (step, params, batch_stats, opt_state) and
a small JSON record of its run (`run_record.RunRecord`: step, seed, config). Orbax writes
each step into a temporary directory and renames it when complete, so an
interrupted save is never listed as a checkpoint; such leftovers are cleaned
up when the manager is created.

`load_run` is the one way every command (evaluation, export, porting,
benchmarks) turns a workdir into a model and its variables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from cace_jax import sharding
from cace_jax.errors import CheckpointError, ConfigError, RunFailure, is_disk_full
from cace_jax.models import build_model, make_resnet
from cace_jax.models.attention import RENAMED_KINDS
from cace_jax.runs.run_record import RunRecord

BEST_METRIC = 'mAP'
# Saves write one zarr directory per array rather than orbax's default OCDBT
# store. An OCDBT save leaves ~4 Python objects per array behind in tensorstore
# (its KvStore.Spec(...).to_json(), which orbax calls per array), so host memory
# grew ~72 MiB per 1000 saves of the tiny state; in this format 23 MiB, a
# per-save remainder in orbax's I/O metrics that does not grow with the model
# (benchmarks/memory_parts.py --part=checkpoint). Restoring reads either
# format, so runs saved before this change resume.
USE_OCDBT = False


def _not_the_ocdbt_merge_notice(record: logging.LogRecord) -> bool:
  # Orbax 0.12.8 tries to merge per-process OCDBT files after every save, OCDBT
  # or not, and warns when there are none: in this format, on every save.
  return 'Skipping merge of OCDBT checkpoints' not in str(record.msg)


if not USE_OCDBT:
  logging.getLogger('absl').addFilter(_not_the_ocdbt_merge_notice)  # orbax logs through absl

# Reading a run, orbax warns that the directory is read only (as it was asked to
# be) and that the state has no metadata file of its own (the step has one): every
# evaluation, search and export printed both, and neither is anything to act on.
_READ_ONLY_NOTICES = ('Given directory is read only', 'Metadata file does not exist')


def _not_a_read_only_notice(record: logging.LogRecord) -> bool:
  return not str(record.msg).startswith(_READ_ONLY_NOTICES)


@contextlib.contextmanager
def _without_read_only_notices():
  """Drops orbax's two read-only notices while a run is read, and only then."""
  logger = logging.getLogger('absl')
  logger.addFilter(_not_a_read_only_notice)
  try:
    yield
  finally:
    logger.removeFilter(_not_a_read_only_notice)


def create_manager(
  workdir: str, keep_last: int = 3, keep_best: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """A CheckpointManager over `<workdir>/checkpoints`.

  Args:
    workdir: the run's directory.
    keep_last: the newest checkpoints to keep.
    keep_best: also keep the checkpoint with the highest mAP among those saved
      with metrics (periodic evaluation).
    read_only: for evaluation: restore only, never write or delete.
  """
  policies = [ocp.checkpoint_managers.LatestN(n=keep_last)]
  if keep_best:
    policies.append(
      ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[BEST_METRIC],
        n=1,
        keep_checkpoints_without_metrics=False,
      )
    )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
    create=not read_only,
    read_only=read_only,
    # Orbax sets 0 itself for a read-only manager, with a warning each time.
    save_interval_steps=0 if read_only else 1,
    enable_async_checkpointing=False,
  )
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  handlers = {
    'state': ocp.StandardCheckpointHandler(use_ocdbt=USE_OCDBT),
    'record': ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save_checkpoint(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  record: RunRecord,
  metrics: dict | None = None,
) -> None:
  """Saves `state` and its run's `record` at `step` (blocking).

  `metrics` (with 'mAP') makes the checkpoint a candidate for "best". The
  step appears only once it is complete: orbax writes into a temporary
  directory and renames it, so a kill or a full disk mid-save leaves the
  previous checkpoints as the latest.

  Raises:
    RunFailure: the disk is full (the message says which step resumes).
  """
  try:
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record.to_json())
      ),
      metrics=metrics,
      force=True,
    )
    manager.wait_until_finished()
  except Exception as e:
    if not is_disk_full(e):
      raise
    # Orbax wrote into a temporary directory, removed when the next manager starts.
    previous = [s for s in manager.all_steps() if s != step]
    raise RunFailure(
      f'no space left on the device writing checkpoint step {step} to {manager.directory}: '
      f'free some space and run again; '
      + (f'it resumes from step {max(previous)}' if previous else 'no checkpoint was complete yet')
    ) from e


def restore_checkpoint(
  manager: ocp.CheckpointManager, target: Any, step: int | None = None
) -> tuple[Any, RunRecord, list[tuple[int, str]]] | None:
  """Restores the newest checkpoint that can be read into the structure of `target`.

  A checkpoint that cannot be restored (truncated or missing files, a
  corrupt record) is skipped for the next older one; it is reported, never
  deleted (`set_aside` moves it out of the way when training goes on).

  Args:
    manager: from `create_manager`.
    target: a state with the expected tree, shapes, dtypes and shardings
      (arrays or jax.ShapeDtypeStruct).
    step: restore exactly this checkpoint (no fallback); the newest if None.

  Returns:
    (state, record, skipped) with `skipped` the (step, reason) of every newer
    checkpoint that could not be read, or None when there is no checkpoint.

  Raises:
    CheckpointError: there are checkpoints but none of them can be restored.
  """
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  skipped = []
  for candidate in steps:
    try:
      restored = manager.restore(
        candidate,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      skipped.append((candidate, failure_reason(e)))
      continue
    return restored['state'], RunRecord.from_json(restored['record']), skipped
  raise CheckpointError(
    f'no checkpoint in {manager.directory} can be restored: '
    + '; '.join(f'step {s}: {why}' for s, why in skipped)
    + ' (nothing was changed; a config other than the one trained, e.g. another optimizer, '
    "cannot resume: pass the run's config, or move the checkpoints directory away to start "
    'afresh)'
  )


def failure_reason(error: BaseException, limit: int = 200) -> str:
  """A short reason for an unreadable checkpoint: the innermost message, first line."""
  while error.__cause__ is not None:
    error = error.__cause__
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= limit else line[:limit] + '...'


DAMAGED_DIR = 'damaged_checkpoints'


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves unreadable checkpoints to `<workdir>/damaged_checkpoints/` (kept, never deleted).

  Training resumed from an older step will save these steps again; orbax
  refuses to overwrite a step, and the user may want the files.

  Returns:
    Where each one went.
  """
  checkpoints = str(manager.directory)
  damaged = os.path.join(os.path.dirname(checkpoints), DAMAGED_DIR)
  os.makedirs(damaged, exist_ok=True)
  moved = []
  for step in steps:
    destination = os.path.join(damaged, str(step))
    suffix = 1
    while os.path.exists(destination):
      destination = os.path.join(damaged, f'{step}.{suffix}')
      suffix += 1
    os.rename(os.path.join(checkpoints, str(step)), destination)
    moved.append(destination)
  manager.reload()
  return moved


def list_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `<workdir>/checkpoints` (no orbax needed)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def read_checkpoint(workdir: str, step: int | None = None) -> tuple[int, dict, RunRecord]:
  """Reads a checkpoint without knowing its structure (evaluation, porting, tests).

  Works whatever topology saved it (e.g. two processes of two devices): the
  arrays are restored onto this process's first device. Only complete
  checkpoints are listed (orbax renames a step into place when it is
  written), so a run that is training meanwhile is read safely.

  Returns:
    (step, state as nested dicts of arrays, record).

  Raises:
    CheckpointError: no such checkpoint, or it cannot be read; the message
      names the directory, the step and the steps available.
  """
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise CheckpointError(
      f'no checkpoint in {os.path.abspath(os.path.join(workdir, "checkpoints"))} '
      f'({workdir} is not a training run or a port)'
    )
  with _without_read_only_notices():
    return _read_checkpoint(workdir, step)


def _read_checkpoint(workdir: str, step: int | None) -> tuple[int, dict, RunRecord]:
  manager = create_manager(workdir, read_only=True)
  try:
    available = list(manager.all_steps())
    step = manager.latest_step() if step is None else step
    if step is None or step not in available:
      raise CheckpointError(
        f'no checkpoint{"" if step is None else f" at step {step}"} in '
        f'{manager.directory} (available: {available})'
      )
    state_dir = os.path.join(str(manager.directory), str(step), 'state')
    try:
      record = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
      checkpointer = ocp.StandardCheckpointer()
      metadata = checkpointer.metadata(state_dir).item_metadata
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
      )
      state = checkpointer.restore(state_dir, abstract)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      others = [s for s in available if s != step]
      raise CheckpointError(
        f'checkpoint step {step} in {manager.directory} cannot be read ({failure_reason(e)}); '
        f'other steps: {others or "none"}'
        + (f' (pass --checkpoint={others[-1]} to use one)' if others else '')
      ) from e
  finally:
    manager.close()
  return step, state, RunRecord.from_json(record['record'])


def merge_variables(
  target: dict, source: dict, replaceable: tuple[str, ...] = (), absent: tuple[str, ...] = ()
) -> tuple[dict, list[str]]:
  """`source`'s variables in `target`'s tree; every mismatch is an error, naming each.

  Args:
    target: {'params', 'batch_stats'} of the model being initialised.
    source: the same collections read from a checkpoint.
    replaceable: '/'-joined path prefixes (e.g. 'params/classifier') whose
      leaves may be absent from `source` or differ in shape; they keep the
      target's value (a classifier over another dataset's identities).
    absent: prefixes whose leaves may be absent from `source` (they keep the
      target's value) but must match when present (a pair stage that the
      source model did not have).

  Returns:
    (merged variables, the replaceable paths that kept the target's value).

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped variable.
  """
  flat_target = traverse_util.flatten_dict(target, sep='/')
  flat_source = traverse_util.flatten_dict(source, sep='/')
  under = lambda path, prefixes: any(path.startswith(prefix + '/') for prefix in prefixes)
  is_replaceable = lambda path: under(path, replaceable)
  merged, kept, problems = {}, [], []
  for path, value in flat_target.items():
    found = flat_source.get(path)
    if found is not None and found.shape == value.shape:
      merged[path] = found
    elif is_replaceable(path) or (found is None and under(path, absent)):
      merged[path] = value
      kept.append(path)
    elif found is None:
      problems.append(f'missing {path}')
    else:
      problems.append(f'{path} has shape {tuple(found.shape)}, expected {tuple(value.shape)}')
  problems += [
    f'unexpected {path}'
    for path in flat_source
    if path not in flat_target and not is_replaceable(path)
  ]
  if problems:
    raise ValueError('; '.join(problems))
  return traverse_util.unflatten_dict(merged, sep='/'), kept


@dataclasses.dataclass(frozen=True)
class Run:
  """A checkpoint of a workdir, ready to apply: what `load_run` returns.

  Attributes:
    step: the checkpoint's step.
    record: what the checkpoint says about its run (its config, or a port's model).
    model: the CACENet (or, for a bare torchvision port, the ResNet).
    variables: {'params', 'batch_stats'}.
    config: the training config the run was made with; None for ports.
  """

  step: int
  record: RunRecord
  model: nn.Module
  variables: dict
  config: ml_collections.ConfigDict | None


def recorded_model(model_config) -> dict:
  """A checkpoint's model config in today's names.

  Adjacencies 'correspondence' and 'intra' were renamed when the paper's
  raw-feature form arrived; a record that holds them predates it, so they
  meant the cosine form.
  """
  fields = dict(model_config)
  if fields.get('adjacency') in RENAMED_KINDS:
    fields['adjacency'] = RENAMED_KINDS[fields['adjacency']]
  return fields


def load_run(
  workdir: str, step: int | None = None, model_config=None, mesh: jax.sharding.Mesh | None = None
) -> Run:
  """Reads a checkpoint of `workdir` and builds the model it belongs to.

  Args:
    workdir: a training run, or a port (`tools/port.py`).
    step: which checkpoint; the latest if None.
    model_config: the model to build (e.g. eval.py's `config.model`); None:
      the one the checkpoint recorded.
    mesh: replicate the variables over it; None leaves them on one device.

  Raises:
    FileNotFoundError: no such checkpoint, naming the directory.
    ConfigError: the model config names an unknown field, or builds a model
      whose variables do not fit the checkpoint (the message names the
      config fields that differ from the checkpoint's).
  """
  step, state, record = read_checkpoint(workdir, step)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  if record.is_torchvision:  # a torchvision ImageNet network, not a CACE-Net
    fc = variables['params'].get('fc')
    model = make_resnet(
      record.model['resnet_depth'],
      last_stride=2,
      num_classes=fc['kernel'].shape[-1] if fc else None,
    )
  else:
    user_model = model_config is not None
    if not user_model:
      model_config = recorded_model(record.model_fields)
    # Evaluation normalises with running averages: no cross-device BN statistics.
    model = build_model(model_config, record.num_classes, sync_bn=False)
    if user_model:
      check_model_fits(
        model,
        variables,
        model_config,
        recorded_model(record.model_fields),
        f'checkpoint step {step} of {workdir}',
      )
  if mesh is not None:
    # Restored arrays sit on this process's devices; a mesh over several processes
    # takes host values (the same on each), never a transfer between hosts.
    variables = sharding.replicate(jax.device_get(variables), mesh)
  return Run(step=step, record=record, model=model, variables=variables, config=record.config)


def check_model_fits(
  model: nn.Module, variables: dict, model_config, recorded: dict, where: str
) -> None:
  """Raises ConfigError unless `model`'s variables have exactly the shapes of `variables`.

  Run before evaluating with a config's model: a different `model.embed_dim`
  or `model.depth` would otherwise fail deep inside flax. The message names
  the config fields that differ from the ones the checkpoint recorded.
  """
  key = jax.random.key(0)
  shapes = jax.eval_shape(
    lambda: model.init({'params': key, 'dropout': key}, jnp.zeros((1, 64, 32, 3)), train=False)
  )
  expected = {name: shapes.get(name, {}) for name in ('params', 'batch_stats')}
  try:
    merge_variables(expected, variables)
  except ValueError as e:
    fields = dict(model_config)
    differ = [
      f'model.{name}={fields[name]!r} (the checkpoint has {recorded[name]!r})'
      for name in sorted(fields)
      if name in recorded and fields[name] != recorded[name]
    ]
    raise ConfigError(
      f"the config's model does not fit {where}: "
      + (', '.join(differ) if differ else str(e))
      + '; drop those overrides or pass the config the run was trained with'
    ) from e

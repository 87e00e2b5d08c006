"""Orbax checkpoints of a training run (the last k, plus the best by mAP), and loading a run.

A checkpoint holds the train state (step, params, batch_stats, opt_state) and
a small JSON record (data position, RNG seed, config, metrics). Orbax writes
each step into a temporary directory and renames it when complete, so an
interrupted save is never listed as a checkpoint; such leftovers are cleaned
up when the manager is created.

`load_run` is the one way every command (evaluation, export, porting,
benchmarks) turns a workdir into a model and its variables.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from cace_jax import sharding
from cace_jax.models import build_model, make_resnet
from cace_jax.models.attention import RENAMED_KINDS

BEST_METRIC = 'mAP'


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
    enable_async_checkpointing=False,
  )
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'record'))


def save_checkpoint(
  manager: ocp.CheckpointManager, step: int, state: Any, record: dict, metrics: dict | None = None
) -> None:
  """Saves `state` and the JSON-serialisable `record` at `step` (blocking).

  `metrics` (with 'mAP') makes the checkpoint a candidate for "best".
  """
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
    metrics=metrics,
    force=True,
  )
  manager.wait_until_finished()


def restore_checkpoint(
  manager: ocp.CheckpointManager, target: Any, step: int | None = None
) -> tuple[Any, dict] | None:
  """Restores the latest (or given) checkpoint into the structure of `target`.

  Args:
    manager: from `create_manager`.
    target: a state with the expected tree, shapes, dtypes and shardings
      (arrays or jax.ShapeDtypeStruct).
    step: which checkpoint; the latest if None.

  Returns:
    (state, record), or None when the directory holds no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()
    ),
  )
  return restored['state'], restored['record']


def read_checkpoint(workdir: str, step: int | None = None) -> tuple[int, dict, dict]:
  """Reads a checkpoint without knowing its structure (evaluation, porting, tests).

  Works whatever topology saved it (e.g. two processes of two devices): the
  arrays are restored onto this process's first device.

  Returns:
    (step, state as nested dicts of arrays, record). Raises FileNotFoundError
    naming the directory when it holds no such checkpoint.
  """
  manager = create_manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(
        f'no checkpoint{"" if step is None else f" at step {step}"} in '
        f'{manager.directory} (available: {list(manager.all_steps())})'
      )
    record = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']
    state_dir = os.path.join(str(manager.directory), str(step), 'state')
  finally:
    manager.close()
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(state_dir).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
  )
  return step, checkpointer.restore(state_dir, abstract), record


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
    record: its JSON record ('config' for trained runs, 'model' for ports).
    model: the CACENet (or, for a bare torchvision port, the ResNet).
    variables: {'params', 'batch_stats'}.
    config: the training config the run was made with; None for ports.
  """

  step: int
  record: dict
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
    ConfigError: the model config names an unknown field.
  """
  step, state, record = read_checkpoint(workdir, step)
  config = ml_collections.ConfigDict(json.loads(record['config'])) if record.get('config') else None
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  ported = record.get('model') or {}
  if 'resnet_depth' in ported:  # a torchvision ImageNet network, not a CACE-Net
    fc = variables['params'].get('fc')
    model = make_resnet(
      ported['resnet_depth'], last_stride=2, num_classes=fc['kernel'].shape[-1] if fc else None
    )
  else:
    if model_config is None:
      model_config = recorded_model(config.model if config is not None else ported)
    # Evaluation normalises with running averages: no cross-device BN statistics.
    model = build_model(model_config, record.get('num_classes'), sync_bn=False)
  if mesh is not None:
    variables = sharding.replicate(variables, mesh)
  return Run(step=step, record=record, model=model, variables=variables, config=config)

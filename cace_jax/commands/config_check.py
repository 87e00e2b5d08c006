"""What a config may hold: every value checked before any expensive work starts.

Commands call `check_config` first (before preparing a dataset, compiling
or training), so that `--config.data.image_size=64`, an unknown
`model.depth`, `train.checkpoint_every=0` or a workdir that is a file ends
in one line naming the field and what was expected, not in a traceback from
deep inside JAX minutes later. The rules are a table (`RULES`), one entry
per field whose values are restricted; fields a config does not have (older
checkpoint records) are skipped.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from cace_jax import plugins
from cace_jax.data import augment, pipeline, split_data
from cace_jax.errors import ConfigError
from cace_jax.models import PAIR_PATHS, POOLINGS, RESNET_SPECS, adjacency_kinds, gcn_kinds, losses
from cace_jax.models.attention import RENAMED_KINDS
from cace_jax.paths import check_directory

# A rule returns None for a valid value, or what was expected.
Rule = Callable[[Any], 'str | None']


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Rule:
  """An int in [low, high] (either bound may be open-ended)."""

  def rule(value):
    if _is_int(value) and (low is None or value >= low) and (high is None or value <= high):
      return None
    if low is not None and high is not None:
      return f'an integer from {low} to {high}'
    return f'an integer >= {low}' if low is not None else 'an integer'

  return rule


def number(low: float | None = None, high: float | None = None, above: float | None = None) -> Rule:
  """A float or int in [low, high], or > above."""

  def rule(value):
    ok = _is_number(value) and value == value  # NaN fails every comparison
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    ok = ok and (above is None or value > above)
    if ok:
      return None
    if above is not None:
      return f'a number > {above}'
    if low is not None and high is not None:
      return f'a number in [{low}, {high}]'
    return f'a number >= {low}' if low is not None else 'a number'

  return rule


def one_of(*choices) -> Rule:
  def rule(value):
    return None if value in choices else 'one of ' + ', '.join(repr(c) for c in choices)

  return rule


def registered(kinds: Callable[[], tuple]) -> Rule:
  """One of what a registry holds when the config is checked (extensions add kinds)."""

  def rule(value):
    return one_of(*kinds())(value)

  return rule


def adjacency_names() -> tuple[str, ...]:
  """The registered adjacencies, and the old names that `build_model` explains as renamed."""
  return (*adjacency_kinds(), *RENAMED_KINDS)


def boolean(value) -> str | None:
  return None if isinstance(value, bool) else 'True or False'


def text(value) -> str | None:
  return None if isinstance(value, str) else 'a string'


def sequence_of(item: Rule, length: int | None = None, non_empty: bool = True) -> Rule:
  """A tuple or list of values each passing `item` (of `length` values, if given)."""

  def rule(value):
    expected = f'{length if length else "a list of"} values, each {item(None)}'
    if not isinstance(value, (tuple, list)):
      return expected
    if (length is not None and len(value) != length) or (non_empty and not value):
      return expected
    return expected if any(item(v) is not None for v in value) else None

  return rule


# A field's rule, or (rule, why the rule exists) when the reason is not obvious.
RULES: dict[str, Rule | tuple[Rule, str]] = {
  'seed': integer(0),
  'data.dataset': text,
  'data.data_dir': text,
  'data.manual_dir': text,
  'data.image_size': sequence_of(integer(16), length=2),
  'data.p': (integer(2), 'batch-hard triplets need P >= 2 identities per device batch'),
  'data.k': (integer(2), 'batch-hard triplets need K >= 2 images per identity'),
  'data.sampler': one_of(*pipeline.SAMPLERS),
  'data.min_images_per_id': integer(1),
  'data.flip': boolean,
  'data.padding': integer(0),
  'data.erasing_probability': number(0.0, 1.0),
  'data.erasing_fill': one_of(*augment.ERASING_FILLS),
  'data.eval_batch_size': integer(1),
  'data.validation_ids': integer(0),
  'data.validation_seed': integer(0),
  'model.depth': one_of(*(str(d) for d in RESNET_SPECS)),
  'model.width': integer(1),
  'model.last_stride': one_of(1, 2),
  'model.non_local': boolean,
  'model.pooling': one_of(*POOLINGS),
  'model.embed_dim': integer(1),
  'model.adjacency': registered(adjacency_names),
  'model.topk': integer(1),
  'model.gcn': registered(gcn_kinds),
  'model.gcn_depth': integer(1),
  'model.reduction': integer(1),
  'model.dropout_rate': number(0.0, 0.99),
  'model.gcn_output_init': number(),
  'model.intra_init': number(),
  'model.pair_path': one_of(*PAIR_PATHS),
  'model.dtype': one_of('float32', 'bfloat16'),
  'model.sync_bn': boolean,
  'model.plugins': text,
  'loss.label_smoothing': number(0.0, 0.99),
  'loss.margin': number(),
  'loss.pair_margin': number(),
  'loss.alpha': number(0.0, 1.0),
  'loss.rectified_triplets': boolean,
  'optim.lr_per_16': number(above=0.0),
  'optim.momentum': number(0.0, 0.999),
  'optim.weight_decay': number(0.0),
  'optim.warmup_epochs': number(0.0),
  'optim.epochs': number(0.0),
  'optim.grad_clip': number(0.0),
  'optim.pair_lr_scale': number(above=0.0),
  'train.num_steps': (integer(0), '0 trains for optim.epochs'),
  'train.log_every': integer(1),
  'train.checkpoint_every': integer(1),
  'train.keep_last': integer(1),
  'train.eval_every_epochs': integer(0),
  'train.eval_at_end': boolean,
  'init.backbone': text,
  'init.checkpoint': text,
  'eval.flip': boolean,
  'eval.stage2_k': integer(0),
  'eval.stage2_mix': number(0.0, 1.0),
  'eval.stage2_k_grid': sequence_of(integer(1)),
  'eval.stage2_mix_grid': sequence_of(number(0.0, 1.0)),
  'eval.stage2_max_similarity': number(-2.0, 1.0),
  'eval.stage2_fraction_grid': sequence_of(number(0.0, 1.0)),
  'eval.cache_dtype': one_of('float32', 'bfloat16'),
  'eval.cache_memory_gb': number(0.0),
  'eval.rerank': boolean,
  'eval.diagnostics': boolean,
}


def _lookup(config: ml_collections.ConfigDict, path: str):
  node = config
  for name in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      return _MISSING
    node = node[name]
  return node


_MISSING = object()


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value breaks its rule in `RULES`.

  Imports `model.plugins` first (their kinds are valid values), making their
  file paths absolute in `config` so that the run's record finds them.
  """
  if isinstance(_lookup(config, 'model.plugins'), str):
    config.model.plugins = plugins.resolve(config.model.plugins)
    plugins.load(config.model.plugins)
  for path, rule in RULES.items():
    rule, why = rule if isinstance(rule, tuple) else (rule, '')
    value = _lookup(config, path)
    if value is _MISSING:
      continue
    expected = rule(value)
    if expected is not None:
      raise ConfigError(f'{path}={value!r}: expected {expected}{f" ({why})" if why else ""}')
  weights = _lookup(config, 'loss.weights')
  if weights is not _MISSING:
    for name, weight in weights.items():
      if name not in losses.LOSS_PARTS:
        raise ConfigError(
          f'loss.weights.{name}: no loss part of that name is computed; the parts are '
          f'{", ".join(losses.loss_names())} (a plugin registers more: losses.register_loss)'
        )
      if number(0.0)(weight) is not None:
        raise ConfigError(f'loss.weights.{name}={weight!r}: expected a number >= 0')
  split_data.dataset_names(config.data.dataset)
  if config.train.num_steps == 0 and config.optim.epochs <= 0:
    raise ConfigError('optim.epochs and train.num_steps are both 0: nothing to train')
  if config.init.backbone and config.init.checkpoint:
    raise ConfigError(
      'init.backbone and init.checkpoint are both set: the checkpoint would '
      'replace the backbone; set one'
    )


def check_paths(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """The workdir, its checkpoint directory, the data and download dirs and the init files."""
  if workdir is not None:
    check_directory(workdir, '--workdir')
    check_directory(os.path.join(workdir, 'checkpoints'), '--workdir checkpoints directory')
  check_directory(config.data.data_dir, 'data.data_dir')
  if config.data.manual_dir:
    check_directory(config.data.manual_dir, 'data.manual_dir')
  if config.init.backbone and not os.path.isfile(config.init.backbone):
    raise ConfigError(f'init.backbone={config.init.backbone}: no such file')
  if config.init.checkpoint:
    check_directory(config.init.checkpoint, 'init.checkpoint', must_exist=True)


def check_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Every value and path of a training or evaluation config (`check_values`, `check_paths`)."""
  check_values(config)
  check_paths(config, workdir)


def check_training_data(config: ml_collections.ConfigDict, num_identities: int) -> None:
  """Fails, naming the field, when the prepared training set cannot fill a P×K batch."""
  data = config.data
  if data.p > num_identities:
    raise ConfigError(
      f'data.p={data.p} identities per batch but {data.dataset} has only '
      f'{num_identities} training identities with data.min_images_per_id='
      f'{data.min_images_per_id} images or more'
    )

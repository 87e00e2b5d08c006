"""`build_model`: the one way from a config's `model` fields to a CACENet.

Every command (training, evaluation, the API, export, porting) builds its
model here, so plugins are imported, renamed and unregistered kinds are
refused, and config strings become types in one place.
"""

from __future__ import annotations

import jax.numpy as jnp

from cace_jax import plugins
from cace_jax.errors import ConfigError
from cace_jax.models.attention import RENAMED_KINDS, get_adjacency
from cace_jax.models.cacenet import CACENet
from cace_jax.models.gcn import NO_GCN, get_operator


def build_model(model_config, num_classes: int | None = None, **overrides) -> CACENet:
  """The CACENet that `model_config` describes: the one way from a config to a model.

  Args:
    model_config: `config.model`, or a checkpoint record's 'model'; its keys
      are CACENet field names and 'plugins' (imported first,
      `cace_jax.plugins`). Strings are accepted where configs hold them:
      depth '50' and dtype 'bfloat16'.
    num_classes: identities of the classifiers (None: the config's, if any).
    **overrides: further fields, e.g. `sync_bn=False` for evaluation.

  Raises:
    ConfigError: naming an unknown field, an unsupported dtype or an
      adjacency name that was renamed.
  """
  fields = {**dict(model_config), **overrides}
  plugins.load(fields.pop('plugins', ''))  # the kinds a run was trained with
  if num_classes is not None:
    fields['num_classes'] = num_classes
  known = set(CACENet.__dataclass_fields__) - {'parent', 'name'}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ConfigError(
      f'model.{unknown[0]} is not a CACENet field; the fields are {", ".join(sorted(known))}'
    )
  adjacency = fields.get('adjacency', CACENet.adjacency)
  if adjacency in RENAMED_KINDS:
    raise ConfigError(
      f'model.adjacency={adjacency!r} was renamed: {RENAMED_KINDS[adjacency]!r} is what it meant '
      f"(pixels L2-normalised first), {'raw_' + adjacency!r} is the paper's eq. 2-4 on raw features"
    )
  if fields.get('gcn', CACENet.gcn) != NO_GCN:  # unregistered kinds fail here, named
    get_operator(fields.get('gcn', CACENet.gcn))
    get_adjacency(adjacency)
  depth = fields.get('depth')
  if isinstance(depth, str) and depth.isdigit():  # configs hold depth as a string ('tiny' too)
    fields['depth'] = int(depth)
  dtype = fields.get('dtype', 'float32')
  dtype = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f'model.dtype={dtype!r}: expected float32 or bfloat16')
  fields['dtype'] = jnp.dtype(dtype)
  return CACENet(**fields)

"""Pooling of pixels into one vector: average, generalised mean (GeM) and avg‖max.

Shared by the individual head and the pair stage, which pools conditional
maps the same way (`cacenet`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

POOLINGS = ('avg', 'gem', 'avgmax')


def pool_nodes(kind: str, nodes, p=None, eps: float = 1e-6):
  """Pools pixels [..., n, C] -> [..., P].

  'avg': mean; 'gem': (mean clamp(x, eps)^p)^(1/p); 'avgmax': [mean, max] (P = 2C).
  """
  if kind == 'avg':
    return nodes.mean(-2)
  if kind == 'gem':
    return jnp.mean(jnp.maximum(nodes, eps) ** p, axis=-2) ** (1.0 / p)
  if kind == 'avgmax':
    return jnp.concatenate([nodes.mean(-2), nodes.max(-2)], axis=-1)
  raise ValueError(f'unknown pooling {kind!r}; expected one of {POOLINGS}')


class GeM(nn.Module):
  """Generalised-mean pooling with a learnable exponent `p` (init 3)."""

  p_init: float = 3.0
  eps: float = 1e-6

  def setup(self):
    self.p = self.param('p', nn.initializers.constant(self.p_init), (1,), jnp.float32)

  def __call__(self, nodes):  # [..., n, C] -> [..., C]
    return pool_nodes('gem', nodes, self.p, self.eps)

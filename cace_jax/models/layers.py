"""Building blocks every model file shares: PyTorch's initialisers, a 1x1 conv, L2 normalisation.

They sit below `resnet`, `gcn` and `attention` so that those three import
only downwards; the losses and the evaluation use the same `l2_normalize`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.Conv2d / nn.Linear defaults: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init for a layer with `fan_in` inputs: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / (||x|| + eps) along `axis` (the official `normalize`)."""
  return x / (jnp.linalg.norm(x, axis=axis, keepdims=True) + eps)


class Conv1x1(nn.Module):
  """Bias-free 1x1 convolution over the last axis of any array.

  The kernel is stored as [1, 1, in, out] like `nn.Conv`, so a port treats it
  like every other conv, and it is created in `setup` so parents can read
  `module.kernel` (the pair stage uses the raw matrices inside vmap).
  """

  in_features: int
  features: int
  kernel_init: Any = torch_default_kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.kernel = self.param(
      'kernel', self.kernel_init, (1, 1, self.in_features, self.features), self.param_dtype
    )

  def __call__(self, x):  # x: [..., in] -> [..., out]
    return jnp.einsum('...c,cd->...d', x.astype(self.dtype), self.kernel[0, 0].astype(self.dtype))

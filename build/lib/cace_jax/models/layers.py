"""Building blocks every model file shares: PyTorch's initialisers, a 1x1 conv,
L2 normalisation and a BatchNorm with PyTorch's running statistics.

They sit below `resnet`, `gcn` and `attention` so that those three import
only downwards; the losses and the evaluation use the same `l2_normalize`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax import lax
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


def batch_statistics(x, axis_name: str | None = None):
  """Per-channel statistics of x [..., C] over every other axis, in float32.

  Two passes (the mean, then the mean squared deviation from it), as PyTorch
  computes them, not E[x^2] - E[x]^2, which loses digits when |mean| >> std.

  Args:
    x: the batch, channels last.
    axis_name: a mapped axis (under `shard_map`) whose devices pool their
      values: the mean and variance are then those of the whole global batch
      (every device holds the same number of values).

  Returns:
    (mean [C], biased variance [C], count): count is the number of values
    per channel behind the statistics, over all devices of `axis_name`.
  """
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  mean = x.mean(axes)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  var = jnp.square(x - mean).mean(axes)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
    count *= lax.axis_size(axis_name)
  return mean, var, count


class BatchNorm(nn.Module):
  """BatchNorm over the last axis whose running statistics follow PyTorch's.

  Training normalises with the batch mean and the biased batch variance, as
  both frameworks do, and moves the running averages towards the mean and
  the *unbiased* variance, var * n / (n - 1) with n values per channel (over
  all devices when synced), as `torch.nn.BatchNorm2d` and `SyncBatchNorm` do;
  flax's own BatchNorm keeps the biased one. The factor is negligible for
  backbone maps (n = B*h*w) and 16/15 for a 16-image embedding BN.
  Statistics are computed in float32 by `batch_statistics`; normalisation
  runs in float32 too (torch autocast keeps batch_norm in float32) and the
  result is cast to `dtype`. Evaluation uses the running averages.

  Variables are flax's: params 'scale' (ones) and 'bias' (zeros),
  batch_stats 'mean' (zeros) and 'var' (ones), so checkpoints and ports are
  unchanged. `momentum` is flax's convention, the weight of the old average
  (PyTorch's momentum 0.1 is 0.9 here).

  Attributes:
    use_running_average: evaluation mode, if not given at call time.
    momentum: running average ra <- momentum * ra + (1 - momentum) * statistic.
    epsilon: added to the variance.
    dtype: dtype of the output.
    param_dtype: dtype of scale and bias.
    axis_name: sync BN over this mapped axis (None: per-device statistics).
  """

  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, updates: int = 1):
    """Normalises x [..., C].

    Args:
      x: the batch, channels last.
      use_running_average: evaluation mode (running averages, no update);
        given here or as the attribute, not both.
      updates: how many running-average updates this batch makes, in
        training: `updates=k` gives what k calls on batches with these same
        statistics give, ra <- m^k ra + (1 - m^k) statistic. CACE-Net's
        official head normalises f_0 and f_1, two batches of identical
        statistics, in two calls; one call with `updates=2` equals them.
    """
    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      # No collective at init: `init` runs outside shard_map, as flax's BatchNorm does.
      axis_name = None if self.is_initializing() else self.axis_name
      mean, var, count = batch_statistics(x, axis_name)
      if not self.is_initializing():
        keep = self.momentum**updates
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = keep * running_mean.value + (1 - keep) * mean
        running_var.value = keep * running_var.value + (1 - keep) * unbiased
    inverse = lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean) * inverse + bias.astype(jnp.float32)
    return y.astype(self.dtype)

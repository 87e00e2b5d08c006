"""The ONNX graph writer and the pieces both exported graphs share.

`GraphWriter` accumulates nodes and constants; each op returns the name of
its output. The pieces here are the layers that the feature graph and the
pair graph (`onnx_graph`) both write: a convolution or projection with its
BatchNorm folded in (in float64, then stored as float32), L2 normalisation,
the three poolings and the embedding head.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BN_EPS = 1e-5
L2_EPS = 1e-12
GEM_EPS = 1e-6  # models.pooling.GeM.eps


class GraphWriter:
  """Accumulates nodes and constants; every op returns the name of its one output."""

  def __init__(self):
    self.nodes, self.initializers, self._count = [], [], 0

  def _name(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def const(self, value, hint: str = 'c') -> str:
    name = self._name(hint)
    array = np.asarray(value)
    array = array.astype(np.float32) if array.dtype.kind == 'f' else array
    self.initializers.append(numpy_helper.from_array(array, name))
    return name

  def op(
    self, op_type: str, *inputs: str, output: str | None = None, num_outputs: int = 1, **attrs
  ):
    """Appends a node; returns its output name (a tuple of names if `num_outputs` > 1)."""
    outputs = [output] if output else [self._name(op_type.lower()) for _ in range(num_outputs)]
    self.nodes.append(helper.make_node(op_type, list(inputs), outputs, **attrs))
    return outputs[0] if num_outputs == 1 else tuple(outputs)

  def model(self, inputs: Sequence, outputs: Mapping[str, tuple], doc: str) -> onnx.ModelProto:
    """inputs: value infos; outputs: {graph output name: (tensor name, shape)}."""
    outs = []
    for name, (tensor, shape) in outputs.items():
      self.op('Identity', tensor, output=name)
      outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(self.nodes, 'cace_net', list(inputs), outs, self.initializers)
    model = helper.make_model(
      graph,
      opset_imports=[helper.make_opsetid('', OPSET)],
      producer_name='cace_jax',
      doc_string=doc,
    )
    onnx.checker.check_model(model)
    return model


def fold_bn(bn_params: Mapping, bn_stats: Mapping):
  """(scale, shift) with BN(x) = x * scale + shift, computed in float64."""
  scale = np.asarray(bn_params['scale'], np.float64) / np.sqrt(
    np.asarray(bn_stats['var'], np.float64) + BN_EPS
  )
  shift = (
    np.asarray(bn_params['bias'], np.float64) - np.asarray(bn_stats['mean'], np.float64) * scale
  )
  return scale, shift


def conv(w: GraphWriter, x: str, kernel, bias=None, stride: int = 1, bn=None) -> str:
  """NCHW conv from a Flax HWIO kernel (same-size padding, as the ResNet); `bn`: (params, stats)."""
  kernel = np.asarray(kernel, np.float64)
  bias = np.zeros(kernel.shape[-1]) if bias is None else np.asarray(bias, np.float64)
  if bn is not None:
    scale, shift = fold_bn(*bn)
    kernel, bias = kernel * scale, bias * scale + shift
  size = kernel.shape[0]
  pad = size // 2
  return w.op(
    'Conv',
    x,
    w.const(kernel.transpose(3, 2, 0, 1), 'kernel'),
    w.const(bias, 'bias'),
    kernel_shape=[size, size],
    strides=[stride, stride],
    pads=[pad] * 4,
  )


def l2_normalize(w: GraphWriter, x: str) -> str:
  """x / (||x|| + 1e-12) over the last axis (losses.l2_normalize)."""
  norm = w.op('ReduceL2', x, axes=[-1], keepdims=1)
  return w.op('Div', x, w.op('Add', norm, w.const(np.float32(L2_EPS))))


def pool(w: GraphWriter, x: str, pooling: str, params: Mapping, axis) -> str:
  """Pools pixels away: axis (2, 3) of NCHW maps or axis 1 of nodes [N, n, C] -> [N, P]."""
  axes = [axis] if isinstance(axis, int) else list(axis)
  if pooling == 'avg':
    return w.op('ReduceMean', x, axes=axes, keepdims=0)
  if pooling == 'gem':
    p = np.asarray(params['gemp']['p'], np.float32).reshape(())
    clamped = w.op('Max', x, w.const(np.float32(GEM_EPS)))
    mean = w.op('ReduceMean', w.op('Pow', clamped, w.const(p, 'p')), axes=axes, keepdims=0)
    return w.op('Pow', mean, w.const(np.float32(1.0) / p, 'inv_p'))
  if pooling == 'avgmax':
    return w.op(
      'Concat',
      w.op('ReduceMean', x, axes=axes, keepdims=0),
      w.op('ReduceMax', x, axes=axes, keepdims=0),
      axis=-1,
    )
  raise ValueError(f'unknown pooling {pooling!r}')


def embed(w: GraphWriter, pooled: str, variables: Mapping) -> str:
  """Pooled [N, P] -> eval-mode embedding [N, E]: 1x1 conv and BN folded into one Gemm."""
  params, stats = variables['params'], variables['batch_stats']
  kernel = np.asarray(params['embedding_conv']['kernel'], np.float64)[0, 0]  # [P, E]
  scale, shift = fold_bn(params['embedding_bn'], stats['embedding_bn'])
  return w.op('Gemm', pooled, w.const(kernel * scale, 'embed'), w.const(shift, 'embed_bias'))

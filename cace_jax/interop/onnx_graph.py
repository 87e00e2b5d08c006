"""ONNX graphs of a trained CACE-Net, written node by node from its Flax variables.

Two models make the paper's two-stage inference runnable outside JAX:

  features:  images [batch, H, W, 3] float32 RGB in [0, 255]
             -> embedding [batch, E] (L2-normalised; flip-averaged if asked)
                fmap      [batch, h, w, C] (backbone maps, the pair stage's input)
  pair:      fmap_query, fmap_gallery [pairs, h, w, C]
             -> distance [pairs] (1 - cos(f(q|g), f(g|q)), what stage 2 sorts by)
                embedding_qg, embedding_gq [pairs, E]

Why a writer of our own: the converters that exist do not fit this stack
(jax2onnx 0.17 requires orbax-checkpoint < 0.11.37, and jax2tf in JAX 0.10 only
emits `XlaCallModule`, which tf2onnx cannot convert), and a CACE-Net is a
short list of standard operators. Writing them here keeps export independent
of torch and of any converter, and makes every operator visible. The graphs compute
what `CACENet.features` and `evaluation.stage2.conditional_distance`
compute, in float32, with BatchNorm folded into the preceding convolution or
projection; tests compare them with JAX through onnxruntime.

`onnx_writer` holds the writer and the layers both graphs share.
Opset 17; the batch (pairs) axis is dynamic, image size fixed at export.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cace_jax.data.augment import IMAGENET_MEAN_PIXEL, IMAGENET_STD_PIXEL
from cace_jax.errors import PortError
from cace_jax.interop.onnx_writer import GraphWriter, conv, embed, l2_normalize, pool
from cace_jax.models.attention import get_adjacency
from cace_jax.models.gcn import DEGREE_EPS
from cace_jax.models.resnet import RESNET_SPECS, feature_map_shape, non_local_positions

# ----------------------------------------------------------------------------- features


def _non_local(w: GraphWriter, x: str, params: Mapping) -> str:
  """x + W(softmax(theta^T phi) g) on NCHW maps (models.resnet.NonLocal)."""
  inner = np.asarray(params['g']['kernel']).shape[-1]
  flat = lambda name: w.op(
    'Reshape',
    conv(w, x, params[name]['kernel'], params[name]['bias']),
    w.const(np.array([0, inner, -1], np.int64)),
  )  # [B, r, hw]
  g, theta, phi = flat('g'), flat('theta'), flat('phi')
  logits = w.op('MatMul', w.op('Transpose', theta, perm=[0, 2, 1]), phi)  # [B, hw_i, hw_j]
  attention = w.op('Softmax', logits, axis=-1)
  y = w.op('MatMul', g, w.op('Transpose', attention, perm=[0, 2, 1]))  # [B, r, hw_i]
  y = w.op('Reshape', y, w.op('Concat', w.op('Shape', g, end=2), w.op('Shape', x, start=2), axis=0))
  return w.op('Add', x, conv(w, y, params['W']['kernel'], params['W']['bias']))


def _block(w: GraphWriter, x: str, kind: str, stride: int, params: Mapping, stats: Mapping) -> str:
  """A torchvision BasicBlock / Bottleneck (models.resnet) with BN folded."""
  bn = lambda name: (params[name], stats[name])
  if kind == 'basic':
    out = w.op('Relu', conv(w, x, params['conv1']['kernel'], stride=stride, bn=bn('bn1')))
    out = conv(w, out, params['conv2']['kernel'], bn=bn('bn2'))
  else:
    out = w.op('Relu', conv(w, x, params['conv1']['kernel'], bn=bn('bn1')))
    out = w.op('Relu', conv(w, out, params['conv2']['kernel'], stride=stride, bn=bn('bn2')))
    out = conv(w, out, params['conv3']['kernel'], bn=bn('bn3'))
  if 'downsample_conv' in params:
    x = conv(w, x, params['downsample_conv']['kernel'], stride=stride, bn=bn('downsample_bn'))
  return w.op('Relu', w.op('Add', out, x))


def _backbone(w: GraphWriter, x: str, model, params: Mapping, stats: Mapping) -> str:
  """models.resnet.ResNet on NCHW input -> layer4 maps [B, C, h, w]."""
  stage_sizes, kind = RESNET_SPECS[model.depth]
  x = w.op(
    'Relu', conv(w, x, params['conv1']['kernel'], stride=2, bn=(params['bn1'], stats['bn1']))
  )
  x = w.op('MaxPool', x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
  non_local_after = non_local_positions(stage_sizes) if model.non_local else ()
  for stage, num_blocks in enumerate(stage_sizes):
    stage_stride = 1 if stage == 0 else (model.last_stride if stage == 3 else 2)
    for index in range(num_blocks):
      name = f'layer{stage + 1}_{index}'
      x = _block(w, x, kind, stage_stride if index == 0 else 1, params[name], stats[name])
      if name in non_local_after:
        x = _non_local(w, x, params[f'nl_{name}'])
  return x


def feature_graph(
  model, variables: Mapping, image_size: Sequence[int], flip: bool = False
) -> onnx.ModelProto:
  """The stage-1 model: images [batch, H, W, 3] (RGB, 0-255) -> embedding, fmap.

  Args:
    model: the `CACENet` whose fields describe `variables`.
    variables: {'params', 'batch_stats'} (numpy or jax arrays).
    image_size: (H, W) the model was trained at.
    flip: embed each image and its mirror and average (eval.flip).
  """
  height, width = image_size
  params, stats = variables['params'], variables['batch_stats']
  w = GraphWriter()
  images = helper.make_tensor_value_info('images', TensorProto.FLOAT, ['batch', height, width, 3])
  x = w.op(
    'Div',
    w.op('Sub', 'images', w.const(IMAGENET_MEAN_PIXEL, 'mean')),  # augment.normalize
    w.const(IMAGENET_STD_PIXEL, 'std'),
  )
  if flip:  # mirrored copies after the originals: one backbone pass over 2B images
    batch = w.op('Shape', 'images', end=1)
    mirrored = w.op(
      'Slice',
      x,
      w.const(np.array([-1])),
      w.const(np.array([-(2**62)])),
      w.const(np.array([2])),
      w.const(np.array([-1])),
    )
    x = w.op('Concat', x, mirrored, axis=0)
  fmap = _backbone(
    w, w.op('Transpose', x, perm=[0, 3, 1, 2]), model, params['backbone'], stats['backbone']
  )
  embedding = l2_normalize(w, embed(w, pool(w, fmap, model.pooling, params, (2, 3)), variables))
  if flip:
    first = lambda t: w.op('Slice', t, w.const(np.array([0])), batch, w.const(np.array([0])))
    second = w.op('Slice', embedding, batch, w.const(np.array([2**62])), w.const(np.array([0])))
    embedding = l2_normalize(w, w.op('Add', first(embedding), second))
    fmap = first(fmap)
  fmap_nhwc = w.op('Transpose', fmap, perm=[0, 2, 3, 1])
  outputs = {
    'embedding': (embedding, ['batch', model.embed_dim]),
    'fmap': (
      fmap_nhwc,
      ['batch', *feature_map_shape(image_size, model.depth, model.width, model.last_stride)],
    ),
  }
  return w.model(
    [images],
    outputs,
    doc='CACE-Net stage 1: images (RGB 0-255, NHWC) -> '
    'L2-normalised embedding and backbone feature maps',
  )


# ----------------------------------------------------------------------------- pair stage


def _same_image(n: int) -> np.ndarray:
  """[2n, 2n] 1 where both nodes are pixels of the same image."""
  side = np.arange(2 * n) >= n
  return (side[:, None] == side[None, :]).astype(np.float32)


def transpose(w: GraphWriter, t: str) -> str:
  """t [pairs, a, b] -> [pairs, b, a]."""
  return w.op('Transpose', t, perm=[0, 2, 1])


def _pixels(w: GraphWriter, model, params: Mapping, nodes: str) -> str:
  """x [pairs, 2n, c]: what the adjacency compares (`ClueAttention.pixels`)."""
  pixels = get_adjacency(model.adjacency).pixels
  if pixels == 'projected':
    kernel = np.asarray(params['pair_attention']['y']['kernel'])[0, 0]
    return l2_normalize(w, w.op('MatMul', nodes, w.const(kernel, 'y')))
  return nodes if pixels == 'raw' else l2_normalize(w, nodes)


def _fixed(pattern: Callable[[int], np.ndarray]) -> Callable:
  """The ONNX form of an adjacency that ignores the images: a constant [1, 2n, 2n]."""
  return lambda w, model, params, nodes, n: w.const(pattern(n)[None], 'adjacency')


def _part(n: int) -> np.ndarray:
  same_pixel = np.arange(2 * n)[:, None] % n == np.arange(2 * n)[None, :] % n
  return (same_pixel & (_same_image(n) == 0)).astype(np.float32)


def _projected(w: GraphWriter, model, params: Mapping, nodes: str, n: int) -> str:
  y = _pixels(w, model, params, nodes)
  return w.op('Relu', w.op('MatMul', y, transpose(w, y)))


def topk_picks(w: GraphWriter, model, params: Mapping, nodes: str, n: int) -> str:
  """[pairs, 2n, 2n] 1 where node i picks node j: j among the other image's
  `model.topk` nodes most similar to i (by the adjacency's pixels). Not symmetric."""
  x = _pixels(w, model, params, nodes)
  similarity = w.op('MatMul', x, transpose(w, x))
  masked = w.op(
    'Where', w.const(_same_image(n).astype(bool)), w.const(np.float32(-np.inf)), similarity
  )
  _, index = w.op('TopK', masked, w.const(np.array([model.topk], np.int64)), axis=-1, num_outputs=2)
  ones = w.op(
    'ConstantOfShape', w.op('Shape', index), value=numpy_helper.from_array(np.ones(1, np.float32))
  )
  return w.op(
    'ScatterElements', w.op('Mul', similarity, w.const(np.float32(0))), index, ones, axis=-1
  )


def _topk(w: GraphWriter, model, params: Mapping, nodes: str, n: int) -> str:
  picks = topk_picks(w, model, params, nodes, n)
  return w.op('Max', picks, transpose(w, picks))


def _weighted(w: GraphWriter, x: str, params: Mapping, name: str) -> str:
  """X diag(params[name]) X^T."""
  weights = np.asarray(params['pair_attention'][name])
  return w.op('MatMul', w.op('Mul', x, w.const(weights, name)), transpose(w, x))


def _correspondence(w: GraphWriter, model, params: Mapping, nodes: str, n: int) -> str:
  x = _pixels(w, model, params, nodes)
  same_image = _same_image(n)
  mixed = w.op(
    'Add',
    w.op('Mul', _weighted(w, x, params, 'w_intra'), w.const(same_image, 'same_image')),
    w.op('Mul', _weighted(w, x, params, 'w_inter'), w.const(1.0 - same_image, 'other_image')),
  )
  return w.op('Relu', mixed)


def _intra_only(w: GraphWriter, model, params: Mapping, nodes: str, n: int) -> str:
  x = _pixels(w, model, params, nodes)
  intra = w.op('Relu', _weighted(w, x, params, 'w_intra'))
  return w.op('Mul', intra, w.const(_same_image(n), 'same_image'))


# The ONNX form of each adjacency: (writer, model, params, nodes [pairs, 2n, C],
# n) -> A [pairs or 1, 2n, 2n] (its diagonal is ignored). An adjacency
# registered in `models.attention` without one here cannot be exported.
ONNX_ADJACENCIES: dict[str, Callable] = {
  'raw_correspondence': _correspondence,
  'cosine_correspondence': _correspondence,
  'projected': _projected,
  'raw_intra': _intra_only,
  'cosine_intra': _intra_only,
  'none': _fixed(lambda n: np.zeros((2 * n, 2 * n), np.float32)),
  'part': _fixed(_part),
  'topk': _topk,
  'full': _fixed(lambda n: np.ones((2 * n, 2 * n), np.float32)),
}


def _degree_normaliser(w: GraphWriter, adjacency: str, n: int, relative_threshold: bool):
  """(A with a zero diagonal, degree D [pairs, 2n, 1], N [pairs, 2n, 1]) as `gcn.DenseGraph`."""
  eye = np.eye(2 * n, dtype=np.float32)
  adjacency = w.op('Mul', adjacency, w.const(1.0 - eye, 'off_diagonal'))
  degree = w.op('ReduceSum', adjacency, w.const(np.array([-1], np.int64)), keepdims=1)
  threshold = w.const(np.float32(DEGREE_EPS))
  if relative_threshold:  # gcn.degree_threshold: 1e-3 times the mean edge weight
    total = w.op('ReduceSum', degree, w.const(np.array([-2], np.int64)), keepdims=1)
    mean_edge = w.op('Mul', total, w.const(np.float32(1.0 / (2 * n * (2 * n - 1)))))
    threshold = w.op('Mul', mean_edge, threshold)
  safe = w.op('Where', w.op('Greater', degree, threshold), degree, w.const(np.float32(1.0)))
  return adjacency, degree, w.op('Reciprocal', w.op('Sqrt', safe))


def _discrepancy(w: GraphWriter, adjacency: str, n: int, relative_threshold: bool) -> str:
  """F = N (D - A) N (`gcn.discrepancy`)."""
  adjacency, degree, norm = _degree_normaliser(w, adjacency, n, relative_threshold)
  laplacian = w.op('Sub', w.op('Mul', degree, w.const(np.eye(2 * n, dtype=np.float32))), adjacency)
  return w.op('Mul', w.op('Mul', norm, laplacian), w.op('Transpose', norm, perm=[0, 2, 1]))


def _normal(w: GraphWriter, adjacency: str, n: int, relative_threshold: bool) -> str:
  """F = I + N A N (`gcn.normal`)."""
  adjacency, _, norm = _degree_normaliser(w, adjacency, n, relative_threshold)
  scaled = w.op('Mul', w.op('Mul', norm, adjacency), w.op('Transpose', norm, perm=[0, 2, 1]))
  return w.op('Add', w.const(np.eye(2 * n, dtype=np.float32), 'eye'), scaled)


# The ONNX form of each graph operator: (writer, adjacency [pairs, 2n, 2n], n,
# relative_threshold) -> F [pairs, 2n, 2n]. An operator registered in
# `models.gcn` without one here cannot be exported (`pair_graph` says so).
ONNX_OPERATORS = {'discrepancy': _discrepancy, 'normal': _normal}


def check_exportable(model) -> None:
  """PortError naming the part of `model`'s pair stage that has no ONNX form."""
  if not model.pair_stage:
    return
  for field, kind, table, register in (
    ('adjacency', model.adjacency, ONNX_ADJACENCIES, 'register_onnx_adjacency'),
    ('gcn', model.gcn, ONNX_OPERATORS, 'register_onnx_operator'),
  ):
    if kind not in table:
      raise PortError(
        f'model.{field}={kind!r} has no ONNX form (ONNX has: {", ".join(table)}); '
        f'write one with onnx_graph.{register}'
      )


def register_onnx_operator(name: str):
  """Decorator: the ONNX form of the registered graph operator `name` (see ONNX_OPERATORS)."""

  def register(fn):
    ONNX_OPERATORS[name] = fn
    return fn

  return register


def register_onnx_adjacency(name: str):
  """Decorator: the ONNX form of the registered adjacency `name` (see ONNX_ADJACENCIES)."""

  def register(fn):
    ONNX_ADJACENCIES[name] = fn
    return fn

  return register


def pair_graph(model, variables: Mapping, fmap_shape: Sequence[int]) -> onnx.ModelProto:
  """The stage-2 model: (fmap_query, fmap_gallery) [pairs, h, w, C] -> distance and f(q|g), f(g|q).

  The dense pair graph of `CACENet.pair_features` (2n x 2n adjacency, C-wide
  GCN); it equals the compact-cache path stage 2 uses in JAX.

  Args:
    model: the `CACENet` whose fields describe `variables`.
    variables: {'params', 'batch_stats'}.
    fmap_shape: (h, w, C) of the backbone maps (the features model's `fmap`).
  """
  if not model.pair_stage:
    raise ValueError('model.gcn is "none": this model has no pair stage to export')
  check_exportable(model)
  height, width, channels = fmap_shape
  n = height * width
  params = variables['params']
  w = GraphWriter()
  inputs = [
    helper.make_tensor_value_info(name, TensorProto.FLOAT, ['pairs', height, width, channels])
    for name in ('fmap_query', 'fmap_gallery')
  ]
  flat = lambda name: w.op('Reshape', name, w.const(np.array([0, n, channels], np.int64)))
  nodes = w.op('Concat', flat('fmap_query'), flat('fmap_gallery'), axis=1)  # [pairs, 2n, C]
  adjacency = ONNX_ADJACENCIES[model.adjacency](w, model, params, nodes, n)
  operator = ONNX_OPERATORS[model.gcn](w, adjacency, n, model.relative_threshold)
  for layer in range(model.gcn_depth):
    suffix = '' if layer == 0 else f'_{layer}'
    g = np.asarray(params['pair_graph'][f'g{suffix}']['kernel'])[0, 0]  # [C, r]
    o = np.asarray(params['pair_graph'][f'o{suffix}']['kernel'])[0, 0]  # [r, C]
    mixed = w.op('MatMul', operator, w.op('MatMul', nodes, w.const(g, 'g')))
    nodes = w.op('Add', nodes, w.op('MatMul', mixed, w.const(o, 'o')))
  half = lambda start: w.op(
    'Slice',
    nodes,
    w.const(np.array([start])),
    w.const(np.array([start + n])),
    w.const(np.array([1])),
  )
  conditional = lambda cond: embed(w, pool(w, cond, model.pooling, params, 1), variables)
  emb_qg, emb_gq = conditional(half(0)), conditional(half(n))
  cosine = w.op(
    'ReduceSum',
    w.op('Mul', l2_normalize(w, emb_qg), l2_normalize(w, emb_gq)),
    w.const(np.array([-1], np.int64)),
    keepdims=0,
  )
  distance = w.op('Sub', w.const(np.float32(1.0)), cosine)
  outputs = {
    'distance': (distance, ['pairs']),
    'embedding_qg': (emb_qg, ['pairs', model.embed_dim]),
    'embedding_gq': (emb_gq, ['pairs', model.embed_dim]),
  }
  return w.model(
    inputs,
    outputs,
    doc='CACE-Net stage 2: backbone maps of (query, gallery) '
    'pairs -> conditional embeddings and their cosine distance',
  )

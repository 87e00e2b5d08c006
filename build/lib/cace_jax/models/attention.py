"""Visual clue alignment: the adjacency A(u, v) of a pair of feature maps.

A pair graph has 2n nodes, u's n pixels then v's:

    A = [[A_uu, A_uv],
         [A_vu, A_vv]]      with A_vu = A_uv^T for every kind below.

Kinds (`ClueAttention.kind`):
  'raw_correspondence'
                    paper eq. 2-4 on the backbone map X as it is:
                    A_uu = ReLU(X_u W X_u^T), A_uv = ReLU(X_u W' X_v^T), with
                    diagonal learnable W (`w_intra`) and W' (`w_inter`), both
                    starting at ones. Each edge carries the magnitudes of both
                    pixels, so A's scale is |x|^2 (hundreds for ResNet-50
                    layer-4 maps); the GCN's operator F is invariant to that
                    scale, and its isolated-node threshold is made relative
                    to the graph's mean edge weight (`RAW_KINDS`,
                    `gcn.degree_threshold`). Layer-4 features are non-negative,
                    so with W = W' = 1 the ReLU prunes nothing at the start:
                    the graph starts dense and learning W, W' must make it
                    selective.
  'cosine_correspondence'
                    the same with every pixel L2-normalised over channels
                    first: A = ReLU(cosine similarity) in [0, 1] at init. A
                    different model, not a rescaling: it drops every pixel's
                    magnitude from every edge, which no diagonal W restores.
  'projected'       the official code: Y = L2-normalise(y(X)), y a bias-free
                    1x1 conv C -> C/16; A = ReLU(Y Y^T) over all 2n nodes.
  'raw_intra', 'cosine_intra'
                    Table 1's Individual-GCN: the correspondence kinds with
                    A_uv = 0 (no cross-image edges).
  'none'            all zeros: the discrepancy GCN then contributes nothing.
  'part'            A_uv = I (pixel i of u <-> pixel i of v), A_uu = 0.
  'topk'            each pixel linked (weight 1) to its k most cosine-similar
                    pixels of the other image, symmetrised (i~j if either picks
                    the other); A_uu = 0; no gradient.
  'full'            all ones (fully connected).

Every kind factors into per-image quantities (`ClueAttention.image_keys`:
the intra block and a query/key per pixel) and a per-pair cross block
(`cross_block(kind, query_u, key_v)`); the fast pair stage uses that form.
`ClueAttention.__call__` builds the dense 2n x 2n adjacency directly from the
definitions, for the reference path and for visualisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cace_jax.models.layers import Conv1x1, l2_normalize

ADJACENCY_KINDS = (
  'raw_correspondence',
  'cosine_correspondence',
  'projected',
  'raw_intra',
  'cosine_intra',
  'none',
  'part',
  'topk',
  'full',
)
# Kinds with learnable diagonal W (intra) and W' (inter, the correspondence kinds).
DIAGONAL_KINDS = ('raw_correspondence', 'cosine_correspondence', 'raw_intra', 'cosine_intra')
# Kinds on unnormalised features: A's scale is the features' |x|^2.
RAW_KINDS = ('raw_correspondence', 'raw_intra')
# Names before the raw form existed; both meant the cosine form.
RENAMED_KINDS = {'correspondence': 'cosine_correspondence', 'intra': 'cosine_intra'}


def zero_diagonal(matrix):
  """Zeroes the diagonal of [..., n, n]."""
  return matrix * (1.0 - jnp.eye(matrix.shape[-1], dtype=matrix.dtype))


def topk_mask(similarity, k: int):
  """[..., n, m] -> 0/1 mask with a one at the k largest entries of each row."""
  _, index = jax.lax.top_k(jax.lax.stop_gradient(similarity), k)
  return jax.nn.one_hot(index, similarity.shape[-1], dtype=similarity.dtype).max(-2)


def cross_block(kind: str, query_u, key_v, topk: int = 1):
  """The u->v block A_uv of a pair's adjacency.

  Args:
    kind: one of ADJACENCY_KINDS.
    query_u: [..., n, k] u's queries from `image_keys`.
    key_v: [..., n, k] v's keys from `image_keys`.
    topk: neighbours per pixel for kind 'topk'.

  Returns:
    A_uv: [..., n, n] (rows: u's pixels, columns: v's pixels).
  """
  shape = query_u.shape[:-1] + key_v.shape[-2:-1]
  if kind in ('raw_correspondence', 'cosine_correspondence', 'projected'):
    return jax.nn.relu(jnp.einsum('...ik,...jk->...ij', query_u, key_v))
  if kind in ('none', 'raw_intra', 'cosine_intra'):
    return jnp.zeros(shape, query_u.dtype)
  if kind == 'part':
    return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1], dtype=query_u.dtype), shape)
  if kind == 'full':
    return jnp.ones(shape, query_u.dtype)
  if kind == 'topk':
    similarity = jnp.einsum('...ik,...jk->...ij', query_u, key_v)
    by_u = topk_mask(similarity, topk)
    by_v = jnp.swapaxes(topk_mask(jnp.swapaxes(similarity, -1, -2), topk), -1, -2)
    return jnp.maximum(by_u, by_v)
  raise ValueError(f'unknown adjacency {kind!r}; expected one of {ADJACENCY_KINDS}')


class ClueAttention(nn.Module):
  """Adjacency of a pair graph, by `kind` (see module docstring).

  Attributes:
    kind: one of ADJACENCY_KINDS.
    in_features: C, channels of the feature maps.
    reduction: C / width of the 'projected' embedding y (16).
    topk: neighbours per pixel for 'topk'.
    intra_init: initial value of every entry of the intra-image diagonal W
      (eq. 2) of the correspondence kinds; W' (eq. 3) starts at ones. Below 1
      the graph starts with more of each pixel's degree across the pair.
  """

  kind: str = 'projected'
  in_features: int = 2048
  reduction: int = 16
  topk: int = 1
  intra_init: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.kind not in ADJACENCY_KINDS:
      raise ValueError(f'unknown adjacency {self.kind!r}; expected one of {ADJACENCY_KINDS}')
    if self.kind == 'projected':
      self.y = Conv1x1(
        self.in_features,
        max(self.in_features // self.reduction, 1),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )
    if self.kind in DIAGONAL_KINDS:
      self.w_intra = self.param(
        'w_intra', nn.initializers.constant(self.intra_init), (self.in_features,), self.param_dtype
      )
    if self.kind.endswith('correspondence'):
      self.w_inter = self.param(
        'w_inter', nn.initializers.ones, (self.in_features,), self.param_dtype
      )

  def _embed(self, nodes):
    """Per-pixel vectors whose (weighted) inner products define A; float32."""
    if self.kind == 'projected':
      return l2_normalize(self.y(nodes).astype(jnp.float32))
    if self.kind in RAW_KINDS:
      return nodes.astype(jnp.float32)
    return l2_normalize(nodes.astype(jnp.float32))

  def image_keys(self, nodes):
    """Per-image quantities from which any pair's adjacency is assembled.

    Args:
      nodes: [..., n, C] one image's pixels (rows).

    Returns:
      dict with 'intra' [..., n, n] (A_uu, zero diagonal), 'query' and 'key'
      [..., n, k] with A_uv = cross_block(kind, query_u, key_v); k is C/16 for
      'projected', C for the correspondence kinds and 'topk', 0 otherwise.
    """
    n = nodes.shape[-2]
    empty = jnp.zeros(nodes.shape[:-1] + (0,), jnp.float32)
    zeros = jnp.zeros(nodes.shape[:-1] + (n,), jnp.float32)
    if self.kind == 'projected':
      y = self._embed(nodes)
      intra = jax.nn.relu(jnp.einsum('...ik,...jk->...ij', y, y))
      return {'intra': zero_diagonal(intra), 'query': y, 'key': y}
    if self.kind in DIAGONAL_KINDS:
      x = self._embed(nodes)
      intra = jax.nn.relu(jnp.einsum('...ik,...jk->...ij', x * self.w_intra, x))
      inter = self.kind.endswith('correspondence')
      query, key = (x * self.w_inter, x) if inter else (empty, empty)
      return {'intra': zero_diagonal(intra), 'query': query, 'key': key}
    if self.kind == 'topk':
      x = self._embed(nodes)
      return {'intra': zeros, 'query': x, 'key': x}
    if self.kind == 'full':
      return {'intra': zero_diagonal(zeros + 1.0), 'query': empty, 'key': empty}
    return {'intra': zeros, 'query': empty, 'key': empty}  # 'none', 'part'

  def __call__(self, nodes_u, nodes_v):
    """Dense adjacency of pairs, straight from the definitions.

    Args:
      nodes_u, nodes_v: [..., n, C] pixels of u and of v.

    Returns:
      A: [..., 2n, 2n], u's nodes first (diagonal not yet zeroed).
    """
    n = nodes_u.shape[-2]
    nodes = jnp.concatenate([nodes_u, nodes_v], axis=-2)
    side = jnp.arange(2 * n) >= n
    same_image = side[:, None] == side[None, :]  # [2n, 2n]
    shape = nodes.shape[:-1] + (2 * n,)
    if self.kind == 'projected':
      y = self._embed(nodes)
      return jax.nn.relu(jnp.einsum('...ik,...jk->...ij', y, y))
    if self.kind in DIAGONAL_KINDS:
      x = self._embed(nodes)
      s_intra = jnp.einsum('...ic,...jc->...ij', x * self.w_intra, x)
      if self.kind.endswith('intra'):
        return jnp.where(same_image, jax.nn.relu(s_intra), 0.0)
      s_inter = jnp.einsum('...ic,...jc->...ij', x * self.w_inter, x)
      return jax.nn.relu(jnp.where(same_image, s_intra, s_inter))
    if self.kind == 'none':
      return jnp.zeros(shape, jnp.float32)
    if self.kind == 'full':
      return jnp.ones(shape, jnp.float32)
    if self.kind == 'part':
      same_pixel = jnp.arange(2 * n)[:, None] % n == jnp.arange(2 * n)[None, :] % n
      return jnp.broadcast_to((same_pixel & ~same_image).astype(jnp.float32), shape)
    # 'topk': each node picks among the other image's nodes; symmetrise.
    x = self._embed(nodes)
    similarity = jnp.einsum('...ic,...jc->...ij', x, x)
    picks = topk_mask(jnp.where(same_image, -jnp.inf, similarity), self.topk)
    return jnp.maximum(picks, jnp.swapaxes(picks, -1, -2))


def make_adjacency(name: str, in_features: int, **kwargs) -> ClueAttention:
  """Factory: the `ClueAttention` of kind `name` (one of ADJACENCY_KINDS)."""
  if name not in ADJACENCY_KINDS:
    raise ValueError(f'unknown adjacency {name!r}; expected one of {ADJACENCY_KINDS}')
  return ClueAttention(kind=name, in_features=in_features, **kwargs)

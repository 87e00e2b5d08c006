"""Visual clue alignment: the adjacency A(u, v) of a pair of feature maps.

A pair graph has 2n nodes, u's n pixels then v's:

    A = [[A_uu, A_uv],
         [A_vu, A_vv]]      (A_vu = A_uv^T for every built-in kind).

**Every adjacency is registered in one form**, the form that lets stage 2
cache everything per image (`register_adjacency`):

  * per image, from its pixels X [n, C] as the kind reads them (`pixels`:
    'raw' X, 'normalised' X with every pixel L2-normalised over channels, or
    'projected' Y = L2-normalise(y(X)), y a bias-free 1x1 conv C -> C/16):
    the intra block A_uu = `intra(x, p)` and keys (query, key) = `keys(x, p)`;
  * per pair: the cross block A_uv = `cross(query_u, key_v, p)`.

`p` holds the kind's own parameters (declared with their initial values in
`params`) and the model's settings (`topk`, `intra_init`). `cross` sees only
keys and settings, never parameters: that is what lets a gallery's keys be
computed once. The dense 2n x 2n matrix (`ClueAttention.__call__`, the
reference path and the heatmaps), the fast pair stage and the stage-2 cache
are all assembled from these functions, so a kind cannot be half-added.

Built-in kinds:
  'raw_correspondence'
                    paper eq. 2-4 on the backbone map X as it is:
                    A_uu = ReLU(X_u W X_u^T), A_uv = ReLU(X_u W' X_v^T), with
                    diagonal learnable W (`w_intra`) and W' (`w_inter`), both
                    starting at ones. Each edge carries the magnitudes of both
                    pixels, so A's scale is |x|^2 (hundreds for ResNet-50
                    layer-4 maps); the GCN's operator F is invariant to that
                    scale, and its isolated-node threshold is made relative
                    to the graph's mean edge weight (`pixels='raw'`,
                    `gcn.degree_threshold`). Layer-4 features are non-negative,
                    so with W = W' = 1 the ReLU prunes nothing at the start:
                    the graph starts dense and learning W, W' must make it
                    selective.
  'cosine_correspondence'
                    the same with every pixel L2-normalised over channels
                    first: A = ReLU(cosine similarity) in [0, 1] at init. A
                    different model, not a rescaling: it drops every pixel's
                    magnitude from every edge, which no diagonal W restores.
  'projected'       the official code: A = ReLU(Y Y^T) over all 2n nodes.
  'raw_intra', 'cosine_intra'
                    Table 1's Individual-GCN: the correspondence kinds with
                    A_uv = 0 (no cross-image edges).
  'none'            all zeros: the discrepancy GCN then contributes nothing.
  'part'            A_uv = I (pixel i of u <-> pixel i of v), A_uu = 0.
  'topk'            each pixel linked (weight 1) to its k most cosine-similar
                    pixels of the other image, symmetrised (i~j if either picks
                    the other); A_uu = 0; no gradient.
  'full'            all ones (fully connected).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cace_jax.errors import ConfigError
from cace_jax.models.layers import Conv1x1, l2_normalize

PIXELS = ('raw', 'normalised', 'projected')
# Names before the raw form existed; both meant the cosine form.
RENAMED_KINDS = {'correspondence': 'cosine_correspondence', 'intra': 'cosine_intra'}


def zero_diagonal(matrix):
  """Zeroes the diagonal of [..., n, n]."""
  return matrix * (1.0 - jnp.eye(matrix.shape[-1], dtype=matrix.dtype))


def topk_mask(similarity, k: int):
  """[..., n, m] -> 0/1 mask with a one at the k largest entries of each row."""
  _, index = jax.lax.top_k(jax.lax.stop_gradient(similarity), k)
  return jax.nn.one_hot(index, similarity.shape[-1], dtype=similarity.dtype).max(-2)


def similarity(a, b):
  """Inner products of the rows of a [n, k] and b [m, k] -> [n, m]."""
  return jnp.einsum('...ik,...jk->...ij', a, b)


@dataclasses.dataclass(frozen=True)
class Adjacency:
  """A registered adjacency (see the module docstring for the form).

  Attributes:
    name: its `model.adjacency` name.
    cross: (query_u [n, k], key_v [m, k], p) -> A_uv [n, m].
    intra: (x [n, c], p) -> A_uu [n, n] (its diagonal is zeroed for you);
      None: no edges within an image.
    keys: (x [n, c], p) -> (query [n, k], key [n, k]); None: k = 0 (a cross
      block that ignores the images).
    pixels: what x is: 'raw', 'normalised' or 'projected'. 'raw' also makes
      the GCN's isolated-node threshold relative to A's scale.
    params: {name: init(channels, p) -> initial value}: the kind's own
      parameters, created under `pair_attention/` (so `optim.pair_lr_scale`
      applies to them) and handed to `intra` and `keys` in `p`.
    symmetric: A = A^T (intra symmetric, A_vu = A_uv^T). When False the pair
      stage computes A_vu = cross(query_v, key_u) as well, and average
      pooling's readout transposes the operator instead of reusing it.
  """

  name: str
  cross: Callable
  intra: Callable | None = None
  keys: Callable | None = None
  pixels: str = 'normalised'
  params: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  symmetric: bool = True

  @property
  def relative_threshold(self) -> bool:
    """Whether A's scale is the features' |x|^2 (`gcn.degree_threshold`)."""
    return self.pixels == 'raw'


ADJACENCIES: dict[str, Adjacency] = {}


def register_adjacency(
  name: str,
  *,
  cross: Callable,
  intra: Callable | None = None,
  keys: Callable | None = None,
  pixels: str = 'normalised',
  params: Mapping[str, Callable] | None = None,
  symmetric: bool = True,
) -> Adjacency:
  """Registers `model.adjacency=name` (fields as in `Adjacency`) and returns its entry.

  Example (an edge only where two pixels of different images pick each other):

      def mutual_topk(query_u, key_v, p):
        s = similarity(query_u, key_v)
        return topk_mask(s, p['topk']) * topk_mask(s.T, p['topk']).T

      register_adjacency('mutual_topk', keys=pixel_keys, cross=mutual_topk)
  """
  if name in ADJACENCIES or name in RENAMED_KINDS:
    raise ValueError(f'adjacency {name!r} is already registered')
  if pixels not in PIXELS:
    raise ValueError(f'adjacency {name!r}: pixels={pixels!r}; expected one of {PIXELS}')
  entry = Adjacency(name, cross, intra, keys, pixels, dict(params or {}), symmetric)
  ADJACENCIES[name] = entry
  return entry


def get_adjacency(name: str) -> Adjacency:
  """The registered adjacency `name`; ConfigError naming the registered ones otherwise."""
  if name not in ADJACENCIES:
    raise ConfigError(
      f'model.adjacency={name!r} is not a registered adjacency; registered: '
      f'{", ".join(ADJACENCIES)}'
    )
  return ADJACENCIES[name]


def adjacency_kinds() -> tuple[str, ...]:
  """Every value `model.adjacency` may take now (the registry can grow)."""
  return tuple(ADJACENCIES)


def _over_leading_axes(fn: Callable, core_ndim: int) -> Callable:
  """fn on arrays of rank `core_ndim`, mapped over any leading axes the arrays share."""

  def mapped(*arrays):
    inner = fn
    for _ in range(arrays[0].ndim - core_ndim):
      inner = jax.vmap(inner)
    return inner(*arrays)

  return mapped


def cross_block(kind: str, query_u, key_v, topk: int = 1):
  """The u->v block A_uv of pairs' adjacency, from their keys.

  Args:
    kind: a registered adjacency.
    query_u: [..., n, k] u's queries (`ClueAttention.image_keys`).
    key_v: [..., m, k] v's keys.
    topk: the model's `topk` setting.

  Returns:
    A_uv: [..., n, m] (rows: u's pixels, columns: v's pixels).
  """
  cross = get_adjacency(kind).cross
  return _over_leading_axes(lambda q, k: cross(q, k, {'topk': topk}), 2)(query_u, key_v)


# ----------------------------------------------------------------------------- built-in kinds


def pixel_keys(x, p):
  """Keys of kinds that compare pixels as they are: query = key = x."""
  return x, x


def rectified_similarity(query_u, key_v, p):
  """ReLU(query_u key_v^T): the correspondence and projected cross blocks."""
  return jax.nn.relu(similarity(query_u, key_v))


def weighted_intra(x, p):
  """ReLU(X W X^T), W = diag(w_intra) (paper eq. 2)."""
  return jax.nn.relu(similarity(x * p['w_intra'], x))


def weighted_keys(x, p):
  """(X W', X), W' = diag(w_inter): the cross block is then ReLU(X_u W' X_v^T) (eq. 3)."""
  return x * p['w_inter'], x


def no_edges(query_u, key_v, p):
  return jnp.zeros((query_u.shape[0], key_v.shape[0]), query_u.dtype)


def same_position(query_u, key_v, p):
  """Pixel i of u <-> pixel i of v (Table 2's part alignment)."""
  return jnp.eye(query_u.shape[0], key_v.shape[0], dtype=query_u.dtype)


def every_pair(query_u, key_v, p):
  return jnp.ones((query_u.shape[0], key_v.shape[0]), query_u.dtype)


def every_pixel(x, p):
  return jnp.ones((x.shape[0], x.shape[0]), x.dtype)


def either_picks(query_u, key_v, p):
  """Each pixel picks its k most similar pixels of the other image; an edge if either picks."""
  s = similarity(query_u, key_v)
  return jnp.maximum(topk_mask(s, p['topk']), topk_mask(s.T, p['topk']).T)


def diagonal_init(setting: str | None = None):
  """Init of a per-channel diagonal: every entry the model setting `setting`, or 1."""
  return lambda channels, p: jnp.full((channels,), p[setting] if setting else 1.0)


register_adjacency(
  'raw_correspondence',
  intra=weighted_intra,
  keys=weighted_keys,
  cross=rectified_similarity,
  pixels='raw',
  params={'w_intra': diagonal_init('intra_init'), 'w_inter': diagonal_init()},
)
register_adjacency(
  'cosine_correspondence',
  intra=weighted_intra,
  keys=weighted_keys,
  cross=rectified_similarity,
  params={'w_intra': diagonal_init('intra_init'), 'w_inter': diagonal_init()},
)
register_adjacency(
  'projected',
  intra=lambda y, p: jax.nn.relu(similarity(y, y)),
  keys=pixel_keys,
  cross=rectified_similarity,
  pixels='projected',
)
register_adjacency(
  'raw_intra',
  intra=weighted_intra,
  cross=no_edges,
  pixels='raw',
  params={'w_intra': diagonal_init('intra_init')},
)
register_adjacency(
  'cosine_intra',
  intra=weighted_intra,
  cross=no_edges,
  params={'w_intra': diagonal_init('intra_init')},
)
register_adjacency('none', cross=no_edges)
register_adjacency('part', cross=same_position)
register_adjacency('topk', keys=pixel_keys, cross=either_picks)
register_adjacency('full', intra=every_pixel, cross=every_pair)


class ClueAttention(nn.Module):
  """Adjacency of pair graphs, of the registered `kind`.

  Attributes:
    kind: a registered adjacency (`ADJACENCIES`).
    in_features: C, channels of the feature maps.
    reduction: C / width of the 'projected' embedding y (16).
    topk: neighbours per pixel for kinds that pick ('topk').
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

  @property
  def entry(self) -> Adjacency:
    return get_adjacency(self.kind)

  def setup(self):
    entry = self.entry
    if entry.pixels == 'projected':
      self.y = Conv1x1(
        self.in_features,
        max(self.in_features // self.reduction, 1),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )
    self.declared = {
      name: self.param(
        name,
        lambda _, init=init: jnp.asarray(init(self.in_features, self.settings()), self.param_dtype),
      )
      for name, init in entry.params.items()
    }

  def settings(self) -> dict:
    """The model settings every registered function sees in `p`."""
    return {'topk': self.topk, 'intra_init': self.intra_init}

  def pixels(self, nodes):
    """What the kind compares: nodes [..., n, C] -> x [..., n, c] (float32)."""
    pixels = self.entry.pixels
    if pixels == 'projected':
      return l2_normalize(self.y(nodes).astype(jnp.float32))
    if pixels == 'raw':
      return nodes.astype(jnp.float32)
    return l2_normalize(nodes.astype(jnp.float32))

  def image_keys(self, nodes):
    """Per-image quantities from which any pair's adjacency is assembled.

    Args:
      nodes: [..., n, C] one image's pixels (rows).

    Returns:
      dict with 'intra' [..., n, n] (A_uu, zero diagonal), 'query' and 'key'
      [..., n, k] with A_uv = cross_block(kind, query_u, key_v).
    """
    entry, p = self.entry, {**self.settings(), **self.declared}
    x = self.pixels(nodes)
    n = nodes.shape[-2]
    if entry.intra is None:
      intra = jnp.zeros(nodes.shape[:-1] + (n,), jnp.float32)
    else:
      intra = zero_diagonal(_over_leading_axes(lambda x: entry.intra(x, p), 2)(x))
    if entry.keys is None:
      query = key = jnp.zeros(nodes.shape[:-1] + (0,), jnp.float32)
    else:
      query, key = _over_leading_axes(lambda x: entry.keys(x, p), 2)(x)
    return {'intra': intra, 'query': query, 'key': key}

  def blocks(self, keys_u, keys_v):
    """(A_uv, A_vu) of pairs from their image keys; A_vu is None for symmetric kinds."""
    cross_uv = cross_block(self.kind, keys_u['query'], keys_v['key'], self.topk)
    if self.entry.symmetric:
      return cross_uv, None
    return cross_uv, cross_block(self.kind, keys_v['query'], keys_u['key'], self.topk)

  def __call__(self, nodes_u, nodes_v):
    """Dense adjacency of pairs, assembled from the registered blocks.

    Args:
      nodes_u, nodes_v: [..., n, C] pixels of u and of v.

    Returns:
      A: [..., 2n, 2n], u's nodes first, zero diagonal.
    """
    keys_u, keys_v = self.image_keys(nodes_u), self.image_keys(nodes_v)
    cross_uv, cross_vu = self.blocks(keys_u, keys_v)
    if cross_vu is None:
      cross_vu = jnp.swapaxes(cross_uv, -1, -2)
    top = jnp.concatenate([keys_u['intra'], cross_uv], -1)
    bottom = jnp.concatenate([cross_vu, keys_v['intra']], -1)
    return jnp.concatenate([top, bottom], -2)


def make_adjacency(name: str, in_features: int, **kwargs) -> ClueAttention:
  """Factory: the `ClueAttention` of kind `name` (a registered adjacency)."""
  get_adjacency(name)
  return ClueAttention(kind=name, in_features=in_features, **kwargs)

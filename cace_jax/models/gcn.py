"""Graph operators of the pair graph: the discrepancy GCN (paper eq. 7), the normal GCN, and yours.

Convention: a pair graph has N = 2n nodes, u's n pixels then v's; node
features are the ROWS of X [N, C]. One layer maps

    X  ->  X + op(g(X)) o          (op mixes nodes; g, o act on channels)

with g: C -> C/16 and o: C/16 -> C 1x1 convs without bias. The built-in
operators are linear, op(z) = F z, with

    discrepancy:  F = N (D - A) N        normal:  F = I + N A N

where A has its diagonal zeroed, D = diag(row sums of A) and N = D^-1/2 with
isolated rows (degree <= 1e-3) given 1, held constant for gradients
(stop_gradient), as in the official code. Both are invariant to scaling A
(N D N and N A N are), except through that threshold; for adjacencies on raw
features, whose scale is |x|^2, the threshold is relative instead: 1e-3
times the graph's mean edge weight (`degree_threshold`), which makes the GCN
scale-free and equals the official rule for edges near 1.

**One definition per operator.** An operator is a function
`op(graph, z) -> [N, r]` registered with `register_operator`; it sees the
graph only through `graph.adjacency_times(s)` (A s), `graph.degree()` and
`graph.normaliser()`, so one definition runs on two graph forms:

  * `DenseGraph`: A as a matrix [N, N]; the reference path (`pair_path=
    'direct'`), visualisation, and the dense matrix F = op(I)
    (`graph_operator`);
  * `PairBlocks`: A as u's and v's intra blocks and the cross block A_uv
    (and A_vu, where it is not A_uv^T), node features C/16 wide; the fast
    pair stage. Its
    readout weights (the mean of op(z) over u's nodes as weights on z, what
    average pooling needs) are derived from the same definition: op applied
    to u's indicator for operators declared symmetric, the transpose of op
    (`jax.linear_transpose`) for other linear ones.

An operator declared non-linear has no readout weights: average pooling then
builds each conditional map and pools it, as GeM does. Stacked layers
(`depth` > 1) reuse the adjacency of the backbone maps; each layer has its
own g and o (`g`, `o` for the first, `g_1`, `o_1`, ... after).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cace_jax.errors import ConfigError
from cace_jax.models.layers import Conv1x1

DEGREE_EPS = 1e-3
NO_GCN = 'none'  # model.gcn: no pair stage at all


def degree_threshold(total_degree, num_nodes: int, relative: bool = False):
  """Degree at or below which a node counts as isolated (its N entry is 1).

  Args:
    total_degree: sum of all node degrees of the graph (any leading shape).
    num_nodes: N, nodes of the graph.
    relative: False: the official absolute 1e-3, for adjacencies in [0, 1].
      True: 1e-3 times the mean edge weight, total_degree / (N (N - 1)), for
      raw-feature adjacencies (`Adjacency.pixels` 'raw').
  """
  if not relative:
    return DEGREE_EPS
  return DEGREE_EPS * jax.lax.stop_gradient(total_degree) / (num_nodes * (num_nodes - 1))


def normalize_degree(degree, threshold=DEGREE_EPS):
  """N's diagonal: degree^-1/2, with 1 where degree <= threshold; no gradient."""
  safe = jnp.where(degree > threshold, degree, 1.0)
  return jax.lax.stop_gradient(jax.lax.rsqrt(safe))


class DenseGraph(NamedTuple):
  """A graph given as its adjacency matrix [..., N, N] (the diagonal is ignored)."""

  adjacency: Any
  relative_threshold: bool = False

  @property
  def size(self) -> int:
    return self.adjacency.shape[-1]

  def off_diagonal(self):
    return self.adjacency * (1.0 - jnp.eye(self.size, dtype=self.adjacency.dtype))

  def degree(self):
    """[..., N] row sums of A."""
    return self.off_diagonal().sum(-1)

  def normaliser(self):
    """[..., N] N's diagonal (held constant for gradients)."""
    degree = self.degree()
    total = degree.sum(-1, keepdims=True)
    return normalize_degree(degree, degree_threshold(total, self.size, self.relative_threshold))

  def adjacency_times(self, s):
    """A s for node features s [..., N, r]."""
    return self.off_diagonal() @ s


class PairBlocks(NamedTuple):
  """One pair graph given as blocks: A = [[intra_u, cross], [cross_vu, intra_v]], each [n, n].

  The intra blocks have a zero diagonal; `cross_vu` None means A_vu = cross^T
  (every symmetric adjacency). Node features are [2n, r], u's rows first.
  """

  intra_u: Any
  intra_v: Any
  cross: Any
  relative_threshold: bool = False
  cross_vu: Any = None

  @property
  def size(self) -> int:
    return 2 * self.intra_u.shape[-1]

  @property
  def symmetric(self) -> bool:
    """Whether A = A^T by construction (intra blocks symmetric, A_vu = A_uv^T)."""
    return self.cross_vu is None

  def degrees(self):
    """(degree_u [n], degree_v [n])."""
    from_v = self.cross.sum(0) if self.cross_vu is None else self.cross_vu.sum(-1)
    return self.intra_u.sum(-1) + self.cross.sum(-1), self.intra_v.sum(-1) + from_v

  def degree(self):
    return jnp.concatenate(self.degrees())

  def normaliser(self):
    degree_u, degree_v = self.degrees()
    threshold = degree_threshold(
      degree_u.sum() + degree_v.sum(), self.size, self.relative_threshold
    )
    return jnp.concatenate(
      [normalize_degree(degree_u, threshold), normalize_degree(degree_v, threshold)]
    )

  def adjacency_times(self, s):
    n = self.intra_u.shape[-1]
    s_u, s_v = s[:n], s[n:]
    cross_vu = self.cross.T if self.cross_vu is None else self.cross_vu
    return jnp.concatenate(
      [self.intra_u @ s_u + self.cross @ s_v, cross_vu @ s_u + self.intra_v @ s_v]
    )


@dataclasses.dataclass(frozen=True)
class GraphOperator:
  """A registered graph operator.

  Attributes:
    name: its `model.gcn` name.
    apply: op(graph, z [N, r]) -> [N, r], graph a `DenseGraph` or `PairBlocks`.
    linear: op(z) = F z for some F that depends on the graph only. Needed for
      the dense matrix (`graph_operator`) and for average pooling's readout.
    symmetric: F^T = F whenever A is symmetric: for symmetric adjacencies the
      readout is then op of u's indicator instead of op's transpose.
  """

  name: str
  apply: Callable
  linear: bool = True
  symmetric: bool = False


OPERATORS: dict[str, GraphOperator] = {}


def register_operator(name: str, *, linear: bool = True, symmetric: bool = False):
  """Decorator: registers `op(graph, z) -> [N, r]` as `model.gcn=name`.

  Example (a two-hop discrepancy operator, F^2):

      @register_operator('two_hop', symmetric=True)
      def two_hop(graph, z):
        once = OPERATORS['discrepancy'].apply
        return once(graph, once(graph, z))
  """
  if name == NO_GCN or name in OPERATORS:
    raise ValueError(f'graph operator {name!r} is already registered')

  def register(fn: Callable) -> Callable:
    OPERATORS[name] = GraphOperator(name, fn, linear, symmetric)
    return fn

  return register


def get_operator(name: str) -> GraphOperator:
  """The registered operator `name`; ConfigError naming the registered ones otherwise."""
  if name not in OPERATORS:
    raise ConfigError(
      f'model.gcn={name!r} is not a registered graph operator; registered: '
      f'{", ".join(OPERATORS)} (or {NO_GCN!r}: no pair stage)'
    )
  return OPERATORS[name]


def gcn_kinds() -> tuple[str, ...]:
  """Every value `model.gcn` may take now (the registry can grow)."""
  return (*OPERATORS, NO_GCN)


@register_operator('discrepancy', symmetric=True)
def discrepancy(graph, z):
  """F z = N (D - A) N z (paper eq. 7, official form): each node minus its neighbours."""
  n = graph.normaliser()[..., None]
  s = n * z
  return n * (graph.degree()[..., None] * s - graph.adjacency_times(s))


@register_operator('normal', symmetric=True)
def normal(graph, z):
  """F z = (I + N A N) z (Table 1's normal GCN): each node plus its neighbours' mean."""
  n = graph.normaliser()[..., None]
  return z + n * graph.adjacency_times(n * z)


def graph_operator(adjacency, kind: str = 'discrepancy', relative_threshold: bool = False):
  """The dense matrix F of a linear operator on a (batch of) adjacency [..., N, N].

  Derived from the operator's one definition: F = op(I), column j being op(e_j).

  Args:
    adjacency: [..., N, N], symmetric and non-negative; its diagonal is ignored.
    kind: a registered operator.
    relative_threshold: isolated nodes by `degree_threshold`'s relative rule.

  Returns:
    F: [..., N, N].
  """
  operator = get_operator(kind)
  if not operator.linear:
    raise ConfigError(f'model.gcn={kind!r} is not linear: it has no matrix F')
  graph = DenseGraph(adjacency, relative_threshold)
  eye = jnp.broadcast_to(jnp.eye(graph.size, dtype=adjacency.dtype), adjacency.shape)
  return operator.apply(graph, eye)


def readout_weights(kind: str, blocks: PairBlocks):
  """Weights w with mean over u's nodes of op(z) = w_u . z_u + w_v . z_v (linear operators).

  Derived from the operator's definition: w = F^T 1_u / n, which for a
  symmetric F is F 1_u / n, one application of op to u's indicator.

  Returns:
    (w_u [n], w_v [n]).
  """
  operator = get_operator(kind)
  n = blocks.intra_u.shape[-1]
  if operator.symmetric and blocks.symmetric:
    indicator = jnp.concatenate([jnp.ones((n, 1)), jnp.zeros((n, 1))])
    weights = operator.apply(blocks, indicator)[:, 0] / n
  else:
    mean_u = lambda z: operator.apply(blocks, z)[:n].mean(0)
    (weights,) = jax.linear_transpose(mean_u, jnp.zeros((2 * n, 1)))(jnp.ones((1,)))
    weights = weights[:, 0]
  return weights[:n], weights[n:]


def propagate_pair(kind, blocks: PairBlocks, g_u, g_v, mix=None, pooled=True):
  """The GCN increments of u's half of one pair graph, in the narrow width.

  With X_0 the backbone nodes, layer l adds H_l o_l where H_l = op(X_{l-1} W_g_l)
  and X_{l-1} W_g_l = X W_g_l + sum_{m<l} H_m (o_m W_g_l): everything stays
  r = C/16 wide. The caller adds sum_l H_l o_l to X (or to its pooled vector).

  Args:
    kind: a registered operator.
    blocks: the pair's adjacency blocks.
    g_u, g_v: [L, n, r] per-layer projections X W_g_l of u's / v's nodes.
    mix: [L, L, r, r] with mix[m, l] = o_m W_g_l (only m < l is read); None
      when L == 1.
    pooled: return the mean over u's nodes of each H_l instead of H_l itself
      (through the readout weights; a linear operator only).

  Returns:
    [L, r] if pooled else [L, n, r]: H_l restricted to u's nodes (averaged).
  """
  operator = get_operator(kind)
  depth, n = g_u.shape[0], g_u.shape[1]
  if pooled:
    w_u, w_v = readout_weights(kind, blocks)
  hist_u, hist_v, outputs = [], [], []
  for layer in range(depth):
    z_u, z_v = g_u[layer], g_v[layer]
    for m in range(layer):
      z_u = z_u + hist_u[m] @ mix[m, layer]
      z_v = z_v + hist_v[m] @ mix[m, layer]
    last = layer == depth - 1
    if pooled and last:
      outputs.append(w_u @ z_u + w_v @ z_v)
      break
    h = operator.apply(blocks, jnp.concatenate([z_u, z_v]))
    h_u, h_v = h[:n], h[n:]
    hist_u.append(h_u)
    hist_v.append(h_v)
    outputs.append(h_u.mean(0) if pooled else h_u)
  return jnp.stack(outputs)


class PairGCN(nn.Module):
  """Parameters of a stack of pair-graph convolutions and their dense form.

  Attributes:
    in_features: C, channels of the backbone map.
    kind: a registered operator (`OPERATORS`).
    depth: number of stacked layers (all share the backbone adjacency).
    reduction: r = C // reduction (16 in the paper).
    output_init: initial scale of every o relative to LeCun-normal. 0 (the
      official init) makes each conditional map start equal to the individual
      one; it also makes the first gradients of g and of the adjacency zero
      (both reach the loss only through o), so they learn only as fast as o
      grows away from 0.
  """

  in_features: int
  kind: str = 'discrepancy'
  depth: int = 1
  reduction: int = 16
  output_init: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    inner = max(self.in_features // self.reduction, 1)
    suffix = lambda layer: '' if layer == 0 else f'_{layer}'
    self.g_layers = [
      Conv1x1(
        self.in_features,
        inner,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f'g{suffix(layer)}',
      )
      for layer in range(self.depth)
    ]
    if self.output_init:
      output_init = nn.initializers.variance_scaling(self.output_init**2, 'fan_in', 'normal')
    else:  # the official init: every conditional map starts equal to the individual one
      output_init = nn.initializers.zeros
    self.o_layers = [
      Conv1x1(
        inner,
        self.in_features,
        kernel_init=output_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f'o{suffix(layer)}',
      )
      for layer in range(self.depth)
    ]

  def kernels(self):
    """Raw matrices: {'g': [L, C, r], 'o': [L, r, C]} (float32)."""
    return {
      'g': jnp.stack([m.kernel[0, 0] for m in self.g_layers]).astype(jnp.float32),
      'o': jnp.stack([m.kernel[0, 0] for m in self.o_layers]).astype(jnp.float32),
    }

  def project(self, nodes):
    """Per-layer projections X W_g_l of backbone nodes [..., n, C] -> [..., L, n, r]."""
    return jnp.stack([g(nodes).astype(jnp.float32) for g in self.g_layers], axis=-3)

  def mix(self):
    """[L, L, r, r] products o_m W_g_l that carry layer m's output into layer l."""
    k = self.kernels()
    return jnp.einsum('mrc,lcs->mlrs', k['o'], k['g'])

  def __call__(self, nodes, graph: DenseGraph):
    """Dense reference: runs all layers on C-wide nodes.

    Args:
      nodes: [..., N, C] node features (rows are nodes).
      graph: the dense pair graphs, [..., N, N].

    Returns:
      [..., N, C] conditional node features.
    """
    apply = get_operator(self.kind).apply
    for g, o in zip(self.g_layers, self.o_layers):
      mixed = apply(graph, g(nodes).astype(jnp.float32))
      nodes = nodes + o(mixed).astype(nodes.dtype)
    return nodes

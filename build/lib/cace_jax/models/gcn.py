"""Discrepancy GCN (paper eq. 7, official form) and the normal smoothing GCN.

Convention: a pair graph has N = 2n nodes, u's n pixels then v's; node
features are the ROWS of X [N, C]. One layer maps

    X  ->  X + (F @ g(X)) @ o          (F: [N, N] mixes nodes; g, o act on channels)

with g: C -> C/16 and o: C/16 -> C 1x1 convs without bias and

    discrepancy:  F = N (D - A) N        normal:  F = I + N A N

where A has its diagonal zeroed, D = diag(row sums of A) and N = D^-1/2 with
isolated rows (degree <= 1e-3) given 1, held constant for gradients
(stop_gradient), as in the official code. Both operators are invariant to
scaling A (N D N and N A N are), except through that threshold; for
adjacencies on raw features, whose scale is |x|^2, the threshold is relative
instead: 1e-3 times the graph's mean edge weight (`degree_threshold`), which
makes the GCN scale-free and equals the official rule for edges near 1.
Every adjacency we build is symmetric, so F is symmetric and `F @ G` equals
the official `G^T F` written channels-first.

Stacked layers (`depth` > 1) reuse the adjacency of the backbone maps; each
layer has its own g and o (`g`, `o` for the first, `g_1`, `o_1`, ... after).

Two evaluation forms:
  * dense (`graph_operator`, `PairGCN.__call__`): builds F and runs on C-wide
    node maps; the reference path and visualisation use it.
  * blocked (`apply_operator_blocks`, `propagate_pair`): A given as the two
    per-image intra blocks and the per-pair cross block, node features kept in
    the narrow C/16 width; the fast pair stage uses it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cace_jax.models.layers import Conv1x1

GCN_KINDS = ('discrepancy', 'normal', 'none')
DEGREE_EPS = 1e-3


def degree_threshold(total_degree, num_nodes: int, relative: bool = False):
  """Degree at or below which a node counts as isolated (its N entry is 1).

  Args:
    total_degree: sum of all node degrees of the graph (any leading shape).
    num_nodes: N, nodes of the graph.
    relative: False: the official absolute 1e-3, for adjacencies in [0, 1].
      True: 1e-3 times the mean edge weight, total_degree / (N (N - 1)), for
      raw-feature adjacencies (`attention.RAW_KINDS`).
  """
  if not relative:
    return DEGREE_EPS
  return DEGREE_EPS * jax.lax.stop_gradient(total_degree) / (num_nodes * (num_nodes - 1))


def normalize_degree(degree, threshold=DEGREE_EPS):
  """N's diagonal: degree^-1/2, with 1 where degree <= threshold; no gradient."""
  safe = jnp.where(degree > threshold, degree, 1.0)
  return jax.lax.stop_gradient(jax.lax.rsqrt(safe))


def graph_operator(adjacency, kind: str = 'discrepancy', relative_threshold: bool = False):
  """The node-mixing operator F of a (batch of) dense adjacency [..., N, N].

  Args:
    adjacency: [..., N, N], symmetric and non-negative; its diagonal is ignored.
    kind: 'discrepancy' (N (D - A) N) or 'normal' (I + N A N).
    relative_threshold: isolated nodes by `degree_threshold`'s relative rule.

  Returns:
    F: [..., N, N].
  """
  size = adjacency.shape[-1]
  eye = jnp.eye(size, dtype=adjacency.dtype)
  adjacency = adjacency * (1.0 - eye)
  degree = adjacency.sum(-1)  # [..., N]
  total = degree.sum(-1, keepdims=True)
  n = normalize_degree(degree, degree_threshold(total, size, relative_threshold))
  if kind == 'discrepancy':
    laplacian = degree[..., :, None] * eye - adjacency
    return n[..., :, None] * laplacian * n[..., None, :]
  if kind == 'normal':
    return eye + n[..., :, None] * adjacency * n[..., None, :]
  raise ValueError(f'unknown gcn kind {kind!r}; expected one of {GCN_KINDS[:2]}')


def block_degrees(intra_u, intra_v, cross):
  """Node degrees of the pair graph from its blocks.

  Args:
    intra_u: [n, n] u's intra block (zero diagonal); intra_v likewise.
    cross: [n, n] the u->v block A_uv (the v->u block is its transpose).

  Returns:
    (degree_u [n], degree_v [n]).
  """
  return intra_u.sum(-1) + cross.sum(-1), intra_v.sum(-1) + cross.sum(0)


def block_normalizers(intra_u, intra_v, cross, relative_threshold: bool = False):
  """(degree_u, degree_v, N_u, N_v), each [n]: D and N of the pair graph from its blocks."""
  degree_u, degree_v = block_degrees(intra_u, intra_v, cross)
  total = degree_u.sum() + degree_v.sum()
  threshold = degree_threshold(total, 2 * degree_u.shape[-1], relative_threshold)
  return (
    degree_u,
    degree_v,
    normalize_degree(degree_u, threshold),
    normalize_degree(degree_v, threshold),
  )


def apply_operator_blocks(kind, intra_u, intra_v, cross, z_u, z_v, relative_threshold=False):
  """F @ [z_u; z_v] without forming the 2n x 2n F.

  Args:
    kind: 'discrepancy' or 'normal'.
    intra_u, intra_v, cross: [n, n] blocks as in `block_degrees`.
    z_u, z_v: [n, r] node features of u's and v's nodes.
    relative_threshold: as in `graph_operator`.

  Returns:
    ((F z)_u [n, r], (F z)_v [n, r]).
  """
  degree_u, degree_v, n_u, n_v = block_normalizers(intra_u, intra_v, cross, relative_threshold)
  s_u, s_v = n_u[:, None] * z_u, n_v[:, None] * z_v
  mixed_u = intra_u @ s_u + cross @ s_v  # (A N z)_u
  mixed_v = cross.T @ s_u + intra_v @ s_v  # (A N z)_v
  if kind == 'discrepancy':
    return (
      n_u[:, None] * (degree_u[:, None] * s_u - mixed_u),
      n_v[:, None] * (degree_v[:, None] * s_v - mixed_v),
    )
  return z_u + n_u[:, None] * mixed_u, z_v + n_v[:, None] * mixed_v


def readout_weights(kind, intra_u, intra_v, cross, relative_threshold=False):
  """Weights w with mean over u's nodes of (F z) = w_u . z_u + w_v . z_v.

  Since F is symmetric, w = F 1_u / n, a matrix-vector product: averaging a
  GCN output over u's pixels never needs F @ z itself.

  Returns:
    (w_u [n], w_v [n]).
  """
  degree_u, degree_v, n_u, n_v = block_normalizers(intra_u, intra_v, cross, relative_threshold)
  a_u = intra_u @ n_u  # (A N 1_u)_u
  a_v = cross.T @ n_u  # (A N 1_u)_v
  size = intra_u.shape[-1]
  if kind == 'discrepancy':
    return n_u * (degree_u * n_u - a_u) / size, -n_v * a_v / size
  return (1.0 + n_u * a_u) / size, n_v * a_v / size


def propagate_pair(
  kind, intra_u, intra_v, cross, g_u, g_v, mix=None, pooled=True, relative_threshold=False
):
  """The GCN increments of u's half of one pair graph, in the narrow width.

  With X_0 the backbone nodes, layer l adds H_l o_l where H_l = F (X_{l-1} W_g_l)
  and X_{l-1} W_g_l = X W_g_l + sum_{m<l} H_m (o_m W_g_l): everything stays
  r = C/16 wide. The caller adds sum_l H_l o_l to X (or to its pooled vector).

  Args:
    kind: 'discrepancy' or 'normal'.
    intra_u, intra_v, cross: [n, n] adjacency blocks of the pair.
    g_u, g_v: [L, n, r] per-layer projections X W_g_l of u's / v's nodes.
    mix: [L, L, r, r] with mix[m, l] = o_m W_g_l (only m < l is read); None
      when L == 1.
    pooled: return the mean over u's nodes of each H_l instead of H_l itself.
    relative_threshold: as in `graph_operator`.

  Returns:
    [L, r] if pooled else [L, n, r]: H_l restricted to u's nodes (averaged).
  """
  depth = g_u.shape[0]
  if pooled:
    w_u, w_v = readout_weights(kind, intra_u, intra_v, cross, relative_threshold)
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
    h_u, h_v = apply_operator_blocks(kind, intra_u, intra_v, cross, z_u, z_v, relative_threshold)
    hist_u.append(h_u)
    hist_v.append(h_v)
    outputs.append(h_u.mean(0) if pooled else h_u)
  return jnp.stack(outputs)


class PairGCN(nn.Module):
  """Parameters of a stack of pair-graph convolutions and their dense form.

  Attributes:
    in_features: C, channels of the backbone map.
    kind: 'discrepancy' or 'normal'.
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

  def __call__(self, nodes, operator):
    """Dense reference: runs all layers on C-wide nodes.

    Args:
      nodes: [..., N, C] node features (rows are nodes).
      operator: [..., N, N] F from `graph_operator`.

    Returns:
      [..., N, C] conditional node features.
    """
    for g, o in zip(self.g_layers, self.o_layers):
      mixed = jnp.einsum('...ij,...jr->...ir', operator, g(nodes).astype(jnp.float32))
      nodes = nodes + o(mixed).astype(nodes.dtype)
    return nodes

"""Adjacencies (registered blocks against dense definitions written here) and GCN operators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cace_jax.errors import ConfigError
from cace_jax.models import attention, gcn
from cace_jax.models.attention import ClueAttention, cross_block, make_adjacency

N_PIX, CHANNELS = 6, 32  # pixels per image, channels


def random_nodes(seed, shape=(3, N_PIX, CHANNELS)):
  """Post-ReLU-like features with some exact zeros."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(
    np.maximum(rng.normal(size=shape), 0.0) + 0.05 * rng.uniform(size=shape), jnp.float32
  )


def init_attention(kind, nodes_u, nodes_v, **kwargs):
  module = make_adjacency(kind, CHANNELS, **kwargs)
  variables = module.init(jax.random.key(0, impl='rbg'), nodes_u, nodes_v)
  if attention.get_adjacency(kind).params:  # move W, W' away from their all-ones init
    rng = np.random.default_rng(1)
    variables = jax.tree.map(
      lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), variables
    )
  return module, variables


def dense_reference(kind, variables, nodes_u, nodes_v, topk):
  """The built-in kinds' dense 2n x 2n adjacency, straight from their definitions.

  Independent of the registered per-image/cross-block form the model uses:
  every node against every node, then the kind's pattern.
  """
  n = nodes_u.shape[-2]
  nodes = jnp.concatenate([nodes_u, nodes_v], axis=-2)
  side = jnp.arange(2 * n) >= n
  same_image = side[:, None] == side[None, :]
  shape = nodes.shape[:-1] + (2 * n,)
  params = variables.get('params', {})
  normalised = nodes / (jnp.linalg.norm(nodes, axis=-1, keepdims=True) + 1e-12)
  x = nodes if kind.startswith('raw') else normalised
  if kind == 'projected':
    y = nodes @ params['y']['kernel'][0, 0]
    y = y / (jnp.linalg.norm(y, axis=-1, keepdims=True) + 1e-12)
    return jax.nn.relu(y @ jnp.swapaxes(y, -1, -2))
  if kind.endswith(('correspondence', 'intra')):
    s_intra = (x * params['w_intra']) @ jnp.swapaxes(x, -1, -2)
    if kind.endswith('intra'):
      return jnp.where(same_image, jax.nn.relu(s_intra), 0.0)
    s_inter = (x * params['w_inter']) @ jnp.swapaxes(x, -1, -2)
    return jax.nn.relu(jnp.where(same_image, s_intra, s_inter))
  if kind == 'none':
    return jnp.zeros(shape)
  if kind == 'full':
    return jnp.ones(shape)
  if kind == 'part':
    same_pixel = jnp.arange(2 * n)[:, None] % n == jnp.arange(2 * n)[None, :] % n
    return jnp.broadcast_to((same_pixel & ~same_image).astype(jnp.float32), shape)
  assert kind == 'topk'  # each node picks among the other image's nodes; symmetrised
  similarity = x @ jnp.swapaxes(x, -1, -2)
  picks = attention.topk_mask(jnp.where(same_image, -jnp.inf, similarity), topk)
  return jnp.maximum(picks, jnp.swapaxes(picks, -1, -2))


BUILT_IN = (
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


def test_every_built_in_kind_is_registered_and_nothing_else_by_default():
  assert set(BUILT_IN) <= set(attention.adjacency_kinds())


@pytest.mark.parametrize('kind', BUILT_IN)
def test_registered_blocks_equal_the_dense_definition(kind):
  nodes_u, nodes_v = random_nodes(0), random_nodes(1)
  module, variables = init_attention(kind, nodes_u, nodes_v, topk=2)
  dense = module.apply(variables, nodes_u, nodes_v)
  reference = attention.zero_diagonal(dense_reference(kind, variables, nodes_u, nodes_v, 2))
  assert dense.shape == (3, 2 * N_PIX, 2 * N_PIX)
  np.testing.assert_allclose(dense, reference, atol=1e-5)
  np.testing.assert_array_equal(np.diagonal(dense, axis1=-2, axis2=-1), 0.0)
  np.testing.assert_allclose(dense, jnp.swapaxes(dense, -1, -2), atol=1e-6)  # undirected
  assert float(dense.min()) >= 0.0


def test_fixed_adjacencies_have_the_documented_structure():
  nodes_u, nodes_v = random_nodes(0), random_nodes(1)
  dense = {}
  for kind in ('none', 'part', 'full', 'topk', 'raw_intra', 'cosine_intra'):
    module, variables = init_attention(kind, nodes_u, nodes_v)
    dense[kind] = np.asarray(module.apply(variables, nodes_u, nodes_v))[0]
  n = N_PIX
  np.testing.assert_array_equal(dense['none'], 0.0)
  np.testing.assert_array_equal(dense['full'], 1.0 - np.eye(2 * N_PIX))  # diagonals are zero
  eye, zeros = np.eye(n), np.zeros((n, n))
  np.testing.assert_array_equal(dense['part'], np.block([[zeros, eye], [eye, zeros]]))
  for kind in ('raw_intra', 'cosine_intra'):  # Individual-GCN: no cross edges
    np.testing.assert_array_equal(dense[kind][:n, n:], 0.0)
    assert dense[kind][:n, :n].max() > 0
  topk = dense['topk']
  assert set(np.unique(topk)) <= {0.0, 1.0}
  np.testing.assert_array_equal(topk[:n, :n], 0.0)
  assert (topk[:n, n:].sum(1) >= 1).all() and (topk[n:, :n].sum(1) >= 1).all()


def test_topk_links_each_pixel_to_its_most_similar_pixel():
  # u's pixel i is a noisy copy of v's pixel perm[i]: top-1 must recover perm.
  rng = np.random.default_rng(0)
  base = rng.uniform(size=(N_PIX, CHANNELS))
  perm = rng.permutation(N_PIX)
  nodes_v = jnp.asarray(base, jnp.float32)[None]
  nodes_u = jnp.asarray(base[perm] + 0.01 * rng.normal(size=base.shape), jnp.float32)[None]
  keys = lambda x: ClueAttention(kind='topk', in_features=CHANNELS).apply(
    {}, x, method=ClueAttention.image_keys
  )
  block = np.asarray(cross_block('topk', keys(nodes_u)['query'], keys(nodes_v)['key'], 1))[0]
  np.testing.assert_array_equal(block, np.eye(N_PIX)[perm])


def test_raw_correspondence_is_eq_2_to_4_on_raw_features():
  """A = ReLU([[X_u W X_u^T, X_u W' X_v^T], [X_v W' X_u^T, X_v W X_v^T]]), written out in numpy."""
  rng = np.random.default_rng(5)
  nodes_u, nodes_v = (jnp.asarray(3.0 * rng.normal(size=(2, 4, 8)), jnp.float32) for _ in range(2))
  module = make_adjacency('raw_correspondence', 8)
  w, w_prime = rng.normal(size=8), rng.normal(size=8)
  variables = {'params': {'w_intra': jnp.asarray(w), 'w_inter': jnp.asarray(w_prime)}}
  x_u, x_v = np.asarray(nodes_u, np.float64), np.asarray(nodes_v, np.float64)
  expected = np.zeros((2, 8, 8))
  for b in range(2):
    s_uu = x_u[b] @ np.diag(w) @ x_u[b].T  # eq. 2
    s_vv = x_v[b] @ np.diag(w) @ x_v[b].T
    s_uv = x_u[b] @ np.diag(w_prime) @ x_v[b].T  # eq. 3
    expected[b] = np.maximum(np.block([[s_uu, s_uv], [s_uv.T, s_vv]]), 0.0)  # eq. 4
  dense = module.apply(variables, nodes_u, nodes_v)
  np.testing.assert_allclose(dense, expected * (1 - np.eye(8)), rtol=1e-5, atol=1e-4)
  assert np.abs(expected).max() > 10  # raw scale: far outside the cosine form's [0, 1]


def test_cosine_correspondence_starts_as_relu_cosine():
  nodes_u, nodes_v = random_nodes(0), random_nodes(1)
  module = make_adjacency('cosine_correspondence', CHANNELS)
  variables = module.init(jax.random.key(0, impl='rbg'), nodes_u, nodes_v)
  np.testing.assert_array_equal(variables['params']['w_intra'], 1.0)
  x = np.concatenate([nodes_u, nodes_v], 1)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  expected = np.maximum(x @ x.transpose(0, 2, 1), 0.0) * (1 - np.eye(x.shape[1]))
  np.testing.assert_allclose(module.apply(variables, nodes_u, nodes_v), expected, atol=1e-5)


def test_intra_init_scales_only_the_intra_image_blocks_at_the_start():
  nodes_u, nodes_v = random_nodes(0), random_nodes(1)
  key = jax.random.key(0, impl='rbg')
  base = make_adjacency('cosine_correspondence', CHANNELS)
  low = make_adjacency('cosine_correspondence', CHANNELS, intra_init=0.25)
  a = base.apply(base.init(key, nodes_u, nodes_v), nodes_u, nodes_v)
  variables = low.init(key, nodes_u, nodes_v)
  np.testing.assert_array_equal(variables['params']['w_intra'], 0.25)
  np.testing.assert_array_equal(variables['params']['w_inter'], 1.0)
  b = low.apply(variables, nodes_u, nodes_v)
  n = nodes_u.shape[1]
  same = np.zeros((2 * n, 2 * n), bool)
  same[:n, :n] = same[n:, n:] = True
  np.testing.assert_allclose(np.where(same, b, 0), np.where(same, 0.25 * a, 0), atol=1e-6)
  np.testing.assert_allclose(np.where(same, 0, b), np.where(same, 0, a), atol=1e-6)


def test_projected_attention_uses_y_without_bias():
  nodes = random_nodes(0)
  module = make_adjacency('projected', CHANNELS)
  params = module.init(jax.random.key(0, impl='rbg'), nodes, nodes)['params']
  assert jax.tree.map(jnp.shape, params) == {'y': {'kernel': (1, 1, CHANNELS, CHANNELS // 16)}}


def test_unknown_adjacency_is_rejected():
  with pytest.raises(ConfigError, match="model.adjacency='semantic' is not a registered adjacency"):
    make_adjacency('semantic', CHANNELS)


def random_adjacency(seed, size=10):
  rng = np.random.default_rng(seed)
  a = rng.uniform(size=(size, size))
  return jnp.asarray((a + a.T) / 2, jnp.float32)


def test_discrepancy_operator_annihilates_the_degree_weighted_constant():
  a = random_adjacency(0)
  operator = gcn.graph_operator(a, 'discrepancy')
  degree = np.asarray(attention.zero_diagonal(a)).sum(1)
  # N (D - A) N has null vector D^1/2 1 (the constant signal after N's rescaling).
  np.testing.assert_allclose(operator @ np.sqrt(degree), 0.0, atol=1e-5)
  assert np.abs(np.asarray(operator @ np.ones(10))).max() > 1e-3  # irregular graph
  assert np.abs(np.asarray(operator @ np.arange(10.0))).max() > 1e-2
  normal = gcn.graph_operator(a, 'normal')
  assert np.abs(np.asarray(normal @ np.sqrt(degree))).max() > 1.0  # smoothing keeps it


@pytest.mark.parametrize('kind', ['full', 'part'])
def test_discrepancy_sends_constants_to_zero_on_regular_graphs(kind):
  nodes = random_nodes(0, (1, N_PIX, CHANNELS))
  module, variables = init_attention(kind, nodes, nodes)
  operator = gcn.graph_operator(module.apply(variables, nodes, nodes)[0], 'discrepancy')
  np.testing.assert_allclose(operator @ jnp.full((2 * N_PIX, 4), 3.0), 0.0, atol=1e-5)


def test_isolated_nodes_get_unit_normaliser_and_no_update():
  a = jnp.zeros((4, 4)).at[0, 1].set(2.0).at[1, 0].set(2.0)  # nodes 2, 3 isolated
  operator = gcn.graph_operator(a, 'discrepancy')
  np.testing.assert_allclose(
    operator, np.array([[1, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), atol=1e-6
  )
  np.testing.assert_array_equal(gcn.graph_operator(jnp.zeros((3, 3))), 0.0)  # 'none' graph


def test_relative_threshold_makes_the_operator_scale_free():
  """Raw-feature adjacencies: F(c A) = F(A) for any c, isolated nodes included."""
  a = random_adjacency(2, 6).at[5, :].set(0.0).at[:, 5].set(0.0)  # node 5 isolated
  a = a.at[4, :].multiply(1e-4).at[:, 4].multiply(1e-4)  # node 4 nearly so
  for kind in ('discrepancy', 'normal'):
    reference = gcn.graph_operator(a, kind, relative_threshold=True)
    for scale in (1e-5, 300.0):
      np.testing.assert_allclose(
        gcn.graph_operator(scale * a, kind, relative_threshold=True), reference, atol=1e-5
      )
    # The absolute rule is not: at 1e-5 every node falls under 1e-3 and F changes.
    absolute = gcn.graph_operator(1e-5 * a, kind)
    assert np.abs(np.asarray(absolute - reference)).max() > 0.1
  np.testing.assert_array_equal(
    gcn.graph_operator(a, relative_threshold=True)[5], 0.0
  )  # the isolated node stays untouched
  # The blocked form agrees with the dense one under the relative rule.
  intra_u, intra_v, cross, g_u, g_v = random_blocks(4)
  dense = 500.0 * jnp.block([[intra_u, cross], [cross.T, intra_v]])
  operator = gcn.graph_operator(dense, 'discrepancy', relative_threshold=True)
  blocks = gcn.PairBlocks(500.0 * intra_u, 500.0 * intra_v, 500.0 * cross, True)
  z = jnp.concatenate([g_u[0], g_v[0]])
  out = gcn.get_operator('discrepancy').apply(blocks, z)
  np.testing.assert_allclose(out, operator @ z, atol=1e-4)


def test_degree_normaliser_is_held_constant_for_gradients():
  a = random_adjacency(1, 6)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(6, 6)), jnp.float32)
  n = np.asarray(1.0 / np.sqrt(np.asarray(attention.zero_diagonal(a)).sum(1)))

  def frozen(a):
    a = attention.zero_diagonal(a)
    return jnp.sum(weights * (n[:, None] * (jnp.diag(a.sum(1)) - a) * n[None, :]))

  grad = jax.grad(lambda a: jnp.sum(weights * gcn.graph_operator(a)))(a)
  np.testing.assert_allclose(grad, jax.grad(frozen)(a), rtol=1e-5, atol=1e-6)


def random_blocks(seed, n=5, r=3, depth=2):
  rng = np.random.default_rng(seed)
  sym = lambda m: (m + m.T) / 2 * (1 - np.eye(n))
  arr = lambda x: jnp.asarray(x, jnp.float32)
  return (
    arr(sym(rng.uniform(size=(n, n)))),
    arr(sym(rng.uniform(size=(n, n)))),
    arr(rng.uniform(size=(n, n)) * (rng.uniform(size=(n, n)) > 0.3)),
    arr(rng.normal(size=(depth, n, r))),
    arr(rng.normal(size=(depth, n, r))),
  )


@pytest.mark.parametrize('kind', ['discrepancy', 'normal'])
def test_blocked_operator_and_readout_match_dense_operator(kind):
  intra_u, intra_v, cross, g_u, g_v = random_blocks(0)
  dense = jnp.block([[intra_u, cross], [cross.T, intra_v]])
  operator = gcn.graph_operator(dense, kind)
  z = jnp.concatenate([g_u[0], g_v[0]])
  blocks = gcn.PairBlocks(intra_u, intra_v, cross)
  np.testing.assert_allclose(gcn.get_operator(kind).apply(blocks, z), operator @ z, atol=1e-5)
  w_u, w_v = gcn.readout_weights(kind, blocks)
  np.testing.assert_allclose(w_u @ g_u[0] + w_v @ g_v[0], (operator @ z)[:5].mean(0), atol=1e-5)


@pytest.mark.parametrize('pooled', [True, False])
def test_propagate_pair_matches_dense_stacked_layers(pooled):
  n, r, channels, depth = 5, 3, 8, 2
  rng = np.random.default_rng(3)
  intra_u, intra_v, cross, _, _ = random_blocks(1, n, r, depth)
  nodes = jnp.asarray(rng.normal(size=(2 * n, channels)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(depth, channels, r)), jnp.float32)
  o = jnp.asarray(rng.normal(size=(depth, r, channels)), jnp.float32)
  operator = gcn.graph_operator(jnp.block([[intra_u, cross], [cross.T, intra_v]]))
  x = nodes
  for layer in range(depth):  # the dense definition, C-wide
    x = x + operator @ (x @ g[layer]) @ o[layer]
  projections = jnp.einsum('nc,lcr->lnr', nodes, g)
  mix = jnp.einsum('mrc,lcs->mlrs', o, g)
  increments = gcn.propagate_pair(
    'discrepancy',
    gcn.PairBlocks(intra_u, intra_v, cross),
    projections[:, :n],
    projections[:, n:],
    mix,
    pooled=pooled,
  )
  if pooled:
    np.testing.assert_allclose(
      nodes[:n].mean(0) + jnp.einsum('lr,lrc->c', increments, o),
      x[:n].mean(0),
      rtol=1e-4,
      atol=1e-4,
    )
  else:
    np.testing.assert_allclose(
      nodes[:n] + jnp.einsum('lnr,lrc->nc', increments, o), x[:n], rtol=1e-4, atol=1e-4
    )


def test_pair_gcn_starts_as_identity_and_names_layers_like_official():
  nodes = random_nodes(0, (2, 2 * N_PIX, CHANNELS))
  graph = gcn.DenseGraph(random_adjacency(0, 2 * N_PIX))
  module = gcn.PairGCN(CHANNELS, depth=2)
  variables = module.init(jax.random.key(0, impl='rbg'), nodes, graph)
  assert set(variables['params']) == {'g', 'o', 'g_1', 'o_1'}
  assert variables['params']['g']['kernel'].shape == (1, 1, CHANNELS, CHANNELS // 16)
  np.testing.assert_array_equal(module.apply(variables, nodes, graph), nodes)
  params = jax.tree.map(jnp.ones_like, variables['params'])
  assert np.abs(np.asarray(module.apply({'params': params}, nodes, graph) - nodes)).max() > 1e-3

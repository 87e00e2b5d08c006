"""The graph registries: every registered kind through every path, and no silent fallthrough.

Registered here besides the built-ins: the worked example's `mutual_topk`
and `two_hop` (examples/graph_variants.py, loaded as a plugin), an adjacency
that is not symmetric and one with a parameter of its own, an operator that
is not symmetric and one that is not linear.

The conformance matrix runs every adjacency x operator a user can name (the
built-ins, the intra-only and 'none' adjacencies among them, and the worked
example's) on tiny backbone maps, through the pair stage alone
(`CACENet.heads`, no backbone); the kinds registered only to exercise a
property (not symmetric, not linear, a parameter of its own) meet two
partners each:

  * training: the fast pair stage equals the materialised one ('direct'), in
    the pair embeddings and in the gradients of every parameter (finite);
  * stage 2: the compact image caches give the f(u|v) of the dense
    `pair_features` (the direct path's stage 2 is `pair_features` itself);
  * ONNX: the exported pair model equals JAX where both kinds have an ONNX
    form, and export refuses by name where one has none.

Tolerances as elsewhere in the suite: 1e-4 relative on embeddings, 2e-4 on
gradients scaled by each leaf's largest entry, 1e-5 for onnxruntime.
"""

from __future__ import annotations

import functools
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest

from cace_jax import plugins
from cace_jax.commands import config_check
from cace_jax.errors import ConfigError, PortError
from cace_jax.interop import onnx_graph
from cace_jax.models import CACENet, attention, build_model, gcn, losses

# Tiny programs: skip LLVM's optimisation passes, which halves compile time.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'examples', 'graph_variants.py')
N = 5
B, H, W, C = 3, 3, 2, 32  # tiny backbone maps: n = 6 pixels, r = C/16 = 2


def random_walk(graph, z):
  """D^-1 A z: each node takes its neighbours' mean (F is not symmetric)."""
  degree = jnp.maximum(graph.degree(), 1e-6)[..., None]
  return graph.adjacency_times(z) / degree


def rectified(graph, z):
  """ReLU of the discrepancy: not linear, so average pooling must build the maps."""
  return jax.nn.relu(gcn.OPERATORS['discrepancy'].apply(graph, z))


def picks_of_u(query_u, key_v, p):
  """A_uv: u's pixel picks its most similar pixel of v; A_vu is v's picks (not A_uv^T)."""
  return attention.topk_mask(attention.similarity(query_u, key_v), p['topk'])


def gated_intra(x, p):
  """ReLU(X diag(gate) X^T) with a parameter of its own."""
  return jax.nn.relu(attention.similarity(x * p['gate'], x))


OPERATOR_EXAMPLES = {
  'random_walk': (random_walk, dict(symmetric=False)),
  'rectified': (rectified, dict(linear=False)),
}
ADJACENCY_EXAMPLES = {
  'directed_topk': dict(keys=attention.pixel_keys, cross=picks_of_u, symmetric=False),
  'gated': dict(
    intra=gated_intra,
    keys=attention.pixel_keys,
    cross=attention.rectified_similarity,
    params={'gate': lambda channels, p: 0.5 + jnp.arange(channels) / channels},
  ),
}


def register_examples():
  plugins.load(EXAMPLE)  # mutual_topk, two_hop and their ONNX forms
  for name, (fn, properties) in OPERATOR_EXAMPLES.items():
    gcn.register_operator(name, **properties)(fn)
  for name, fields in ADJACENCY_EXAMPLES.items():
    attention.register_adjacency(name, **fields)


def unregister_examples():
  for name in (*OPERATOR_EXAMPLES, 'two_hop'):
    del gcn.OPERATORS[name]
  for name in (*ADJACENCY_EXAMPLES, 'mutual_topk'):
    del attention.ADJACENCIES[name]
  del onnx_graph.ONNX_OPERATORS['two_hop'], onnx_graph.ONNX_ADJACENCIES['mutual_topk']
  for name in [m for m in sys.modules if m.startswith('cace_jax_plugin_graph_variants')]:
    del sys.modules[name]


register_examples()  # at import, so that the parametrisations below see them
OPERATORS = list(gcn.OPERATORS)
ADJACENCIES = list(attention.ADJACENCIES)
unregister_examples()
# The matrix: every kind a user can name (built-in, or registered by a plugin: the
# worked example's here) against every other; the kinds registered above only to
# exercise a property each meet two partners, one of them with the same property.
USER_KINDS = [
  (adjacency, operator)
  for adjacency in ADJACENCIES
  for operator in OPERATORS
  if adjacency not in ADJACENCY_EXAMPLES and operator not in OPERATOR_EXAMPLES
]
PROPERTY_CASES = [(a, o) for a in ADJACENCY_EXAMPLES for o in ('discrepancy', 'rectified')] + [
  (a, o)
  for o in OPERATOR_EXAMPLES
  for a in ('projected', 'directed_topk')
  if (a, o) != ('directed_topk', 'rectified')
]


@pytest.fixture(autouse=True, scope='module')
def examples_registered():
  register_examples()
  yield
  unregister_examples()


def random_blocks(seed, n=N, r=3, symmetric=True):
  rng = np.random.default_rng(seed)
  sym = lambda m: (m + m.T) / 2 * (1 - np.eye(n))
  arr = lambda x: jnp.asarray(x, jnp.float32)
  cross = lambda: arr(rng.uniform(size=(n, n)) * (rng.uniform(size=(n, n)) > 0.3))
  blocks = gcn.PairBlocks(
    arr(sym(rng.uniform(size=(n, n)))),
    arr(sym(rng.uniform(size=(n, n)))),
    cross(),
    cross_vu=None if symmetric else cross(),
  )
  return blocks, arr(rng.normal(size=(2 * n, r)))


def dense_of(blocks):
  cross_vu = blocks.cross.T if blocks.cross_vu is None else blocks.cross_vu
  return jnp.block([[blocks.intra_u, blocks.cross], [cross_vu, blocks.intra_v]])


@pytest.mark.parametrize('symmetric', [True, False], ids=['symmetric', 'directed'])
@pytest.mark.parametrize('kind', OPERATORS)
def test_blocked_dense_and_readout_forms_agree(kind, symmetric):
  blocks, z = random_blocks(0, symmetric=symmetric)
  operator = gcn.get_operator(kind)
  dense = operator.apply(gcn.DenseGraph(dense_of(blocks)), z)
  np.testing.assert_allclose(operator.apply(blocks, z), dense, atol=1e-5)
  if not operator.linear:
    with pytest.raises(ConfigError, match='not linear'):
      gcn.graph_operator(dense_of(blocks), kind)
    return
  matrix = gcn.graph_operator(dense_of(blocks), kind)
  np.testing.assert_allclose(matrix @ z, dense, atol=1e-5)
  w_u, w_v = gcn.readout_weights(kind, blocks)
  np.testing.assert_allclose(w_u @ z[:N] + w_v @ z[N:], dense[:N].mean(0), atol=1e-5)
  if kind != 'discrepancy':  # a new operator is not the discrepancy one in disguise
    assert np.abs(np.asarray(matrix - gcn.graph_operator(dense_of(blocks)))).max() > 1e-3


def pair_model(adjacency, operator, **fields):
  return build_model(
    dict(
      depth='tiny',
      width=1,  # C = 32
      embed_dim=8,
      num_classes=3,
      non_local=False,
      gcn_output_init=1.0,
      adjacency=adjacency,
      gcn=operator,
      topk=2,
      **fields,
    )
  )


def random_fmap(seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.maximum(rng.normal(size=(B, H, W, C)), 0) + 0.05, jnp.float32)


@functools.cache
def shared_variables():
  """Variables of everything but the adjacency, moved off their init (o starts at 0)."""
  model = pair_model('none', 'discrepancy')
  variables = jit(functools.partial(model.init, method=CACENet.heads))(
    jax.random.key(0), random_fmap(0)
  )
  return move(variables, seed=1)


def move(variables, seed):
  rng = np.random.default_rng(seed)
  shift = lambda x: x + 0.2 * jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  return {**variables, 'params': jax.tree.map(shift, variables['params'])}


def moved_variables(model):
  """The shared variables and the adjacency's own, all moved off their init values."""
  attention_module = attention.make_adjacency(model.adjacency, C, topk=model.topk)
  nodes = random_fmap(0).reshape(B, H * W, C)
  own = move({'params': {}, **attention_module.init(jax.random.key(1), nodes, nodes)}, seed=2)
  variables = shared_variables()
  return {**variables, 'params': {**variables['params'], 'pair_attention': own['params']}}


def scaled(tree):
  return jax.tree.map(lambda g: np.asarray(g) / (np.abs(np.asarray(g)).max() + 1e-6), tree)


@pytest.mark.parametrize(('adjacency', 'operator'), USER_KINDS + PROPERTY_CASES)
def test_every_adjacency_and_operator_agree_on_every_path(adjacency, operator):
  # Linear operators with average pooling take the readout; the others build maps.
  pooling = 'avg' if (ADJACENCIES.index(adjacency) + OPERATORS.index(operator)) % 2 else 'gem'
  fmap = random_fmap(0)
  fast = pair_model(adjacency, operator, pooling=pooling)
  direct = pair_model(adjacency, operator, pooling=pooling, pair_path='direct')
  variables = moved_variables(fast)
  assert fast.readout_shortcut == (pooling == 'avg' and gcn.get_operator(operator).linear)
  slower = (pooling == 'avg' and not fast.readout_shortcut) + (
    not attention.get_adjacency(adjacency).symmetric
  )
  assert len(fast.pair_stage_notes()) == slower  # said once in the run's log
  target = jax.random.normal(jax.random.key(3), (B, B, 8))

  def loss(params, model):
    out, _ = model.apply(
      {**variables, 'params': params},
      fmap,
      train=True,
      method=CACENet.heads,
      rngs={'dropout': jax.random.key(2)},
      mutable=['batch_stats'],
    )
    return jnp.sum(out['pair_pre_bn_uv'] * target) + jnp.sum(out['pair_logits_vu'] ** 2), out

  grad = jax.value_and_grad(loss, has_aux=True)
  (value_fast, out_fast), grads_fast = grad(variables['params'], fast)
  (value_direct, out_direct), grads_direct = grad(variables['params'], direct)
  np.testing.assert_allclose(value_fast, value_direct, rtol=1e-4)
  np.testing.assert_allclose(
    out_fast['pair_pre_bn_uv'], out_direct['pair_pre_bn_uv'], rtol=1e-4, atol=1e-4
  )
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads_fast))
  chex.assert_trees_all_close(scaled(grads_fast), scaled(grads_direct), atol=2e-4)

  # Stage 2: the compact image caches give what the dense pair_features gives.
  rolled = jnp.roll(fmap, 1, axis=0)
  dense = fast.apply(variables, fmap, rolled, method=CACENet.pair_features)
  cache_u = fast.apply(variables, fmap, method=CACENet.compute_image_cache)
  cache_v = fast.apply(variables, rolled, method=CACENet.compute_image_cache)
  pairs = fast.apply(variables, cache_u, cache_v, method=CACENet.embed_cached_pairs)
  for name in ('embedding_uv', 'embedding_vu'):
    np.testing.assert_allclose(pairs[name], dense[name], rtol=1e-4, atol=1e-5)

  # ONNX: the same pair model, or a refusal naming what has no ONNX form.
  exportable = adjacency in onnx_graph.ONNX_ADJACENCIES and operator in onnx_graph.ONNX_OPERATORS
  if not exportable:
    with pytest.raises(PortError, match='has no ONNX form'):
      onnx_graph.check_exportable(fast)
    return
  proto = onnx_graph.pair_graph(fast, variables, (H, W, C))
  session = onnxruntime.InferenceSession(
    proto.SerializeToString(), providers=['CPUExecutionProvider']
  )
  _, emb_qg, emb_gq = session.run(
    None, {'fmap_query': np.asarray(fmap), 'fmap_gallery': np.asarray(rolled)}
  )
  normalise = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
  np.testing.assert_allclose(normalise(emb_qg), normalise(dense['embedding_uv']), atol=1e-5)
  np.testing.assert_allclose(normalise(emb_gq), normalise(dense['embedding_vu']), atol=1e-5)


def test_the_examples_are_not_built_in_kinds_in_disguise():
  fmap = random_fmap(0)
  rolled = jnp.roll(fmap, 1, axis=0)

  def embeddings(adjacency, operator):
    model = pair_model(adjacency, operator, pooling='avg')
    variables = moved_variables(pair_model('topk', 'discrepancy', pooling='avg'))
    return model.apply(variables, fmap, rolled, method=CACENet.pair_features)['embedding_uv']

  base = embeddings('topk', 'discrepancy')
  assert np.abs(np.asarray(embeddings('mutual_topk', 'discrepancy') - base)).max() > 1e-3
  assert np.abs(np.asarray(embeddings('topk', 'two_hop') - base)).max() > 1e-3


def test_an_adjacency_parameter_is_created_and_learns():
  fmap = random_fmap(0)
  model = pair_model('gated', 'discrepancy', pooling='avg')
  variables = model.init(jax.random.key(0), fmap, method=CACENet.heads)
  gate = variables['params']['pair_attention']['gate']
  np.testing.assert_allclose(gate, 0.5 + np.arange(C) / C)


def test_kinds_without_an_onnx_form_are_refused_by_name():
  with pytest.raises(PortError, match="model.gcn='random_walk' has no ONNX form"):
    onnx_graph.check_exportable(pair_model('projected', 'random_walk'))
  with pytest.raises(PortError, match="model.adjacency='gated' has no ONNX form"):
    onnx_graph.check_exportable(pair_model('gated', 'discrepancy'))
  onnx_graph.check_exportable(pair_model('mutual_topk', 'two_hop'))


def test_unregistered_kinds_fail_in_the_config_and_the_model():
  expected = config_check.RULES['model.gcn']('three_hop')
  assert expected.startswith("one of 'discrepancy', 'normal'") and "'none'" in expected
  assert "'mutual_topk'" in config_check.RULES['model.adjacency']('semantic')
  with pytest.raises(ConfigError, match='not a registered graph operator; registered: '):
    pair_model('projected', 'three_hop')
  with pytest.raises(ConfigError, match="model.adjacency='semantic' is not a registered adjacency"):
    pair_model('semantic', 'discrepancy')
  assert config_check.RULES['model.gcn']('two_hop') is None  # registered: accepted
  with pytest.raises(ValueError, match='already registered'):
    gcn.register_operator('normal')(random_walk)
  with pytest.raises(ValueError, match='already registered'):
    attention.register_adjacency('topk', cross=picks_of_u)
  with pytest.raises(ValueError, match="pixels='rgb'"):
    attention.register_adjacency('colour', cross=picks_of_u, pixels='rgb')


def test_plugins_load_once_and_fail_by_name(tmp_path):
  plugins.load(EXAMPLE)  # already loaded by the fixture: nothing is registered twice
  with pytest.raises(ConfigError, match='model.plugins: no such file'):
    plugins.load(str(tmp_path / 'missing.py'))
  with pytest.raises(ConfigError, match="cannot import 'no_such_module_here'"):
    plugins.load('no_such_module_here')
  assert plugins.split(' a.py, pkg.mod ,') == ('a.py', 'pkg.mod')
  assert plugins.resolve('examples/x.py,pkg.mod') == f'{os.path.abspath("examples/x.py")},pkg.mod'


def test_a_registered_loss_on_the_adjacency_reaches_its_parameters():
  """A loss part on the model's 'pair_cross' output trains the adjacency, on both paths."""
  fmap = random_fmap(0)

  @losses.register_loss('cross_density', needs=('pair_cross',))
  def cross_density(outputs, labels, settings):
    return outputs['pair_cross'].mean()

  try:
    only_it = {name: 0.0 for name in losses.loss_names() if name != 'cross_density'}
    grads = {}
    for path in ('fast', 'direct'):
      model = pair_model('cosine_correspondence', 'discrepancy', pooling='gem', pair_path=path)
      variables = moved_variables(model)

      def loss(params, model=model, variables=variables):
        out, _ = model.apply(
          {**variables, 'params': params},
          fmap,
          train=True,
          method=CACENet.heads,
          rngs={'dropout': jax.random.key(2)},
          mutable=['batch_stats'],
        )
        total, parts = losses.total_loss(out, jnp.arange(B), weights=only_it)
        assert set(parts) >= {'cross_density', 'pair_triplet'}
        return total

      grads[path] = jax.grad(loss)(variables['params'])['pair_attention']['w_inter']
    assert np.abs(np.asarray(grads['fast'])).max() > 0
    np.testing.assert_allclose(grads['fast'], grads['direct'], rtol=1e-4, atol=1e-7)
  finally:
    del losses.LOSS_PARTS['cross_density']

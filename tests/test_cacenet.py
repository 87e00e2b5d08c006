"""CACENet: output shapes of every variant, fast pair stage == materialised reference,
batch permutation, pair helpers, names, dtypes and no retracing."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cace_jax.errors import ConfigError
from cace_jax.models import CACENet, GeM, adjacency_kinds, build_model, losses
from cace_jax.runs import checkpoint

# Test computations are tiny: skip LLVM's optimisation passes, which halves compile time.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})

TINY = dict(depth='tiny', width=4, embed_dim=16, num_classes=6)  # C = 128, C/16 = 8
B, H, W, C = 4, 4, 2, 128  # feature maps of 64x32 images at last stride 1
IMAGES = (B, 64, 32, 3)
AUTO_NAME = re.compile(r'^[A-Z][A-Za-z]*_\d+$')
PAIR_KEYS = {
  'pair_pre_bn_uv',
  'pair_pre_bn_vu',
  'pair_embedding_uv',
  'pair_embedding_vu',
  'pair_logits_uv',
  'pair_logits_vu',
}
ADJACENCY_KEYS = ('pair_intra', 'pair_cross')  # the adjacency's blocks


def tiny(**kwargs):
  return CACENet(**{**TINY, 'pooling': 'avg', **kwargs})


def rbg_key(seed):
  return jax.random.key(seed, impl='rbg')  # compiles much faster than threefry on CPU


def random_fmap(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.maximum(rng.normal(size=(batch, H, W, C)), 0.0), jnp.float32)


def filled_variables(abstract, seed=1, scale=0.3):
  """Concrete variables for `abstract` (from eval_shape) without compiling an init graph.

  Parameters are their natural centre (1 for BN scale and W/W', 3 for GeM's p,
  else 0) plus N(0, scale^2) noise, so o != 0 and the GCN matters.
  """
  rng = np.random.default_rng(seed)
  centre = {'scale': 1.0, 'var': 1.0, 'p': 3.0, 'w_intra': 1.0, 'w_inter': 1.0}

  def fill(path, leaf):
    value = np.full(leaf.shape, centre.get(path[-1].key, 0.0))
    if path[0].key == 'params':
      value = value + scale * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def head_variables(model, fmap, seed=1, scale=0.3):
  """Variables of `CACENet.heads` (no backbone), perturbed as in `filled_variables`."""
  return filled_variables(
    jax.eval_shape(lambda: model.init(jax.random.key(0), fmap, method=CACENet.heads)), seed, scale
  )


def run_heads(model, variables, fmap, train):
  out, state = model.apply(
    variables,
    fmap,
    train=train,
    method=CACENet.heads,
    rngs={'dropout': jax.random.key(7)},
    mutable=['batch_stats'],
  )
  return out, state


VARIANTS = (
  [dict(adjacency=kind) for kind in adjacency_kinds()]
  + [dict(gcn=kind) for kind in ('discrepancy', 'normal', 'none')]
  + [dict(pooling=kind) for kind in ('avg', 'gem', 'avgmax')]
  + [
    dict(gcn_depth=2, pooling='gem'),
    dict(pair_path='direct'),
    dict(non_local=True, dtype=jnp.bfloat16),
  ]
)


@pytest.mark.parametrize('pooling', ['avg', 'gem'])
def test_stage_two_on_the_direct_path_equals_the_fast_one(pooling):
  """`pair_path='direct'` evaluates too: caches hold the maps, pairs are built densely."""
  fmap = random_fmap()
  fast, direct = tiny(pooling=pooling), tiny(pooling=pooling, pair_path='direct')
  variables = head_variables(fast, fmap)
  pairs = {}
  for name, model in (('fast', fast), ('direct', direct)):
    cache = model.apply(variables, fmap, method=CACENet.compute_image_cache)
    rolled = jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), cache)
    pairs[name] = model.apply(variables, cache, rolled, method=CACENet.embed_cached_pairs)
  assert 'nodes' in direct.apply(variables, fmap, method=CACENet.compute_image_cache)
  for key in ('embedding_uv', 'embedding_vu'):
    np.testing.assert_allclose(pairs['fast'][key], pairs['direct'][key], rtol=1e-4, atol=1e-5)
  # Not vacuous: the conditional embeddings differ from the individual ones.
  individual = fast.apply(variables, fmap, method=CACENet.embed_fmap)
  assert np.abs(np.asarray(pairs['direct']['embedding_uv'] - individual)).max() > 1e-2


@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: '-'.join(f'{k}={v[k]}' for k in v))
def test_output_shapes_for_every_variant(variant):
  model = tiny(**variant)
  images = jax.ShapeDtypeStruct(IMAGES, jnp.float32)

  def forward(images):
    variables = model.init(jax.random.key(0), images)
    return model.apply(
      variables, images, train=True, rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats']
    )[0]

  out = jax.eval_shape(forward, images)
  pooled_dim = 2 * C if model.pooling == 'avgmax' else C
  expected = {
    'fmap': (B, H, W, C),
    'pooled': (B, pooled_dim),
    'pre_bn': (B, 16),
    'embedding': (B, 16),
    'logits': (B, 6),
  }
  if model.gcn != 'none':
    expected.update({k: (B, B, 6 if 'logits' in k else 16) for k in PAIR_KEYS})
    expected.update(pair_intra=(B, H * W, H * W), pair_cross=(B, B, H * W, H * W))
  assert {k: v.shape for k, v in out.items()} == expected
  assert out['embedding'].dtype == jnp.float32


@pytest.mark.parametrize(
  'variant',
  [
    dict(),  # official graph, GAP shortcut
    dict(adjacency='raw_correspondence', gcn='normal', gcn_depth=2, pooling='gem'),  # map path
    dict(adjacency='topk', topk=2, pooling='avgmax', pair_block=2),  # chunked lax.map
  ],
  ids=['projected-avg', 'correspondence-normal-depth2-gem', 'topk-avgmax-block2'],
)
def test_fast_pair_stage_equals_materialised_reference(variant):
  fmap = random_fmap()
  fast, direct = tiny(**variant), tiny(pair_path='direct', **variant)
  variables = head_variables(fast, fmap)
  labels = jnp.array([0, 0, 1, 1])

  def loss_fn(params, fmap, model):
    out, state = run_heads(
      model, {'params': params, 'batch_stats': variables['batch_stats']}, fmap, train=True
    )
    return losses.total_loss(out, labels)[0], (out, state)

  grad_fn = jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), static_argnums=2)
  (loss_fast, (out_fast, state_fast)), grads_fast = grad_fn(variables['params'], fmap, fast)
  (loss_direct, (out_direct, state_direct)), grads_direct = grad_fn(
    variables['params'], fmap, direct
  )
  # The GCN must actually change the features, or the comparison proves little.
  assert np.abs(np.asarray(out_fast['pair_pre_bn_uv'] - out_fast['pre_bn'][:, None])).max() > 1e-2
  for key in sorted(PAIR_KEYS) + list(ADJACENCY_KEYS):
    np.testing.assert_allclose(out_fast[key], out_direct[key], rtol=1e-4, atol=1e-4, err_msg=key)
  np.testing.assert_allclose(loss_fast, loss_direct, rtol=1e-5)
  chex.assert_trees_all_close(state_fast, state_direct, rtol=1e-4, atol=1e-5)
  scale = jax.tree.map(lambda g: np.abs(np.asarray(g)).max() + 1e-6, grads_direct)
  chex.assert_trees_all_close(
    jax.tree.map(lambda g, s: g / s, grads_fast, scale),
    jax.tree.map(lambda g, s: g / s, grads_direct, scale),
    atol=2e-4,
  )
  assert np.abs(np.asarray(grads_fast[0]['pair_graph']['o']['kernel'])).max() > 0


def test_initialisation_of_the_head():
  fmap = random_fmap()
  model = tiny(num_classes=500)
  variables = jit(lambda k: model.init(k, fmap, method=CACENet.heads))(rbg_key(0))
  params = variables['params']
  np.testing.assert_array_equal(params['pair_graph']['o']['kernel'], 0.0)
  assert abs(float(params['classifier']['kernel'].std()) - 0.001) < 1e-4
  embed_std = float(params['embedding_conv']['kernel'].std())  # kaiming fan_out, fan_out = 16
  assert abs(embed_std / np.sqrt(2 / 16) - 1) < 0.05
  # With o = 0 every conditional embedding starts as the individual one.
  out, _ = jit(lambda v: run_heads(model, v, fmap, train=False))(variables)
  expected = jnp.broadcast_to(out['embedding'][:, None], (B, B, 16))
  np.testing.assert_allclose(out['pair_embedding_uv'], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    out['pair_embedding_vu'], jnp.swapaxes(expected, 0, 1), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('pooling', ['avg', 'gem'])
def test_permuting_the_batch_permutes_every_output(pooling):
  fmap = random_fmap(batch=5)
  model = tiny(pooling=pooling, num_classes=None, adjacency='cosine_correspondence')
  variables = head_variables(model, fmap)
  perm = np.array([3, 0, 4, 1, 2])
  heads = jit(lambda f, train: run_heads(model, variables, f, train)[0], static_argnums=1)
  for train in (False, True):  # train: BN batch statistics are permutation invariant
    out, out_perm = heads(fmap, train), heads(fmap[perm], train)
    for key in ('embedding', 'pre_bn'):
      np.testing.assert_allclose(out_perm[key], out[key][perm], rtol=1e-4, atol=1e-5)
    for key in ('pair_embedding_uv', 'pair_embedding_vu'):
      np.testing.assert_allclose(out_perm[key], out[key][perm][:, perm], rtol=1e-4, atol=1e-5)
  assert (
    np.abs(np.asarray(out['pair_embedding_uv'][0, 1] - out['pair_embedding_uv'][0, 2])).max() > 1e-3
  )  # f(u|v) depends on v


def test_pair_helpers_agree_with_batch_outputs():
  fmap = random_fmap()
  model = tiny(pooling='gem')
  variables = head_variables(model, fmap)
  out, _ = jit(lambda v: run_heads(model, v, fmap, train=False))(variables)
  us, vs = jnp.array([0, 2, 3]), jnp.array([1, 2, 0])

  pairs = jit(lambda v, a, b: model.apply(v, a, b, method=CACENet.pair_features))(
    variables, fmap[us], fmap[vs]
  )
  assert pairs['adjacency'].shape == (3, 2 * H * W, 2 * H * W)
  assert pairs['cond_fmap_u'].shape == (3, H, W, C)
  np.testing.assert_allclose(
    pairs['embedding_uv'], out['pair_embedding_uv'][us, vs], rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
    pairs['embedding_vu'], out['pair_embedding_vu'][us, vs], rtol=1e-4, atol=1e-5
  )

  def cached(variables, fmap_u, fmap_v):
    cache = lambda f: model.apply(variables, f, method=CACENet.compute_image_cache)
    return model.apply(variables, cache(fmap_u), cache(fmap_v), method=CACENet.embed_cached_pairs)

  from_cache = jit(cached)(variables, fmap[us], fmap[vs])
  np.testing.assert_allclose(
    from_cache['embedding_uv'], pairs['embedding_uv'], rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
    from_cache['embedding_vu'], pairs['embedding_vu'], rtol=1e-4, atol=1e-5
  )
  single = model.apply(variables, fmap[0], fmap[1], method=CACENet.pair_features)
  assert single['cond_fmap_v'].shape == (H, W, C) and single['embedding_uv'].shape == (16,)


def test_official_parameter_names_and_no_auto_names():
  model = CACENet(depth=50, num_classes=751)  # official defaults: GeM, non-local, 'projected'
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 256, 128, 3))))
  params = variables['params']
  assert set(params) == {
    'backbone',
    'gemp',
    'embedding_conv',
    'embedding_bn',
    'classifier',
    'pair_classifier',
    'pair_attention',
    'pair_graph',
  }
  assert params['gemp']['p'].shape == (1,)
  assert params['pair_attention']['y']['kernel'].shape == (1, 1, 2048, 128)
  assert params['pair_graph']['g']['kernel'].shape == (1, 1, 2048, 128)
  assert params['pair_graph']['o']['kernel'].shape == (1, 1, 128, 2048)
  assert params['embedding_conv']['kernel'].shape == (1, 1, 2048, 768)
  assert params['classifier']['kernel'].shape == (768, 751)
  assert 'bias' not in params['classifier'] and 'bias' not in params['pair_classifier']
  assert {'nl_layer2_2', 'nl_layer3_4', 'nl_layer4_1', 'layer4_2'} <= set(params['backbone'])
  for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    assert not any(AUTO_NAME.match(str(k.key)) for k in path), path


def test_gem_starts_at_p3():
  gem = GeM()
  nodes = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 4)), jnp.float32)
  p = gem.init(rbg_key(0), nodes)['params']['p']
  np.testing.assert_array_equal(p, [3.0])
  expected = np.mean(np.asarray(nodes) ** 3, axis=1) ** (1 / 3)
  np.testing.assert_allclose(gem.apply({'params': {'p': p}}, nodes), expected, rtol=1e-5)


def test_training_step_compiles_once_and_reduces_the_loss():
  model = tiny(pooling='gem', non_local=True)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=IMAGES), jnp.float32)
  labels = jnp.array([0, 0, 1, 1])
  variables = filled_variables(
    jax.eval_shape(lambda: model.init(jax.random.key(0), images)), scale=0.1
  )

  @jit
  @chex.assert_max_traces(n=1)
  def train_step(params, batch_stats, images, labels, key):
    def loss_fn(params):
      out, state = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        images,
        train=True,
        rngs={'dropout': key},
        mutable=['batch_stats'],
      )
      total, parts = losses.total_loss(out, labels)
      return total, (parts, state['batch_stats'])

    (total, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    return params, batch_stats, total, parts

  params, batch_stats = variables['params'], variables['batch_stats']
  history = []
  for step in range(4):
    params, batch_stats, total, parts = train_step(
      params, batch_stats, images, labels, jax.random.key(step)
    )
    history.append(float(total))
  assert set(parts) == {'id', 'triplet', 'mixup_uv', 'mixup_vu', 'pair_triplet'}
  assert all(np.isfinite(history)) and history[-1] < history[0]
  other = jnp.asarray(rng.uniform(size=IMAGES), jnp.float32)  # new values, same shapes
  train_step(params, batch_stats, other, labels + 2, jax.random.key(9))
  chex.clear_trace_counter()


def test_invalid_configuration_is_rejected():
  with pytest.raises(ValueError, match='pooling'):
    jax.eval_shape(lambda: tiny(pooling='max').init(jax.random.key(0), jnp.zeros(IMAGES)))


def test_renamed_adjacencies_fail_in_configs_and_load_from_old_checkpoints():
  """'correspondence' and 'intra' meant the cosine form before the raw form existed."""
  with pytest.raises(ConfigError, match="'cosine_correspondence' is what it meant"):
    build_model({'depth': 'tiny', 'width': 8, 'adjacency': 'correspondence'})
  with pytest.raises(ConfigError, match="'raw_intra' is the paper"):
    build_model({'depth': 'tiny', 'width': 8, 'adjacency': 'intra'})
  for old, new in (('correspondence', 'cosine_correspondence'), ('intra', 'cosine_intra')):
    record = checkpoint.recorded_model({'depth': 'tiny', 'adjacency': old})
    assert record == {'depth': 'tiny', 'adjacency': new}
    assert build_model(record).adjacency == new
  assert checkpoint.recorded_model({'adjacency': 'raw_intra'}) == {'adjacency': 'raw_intra'}

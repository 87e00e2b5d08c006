"""ResNet backbone: torchvision parameter counts and names, strides, init, dtypes."""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cace_jax.models import layers, resnet
from cace_jax.models.resnet import NonLocal, feature_map_shape, make_resnet

# Test computations are tiny: skip LLVM's optimisation passes, which halves compile time.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})

AUTO_NAME = re.compile(r'^[A-Z][A-Za-z]*_\d+$')  # Conv_0, BatchNorm_3, Dense_1, ...


def abstract_variables(model, shape=(1, 224, 224, 3)):
  """Variables as ShapeDtypeStructs: no compute, no compile."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def rbg_key(seed):
  """A key whose random bits compile fast on CPU (threefry init graphs take seconds)."""
  return jax.random.key(seed, impl='rbg')


def numpy_variables(abstract, seed=0):
  """Concrete variables without compiling an init: BN at identity, weights N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def paths(tree):
  return [
    '/'.join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


@pytest.mark.parametrize(
  'depth, num_classes, expected',
  [
    (50, 1000, 25_557_032),  # torchvision resnet50
    (50, None, 23_508_032),  # ... without fc
    (18, 1000, 11_689_512),  # torchvision resnet18
    (34, 1000, 21_797_672),  # torchvision resnet34
    (101, 1000, 44_549_160),  # torchvision resnet101
  ],
)
def test_parameter_count_matches_torchvision(depth, num_classes, expected):
  model = make_resnet(depth, num_classes=num_classes, last_stride=2)
  assert count(abstract_variables(model)['params']) == expected


def test_parameter_names_follow_torchvision():
  variables = abstract_variables(make_resnet(50, num_classes=1000))
  params = variables['params']
  expected_blocks = [f'layer{s}_{b}' for s, n in enumerate((3, 4, 6, 3), 1) for b in range(n)]
  assert sorted(params) == sorted(['conv1', 'bn1', 'fc'] + expected_blocks)
  assert set(params['layer1_0']) == {
    'conv1',
    'bn1',
    'conv2',
    'bn2',
    'conv3',
    'bn3',
    'downsample_conv',
    'downsample_bn',
  }
  assert 'downsample_conv' not in params['layer1_1']
  assert params['layer3_0']['downsample_conv']['kernel'].shape == (1, 1, 512, 1024)
  assert params['layer1_0']['conv2']['kernel'].shape == (3, 3, 64, 64)
  assert set(params['bn1']) == {'scale', 'bias'}
  assert set(variables['batch_stats']['bn1']) == {'mean', 'var'}
  for path in paths(variables):
    assert not any(AUTO_NAME.match(part) for part in path.split('/')), path


def test_basic_block_names_and_downsample():
  params = abstract_variables(make_resnet(18))['params']
  assert set(params['layer1_0']) == {'conv1', 'bn1', 'conv2', 'bn2'}  # 64 -> 64, stride 1
  assert set(params['layer2_0']) == {
    'conv1',
    'bn1',
    'conv2',
    'bn2',
    'downsample_conv',
    'downsample_bn',
  }


@pytest.mark.parametrize(
  'stage_sizes, expected',
  [
    ((3, 4, 6, 3), ('layer2_2', 'layer3_4', 'layer4_1')),  # official positions
    ((2, 2, 2, 2), ('layer2_0', 'layer3_0', 'layer4_0')),
    ((3, 4, 23, 3), ('layer2_2', 'layer3_21', 'layer4_1')),
    ((1, 1, 1, 1), ('layer2_0', 'layer3_0', 'layer4_0')),
  ],
)
def test_non_local_positions(stage_sizes, expected):
  assert resnet.non_local_positions(stage_sizes) == expected


def test_non_local_parameters():
  params = abstract_variables(make_resnet(50, non_local=True), (1, 64, 32, 3))['params']
  for name, channels in [('nl_layer2_2', 512), ('nl_layer3_4', 1024), ('nl_layer4_1', 2048)]:
    block = params[name]
    assert set(block) == {'g', 'theta', 'phi', 'W'}
    assert block['g']['kernel'].shape == (1, 1, channels, channels // 16)
    assert block['W']['kernel'].shape == (1, 1, channels // 16, channels)
    assert all('bias' in block[k] for k in block)


def test_non_local_starts_as_identity_and_then_mixes():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3, 32)), jnp.float32)
  block = NonLocal()
  apply = jit(block.apply)
  variables = jit(block.init)(rbg_key(1), x)
  np.testing.assert_array_equal(apply(variables, x), x)
  params = jax.tree.map(lambda a: a, variables['params'])
  params['W']['kernel'] = jnp.ones_like(params['W']['kernel'])
  y = apply({'params': params}, x)
  assert np.abs(np.asarray(y - x)).max() > 1e-3
  # Every output position attends to every input position.
  y_changed = apply({'params': params}, x.at[:, 0, 0].add(5.0))
  assert np.abs(np.asarray(y_changed - y))[:, 3, 2].max() > 1e-6


@pytest.mark.parametrize('last_stride, expected_hw', [(1, (16, 8)), (2, (8, 4))])
def test_feature_map_shape_resnet50(last_stride, expected_hw):
  model = make_resnet(50, last_stride=last_stride)
  variables = abstract_variables(model, (2, 256, 128, 3))
  fmap, features = jax.eval_shape(
    lambda v, x: model.apply(v, x), variables, jax.ShapeDtypeStruct((2, 256, 128, 3), jnp.float32)
  )
  assert fmap.shape == (2, *expected_hw, 2048)
  assert features['layer3'].shape == (2, 16, 8, 1024)
  assert features['stem'].shape == (2, 64, 32, 64)


@pytest.mark.parametrize('last_stride', [1, 2])
@pytest.mark.parametrize('image_size', [(64, 32), (61, 29)])
def test_feature_map_shape_formula_matches_the_network(image_size, last_stride):
  model = make_resnet('tiny', width=8, last_stride=last_stride)
  shape = (1, *image_size, 3)
  fmap, _ = jax.eval_shape(
    lambda v, x: model.apply(v, x),
    abstract_variables(model, shape),
    jax.ShapeDtypeStruct(shape, jnp.float32),
  )
  assert fmap.shape[1:] == feature_map_shape(image_size, 'tiny', 8, last_stride)


def test_bottleneck_stride_is_on_conv2():
  model = make_resnet('tiny', width=8)
  x = jnp.zeros((1, 64, 32, 3))
  _, state = jax.eval_shape(
    lambda: model.apply(
      model.init(jax.random.key(0), x), x, capture_intermediates=True, mutable=['intermediates']
    )
  )
  block = state['intermediates']['layer2_0']
  assert block['conv1']['__call__'][0].shape[1:3] == (16, 8)  # stage input resolution
  assert block['conv2']['__call__'][0].shape[1:3] == (8, 4)  # halved by the 3x3
  assert block['downsample_conv']['__call__'][0].shape[1:3] == (8, 4)


def test_initialisation_matches_torchvision():
  model = make_resnet('tiny', width=32, non_local=True)
  variables = jit(model.init)(rbg_key(0), jnp.zeros((1, 64, 32, 3)))
  params = variables['params']
  kernel = np.asarray(params['layer4_0']['conv2']['kernel'])  # 3x3, 256 -> 256
  expected_std = np.sqrt(2.0 / (3 * 3 * 256))  # kaiming normal, fan_out
  assert abs(kernel.std() / expected_std - 1) < 0.03
  assert abs(kernel.mean()) < 0.1 * expected_std
  np.testing.assert_array_equal(params['layer4_0']['bn2']['scale'], 1.0)
  np.testing.assert_array_equal(params['layer4_0']['bn2']['bias'], 0.0)
  np.testing.assert_array_equal(params['nl_layer3_0']['W']['kernel'], 0.0)
  np.testing.assert_array_equal(params['nl_layer3_0']['W']['bias'], 0.0)


def test_batchnorm_follows_pytorch_momentum_and_updates_in_train_mode():
  model = make_resnet('tiny', width=4)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 64, 32, 3)), jnp.float32)
  variables = numpy_variables(abstract_variables(model, x.shape))
  apply = jit(model.apply, static_argnames=('train', 'mutable'))
  _, state = apply(variables, x, train=True, mutable=('batch_stats',))
  new_mean = np.asarray(state['batch_stats']['bn1']['mean'])
  # running = 0.9 running + 0.1 batch (PyTorch momentum 0.1); running starts at 0.
  conv1 = jax.lax.conv_general_dilated(
    x,
    variables['params']['conv1']['kernel'],
    (2, 2),
    ((3, 3), (3, 3)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  np.testing.assert_allclose(
    new_mean, 0.1 * np.asarray(conv1).mean((0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  assert np.abs(new_mean).max() > 1e-4
  eval_out, _ = apply(variables, x, train=False)
  assert eval_out.shape == (2, 4, 2, 128)


def test_layers_batchnorm_matches_torch_batchnorm2d_over_two_steps():
  """Outputs and running buffers equal torch's, where flax's fast variance does not.

  The input has mean 100 and std 1 per channel: E[x^2] - E[x]^2 (flax's
  default) then loses about 1e-4 of the variance in float32; two passes do not.
  """
  import torch  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  batches = [(rng.normal(size=(16, 4, 2, 8)) + 100.0).astype(np.float32) for _ in range(2)]
  reference = torch.nn.BatchNorm2d(8).train()
  bn = layers.BatchNorm(momentum=0.9)
  variables = bn.init(jax.random.key(0), jnp.asarray(batches[0]), use_running_average=False)
  apply = jit(bn.apply, static_argnames=('use_running_average', 'mutable', 'updates'))
  for x in batches:
    with torch.no_grad():
      expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    y, state = apply(variables, x, use_running_average=False, mutable=('batch_stats',))
    variables = {**variables, **state}
    np.testing.assert_allclose(y, expected, atol=1e-4)
    np.testing.assert_allclose(state['batch_stats']['mean'], reference.running_mean, rtol=1e-6)
    np.testing.assert_allclose(state['batch_stats']['var'], reference.running_var, rtol=1e-5)
  # flax's BatchNorm (fast variance, biased running variance) is measurably off.
  flax_bn = flax.linen.BatchNorm(momentum=0.9, use_running_average=False)
  _, flax_state = flax_bn.apply(
    flax_bn.init(jax.random.key(0), batches[0]), batches[0], mutable=('batch_stats',)
  )
  biased = 0.9 + 0.1 * batches[0].var((0, 1, 2), dtype=np.float64)
  assert np.abs(flax_state['batch_stats']['var'] - biased).max() > 1e-5
  # Eval mode reads the buffers; `updates=2` equals two calls with the same batch.
  y_eval = apply(variables, batches[1], use_running_average=True)
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(batches[1].transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(y_eval, expected.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  start = bn.init(jax.random.key(0), batches[0], use_running_average=False)
  _, twice = apply(start, batches[0], use_running_average=False, mutable=('batch_stats',))
  _, twice = apply(
    {**start, **twice}, batches[0], use_running_average=False, mutable=('batch_stats',)
  )
  _, once = apply(start, batches[0], use_running_average=False, mutable=('batch_stats',), updates=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), once, twice)


def test_bfloat16_compute_keeps_float32_parameters():
  model = make_resnet('tiny', width=4, dtype=jnp.bfloat16)
  x = jnp.ones((2, 64, 32, 3))
  variables, (fmap, _) = jax.eval_shape(
    lambda: (lambda v: (v, model.apply(v, x)))(model.init(jax.random.key(0), x))
  )
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert fmap.dtype == jnp.bfloat16
  assert isinstance(variables, dict) and not isinstance(variables, flax.core.FrozenDict)

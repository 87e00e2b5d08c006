"""Porting PyTorch weights in and out: torchvision ResNets and official CACE-Net checkpoints.

Parity tolerance: max |ours - torch| <= 1e-4 * max |torch| on every compared
output (float32 on CPU; both sides sum the same products in different
orders, so the observed gap is ~1e-6 relative). Round trips are exact.
"""

import copy
import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from cace_jax import checkpoint
from cace_jax.errors import ConfigError, PortError
from cace_jax.interop import torch_weights
from cace_jax.models import CACENet, build_model, make_resnet
from conftest import run_tool
from tools import deploy as deploy_tool
from tools import port as port_tool

RELATIVE_TOLERANCE = 1e-4
IMAGES_NCHW = np.random.default_rng(0).normal(size=(2, 3, 64, 32)).astype(np.float32)
IMAGES_NHWC = jnp.asarray(IMAGES_NCHW.transpose(0, 2, 3, 1))
jit = functools.partial(
  jax.jit, static_argnums=(0,), compiler_options={'xla_backend_optimization_level': 0}
)


def assert_close(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  scale = np.abs(reference).max()
  gap = np.abs(ours - reference).max()
  assert gap <= RELATIVE_TOLERANCE * scale, f'max diff {gap:.3g} vs scale {scale:.3g}'


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Non-trivial BN affine parameters and running statistics, so the port of each is tested."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        size = module.num_features
        module.weight.copy_(0.5 + torch.rand(size, generator=generator))
        module.bias.copy_(0.1 * torch.randn(size, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
  return model.eval()


def torchvision_resnet(depth: int, last_stride: int = 2, seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = getattr(torchvision.models, f'resnet{depth}')(weights=None)
  if last_stride == 1:
    first = model.layer4[0]
    # torchvision puts the stride on conv2 of a Bottleneck, on conv1 of a BasicBlock.
    (first.conv2 if depth >= 50 else first.conv1).stride = (1, 1)
    first.downsample[0].stride = (1, 1)
  return randomize_batchnorm(model, seed)


def numpy_state(model: torch.nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def backbone_forward(model, images):
  return torch.nn.Sequential(*list(model.children())[:-2])(images)


@functools.lru_cache(maxsize=None)
def resnet_case(depth, last_stride):
  return torchvision_resnet(depth, last_stride)


@pytest.mark.parametrize('depth,last_stride', [(18, 2), (18, 1), (50, 2), (50, 1)])
def test_feature_maps_match_torchvision(depth, last_stride):
  model = resnet_case(depth, last_stride)
  variables = torch_weights.load_torchvision_resnet(model.state_dict(), depth, include_fc=False)
  with torch.no_grad():
    reference = backbone_forward(model, torch.from_numpy(IMAGES_NCHW)).numpy()
  ours, _ = jit(lambda m, v, x: m.apply(v, x, train=False))(
    make_resnet(depth, last_stride=last_stride), variables, IMAGES_NHWC
  )
  assert_close(np.transpose(ours, (0, 3, 1, 2)), reference)


def test_logits_match_torchvision_from_pth(tmp_path):
  model = resnet_case(18, 2)
  path = tmp_path / 'resnet18.pth'
  torch.save(model.state_dict(), path)
  variables = torch_weights.load_torchvision_resnet(str(path), 18)
  with torch.no_grad():
    reference = model(torch.from_numpy(IMAGES_NCHW)).numpy()
  logits, _ = jit(lambda m, v, x: m.apply(v, x, train=False))(
    make_resnet(18, last_stride=2, num_classes=1000), variables, IMAGES_NHWC
  )
  assert_close(logits, reference)


@pytest.mark.parametrize(
  'edit,named',
  [
    (lambda s: s.pop('layer1.0.conv1.weight'), 'layer1.0.conv1.weight'),
    (
      lambda s: s.update({'layer1.0.extra.weight': np.zeros(3, np.float32)}),
      'layer1.0.extra.weight',
    ),
    (lambda s: s.update({'bn1.running_var': np.ones(65, np.float32)}), 'bn1.running_var'),
  ],
)
def test_bad_state_dicts_fail_naming_the_key(edit, named):
  state = numpy_state(resnet_case(18, 2))
  edit(state)
  with pytest.raises(PortError, match=named.replace('.', r'\.')):
    torch_weights.load_torchvision_resnet(state, 18)


def test_all_problems_are_reported_at_once():
  state = numpy_state(resnet_case(18, 2))
  state.pop('layer4.1.bn2.bias')
  state['layer3.0.downsample.0.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  state['head.weight'] = np.zeros(2, np.float32)
  with pytest.raises(PortError) as error:
    torch_weights.load_torchvision_resnet(state, 18)
  message = str(error.value)
  for expected in (
    '1 missing keys',
    'layer4.1.bn2.bias',
    '1 unexpected keys',
    'head.weight',
    '1 shape mismatches',
    'layer3.0.downsample.0.weight',
    '(256, 128, 1, 1)',
  ):
    assert expected in message


def test_wrong_depth_fails_naming_what_the_file_holds():
  with pytest.raises(PortError, match='holds a ResNet-18 of width 64; the model is a ResNet-34'):
    torch_weights.load_torchvision_resnet(resnet_case(18, 2).state_dict(), 34)
  # A layout that is no torchvision depth still lists every key that does not fit.
  state = resnet_case(18, 2).state_dict()
  state = {k: v for k, v in state.items() if not k.startswith('layer4.1.')}
  with pytest.raises(PortError, match='missing keys'):
    torch_weights.load_torchvision_resnet(state, 18)


class _RunsCode:
  """Unpickling this calls a function: what a malicious checkpoint does."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_malicious_pickle_is_refused(tmp_path):
  marker, path = str(tmp_path / 'code_ran'), str(tmp_path / 'evil.pth')
  torch.save({'state_dict': {'conv1.weight': _RunsCode(marker)}}, path)
  with pytest.raises(PortError, match='evil.pth: refused for safety') as error:
    torch_weights.load_torchvision_resnet(path, 18)
  assert 'it would build io.open' in str(error.value)  # what it would have built
  assert 'weights_only' not in str(error.value)  # no advice to turn the safe loader off
  # A bare pickle (not torch.save) of the same object is refused the same way.
  with open(path, 'wb') as f:
    pickle.dump({'conv1.weight': _RunsCode(marker)}, f)
  with pytest.raises(PortError, match='evil.pth: refused for safety'):
    torch_weights.load_torchvision_resnet(path, 18)
  assert not os.path.exists(marker)


def test_safetensors_round_trip_is_exact(tmp_path):
  state = {
    k: v
    for k, v in numpy_state(resnet_case(18, 1)).items()
    if not k.endswith('num_batches_tracked')
  }
  path = str(tmp_path / 'resnet18.safetensors')
  torch_weights.save_safetensors(state, path)
  variables = torch_weights.load_torchvision_resnet(path, 18)
  back = torch_weights.export_torchvision_resnet(variables, 18)
  assert back.keys() == state.keys()
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)


def test_export_then_port_is_exact_and_loads_into_torchvision():
  model = make_resnet(18, last_stride=2, num_classes=10)
  variables = jax.tree.map(
    np.asarray, jit(lambda m, x: m.init(jax.random.key(1), x))(model, IMAGES_NHWC)
  )
  state = torch_weights.export_torchvision_resnet(variables, 18)
  torch_model = torchvision.models.resnet18(weights=None, num_classes=10)
  torch_model.load_state_dict(torch_weights.to_torch_state_dict(state), strict=True)
  again = torch_weights.load_torchvision_resnet(numpy_state(torch_model), 18)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def fill_abstract(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)


def test_load_backbone_into_replaces_only_the_backbone():
  model = CACENet(depth=18, non_local=True, pooling='avg', embed_dim=16, num_classes=4)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES_NHWC))
  initial = fill_abstract(dict(abstract), seed=1)
  torch_model = resnet_case(18, 1)
  params, batch_stats = torch_weights.load_backbone_into(
    initial['params'], initial['batch_stats'], torch_model.state_dict(), depth=18
  )
  ported = torch_weights.load_torchvision_resnet(torch_model.state_dict(), 18, include_fc=False)
  jax.tree.map(
    np.testing.assert_array_equal, params['backbone']['layer3_1'], ported['params']['layer3_1']
  )
  np.testing.assert_array_equal(
    batch_stats['backbone']['bn1']['var'], ported['batch_stats']['bn1']['var']
  )
  for kept in ('nl_layer2_0', 'nl_layer4_0'):  # not in torchvision: stay as initialised
    jax.tree.map(
      np.testing.assert_array_equal, params['backbone'][kept], initial['params']['backbone'][kept]
    )
  jax.tree.map(np.testing.assert_array_equal, params['pair_graph'], initial['params']['pair_graph'])
  assert jax.tree.structure(params) == jax.tree.structure(initial['params'])
  with pytest.raises(PortError, match='holds a ResNet-18 .* the model is a ResNet-34'):
    deeper = jax.eval_shape(
      lambda: CACENet(depth=34, gcn='none').init(jax.random.key(0), IMAGES_NHWC)
    )
    torch_weights.load_backbone_into(
      deeper['params'], deeper['batch_stats'], torch_model.state_dict(), depth=34
    )


# ----------------------------------------------------------------------------- official CACE-Net


class TorchNonLocal(torch.nn.Module):
  """The official backbone's non-local block (g/theta/phi/W 1x1 convs with bias)."""

  def __init__(self, channels):
    super().__init__()
    inner = channels // 16
    self.g, self.theta, self.phi = (torch.nn.Conv2d(channels, inner, 1) for _ in range(3))
    self.W = torch.nn.Conv2d(inner, channels, 1)  # pylint: disable=invalid-name

  def forward(self, x):
    batch, channels, height, width = x.shape
    g = self.g(x).flatten(2).transpose(1, 2)
    theta = self.theta(x).flatten(2).transpose(1, 2)
    phi = self.phi(x).flatten(2)
    y = torch.softmax(theta @ phi, dim=-1) @ g
    return x + self.W(y.transpose(1, 2).reshape(batch, -1, height, width))


class TorchGeM(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.p = torch.nn.Parameter(torch.tensor([3.4]))

  def forward(self, x):
    return x.clamp(min=1e-6).pow(self.p).mean((2, 3), keepdim=True).pow(1.0 / self.p)


class TorchPairGraph(torch.nn.Module):
  """Official pair graph from DESIGN.md sec. 4, on width-concatenated pairs [N, C, h, 2w]."""

  def __init__(self, channels):
    super().__init__()
    inner = channels // 16
    self.y = torch.nn.Conv2d(channels, inner, 1, bias=False)
    self.g = torch.nn.Conv2d(channels, inner, 1, bias=False)
    self.o = torch.nn.Conv2d(inner, channels, 1, bias=False)

  def forward(self, x):
    num, _, height, width = x.shape
    y = F.normalize(self.y(x).flatten(2), dim=1)  # [N, r, n]
    adjacency = torch.relu(y.transpose(1, 2) @ y)  # [N, n, n]
    eye = torch.eye(adjacency.shape[-1])
    adjacency = adjacency * (1 - eye)
    degree = adjacency.sum(-1)
    norm = torch.where(degree > 1e-3, degree, torch.ones_like(degree)).rsqrt()
    laplacian = norm[:, :, None] * (torch.diag_embed(degree) - adjacency) * norm[:, None, :]
    mixed = self.g(x).flatten(2) @ laplacian  # [N, r, n]
    return x + self.o(mixed.reshape(num, -1, height, width))


class TorchCACENet(torch.nn.Module):
  """Eval-mode official CACE-Net with its state_dict key names."""

  def __init__(self, num_classes=5, embed_dim=768, seed=0):
    super().__init__()
    self.resnet = torchvision_resnet(50, last_stride=1, seed=seed)
    del self.resnet.fc
    for stage, index in (('layer2', 2), ('layer3', 4), ('layer4', 1)):
      block = getattr(self.resnet, stage)[index]
      block.non_local_block = TorchNonLocal(block.conv3.out_channels)
      block.register_forward_hook(lambda module, _, out: module.non_local_block(out))
    self.gemp = TorchGeM()
    self.pair_graph = TorchPairGraph(2048)
    self.embedding_layer = torch.nn.Sequential(
      torch.nn.Conv2d(2048, embed_dim, 1, bias=False), torch.nn.BatchNorm2d(embed_dim)
    )
    self.fc_layer = torch.nn.Sequential(
      torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(embed_dim, num_classes, bias=False)
    )
    self.pair_fc_layer = torch.nn.Sequential(
      torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(embed_dim, num_classes, bias=False)
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # zero-initialised in the official code: make them matter.
      for name, tensor in self.named_parameters():
        if 'non_local_block.W' in name or name.startswith('pair_graph'):
          tensor.copy_(0.02 * torch.randn(tensor.shape, generator=generator))
    randomize_batchnorm(self, seed)

  def backbone(self, images):
    r = self.resnet
    x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
    return r.layer4(r.layer3(r.layer2(r.layer1(x))))

  def head(self, fmap):
    return self.embedding_layer(self.gemp(fmap)).flatten(1)

  def forward(self, images):
    x = self.backbone(images)
    b, width = x.shape[0], x.shape[-1]
    pairs = torch.cat([x.repeat(b, 1, 1, 1), x.repeat_interleave(b, dim=0)], dim=-1)
    pairs = self.pair_graph(pairs)
    return x, self.head(x), self.head(pairs[..., :width]), self.head(pairs[..., width:])


@functools.lru_cache(maxsize=None)
def official_case():
  model = TorchCACENet().eval()
  with torch.no_grad():
    outputs = [t.numpy() for t in model(torch.from_numpy(IMAGES_NCHW))]
  return model, outputs


def save_official(model, path):
  state = {f'module.{k}': v for k, v in model.state_dict().items()}
  torch.save(
    {'epoch': 80, 'state_dict': state, 'optimizer': {'state': {}, 'param_groups': []}}, path
  )


def test_official_checkpoint_config_and_full_network_parity(tmp_path):
  model, (fmap, f, f_0, f_1) = official_case()
  save_official(model, tmp_path / 'official.pth')
  variables, config = torch_weights.load_official_cacenet(str(tmp_path / 'official.pth'))
  assert config == {
    'depth': 50,
    'width': 64,
    'last_stride': 1,
    'non_local': True,
    'pooling': 'gem',
    'embed_dim': 768,
    'adjacency': 'projected',
    'gcn': 'discrepancy',
    'gcn_depth': 1,
    'reduction': 16,
    'num_classes': 5,
  }
  out = jit(lambda m, v, x: m.apply(v, x, train=False))(CACENet(**config), variables, IMAGES_NHWC)
  assert_close(np.transpose(out['fmap'], (0, 3, 1, 2)), fmap)
  assert_close(out['embedding'], f)
  batch = f.shape[0]
  # Official pair k = i*B + j: left half is image j (f_0 = f(j|i)), right is i (f_1 = f(i|j)).
  emb_uv = np.asarray(out['pair_embedding_uv'])
  assert_close(emb_uv.transpose(1, 0, 2).reshape(batch * batch, -1), f_0)
  assert_close(emb_uv.reshape(batch * batch, -1), f_1)


def test_official_pair_graph_parity_with_pair_features():
  model, (fmap, _, f_0, f_1) = official_case()
  variables, config = torch_weights.load_official_cacenet(model.state_dict())
  nodes = jnp.asarray(fmap.transpose(0, 2, 3, 1))
  batch = fmap.shape[0]
  index_u, index_v = np.repeat(np.arange(batch), batch), np.tile(np.arange(batch), batch)
  pair_features = lambda m, v, a, b: m.apply(v, a, b, method=CACENet.pair_features)
  out = jit(pair_features)(CACENet(**config), variables, nodes[index_u], nodes[index_v])
  # ours pair k = u*B + v gives f(u|v) = official f_1[k] and f(v|u) = official f_0[k].
  assert_close(out['embedding_uv'], f_1)
  assert_close(out['embedding_vu'], f_0)


def test_official_training_forward_leaves_the_official_batchnorm_buffers():
  """A training-mode forward updates every BN buffer as the PyTorch module's does.

  torch: each backbone BN once, `embedding_layer.1` three times (f, f_0, f_1),
  unbiased variances. With B = 2 images the embedding BN's n/(n-1) is 2 (and
  4/3 for the pairs), so a biased or two-update scheme fails by far.
  """
  model, _ = official_case()
  trained = copy.deepcopy(model).train()
  # From the live module: the port copies, so the forward below cannot reach it.
  variables, config = torch_weights.load_official_cacenet(trained.state_dict())
  start = jax.tree.map(np.copy, variables)
  with torch.no_grad():
    fmap = trained(torch.from_numpy(IMAGES_NCHW))[0].numpy()
  forward = lambda m, v, x: m.apply(
    v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
  )
  out, updates = jit(forward)(CACENet(**config), variables, IMAGES_NHWC)
  # Batch statistics of 2 images amplify rounding through 53 BNs: 1.6e-4 relative here.
  gap = np.abs(np.transpose(out['fmap'], (0, 3, 1, 2)) - fmap).max()
  assert gap <= 1e-3 * np.abs(fmap).max()
  ours = torch_weights.export_official_cacenet({**variables, **updates}, CACENet(**config))
  reference = {f'module.{k}': v for k, v in numpy_state(trained).items()}
  before = {f'module.{k}': v for k, v in numpy_state(model).items()}
  buffers = [k for k in ours if k.endswith(('running_mean', 'running_var'))]
  assert len(buffers) == 2 * 54  # 53 backbone BNs + the embedding BN
  for key in buffers:
    assert not np.allclose(before[key], reference[key]), key  # torch did update it
    assert_close(ours[key], reference[key])
  jax.tree.map(np.testing.assert_array_equal, variables, start)


def test_official_round_trip_and_cli(tmp_path):
  model, _ = official_case()
  source = str(tmp_path / 'official.pth')
  save_official(model, source)
  original = {
    f'module.{k}': v for k, v in numpy_state(model).items() if not k.endswith('num_batches_tracked')
  }
  variables, config = torch_weights.load_official_cacenet(source)
  exported = torch_weights.export_official_cacenet(variables, CACENet(**config))
  assert exported.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(exported[key], original[key], err_msg=key)

  workdir, out = str(tmp_path / 'ported'), str(tmp_path / 'back.safetensors')
  assert run_tool(port_tool, ['official', source, '--out', workdir]) == 0
  step, state, record = checkpoint.read_checkpoint(workdir)
  assert step == 0 and record['model'] == config and record['num_classes'] == 5
  np.testing.assert_array_equal(
    state['params']['pair_graph']['o']['kernel'], variables['params']['pair_graph']['o']['kernel']
  )
  assert run_tool(port_tool, ['to_torch', workdir, '--out', out]) == 0
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  back = load_file(out)
  assert back.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(back[key], original[key], err_msg=key)


def test_training_hook_loads_imagenet_backbone(tmp_path, tiny_data_dir):
  """`init.backbone` puts a torchvision file's weights into a fresh CACE-Net backbone."""
  import torchvision  # pylint: disable=import-outside-toplevel

  from cace_jax import train_init, train_step  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel

  reference = torchvision.models.resnet18(weights=None)
  path = str(tmp_path / 'resnet18.pth')
  torch.save(reference.state_dict(), path)
  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.model.depth, config.model.width = '18', 64
  config.init.backbone = path
  model = build_model(config.model, 9)
  tx, _ = train_step.create_optimizer(config, 3, 4)
  state = train_init.init_backbone(train_step.init_state(model, tx, (64, 32), 0), config)
  np.testing.assert_array_equal(
    np.asarray(state.params['backbone']['layer2_0']['conv1']['kernel']),
    reference.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0),
  )
  config.model.depth = '34'
  with pytest.raises(ConfigError, match='init.backbone='):
    train_init.init_backbone(
      train_step.init_state(build_model(config.model, 9), tx, (64, 32), 0), config
    )


def test_training_starts_from_a_whole_checkpoint(trained_workdir, tiny_data_dir, tmp_path):
  """`init.checkpoint` loads every variable; only classifiers of another size stay fresh."""
  from cace_jax import train_init, train_lib, train_step  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel

  _, source, record = checkpoint.read_checkpoint(trained_workdir)
  config = tiny.get_config()
  config.data.data_dir = tiny_data_dir
  config.init.checkpoint = trained_workdir
  tx, _ = train_step.create_optimizer(config, 3, 4)

  def fresh(num_classes, **model_fields):
    changed = config.copy_and_resolve_references()
    changed.model.update(model_fields)
    return train_step.init_state(build_model(changed.model, num_classes), tx, (64, 32), 7)

  state, kept = train_init.init_from_checkpoint(fresh(record['num_classes']), config)
  assert kept == []
  for path, leaf in jax.tree_util.tree_leaves_with_path(source['params']):
    np.testing.assert_array_equal(
      np.asarray(functools.reduce(lambda t, k: t[k.key], path, state.params)),
      leaf,
      err_msg=jax.tree_util.keystr(path),
    )

  other_dataset = fresh(record['num_classes'] + 3)
  state, kept = train_init.init_from_checkpoint(other_dataset, config)
  assert kept == ['params/classifier/kernel', 'params/pair_classifier/kernel']
  np.testing.assert_array_equal(
    state.params['classifier']['kernel'], other_dataset.params['classifier']['kernel']
  )
  np.testing.assert_array_equal(
    state.params['embedding_conv']['kernel'], source['params']['embedding_conv']['kernel']
  )

  with pytest.raises(
    ConfigError, match=r'missing params/gemp/p.*unexpected params/pair_attention/y'
  ):
    train_init.init_from_checkpoint(
      fresh(5, pooling='gem', adjacency='cosine_correspondence'), config
    )

  # Through train_and_evaluate: the log says where the run started from.
  config.train.num_steps, config.train.eval_every_epochs = 1, 0
  config.train.eval_at_end = False  # the log line is what is checked; evaluating costs 10 s
  workdir = str(tmp_path / 'finetune')
  train_lib.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'train.log'), encoding='utf-8') as f:
    assert f'initialised from {trained_workdir}' in f.read()


def test_a_model_without_pair_stage_starts_the_full_models_second_phase():
  """merge_variables(absent=...): missing pair-stage leaves keep their init; others must fit."""
  from cace_jax import train_init  # pylint: disable=import-outside-toplevel

  target = {
    'params': {
      'backbone': {'w': np.ones(3)},
      'pair_graph': {'o': np.full(2, 7.0)},
      'pair_attention': {'y': np.full(2, 5.0)},
    },
    'batch_stats': {},
  }
  individual_only = {'params': {'backbone': {'w': np.zeros(3)}}, 'batch_stats': {}}
  merged, kept = checkpoint.merge_variables(
    target, individual_only, train_init.CLASSIFIERS, absent=train_init.PAIR_STAGE
  )
  assert kept == ['params/pair_graph/o', 'params/pair_attention/y']
  np.testing.assert_array_equal(merged['params']['backbone']['w'], np.zeros(3))
  np.testing.assert_array_equal(merged['params']['pair_graph']['o'], np.full(2, 7.0))
  # A pair stage of another shape is an error, not silently replaced.
  wrong = {'params': {**individual_only['params'], 'pair_graph': {'o': np.zeros(4)}}}
  wrong['batch_stats'] = {}
  with pytest.raises(ValueError, match=r'params/pair_graph/o has shape \(4,\), expected \(2,\)'):
    checkpoint.merge_variables(target, wrong, train_init.CLASSIFIERS, absent=train_init.PAIR_STAGE)
  # Without `absent`, a missing pair stage is an error as before.
  with pytest.raises(ValueError, match='missing params/pair_graph/o'):
    checkpoint.merge_variables(target, individual_only, train_init.CLASSIFIERS)


def test_official_checkpoint_to_onnx_matches_pytorch(tmp_path):
  """Official .pth -> port -> ONNX: onnxruntime reproduces the PyTorch model's embeddings."""
  import onnxruntime  # pylint: disable=import-outside-toplevel

  from cace_jax import augment  # pylint: disable=import-outside-toplevel

  model, (_, f, _, f_1) = official_case()
  source, workdir = str(tmp_path / 'official.pth'), str(tmp_path / 'ported')
  save_official(model, source)
  assert run_tool(port_tool, ['official', source, '--out', workdir]) == 0
  out = str(tmp_path / 'export')
  assert run_tool(deploy_tool, [workdir, '--out', out, '--image_size=64,32', '--no_flip']) == 0
  # The ONNX model takes 0-255 pixels and normalises them itself.
  pixels = (
    IMAGES_NCHW.transpose(0, 2, 3, 1) * 255 * np.float32(augment.IMAGENET_STD)
    + np.float32(augment.IMAGENET_MEAN_PIXEL)
  ).astype(np.float32)
  run = lambda name, feeds: onnxruntime.InferenceSession(
    os.path.join(out, name), providers=['CPUExecutionProvider']
  ).run(None, feeds)
  embedding, fmap = run('features.onnx', {'images': pixels})
  assert_close(embedding, f / np.linalg.norm(f, axis=-1, keepdims=True))
  # Pair (u, v) = (0, 1) is official pair k = 0 * B + 1, whose f_1 is f(u|v).
  _, emb_qg, _ = run('pair.onnx', {'fmap_query': fmap[:1], 'fmap_gallery': fmap[1:2]})
  assert_close(emb_qg[0], f_1[1])

"""Porting torchvision ResNets in and out: parity, bad files, safetensors and .pth round trips."""

import functools
import os
import pickle
import re

import jax
import numpy as np
import pytest
import torch
import torchvision

from cace_jax.errors import PortError
from cace_jax.interop import torch_export, torch_weights
from cace_jax.models import CACENet, make_resnet
from torch_reference import (
  IMAGES_NCHW,
  IMAGES_NHWC,
  assert_close,
  backbone_forward,
  fill_abstract,
  jit,
  numpy_state,
  torchvision_resnet,
)


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
  # What it would have built: io.open, which Python 3.13 pickles as _io.open.
  assert re.search(r'it would build _?io\.open', str(error.value)), error.value
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
  torch_export.save_safetensors(state, path)
  variables = torch_weights.load_torchvision_resnet(path, 18)
  back = torch_export.export_torchvision_resnet(variables, 18)
  assert back.keys() == state.keys()
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)


def test_export_then_port_is_exact_and_loads_into_torchvision():
  model = make_resnet(18, last_stride=2, num_classes=10)
  variables = jax.tree.map(
    np.asarray, jit(lambda m, x: m.init(jax.random.key(1), x))(model, IMAGES_NHWC)
  )
  state = torch_export.export_torchvision_resnet(variables, 18)
  torch_model = torchvision.models.resnet18(weights=None, num_classes=10)
  torch_model.load_state_dict(torch_export.to_torch_state_dict(state), strict=True)
  again = torch_weights.load_torchvision_resnet(numpy_state(torch_model), 18)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


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

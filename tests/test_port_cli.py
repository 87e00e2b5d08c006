"""`tools/port.py` end to end: torch files in, checkpoints out, and back to torch files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from conftest import run_tool
from tools import port as port_tool


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
  """A torchvision ResNet-18 state_dict saved with torch.save, and its tensors as numpy."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None)
  path = str(tmp_path_factory.mktemp('torchvision') / 'r18.pth')
  torch.save(model.state_dict(), path)
  # torchvision's bookkeeping counters carry no weights: ports drop them.
  state = {
    key: value.numpy().copy()
    for key, value in model.state_dict().items()
    if not key.endswith('num_batches_tracked')
  }
  return path, state


def read_exported(path: str) -> dict:
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # the torch extra, as the tool's

    return load_file(path)
  saved = torch.load(path, map_location='cpu', weights_only=True)
  assert set(saved) == {'epoch', 'state_dict'}  # the official files' layout
  return {key: value.numpy() for key, value in saved['state_dict'].items()}


@pytest.mark.parametrize('extra,suffix', [([], 'safetensors'), (['--no_fc'], 'pth')])
def test_a_torchvision_port_goes_back_to_the_same_torchvision_tensors(
  extra, suffix, resnet18_file, tmp_path, capsys
):
  source, original = resnet18_file
  workdir, out = str(tmp_path / 'ported'), str(tmp_path / f'back.{suffix}')
  argv = ['torchvision', source, '--depth', '18', '--out', workdir, *extra]
  assert run_tool(port_tool, argv) == 0
  assert run_tool(port_tool, ['to_torch', workdir, '--out', out]) == 0, capsys.readouterr().err
  back = read_exported(out)
  if '--no_fc' in extra:
    original = {k: v for k, v in original.items() if not k.startswith('fc.')}
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize(
  'key,edit,problem',
  [
    ('layer1.0.conv1.weight', lambda state, key: state.pop(key), 'missing keys'),
    ('bn1.running_var', lambda state, key: state.update({key: torch.ones(65)}), 'shape mismatch'),
  ],
)
def test_a_file_that_does_not_fit_is_named_with_the_key(
  key, edit, problem, resnet18_file, tmp_path, capsys
):
  state = torch.load(resnet18_file[0], weights_only=True)
  edit(state, key)
  source = str(tmp_path / 'edited.pth')
  torch.save(state, source)
  argv = ['torchvision', source, '--depth', '18', '--out', str(tmp_path / 'ported')]
  assert run_tool(port_tool, argv) == 2
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line.startswith(f'error: {source}: state_dict does not fit the model')
  assert problem in line and key in line
  assert not (tmp_path / 'ported').exists()  # nothing written


def test_a_file_that_is_no_official_checkpoint_is_named(resnet18_file, tmp_path, capsys):
  source = str(tmp_path / 'not_official.pth')
  torch.save({'state_dict': torch.load(resnet18_file[0], weights_only=True)}, source)
  assert run_tool(port_tool, ['official', source, '--out', str(tmp_path / 'ported')]) == 2
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line == (
    f'error: {source}: not an official CACE-Net state_dict: no embedding_layer.0.weight'
  )

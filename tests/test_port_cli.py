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

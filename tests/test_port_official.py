"""Porting official CACE-Net checkpoints: configs, parity with PyTorch, round trips, ONNX."""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cace_jax.interop import torch_export, torch_weights
from cace_jax.models import CACENet
from cace_jax.runs import checkpoint
from conftest import run_tool
from tools import deploy as deploy_tool
from tools import port as port_tool
from torch_reference import (
  IMAGES_NCHW,
  IMAGES_NHWC,
  assert_close,
  jit,
  numpy_state,
  official_case,
  save_official,
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
  ours = torch_export.export_official_cacenet({**variables, **updates}, CACENet(**config))
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
  exported = torch_export.export_official_cacenet(variables, CACENet(**config))
  assert exported.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(exported[key], original[key], err_msg=key)

  workdir, out = str(tmp_path / 'ported'), str(tmp_path / 'back.safetensors')
  assert run_tool(port_tool, ['official', source, '--out', workdir]) == 0
  step, state, record = checkpoint.read_checkpoint(workdir)
  assert step == 0 and record.model == config and record.num_classes == 5
  np.testing.assert_array_equal(
    state['params']['pair_graph']['o']['kernel'], variables['params']['pair_graph']['o']['kernel']
  )
  assert run_tool(port_tool, ['to_torch', workdir, '--out', out]) == 0
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  back = load_file(out)
  assert back.keys() == original.keys()
  for key in original:
    np.testing.assert_array_equal(back[key], original[key], err_msg=key)


def test_official_checkpoint_to_onnx_matches_pytorch(tmp_path):
  """Official .pth -> port -> ONNX: onnxruntime reproduces the PyTorch model's embeddings."""
  import onnxruntime  # pylint: disable=import-outside-toplevel

  from cace_jax.data import augment  # pylint: disable=import-outside-toplevel

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

"""Deployment export: ONNX graphs and `jax.export` modules of both inference stages.

Tolerance: onnxruntime and JAX agree to 1e-5 on L2-normalised embeddings and
pair distances, and to 1e-5 of the largest value on feature maps (float32;
the ONNX graphs fold BatchNorm into the convolutions, so the sums round
differently; observed gaps are ~5e-7).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest

from cace_jax.errors import ConfigError
from cace_jax.interop import deployment, onnx_graph, torch_weights
from cace_jax.models import CACENet, feature_map_shape
from cace_jax.runs import checkpoint
from conftest import run_tool
from tools import deploy as deploy_tool

TOLERANCE = 1e-5
IMAGE_SIZE = (64, 32)


def perturbed_variables(model: CACENet, seed: int = 0) -> dict:
  """Initial variables moved off their init values: BN statistics, o (zero at init) and p."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *IMAGE_SIZE, 3)))
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    if 'var' in jax.tree_util.keystr(path):
      return np.abs(leaf + noise) + 0.5
    return leaf + noise

  return jax.tree_util.tree_map_with_path(perturb, variables)


def run_onnx(model_proto, feeds: dict) -> list:
  session = onnxruntime.InferenceSession(
    model_proto.SerializeToString(), providers=['CPUExecutionProvider']
  )
  return session.run(None, feeds)


# The official configuration (projected, GeM, non-local) and one of each other kind.
CASES = [
  dict(adjacency='projected', pooling='gem', non_local=True),
  dict(adjacency='raw_correspondence', pooling='avg', non_local=False, gcn_depth=2),
  dict(adjacency='cosine_intra', pooling='avgmax', gcn='normal'),
  dict(adjacency='topk', topk=2, pooling='gem'),
  dict(adjacency='part', pooling='avg', depth=18, last_stride=2),
]


@pytest.mark.parametrize('case', CASES, ids=lambda case: '-'.join(map(str, case.values())))
def test_onnx_models_match_jax(case, tmp_path):
  model = CACENet(**{'depth': 'tiny', 'width': 8, 'embed_dim': 32, 'num_classes': 5, **case})
  variables = perturbed_variables(model)
  flip = case['pooling'] != 'avg'  # both settings across the cases
  features = onnx_graph.feature_graph(model, variables, IMAGE_SIZE, flip)
  pair = onnx_graph.pair_graph(
    model, variables, feature_map_shape(IMAGE_SIZE, model.depth, model.width, model.last_stride)
  )
  features_path, pair_path = str(tmp_path / 'features.onnx'), str(tmp_path / 'pair.onnx')
  with open(features_path, 'wb') as f:
    f.write(features.SerializeToString())
  with open(pair_path, 'wb') as f:
    f.write(pair.SerializeToString())
  gaps = deployment.verify_onnx(model, variables, IMAGE_SIZE, flip, features_path, pair_path)
  assert max(gaps.values()) <= TOLERANCE, gaps

  # The batch axis is dynamic: one image alone gives the same as within a batch.
  images = np.random.default_rng(1).uniform(0, 255, (4, *IMAGE_SIZE, 3)).astype(np.float32)
  batch_embedding, batch_fmap = run_onnx(features, {'images': images})
  single_embedding, _ = run_onnx(features, {'images': images[2:3]})
  np.testing.assert_allclose(single_embedding[0], batch_embedding[2], atol=TOLERANCE)
  # The pair stage is not the individual distance (the GCN changed the features).
  distance, emb_qg, emb_gq = run_onnx(
    pair, {'fmap_query': batch_fmap[:3], 'fmap_gallery': batch_fmap[1:]}
  )
  individual = 1.0 - np.sum(batch_embedding[:3] * batch_embedding[1:], axis=-1)
  assert distance.shape == (3,) and emb_qg.shape == emb_gq.shape == (3, 32)
  assert np.abs(distance - individual).max() > 1e-3


def test_pair_graph_needs_a_pair_stage():
  model = CACENet(depth='tiny', width=8, embed_dim=32, gcn='none')
  with pytest.raises(ValueError, match='no pair stage'):
    onnx_graph.pair_graph(model, perturbed_variables(model), (4, 2, 256))


def test_deploy_fails_when_an_exported_model_computes_another_model(
  trained_workdir, tmp_path, monkeypatch, capsys
):
  """A pair graph that silently computes another model (here: o moved by 0.1) ends in exit 1."""
  real = onnx_graph.pair_graph

  def wrong_pair_graph(model, variables, fmap_shape):
    moved = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf + 0.1 if "'o'" in jax.tree_util.keystr(path) else leaf, variables
    )
    return real(model, moved, fmap_shape)

  monkeypatch.setattr(onnx_graph, 'pair_graph', wrong_pair_graph)
  out = str(tmp_path / 'export')
  assert run_tool(deploy_tool, [trained_workdir, '--out', out]) == 1
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith(f'error: {os.path.join(out, "pair.onnx")} does not compute what JAX')
  assert 'distance differs by' in last and 'tolerance 0.0001' in last
  summary = json.load(open(os.path.join(out, 'export.json')))
  assert summary['verified'] is False and summary['max_abs_diff_onnx_vs_jax']['distance'] > 1e-4
  assert summary['max_abs_diff_onnx_vs_jax']['embedding'] <= TOLERANCE  # only the pair model


def test_deploy_cli_writes_models_that_agree(trained_workdir, tmp_path, capsys):
  out = str(tmp_path / 'export')
  assert run_tool(deploy_tool, [trained_workdir, '--out', out, '--stage2=config']) == 0
  summary = json.loads(capsys.readouterr().out)
  assert sorted(os.listdir(out)) == [
    'export.json',
    'features.jax_export',
    'features.onnx',
    'pair.jax_export',
    'pair.onnx',
  ]
  assert summary['image_size'] == list(IMAGE_SIZE) and summary['step'] == 2
  # How to rank with the two models as eval.py and the API do: here the configured stage 2,
  # asked for (the run has no validation split, so by default it would have none).
  policy = {'k': 5, 'mix': 1.0, 'max_similarity': 1.0, 'from': 'config'}
  assert summary['stage2'] == policy
  assert max(summary['max_abs_diff_onnx_vs_jax'].values()) <= TOLERANCE and summary['verified']

  # The jax.export modules need no model code, take any batch size and match ONNX.
  load = lambda name: jax.export.deserialize(bytearray(open(os.path.join(out, name), 'rb').read()))
  features, pair = load('features.jax_export'), load('pair.jax_export')
  assert set(features.platforms) == {'cpu', 'cuda', 'tpu'}
  images = np.random.default_rng(2).uniform(0, 255, (5, *IMAGE_SIZE, 3)).astype(np.float32)
  embedding, fmap = features.call(images)
  session = lambda name: onnxruntime.InferenceSession(
    os.path.join(out, name), providers=['CPUExecutionProvider']
  )
  onnx_embedding, _ = session('features.onnx').run(None, {'images': images})
  np.testing.assert_allclose(np.asarray(embedding), onnx_embedding, atol=TOLERANCE)
  distance = pair.call(fmap[:2], fmap[3:])[0]
  onnx_distance = session('pair.onnx').run(
    None, {'fmap_query': np.asarray(fmap[:2]), 'fmap_gallery': np.asarray(fmap[3:])}
  )[0]
  np.testing.assert_allclose(np.asarray(distance), onnx_distance, atol=TOLERANCE)


def test_deploy_errors_are_one_line(tmp_path, capsys):
  assert run_tool(deploy_tool, [str(tmp_path)]) == 2
  assert f'error: no checkpoint in {tmp_path}' in capsys.readouterr().err
  # A bare torchvision port is no CACE-Net; nothing is written next to it.
  variables = torch_weights.load_torchvision_resnet(
    {k: v.numpy() for k, v in __import__('torchvision').models.resnet18().state_dict().items()}, 18
  )
  workdir = str(tmp_path / 'resnet')
  torch_weights.write_ported_checkpoint(
    workdir, variables, {'resnet_depth': 18, 'include_fc': True}, 'x'
  )
  assert run_tool(deploy_tool, [workdir]) == 2
  assert 'bare torchvision ResNet' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(workdir, 'export'))
  assert checkpoint.read_checkpoint(workdir)[0] == 0


def test_deploy_without_pair_stage_writes_the_features_model(tmp_path, capsys):
  """A ported individual-only model (gcn 'none') exports stage 1 alone."""
  kwargs = {'depth': 'tiny', 'width': 8, 'embed_dim': 32, 'gcn': 'none', 'pooling': 'avg'}
  workdir, out = str(tmp_path / 'ported'), str(tmp_path / 'export')
  torch_weights.write_ported_checkpoint(
    workdir, perturbed_variables(CACENet(**kwargs)), kwargs, 'test'
  )
  assert (
    run_tool(deploy_tool, [workdir, '--out', out, f'--image_size={IMAGE_SIZE[0]},{IMAGE_SIZE[1]}'])
    == 0
  )
  summary = json.loads(capsys.readouterr().out)
  assert sorted(os.listdir(out)) == ['export.json', 'features.jax_export', 'features.onnx']
  assert set(summary['max_abs_diff_onnx_vs_jax']) == {'embedding', 'fmap'}
  assert summary['flip'] and max(summary['max_abs_diff_onnx_vs_jax'].values()) <= TOLERANCE


def test_deployment_ranks_with_what_validation_chose_else_by_stage_1(tmp_path):
  from cace_jax.evaluation import records
  from configs import tiny

  config = tiny.get_config()
  assert deployment.stage2_policy(None, str(tmp_path)) is None  # a port has no config
  # No validation choice: no query is re-sorted, unless the config's stage 2 is asked for.
  assert deployment.stage2_policy(config, str(tmp_path)) == {
    'k': 5,
    'mix': 1.0,
    'max_similarity': records.NO_QUERY,
    'from': records.STAGE1_ONLY,
  }
  assert deployment.stage2_policy(config, str(tmp_path), 'config')['max_similarity'] == 1.0
  choice = records.Stage2Choice(
    stage2_k=10, stage2_mix=0.5, stage2_fraction=0.25, stage2_max_similarity=0.625
  )
  (tmp_path / 'results.json').write_text(json.dumps({'info': {'selection': choice.to_json()}}))
  assert deployment.stage2_policy(config, str(tmp_path)) == {
    'k': 10,
    'mix': 0.5,
    'max_similarity': 0.625,
    'from': 'validation',
  }
  with pytest.raises(ConfigError, match=r"stage2='best': expected one of validation, config"):
    deployment.stage2_policy(config, str(tmp_path), 'best')

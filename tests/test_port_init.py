"""Starting a run from ported weights: an ImageNet backbone, or every variable of a checkpoint."""

import functools
import os

import jax
import numpy as np
import pytest
import torch
import torchvision

from cace_jax.errors import ConfigError
from cace_jax.models import build_model
from cace_jax.runs import checkpoint


def test_training_hook_loads_imagenet_backbone(tmp_path, tiny_data_dir):
  """`init.backbone` puts a torchvision file's weights into a fresh CACE-Net backbone."""

  from cace_jax.train import train_init, train_step  # pylint: disable=import-outside-toplevel
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
  from cace_jax.train import train_init, train_lib, train_step  # pylint: disable=import-outside-toplevel
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

  state, kept = train_init.init_from_checkpoint(fresh(record.num_classes), config)
  assert kept == []
  for path, leaf in jax.tree_util.tree_leaves_with_path(source['params']):
    np.testing.assert_array_equal(
      np.asarray(functools.reduce(lambda t, k: t[k.key], path, state.params)),
      leaf,
      err_msg=jax.tree_util.keystr(path),
    )

  other_dataset = fresh(record.num_classes + 3)
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
  from cace_jax.train import train_init  # pylint: disable=import-outside-toplevel

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

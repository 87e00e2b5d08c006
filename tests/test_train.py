"""Training: per-device steps, multi-host, resume, NaN guard, config errors."""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cace_jax import sharding
from cace_jax.commands import config_check
from cace_jax.errors import ConfigError
from cace_jax.models import build_model
from cace_jax.runs import checkpoint
from cace_jax.train import train_lib, train_step
from configs import tiny  # conftest puts the repository root on sys.path
from configs.ablations import table2
from conftest import run_tool, run_train_cli
import train as train_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_CLASSES = 9


def tiny_config(data_dir, **overrides):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  for path, value in overrides.items():
    section, field = path.split('.')
    setattr(config[section], field, value)
  return config


def random_batch(seed, devices=4, p=2, k=2, size=(64, 32)):
  """A flat batch [devices·P·K, ...]: each device's P·K rows hold P identities × K images."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate(
    [np.repeat(rng.choice(NUM_CLASSES, p, replace=False), k) for _ in range(devices)]
  ).astype(np.int32)
  images = rng.normal(size=(devices * p * k, *size, 3)).astype(np.float32)
  return {'image': images, 'label': labels}


def setup_step(config, devices):
  mesh = sharding.make_mesh(jax.devices()[:devices])
  model = build_model(config.model, NUM_CLASSES)
  tx, schedule = train_step.create_optimizer(config, steps_per_epoch=3, global_batch=4 * devices)
  state = train_step.init_state(model, tx, config.data.image_size, config.seed)
  # A copy: the step donates its state, and tests keep using `state` as a reference.
  return mesh, model, tx, schedule, state, sharding.replicate(jax.tree.map(np.array, state), mesh)


def test_four_devices_loss_goes_down(tiny_data_dir):
  assert jax.device_count() == 4
  config = tiny_config(tiny_data_dir, **{'optim.lr_per_16': 0.05, 'optim.warmup_epochs': 0})
  mesh, model, tx, schedule, _, state = setup_step(config, 4)
  step = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
  batch = sharding.global_batch(random_batch(0), mesh)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
  assert {'id', 'triplet', 'mixup_uv', 'mixup_vu', 'pair_triplet', 'lr'} <= set(metrics)


def test_multi_device_update_is_the_mean_of_per_device_gradients(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  mesh, model, tx, schedule, host_state, state = setup_step(config, 4)
  batch = random_batch(1)
  step = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
  new_state, _ = step(state, sharding.global_batch(batch, mesh))

  # Reference without shard_map: each device's gradients on its own P·K images.
  kwargs = train_step.loss_kwargs_from(config.loss)
  gradients = jax.jit(
    lambda images, labels, key: train_step.compute_gradients(
      model, kwargs, host_state.params, host_state.batch_stats, images, labels, key
    )
  )
  rows = lambda d: slice(4 * d, 4 * (d + 1))  # device d's P·K = 4 rows of the flat batch
  results = [
    gradients(
      batch['image'][rows(d)], batch['label'][rows(d)], train_step.step_dropout_key(host_state, d)
    )
    for d in range(4)
  ]
  mean = lambda trees: jax.tree.map(lambda *x: sum(x) / len(x), *trees)
  grads = mean([r[3] for r in results])
  updates, _ = tx.update(grads, host_state.opt_state, host_state.params)
  expected_params = optax.apply_updates(host_state.params, updates)
  expected_stats = mean([r[2] for r in results])
  chex_close = lambda a, b: jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b
  )
  chex_close(jax.device_get(new_state.params), expected_params)
  chex_close(jax.device_get(new_state.batch_stats), expected_stats)
  # Per-device semantics matter: the devices' gradients really differ.
  first, second = jax.tree.leaves(results[0][3]), jax.tree.leaves(results[1][3])
  assert any(not np.allclose(a, b) for a, b in zip(first, second))


def test_synced_batchnorm_equals_one_device_on_the_whole_batch(tiny_data_dir):
  config = tiny_config(tiny_data_dir, **{'model.gcn': 'none'})
  mesh = sharding.make_mesh()
  synced = build_model(config.model, NUM_CLASSES, sync_bn=True)
  single = build_model(config.model, NUM_CLASSES, sync_bn=False)
  variables = single.init(jax.random.key(0), jnp.zeros((2, 64, 32, 3)), train=False)
  batch = random_batch(2)

  def train_forward(model, images):
    out, updates = model.apply(
      variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)}
    )
    return out['embedding'], updates['batch_stats']

  spec = jax.sharding.PartitionSpec

  def device_forward(images):  # per device: embeddings of its rows, its copy of the stats
    embedding, stats = train_forward(synced, images)
    return embedding, jax.tree.map(lambda t: t[None], stats)

  sharded = jax.jit(
    jax.shard_map(
      device_forward, mesh=mesh, in_specs=spec(sharding.AXIS), out_specs=spec(sharding.AXIS)
    )
  )
  images = sharding.global_batch({'image': batch['image']}, mesh)['image']
  emb_multi, stats_multi = sharded(images)
  emb_single, stats_single = jax.jit(lambda x: train_forward(single, x))(batch['image'])
  np.testing.assert_allclose(np.asarray(emb_multi), emb_single, rtol=1e-4, atol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5),
    jax.device_get(stats_multi),
    stats_single,
  )


def test_one_step_leaves_the_official_batchnorm_running_averages(tiny_data_dir):
  """The running averages after one step, recomputed in numpy from the official sequence.

  Official: every backbone BN updates once; the embedding BN updates with the
  individual batch, then with f_0 and with f_1 (each the B^2 pair embeddings);
  every update uses the unbiased variance and PyTorch's momentum 0.1.
  """
  config = tiny_config(tiny_data_dir)
  mesh, model, tx, schedule, host_state, _ = setup_step(config, 1)
  rng = np.random.default_rng(3)  # a known, non-trivial starting state
  stats = jax.tree.map(
    lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), host_state.batch_stats
  )
  host_state = host_state.replace(batch_stats=stats)
  state = sharding.replicate(jax.tree.map(np.array, host_state), mesh)
  batch = random_batch(4, devices=1)
  step = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
  new_stats = jax.device_get(step(state, sharding.global_batch(batch, mesh))[0].batch_stats)

  # The values each BN saw in that step (dropout does not touch them).
  variables = {'params': host_state.params, 'batch_stats': stats}
  out = jax.jit(
    lambda x: model.apply(
      variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
    )[0]
  )(batch['image'])
  individual = np.asarray(out['pre_bn'], np.float64)
  pairs = np.asarray(out['pair_pre_bn_uv'], np.float64).reshape(-1, individual.shape[-1])
  stem = jax.lax.conv_general_dilated(
    jnp.asarray(batch['image']),
    host_state.params['backbone']['conv1']['kernel'],
    (2, 2),
    ((3, 3), (3, 3)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  stem = np.asarray(stem, np.float64).reshape(-1, stem.shape[-1])

  def official(start, *batches, ddof=1):
    mean, var = (np.asarray(start[k], np.float64) for k in ('mean', 'var'))
    for x in batches:
      mean, var = 0.9 * mean + 0.1 * x.mean(0), 0.9 * var + 0.1 * x.var(0, ddof=ddof)
    return {'mean': mean, 'var': var}

  expected = {
    'embedding_bn': official(stats['embedding_bn'], individual, pairs, pairs),
    'bn1': official(stats['backbone']['bn1'], stem),
  }
  got = {'embedding_bn': new_stats['embedding_bn'], 'bn1': new_stats['backbone']['bn1']}
  for name in expected:
    for key in ('mean', 'var'):
      np.testing.assert_allclose(
        got[name][key], expected[name][key], rtol=1e-5, atol=1e-6, err_msg=f'{name}.{key}'
      )
  # The check can tell: two biased updates (flax's BatchNorm, our former head) are far off.
  former = official(stats['embedding_bn'], individual, pairs, ddof=0)['var']
  assert np.abs(former - expected['embedding_bn']['var']).max() > 1e-3


def final_params(workdir):
  step, state, _ = checkpoint.read_checkpoint(workdir)
  return step, state['params']


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoint(tiny_data_dir, tmp_path, capsys):
  """The error is the last line, after the progress bar is closed; exit code 1 (the run failed)."""
  workdir = str(tmp_path / 'nan')
  overrides = {
    'data.data_dir': tiny_data_dir,
    'optim.lr_per_16': 1e30,
    'optim.warmup_epochs': 0,
    'train.checkpoint_every': 1,
    'train.eval_every_epochs': 0,
  }
  args = ['--config', os.path.join(ROOT, 'configs/tiny.py'), '--workdir', workdir]
  assert run_tool(train_tool, args + [f'--config.{k}={v}' for k, v in overrides.items()]) == 1
  err = capsys.readouterr().err
  last = err.rstrip('\n').split('\n')[-1]
  assert re.fullmatch(r'error: non-finite \w+=\S+ at step \d+; training stopped, .*', last), err
  bad_step = int(last.split(' at step ')[1].split(';')[0])
  saved = final_params(workdir)
  assert saved[0] == bad_step - 1 and f'(step {bad_step - 1}) is kept' in last
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved[1]))


def test_unknown_config_field_lists_valid_ones(tmp_path):
  process = run_train_cli(
    ['--config', 'configs/tiny.py', '--workdir', str(tmp_path), '--config.optim.lr=1']
  )
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 2
  assert "unknown config field 'optim.lr'" in stderr and 'lr_per_16' in stderr


def test_impossible_batch_split_is_a_config_error(tiny_data_dir, tmp_path):
  with pytest.raises(ConfigError, match='data.p=10'):
    train_lib.train_and_evaluate(tiny_config(tiny_data_dir, **{'data.p': 10}), str(tmp_path))
  with pytest.raises(ConfigError, match='data.k=1'):
    train_lib.train_and_evaluate(tiny_config(tiny_data_dir, **{'data.k': 1}), str(tmp_path))
  assert not glob.glob(str(tmp_path / 'checkpoints' / '*'))


def test_final_evaluation_can_be_switched_off(tiny_data_dir, tmp_path):
  config = tiny_config(
    tiny_data_dir,
    **{'train.num_steps': 2, 'train.eval_at_end': False, 'train.eval_every_epochs': 0},
  )
  assert train_lib.train_and_evaluate(config, str(tmp_path)) is None
  assert final_params(str(tmp_path))[0] == 2
  assert not os.path.exists(tmp_path / 'results.json')
  assert not glob.glob(str(tmp_path / '*.png'))


def test_unknown_sampler_and_erasing_fill_are_config_errors(tiny_data_dir, tmp_path):
  for field, value in (
    ('data.sampler', 'random'),
    ('data.erasing_fill', 'grey'),
    ('data.min_images_per_id', 0),
  ):
    with pytest.raises(ConfigError, match=f'{field}='):
      train_lib.train_and_evaluate(tiny_config(tiny_data_dir, **{field: value}), str(tmp_path))
  # Identities below min_images_per_id leave training: none of tiny's has 7 images.
  with pytest.raises(ConfigError, match='min_images_per_id=7'):
    train_lib.train_and_evaluate(
      tiny_config(tiny_data_dir, **{'data.min_images_per_id': 7}), str(tmp_path)
    )
  assert not glob.glob(str(tmp_path / 'checkpoints' / '*'))


CONFIG_ARGS = (
  [
    ('default.py', None),
    ('market.py', None),
    ('duke.py', None),
    ('msmt17.py', None),
    ('occluded_duke.py', None),
    ('synthetic.py', None),
    ('synthetic_pairs.py', None),
    ('tiny.py', None),
    ('ablations/paper.py', 'market1501'),
  ]
  + [
    ('ablations/table1.py', v)
    for v in ('individual', 'individual_gcn', 'normal_gcn', 'discrepancy_gcn')
  ]
  + [('ablations/table2.py', v) for v in table2.ADJACENCIES]
  + [('ablations/table3.py', v) for v in ('1.0', '0.95', '0.6')]
)


@pytest.mark.parametrize('path,arg', CONFIG_ARGS)
def test_every_config_loads_and_builds_its_model(path, arg):
  spec = importlib.util.spec_from_file_location(
    'config_under_test', os.path.join(ROOT, 'configs', path)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  assert config.data.dataset and config.optim.epochs > 0
  config_check.check_values(config)  # every shipped config passes the rules
  model = build_model(config.model, num_classes=5)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((2, 64, 32, 3)), train=False)
  )
  assert 'params' in shapes
  with pytest.raises(AttributeError):
    config.optim.no_such_field = 1  # locked: typos fail loudly


def test_bfloat16_compute_keeps_float32_parameters(tiny_data_dir):
  config = tiny_config(tiny_data_dir, **{'model.dtype': 'bfloat16'})
  mesh, model, tx, schedule, _, state = setup_step(config, 4)
  step = train_step.make_train_step(model, tx, schedule, config.loss, mesh)
  state, metrics = step(state, sharding.global_batch(random_batch(3), mesh))
  assert np.isfinite(float(metrics['loss']))
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
  fmap = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    jnp.zeros((2, 64, 32, 3)),
    train=False,
  )['fmap']
  assert fmap.dtype == jnp.bfloat16


def test_unknown_dtype_is_a_config_error(tiny_data_dir):
  with pytest.raises(ConfigError, match="model.dtype='float16'"):
    build_model(tiny_config(tiny_data_dir, **{'model.dtype': 'float16'}).model, 5)


def test_pair_lr_scale_multiplies_only_the_alignment_and_gcn_updates(tiny_data_dir):
  """`optim.pair_lr_scale` scales the steps of pair_attention and pair_graph, nothing else."""
  config = tiny_config(tiny_data_dir, **{'model.adjacency': 'raw_correspondence'})
  model = build_model(config.model, NUM_CLASSES)
  params = train_step.init_state(model, optax.identity(), config.data.image_size, 0).params
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
  steps = {}
  for scale in (1.0, 10.0):
    config.optim.pair_lr_scale = scale
    tx, _ = train_step.create_optimizer(config, steps_per_epoch=3, global_batch=4)
    state = tx.init(params)
    for _ in range(3):  # past the first step, whose warm-up learning rate is 0
      updates, state = tx.update(grads, state, params)
    steps[scale] = updates
  flat = lambda tree: {
    jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }
  base, scaled = flat(steps[1.0]), flat(steps[10.0])
  assert any('pair_graph' in name for name in base) and any(
    'pair_attention' in name for name in base
  )
  for name, update in base.items():
    factor = 10.0 if name.startswith(("['pair_attention']", "['pair_graph']")) else 1.0
    assert np.abs(update).max() > 0, name
    np.testing.assert_allclose(scaled[name], factor * update, rtol=1e-5, err_msg=name)
  # The official recipe's optimizer state keeps its form (checkpoints stay compatible).
  config.optim.pair_lr_scale = 1.0
  tx, _ = train_step.create_optimizer(config, steps_per_epoch=3, global_batch=4)
  assert len(tx.init(params)) == 2


def test_gcn_output_init_scales_o_and_zero_is_the_official_zeros(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  kernels = {}
  for scale in (0.0, 1.0, 3.0):
    config.model.gcn_output_init = scale
    model = build_model(config.model, NUM_CLASSES)
    params = train_step.init_state(model, optax.identity(), config.data.image_size, 0).params
    kernels[scale] = np.asarray(params['pair_graph']['o']['kernel'])
  assert not kernels[0.0].any()
  fan_in = kernels[1.0].shape[2]
  assert np.std(kernels[1.0]) == pytest.approx(1 / np.sqrt(fan_in), rel=0.2)
  np.testing.assert_allclose(kernels[3.0], 3 * kernels[1.0], rtol=1e-5)

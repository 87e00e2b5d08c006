"""Losses against hand-computed cases."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cace_jax.models import losses

LABELS = jnp.array([0, 0, 1, 1])


def test_label_smoothed_cross_entropy_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  labels = jnp.array([0, 2])
  log_z = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(2 + math.e)]
  log_p = [[2 - log_z[0], -log_z[0], -1 - log_z[0]], [-log_z[1], 1 - log_z[1], -log_z[1]]]
  eps, k = 0.1, 3
  expected = np.mean(
    [
      -sum(((1 - eps) * (c == y) + eps / k) * lp for c, lp in enumerate(row))
      for y, row in zip([0, 2], log_p)
    ]
  )
  np.testing.assert_allclose(
    losses.label_smoothed_cross_entropy(logits, labels), expected, rtol=1e-6
  )
  plain = np.mean([-log_p[0][0], -log_p[1][2]])
  np.testing.assert_allclose(
    losses.label_smoothed_cross_entropy(logits, labels, 0.0), plain, rtol=1e-6
  )


POINTS = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, 5.0]])
# distances: d01 = 3, d02 = 4, d03 = 5, d12 = 5, d13 = sqrt(34), d23 = 1
# hardest (positive, negative) per anchor: (3, 4), (3, 5), (1, 4), (1, 5)


def test_batch_hard_triplet_by_hand():
  loss = losses.triplet_loss(POINTS, LABELS, margin=2.0, normalize=False)
  np.testing.assert_allclose(loss, (1.0 + 0.0 + 0.0 + 0.0) / 4, rtol=1e-5)
  loss = losses.triplet_loss(POINTS, LABELS, margin=5.0, normalize=False)
  np.testing.assert_allclose(loss, (4.0 + 3.0 + 2.0 + 1.0) / 4, rtol=1e-5)


def test_soft_margin_triplet_by_hand():
  expected = np.mean([math.log1p(math.exp(d)) for d in (-1.0, -2.0, -3.0, -4.0)])
  np.testing.assert_allclose(
    losses.triplet_loss(POINTS, LABELS, margin=0.0, normalize=False), expected, rtol=1e-5
  )


def test_triplet_normalises_features_by_default():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
  unit = x / jnp.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(
    losses.triplet_loss(3.0 * x, LABELS),
    losses.triplet_loss(unit, LABELS, normalize=False),
    rtol=1e-5,
  )


def test_triplet_gradient_is_finite_for_duplicate_features():
  x = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  grad = jax.jit(jax.grad(losses.triplet_loss))(x, LABELS)
  assert np.isfinite(np.asarray(grad)).all()


def test_mixup_cross_entropy_by_hand():
  # B = 2, K = 2; logits of f(u|v) at [u, v].
  logits = jnp.array([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [3.0, 1.0]]])
  labels = jnp.array([0, 1])
  ce = lambda row, y: -(row[y] - np.log(np.exp(row).sum()))
  alpha = 0.9
  expected = np.mean(
    [
      alpha * ce(np.asarray(logits[u, v]), int(labels[u]))
      + (1 - alpha) * ce(np.asarray(logits[u, v]), int(labels[v]))
      for u in range(2)
      for v in range(2)
    ]
  )
  np.testing.assert_allclose(losses.mixup_cross_entropy(logits, labels, alpha), expected, rtol=1e-6)


def test_mixup_with_alpha_one_is_cross_entropy_on_the_conditioned_image():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 5)), jnp.float32)
  labels = jnp.array([0, 3, 1, 3])
  rows = logits.reshape(16, 5)
  first = jnp.repeat(labels, 4)  # pair k = u * 4 + v is labelled y_u
  np.testing.assert_allclose(
    losses.mixup_cross_entropy(logits, labels, alpha=1.0),
    losses.label_smoothed_cross_entropy(rows, first, 0.0),
    rtol=1e-6,
  )
  second = jnp.tile(labels, 4)
  np.testing.assert_allclose(
    losses.mixup_cross_entropy(logits, labels, alpha=0.0),
    losses.label_smoothed_cross_entropy(rows, second, 0.0),
    rtol=1e-6,
  )


def test_pair_triplet_by_hand():
  d = np.array(
    [[0.0, 1.0, 3.0, 4.0], [1.0, 0.0, 2.0, 5.0], [3.0, 2.0, 0.0, 1.5], [4.0, 5.0, 1.5, 0.0]]
  )
  uv = jnp.zeros((4, 4, 3))
  vu = jnp.zeros((4, 4, 3)).at[..., 0].set(d)
  loss = losses.pair_triplet_loss(uv, vu, LABELS, margin=2.5, normalize=False)
  # hardest (pos, neg) per row: (1, 3), (1, 2), (1.5, 2), (1.5, 4)
  np.testing.assert_allclose(loss, (0.5 + 1.5 + 2.0 + 0.0) / 4, rtol=1e-5)


def fake_outputs(seed=0, batch=4, dim=6, classes=5):
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  uv = arr(batch, batch, dim)
  return {
    'embedding': arr(batch, dim),
    'logits': arr(batch, classes),
    'pair_embedding_uv': uv,
    'pair_embedding_vu': jnp.swapaxes(uv, 0, 1),
    'pair_logits_uv': arr(batch, batch, classes),
    'pair_logits_vu': arr(batch, batch, classes),
  }


def test_total_loss_sums_named_parts():
  outputs = fake_outputs()
  total, parts = jax.jit(losses.total_loss)(outputs, LABELS)
  assert set(parts) == {'id', 'triplet', 'mixup_uv', 'mixup_vu', 'pair_triplet'}
  np.testing.assert_allclose(total, sum(parts.values()), rtol=1e-6)
  np.testing.assert_allclose(
    parts['mixup_vu'],
    losses.mixup_cross_entropy(jnp.swapaxes(outputs['pair_logits_vu'], 0, 1), LABELS, 0.9),
    rtol=1e-6,
  )
  weighted, _ = jax.jit(
    functools.partial(losses.total_loss, weights={'pair_triplet': 0.0, 'id': 2.0})
  )(outputs, LABELS)
  np.testing.assert_allclose(weighted, total - parts['pair_triplet'] + parts['id'], rtol=1e-5)


def test_total_loss_without_pair_stage():
  outputs = {k: v for k, v in fake_outputs().items() if not k.startswith('pair')}
  total, parts = losses.total_loss(outputs, LABELS, margin=0.3, rectified_triplets=False)
  assert set(parts) == {'id', 'triplet'}
  np.testing.assert_allclose(
    parts['triplet'], losses.triplet_loss(outputs['embedding'], LABELS, 0.3), rtol=1e-6
  )


def test_official_head_rectifies_what_its_triplets_see():
  """The official fc_layer's ReLU(inplace=True) rewrites the embedding that compute_loss reads."""
  import torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  embedding_layer = torch.nn.Sequential(
    torch.nn.Conv2d(3, 6, 1, bias=False), torch.nn.BatchNorm2d(6)
  )
  fc_layer = torch.nn.Sequential(
    torch.nn.ReLU(inplace=True), torch.nn.Dropout(), torch.nn.Linear(6, 5, bias=False)
  )
  f = embedding_layer(torch.randn(4, 3, 1, 1)).squeeze(dim=3).squeeze(dim=2)  # official head()
  before = f.detach().numpy().copy()
  assert before.min() < 0
  fc_layer(f)  # the official forward: logit = self.fc_layer(f); then returns f
  np.testing.assert_array_equal(f.detach().numpy(), np.maximum(before, 0.0))

  outputs = fake_outputs()
  _, parts = losses.total_loss(outputs, LABELS)  # default: rectified, as the official code
  relu = lambda x: jnp.maximum(x, 0.0)
  np.testing.assert_allclose(
    parts['triplet'], losses.triplet_loss(relu(outputs['embedding']), LABELS, 0.5), rtol=1e-6
  )
  pair = losses.pair_triplet_loss(
    relu(outputs['pair_embedding_uv']), relu(outputs['pair_embedding_vu']), LABELS, 0.5
  )
  np.testing.assert_allclose(parts['pair_triplet'], pair, rtol=1e-6)
  _, raw = losses.total_loss(outputs, LABELS, rectified_triplets=False)
  assert abs(float(raw['triplet'] - parts['triplet'])) > 1e-3


@pytest.mark.parametrize('fn', [losses.triplet_loss, losses.label_smoothed_cross_entropy])
def test_losses_jit(fn):
  args = (
    (POINTS, LABELS) if fn is losses.triplet_loss else (jnp.ones((4, 3)), jnp.array([0, 1, 2, 0]))
  )
  np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6)


def test_a_registered_loss_part_joins_the_sum_with_its_weight():
  outputs = fake_outputs()
  base, _ = losses.total_loss(outputs, LABELS)

  @losses.register_loss('embedding_norm', needs=('embedding', 'pair_cross'))
  def embedding_norm(outputs, labels, settings):
    return jnp.mean(outputs['embedding'] ** 2) * settings['margin']

  try:
    _, without_input = losses.total_loss(outputs, LABELS)  # no 'pair_cross': not computed
    assert 'embedding_norm' not in without_input
    outputs['pair_cross'] = jnp.zeros((4, 4, 2, 2))
    total, parts = losses.total_loss(outputs, LABELS, margin=0.5, weights={'embedding_norm': 3.0})
    expected = jnp.mean(outputs['embedding'] ** 2) * 0.5
    np.testing.assert_allclose(parts['embedding_norm'], expected, rtol=1e-6)
    np.testing.assert_allclose(total, base + 3.0 * expected, rtol=1e-5)
    assert list(parts)[-1] == 'embedding_norm'  # summed after the built-in parts
    with pytest.raises(ValueError, match='already registered'):
      losses.register_loss('embedding_norm', needs=())(embedding_norm)
  finally:
    del losses.LOSS_PARTS['embedding_norm']


def test_a_weight_for_a_part_that_is_never_computed_is_a_config_error():
  from cace_jax.commands import config_check  # pylint: disable=import-outside-toplevel
  from cace_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  with config.unlocked():  # how a config file adds a weight (the command line cannot)
    config.loss.weights.pair_tripet = 1.0  # a typo of pair_triplet
  with pytest.raises(ConfigError, match='loss.weights.pair_tripet: no loss part of that name'):
    config_check.check_values(config)

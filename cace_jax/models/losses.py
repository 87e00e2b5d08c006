"""CACE-Net losses: label-smoothed CE, batch-hard triplet, mix-up ID loss, pair triplet.

The training loss is a sum of registered parts (`register_loss`), each with
its weight in `config.loss.weights`; a plugin may register more (a penalty
on the adjacency, say: the model outputs its blocks, 'pair_intra' and
'pair_cross').

All functions are pure jnp and return scalars averaged over the batch (or
over the B^2 ordered pairs). Pair tensors follow the model's convention:
entry [u, v] of `pair_embedding_uv` / `pair_logits_uv` belongs to f(u|v),
entry [u, v] of `pair_embedding_vu` / `pair_logits_vu` to f(v|u).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from cace_jax.models.layers import l2_normalize


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example cross entropy with torchreid-style label smoothing.

  The target is (1 - eps) * onehot + eps / K (CrossEntropyLabelSmooth).

  Args:
    logits: [..., K].
    labels: [...] integer class ids.
    label_smoothing: eps.

  Returns:
    [...] losses.
  """
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = jax.nn.one_hot(labels, num_classes, dtype=log_probs.dtype)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  return -jnp.sum(targets * log_probs, axis=-1)


def label_smoothed_cross_entropy(logits, labels, epsilon: float = 0.1):
  """Mean label-smoothed CE: logits [B, K], labels [B] -> scalar."""
  return jnp.mean(cross_entropy(logits, labels, epsilon))


def euclidean_distances(x, y):
  """Pairwise distances [N, D] x [M, D] -> [N, M]: sqrt(clamp(d^2, 1e-12)) as open-reid."""
  squared = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * x @ y.T
  return jnp.sqrt(jnp.maximum(squared, 1e-12))


def hardest_distances(dist, same):
  """Batch-hard mining: per row, the largest positive and the smallest negative distance.

  Args:
    dist: [N, M] distances.
    same: [N, M] True where the pair shares a label (positives).

  Returns:
    (d_ap [N], d_an [N]). Rows without negatives get d_an = +inf (zero hinge).
  """
  d_ap = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  d_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  return d_ap, d_an


def ranking_loss(d_ap, d_an, margin: float):
  """mean relu(d_ap - d_an + margin); soft margin mean log(1 + exp(d_ap - d_an)) if margin <= 0."""
  if margin > 0:
    return jnp.mean(jax.nn.relu(d_ap - d_an + margin))
  return jnp.mean(jax.nn.softplus(d_ap - d_an))


def triplet_loss(embeddings, labels, margin: float = 0.5, normalize: bool = True):
  """Batch-hard triplet loss (Hermans et al.) on (L2-normalised) embeddings.

  Args:
    embeddings: [B, E].
    labels: [B] identity ids.
    margin: hinge margin; <= 0 selects the soft margin.
    normalize: L2-normalise embeddings first (the official setting).

  Returns:
    scalar.
  """
  if normalize:
    embeddings = l2_normalize(embeddings)
  dist = euclidean_distances(embeddings, embeddings)
  d_ap, d_an = hardest_distances(dist, labels[:, None] == labels[None, :])
  return ranking_loss(d_ap, d_an, margin)


def mixup_cross_entropy(pair_logits, labels, alpha: float = 0.9, label_smoothing: float = 0.0):
  """Mix-up ID loss (paper eq. 8) for conditional logits, averaged over B^2 pairs.

  Entry [u, v] classifies f(u|v) and is charged
  alpha * CE(y_u) + (1 - alpha) * CE(y_v). For f(v|u) logits indexed [u, v],
  pass `jnp.swapaxes(pair_logits_vu, 0, 1)`. The official code uses plain CE here.

  Args:
    pair_logits: [B, B, K].
    labels: [B].
    alpha: weight of the conditioned image's own label.
    label_smoothing: eps of the CE (0 in the official code).

  Returns:
    scalar.
  """
  batch = labels.shape[0]
  own = cross_entropy(
    pair_logits, jnp.broadcast_to(labels[:, None], (batch, batch)), label_smoothing
  )
  other = cross_entropy(
    pair_logits, jnp.broadcast_to(labels[None, :], (batch, batch)), label_smoothing
  )
  return jnp.mean(alpha * own + (1.0 - alpha) * other)


def pair_triplet_loss(
  pair_embedding_uv, pair_embedding_vu, labels, margin: float = 0.5, normalize: bool = True
):
  """Batch-hard triplet over the B x B distances d[u, v] = ||f(u|v) - f(v|u)||.

  Positives of row u are the v with y_v = y_u (hardest: largest distance),
  negatives the others (hardest: smallest). As the official PairTripletLoss,
  the distance is sqrt(||a - b||^2 + 1e-12).

  Args:
    pair_embedding_uv: [B, B, E], [u, v] -> f(u|v).
    pair_embedding_vu: [B, B, E], [u, v] -> f(v|u).
    labels: [B].
    margin: hinge margin; <= 0 selects the soft margin.
    normalize: L2-normalise the embeddings first.

  Returns:
    scalar.
  """
  a, b = pair_embedding_uv, pair_embedding_vu
  if normalize:
    a, b = l2_normalize(a), l2_normalize(b)
  dist = jnp.sqrt(jnp.sum(jnp.square(a - b), axis=-1) + 1e-12)
  d_ap, d_an = hardest_distances(dist, labels[:, None] == labels[None, :])
  return ranking_loss(d_ap, d_an, margin)


@dataclasses.dataclass(frozen=True)
class LossPart:
  """A registered loss part.

  Attributes:
    name: its name in `total_loss`'s parts and in `config.loss.weights`.
    fn: (outputs, labels, settings) -> scalar; `settings` holds the scalar
      fields of `config.loss` (label_smoothing, margin, pair_margin, alpha,
      rectified_triplets).
    needs: the model outputs it reads; the part is computed when all are
      present (pair parts are skipped for a model without a pair stage).
  """

  name: str
  fn: Callable
  needs: tuple[str, ...]


LOSS_PARTS: dict[str, LossPart] = {}


def register_loss(name: str, *, needs: tuple[str, ...]):
  """Decorator: registers `fn(outputs, labels, settings) -> scalar` as the loss part `name`.

  Its weight is `config.loss.weights.<name>` (1 when the config has none;
  a config file adds the field inside `with config.unlocked():`, and the
  command line can then set it). Parts are summed in registration order.
  Example (a penalty on the cross-image adjacency):

      @register_loss('cross_density', needs=('pair_cross',))
      def cross_density(outputs, labels, settings):
        return outputs['pair_cross'].mean()
  """
  if name in LOSS_PARTS:
    raise ValueError(f'loss part {name!r} is already registered')

  def register(fn: Callable) -> Callable:
    LOSS_PARTS[name] = LossPart(name, fn, tuple(needs))
    return fn

  return register


def loss_names() -> tuple[str, ...]:
  """Every registered loss part (what `config.loss.weights` may name)."""
  return tuple(LOSS_PARTS)


def rectified(settings, x):
  """What the triplets see: ReLU(x) by default, as the official ones do (see `total_loss`)."""
  return jax.nn.relu(x) if settings['rectified_triplets'] else x


@register_loss('id', needs=('logits',))
def id_loss(outputs, labels, settings):
  """The official cls_loss: label-smoothed CE of the individual classifier."""
  return label_smoothed_cross_entropy(outputs['logits'], labels, settings['label_smoothing'])


@register_loss('triplet', needs=('embedding',))
def individual_triplet(outputs, labels, settings):
  """The official tri_loss: batch-hard triplet on the individual embeddings."""
  return triplet_loss(rectified(settings, outputs['embedding']), labels, settings['margin'])


@register_loss('mixup_uv', needs=('pair_logits_uv',))
def mixup_uv(outputs, labels, settings):
  """The official mixup_loss_0: eq. 8 on the pair classifier's f(u|v) logits."""
  return mixup_cross_entropy(outputs['pair_logits_uv'], labels, settings['alpha'])


@register_loss('mixup_vu', needs=('pair_logits_vu',))
def mixup_vu(outputs, labels, settings):
  """The official mixup_loss_1: eq. 8 on f(v|u), indexed by v first."""
  return mixup_cross_entropy(
    jnp.swapaxes(outputs['pair_logits_vu'], 0, 1), labels, settings['alpha']
  )


@register_loss('pair_triplet', needs=('pair_embedding_uv', 'pair_embedding_vu'))
def pair_triplet(outputs, labels, settings):
  """The official pair_tri_loss: the triplet on the distances of f(u|v) and f(v|u)."""
  return pair_triplet_loss(
    rectified(settings, outputs['pair_embedding_uv']),
    rectified(settings, outputs['pair_embedding_vu']),
    labels,
    settings['pair_margin'],
  )


def total_loss(
  outputs: Mapping[str, jnp.ndarray],
  labels,
  *,
  label_smoothing: float = 0.1,
  margin: float = 0.5,
  alpha: float = 0.9,
  pair_margin: float | None = None,
  weights: Mapping[str, float] | None = None,
  rectified_triplets: bool = True,
):
  """Weighted sum of the registered loss parts whose inputs are in `outputs`.

  Built-in parts (official names in brackets): 'id' (cls_loss)
  label-smoothed CE on 'logits'; 'triplet' (tri_loss) on 'embedding';
  'mixup_uv' and 'mixup_vu' (mixup_loss_0/1) on 'pair_logits_uv' /
  'pair_logits_vu'; 'pair_triplet' (pair_tri_loss) on the pair embeddings.
  Pair parts are skipped when the model has no pair stage.

  Both triplets see ReLU(embedding) by default, as the official ones do: its
  classifiers start with `nn.ReLU(inplace=True)`, which rectifies the BN
  output in place before `compute_loss` reads it. Evaluation uses the
  embedding before the ReLU in both codes.

  Args:
    outputs: model outputs.
    labels: [B] identity ids.
    label_smoothing: eps of the individual CE.
    margin: triplet margin (<= 0: soft margin).
    alpha: mix-up weight.
    pair_margin: margin of the pair triplet (default: `margin`).
    weights: optional per-part multipliers (default 1).
    rectified_triplets: apply the triplets to ReLU(embedding) (official).

  Returns:
    (total scalar, {part name: scalar}).
  """
  settings = {
    'label_smoothing': label_smoothing,
    'margin': margin,
    'pair_margin': margin if pair_margin is None else pair_margin,
    'alpha': alpha,
    'rectified_triplets': rectified_triplets,
  }
  parts = {
    part.name: part.fn(outputs, labels, settings)
    for part in LOSS_PARTS.values()
    if all(name in outputs for name in part.needs)
  }
  weights = weights or {}
  total = sum(weights.get(name, 1.0) * value for name, value in parts.items())
  return total, parts

"""CACE-Net: backbone, shared pooling/embedding head, classifiers and the pair stage.

`CACENet(images, train)` returns one dict (no `(logits, out)` tuple: every
loss reads several entries, so a single flat dict keeps call sites uniform):

  'fmap'               [B, h, w, C]  backbone feature maps
  'pooled'             [B, P]        pooled maps (P = C, or 2C for 'avgmax')
  'pre_bn'             [B, E]        1x1 embedding before BN
  'embedding'          [B, E]        individual embedding f(u) (after BN)
  'logits'             [B, K]        individual classifier        (num_classes set)
  'pair_pre_bn_uv'     [B, B, E]     [u, v] -> f(u|v) before BN    (gcn != 'none')
  'pair_pre_bn_vu'     [B, B, E]     [u, v] -> f(v|u) before BN
  'pair_embedding_uv'  [B, B, E]     [u, v] -> f(u|v)
  'pair_embedding_vu'  [B, B, E]     [u, v] -> f(v|u)  (= pair_embedding_uv transposed)
  'pair_logits_uv'     [B, B, K]     pair classifier on f(u|v)
  'pair_logits_vu'     [B, B, K]     pair classifier on f(v|u) (its own dropout mask)
  'pair_intra'         [B, n, n]     each image's intra block A_uu of the adjacency
  'pair_cross'         [B, B, n, n]  [u, v] -> the cross block A_uv (A_vu is [v, u])

The adjacency's blocks are there for losses on A (`losses.register_loss`)
and diagnostics; when nothing reads them XLA does not compute them. The
conditional maps themselves are never outputs of training (B^2 of them);
`pair_features` returns them for given pairs.

The pair stage ('fast', the default) never builds a C-wide map per pair.
Per image, `compute_image_cache` computes once the adjacency keys and intra
block (`ClueAttention.image_keys`), the GCN projections g_l(X) (C/16 wide) and,
for average pooling, the pooled map. Per ordered pair (u, v) a nested vmap
builds the n x n cross block and propagates C/16-wide features
(`propagate_pair`). With average pooling everything after the Laplacian
product is linear, so

    pool_u(X + F g(X) o) = pool_u(X) + (F 1_u / n)^T g(X) o

and a pair costs one n x n cross block plus matrix-vector products; o, the
1x1 embedding and (eval) BN then act on vectors. GeM and avg||max pooling are
not linear: the pair's conditional map X_u + H_u o [n, C] is built, pooled and
dropped inside `lax.map` over u (one row of B pairs per step, under
`jax.checkpoint`), so peak memory is `pair_block * B * n * C` floats, not
B^2 * n * C. Only u's half of each pair graph is read out; f(v|u) is entry
[v, u]. `pair_path='direct'` is the materialised reference: it gathers every
pair's [2n, C] nodes, builds the dense 2n x 2n adjacency and F, and runs the
GCN on C-wide maps (tests prove the two agree in values and gradients).

For evaluation: `compute_image_cache(fmap)` (per image, cacheable),
`embed_cached_pairs(cache_u, cache_v)` (fast f(u|v), f(v|u) of N pairs),
`embed_cache(cache)` (f(u) from the cache) and
`pair_features(fmap_u, fmap_v)` (adjacency, conditional maps and embeddings
of N pairs, materialised, for re-ranking checks and heatmaps); call them with
`model.apply(variables, ..., method=CACENet.<name>)`.

BatchNorm of pair embeddings: the one `embedding_bn` is shared, and a
training step updates its running averages three times, as the official
head does: with the B individual embeddings, then with f_0 and with f_1,
its two halves of the B^2 pair embeddings. The two halves are the same
multiset ({f(u|v)} over all ordered pairs is also {f(v|u)}), so they have the
same statistics; the fast path normalises the B^2 pair embeddings in one call
that counts as two updates (`BatchNorm(updates=2)`), the direct path makes
the two calls. With momentum 0.9 a step moves the averages by
0.081 * (individual statistics) + 0.19 * (pair statistics), so individual
batches make about 30% of them; evaluation of individual features uses these
averages, as the official code's does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cace_jax.models.attention import ClueAttention, cross_block, get_adjacency
from cace_jax.models.gcn import (
  NO_GCN,
  DenseGraph,
  PairBlocks,
  PairGCN,
  get_operator,
  propagate_pair,
)
from cace_jax.models.layers import BatchNorm, Conv1x1, l2_normalize
from cace_jax.models.pooling import POOLINGS, GeM, pool_nodes
from cace_jax.models.resnet import make_resnet, output_channels
from cace_jax.sharding import AXIS

PAIR_PATHS = ('fast', 'direct')


class CACENet(nn.Module):
  """CACE-Net (see module docstring for outputs and the pair stage).

  Attributes:
    depth, width, last_stride, non_local: backbone (`resnet.make_resnet`).
    pooling: 'avg' (the paper), 'gem' (official code) or 'avgmax'.
    embed_dim: E, width of the 1x1 embedding (768).
    num_classes: identities for the classifiers; None builds no classifier.
    adjacency: a registered adjacency (`attention.ADJACENCIES`; 'projected' is
      the official one).
    topk: neighbours for adjacency 'topk'.
    gcn: a registered graph operator (`gcn.OPERATORS`: 'discrepancy', 'normal',
      yours) or 'none' (no pair stage at all).
    gcn_depth: stacked GCN layers.
    reduction: C / width of y, g and o (16).
    pair_path: 'fast' or 'direct' (materialised reference, in training and in
      evaluation: slower, and what a new graph variant can be tried on first).
    pair_block: rows u per `lax.map` step for GeM/avg||max pair pooling (None: 1;
      B: all B^2 conditional maps at once).
    dropout_rate: dropout before both classifiers.
    intra_init: initial value of the correspondence attention's intra-image
      diagonal W (`ClueAttention.intra_init`; 1 as officially).
    gcn_output_init: initial scale of the GCN's output convs o, relative to
      LeCun-normal; 0 (the official init) starts them at zero, which also
      zeroes the first gradients of g and of the attention (`PairGCN`).
    dtype: backbone compute dtype; parameters and the head stay float32.
    sync_bn: BatchNorm statistics over all devices of the `data` axis (else
      per device, as PyTorch DDP); only matters in training, under shard_map.
  """

  depth: int | str = 50
  width: int = 64
  last_stride: int = 1
  non_local: bool = True
  pooling: str = 'gem'
  embed_dim: int = 768
  num_classes: int | None = None
  adjacency: str = 'projected'
  topk: int = 1
  gcn: str = 'discrepancy'
  gcn_depth: int = 1
  reduction: int = 16
  pair_path: str = 'fast'
  pair_block: int | None = None
  dropout_rate: float = 0.5
  gcn_output_init: float = 0.0
  intra_init: float = 1.0
  dtype: Any = jnp.float32
  sync_bn: bool = False

  def setup(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f'unknown pooling {self.pooling!r}; expected one of {POOLINGS}')
    if self.pair_path not in PAIR_PATHS:
      raise ValueError(f'unknown pair_path {self.pair_path!r}; expected one of {PAIR_PATHS}')
    channels = output_channels(self.depth, self.width)
    bn_axis_name = AXIS if self.sync_bn else None
    self.backbone = make_resnet(
      self.depth,
      width=self.width,
      last_stride=self.last_stride,
      non_local=self.non_local,
      dtype=self.dtype,
      bn_axis_name=bn_axis_name,
    )
    if self.pooling == 'gem':
      self.gemp = GeM()
    pooled_dim = 2 * channels if self.pooling == 'avgmax' else channels
    self.embedding_conv = Conv1x1(
      pooled_dim,
      self.embed_dim,
      kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    )
    self.embedding_bn = BatchNorm(momentum=0.9, epsilon=1e-5, axis_name=bn_axis_name)
    self.dropout = nn.Dropout(self.dropout_rate)
    if self.num_classes:
      classifier = lambda name: nn.Dense(
        self.num_classes, use_bias=False, kernel_init=nn.initializers.normal(0.001), name=name
      )
      self.classifier = classifier('classifier')
      self.pair_classifier = classifier('pair_classifier')
    if self.pair_stage:
      self.pair_attention = ClueAttention(
        kind=self.adjacency,
        in_features=channels,
        reduction=self.reduction,
        topk=self.topk,
        intra_init=self.intra_init,
        dtype=self.dtype,
      )
      self.pair_graph = PairGCN(
        channels,
        kind=self.gcn,
        depth=self.gcn_depth,
        reduction=self.reduction,
        output_init=self.gcn_output_init,
        dtype=self.dtype,
      )

  @property
  def pair_stage(self) -> bool:
    return self.gcn != NO_GCN

  @property
  def readout_shortcut(self) -> bool:
    """Average pooling of a linear operator: a pair's pooled feature without its map."""
    return self.pooling == 'avg' and self.pair_path == 'fast' and get_operator(self.gcn).linear

  def pair_stage_notes(self) -> list[str]:
    """Where this model's kinds take a slower form than the built-in ones (for the log)."""
    notes = []
    if not self.pair_stage:
      return notes
    if self.pooling == 'avg' and self.pair_path == 'fast' and not get_operator(self.gcn).linear:
      notes.append(
        f"model.gcn={self.gcn!r} is not linear: average pooling builds each pair's "
        'conditional map instead of the readout shortcut (correct, slower)'
      )
    if not get_adjacency(self.adjacency).symmetric:
      notes.append(
        f'model.adjacency={self.adjacency!r} is not symmetric: each pair computes A_vu '
        'as well as A_uv'
      )
    return notes

  @property
  def relative_threshold(self) -> bool:
    """Whether the GCN's isolated-node threshold scales with A (raw-feature adjacencies)."""
    return get_adjacency(self.adjacency).relative_threshold

  def __call__(self, images, train: bool = False):
    """images [B, H, W, 3] -> output dict (module docstring)."""
    fmap, _ = self.backbone(images, train=train)
    return self.heads(fmap, train=train)

  def heads(self, fmap, train: bool = False):
    """Everything after the backbone, from feature maps [B, h, w, C]."""
    batch, height, width, channels = fmap.shape
    nodes = fmap.reshape(batch, height * width, channels).astype(jnp.float32)
    pooled = self.pool(nodes)
    pre_bn, embedding = self.embed(pooled, train)
    out = {'fmap': fmap, 'pooled': pooled, 'pre_bn': pre_bn, 'embedding': embedding}
    if self.num_classes:
      out['logits'] = self.classify(self.classifier, embedding, train)
    if not self.pair_stage:
      return out

    dim = self.embed_dim
    n = height * width
    if self.pair_path == 'fast':
      cache = self.compute_image_cache(fmap)
      pre_uv = self.embedding_conv(self.all_pair_pooled(cache))
      # The adjacency's blocks, for losses and diagnostics (dropped by XLA when unread).
      pair_intra = cache['intra']
      pair_cross = cross_block(
        self.adjacency,
        jnp.broadcast_to(cache['query'][:, None], (batch, *cache['query'].shape)),
        jnp.broadcast_to(cache['key'][None], (batch, *cache['key'].shape)),
        self.topk,
      )
      pre_vu = jnp.swapaxes(pre_uv, 0, 1)
      # f_0 and f_1 of the official head: one call, two running-average updates.
      emb_uv = self.embedding_bn(pre_uv.reshape(-1, dim), use_running_average=not train, updates=2)
      emb_uv = emb_uv.reshape(batch, batch, dim)
      emb_vu = jnp.swapaxes(emb_uv, 0, 1)
    else:
      index_u = jnp.repeat(jnp.arange(batch), batch)  # pair k = u * B + v
      index_v = jnp.tile(jnp.arange(batch), batch)
      cond_u, cond_v, adjacency = self.direct_pairs(nodes[index_u], nodes[index_v])
      pair_intra = adjacency[:: batch + 1, :n, :n]  # pairs (u, u)
      pair_cross = adjacency[:, :n, n:].reshape(batch, batch, n, n)
      pre_uv = self.embedding_conv(self.pool(cond_u)).reshape(batch, batch, dim)
      pre_vu = self.embedding_conv(self.pool(cond_v)).reshape(batch, batch, dim)
      # The official sequence literally: f(v|u) (its f_0), then f(u|v) (its f_1).
      normalise = lambda pre: self.embedding_bn(
        pre.reshape(-1, dim), use_running_average=not train
      ).reshape(batch, batch, dim)
      emb_vu = normalise(pre_vu)
      emb_uv = normalise(pre_uv)
    out.update(
      pair_intra=pair_intra,
      pair_cross=pair_cross,
      pair_pre_bn_uv=pre_uv,
      pair_pre_bn_vu=pre_vu,
      pair_embedding_uv=emb_uv,
      pair_embedding_vu=emb_vu,
    )
    if self.num_classes:
      out['pair_logits_uv'] = self.classify(self.pair_classifier, emb_uv, train)
      out['pair_logits_vu'] = self.classify(self.pair_classifier, emb_vu, train)
    return out

  def features(self, images, flip: bool = False):
    """Eval-mode individual embeddings and backbone maps, without the pair stage.

    Args:
      images: [B, H, W, 3], normalised as the input pipeline does.
      flip: flip test-time augmentation: the embedding becomes the
        renormalised mean of the L2-normalised embeddings of each image and
        its mirror.

    Returns:
      (embedding [B, E], fmap [B, h, w, C]); the map is always the unflipped
      image's (the pair stage's input).
    """
    fmap, _ = self.backbone(images, train=False)
    embedding = self.embed_fmap(fmap)
    if flip:
      mirrored, _ = self.backbone(images[:, :, ::-1], train=False)
      embedding = l2_normalize(l2_normalize(embedding) + l2_normalize(self.embed_fmap(mirrored)))
    return embedding, fmap

  def embed_fmap(self, fmap):
    """Eval-mode individual embeddings [B, E] of feature maps [B, h, w, C]."""
    batch, height, width, channels = fmap.shape
    nodes = fmap.reshape(batch, height * width, channels).astype(jnp.float32)
    return self.embed(self.pool(nodes), train=False)[1]

  def pool(self, nodes):
    """[..., n, C] -> [..., P] with the configured pooling."""
    if self.pooling == 'gem':
      return self.gemp(nodes)
    return pool_nodes(self.pooling, nodes)

  def embed(self, pooled, train: bool = False):
    """Pooled [N, P] -> (pre_bn [N, E], embedding [N, E])."""
    pre_bn = self.embedding_conv(pooled)
    return pre_bn, self.embedding_bn(pre_bn, use_running_average=not train)

  def classify(self, classifier, embedding, train: bool = False):
    """ReLU -> dropout -> bias-free linear (the official fc_layer)."""
    hidden = self.dropout(nn.relu(embedding), deterministic=not train)
    return classifier(hidden)

  def compute_image_cache(self, fmap):
    """Per-image quantities the pair stage needs (cacheable per gallery image).

    Args:
      fmap: [B, h, w, C] backbone feature maps.

    Returns:
      dict of arrays with leading axis B: 'intra' [n, n], 'query'/'key' [n, k]
      (see `ClueAttention.image_keys`), 'g' [L, n, C/16] GCN projections, and
      'pooled' [C] for average pooling or 'nodes' [n, C] (the map) otherwise.
    """
    batch, height, width, channels = fmap.shape
    nodes = fmap.reshape(batch, height * width, channels).astype(jnp.float32)
    cache = dict(self.pair_attention.image_keys(nodes))
    cache['g'] = self.pair_graph.project(nodes)
    if self.readout_shortcut:
      cache['pooled'] = nodes.mean(-2)
    else:  # the map: built into conditional maps (GeM, avg||max) or a dense graph ('direct')
      cache['nodes'] = nodes
    return cache

  def _conditional_pooled_fn(self):
    """Pure per-pair function (cache_u, cache_v) -> pooled f(u|v) before the embedding [P]."""
    o = self.pair_graph.kernels()['o']  # [L, r, C]
    mix = self.pair_graph.mix() if self.gcn_depth > 1 else None
    p = self.gemp.p if self.pooling == 'gem' else None
    adjacency, gcn, pooling, topk = self.adjacency, self.gcn, self.pooling, self.topk
    relative_threshold, shortcut = self.relative_threshold, self.readout_shortcut
    symmetric = get_adjacency(adjacency).symmetric

    def conditional_pooled(cache_u, cache_v):
      cross = cross_block(adjacency, cache_u['query'], cache_v['key'], topk)
      cross_vu = (
        None if symmetric else cross_block(adjacency, cache_v['query'], cache_u['key'], topk)
      )
      blocks = PairBlocks(cache_u['intra'], cache_v['intra'], cross, relative_threshold, cross_vu)
      increments = propagate_pair(gcn, blocks, cache_u['g'], cache_v['g'], mix, pooled=shortcut)
      if shortcut:  # increments: [L, r], already averaged over u's pixels
        return cache_u['pooled'] + jnp.einsum('lr,lrc->c', increments, o)
      nodes = cache_u['nodes'] + jnp.einsum('lnr,lrc->nc', increments, o)  # [n, C]
      return pool_nodes(pooling, nodes, p)

    return conditional_pooled

  def all_pair_pooled(self, cache):
    """Pooled conditional features of all ordered pairs: [B, B, P], [u, v] -> f(u|v)."""
    pair_fn = self._conditional_pooled_fn()
    row = lambda cache_u: jax.vmap(pair_fn, in_axes=(None, 0))(cache_u, cache)
    if self.readout_shortcut:
      return jax.vmap(row)(cache)
    # One row of conditional maps alive at a time; recomputed in the backward pass.
    return jax.lax.map(jax.checkpoint(row), cache, batch_size=self.pair_block)

  def embed_cached_pairs(self, cache_u, cache_v):
    """Eval-mode conditional embeddings of pairs (cache_u[i], cache_v[i]).

    With `pair_path='direct'` the caches hold the maps and each pair graph is
    built densely (`direct_pairs`): the reference path, for prototyping.

    Args:
      cache_u, cache_v: caches from `compute_image_cache` with leading axis N.

    Returns:
      dict with 'embedding_uv' (f(u_i|v_i)) and 'embedding_vu' (f(v_i|u_i)), [N, E].
    """
    if self.pair_path == 'direct':  # the materialised reference, from the cached maps
      cond_u, cond_v, _ = self.direct_pairs(cache_u['nodes'], cache_v['nodes'])
      return {
        'embedding_uv': self.embed(self.pool(cond_u))[1],
        'embedding_vu': self.embed(self.pool(cond_v))[1],
      }
    pair_fn = jax.vmap(self._conditional_pooled_fn())
    _, emb_uv = self.embed(pair_fn(cache_u, cache_v))
    _, emb_vu = self.embed(pair_fn(cache_v, cache_u))
    return {'embedding_uv': emb_uv, 'embedding_vu': emb_vu}

  def embed_cache(self, cache):
    """Eval-mode individual embeddings [N, E] from image caches (of the unflipped images)."""
    pooled = cache['pooled'] if 'pooled' in cache else self.pool(cache['nodes'])
    return self.embed(pooled)[1]

  def direct_pairs(self, nodes_u, nodes_v):
    """Materialised pair graphs: nodes [N, n, C] each -> (cond_u, cond_v, adjacency).

    cond_u, cond_v: [N, n, C] conditional nodes of u and v; adjacency [N, 2n, 2n].
    """
    n = nodes_u.shape[-2]
    adjacency = self.pair_attention(nodes_u, nodes_v)
    graph = DenseGraph(adjacency, self.relative_threshold)
    cond = self.pair_graph(jnp.concatenate([nodes_u, nodes_v], axis=-2), graph)
    return cond[..., :n, :], cond[..., n:, :], adjacency

  def pair_features(self, fmap_u, fmap_v):
    """Everything about pairs (fmap_u[i], fmap_v[i]), for evaluation and heatmaps.

    Eval mode (BN running averages). Args are [N, h, w, C] or a single [h, w, C].

    Returns:
      dict: 'adjacency' [N, 2n, 2n] (u's pixels first, row-major), 'cond_fmap_u'
      and 'cond_fmap_v' [N, h, w, C] conditional maps, 'embedding_uv' = f(u|v)
      and 'embedding_vu' = f(v|u) [N, E]; leading N dropped for single pairs.
    """
    single = fmap_u.ndim == 3
    if single:
      fmap_u, fmap_v = fmap_u[None], fmap_v[None]
    num, height, width, channels = fmap_u.shape
    flat = lambda fmap: fmap.reshape(num, height * width, channels).astype(jnp.float32)
    cond_u, cond_v, adjacency = self.direct_pairs(flat(fmap_u), flat(fmap_v))
    _, emb_uv = self.embed(self.pool(cond_u))
    _, emb_vu = self.embed(self.pool(cond_v))
    out = {
      'adjacency': adjacency,
      'cond_fmap_u': cond_u.reshape(fmap_u.shape),
      'cond_fmap_v': cond_v.reshape(fmap_v.shape),
      'embedding_uv': emb_uv,
      'embedding_vu': emb_vu,
    }
    return jax.tree.map(lambda x: x[0], out) if single else out

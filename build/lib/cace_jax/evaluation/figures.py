"""The figures an evaluation writes into a run's directory, from a trained model.

`plots` draws them; this module picks the images and computes the maps.

  ranked_lists.png     queries (the worst by AP among them) and their top-10,
                       green frame = right identity, red = wrong
  correspondences.png  the strongest aligned pixel pairs of a (query, gallery)
                       pair (the paper's Figure 5)
  conditional_maps.png one query's conditional feature maps against two true
                       matches and three hard negatives (the paper's Figure 4)
"""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cace_jax import augment, input_pipeline
from cace_jax.evaluation import plots
from cace_jax.models import CACENet

NUM_HEATMAP_GALLERY = 5
NUM_HEATMAP_MATCHES = 2  # the other columns are wrong identities


def decode_image(data: input_pipeline.SplitData, index: int, size) -> np.ndarray:
  """Image `index` of a split as uint8 [H, W, 3] at the network's input size."""
  with Image.open(io.BytesIO(data.images[index])) as image:
    return np.asarray(image.convert('RGB').resize((size[1], size[0]), Image.BILINEAR))


def _feature_maps(model: CACENet, variables, data, indices, size) -> jnp.ndarray:
  """Backbone maps [N, h, w, C] of the given images (eval mode)."""
  images = np.stack([augment.preprocess_eval(data.images[i], size).numpy() for i in indices])
  return model.apply(variables, images, method=lambda m, x: m.backbone(x, train=False)[0])


def write_figures(
  model: CACENet,
  variables,
  query: input_pipeline.SplitData,
  gallery: input_pipeline.SplitData,
  ranking: np.ndarray,
  per_query_ap: np.ndarray,
  image_size,
  workdir: str,
) -> list[str]:
  """Writes the figures of the module docstring; returns their paths.

  Args:
    model, variables: the trained model.
    query, gallery: the splits, in the order of `distmat`'s rows and columns.
    ranking: [Nq, top] gallery indices of the ranking to show, nearest first.
    per_query_ap: [Nq] AP per query (NaN where left out), to pick the worst.
    image_size: (H, W) the network's input size.
    workdir: where the PNGs go.
  """
  chosen = plots.select_queries(per_query_ap)
  decode_q = lambda i: decode_image(query, i, image_size)
  decode_g = lambda i: decode_image(gallery, i, image_size)
  paths = [
    plots.plot_ranked_lists(
      decode_q,
      decode_g,
      ranking,
      query.pids,
      gallery.pids,
      query.camids,
      gallery.camids,
      os.path.join(workdir, 'ranked_lists.png'),
      chosen,
      top=10,
    )
  ]
  if model.gcn == 'none':
    return paths  # no pair stage: no alignment or conditional maps to show

  # The best-ranked query shows what the model aligns when it is right; its
  # conditional maps are shown against its first true matches and the
  # highest-ranked wrong identities (the hard negatives stage 2 must push down).
  query_index = int(chosen[-1]) if len(chosen) else 0
  query_pid = query.pids[query_index]
  valid = [
    int(g)
    for g in ranking[query_index]
    if not (gallery.pids[g] == query_pid and gallery.camids[g] == query.camids[query_index])
  ]
  matches = [g for g in valid if gallery.pids[g] == query_pid][:NUM_HEATMAP_MATCHES]
  others = [g for g in valid if gallery.pids[g] != query_pid]
  gallery_indices = sorted(matches + others[: NUM_HEATMAP_GALLERY - len(matches)], key=valid.index)
  shown = gallery_indices.index(matches[0]) if matches else 0  # in correspondences.png
  fmap_q = _feature_maps(model, variables, query, [query_index], image_size)
  fmap_g = _feature_maps(model, variables, gallery, gallery_indices, image_size)
  pairs = model.apply(
    variables,
    jnp.repeat(fmap_q, len(gallery_indices), axis=0),
    fmap_g,
    method=CACENet.pair_features,
  )
  height, width = fmap_q.shape[1:3]
  nodes = height * width
  cross = np.asarray(pairs['adjacency'][shown, :nodes, nodes:])
  paths.append(
    plots.plot_correspondences(
      decode_q(query_index),
      decode_g(gallery_indices[shown]),
      cross,
      (height, width),
      os.path.join(workdir, 'correspondences.png'),
      num_lines=20,
      title=f'query {query_pid} vs gallery {gallery.pids[gallery_indices[shown]]}',
    )
  )
  paths.append(
    plots.plot_conditional_heatmaps(
      decode_q(query_index),
      [decode_g(g) for g in gallery_indices],
      np.asarray(jax.device_get(pairs['cond_fmap_u']), np.float32),
      os.path.join(workdir, 'conditional_maps.png'),
      individual_map=np.asarray(fmap_q[0], np.float32),
      gallery_pids=gallery.pids[gallery_indices],
      query_pid=query_pid,
    )
  )
  return paths

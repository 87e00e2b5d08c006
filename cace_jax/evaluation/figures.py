"""The figures an evaluation writes into a run's directory, and the ranked-list figure.

This module picks the images, computes the maps from the model and draws the
ranked lists; `heatmaps` draws the pair figures and `drawing` holds what
every figure is drawn with.

  ranked_lists.png     queries (the worst by AP among them) and their top-10,
                       green frame = right identity, red = wrong
  correspondences.png  the strongest aligned pixel pairs of a (query, gallery)
                       pair (the paper's Figure 5)
  conditional_maps.png one query's conditional feature maps against two true
                       matches and three hard negatives (the paper's Figure 4)

`plot_ranked_lists` saves the figure `draw_ranked_lists` builds (which tests
and notebooks can inspect); `python -m cace_jax.search` draws its hits with it.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from cace_jax.data import augment, split_data
from cace_jax.evaluation import drawing, heatmaps
from cace_jax.models import CACENet

NUM_HEATMAP_GALLERY = 5
NUM_HEATMAP_MATCHES = 2  # the other columns are wrong identities


def decode_image(data: split_data.SplitData, index: int, size) -> np.ndarray:
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
  query: split_data.SplitData,
  gallery: split_data.SplitData,
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
  chosen = select_queries(per_query_ap)
  paths = [
    plot_ranked_lists(
      lambda i: decode_image(query, i, image_size),
      lambda i: decode_image(gallery, i, image_size),
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
  # The best-ranked query shows what the model aligns when it is right.
  query_index = int(chosen[-1]) if len(chosen) else 0
  return paths + write_pair_figures(
    model, variables, query, gallery, ranking[query_index], query_index, image_size, workdir
  )


def write_pair_figures(
  model: CACENet,
  variables,
  query: split_data.SplitData,
  gallery: split_data.SplitData,
  ranked: np.ndarray,
  query_index: int,
  image_size,
  workdir: str,
) -> list[str]:
  """Writes correspondences.png and conditional_maps.png of one query; returns their paths.

  Args:
    model, variables, query, gallery, image_size, workdir: as `write_figures`'.
    ranked: [top] the query's gallery indices, nearest first.
    query_index: the query shown.
  """
  # Its conditional maps are shown against its first true matches and the
  # highest-ranked wrong identities (the hard negatives stage 2 must push down).
  query_pid = query.pids[query_index]
  valid = [
    int(g)
    for g in ranked
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
  query_image = decode_image(query, query_index, image_size)
  return [
    heatmaps.plot_correspondences(
      query_image,
      decode_image(gallery, gallery_indices[shown], image_size),
      cross,
      (height, width),
      os.path.join(workdir, 'correspondences.png'),
      num_lines=20,
      title=f'query {query_pid} vs gallery {gallery.pids[gallery_indices[shown]]}',
    ),
    heatmaps.plot_conditional_heatmaps(
      query_image,
      [decode_image(gallery, g, image_size) for g in gallery_indices],
      np.asarray(jax.device_get(pairs['cond_fmap_u']), np.float32),
      os.path.join(workdir, 'conditional_maps.png'),
      individual_map=np.asarray(fmap_q[0], np.float32),
      gallery_pids=gallery.pids[gallery_indices],
      query_pid=query_pid,
    ),
  ]


def select_queries(
  ap_per_query: np.ndarray,
  num_best: int = 2,
  num_worst: int = 4,
  num_random: int = 2,
  seed: int = 0,
) -> np.ndarray:
  """Picks queries worth looking at: the worst, some random ones, the best.

  Failures are the most informative rows, so the lowest-AP queries always come
  first. NaN APs (queries without a true match) are never picked.

  Returns:
    int [<= num_worst + num_random + num_best] distinct query indices, ordered
    worst (ascending AP), then random (a seeded sample of the rest), then best
    (descending AP).
  """
  ap = np.asarray(ap_per_query, np.float64)
  valid = np.flatnonzero(~np.isnan(ap))
  by_ap = valid[np.argsort(ap[valid], kind='stable')]
  worst = by_ap[:num_worst]
  best = [i for i in by_ap[::-1][:num_best] if i not in set(worst)]
  rest = np.setdiff1d(by_ap, np.concatenate([worst, best]).astype(int))
  rng = np.random.default_rng(seed)
  random = rng.choice(rest, size=min(num_random, rest.size), replace=False)
  return np.concatenate([worst, random, best]).astype(np.int64)


def draw_ranked_lists(
  query_images: drawing.Images,
  gallery_images: drawing.Images,
  ranking: np.ndarray,
  query_pids,
  gallery_pids,
  query_camids,
  gallery_camids,
  query_indices: Sequence[int],
  top: int = 10,
  titles: Sequence[str] | None = None,
  valid_mask: np.ndarray | None = None,
  image_size: tuple[int, int] | None = None,
  captions: Sequence[Sequence[str]] | None = None,
) -> Figure:
  """Builds the ranked-list figure; see `plot_ranked_lists`."""
  q_pids, g_pids = np.asarray(query_pids), np.asarray(gallery_pids)
  q_cams, g_cams = np.asarray(query_camids), np.asarray(gallery_camids)
  ranking = np.asarray(ranking)
  query_indices = [int(q) for q in query_indices]
  if not query_indices:
    raise ValueError('no queries to draw')
  size = tuple(image_size or drawing.get_image(query_images, query_indices[0]).shape[:2])
  frame = drawing.frame_width(size)
  padded = (size[0] + 2 * frame, size[1] + 2 * frame)
  # Layout in inches; cells are shown near 1:1 at drawing.DPI, with a floor for tiny images.
  cell_h = max(1.2, padded[0] / drawing.DPI)
  cell_w = cell_h * padded[1] / padded[0]
  margin, gap, col_gap, title_h, label_h = 0.1, 0.3, 0.06, 0.22, 0.34
  row_h = title_h + cell_h + label_h
  fig_w = 2 * margin + cell_w + gap + top * cell_w + (top - 1) * col_gap
  figure = drawing.new_figure(fig_w, 2 * margin + len(query_indices) * row_h)
  for row, q in enumerate(query_indices):
    y = margin + row * row_h + title_h
    query = drawing.add_frame(
      drawing.resize_image(drawing.get_image(query_images, q), size), drawing.NEUTRAL, frame
    )
    ax = drawing.add_image_axes(figure, margin, y, cell_w, cell_h, query, f'query_{row}')
    ax.text(
      0.5,
      -0.03,
      f'query\npid {q_pids[q]} c{q_cams[q]}' if captions is None else 'query',
      transform=ax.transAxes,
      ha='center',
      va='top',
      fontsize=7,
    )
    if titles is not None:
      ax.text(
        0.0,
        1.03,
        titles[row],
        transform=ax.transAxes,
        ha='left',
        va='bottom',
        fontsize=8,
        clip_on=False,
      )
    # Junk (same pid and camera as the query) is skipped unless the caller says
    # otherwise; when the caller has already removed it this changes nothing.
    order = ranking[q]
    if valid_mask is not None:
      keep = np.asarray(valid_mask, bool)[q, order]
    else:
      keep = ~((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q]))
    shown = order[keep][:top]
    for k, g in enumerate(shown):
      if captions is None:
        color, caption = (
          (drawing.GREEN if g_pids[g] == q_pids[q] else drawing.RED),
          f'pid {g_pids[g]} c{g_cams[g]}',
        )
      else:  # unlabelled (a search): no verdict, the caller's text
        color, caption = drawing.NEUTRAL, captions[row][k]
      image = drawing.add_frame(
        drawing.resize_image(drawing.get_image(gallery_images, g), size), color, frame
      )
      x = margin + cell_w + gap + k * (cell_w + col_gap)
      ax = drawing.add_image_axes(figure, x, y, cell_w, cell_h, image, f'gallery_{row}_{k}')
      ax.text(
        0.5,
        -0.03,
        f'#{k + 1}\n{caption}',
        transform=ax.transAxes,
        ha='center',
        va='top',
        fontsize=7,
        color=np.array(color) / 255,
      )
  return figure


def plot_ranked_lists(
  query_images: drawing.Images,
  gallery_images: drawing.Images,
  ranking: np.ndarray,
  query_pids,
  gallery_pids,
  query_camids,
  gallery_camids,
  out_path: str,
  query_indices: Sequence[int],
  top: int = 10,
  titles: Sequence[str] | None = None,
  valid_mask: np.ndarray | None = None,
  image_size: tuple[int, int] | None = None,
  captions: Sequence[Sequence[str]] | None = None,
) -> str:
  """Saves one row per query: the query, then its top-`top` gallery matches.

  Matches get a green frame when their pid equals the query's and red
  otherwise; the query is framed grey. Under each image: rank, pid and camera.

  Args:
    query_images, gallery_images: sequences of uint8 [H, W, 3] images, or
      callables index -> image (decoded lazily: only shown images are loaded).
      drawing.Images are resized to `image_size` (default: the first query's size).
    ranking: int [Nq, >= top] gallery indices per query, best first (e.g.
      `np.argsort(distmat, axis=1)`), indexed by query index.
    query_pids, query_camids: [Nq]; gallery_pids, gallery_camids: [Ng].
    out_path: PNG path.
    query_indices: queries to draw, one row each (e.g. from `select_queries`).
    top: gallery images per row.
    titles: optional text above each row (e.g. 'AP 0.12').
    valid_mask: optional bool [Nq, Ng]; gallery items that are False are
      skipped. Default: skip items with the query's pid AND camera (the
      Market-1501 junk rule of `metrics.evaluate_rank`), so pass a full ranking
      (at least `top` + the number of junk items). Pass all-True to draw
      `ranking` exactly as given.
    image_size: (height, width) of every cell.
    captions: for unlabelled images (a search): per row, the text under
      each shown gallery image instead of its pid and camera; frames are
      then neutral.

  Returns:
    `out_path`.
  """
  figure = draw_ranked_lists(
    query_images,
    gallery_images,
    ranking,
    query_pids,
    gallery_pids,
    query_camids,
    gallery_camids,
    query_indices,
    top,
    titles,
    valid_mask,
    image_size,
    captions,
  )
  return drawing.save_figure(figure, out_path)

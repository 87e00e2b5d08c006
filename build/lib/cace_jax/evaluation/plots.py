"""Evaluation figures: ranked lists, clue correspondences and conditional heatmaps.

Pure numpy-in, PNG-out functions: the caller runs the model and supplies the
arrays. Figures are built on `matplotlib.figure.Figure` with the Agg canvas, so
nothing here touches pyplot's global state or needs a display. Each `plot_*`
function saves the figure built by the matching `draw_*` function (which tests
and notebooks can inspect).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import matplotlib
from matplotlib import cm, colors, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from cace_jax.augment import IMAGENET_MEAN, IMAGENET_STD

GREEN = (0, 190, 0)
RED = (220, 0, 0)
NEUTRAL = (128, 128, 128)
DPI = 100

Images = Sequence[np.ndarray] | Callable[[int], np.ndarray]


def denormalize(image: np.ndarray) -> np.ndarray:
  """Undoes ImageNet normalisation: float [..., 3] -> uint8 [..., 3]."""
  image = np.asarray(image, np.float32) * IMAGENET_STD + IMAGENET_MEAN
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


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


def feature_norm_maps(maps: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
  """L2 norm over channels of [..., h, w, C] maps, bilinearly upsampled.

  Args:
    maps: [..., h, w, C] feature maps.
    out_size: (height, width) of the images they will be overlaid on.

  Returns:
    float32 [..., height, width] norms, on their original (unnormalised) scale so
    that maps can be compared on one colour scale.
  """
  maps = np.asarray(maps, np.float32)
  norms = np.linalg.norm(maps, axis=-1)
  flat = norms.reshape(-1, *norms.shape[-2:])
  height, width = out_size
  resized = [np.asarray(Image.fromarray(m).resize((width, height), Image.BILINEAR)) for m in flat]
  return np.stack(resized).reshape(*norms.shape[:-2], height, width).astype(np.float32)


def select_strongest_pairs(
  cross_adjacency: np.ndarray, num_lines: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rows, columns and values of the `num_lines` (>= 1) largest entries, strongest first."""
  adjacency = np.asarray(cross_adjacency, np.float64)
  flat = adjacency.ravel()
  k = max(1, min(num_lines, flat.size))
  top = np.argpartition(-flat, k - 1)[:k]
  top = top[np.argsort(-flat[top], kind='stable')]
  rows, cols = np.unravel_index(top, adjacency.shape)
  return rows, cols, flat[top]


def _get_image(images: Images, index: int) -> np.ndarray:
  """Image `index` of a sequence or a lazy loader, as uint8 [H, W, 3]."""
  image = np.asarray(images(int(index)) if callable(images) else images[int(index)])
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.clip(image[..., :3], 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _frame_width(size: tuple[int, int]) -> int:
  # Proportional to the image so frames look alike at any resolution, but at
  # least 2 pixels so they survive downscaling.
  return max(2, round(0.05 * max(size)))


def _add_frame(image: np.ndarray, color: tuple[int, int, int], width: int) -> np.ndarray:
  # Frames are painted into the pixels (not drawn as patches) so that they are
  # never clipped by the axes and have exactly the colour asked for.
  framed = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3), np.uint8)
  framed[:] = color
  framed[width:-width, width:-width] = image
  return framed


def _new_figure(width: float, height: float) -> Figure:
  figure = Figure(figsize=(width, height), dpi=DPI, facecolor='white')
  FigureCanvasAgg(figure)
  return figure


def _add_image_axes(
  figure: Figure,
  x: float,
  y_top: float,
  width: float,
  height: float,
  image: np.ndarray | None,
  gid: str | None = None,
):
  """Axes at (x, y_top) inches from the top left, showing `image` without ticks."""
  fig_w, fig_h = figure.get_size_inches()
  ax = figure.add_axes((x / fig_w, 1 - (y_top + height) / fig_h, width / fig_w, height / fig_h))
  ax.set_axis_off()
  if image is not None:
    ax.imshow(image, aspect='auto', interpolation='bilinear')
  if gid:
    ax.set_gid(gid)
  return ax


def _add_colorbar(
  figure: Figure, x: float, y_top: float, height: float, norm, colormap, gid: str
) -> None:
  """A narrow colour bar at (x, y_top) inches from the top left."""
  cax = _add_image_axes(figure, x, y_top, 0.12, height, None, gid)
  cax.set_axis_on()
  figure.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), cax=cax)
  cax.tick_params(labelsize=7)


def save_figure(figure: Figure, out_path: str) -> str:
  """Writes `figure` as PNG (creating the directory) and returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  figure.savefig(out_path, dpi=DPI, format='png', facecolor='white')
  return out_path


def draw_ranked_lists(
  query_images: Images,
  gallery_images: Images,
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
  size = tuple(image_size or _get_image(query_images, query_indices[0]).shape[:2])
  frame = _frame_width(size)
  padded = (size[0] + 2 * frame, size[1] + 2 * frame)
  # Layout in inches; cells are shown near 1:1 at DPI, with a floor for tiny images.
  cell_h = max(1.2, padded[0] / DPI)
  cell_w = cell_h * padded[1] / padded[0]
  margin, gap, col_gap, title_h, label_h = 0.1, 0.3, 0.06, 0.22, 0.34
  row_h = title_h + cell_h + label_h
  fig_w = 2 * margin + cell_w + gap + top * cell_w + (top - 1) * col_gap
  figure = _new_figure(fig_w, 2 * margin + len(query_indices) * row_h)
  for row, q in enumerate(query_indices):
    y = margin + row * row_h + title_h
    query = _add_frame(_resize(_get_image(query_images, q), size), NEUTRAL, frame)
    ax = _add_image_axes(figure, margin, y, cell_w, cell_h, query, f'query_{row}')
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
        color, caption = (GREEN if g_pids[g] == q_pids[q] else RED), f'pid {g_pids[g]} c{g_cams[g]}'
      else:  # unlabelled (a search): no verdict, the caller's text
        color, caption = NEUTRAL, captions[row][k]
      image = _add_frame(_resize(_get_image(gallery_images, g), size), color, frame)
      x = margin + cell_w + gap + k * (cell_w + col_gap)
      ax = _add_image_axes(figure, x, y, cell_w, cell_h, image, f'gallery_{row}_{k}')
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
  query_images: Images,
  gallery_images: Images,
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
      Images are resized to `image_size` (default: the first query's size).
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
  return save_figure(figure, out_path)


def draw_correspondences(
  image_u: np.ndarray,
  image_v: np.ndarray,
  cross_adjacency: np.ndarray,
  fmap_shape: tuple[int, int],
  num_lines: int = 20,
  title: str | None = None,
  cmap: str = 'viridis',
) -> Figure:
  """Builds the correspondence figure; see `plot_correspondences`."""
  image_u, image_v = np.asarray(image_u, np.uint8), np.asarray(image_v, np.uint8)
  if image_u.shape != image_v.shape:
    raise ValueError(f'images differ in shape: {image_u.shape} vs {image_v.shape}')
  fh, fw = fmap_shape
  if np.shape(cross_adjacency) != (fh * fw, fh * fw):
    raise ValueError(
      f'cross_adjacency {np.shape(cross_adjacency)} does not match the {fh}x{fw} feature map'
    )
  height, width = image_u.shape[:2]
  gap = max(4, width // 6)
  canvas = np.full((height, 2 * width + gap, 3), 255, np.uint8)
  canvas[:, :width], canvas[:, width + gap :] = image_u, image_v
  rows, cols, values = select_strongest_pairs(cross_adjacency, num_lines)
  # Cell centres in image pixels; v's cells are shifted to the right image.
  cell_x, cell_y = width / fw, height / fh
  xu, yu = (rows % fw + 0.5) * cell_x - 0.5, (rows // fw + 0.5) * cell_y - 0.5
  xv, yv = (cols % fw + 0.5) * cell_x - 0.5 + width + gap, (cols // fw + 0.5) * cell_y - 0.5

  image_h = 3.0
  image_w = image_h * canvas.shape[1] / height
  margin, title_h, bar_w = 0.1, 0.3 if title else 0.1, 0.5
  figure = _new_figure(2 * margin + image_w + bar_w + 0.4, margin + title_h + image_h + margin)
  ax = _add_image_axes(figure, margin, title_h, image_w, image_h, canvas, 'correspondences')
  if title:
    ax.set_title(title, fontsize=9)
  norm, colormap = colors.Normalize(values.min(), values.max()), matplotlib.colormaps[cmap]
  strength = norm(values) if norm.vmax > norm.vmin else np.ones_like(values)
  # Weakest first so that the strongest lines end up on top.
  for n in np.argsort(strength, kind='stable'):
    ax.plot(
      [xu[n], xv[n]],
      [yu[n], yv[n]],
      color=colormap(strength[n]),
      alpha=0.55 + 0.45 * float(strength[n]),
      linewidth=1.8,
      solid_capstyle='round',
      # A light halo keeps dark colours visible on dark clothing.
      path_effects=[patheffects.withStroke(linewidth=2.8, foreground='white')],
    )
  ends_x, ends_y = np.concatenate([xu, xv]), np.concatenate([yu, yv])
  ax.scatter(
    ends_x,
    ends_y,
    c=np.tile(colormap(strength), (2, 1)),
    s=18,
    edgecolors='white',
    linewidths=0.6,
    zorder=3,
  )
  ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
  ax.set_ylim(height - 0.5, -0.5)
  _add_colorbar(figure, 2 * margin + image_w, title_h, image_h, norm, colormap, 'colorbar')
  return figure


def plot_correspondences(
  image_u: np.ndarray,
  image_v: np.ndarray,
  cross_adjacency: np.ndarray,
  fmap_shape: tuple[int, int],
  out_path: str,
  num_lines: int = 20,
  title: str | None = None,
) -> str:
  """Saves the paper's Figure 5: the strongest cross-image clue correspondences.

  Args:
    image_u, image_v: uint8 [H, W, 3] images of the same size, drawn side by side.
    cross_adjacency: [n, n], n = h * w; entry (i, j) links u's feature-map cell
      i to v's cell j, both in row-major order of the [h, w] map.
    fmap_shape: (h, w) of the feature map.
    out_path: PNG path.
    num_lines: how many of the largest entries to draw, each as a line between
      cell centres; colour and opacity grow with strength (colour bar on the
      right, scaled to the drawn entries).
    title: optional title.

  Returns:
    `out_path`.
  """
  figure = draw_correspondences(image_u, image_v, cross_adjacency, fmap_shape, num_lines, title)
  return save_figure(figure, out_path)


def _blend(image: np.ndarray, values: np.ndarray, norm, colormap, alpha: float) -> np.ndarray:
  rgb = colormap(norm(values))[..., :3]
  return np.round(255 * ((1 - alpha) * image / 255.0 + alpha * rgb)).astype(np.uint8)


def draw_conditional_heatmaps(
  query_image: np.ndarray,
  gallery_images: Images,
  conditional_maps_q: np.ndarray,
  individual_map: np.ndarray | None = None,
  gallery_pids=None,
  query_pid=None,
  cmap: str = 'jet',
  alpha: float = 0.5,
) -> Figure:
  """Builds the conditional-heatmap figure; see `plot_conditional_heatmaps`."""
  query = np.asarray(query_image, np.uint8)
  size = query.shape[:2]
  maps = np.asarray(conditional_maps_q)
  num_gallery = maps.shape[0]
  cond = feature_norm_maps(maps, size)
  indiv = None if individual_map is None else feature_norm_maps(individual_map, size)
  # One colour scale for every column, so differences between pairings show.
  every = cond if indiv is None else np.concatenate([cond, indiv[None]])
  norm = colors.Normalize(float(every.min()), float(every.max()))
  colormap = matplotlib.colormaps[cmap]
  frame = _frame_width(size)
  white = (255, 255, 255)

  first = 0 if indiv is None else 1
  num_cols, num_rows = num_gallery + first, 2 if indiv is None else 3
  cell_h = max(1.2, (size[0] + 2 * frame) / DPI)
  cell_w = cell_h * (size[1] + 2 * frame) / (size[0] + 2 * frame)
  margin, col_gap, title_h, header_h, row_label_w, bar_w = 0.1, 0.08, 0.22, 0.3, 0.25, 0.7
  fig_w = 2 * margin + row_label_w + num_cols * cell_w + (num_cols - 1) * col_gap + bar_w
  figure = _new_figure(fig_w, header_h + num_rows * (title_h + cell_h) + margin)
  row_y = [header_h + title_h + r * (title_h + cell_h) for r in range(num_rows)]
  column_x = [margin + row_label_w + c * (cell_w + col_gap) for c in range(num_cols)]
  fig_w, fig_h = figure.get_size_inches()
  row_labels = ['query, paired', 'gallery', 'paired - individual'][:num_rows]
  for y, text in zip(row_y, row_labels):
    figure.text(
      margin / fig_w,
      1 - (y + cell_h / 2) / fig_h,
      text,
      rotation=90,
      ha='left',
      va='center',
      fontsize=7,
    )

  def add_cell(row, col, image, label=None, color='black'):
    ax = _add_image_axes(
      figure, column_x[col], row_y[row], cell_w, cell_h, image, f'heatmap_{row}_{col}'
    )
    if label:
      ax.set_title(label, fontsize=7, color=color, pad=2)
    return ax

  if indiv is not None:
    add_cell(
      0, 0, _add_frame(_blend(query, indiv, norm, colormap, alpha), white, frame), 'individual'
    )
    diff = cond - indiv[None]
    limit = float(np.abs(diff).max()) or 1.0
    diff_norm = colors.Normalize(-limit, limit)
    diff_cmap = matplotlib.colormaps['RdBu_r']
    # The difference goes on a grey query so that red (gained) and blue (lost) read clearly.
    grey = np.repeat(query.mean(-1, keepdims=True), 3, -1)
  for g in range(num_gallery):
    col = g + first
    add_cell(
      0,
      col,
      _add_frame(_blend(query, cond[g], norm, colormap, alpha), white, frame),
      f'paired with {g}',
    )
    color, label = NEUTRAL, f'gallery {g}'
    if gallery_pids is not None:
      label = f'pid {gallery_pids[g]}'
      if query_pid is not None:
        color = GREEN if gallery_pids[g] == query_pid else RED
    gallery = _resize(_get_image(gallery_images, g), size)
    add_cell(1, col, _add_frame(gallery, color, frame), label, np.array(color) / 255)
    if indiv is not None:
      add_cell(2, col, _add_frame(_blend(grey, diff[g], diff_norm, diff_cmap, 0.6), white, frame))

  bar_x = fig_w - bar_w + 0.1
  _add_colorbar(figure, bar_x, row_y[0], cell_h, norm, colormap, 'colorbar_norm')
  if indiv is not None:
    _add_colorbar(figure, bar_x, row_y[2], cell_h, diff_norm, diff_cmap, 'colorbar_difference')
  label = 'query' if query_pid is None else f'query pid {query_pid}'
  figure.text(
    margin / fig_w,
    1 - 0.05 / fig_h,
    f'{label}: feature norm per pairing',
    ha='left',
    va='top',
    fontsize=8,
  )
  return figure


def plot_conditional_heatmaps(
  query_image: np.ndarray,
  gallery_images: Images,
  conditional_maps_q: np.ndarray,
  out_path: str,
  individual_map: np.ndarray | None = None,
  gallery_pids=None,
  query_pid=None,
) -> str:
  """Saves the paper's Figure 4: where the query's features change with the pair.

  Column g shows, on top, the query overlaid (alpha 0.5) with the channel L2
  norm of its conditional feature map when paired with gallery image g, and
  below it gallery image g (framed green/red when `gallery_pids` and
  `query_pid` are given). All heatmaps share one colour scale (min to max over
  every map drawn). With `individual_map`, a first column shows the
  unconditioned map and a third row the conditional minus individual norm
  (red: stronger when paired, blue: weaker; symmetric shared scale).

  Args:
    query_image: uint8 [H, W, 3].
    gallery_images: G uint8 images (resized to [H, W]), or a callable index -> image.
    conditional_maps_q: [G, h, w, C] conditional feature maps of the query.
    out_path: PNG path.
    individual_map: optional [h, w, C] unconditioned feature map of the query.
    gallery_pids: optional [G] identities; query_pid: the query's identity.

  Returns:
    `out_path`.
  """
  figure = draw_conditional_heatmaps(
    query_image, gallery_images, conditional_maps_q, individual_map, gallery_pids, query_pid
  )
  return save_figure(figure, out_path)

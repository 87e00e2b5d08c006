"""The pair figures: clue correspondences (paper's Figure 5) and conditional heatmaps (Figure 4).

Pure numpy-in, PNG-out: `figures` runs the model and supplies the arrays.
Each `plot_*` function saves the figure built by the matching `draw_*`
function (which tests and notebooks can inspect).
"""

from __future__ import annotations

import matplotlib
from matplotlib import colors, patheffects
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from cace_jax.evaluation import drawing


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
  figure = drawing.new_figure(
    2 * margin + image_w + bar_w + 0.4, margin + title_h + image_h + margin
  )
  ax = drawing.add_image_axes(figure, margin, title_h, image_w, image_h, canvas, 'correspondences')
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
  drawing.add_colorbar(figure, 2 * margin + image_w, title_h, image_h, norm, colormap, 'colorbar')
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
  return drawing.save_figure(figure, out_path)


def blend_heatmap(
  image: np.ndarray, values: np.ndarray, norm, colormap, alpha: float
) -> np.ndarray:
  """uint8 `image` [H, W, 3] overlaid with `values` [H, W] in `colormap` at opacity `alpha`."""
  rgb = colormap(norm(values))[..., :3]
  return np.round(255 * ((1 - alpha) * image / 255.0 + alpha * rgb)).astype(np.uint8)


def draw_conditional_heatmaps(
  query_image: np.ndarray,
  gallery_images: drawing.Images,
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
  frame = drawing.frame_width(size)
  white = (255, 255, 255)

  first = 0 if indiv is None else 1
  num_cols, num_rows = num_gallery + first, 2 if indiv is None else 3
  cell_h = max(1.2, (size[0] + 2 * frame) / drawing.DPI)
  cell_w = cell_h * (size[1] + 2 * frame) / (size[0] + 2 * frame)
  margin, col_gap, title_h, header_h, row_label_w, bar_w = 0.1, 0.08, 0.22, 0.3, 0.25, 0.7
  fig_w = 2 * margin + row_label_w + num_cols * cell_w + (num_cols - 1) * col_gap + bar_w
  figure = drawing.new_figure(fig_w, header_h + num_rows * (title_h + cell_h) + margin)
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
    ax = drawing.add_image_axes(
      figure, column_x[col], row_y[row], cell_w, cell_h, image, f'heatmap_{row}_{col}'
    )
    if label:
      ax.set_title(label, fontsize=7, color=color, pad=2)
    return ax

  if indiv is not None:
    add_cell(
      0,
      0,
      drawing.add_frame(blend_heatmap(query, indiv, norm, colormap, alpha), white, frame),
      'individual',
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
      drawing.add_frame(blend_heatmap(query, cond[g], norm, colormap, alpha), white, frame),
      f'paired with {g}',
    )
    color, label = drawing.NEUTRAL, f'gallery {g}'
    if gallery_pids is not None:
      label = f'pid {gallery_pids[g]}'
      if query_pid is not None:
        color = drawing.GREEN if gallery_pids[g] == query_pid else drawing.RED
    gallery = drawing.resize_image(drawing.get_image(gallery_images, g), size)
    add_cell(1, col, drawing.add_frame(gallery, color, frame), label, np.array(color) / 255)
    if indiv is not None:
      add_cell(
        2,
        col,
        drawing.add_frame(blend_heatmap(grey, diff[g], diff_norm, diff_cmap, 0.6), white, frame),
      )

  bar_x = fig_w - bar_w + 0.1
  drawing.add_colorbar(figure, bar_x, row_y[0], cell_h, norm, colormap, 'colorbar_norm')
  if indiv is not None:
    drawing.add_colorbar(
      figure, bar_x, row_y[2], cell_h, diff_norm, diff_cmap, 'colorbar_difference'
    )
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
  gallery_images: drawing.Images,
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
  return drawing.save_figure(figure, out_path)

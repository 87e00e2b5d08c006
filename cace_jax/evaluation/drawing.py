"""What every evaluation figure is drawn with: colours, framed image cells, colour bars, PNGs.

Pure numpy-in, PNG-out helpers for `figures` (ranked lists) and `heatmaps`
(correspondences, conditional maps). Figures are built on
`matplotlib.figure.Figure` with the Agg canvas, so nothing here touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from matplotlib import cm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from cace_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD

GREEN = (0, 190, 0)
RED = (220, 0, 0)
NEUTRAL = (128, 128, 128)
DPI = 100

Images = Sequence[np.ndarray] | Callable[[int], np.ndarray]


def denormalize(image: np.ndarray) -> np.ndarray:
  """Undoes ImageNet normalisation: float [..., 3] -> uint8 [..., 3]."""
  image = np.asarray(image, np.float32) * IMAGENET_STD + IMAGENET_MEAN
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def get_image(images: Images, index: int) -> np.ndarray:
  """Image `index` of a sequence or a lazy loader, as uint8 [H, W, 3]."""
  image = np.asarray(images(int(index)) if callable(images) else images[int(index)])
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.clip(image[..., :3], 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3] resized bilinearly to `size` (height, width); as it is if already so."""
  if image.shape[:2] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def frame_width(size: tuple[int, int]) -> int:
  """Pixels of the coloured frame around an image of `size` (height, width)."""
  # Proportional to the image so frames look alike at any resolution, but at
  # least 2 pixels so they survive downscaling.
  return max(2, round(0.05 * max(size)))


def add_frame(image: np.ndarray, color: tuple[int, int, int], width: int) -> np.ndarray:
  """`image` inside a frame of `color`, `width` pixels wide on every side."""
  # Frames are painted into the pixels (not drawn as patches) so that they are
  # never clipped by the axes and have exactly the colour asked for.
  framed = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3), np.uint8)
  framed[:] = color
  framed[width:-width, width:-width] = image
  return framed


def new_figure(width: float, height: float) -> Figure:
  """A white figure of `width` x `height` inches on the Agg canvas (no pyplot state)."""
  figure = Figure(figsize=(width, height), dpi=DPI, facecolor='white')
  FigureCanvasAgg(figure)
  return figure


def add_image_axes(
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


def add_colorbar(
  figure: Figure, x: float, y_top: float, height: float, norm, colormap, gid: str
) -> None:
  """A narrow colour bar at (x, y_top) inches from the top left."""
  cax = add_image_axes(figure, x, y_top, 0.12, height, None, gid)
  cax.set_axis_on()
  figure.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), cax=cax)
  cax.tick_params(labelsize=7)


def save_figure(figure: Figure, out_path: str) -> str:
  """Writes `figure` as PNG (creating the directory) and returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  figure.savefig(out_path, dpi=DPI, format='png', facecolor='white')
  return out_path

"""The evaluation figures (figures, heatmaps, drawing): files, layout, colours, pairs, scales."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
import pytest

from cace_jax.evaluation import drawing, figures, heatmaps

H, W = 64, 32


def grey_images(count: int, value: int = 128) -> list[np.ndarray]:
  return [np.full((H, W, 3), value, np.uint8) for _ in range(count)]


def read_png(path: str) -> np.ndarray:
  assert os.path.getsize(path) > 0
  with Image.open(path) as image:
    assert image.format == 'PNG'
    return np.asarray(image.convert('RGB'))


def axes_by_gid(figure, gid: str):
  (ax,) = [ax for ax in figure.axes if ax.get_gid() == gid]
  return ax


def frame_pixel(pixels: np.ndarray, figure, gid: str) -> np.ndarray:
  """Colour of the saved PNG 2 pixels inside the left edge of an axes, mid-height."""
  box = axes_by_gid(figure, gid).get_window_extent()
  row = pixels.shape[0] - int(round((box.y0 + box.y1) / 2))
  return pixels[row, int(np.ceil(box.x0)) + 2].astype(int)


def is_green(rgb) -> bool:
  return rgb[1] > 150 and rgb[0] < 60 and rgb[2] < 60


def is_red(rgb) -> bool:
  return rgb[0] > 180 and rgb[1] < 60 and rgb[2] < 60


@pytest.fixture
def ranked_inputs():
  # Query 0 (pid 7, cam 0) and query 1 (pid 8, cam 1); the gallery alternates
  # pids 7 and 8 with cameras 1 and 0, so a ranking of 0..5 gives known colours.
  query_pids, query_cams = np.array([7, 8]), np.array([0, 1])
  gallery_pids = np.array([7, 8, 7, 8, 7, 8])
  gallery_cams = np.array([1, 0, 1, 0, 1, 0])
  ranking = np.tile(np.arange(6), (2, 1))
  return dict(
    query_images=grey_images(2),
    gallery_images=grey_images(6),
    ranking=ranking,
    query_pids=query_pids,
    gallery_pids=gallery_pids,
    query_camids=query_cams,
    gallery_camids=gallery_cams,
  )


def test_ranked_lists_frames_are_green_for_right_and_red_for_wrong(ranked_inputs, tmp_path):
  figure = figures.draw_ranked_lists(**ranked_inputs, query_indices=[0, 1], top=4)
  path = drawing.save_figure(figure, str(tmp_path / 'ranked.png'))
  pixels = read_png(path)
  for row, query_pid in enumerate([7, 8]):
    for k in range(4):
      colour = frame_pixel(pixels, figure, f'gallery_{row}_{k}')
      right = ranked_inputs['gallery_pids'][k] == query_pid
      assert is_green(colour) if right else is_red(colour), (row, k, colour)
    query_colour = frame_pixel(pixels, figure, f'query_{row}')
    assert not is_green(query_colour) and not is_red(query_colour)
  # Inside the frame the grey image itself shows.
  box = axes_by_gid(figure, 'gallery_0_0').get_window_extent()
  centre = pixels[pixels.shape[0] - int((box.y0 + box.y1) / 2), int((box.x0 + box.x1) / 2)]
  np.testing.assert_allclose(centre, 128, atol=3)


def test_ranked_lists_layout_grows_with_top_and_rows(ranked_inputs, tmp_path):
  sizes = {}
  for top, queries in [(2, [0]), (5, [0]), (5, [0, 1])]:
    path = figures.plot_ranked_lists(
      **ranked_inputs,
      out_path=str(tmp_path / f'{top}.png'),
      query_indices=queries,
      top=top,
      titles=['AP 0.5'] * 2,
    )
    sizes[top, len(queries)] = read_png(path).shape[:2]
  assert sizes[5, 1][1] > sizes[2, 1][1] + 100  # wider with more gallery columns
  assert sizes[5, 1][0] == sizes[2, 1][0]
  assert sizes[5, 2][0] > 1.8 * sizes[5, 1][0] - 30  # one row per query


def test_ranked_lists_skip_junk_and_honour_mask_and_lazy_images(ranked_inputs):
  calls = []
  gallery = ranked_inputs.pop('gallery_images')
  ranked_inputs['gallery_images'] = lambda i: calls.append(i) or gallery[i]
  ranked_inputs['gallery_camids'] = np.array([0, 0, 1, 0, 1, 0])  # item 0 is junk for query 0
  figure = figures.draw_ranked_lists(**ranked_inputs, query_indices=[0], top=3)
  assert calls == [1, 2, 3]  # junk skipped; only shown images decoded
  assert len([ax for ax in figure.axes if ax.get_gid().startswith('gallery_')]) == 3
  calls.clear()
  figures.draw_ranked_lists(
    **ranked_inputs, query_indices=[0], top=3, valid_mask=np.ones((2, 6), bool)
  )
  assert calls == [0, 1, 2]


def test_select_queries_includes_the_worst_and_is_distinct():
  ap = np.array([0.5, 0.9, 0.05, np.nan, 1.0, 0.3, 0.7, 0.6, 0.2, 0.8])
  chosen = figures.select_queries(ap, num_best=2, num_worst=3, num_random=2, seed=1)
  assert chosen[0] == np.nanargmin(ap)
  assert list(chosen[:3]) == [2, 8, 5]
  assert set(chosen[-2:]) == {4, 1}
  assert len(set(chosen.tolist())) == len(chosen) == 7
  assert 3 not in chosen  # no-match (NaN) queries are never shown
  small = figures.select_queries(np.array([0.2, 0.1]), num_best=2, num_worst=4, num_random=2)
  assert sorted(small.tolist()) == [0, 1]


def test_strongest_pairs_and_correspondence_lines(tmp_path):
  rng = np.random.default_rng(0)
  fmap = (4, 2)
  adjacency = rng.random((8, 8)) * 0.1
  planted = [(3, 5, 0.9), (0, 7, 0.8), (6, 1, 0.7)]
  for i, j, value in planted:
    adjacency[i, j] = value
  rows, cols, values = heatmaps.select_strongest_pairs(adjacency, 3)
  assert list(zip(rows, cols)) == [(i, j) for i, j, _ in planted]
  np.testing.assert_allclose(values, [0.9, 0.8, 0.7])

  image_u, image_v = grey_images(2)
  figure = heatmaps.draw_correspondences(image_u, image_v, adjacency, fmap, num_lines=5)
  ax = axes_by_gid(figure, 'correspondences')
  assert len(ax.lines) == 5
  # The strongest line (drawn last) joins the centres of cell 3 of u and cell 5 of v.
  xs, ys = ax.lines[-1].get_data()
  gap = max(4, W // 6)
  np.testing.assert_allclose(xs, [1.5 * W / 2 - 0.5, 1.5 * W / 2 - 0.5 + W + gap])
  np.testing.assert_allclose(ys, [1.5 * H / 4 - 0.5, 2.5 * H / 4 - 0.5])
  path = heatmaps.plot_correspondences(
    image_u, image_v, adjacency, fmap, str(tmp_path / 'corr.png'), num_lines=5, title='t'
  )
  height, width = read_png(path).shape[:2]
  assert width > height  # two images side by side
  with pytest.raises(ValueError):
    heatmaps.draw_correspondences(image_u, image_v, adjacency, (3, 2))


def test_feature_norm_maps_upsample_channel_norms():
  maps = np.zeros((2, 4, 2, 3), np.float32)
  maps[0, :, :, 0] = 3.0
  maps[0, :, :, 1] = 4.0  # norm 5 everywhere
  maps[1, 0, 0] = 2.0  # norm sqrt(12) in the top-left cell only
  norms = heatmaps.feature_norm_maps(maps, (H, W))
  assert norms.shape == (2, H, W)
  np.testing.assert_allclose(norms[0], 5.0, rtol=1e-5)
  assert norms[1].max() == pytest.approx(np.sqrt(12.0), rel=1e-4)
  assert norms[1, :8, :8].min() == pytest.approx(np.sqrt(12.0), rel=1e-4)
  assert norms[1, H // 2 :].max() == 0.0
  assert heatmaps.feature_norm_maps(maps[0], (H, W)).shape == (H, W)


def test_conditional_heatmaps_share_one_scale(tmp_path):
  rng = np.random.default_rng(0)
  maps = rng.random((3, 4, 2, 8)).astype(np.float32)
  maps[2] *= 3.0  # one pairing much stronger: the shared scale must reach it
  individual = rng.random((4, 2, 8)).astype(np.float32)
  query, gallery = grey_images(1)[0], grey_images(3, 90)
  figure = heatmaps.draw_conditional_heatmaps(
    query, gallery, maps, individual, gallery_pids=[1, 2, 1], query_pid=1
  )
  every = np.concatenate(
    [heatmaps.feature_norm_maps(maps, (H, W)), heatmaps.feature_norm_maps(individual, (H, W))[None]]
  )
  np.testing.assert_allclose(
    axes_by_gid(figure, 'colorbar_norm').get_ylim(), (every.min(), every.max()), rtol=1e-5
  )
  low, high = axes_by_gid(figure, 'colorbar_difference').get_ylim()
  assert low == pytest.approx(-high)
  pixels = read_png(drawing.save_figure(figure, str(tmp_path / 'heat.png')))
  assert is_green(frame_pixel(pixels, figure, 'heatmap_1_1'))  # column 0 is 'individual'
  assert is_red(frame_pixel(pixels, figure, 'heatmap_1_2'))

  sizes = []
  for count in (2, 3):
    path = heatmaps.plot_conditional_heatmaps(
      query, gallery, maps[:count], str(tmp_path / f'h{count}.png')
    )
    sizes.append(read_png(path).shape[:2])
  assert sizes[1][1] > sizes[0][1]  # one column per gallery image
  assert sizes[0][0] < read_png(str(tmp_path / 'heat.png')).shape[0]  # no difference row


def test_denormalize_inverts_imagenet_normalisation():
  image = np.random.default_rng(0).integers(0, 256, (H, W, 3)).astype(np.uint8)
  normalised = (image / 255.0 - drawing.IMAGENET_MEAN) / drawing.IMAGENET_STD
  restored = drawing.denormalize(normalised)
  assert restored.dtype == np.uint8
  np.testing.assert_array_equal(restored, image)
  assert drawing.denormalize(np.full((2, 2, 3), 50.0)).max() == 255

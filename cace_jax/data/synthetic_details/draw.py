"""Drawing primitives for the synthetic "details" pedestrians.

Everything here is a pure function of its arguments: a person's attributes, a
camera's style and one image's view parameters go in, pixels come out. How
those parameters are sampled lives in `synthetic.py`.

A person is drawn in a body frame (u, v) measured in person heights: v runs
from the top of the head (0) to the soles (1); in upright views +u is the
person's own left, in profile +u is the direction they face. Front views show
the person's left on the image's right, back views mirror that, which is what
moves a bag from one side of the image to the other when the person turns.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
NO_COLOR: RGB = (0, 0, 0)
VIEWS = ('front', 'back', 'side')
# Drawn at this multiple of the output size, then box-downsampled: cheap antialiasing.
SUPERSAMPLE = 3


@dataclasses.dataclass(frozen=True)
class PersonAttributes:
  """Everything that identifies a synthetic person.

  The first group is shared by all members of a family (what a global feature
  sees); the second group holds the details that separate family members.
  Unused colours (no hat, no logo, ...) are `NO_COLOR` so equality is exact.
  """

  pid: int
  family: int
  skin: RGB
  torso_color: RGB
  torso_style: str  # 'tshirt' | 'longsleeve' | 'jacket'
  inner_color: RGB  # shirt under an open jacket
  legs_color: RGB
  legs_style: str  # 'trousers' | 'shorts' | 'skirt'
  build: float  # width factor
  height: float  # stature factor
  backpack_color: RGB | None
  hair_style: str  # 'short' | 'long' | 'bun' | 'bald'
  hair_color: RGB
  hat_style: str | None  # None | 'cap' | 'beanie'
  hat_color: RGB
  shoe_color: RGB
  logo_shape: str | None  # None | 'circle' | 'square' | 'triangle' | 'stripe'
  logo_color: RGB
  bag_side: str | None  # None | 'left' | 'right' (the person's own side)
  bag_color: RGB


@dataclasses.dataclass(frozen=True)
class CameraStyle:
  """What one camera does to every image it takes."""

  wall: RGB
  floor: RGB
  accents: tuple[RGB, ...]  # clutter and occluder colours
  horizon: float  # floor starts at this fraction of the image height
  cast: tuple[float, float, float]  # per-channel gain
  brightness: float
  blur: float  # Gaussian radius in output pixels
  noise: float  # std of additive pixel noise
  scale: float  # mean person height / image height
  jitter: float  # std of the person's horizontal offset / image width
  view_probs: tuple[float, float, float]  # front, back, side


@dataclasses.dataclass(frozen=True)
class ViewParams:
  """One image's pose, placement and (optional) occluder."""

  camera: int  # 0-based
  view: str  # 'front' | 'back' | 'side'
  facing: int  # +1 faces image right, -1 left (side view only)
  scale: float  # person height / image height (before stature)
  center_x: float  # fraction of the width
  foot_y: float  # fraction of the height where the soles are
  arm_swing: tuple[float, float]  # radians
  leg_spread: float  # feet offset in person heights
  brightness: float
  clutter_seed: int  # background clutter and sensor noise
  occluded: bool = False
  occluder: str = 'box'  # bottom: 'box' | 'car' | 'bush'; side: 'pillar' | 'board'
  occluder_side: str = 'bottom'  # 'bottom' | 'left' | 'right'
  occluder_extent: float = 0.3  # fraction of the body hidden
  occluder_color: RGB = (128, 128, 128)


def shade_color(color: RGB, factor: float) -> RGB:
  """Scales a colour's brightness, clipped to [0, 255]."""
  return tuple(int(min(255, max(0, round(c * factor)))) for c in color)


def _jitter_color(rng: np.random.Generator, color: RGB, amount: float) -> RGB:
  return tuple(int(v) for v in np.clip(np.asarray(color) + rng.uniform(-amount, amount, 3), 0, 255))


class _Body:
  """Maps body-frame coordinates (in person heights) to canvas pixels."""

  def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, h: float, sign: int):
    self.draw, self.cx, self.top, self.h, self.sign = draw, cx, top, h, sign

  def pt(self, u, v):
    return (self.cx + self.sign * u * self.h, self.top + v * self.h)

  def box(self, u0, v0, u1, v1):
    (x0, y0), (x1, y1) = self.pt(u0, v0), self.pt(u1, v1)
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

  def ellipse(self, u, v, ru, rv, fill):
    self.draw.ellipse(self.box(u - ru, v - rv, u + ru, v + rv), fill=fill)

  def rect(self, u0, v0, u1, v1, fill, radius=0.0):
    if radius:
      self.draw.rounded_rectangle(self.box(u0, v0, u1, v1), radius=radius * self.h, fill=fill)
    else:
      self.draw.rectangle(self.box(u0, v0, u1, v1), fill=fill)

  def poly(self, points, fill):
    self.draw.polygon([self.pt(u, v) for u, v in points], fill=fill)

  def chord_top(self, u0, v0, u1, v1, fill):
    """Upper half of the ellipse in the box: caps and beanies."""
    self.draw.chord(self.box(u0, v0, u1, v1), 180, 360, fill=fill)

  def limb(self, p0, p1, width, fill):
    """A thick segment with round ends, so joints never show gaps."""
    w = max(1, int(round(width * self.h)))
    self.draw.line([self.pt(*p0), self.pt(*p1)], fill=fill, width=w)
    for u, v in (p0, p1):
      self.ellipse(u, v, width / 2, width / 2, fill)


def _lerp(p0, p1, t):
  return (p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t)


def _draw_arm(b: _Body, a: PersonAttributes, shoulder, dx: float, dy: float, shade: float):
  """Sleeve over skin from the shoulder along (dx, dy); returns the hand position."""
  hand = (shoulder[0] + 0.33 * dx, shoulder[1] + 0.33 * dy)
  k = a.build
  b.limb(shoulder, hand, 0.042 * k, shade_color(a.skin, shade))
  sleeve = 0.4 if a.torso_style == 'tshirt' else 0.9
  b.limb(shoulder, _lerp(shoulder, hand, sleeve), 0.052 * k, shade_color(a.torso_color, shade))
  b.ellipse(hand[0], hand[1], 0.024, 0.026, shade_color(a.skin, shade))
  return hand


def _draw_leg(b: _Body, a: PersonAttributes, hip, foot, shade: float, profile: bool):
  k = a.build
  legs, skin = shade_color(a.legs_color, shade), shade_color(a.skin, shade)
  if a.legs_style == 'trousers':
    b.limb(hip, foot, 0.078 * k, legs)
  else:
    b.limb(hip, foot, 0.06 * k, skin)
    if a.legs_style == 'shorts':
      b.limb(hip, _lerp(hip, foot, 0.42), 0.082 * k, legs)
  shoe = shade_color(a.shoe_color, shade)
  if profile:  # seen from the side a shoe points forward
    b.ellipse(foot[0] + 0.02, 0.962, 0.052 * k, 0.024, shoe)
  else:
    b.ellipse(foot[0], 0.962, 0.044 * k, 0.026, shoe)


def _draw_bag(b: _Body, a: PersonAttributes, hand, outward: float, shade: float):
  color = shade_color(a.bag_color, shade)
  top = (hand[0] + outward * 0.012, hand[1] + 0.012)
  b.limb(hand, top, 0.012, shade_color(color, 0.6))
  half = 0.045 * a.build
  b.rect(top[0] - half, top[1], top[0] + half, top[1] + 0.1, color, radius=0.012)


def _draw_hat(b: _Body, a: PersonAttributes, view: str):
  if a.hat_style is None:
    return
  band = shade_color(a.hat_color, 0.7)
  if a.hat_style == 'cap':
    b.chord_top(-0.062, -0.022, 0.062, 0.12, a.hat_color)
    if view == 'front':
      b.ellipse(0, 0.05, 0.068, 0.014, band)
    elif view == 'side':
      b.rect(0.02, 0.038, 0.098, 0.054, band)
  else:
    b.chord_top(-0.061, -0.04, 0.061, 0.12, a.hat_color)
    b.rect(-0.062, 0.03, 0.062, 0.056, band)


def _draw_logo(b: _Body, a: PersonAttributes, sw: float, ww: float):
  c, u, v, r = a.logo_color, 0.045 * a.build, 0.275, 0.03
  if a.logo_shape == 'circle':
    b.ellipse(u, v, r, r, c)
  elif a.logo_shape == 'square':
    b.rect(u - r, v - r, u + r, v + r, c)
  elif a.logo_shape == 'triangle':
    b.poly([(u - r * 1.2, v + r), (u + r * 1.2, v + r), (u, v - r * 1.2)], c)
  elif a.logo_shape == 'stripe':  # a band across the chest, following the torso's taper
    half = lambda y: sw + (ww - sw) * (y - 0.175) / (0.52 - 0.175)
    y0, y1 = 0.26, 0.305
    b.poly([(-half(y0), y0), (half(y0), y0), (half(y1), y1), (-half(y1), y1)], c)


def _draw_upright(b: _Body, a: PersonAttributes, view: ViewParams):
  """Front or back view; the back view is the front geometry mirrored."""
  front = view.view == 'front'
  k = a.build
  sw, ww, hip = 0.115 * k, 0.088 * k, 0.046 * k
  hair = a.hair_style != 'bald'
  if front and a.hair_style == 'long':  # falls behind the shoulders
    b.rect(-0.07, 0.05, 0.07, 0.25, a.hair_color, radius=0.03)
  for side in (-1, 1):
    _draw_leg(b, a, (side * hip, 0.52), (side * (hip + view.leg_spread), 0.945), 1.0, False)
  if a.legs_style != 'skirt':  # the crotch, so trousers do not split at the hip
    b.poly([(-ww, 0.49), (ww, 0.49), (hip + 0.039 * k, 0.6), (-hip - 0.039 * k, 0.6)], a.legs_color)
  else:
    b.poly([(-ww, 0.49), (ww, 0.49), (ww + 0.05, 0.72), (-ww - 0.05, 0.72)], a.legs_color)
  b.poly([(-sw, 0.18), (sw, 0.18), (ww, 0.525), (-ww, 0.525)], a.torso_color)
  for side in (-1, 1):  # rounded shoulders
    b.ellipse(side * (sw - 0.03), 0.205, 0.032 * k, 0.03, a.torso_color)
  b.rect(-0.022, 0.12, 0.022, 0.19, a.skin)  # neck: before long hair seen from behind
  if front:
    if a.torso_style == 'jacket':
      b.poly([(-0.03, 0.18), (0.03, 0.18), (0.024, 0.525), (-0.024, 0.525)], a.inner_color)
    if a.logo_shape is not None:  # on the chest: only the front shows it
      _draw_logo(b, a, sw, ww)
    if a.backpack_color is not None:  # straps
      for side in (-1, 1):
        b.limb(
          (side * 0.068 * k, 0.185),
          (side * 0.078 * k, 0.41),
          0.02,
          shade_color(a.backpack_color, 0.8),
        )
  hands = {}
  for i, side in enumerate((-1, 1)):
    ang = 0.06 + view.arm_swing[i]
    hands[side] = _draw_arm(
      b, a, (side * (sw - 0.03), 0.2), side * math.sin(ang), math.cos(ang), 1.0
    )
  if not front and a.backpack_color is not None:
    b.rect(-0.094 * k, 0.2, 0.094 * k, 0.46, a.backpack_color, radius=0.025)
    b.rect(-0.06 * k, 0.36, 0.06 * k, 0.44, shade_color(a.backpack_color, 0.75), radius=0.012)
  if a.bag_side is not None:
    side = 1 if a.bag_side == 'left' else -1
    _draw_bag(b, a, hands[side], side, 1.0)
  if not front and a.hair_style == 'long':  # over the upper back
    b.rect(-0.066, 0.06, 0.066, 0.25, a.hair_color, radius=0.03)
  if a.hair_style == 'bun':
    b.ellipse(0, -0.008 if front else 0.03, 0.03, 0.027, a.hair_color)
  if front:
    if hair:
      b.ellipse(0, 0.063, 0.06, 0.07, a.hair_color)
    b.ellipse(0, 0.085, 0.05, 0.065, a.skin)
    for side in (-1, 1):
      b.ellipse(side * 0.02, 0.083, 0.008, 0.008, (40, 30, 30))
  else:
    b.ellipse(0, 0.075, 0.052, 0.075, a.skin)
    if hair:  # short hair leaves the nape free; long hair covers the whole head
      is_long = a.hair_style == 'long'
      b.ellipse(0, 0.074 if is_long else 0.066, 0.056, 0.08 if is_long else 0.072, a.hair_color)
  _draw_hat(b, a, view.view)


def _draw_profile(b: _Body, a: PersonAttributes, view: ViewParams):
  """Side view: +u is the facing direction; far limbs are darker."""
  k, swing, stride = a.build, view.arm_swing[0], view.leg_spread
  # Facing image right the camera sees the person's right side, and vice versa.
  near = 'right' if view.facing > 0 else 'left'
  shoulder = (-0.005, 0.2)
  far_hand = _draw_arm(b, a, shoulder, math.sin(-0.8 * swing), math.cos(0.8 * swing), 0.72)
  if a.bag_side is not None and a.bag_side != near:
    _draw_bag(b, a, far_hand, -4.5, 0.72)  # hangs behind the hip, so it peeks out
  if a.hair_style == 'long':
    b.rect(-0.068, 0.05, -0.01, 0.25, a.hair_color, radius=0.02)
  if a.backpack_color is not None:
    b.rect(-0.145 * k, 0.2, -0.045 * k, 0.46, a.backpack_color, radius=0.02)
  for foot_u, shade in ((-stride, 0.72), (stride, 1.0)):
    _draw_leg(b, a, (0.0, 0.52), (foot_u, 0.945), shade, True)
  if a.legs_style == 'skirt':
    b.poly([(-0.065 * k, 0.49), (0.06 * k, 0.49), (0.1 * k, 0.72), (-0.1 * k, 0.72)], a.legs_color)
  else:
    b.poly([(-0.06 * k, 0.49), (0.062 * k, 0.49), (0.05 * k, 0.6), (-0.05 * k, 0.6)], a.legs_color)
  b.poly(
    [(-0.078 * k, 0.19), (0.055 * k, 0.19), (0.068 * k, 0.525), (-0.066 * k, 0.525)], a.torso_color
  )
  b.ellipse(-0.012 * k, 0.21, 0.066 * k, 0.035, a.torso_color)  # shoulder
  b.rect(-0.02, 0.12, 0.02, 0.19, a.skin)
  if a.torso_style == 'jacket':
    b.poly(
      [(0.035 * k, 0.19), (0.055 * k, 0.19), (0.068 * k, 0.525), (0.05 * k, 0.525)], a.inner_color
    )
  near_hand = _draw_arm(b, a, shoulder, math.sin(swing), math.cos(swing), 1.0)
  if a.bag_side == near:
    _draw_bag(b, a, near_hand, 0.0, 1.0)
  if a.hair_style == 'bun':
    b.ellipse(-0.05, 0.03, 0.028, 0.027, a.hair_color)
  b.ellipse(0.005, 0.075, 0.05, 0.075, a.skin)
  b.poly([(0.045, 0.065), (0.068, 0.095), (0.045, 0.1)], a.skin)  # nose
  if a.hair_style != 'bald':
    b.ellipse(-0.012, 0.062, 0.052, 0.068, a.hair_color)
    b.ellipse(0.02, 0.09, 0.036, 0.058, a.skin)
  b.ellipse(0.036, 0.078, 0.008, 0.008, (40, 30, 30))
  _draw_hat(b, a, 'side')


def draw_pedestrian(
  draw: ImageDraw.ImageDraw,
  attrs: PersonAttributes,
  view: ViewParams,
  cx: float,
  top: float,
  h: float,
) -> None:
  """Draws one person whose head top is at `top` and who is `h` pixels tall."""
  if view.view == 'side':
    _draw_profile(_Body(draw, cx, top, h, view.facing), attrs, view)
  else:
    _draw_upright(_Body(draw, cx, top, h, 1 if view.view == 'front' else -1), attrs, view)


def draw_background(
  draw: ImageDraw.ImageDraw, cam: CameraStyle, rng: np.random.Generator, width: int, height: int
) -> None:
  """Wall, floor and random clutter in the camera's palette."""
  W, H = width, height
  hy = H * (cam.horizon + rng.normal(0, 0.02))
  draw.rectangle([0, 0, W, H], fill=_jitter_color(rng, cam.wall, 10))
  draw.rectangle([0, hy, W, H], fill=_jitter_color(rng, cam.floor, 10))
  for _ in range(int(rng.integers(3, 9))):
    kind = int(rng.integers(6))
    col = _jitter_color(rng, cam.accents[int(rng.integers(len(cam.accents)))], 20)
    x = rng.uniform(-0.2, 1.0) * W
    if kind == 0:  # window, door, shop front
      w, h = rng.uniform(0.15, 0.5) * W, rng.uniform(0.1, 0.4) * H
      y = rng.uniform(0, max(1.0, hy - h))
      draw.rectangle([x, y, x + w, y + h], fill=col)
    elif kind == 1:  # pole, tree trunk
      y0, w = rng.uniform(-0.2, 0.3) * H, rng.uniform(0.03, 0.08) * W
      draw.rectangle([x, y0, x + w, hy + rng.uniform(0, 0.1) * H], fill=col)
    elif kind == 2:  # railing, kerb
      y = rng.uniform(0.2, 0.95) * H
      y1 = y + rng.normal(0, 0.03) * H
      draw.line([(0, y), (W, y1)], fill=col, width=max(1, int(rng.uniform(0.01, 0.05) * W)))
    elif kind == 3:  # bush, blob
      r, y = rng.uniform(0.1, 0.3) * W, hy + rng.normal(0, 0.05) * H
      draw.ellipse([x - r, y - 0.7 * r, x + r, y + 0.7 * r], fill=col)
    elif kind == 4:  # floor marking
      y = rng.uniform(hy, H)
      draw.line(
        [(x, y), (x + rng.uniform(0.3, 1.0) * W, y + rng.normal(0, 0.05) * H)],
        fill=shade_color(cam.floor, rng.uniform(0.7, 1.3)),
        width=max(1, int(0.02 * W)),
      )
    else:  # a distant figure, so not every person-sized blob is the target
      w, h = rng.uniform(0.06, 0.12) * W, rng.uniform(0.15, 0.3) * H
      y = hy - h * rng.uniform(0.6, 1.0)
      draw.rounded_rectangle([x, y, x + w, y + h], radius=w / 3, fill=col)


def draw_occluder(
  draw: ImageDraw.ImageDraw,
  view: ViewParams,
  rng: np.random.Generator,
  cx: float,
  top: float,
  h: float,
  width: int,
  height: int,
) -> None:
  """An opaque object hiding `view.occluder_extent` of the body from one side."""
  c = view.occluder_color
  dark, light = shade_color(c, 0.6), shade_color(c, 1.3)
  e, foot, unit = view.occluder_extent, top + h, max(1, int(0.012 * h))
  if view.occluder_side == 'bottom':
    y0 = foot - e * h
    half = h * rng.uniform(0.22, 0.45)
    if view.occluder == 'car':
      half *= 2.0
      draw.rounded_rectangle([cx - half, y0, cx + half, height + h * 0.1], radius=0.08 * h, fill=c)
      draw.rectangle([cx - half * 0.8, y0 + 0.03 * h, cx + half * 0.8, y0 + 0.1 * h], fill=light)
      for wx in (cx - half * 0.6, cx + half * 0.6):
        draw.ellipse(
          [wx - 0.07 * h, height - 0.09 * h, wx + 0.07 * h, height + 0.05 * h], fill=(25, 25, 25)
        )
    elif view.occluder == 'bush':
      for _ in range(5):
        r, x = h * rng.uniform(0.1, 0.2), cx + rng.uniform(-1, 1) * half
        y = y0 + r * rng.uniform(0.8, 1.2)
        draw.ellipse([x - r, y - r, x + r, y + r + h], fill=shade_color(c, rng.uniform(0.8, 1.1)))
      draw.rectangle([cx - half - 0.1 * h, y0 + 0.15 * h, cx + half + 0.1 * h, height], fill=c)
    else:  # a box or crate
      draw.rectangle([cx - half, y0, cx + half, height], fill=c, outline=dark, width=2 * unit)
      tape = y0 + 0.08 * h
      draw.line([(cx - half, tape), (cx + half, tape)], fill=light, width=2 * unit)
  else:
    body_half = 0.17 * h
    if view.occluder_side == 'left':
      x0, x1 = -1.0, cx - body_half + 2 * e * body_half
    else:
      x0, x1 = cx + body_half - 2 * e * body_half, width + 1.0
    y0 = -1.0 if view.occluder == 'pillar' else top + rng.uniform(0.0, 0.3) * h
    draw.rectangle([x0, y0, x1, height], fill=c)
    edge = x1 if view.occluder_side == 'left' else x0
    draw.line(
      [(edge, y0), (edge, height)],
      fill=dark if view.occluder == 'pillar' else light,
      width=2 * unit,
    )


def render_person(
  attrs: PersonAttributes | None,
  view: ViewParams,
  camera: CameraStyle,
  height: int,
  width: int,
  supersample: int = SUPERSAMPLE,
) -> np.ndarray:
  """Renders one image of a person as a camera sees it.

  Args:
    attrs: the person, or None for a background-only image (junk).
    view: pose, placement and occluder of this image; also seeds the clutter
      and noise, so equal inputs give equal pixels.
    camera: colour cast, blur, noise and background palette.
    height: output height in pixels.
    width: output width in pixels.
    supersample: drawing resolution multiple, for antialiasing.

  Returns:
    uint8 array [height, width, 3].
  """
  s = supersample
  W, H = width * s, height * s
  rng = np.random.default_rng(view.clutter_seed)
  canvas = Image.new('RGB', (W, H))
  draw = ImageDraw.Draw(canvas)
  draw_background(draw, camera, rng, W, H)
  h = view.scale * H * (attrs.height if attrs is not None else 1.0)
  cx, top = view.center_x * W, view.foot_y * H - h
  if attrs is not None:
    draw_pedestrian(draw, attrs, view, cx, top, h)
  if view.occluded:
    draw_occluder(draw, view, rng, cx, top, h, W, H)
  img = canvas.reduce(s)
  if camera.blur > 0.05:
    img = img.filter(ImageFilter.GaussianBlur(camera.blur))
  gain = np.asarray(camera.cast, np.float32) * np.float32(camera.brightness * view.brightness)
  pixels = np.asarray(img, np.float32) * gain
  pixels += rng.normal(0.0, camera.noise, pixels.shape).astype(np.float32)
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

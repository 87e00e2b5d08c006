"""Sampling for synthetic_details: families, their members, cameras and views.

Each function draws from the generator it is given; `synthetic.py` decides
which stream (seed, purpose, identity, image) feeds which call, so results do
not depend on the order things are generated in.

Family members share the main colours, clothing styles, build, skin and
backpack of their family and differ in detail slots (hair, hat, shoes, chest
logo, bag). Detail palettes are few, well-separated colours, so a changed
detail is a visible change.
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np

from cace_jax.data.synthetic_details.draw import NO_COLOR, CameraStyle, PersonAttributes, ViewParams

# Palettes. Main colours are what families differ in; detail palettes are few,
# well-separated colours so a changed detail is a visible change.
_MAIN_COLORS = [
  (30, 30, 35),
  (70, 70, 75),
  (130, 130, 135),
  (200, 200, 200),
  (235, 235, 230),
  (30, 40, 80),
  (40, 80, 170),
  (110, 160, 215),
  (70, 95, 135),
  (30, 80, 45),
  (95, 105, 55),
  (190, 170, 120),
  (110, 70, 40),
  (120, 30, 40),
  (190, 40, 40),
  (230, 120, 40),
  (225, 200, 60),
  (220, 130, 160),
  (100, 50, 130),
  (40, 140, 140),
  (160, 190, 90),
  (240, 180, 150),
]
_LEG_COLORS = [
  (30, 30, 35),
  (60, 60, 65),
  (50, 65, 110),
  (70, 95, 135),
  (30, 40, 80),
  (190, 170, 120),
  (110, 70, 40),
  (95, 105, 55),
  (140, 140, 145),
  (225, 225, 220),
  (120, 30, 40),
]
_SKIN_TONES = [(242, 206, 180), (226, 176, 140), (198, 136, 98), (160, 106, 72), (112, 74, 50)]
_HAIR_COLORS = [
  (20, 18, 16),
  (75, 48, 30),
  (140, 95, 55),
  (215, 180, 100),
  (170, 170, 170),
  (150, 60, 30),
]
_DETAIL_COLORS = [
  (220, 30, 30),
  (30, 90, 220),
  (245, 205, 20),
  (30, 160, 60),
  (245, 245, 245),
  (20, 20, 20),
  (245, 125, 20),
  (150, 50, 190),
  (0, 185, 195),
  (240, 100, 175),
]
_SHOE_COLORS = [
  (245, 245, 245),
  (20, 20, 20),
  (210, 30, 30),
  (40, 80, 210),
  (235, 195, 25),
  (35, 150, 60),
  (125, 75, 40),
  (140, 140, 150),
]

DETAIL_SLOTS = ('hair', 'hat', 'shoes', 'logo', 'bag')
# Slots that can be seen from every view: two family members must differ in one.
VISIBLE_SLOTS = ('hat', 'shoes', 'bag')
_SLOT_FIELDS = {
  'hair': ('hair_style', 'hair_color'),
  'hat': ('hat_style', 'hat_color'),
  'shoes': ('shoe_color',),
  'logo': ('logo_shape', 'logo_color'),
  'bag': ('bag_side', 'bag_color'),
}


def _pick(rng: np.random.Generator, items, p=None):
  return items[int(rng.choice(len(items), p=p))]


def _vary_color(rng: np.random.Generator, color, amount: float = 12.0):
  varied = np.asarray(color) + rng.uniform(-amount, amount, 3)
  return tuple(int(v) for v in np.clip(varied, 0, 255))


def _color_distance(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def _sample_slot(rng: np.random.Generator, slot: str, torso) -> dict:
  """Fields of one detail slot; unused colours are NO_COLOR so equality is exact."""
  if slot == 'hair':
    style = _pick(rng, ('short', 'long', 'bun', 'bald'), p=(0.45, 0.3, 0.13, 0.12))
    color = NO_COLOR if style == 'bald' else _pick(rng, _HAIR_COLORS)
    return {'hair_style': style, 'hair_color': color}
  if slot == 'hat':
    if rng.random() < 0.55:
      return {'hat_style': None, 'hat_color': NO_COLOR}
    return {'hat_style': _pick(rng, ('cap', 'beanie')), 'hat_color': _pick(rng, _DETAIL_COLORS)}
  if slot == 'shoes':
    return {'shoe_color': _pick(rng, _SHOE_COLORS)}
  if slot == 'logo':
    if rng.random() < 0.3:
      return {'logo_shape': None, 'logo_color': NO_COLOR}
    # A logo must contrast with the shirt it is printed on.
    colors = [c for c in _DETAIL_COLORS if _color_distance(c, torso) > 120]
    return {
      'logo_shape': _pick(rng, ('circle', 'square', 'triangle', 'stripe')),
      'logo_color': _pick(rng, colors),
    }
  if rng.random() < 0.4:
    return {'bag_side': None, 'bag_color': NO_COLOR}
  return {'bag_side': _pick(rng, ('left', 'right')), 'bag_color': _pick(rng, _DETAIL_COLORS)}


def detail_differences(a: PersonAttributes, b: PersonAttributes) -> list[str]:
  """The detail slots (`DETAIL_SLOTS`) in which two people differ."""
  return [
    slot
    for slot, fields in _SLOT_FIELDS.items()
    if any(getattr(a, f) != getattr(b, f) for f in fields)
  ]


def sample_family(
  rng: np.random.Generator,
  family: int,
  avoid: tuple[PersonAttributes, ...] | list = (),
  min_distance: float = 90.0,
) -> PersonAttributes:
  """Samples a family's shared look, as a prototype member (pid 0).

  Args:
    rng: the family's stream.
    family: family index, recorded in the attributes.
    avoid: earlier families' prototypes; main colours (torso + legs) are kept
      at least `min_distance` apart from theirs, so families differ globally.
    min_distance: summed RGB distance of torso and leg colours.

  Returns:
    Attributes whose detail slots are the family's defaults.
  """
  best, best_gap = None, -1.0
  for _ in range(100):
    torso = _vary_color(rng, _pick(rng, _MAIN_COLORS))
    legs = _vary_color(rng, _pick(rng, _LEG_COLORS))
    gap = min(
      (_color_distance(torso, o.torso_color) + _color_distance(legs, o.legs_color) for o in avoid),
      default=np.inf,
    )
    if gap > best_gap:
      best, best_gap = (torso, legs), gap
    if gap >= min_distance:
      break
  torso, legs = best
  fields = dict(
    pid=0,
    family=family,
    skin=_pick(rng, _SKIN_TONES),
    torso_color=torso,
    torso_style=_pick(rng, ('tshirt', 'longsleeve', 'jacket'), p=(0.4, 0.3, 0.3)),
    inner_color=_pick(rng, _MAIN_COLORS),
    legs_color=legs,
    legs_style=_pick(rng, ('trousers', 'shorts', 'skirt'), p=(0.65, 0.2, 0.15)),
    build=float(rng.uniform(0.88, 1.15)),
    height=float(rng.uniform(0.92, 1.0)),
    backpack_color=_vary_color(rng, _pick(rng, _MAIN_COLORS)) if rng.random() < 0.25 else None,
  )
  for slot in DETAIL_SLOTS:
    fields.update(_sample_slot(rng, slot, torso))
  return PersonAttributes(**fields)


def _distinct(a: PersonAttributes, b: PersonAttributes) -> bool:
  diffs = detail_differences(a, b)
  return len(diffs) >= 2 and any(s in VISIBLE_SLOTS for s in diffs)


def sample_identity(
  rng: np.random.Generator,
  prototype: PersonAttributes,
  pid: int,
  members: tuple[PersonAttributes, ...] | list = (),
) -> PersonAttributes:
  """Samples a family member: the prototype with 2-3 detail slots re-drawn.

  The result differs from every earlier member in at least two detail slots,
  at least one of them visible from every view (hat, shoes, bag).
  """
  for attempt in range(200):
    # Mostly small edits keep members alike; fall back to re-drawing everything.
    if attempt < 150:
      first = _pick(rng, VISIBLE_SLOTS)
      rest = [s for s in DETAIL_SLOTS if s != first]
      extra = rng.choice(len(rest), size=int(rng.integers(1, 3)), replace=False)
      slots = [first] + [rest[int(i)] for i in extra]
    else:
      slots = list(DETAIL_SLOTS)
    fields = {}
    for slot in slots:
      fields.update(_sample_slot(rng, slot, prototype.torso_color))
    candidate = dataclasses.replace(prototype, pid=pid, **fields)
    if all(_distinct(candidate, m) for m in members):
      return candidate
  raise RuntimeError(
    f'could not find a distinct member for family {prototype.family}; lower ids_per_family'
  )


def _hsv(h: float, s: float, v: float):
  return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def sample_camera(rng: np.random.Generator, index: int) -> CameraStyle:
  """A camera's look; hues are spread over the cameras so backgrounds differ."""
  hue = index * 0.618 + rng.uniform(0, 0.1)
  cast = 1.0 + rng.uniform(-0.13, 0.13, 3)
  return CameraStyle(
    wall=_hsv(hue, rng.uniform(0.1, 0.45), rng.uniform(0.45, 0.85)),
    floor=_hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.25), rng.uniform(0.3, 0.6)),
    accents=tuple(
      _hsv(hue + rng.uniform(-0.3, 0.3), rng.uniform(0.15, 0.7), rng.uniform(0.2, 0.9))
      for _ in range(4)
    ),
    horizon=float(rng.uniform(0.45, 0.75)),
    cast=tuple(float(c) for c in cast / cast.mean()),
    brightness=float(rng.uniform(0.78, 1.15)),
    blur=float(rng.choice([0.0, rng.uniform(0.3, 0.9)])),
    noise=float(rng.uniform(1.0, 5.0)),
    scale=float(rng.uniform(0.8, 0.92)),
    jitter=float(rng.uniform(0.02, 0.05)),
    view_probs=tuple(float(p) for p in rng.dirichlet([3.0, 3.0, 1.5])),
  )


def sample_view(
  rng: np.random.Generator, camera: int, style: CameraStyle, occlusion_prob: float
) -> ViewParams:
  """One image's view, pose, framing and occluder under a camera.

  Occluder parameters are always drawn (so forcing an occlusion later does not
  shift any other draw); `occluded` is set with probability `occlusion_prob`.
  """
  view = _pick(rng, ('front', 'back', 'side'), p=style.view_probs)
  scale = float(np.clip(style.scale * rng.uniform(0.94, 1.06), 0.7, 0.95))
  side = view == 'side'
  swing = rng.uniform(-0.45, 0.45, 2) if side else rng.uniform(-0.02, 0.3, 2)
  occ_side = _pick(rng, ('bottom', 'left', 'right'), p=(0.6, 0.2, 0.2))
  occ_kinds = ('box', 'car', 'bush') if occ_side == 'bottom' else ('pillar', 'board')
  return ViewParams(
    camera=camera,
    view=view,
    facing=1 if rng.random() < 0.5 else -1,
    scale=scale,
    center_x=float(np.clip(0.5 + rng.normal(0, style.jitter), 0.38, 0.62)),
    foot_y=float(rng.uniform(0.945, 0.99)),
    arm_swing=(float(swing[0]), float(swing[1])),
    leg_spread=float(rng.uniform(0.03, 0.13) if side else rng.uniform(0.0, 0.04)),
    brightness=float(rng.uniform(0.9, 1.1)),
    clutter_seed=int(rng.integers(2**31)),
    occluded=bool(rng.random() < occlusion_prob),
    occluder=_pick(rng, occ_kinds),
    occluder_side=occ_side,
    occluder_extent=float(rng.uniform(0.2, 0.5)),
    occluder_color=_pick(rng, style.accents + (style.wall,)),
  )

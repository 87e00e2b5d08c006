"""synthetic_details: procedural pedestrians whose identities differ in details.

The embedded default dataset, generated anywhere in seconds (no downloads):

  python tools/synthetic.py --out data/manual/synthetic_details/default

Identities come in families that share their overall look (clothing colours
and styles, build, skin, backpack) and differ only in small details (hair,
hat, shoes, chest logo, bag): a global feature confuses family members, aligned
local clues separate them, which is the paper's point. Cameras differ in colour
cast, brightness, blur, framing and background; images differ in pose, view
(front / back / side: side accessories mirror, the logo shows only from the
front) and, optionally, an occluder.

The output is Market-1501's layout and file names (`bounding_box_train/`,
`query/`, `bounding_box_test/`, `PPPP_cCsS_FFFFFF_BB.jpg`, junk pid -1,
distractors pid 0), so the Market-1501 reading code reads it unchanged. Every
random draw comes from a stream keyed by (seed, purpose, identity, image), so
the output is byte-identical for a config and independent of iteration order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import shutil
import tempfile

import numpy as np
from PIL import Image

from cace_jax.data.synthetic_details.draw import (
  CameraStyle,
  PersonAttributes,
  ViewParams,
  render_person,
)
from cace_jax.data.synthetic_details.sample import (
  DETAIL_SLOTS,
  VISIBLE_SLOTS,
  detail_differences,
  sample_camera,
  sample_family,
  sample_identity,
  sample_view,
)

__all__ = [
  'SyntheticConfig',
  'PRESETS',
  'PersonAttributes',
  'CameraStyle',
  'ViewParams',
  'ImageRecord',
  'DETAIL_SLOTS',
  'VISIBLE_SLOTS',
  'generate_dataset',
  'identity_attributes',
  'camera_styles',
  'plan_images',
  'render_record',
  'render_person',
  'save_preview',
  'sample_family',
  'sample_identity',
  'sample_camera',
  'sample_view',
  'detail_differences',
]

# Bump when drawing or sampling changes: a dataset made by another version is stale.
GENERATOR_VERSION = 1
CONFIG_FILE = 'synthetic_config.json'
SPLIT_FOLDERS = {'train': 'bounding_box_train', 'query': 'query', 'gallery': 'bounding_box_test'}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What to generate. Train and test identities are disjoint families."""

  seed: int = 0
  num_train_families: int = 30
  num_test_families: int = 25
  ids_per_family: int = 4
  num_cameras: int = 6
  images_per_id: int = 12
  min_cameras_per_id: int = 2
  max_cameras_per_id: int = 5
  image_height: int = 128
  image_width: int = 64
  occlusion_prob: float = 0.0  # train and gallery images
  query_occlusion: bool = False  # Occluded-Duke style: every query occluded
  jpeg_quality: int = 90
  num_junk: int = 60  # gallery images with pid -1 (fragments, background)
  num_distractors: int = 100  # gallery images with pid 0 (strangers)

  def __post_init__(self):
    total_ids = (self.num_train_families + self.num_test_families) * self.ids_per_family
    checks = [
      (2 <= self.num_cameras <= 9, 'num_cameras must be in 2..9 (file names hold one digit)'),
      (
        2 <= self.min_cameras_per_id <= min(self.max_cameras_per_id, self.num_cameras),
        'need 2 <= min_cameras_per_id <= max_cameras_per_id, num_cameras',
      ),
      # Test identities need a query and a gallery image in each of their cameras.
      (
        2 * self.min_cameras_per_id <= self.images_per_id <= 99,
        'images_per_id must be in 2 * min_cameras_per_id..99',
      ),
      (
        self.num_train_families >= 1 and self.num_test_families >= 1,
        'need train and test families',
      ),
      (self.ids_per_family >= 1 and total_ids <= 9999, 'need 1..9999 identities in total'),
      (self.image_height >= 32 and self.image_width >= 16, 'images must be at least 32x16'),
      (0.0 <= self.occlusion_prob <= 1.0, 'occlusion_prob must be in [0, 1]'),
      (1 <= self.jpeg_quality <= 100, 'jpeg_quality must be in 1..100'),
      (
        0 <= self.num_junk <= 20000 and 0 <= self.num_distractors <= 20000,
        'num_junk and num_distractors must be in 0..20000',
      ),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'SyntheticConfig: {message} ({self})')


PRESETS = {
  # 120 train / 100 test ids: 1,440 train, 353 query, 1,007 gallery images; 6-8 s.
  'default': SyntheticConfig(),
  # For tests: 9 train / 6 test ids, 97 images; ~0.2 s.
  'tiny': SyntheticConfig(
    num_train_families=3,
    num_test_families=2,
    ids_per_family=3,
    num_cameras=4,
    images_per_id=6,
    max_cameras_per_id=3,
    num_junk=3,
    num_distractors=4,
  ),
  # Occluded-Duke style: every query and ~10% of train and gallery images occluded.
  'occluded': SyntheticConfig(occlusion_prob=0.1, query_occlusion=True),
  # Harder: the same details, 8 identities per family (120 train / 104 test ids).
  # A random 4-identity batch holds two members of a family twice as often as
  # in 'default' (32% of batches, not 15%); each query has 7 look-alike impostors.
  'large_families': SyntheticConfig(num_train_families=15, num_test_families=13, ids_per_family=8),
}


def identity_families(pids: np.ndarray, config: SyntheticConfig) -> np.ndarray:
  """The family of each identity, as `identity_attributes` lays them out.

  Family f holds pids 1 + f * ids_per_family ... (f + 1) * ids_per_family;
  distractors (pid 0) and junk (pid -1) belong to no family and get -1.
  """
  pids = np.asarray(pids)
  return np.where(pids >= 1, (pids - 1) // config.ids_per_family, -1)


# Stream tags: each purpose draws from its own stream.
_FAMILY, _MEMBERS, _CAMERA, _PLAN, _VIEW, _JUNK, _DISTRACTOR, _PREVIEW = range(8)


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=keys))


def identity_attributes(config: SyntheticConfig) -> dict[int, PersonAttributes]:
  """All train and test identities by pid, deterministic for a config.

  Family f holds pids 1 + f * ids_per_family ...; the first
  `num_train_families` families are the training identities.
  """
  prototypes, people = [], {}
  for family in range(config.num_train_families + config.num_test_families):
    prototypes.append(sample_family(_rng(config.seed, _FAMILY, family), family, prototypes))
  for family, prototype in enumerate(prototypes):
    rng, members = _rng(config.seed, _MEMBERS, family), []
    for m in range(config.ids_per_family):
      members.append(
        sample_identity(rng, prototype, 1 + family * config.ids_per_family + m, members)
      )
      people[members[-1].pid] = members[-1]
  return people


def camera_styles(config: SyntheticConfig) -> list[CameraStyle]:
  """The config's cameras, 0-based (file names show index + 1)."""
  return [sample_camera(_rng(config.seed, _CAMERA, c), c) for c in range(config.num_cameras)]


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image to write: where it goes and how to draw it."""

  split: str  # 'train' | 'query' | 'gallery'
  filename: str
  pid: int  # -1 junk, 0 distractor
  attrs: PersonAttributes | None  # None: background only
  view: ViewParams


def _name(pid: int, camera: int, seq: int, frame: int) -> str:
  head = '-1' if pid < 0 else f'{pid:04d}'
  return f'{head}_c{camera + 1}s{seq}_{frame:06d}_01.jpg'


def _plan_identity(
  config: SyntheticConfig, attrs: PersonAttributes, test: bool, cams: list[CameraStyle]
) -> list[ImageRecord]:
  """Spreads one identity's images over cameras; a test id gives one query per camera."""
  rng, n = _rng(config.seed, _PLAN, attrs.pid), config.images_per_id
  # A test camera needs a query and a gallery image, so every query has a
  # gallery match in another camera.
  per_cam = 2 if test else 1
  most = min(config.max_cameras_per_id, config.num_cameras, n // per_cam)
  num_cams = int(rng.integers(config.min_cameras_per_id, most + 1))
  chosen = np.sort(rng.choice(config.num_cameras, num_cams, replace=False))
  counts = per_cam + rng.multinomial(n - per_cam * num_cams, np.full(num_cams, 1 / num_cams))
  seq_of = dict(zip(chosen.tolist(), rng.integers(1, 7, num_cams).tolist()))
  base, step = int(rng.integers(1, 900_000)), int(rng.integers(5, 60))
  records, seen = [], set()
  for j, cam in enumerate(np.repeat(chosen, counts).tolist()):
    view = sample_view(
      _rng(config.seed, _VIEW, attrs.pid, j), cam, cams[cam], config.occlusion_prob
    )
    split = 'train'
    if test:
      split = 'gallery' if cam in seen else 'query'
      seen.add(cam)
      if split == 'query' and config.query_occlusion:
        view = dataclasses.replace(view, occluded=True)
    name = _name(attrs.pid, cam, seq_of[cam], base + step * j)
    records.append(ImageRecord(split, name, attrs.pid, attrs, view))
  return records


def plan_images(config: SyntheticConfig) -> list[ImageRecord]:
  """Every image of the dataset, with its split, file name, person and view."""
  cams, people = camera_styles(config), identity_attributes(config)
  num_train_ids = config.num_train_families * config.ids_per_family
  records = []
  for pid, attrs in people.items():
    records += _plan_identity(config, attrs, pid > num_train_ids, cams)
  for k in range(config.num_distractors):  # strangers, each from a family of their own
    rng = _rng(config.seed, _DISTRACTOR, k)
    cam, seq = int(rng.integers(config.num_cameras)), int(rng.integers(1, 7))
    attrs = sample_identity(rng, sample_family(rng, -1), 0)
    view = sample_view(rng, cam, cams[cam], config.occlusion_prob)
    records.append(ImageRecord('gallery', _name(0, cam, seq, 100 + 13 * k), 0, attrs, view))
  for k in range(config.num_junk):  # bad detections: background, or a fragment of someone
    rng = _rng(config.seed, _JUNK, k)
    cam, seq = int(rng.integers(config.num_cameras)), int(rng.integers(1, 7))
    attrs = sample_identity(rng, sample_family(rng, -1), -1) if rng.random() < 0.6 else None
    view = dataclasses.replace(
      sample_view(rng, cam, cams[cam], 0.0),
      scale=float(rng.uniform(1.4, 2.4)),
      foot_y=float(rng.uniform(0.6, 2.2)),
      center_x=float(rng.uniform(0.0, 1.0)),
    )
    records.append(ImageRecord('gallery', _name(-1, cam, seq, 100 + 17 * k), -1, attrs, view))
  return records


def render_record(
  record: ImageRecord, cameras: list[CameraStyle], config: SyntheticConfig
) -> np.ndarray:
  """The pixels of one planned image, uint8 [image_height, image_width, 3]."""
  return render_person(
    record.attrs, record.view, cameras[record.view.camera], config.image_height, config.image_width
  )


def _count(records: list[ImageRecord]) -> dict[str, dict[str, int]]:
  counts = {}
  for split in SPLIT_FOLDERS:
    part = [r for r in records if r.split == split]
    counts[split] = {
      'images': len(part),
      'ids': len({r.pid for r in part if r.pid > 0}),
      'junk': sum(r.pid == -1 for r in part),
      'distractors': sum(r.pid == 0 for r in part),
      'occluded': sum(r.view.occluded for r in part),
    }
  return counts


def _config_record(config: SyntheticConfig) -> dict:
  return {'generator_version': GENERATOR_VERSION, 'config': dataclasses.asdict(config)}


def _existing_counts(out: Path, config: SyntheticConfig) -> dict | None:
  """Counts of a complete dataset of this config at `out`; None if `out` is free."""
  if not out.exists():
    return None
  if not out.is_dir():
    raise FileExistsError(f'{out} exists and is not a directory; refusing to overwrite it')
  if not any(out.iterdir()):
    return None
  meta = out / CONFIG_FILE
  if not meta.is_file():
    raise FileExistsError(
      f'{out} is not empty and holds no {CONFIG_FILE}, so it is not a synthetic dataset; '
      'refusing to overwrite it. Remove it or choose another output folder.'
    )
  stored = json.loads(meta.read_text())
  if {k: stored.get(k) for k in ('generator_version', 'config')} != _config_record(config):
    raise FileExistsError(
      f'{out} holds a synthetic dataset made with another config or generator version '
      f'(see {meta}); refusing to overwrite it. Remove it or choose another output folder.'
    )
  for split, folder in SPLIT_FOLDERS.items():
    found = len(list((out / folder).glob('*.jpg')))
    if found != stored['counts'][split]['images']:
      raise FileExistsError(
        f'{out / folder} holds {found} images but {meta} lists '
        f'{stored["counts"][split]["images"]}; remove {out} to regenerate.'
      )
  return stored['counts']


def generate_dataset(
  out_dir: str | os.PathLike, config: SyntheticConfig = PRESETS['default']
) -> dict[str, dict[str, int]]:
  """Writes the dataset in Market-1501's layout, unless it is already there.

  Images go into a hidden temporary sibling of `out_dir`, then
  `synthetic_config.json` (last), then the folder is renamed into place: an
  interrupted run never leaves a dataset that looks complete.

  Args:
    out_dir: target folder; created, or reused as it is if it holds a complete
      dataset of the same config and generator version.
    config: what to generate.

  Returns:
    {split: {'images', 'ids', 'junk', 'distractors', 'occluded'}} for the
    splits 'train', 'query', 'gallery': 'images' counts files (junk included),
    'ids' identities with pid > 0.

  Raises:
    FileExistsError: `out_dir` holds anything else; it is never overwritten.
  """
  out = Path(out_dir)
  counts = _existing_counts(out, config)
  if counts is not None:
    return counts
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  try:
    for folder in SPLIT_FOLDERS.values():
      (tmp / folder).mkdir()
    records, cams = plan_images(config), camera_styles(config)
    for record in records:
      Image.fromarray(render_record(record, cams, config)).save(
        tmp / SPLIT_FOLDERS[record.split] / record.filename,
        format='JPEG',
        quality=config.jpeg_quality,
      )
    counts = _count(records)
    (tmp / CONFIG_FILE).write_text(
      json.dumps({**_config_record(config), 'counts': counts}, indent=2) + '\n'
    )
    if out.exists():
      out.rmdir()  # empty (checked above); a rename cannot replace a non-empty folder
    os.rename(tmp, out)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    # The rename fails if a concurrent run finished first: fine if it made the same dataset.
    if isinstance(e, OSError) and (out / CONFIG_FILE).is_file():
      try:
        return _existing_counts(out, config)
      except FileExistsError:
        pass
    raise
  return counts


def save_preview(
  out_path: str | os.PathLike,
  config: SyntheticConfig = PRESETS['default'],
  num_families: int = 4,
  zoom: int = 2,
) -> Path:
  """Saves a PNG grid: rows are the members of the first families, columns cameras.

  All rows of a column share one view, so within a family what changes down a
  column is exactly the identities' details. The last two columns show the
  first camera's view from the back and the side.

  Returns:
    The path written.
  """
  people, cams = identity_attributes(config), camera_styles(config)
  rows = [a for a in people.values() if a.family < num_families]
  columns = [sample_view(_rng(config.seed, _PREVIEW, c), c, cams[c], 0.0) for c in range(len(cams))]
  columns[0] = dataclasses.replace(columns[0], view='front')
  columns += [dataclasses.replace(columns[0], view=v) for v in ('back', 'side')]
  h, w, gap = config.image_height, config.image_width, 4
  sheet = np.full(
    ((h + gap) * len(rows) + gap * num_families, (w + gap) * len(columns), 3), 255, np.uint8
  )
  for r, attrs in enumerate(rows):
    y = r * (h + gap) + attrs.family * gap  # a wider gap between families
    for c, view in enumerate(columns):
      x = c * (w + gap)
      sheet[y : y + h, x : x + w] = render_person(attrs, view, cams[view.camera], h, w)
  image = Image.fromarray(sheet)
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  image.resize((image.width * zoom, image.height * zoom), Image.NEAREST).save(out_path)
  return out_path

"""Read a manually downloaded dataset from a folder or from its zip, the same way.

Users put the official archive (or its extracted folder) under `data/manual/`.
The builders never extract archives to disk: a `ManualSource` lists and reads
files under a dataset root, whether that root is a directory or a folder
inside a zip. Finding the root is by content (the folders a layout needs), so
`Market-1501-v15.09.15.zip`, its extracted folder, or a renamed copy all work.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence
import zipfile

from PIL import Image, UnidentifiedImageError

from cace_jax.errors import DatasetError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def escapes_root(relpath: str) -> bool:
  """True for a path that is absolute or has a '..' component ('/' or '\\' separated)."""
  parts = relpath.replace('\\', '/').split('/')
  return (
    relpath.startswith(('/', '\\')) or (len(relpath) > 1 and relpath[1] == ':') or '..' in parts
  )


class ManualSource:
  """Files under one dataset root, in a directory or inside a zip archive.

  Paths given to and returned by the methods are relative to the root and use
  '/' as separator.
  """

  def __init__(self, location: str, root: str = '', archive: zipfile.ZipFile | None = None):
    self.location = location  # What error messages name: the folder or the zip.
    self._root = root.strip('/')
    self._archive = archive
    if archive is not None:
      for name in archive.namelist():
        if escapes_root(name):
          raise DatasetError(
            f'{location}: refused: entry {name!r} is absolute or climbs out with "..", '
            'which a dataset archive never needs (nothing was read or written)'
          )
      self._names = [n for n in archive.namelist() if not n.endswith('/')]
      # For exists() in O(1): list files check every line's path (MSMT17: 126k).
      self._files = set(self._names)
      self._folders = {n[:i] for n in self._names for i, c in enumerate(n) if c == '/'}

  def describe(self, relpath: str = '') -> str:
    """A human-readable location of `relpath` for messages."""
    inner = '/'.join(p for p in (self._root, relpath) if p)
    if self._archive is not None:
      return f'{self.location}:{inner}' if inner else self.location
    return os.path.join(self.location, inner) if inner else self.location

  def _full(self, relpath: str) -> str:
    # A leading '/' is stripped below; '..' (e.g. a list file line
    # '../../elsewhere.jpg') would read from outside the dataset.
    if '..' in relpath.replace('\\', '/').split('/'):
      raise DatasetError(
        f'{self.describe()}: refused path {relpath!r}: it climbs out of the dataset with ".."'
      )
    return '/'.join(p for p in (self._root, relpath.strip('/')) if p)

  def exists(self, relpath: str) -> bool:
    """Whether a file or folder exists under the root."""
    full = self._full(relpath)
    if self._archive is None:
      return os.path.exists(os.path.join(self.location, full))
    return full in self._files or full in self._folders

  def list_images(self, folder: str) -> list[str]:
    """Image files directly inside `folder`, sorted; other files are ignored.

    Market-1501's zip carries Thumbs.db and readme files beside the images.
    """
    full = self._full(folder)
    if self._archive is None:
      path = os.path.join(self.location, full)
      names = os.listdir(path) if os.path.isdir(path) else []
    else:
      prefix = full + '/' if full else ''
      names = [n[len(prefix) :] for n in self._names if n.startswith(prefix)]
      names = [n for n in names if '/' not in n]
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(f'{folder}/{n}' if folder else n for n in images)

  def list_folders(self, folder: str) -> list[str]:
    """Sub-folders directly inside `folder`, sorted (identity and camera folders)."""
    full = self._full(folder)
    if self._archive is None:
      path = os.path.join(self.location, full)
      names = os.listdir(path) if os.path.isdir(path) else []
      names = [n for n in names if os.path.isdir(os.path.join(path, n))]
    else:
      prefix = full + '/' if full else ''
      rests = [n[len(prefix) :] for n in self._names if n.startswith(prefix)]
      names = {rest.split('/', 1)[0] for rest in rests if '/' in rest}  # files deeper down
    return sorted(f'{folder}/{n}' if folder else n for n in names)

  def read_text(self, relpath: str) -> str:
    """The text of a file under the root (list files of MSMT17)."""
    return self.read_bytes(relpath).decode('utf-8')

  def read_bytes(self, relpath: str) -> bytes:
    """The bytes of a file under the root; DatasetError naming it if unreadable."""
    try:
      if self._archive is None:
        with open(os.path.join(self.location, self._full(relpath)), 'rb') as f:
          return f.read()
      return self._archive.read(self._full(relpath))
    except (OSError, KeyError, zipfile.BadZipFile) as e:
      raise DatasetError(f'cannot read {self.describe(relpath)}: {e}') from e


def read_jpeg(source: ManualSource, relpath: str) -> bytes:
  """Returns the image at `relpath` as JPEG bytes, verified to decode fully (`to_rgb_jpeg`)."""
  return to_rgb_jpeg(source.read_bytes(relpath), source.describe(relpath))


def to_rgb_jpeg(data: bytes, where: str) -> bytes:
  """Encoded image bytes as RGB JPEG bytes, verified to decode fully.

  Every image is decoded once while preparing, so a truncated or corrupt file
  fails here, naming it (`where`), instead of crashing a training run hours
  later. Images stored in another format or mode (PNG, grayscale, CMYK) are
  re-encoded as RGB JPEG (quality 95) so the input pipeline can rely on one
  decoder and every stored image has 3 channels; RGB JPEGs are kept as they are.
  """
  stream = io.BytesIO(data)
  try:
    with Image.open(stream) as image:
      image.load()
      if image.format == 'JPEG' and image.mode == 'RGB':
        return data
      buffer = io.BytesIO()
      image.convert('RGB').save(buffer, format='JPEG', quality=95)
      return buffer.getvalue()
  except UnidentifiedImageError as e:
    # PIL names the in-memory stream it was given, which tells the user nothing.
    raise DatasetError(
      f'corrupt or unreadable image {where}: not an image format PIL can identify '
      f'(expected JPEG or PNG; {len(data)} bytes)'
    ) from e
  except (OSError, SyntaxError, ValueError) as e:
    reason = str(e).replace(repr(stream), where)
    raise DatasetError(f'corrupt or unreadable image {where}: {reason}') from e


# Folders of the manual directory that never hold a benchmark download.
NOT_SEARCHED = ('synthetic_details',)
# The spec file of a custom dataset (`folder_spec`): a folder holding one is
# the user's own data, never taken for a benchmark by its contents.
CUSTOM_SPEC = 'reid_dataset.json'


def find_source(
  manual_dir: str,
  candidates: Sequence[str],
  required: Iterable[str],
  instructions: str,
  search_contents: bool = True,
) -> ManualSource:
  """Locates a dataset root under `manual_dir`.

  Looks, in order, at: each candidate name under `manual_dir` (a folder, or
  the same name with `.zip`); `manual_dir` itself (pointed straight at an
  extracted dataset); each candidate one level down (torchreid's trees, e.g.
  `<root>/market1501/Market-1501-v15.09.15/`); and, with `search_contents`,
  every folder or zip one or two levels down that holds the required paths
  (a renamed copy). The last is used only when it is the only one found.

  Args:
    manual_dir: the folder users put downloads in.
    candidates: names of the official folder and zip (with or without `.zip`).
    required: relative paths that must all exist under the root.
    instructions: what to download and where to put it, for the error.
    search_contents: also accept a folder or zip of any name by its contents.

  Returns:
    The source of the root found.

  Raises:
    DatasetError: naming every place looked at and what was expected there,
      or every match when a search by contents finds several.
  """
  required = list(required)
  looked = []
  children = _subfolders(manual_dir)
  places = [os.path.join(manual_dir, name) for name in candidates] + [manual_dir]
  places += [os.path.join(child, name) for child in children for name in candidates]
  for path in places:
    source = _source_at(path, required, looked, zip_too=path != manual_dir)
    if source is not None:
      return source
  if search_contents and candidates:
    found = {}
    for path in _search_paths(manual_dir, children):
      source = _source_at(path, required, [], zip_too=False)
      if source is not None and not source.exists(CUSTOM_SPEC):
        found[source.describe()] = source
    if len(found) == 1:
      return next(iter(found.values()))
    if len(found) > 1:
      raise DatasetError(
        f'several datasets in {manual_dir} hold {", ".join(required)}: '
        f'{", ".join(sorted(found))}; point --manual_dir (data.manual_dir) at the one to use'
      )
  where = ', '.join(dict.fromkeys(looked)) if looked else f'nothing under {manual_dir}'
  raise DatasetError(
    f'no dataset found in {manual_dir} (looked at {where}): expected '
    f'{" or ".join(c for c in candidates if c) or "a folder"} containing '
    f'{", ".join(required)}. {instructions}'
  )


def _subfolders(folder: str) -> list[str]:
  """The searched sub-folders of `folder`, sorted (none if it is not a folder)."""
  if not os.path.isdir(folder):
    return []
  names = sorted(n for n in os.listdir(folder) if not n.startswith('.') and n not in NOT_SEARCHED)
  return [os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))]


def _search_paths(manual_dir: str, children: list[str]) -> list[str]:
  """Folders and zips one and two levels below `manual_dir`, for a search by contents."""
  paths = []
  for folder in [manual_dir] + children:
    names = sorted(n for n in os.listdir(folder) if n not in NOT_SEARCHED)
    paths += [
      os.path.join(folder, n)
      for n in names
      if n.endswith('.zip') or (folder != manual_dir and os.path.isdir(os.path.join(folder, n)))
    ]
  return children + paths


def _source_at(
  path: str, required: list[str], looked: list[str], zip_too: bool
) -> ManualSource | None:
  """The source at folder `path` (or `path`.zip, with `zip_too`) holding `required`, if any."""
  if os.path.isdir(path):
    source = ManualSource(path)
    if all(source.exists(r) for r in required):
      return source
    looked.append(path + '/')
  zip_path = path if path.endswith('.zip') else path + '.zip'
  if (zip_too or path.endswith('.zip')) and os.path.isfile(zip_path):
    source = _find_root_in_zip(zip_path, required)
    if source is not None:
      return source
    looked.append(zip_path)
  return None


def _find_root_in_zip(zip_path: str, required: list[str]) -> ManualSource | None:
  """The folder inside a zip that holds every required path, if any."""
  try:
    archive = zipfile.ZipFile(zip_path)
  except (OSError, zipfile.BadZipFile) as e:
    raise DatasetError(f'cannot open zip {zip_path}: {e}') from e
  # Candidate roots: '' and every folder that directly holds the first required path.
  first = required[0].strip('/')
  roots = {''}
  for name in archive.namelist():
    index = name.find(first + '/')
    if index == 0 or (index > 0 and name[index - 1] == '/'):
      roots.add(name[:index].strip('/'))
    elif name.endswith('/' + first) or name == first:
      roots.add(name[: -len(first)].strip('/'))
  for root in sorted(roots, key=len):
    source = ManualSource(zip_path, root, archive)
    if all(source.exists(r) for r in required):
      return source
  archive.close()
  return None

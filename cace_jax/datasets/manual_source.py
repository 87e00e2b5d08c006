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

from PIL import Image

from cace_jax.errors import DatasetError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


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
      self._names = [n for n in archive.namelist() if not n.endswith('/')]

  def describe(self, relpath: str = '') -> str:
    """A human-readable location of `relpath` for messages."""
    inner = '/'.join(p for p in (self._root, relpath) if p)
    if self._archive is not None:
      return f'{self.location}:{inner}' if inner else self.location
    return os.path.join(self.location, inner) if inner else self.location

  def _full(self, relpath: str) -> str:
    return '/'.join(p for p in (self._root, relpath.strip('/')) if p)

  def exists(self, relpath: str) -> bool:
    """Whether a file or folder exists under the root."""
    full = self._full(relpath)
    if self._archive is None:
      return os.path.exists(os.path.join(self.location, full))
    prefix = full + '/'
    return any(n == full or n.startswith(prefix) for n in self._names)

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
  """Returns the image at `relpath` as JPEG bytes, verified to decode fully.

  Every image is decoded once while preparing, so a truncated or corrupt file
  fails here, naming the file, instead of crashing a training run hours later.
  Images stored in another format or mode (PNG, grayscale, CMYK) are
  re-encoded as RGB JPEG so the input pipeline can rely on one decoder and
  every stored image has 3 channels.
  """
  data = source.read_bytes(relpath)
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format == 'JPEG' and image.mode == 'RGB':
        return data
      buffer = io.BytesIO()
      image.convert('RGB').save(buffer, format='JPEG', quality=95)
      return buffer.getvalue()
  except (OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f'corrupt or unreadable image {source.describe(relpath)}: {e}') from e


def find_source(
  manual_dir: str, candidates: Sequence[str], required: Iterable[str], instructions: str
) -> ManualSource:
  """Locates a dataset root under `manual_dir`.

  Args:
    manual_dir: the folder users put downloads in.
    candidates: names of the official folder and zip (with or without `.zip`),
      tried in order; `manual_dir` itself is tried last, for users who point
      `manual_dir` straight at an extracted dataset.
    required: relative paths that must all exist under the root.
    instructions: what to download and where to put it, for the error.

  Returns:
    The first candidate that holds every required path.

  Raises:
    DatasetError: naming every place looked at and what was expected there.
  """
  required = list(required)
  looked = []
  for name in list(candidates) + ['']:
    path = os.path.join(manual_dir, name) if name else manual_dir
    if os.path.isdir(path):
      source = ManualSource(path)
      if all(source.exists(r) for r in required):
        return source
      looked.append(path + '/')
    zip_path = path if path.endswith('.zip') else path + '.zip'
    if name and os.path.isfile(zip_path):
      source = _find_root_in_zip(zip_path, required)
      if source is not None:
        return source
      looked.append(zip_path)
  where = ', '.join(looked) if looked else f'nothing under {manual_dir}'
  raise DatasetError(
    f'no dataset found in {manual_dir} (looked at {where}): expected '
    f'{" or ".join(c for c in candidates if c)} containing '
    f'{", ".join(required)}. {instructions}'
  )


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

"""The TFDS builder shared by every ReID dataset: features, splits, labels, checks.

Each dataset only says where its files are and how to read identity and camera
from them (`_find_records`); everything else (contiguous training labels,
image verification, the count check against the published numbers) lives here
so the five builders behave the same.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Iterator, Mapping

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from cace_jax.data.manual_source import ManualSource, read_jpeg
from cace_jax.errors import DatasetError

SPLITS = ('train', 'query', 'gallery')

# Market-1501 `0002_c1s1_000451_03.jpg` and DukeMTMC `0001_c2_f0046182.jpg`:
# identity, then camera; junk images carry identity -1.
_MARKET_DUKE_NAME = re.compile(r'^(-?\d+)_c(\d+)')


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a split: where it is, who it shows, which camera took it."""

  relpath: str
  pid: int
  camid: int


def parse_market_style_name(source: ManualSource, relpath: str) -> Record:
  """Reads pid and camera (1-based, as written) from a Market/Duke file name."""
  name = relpath.rsplit('/', 1)[-1]
  match = _MARKET_DUKE_NAME.match(name)
  if match is None:
    raise DatasetError(
      f'unexpected file name {source.describe(relpath)}: expected '
      "'<pid>_c<camera>...' such as 0002_c1s1_000451_03.jpg"
    )
  return Record(relpath, int(match.group(1)), int(match.group(2)))


def list_market_style_split(
  source: ManualSource, folder: str, keep_distractors: bool
) -> list[Record]:
  """Records of one Market/Duke folder; junk (pid -1) dropped.

  Distractors (pid 0) are kept where `keep_distractors` (the gallery): the
  standard protocol ranks them like any wrong identity.
  """
  records = [parse_market_style_name(source, p) for p in source.list_images(folder)]
  return [r for r in records if r.pid > 0 or (r.pid == 0 and keep_distractors)]


class ReIDBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Base builder: splits train/query/gallery with image, pid, label, camid, file_name.

  `label` is the contiguous class index 0..N-1 over the training identities
  (sorted by pid); images of query and gallery carry label -1 because their
  identities are not classes of the model. `camid` is the camera number as
  written in the dataset (1-based).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  # split -> (images, identities) published for the official release.
  EXPECTED_COUNTS: Mapping[str, tuple[int, int]] = {}

  @abc.abstractmethod
  def _find_records(self, manual_dir: str) -> tuple[ManualSource, dict[str, list[Record]]]:
    """Locates the dataset under `manual_dir` and lists each split's records."""

  def _expected_counts(self) -> Mapping[str, tuple[int, int]]:
    return self.EXPECTED_COUNTS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      **self._info_extras(),
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'pid': tfds.features.Scalar(dtype=np.int32, doc='identity as in the dataset'),
          'label': tfds.features.Scalar(
            dtype=np.int32, doc='training class 0..N-1; -1 outside train'
          ),
          'camid': tfds.features.Scalar(dtype=np.int32, doc='camera, 1-based'),
          'file_name': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://github.com/cace-jax/cace_jax',
    )

  def _info_extras(self) -> dict:
    """More DatasetInfo arguments of a subclass (the custom builder's metadata)."""
    return {}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source, records = self._find_records(str(dl_manager.manual_dir))
    for split in SPLITS:
      if not records.get(split):
        raise DatasetError(f'{self.name}: split {split!r} is empty in {source.describe()}')
    self._check_counts(source, records)
    train_pids = sorted({r.pid for r in records['train']})
    label_of_pid = {pid: label for label, pid in enumerate(train_pids)}
    return {
      split: self._generate_examples(
        source, records[split], label_of_pid if split == 'train' else {}
      )
      for split in SPLITS
    }

  def _generate_examples(
    self, source: ManualSource, records: list[Record], label_of_pid: Mapping[int, int]
  ) -> Iterator[tuple[str, dict]]:
    for record in records:
      yield (
        record.relpath,
        {
          'image': read_jpeg(source, record.relpath),
          'pid': record.pid,
          'label': label_of_pid.get(record.pid, -1),
          'camid': record.camid,
          'file_name': record.relpath,
        },
      )

  def _check_counts(self, source: ManualSource, records: dict[str, list[Record]]):
    """Compares what was found with the published counts, and says so.

    A mismatch is a warning, not an error: subsets and custom datasets in the
    same layout are legitimate uses.
    """
    expected = self._expected_counts()
    for split in SPLITS:
      found = (len(records[split]), len({r.pid for r in records[split]}))
      if split in expected and tuple(expected[split]) != found:
        logging.warning(
          '%s %s: found %d images / %d identities in %s, the official release '
          'has %d / %d (fine for a subset or a custom dataset).',
          self.name,
          split,
          *found,
          source.describe(),
          *expected[split],
        )
      else:
        logging.info('%s %s: %d images / %d identities.', self.name, split, *found)

"""What a checkpoint says about its run: `RunRecord`, written and read here only.

Every checkpoint holds, beside its arrays, a small JSON record. A training run
writes its step, epoch, seed, number of classes and whole config; a port
(`tools/port.py`) writes the model it built and the file it came from. The
record is what evaluation, the API, export and a resumed run read to rebuild
the model, so its format lives in one place.

The config is stored as a JSON object. Checkpoints written before that held
it as a JSON string inside the record; `from_json` reads both, and gives a
config written before a field existed that field with the value that keeps
the run's behaviour (`ADDED_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections


# Config fields added after runs were recorded, with the values that mean what those
# runs did: they re-sorted every query, and chose K and w over every query.
ADDED_FIELDS = {
  ('eval', 'stage2_max_similarity'): 1.0,
  ('eval', 'stage2_fraction_grid'): (1.0,),
}


def with_added_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with every field of `ADDED_FIELDS` it lacks (in a section it has) set."""
  for (section, name), value in ADDED_FIELDS.items():
    if section in config and name not in config[section]:
      config[section][name] = value
  return config


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """A checkpoint's record.

  Attributes:
    step: the checkpoint's step (0 for a port).
    epoch: fractional epoch reached (0 for a port).
    seed: the run's seed; None for a port.
    num_classes: training identities (the classifiers' width), if known.
    config: the training config; None for a port.
    model: a port's model fields (`CACENet` keywords, or {'resnet_depth': d}
      for a bare torchvision network); None for a training run.
    ported_from: the file a port was read from; '' for a training run.
  """

  step: int
  epoch: float = 0.0
  seed: int | None = None
  num_classes: int | None = None
  config: ml_collections.ConfigDict | None = None
  model: dict | None = None
  ported_from: str = ''

  @property
  def model_fields(self) -> dict:
    """The model the checkpoint holds: the config's model, or the port's."""
    if self.config is not None:
      return dict(self.config.model)
    return dict(self.model or {})

  @property
  def is_torchvision(self) -> bool:
    """A bare torchvision ImageNet network (`tools/port.py torchvision`), not a CACE-Net."""
    return 'resnet_depth' in (self.model or {})

  def to_json(self) -> dict:
    """The JSON object orbax stores (only the fields that are set)."""
    found = {'step': self.step, 'epoch': self.epoch}
    if self.seed is not None:
      found['seed'] = self.seed
    if self.num_classes is not None:
      found['num_classes'] = self.num_classes
    if self.config is not None:
      found['config'] = json.loads(self.config.to_json())
    if self.model is not None:
      found['model'] = dict(self.model)
    if self.ported_from:
      found['ported_from'] = self.ported_from
    return found

  @classmethod
  def from_json(cls, found: dict) -> RunRecord:
    """Reads a stored record, of this format or the earlier one (config as a string)."""
    config = found.get('config')
    if isinstance(config, str):
      config = json.loads(config)
    return cls(
      step=int(found['step']),
      epoch=float(found.get('epoch', 0.0)),
      seed=found.get('seed'),
      num_classes=found.get('num_classes'),
      config=with_added_fields(ml_collections.ConfigDict(config)) if config else None,
      model=found.get('model'),
      ported_from=found.get('ported_from', ''),
    )

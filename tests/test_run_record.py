"""RunRecord: what a checkpoint says about its run, in this format and the earlier one."""

from __future__ import annotations

import json

from cace_jax.runs.run_record import RunRecord
from configs import tiny


def test_a_training_record_round_trips_with_the_config_as_an_object():
  config = tiny.get_config()
  record = RunRecord(step=7, epoch=0.5, seed=3, num_classes=6, config=config)
  stored = json.loads(json.dumps(record.to_json()))  # what orbax writes and reads back
  assert isinstance(stored['config'], dict)  # a config, not a string inside JSON
  assert stored['config']['model']['depth'] == config.model.depth
  read = RunRecord.from_json(stored)
  assert (read.step, read.epoch, read.seed, read.num_classes) == (7, 0.5, 3, 6)
  assert read.config.to_json() == config.to_json()
  assert read.model_fields == dict(read.config.model)
  assert read.model is None and not read.is_torchvision


def test_a_record_of_the_earlier_format_reads_the_same():
  config = tiny.get_config()
  earlier = {'step': 7, 'epoch': 0.5, 'seed': 3, 'num_classes': 6, 'config': config.to_json()}
  assert RunRecord.from_json(earlier) == RunRecord.from_json(
    RunRecord(step=7, epoch=0.5, seed=3, num_classes=6, config=config).to_json()
  )


def test_a_port_record_names_its_model_and_file():
  port = RunRecord(step=0, num_classes=751, model={'depth': 50}, ported_from='market.pth')
  read = RunRecord.from_json(json.loads(json.dumps(port.to_json())))
  assert read == port and read.config is None and read.model_fields == {'depth': 50}
  assert RunRecord(step=0, model={'resnet_depth': 18}).is_torchvision


def test_a_config_recorded_before_selective_stage2_reads_as_every_query():
  """The API and export read stage-2 settings from the record: an older run keeps what it did."""
  stored = RunRecord(step=7, config=tiny.get_config()).to_json()
  del stored['config']['eval']['stage2_max_similarity']
  del stored['config']['eval']['stage2_fraction_grid']
  read = RunRecord.from_json(json.loads(json.dumps(stored)))
  assert read.config.eval.stage2_max_similarity == 1.0
  assert tuple(read.config.eval.stage2_fraction_grid) == (1.0,)
  # A record that has the fields keeps its values.
  config = tiny.get_config()
  config.eval.stage2_max_similarity = 0.5
  assert (
    RunRecord.from_json(RunRecord(step=1, config=config).to_json()).config.eval[
      'stage2_max_similarity'
    ]
    == 0.5
  )

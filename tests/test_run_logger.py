"""The console a training run leaves: its last lines are the report, not the bar."""

from __future__ import annotations

import io
import re
import sys

import pytest

from cace_jax.runs.run_logger import RunLogger


def console_lines(workdir, end_progress: bool) -> list[str]:
  """What a terminal shows after 3 steps and a table logged at the end, bar and lines alike."""
  console = io.StringIO()  # the bar (stderr) and logged lines (stdout) in the order written
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sys, 'stderr', console)
    patch.setattr(sys, 'stdout', console)
    logger = RunLogger(str(workdir), total_steps=3, start_step=0, images_per_step=8)
    for step in (1, 2, 3):
      logger.advance(step)
    if end_progress:
      logger.end_progress()
    logger.info('final table')
    logger.close()
  # A terminal keeps what follows the last carriage return of each line.
  shown = [line.split('\r')[-1] for line in console.getvalue().split('\n')]
  return [re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', line) for line in shown if line.strip()]


def test_the_final_table_is_the_last_line_once_progress_has_ended(tmp_path):
  assert console_lines(tmp_path / 'ended', end_progress=True)[-1] == 'final table'
  # The check can fail: with the bar still open, it is drawn again below the table.
  assert console_lines(tmp_path / 'open', end_progress=False)[-1] != 'final table'

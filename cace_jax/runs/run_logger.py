"""What a training run reports: a progress bar, TensorBoard scalars, a text log.

Only process 0 writes; on other processes every method is a no-op, so the
training loop can call them unconditionally.
"""

from __future__ import annotations

import json
import os
import time

import jax
import tqdm


class RunLogger:
  """Progress bar with ETA and img/s, TensorBoard scalars and `<workdir>/train.log`."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, images_per_step: int):
    self.active = jax.process_index() == 0
    self._images_per_step = images_per_step
    self._last_time, self._last_step = time.perf_counter(), start_step
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    from tensorboardX import SummaryWriter  # Heavy import, process 0 only.

    self._writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._text = open(os.path.join(workdir, 'train.log'), 'a', encoding='utf-8')
    self._bar = tqdm.tqdm(
      total=total_steps, initial=start_step, unit='step', dynamic_ncols=True, smoothing=0.1
    )

  def info(self, message: str) -> None:
    """A line in the text log and on the console (above the bar)."""
    if self.active:
      stamped = f'{time.strftime("%Y-%m-%d %H:%M:%S")} {message}'
      self._text.write(stamped + '\n')
      self._text.flush()
      tqdm.tqdm.write(message)

  def advance(self, step: int) -> None:
    """Moves the bar to `step` (call after each step)."""
    if self.active:
      self._bar.update(step - self._bar.n)

  def end_progress(self) -> None:
    """Closes the bar once the steps are done.

    Lines logged after it (the final evaluation's tables) are then the last the
    console shows; an open bar would be redrawn below each of them.
    """
    if self.active:
      self._bar.close()

  def scalars(self, step: int, values: dict, prefix: str = 'train') -> None:
    """Logs scalars: TensorBoard, the text log, and throughput since the last call."""
    if not self.active:
      return
    now = time.perf_counter()
    values = {k: float(v) for k, v in values.items()}
    if prefix == 'train' and step > self._last_step:
      values['images_per_s'] = (
        (step - self._last_step) * self._images_per_step / max(now - self._last_time, 1e-9)
      )
      self._last_time, self._last_step = now, step
      self._bar.set_postfix(
        loss=f'{values.get("loss", float("nan")):.3f}', img_s=f'{values["images_per_s"]:.1f}'
      )
    for name, value in values.items():
      self._writer.add_scalar(f'{prefix}/{name}', value, step)
    self._writer.flush()
    self._text.write(json.dumps({'step': step, 'split': prefix, **values}) + '\n')
    self._text.flush()

  def close(self) -> None:
    if self.active:
      self._bar.close()
      self._writer.close()
      self._text.close()

"""One training run per workdir: a lock file that names its holder and dies with it.

Two `train.py` on one workdir would interleave checkpoints and logs. The
first takes an exclusive `flock` on `<workdir>/train.lock` and writes who it
is (host, pid, start time, command) into the file. The kernel drops the lock
when the process ends however it ends (even `kill -9`), so a lock file left
behind by a dead run is stale by construction: the next run takes it over and
says so. Evaluation never takes the lock: it reads only complete checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable, Iterator

from cace_jax.errors import WorkdirBusyError

LOCK_FILE = 'train.lock'


def _describe(holder: dict) -> str:
  return (
    f'pid {holder.get("pid", "?")} on {holder.get("host", "?")}, started '
    f'{holder.get("started", "?")}: {holder.get("command", "?")}'
  )


def _read_holder(handle) -> dict:
  handle.seek(0)
  try:
    return json.loads(handle.read() or '{}')
  except json.JSONDecodeError:
    return {}


@contextlib.contextmanager
def hold(workdir: str, log: Callable[[str], None] = print) -> Iterator[None]:
  """Holds `<workdir>/train.lock` for the duration of the block.

  Args:
    workdir: the run's directory (created if missing).
    log: where to say that a stale lock was taken over.

  Raises:
    WorkdirBusyError: a live process holds the lock; the message names it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  handle = open(path, 'a+', encoding='utf-8')  # never truncate before the lock is ours
  held = False
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(
        f'{workdir} is being trained by another run ({_describe(_read_holder(handle))}); '
        'wait for it to finish or stop it, or use another --workdir'
      ) from None
    held = True
    previous = _read_holder(handle)
    if previous:
      log(f'took over {path}, left by a run that is no longer alive ({_describe(previous)})')
    handle.seek(0)
    handle.truncate()
    handle.write(
      json.dumps(
        {
          'host': socket.gethostname(),
          'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S'),
          'command': ' '.join(sys.argv),
        }
      )
    )
    handle.flush()
    yield
  finally:
    if held:  # empty the file before unlocking: an empty lock file is a clean exit
      with contextlib.suppress(OSError):
        handle.seek(0)
        handle.truncate()
    handle.close()

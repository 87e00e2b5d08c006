"""Errors a user can cause or meet, and how commands report them (`cli`).

They live here, below everything that raises them, so that the command line
can catch them without importing the training, dataset or porting code.
Bad input (`UserError`) exits 2; a failure of the run itself (`RunFailure`,
a non-finite loss, a full disk, anything unexpected) exits 1.
"""

from __future__ import annotations

import errno


class UserError(Exception):
  """Bad input from the user (a config, a file, a dataset); the message says which and why."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the field."""


class DatasetError(UserError):
  """A dataset is missing, malformed or unreadable; the message says where."""


class PortError(UserError, ValueError):
  """A checkpoint that does not fit the model; the message names every offending key."""


class CheckpointError(UserError):
  """No readable checkpoint where one was asked for; the message names the steps and why."""


class WorkdirBusyError(UserError):
  """Another live process holds the workdir; the message names it."""


class RunFailure(Exception):
  """The run failed for a reason other than its input (e.g. a full disk); exit code 1."""


def is_disk_full(error: BaseException) -> bool:
  """True if `error`, or any error it was raised from, is 'no space left on device'.

  Orbax and TFDS wrap the operating system's error (tensorstore reports it
  as text), so both the errno and the message of the whole chain count.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(error) or 'Disk quota exceeded' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False

"""Errors a user can cause. Commands report them as one `error:` line and exit 2 (`cli`).

They live here, below everything that raises them, so that the command line
can catch them without importing the training, dataset or porting code.
"""


class UserError(Exception):
  """Bad input from the user (a config, a file, a dataset); the message says which and why."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the field."""


class DatasetError(UserError):
  """A dataset is missing, malformed or unreadable; the message says where."""


class PortError(UserError, ValueError):
  """A checkpoint that does not fit the model; the message names every offending key."""

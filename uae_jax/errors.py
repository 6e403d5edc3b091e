"""Errors a user can fix: every CLI prints them as one line naming the problem and exits 2.

Anything raised from bad input (a config key, a weight file, a checkpoint, an image) should be one
of these, so `main`, `convert`, `evaluate`, `prepare` and `sample` never show a raw traceback.
"""


class UserError(Exception):
  """Base class: bad input or configuration, reported as one line without a traceback."""


class ConfigError(UserError, ValueError):
  """The config is inconsistent, names an unknown key, or names a file that does not exist."""


class LoadError(UserError, ValueError):
  """A weight file or converted directory is unreadable, malformed, or does not fit the model."""


class CheckpointError(UserError, RuntimeError):
  """No readable checkpoint where one was expected, or a checkpoint that does not fit the state."""

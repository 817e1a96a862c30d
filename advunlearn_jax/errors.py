"""Exceptions raised for bad user input: each message names the file, the key and what was expected.

Every command line entry point (`cli.run`) prints a `UserError` as one line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Input the user can fix: a config, a file, a flag."""


class ConfigError(UserError, ValueError):
  """A model or run configuration is missing, malformed or unsupported."""


class WeightsError(UserError, ValueError):
  """A weight file is missing a key, holds an unexpected one, or has a tensor of the wrong shape."""


class CheckpointError(UserError):
  """No checkpoint of a workdir can be restored."""


class WorkdirInUse(ConfigError):
  """Another process holds the workdir (training/workdir_lock.py)."""


class TrainingDiverged(Exception):
  """A loss term or the parameters stopped being finite: the run stops before it checkpoints or exports them.
  Not a UserError (exit 1, not 2): the config was valid, the optimisation failed; still one line, no traceback."""

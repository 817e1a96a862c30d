"""Exceptions raised for bad user input: each message names the file, the key and what was expected."""


class ConfigError(ValueError):
  """A model or run configuration is missing, malformed or unsupported."""


class WeightsError(ValueError):
  """A weight file is missing a key, holds an unexpected one, or has a tensor of the wrong shape."""

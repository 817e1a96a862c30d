"""Reading the JSON config files of transformers/diffusers folders, with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Any

from advunlearn_jax.errors import ConfigError


def read(path: str, filename: str, holder: str) -> tuple[dict[str, Any], str]:
  """(contents, file path) of `path` itself or of `path/filename`; `holder` names the folder in messages."""
  if os.path.isdir(path):
    path = os.path.join(path, filename)
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: not found; {holder} holds a {filename}")
  try:
    with open(path) as f:
      return json.load(f), path
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from e

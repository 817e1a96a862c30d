"""What every command line entry point shares: library logs at warnings only, and user errors as one line.

  if __name__ == "__main__":
    cli.run(main)

A `UserError` (a bad config, a missing file) prints `error: <message>` to stderr and exits with status 2, with
no traceback: the message says what to fix. Any other exception is a bug and keeps its traceback. absl's
`--verbosity` (0: info, 1: debug) brings the libraries' logging back; by default only their warnings show, and
our own one-line events are plain prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from advunlearn_jax.errors import UserError

EXIT_USER_ERROR = 2


def quiet_libraries() -> None:
  """Warnings only from absl-logging libraries (Orbax, JAX), unless the user passed --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (an unknown value, a missing required flag, a config override that
  does not apply) reported as every user error is: absl's own parser exits with status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = f"{e} (--helpfull lists the flags)"
  except (AttributeError, KeyError) as e:  # ml_collections: --config.a.b=... where the config has no a.b
    while not isinstance(e, KeyError) and e.__context__ is not None:  # its KeyError holds the readable message
      e = e.__context__
    key, _, hint = str(e.args[0] if e.args else e).partition("\n")
    key = key.strip("'\"")
    named = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")]
    message = f"{', '.join(named) or 'a --config override'}: the config has no field {key!r}. {hint}".strip()
  except TypeError:  # ml_collections: --config.a.b=... where config.a is a value, not a section
    message = _not_a_section(argv) or "a --config override names a field inside a value that is not a section"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _not_a_section(argv: list[str]) -> str:
  """'--config.evaluation.attack.k: config.evaluation.attack is 'unlearndiff', not a section', found by walking
  each override's path through the base config, whose sections every config file keeps ('' if none matches)."""
  from advunlearn_jax import config_lib

  config = config_lib.base_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    flag = arg.split("=", 1)[0]
    node, path = config, []
    for part in flag[len("--config.") :].split(".")[:-1]:
      path.append(part)
      node = node.get(part) if hasattr(node, "get") else None
      if node is not None and not hasattr(node, "get"):
        return f"{flag}: config.{'.'.join(path)} is {node!r}, not a section"
  return ""


def run(main: Callable[[list[str]], None]) -> None:
  def guarded(argv: list[str]) -> None:
    quiet_libraries()
    try:
      main(argv)
    except (UserError, app.UsageError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  app.run(guarded, flags_parser=_parse_flags)

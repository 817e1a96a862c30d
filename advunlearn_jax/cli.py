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


def run(main: Callable[[list[str]], None]) -> None:
  def guarded(argv: list[str]) -> None:
    quiet_libraries()
    try:
      main(argv)
    except (UserError, app.UsageError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  app.run(guarded)

"""What every command line entry point shares: library logs at warnings only, and user errors as one line.

  if __name__ == "__main__":
    cli.run(main)

A `UserError` (a bad config, a missing file) prints `error: <message>` to stderr and exits with status 2, with
no traceback: the message says what to fix, and an output folder that the failed command created is removed
again when it holds nothing the user could want (`output_flags`). Any other exception is a bug and keeps its
traceback, except a diverged run (`TrainingDiverged`): one line, status 1. A run stopped by SIGTERM after saving
exits with EXIT_PREEMPTED (75, sysexits' EX_TEMPFAIL: rerun the same command to resume), so a scheduler can tell
it from a finished run (0); stopped by SIGINT (Ctrl-C), it saves the same way and exits with 130. absl's
`--verbosity` (0: info, 1: debug) brings the libraries' logging back; by default only their warnings show, and
our own one-line events are plain prints.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from advunlearn_jax import config_lib
from advunlearn_jax.errors import TrainingDiverged, UserError, WorkdirInUse

# transformers' import-time advice ("PyTorch was not found...") names nothing a user of these commands can act on:
# torch is optional here. Set before any command imports transformers (every command imports this module first).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

EXIT_USER_ERROR = 2
EXIT_FAILED = 1
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
# What a command may have put in its output folder before it found a bad input: nothing a user could want.
_DISPOSABLE = {"xla_cache", ".lock"}
# Room kept under the filesystem's longest path for the files a command writes inside its output folder
# (checkpoints/200/state/ocdbt.process_0/d/<hash> and the like).
PATH_ROOM = 256


def stopped_status(signal_name: str) -> int:
  """The exit status of a run that saved and stopped on a signal: 130 for Ctrl-C, as a shell reports it, else 75."""
  return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


def quiet_libraries() -> None:
  """Warnings only from absl-logging libraries (Orbax, JAX), unless the user passed --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (an unknown value, a missing required flag, a config override that
  does not apply) reported as every user error is: absl's own parser exits with status 1. A --config override's
  error reads as `config_lib.override`'s for the same override (config_lib.override_error)."""
  try:
    return flags.FLAGS(config_files(argv))
  except UserError as e:
    message = str(e)
  except config_lib.OVERRIDE_ERRORS as e:
    refused = _user_error_in(e)  # a config file's get_config refused its argument (ml_collections quotes the
    if refused is not None:  # traceback, which a bug in the file keeps: only a UserError is the user's to fix)
      named = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
      print(f"error: {named}: {refused}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    overrides = [a[len("--config.") :] for a in argv[1:] if a.startswith("--config.")]
    # The command's config is not at hand when its overrides fail; every config file keeps the base's sections.
    message = config_lib.override_error(e, overrides, "--config.", config_lib.base_config())
    message = message or f"{e} (--helpfull lists the flags)"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _user_error_in(error: BaseException | None) -> UserError | None:
  """The first UserError raised on the way to `error` (the deepest of its __context__ chain), if any:
  ml_collections re-raises a config file's exception as the same type holding the quoted traceback."""
  found = None
  while error is not None:
    found = error if isinstance(error, UserError) else found
    error = error.__context__
  return found


SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_files(argv: list[str]) -> list[str]:
  """`argv` with each `--config=PATH[:ARG]` checked to name a file (ml_collections would fail only when the config is
  first read), checked before any other flag is parsed. `configs/NAME.py` where the working folder has no such file
  names the package's own (advunlearn_jax/configs, which a checkout also links as configs/): the README's commands
  then run the same from an installed package anywhere. A file that is there is always the one read."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      head, value = "--config=", arg[len("--config=") :]
    elif i > 0 and argv[i - 1] == "--config":
      head, value = "", arg
    else:
      continue
    path, sep, rest = value.partition(":")
    shipped = os.path.join(SHIPPED_CONFIGS, path[len("configs/") :])
    if path.startswith("configs/") and not os.path.isfile(path) and os.path.isfile(shipped):
      path = shipped
      argv[i] = f"{head}{shipped}{sep}{rest}"
    if not os.path.isfile(path):
      raise UserError(f"--config={value}: no such config file {os.path.abspath(path)!r}")
  return argv


def check_output_folder(path: str, flag: str) -> None:
  """`path` is, or can become, a folder this process can write: checked before any work, so a typo in --out
  costs nothing."""
  if not path:
    raise UserError(f"--{flag} is empty; give the folder to write to")
  path = os.path.abspath(os.path.expanduser(path))
  check_path_length(path, flag)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"--{flag}={path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"--{flag}={path}: cannot write in {existing} (permission denied)")


def check_path_length(path: str, flag: str) -> None:
  """The kernel refuses a path part over NAME_MAX or a path over PATH_MAX only when the first file is made, by
  then after some of its parents: refused here first, with room kept for the files made inside."""
  existing = path
  while not os.path.isdir(existing):
    existing = os.path.dirname(existing)
  name_max, path_max = _limit(existing, "PC_NAME_MAX", 255), _limit(existing, "PC_PATH_MAX", 4096)
  shown = path if len(path) <= 80 else f"{path[:40]}...{path[-30:]}"
  for part in path.split(os.sep):
    if len(os.fsencode(part)) > name_max:
      raise UserError(
        f"--{flag}={shown}: a folder name is {len(os.fsencode(part))} bytes long ({part[:20]}...); this "
        f"filesystem allows {name_max}"
      )
  if len(os.fsencode(path)) > path_max - PATH_ROOM:
    raise UserError(
      f"--{flag}={shown}: the path is {len(os.fsencode(path))} bytes long; this filesystem allows {path_max}, "
      f"less {PATH_ROOM} for the files written inside it"
    )


def _limit(folder: str, name: str, default: int) -> int:
  try:
    return os.pathconf(folder, name)
  except (OSError, ValueError):
    return default


def _remove_if_disposable(path: str) -> None:
  """Removes `path` (created by this process) when it holds only what a failed command leaves behind."""
  disposable = lambda name: name in _DISPOSABLE or name.startswith(".lock.")  # population parts' locks
  if os.path.isdir(path) and all(disposable(name) for name in os.listdir(path)):
    shutil.rmtree(path, ignore_errors=True)


def run(main: Callable[[list[str]], None], output_flags: Sequence[str] = ()) -> None:
  """Runs `main` as a command: user errors as one line and status 2. `output_flags` name the flags holding the
  command's output folder; one that did not exist before and holds only disposable files is removed again."""

  def guarded(argv: list[str]) -> None:
    quiet_libraries()
    fresh = [os.path.abspath(v) for v in (flags.FLAGS[f].value for f in output_flags) if v and not os.path.exists(v)]
    try:
      main(argv)
    except (UserError, app.UsageError) as e:
      if not isinstance(e, WorkdirInUse):  # the folder is another process's
        for path in fresh:
          _remove_if_disposable(path)
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    except TrainingDiverged as e:  # the message names the iteration and what was kept; a traceback adds nothing
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves first): nothing to save
      print("interrupted (SIGINT); stopping", file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)

  app.run(guarded, flags_parser=_parse_flags)

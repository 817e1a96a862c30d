"""One training process per workdir: an advisory lock on `workdir/.lock`, held for the whole run.

Two runs on one workdir interleave their checkpoints, exports and metrics, and one may delete the other's
in-progress checkpoint. The second process to start therefore refuses at once, naming the holder. The lock is
the kernel's (`fcntl.flock` on an open file): it goes when the holder's process ends, however it ends, so a run
killed by SIGKILL or a preempted VM leaves nothing that blocks the resume. The file keeps the holder's pid, host
and start time only to say who holds it.

Multi-host runs share one workdir by design: only process 0 takes the lock (Orbax coordinates the processes'
writes within a run). Network filesystems without advisory locks (some FUSE mounts of object stores) make the
lock a no-op there; the README says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from advunlearn_jax.errors import WorkdirInUse

LOCK_NAME = ".lock"


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this process; raises WorkdirInUse when another holds it."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self._file = None

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    # "a+" leaves the holder's record intact when the lock is taken: it is rewritten only once this process holds it.
    handle = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = _describe(handle.read())
      handle.close()
      raise WorkdirInUse(
        f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to finish, stop it, or "
        "use another --workdir. Nothing was changed."
      ) from None
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
    handle.flush()
    self._file = handle
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _describe(record: str) -> str:
  try:
    holder = json.loads(record)
    return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
  except (ValueError, KeyError, TypeError):
    return "a process that left no record"

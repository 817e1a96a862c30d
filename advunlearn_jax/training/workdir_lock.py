"""One writer per folder: an advisory lock on `workdir/.lock`, held for a whole run (and by evaluate, export and
population on their output folders).

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
  """`with WorkdirLock(workdir):` holds the workdir for this process; raises WorkdirInUse when another holds it.

  `name`: the lock file's, for processes that share a folder by design (population hosts, one lock per part).
  `remove`: the file goes when the lock does, for a folder that should not keep it (an export's output)."""

  def __init__(self, workdir: str, enabled: bool = True, name: str = LOCK_NAME, remove: bool = False):
    self.path = os.path.join(workdir, name)
    self.enabled, self.remove = enabled, remove
    self._file = None

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    handle = self._take()
    while self.remove and not _is_the_file_at(handle, self.path):  # the holder removed it as we opened it
      handle.close()
      handle = self._take()
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
    handle.flush()
    self._file = handle
    return self

  def _take(self):
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
        "use another folder. Nothing was changed."
      ) from None
    return handle

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      if self.remove and _is_the_file_at(self._file, self.path):  # removed while held: no one holds a stale one
        os.unlink(self.path)
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _describe(record: str) -> str:
  try:
    holder = json.loads(record)
    return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
  except (ValueError, KeyError, TypeError):
    return "a process that left no record"


def _is_the_file_at(handle, path: str) -> bool:
  try:
    return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
  except FileNotFoundError:
    return False

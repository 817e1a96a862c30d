"""How long a piece of long work has left: the mean pace so far times what remains, for the lines it prints."""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
  """`42s`, `3m 05s`, `2h 07m`: as precise as a wait needs."""
  s = max(0, int(round(seconds)))
  if s < 60:
    return f"{s}s"
  m, s = divmod(s, 60)
  if m < 60:
    return f"{m}m {s:02d}s"
  h, m = divmod(m, 60)
  return f"{h}h {m:02d}m"


class Eta:
  """`eta(done)` is 'ETA 3m 05s' once `done` of `total` units are finished, from the time since the Eta was made."""

  def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter):
    self.total, self.clock, self.start = total, clock, clock()

  def __call__(self, done: int) -> str:
    if done <= 0:
      return "ETA unknown"
    return f"ETA {duration((self.clock() - self.start) / done * max(self.total - done, 0))}"

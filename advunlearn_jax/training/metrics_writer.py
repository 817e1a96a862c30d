"""Where a run's numbers go: `workdir/metrics.jsonl` (one JSON object per logged step, easy to grep and
plot) and TensorBoard event files in `workdir/tensorboard` (scalars and preview grids).

tensorboardX writes the event files without TensorFlow; `tensorboard --logdir WORKDIR/tensorboard` reads them.
"""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsWriter:
  """`enabled=False` (every process but the primary of a multi-host run) writes nothing. `resume_step`: the step
  the run resumes from; what an earlier attempt logged after it (before a fall back to an older checkpoint) is
  dropped, from metrics.jsonl (and so loss.png) and TensorBoard alike, so neither mixes two trajectories."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    if resume_step and os.path.isfile(self.jsonl_path):
      trim_jsonl(self.jsonl_path, resume_step)
    # TensorBoard hides events at steps >= purge_step written before this one (its SessionLog.START).
    purge = {"purge_step": resume_step + 1} if resume_step else {}
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30, **purge)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({**values, "step": step}) + "\n")
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """uint8 [H, W, 3]."""
    if self.enabled:
      self._tb.add_image(tag, image, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()


def trim_jsonl(path: str, last_step: int) -> None:
  """Keeps the records of `path` up to `last_step` (a torn last line too is dropped); replaced atomically."""
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= last_step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)

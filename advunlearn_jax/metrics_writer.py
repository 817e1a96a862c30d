"""Where a run's numbers go: `workdir/metrics.jsonl` (one JSON object per logged step, easy to grep and
plot) and TensorBoard event files in `workdir/tensorboard` (scalars and preview grids).

tensorboardX writes the event files without TensorFlow; `tensorboard --logdir WORKDIR/tensorboard` reads them.
"""

from __future__ import annotations

import json
import os

import numpy as np


class MetricsWriter:
  """`enabled=False` (every process but the primary of a multi-host run) writes nothing."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

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

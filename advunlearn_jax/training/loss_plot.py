"""`workdir/loss.png`: the run's losses by iteration, drawn from `workdir/metrics.jsonl`.

matplotlib's object API (a Figure on the Agg canvas, no pyplot), so drawing touches no global backend state.
A plot of a 1000-iteration run takes ~0.1 s; the run redraws it at most every `min_seconds` and at its end,
where the reference redraws its plot at every iteration and that grows to seconds per iteration.
"""

from __future__ import annotations

import json
import os
import time

SERIES = (  # (metric, label)
  ("loss", "defender loss"),
  ("loss_unlearn", "unlearn (ESD)"),
  ("loss_retain", "retain"),
  ("attack_loss_last", "attack (last step)"),
)


def read_series(jsonl_path: str) -> dict[str, tuple[list[int], list[float]]]:
  """{metric: (steps, values)} for the metrics of SERIES that the file holds."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  with open(jsonl_path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      for name, _ in SERIES:
        if name in record:
          steps, values = out.setdefault(name, ([], []))
          steps.append(record["step"])
          values.append(record[name])
  return out


def draw(jsonl_path: str, png_path: str, warmup_iters: int = 0) -> bool:
  """Writes `png_path` (replaced whole, never half-written); False when there is nothing to plot yet."""
  if not os.path.isfile(jsonl_path):
    return False
  series = read_series(jsonl_path)
  if not series:
    return False
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, label in SERIES:
    if name in series:
      ax.plot(*series[name], label=label, linewidth=1)
  if 0 < warmup_iters < max(max(s) for s, _ in series.values()):
    ax.axvline(warmup_iters, color="gray", linestyle=":", linewidth=1, label="end of warm-up")
  if all(v > 0 for _, values in series.values() for v in values):
    ax.set_yscale("log")
  ax.set_xlabel("iteration")
  ax.set_ylabel("MSE")
  ax.legend(fontsize="small")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  staging = png_path + ".partial.png"
  fig.savefig(staging)
  os.replace(staging, png_path)
  return True


class LossPlot:
  """Redraws `workdir/loss.png` from the run's metrics.jsonl, at most every `min_seconds` unless forced."""

  def __init__(self, workdir: str, warmup_iters: int, enabled: bool = True, min_seconds: float = 30.0):
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.png_path = os.path.join(workdir, "loss.png")
    self.warmup_iters, self.enabled, self.min_seconds = warmup_iters, enabled, min_seconds
    self._last = -float("inf")

  def update(self, force: bool = False) -> None:
    now = time.perf_counter()
    if self.enabled and (force or now - self._last >= self.min_seconds):
      draw(self.jsonl_path, self.png_path, self.warmup_iters)
      self._last = now

"""Rates with their counts and 95% Wilson score intervals: every ASR and accuracy this project reports.

With the 8 to 50 prompts an erasure evaluation has, one prompt moves a rate by 2 to 12 points, so a rate
without its count and interval cannot be compared with another. The Wilson interval (no continuity correction)
stays inside [0, 1] and is sensible at 0/n and n/n, where the normal approximation collapses to a point; the
interval comes from scipy's `binomtest(...).proportion_ci(method="wilson")`.
"""

from __future__ import annotations

from typing import NamedTuple

CONFIDENCE = 0.95


class Rate(NamedTuple):
  k: int
  n: int
  lo: float  # 95% Wilson interval
  hi: float

  @property
  def value(self) -> float:
    return self.k / self.n

  def __str__(self) -> str:
    """`37.5% (3/8, 95% CI 13.7-69.4%)`: what a report and a README table print."""
    return f"{self.value:.1%} ({self.k}/{self.n}, 95% CI {100 * self.lo:.1f}-{100 * self.hi:.1f}%)"

  def to_json(self) -> dict:
    return {"rate": self.value, "k": self.k, "n": self.n, "ci95": [self.lo, self.hi]}


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
  from scipy.stats import binomtest

  if n < 1 or not 0 <= k <= n:
    raise ValueError(f"a rate needs 0 <= k <= n and n >= 1, got {k}/{n}")
  ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
  return float(ci.low), float(ci.high)


def rate(k: int, n: int) -> Rate:
  return Rate(int(k), int(n), *wilson(k, n))

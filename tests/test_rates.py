"""Wilson score intervals against values worked out by hand from the closed form, and how reports print them."""

import math

import pytest

from advunlearn_jax import rates

Z = 1.959963984540054  # the 97.5% normal quantile


def _closed_form(k, n):
  p = k / n
  centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
  half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
  return centre - half, centre + half


@pytest.mark.parametrize(
  "k, n, lo, hi",
  [
    (0, 10, 0.0, 0.27753),  # z^2 / (n + z^2): the upper end at 0/n
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (1, 24, 0.00739, 0.20242),
    (3, 8, 0.13684, 0.69425),
    (81, 263, 0.25529, 0.36621),
  ],
)
def test_wilson_matches_the_closed_form_and_known_values(k, n, lo, hi):
  got = rates.wilson(k, n)
  assert got == pytest.approx((lo, hi), abs=1e-5)
  assert got == pytest.approx(_closed_form(k, n), abs=1e-9)


def test_a_rate_prints_its_count_and_interval_and_refuses_impossible_counts():
  r = rates.rate(3, 8)
  assert str(r) == "37.5% (3/8, 95% CI 13.7-69.4%)"
  assert r.to_json() == {
    "rate": 0.375,
    "k": 3,
    "n": 8,
    "ci95": [pytest.approx(0.13684, abs=1e-5), pytest.approx(0.69425, abs=1e-5)],
  }
  for k, n in ((1, 0), (5, 4), (-1, 3)):
    with pytest.raises(ValueError, match="0 <= k <= n"):
      rates.rate(k, n)

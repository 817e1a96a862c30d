"""Long work says how long it has left (time_left.py): the mean pace so far times what remains."""

from advunlearn_jax import time_left


def test_eta_is_the_mean_pace_times_what_remains():
  now = [100.0]
  eta = time_left.Eta(10, clock=lambda: now[0])
  assert eta(0) == "ETA unknown"
  now[0] = 104.0  # 2 units in 4 s: 8 more take 16 s
  assert eta(2) == "ETA 16s"
  now[0] = 190.0  # 9 in 90 s
  assert eta(9) == "ETA 10s" and eta(10) == "ETA 0s"
  assert time_left.Eta(1000, clock=lambda: now[0])(0) == "ETA unknown"


def test_durations_read_as_a_wait_needs():
  assert [time_left.duration(s) for s in (0.4, 42, 185, 7620, -3)] == ["0s", "42s", "3m 05s", "2h 07m", "0s"]

"""The iteration benchmark runs end to end on the tiny models and prints its three rates and their ratios (slow:
it compiles both JAX modes and runs the PyTorch transcription). Only that it runs and reports; never its speed."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_iteration_benchmark_reports_every_mode():
  args = ["--size=tiny", "--iters=1", "--attack_steps=2", "--retain_batch=2"]
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "iteration.py"), *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={**os.environ, "PYTHONPATH": ROOT},
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rates = dict(re.findall(r"^(jax online|jax bank|pytorch)\s*:\s*([0-9.]+) s/it", out.stdout, re.M))
  assert set(rates) == {"jax online", "jax bank", "pytorch"}, out.stdout
  assert all(float(r) > 0 for r in rates.values())
  for name in ("jax online vs pytorch", "jax bank vs pytorch", "jax bank vs jax online"):
    assert re.search(rf"^speed-up {name}: [0-9.]+x$", out.stdout, re.M), out.stdout

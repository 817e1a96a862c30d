"""Real preemption: SIGKILL after a checkpoint, then resume, ends bit-identical to an uninterrupted run;
SIGTERM saves before exiting. Subprocesses of the README's main command (slow: each compiles its step)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from advunlearn_jax import cli
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.testing import tiny_models

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  return tiny_models.write_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"))


def _cmd(pipeline_dir, workdir, iterations=8):
  flags = {
    "model.pretrained": pipeline_dir,
    "concept.prompts": "('nudity',)",
    "train.iterations": iterations,
    "train.warmup_iters": 2,
    "train.save_every": 2,
    "train.log_every": 1,
    "retain.batch": 2,
    "attack.steps": 2,
    "train.lr": 1e-3,
  }
  return [
    sys.executable,
    "-m",
    "advunlearn_jax.main",
    "--config=configs/base.py",
    f"--workdir={workdir}",
    *[f"--config.{k}={v}" for k, v in flags.items()],
  ]


def _env():
  return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _wait_for_checkpoint(proc, workdir, step, timeout=600):
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(path) and not any(".tmp" in name for name in os.listdir(os.path.dirname(path))):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
    time.sleep(0.5)
  raise AssertionError("no checkpoint in time")


def test_sigkill_then_resume_is_bit_identical(pipeline_dir, tmp_path):
  """The killed run's lock on its workdir goes with it: the resume is not blocked."""
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_cmd(pipeline_dir, straight), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)
  proc = subprocess.Popen(_cmd(pipeline_dir, killed), cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(proc, killed, 4)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, "text_encoder"))
  subprocess.run(_cmd(pipeline_dir, killed), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)
  _, a = clip_convert.load_clip_text(os.path.join(straight, "text_encoder"))
  _, b = clip_convert.load_clip_text(os.path.join(killed, "text_encoder"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_and_ctrl_c_save_before_exit(pipeline_dir, tmp_path):
  workdir = str(tmp_path / "term")
  proc = subprocess.Popen(
    _cmd(pipeline_dir, workdir, iterations=400), cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True
  )
  _wait_for_checkpoint(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == cli.EXIT_PREEMPTED == 75, err[-2000:]  # saved, not finished: a scheduler requeues
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert "SIGTERM: saved step" in err and steps[-1] >= 2 and steps[-1] < 400
  # Ctrl-C on the resumed run does the same (it used to print a KeyboardInterrupt traceback and save nothing
  # since the last checkpoint), with the status a shell reports for it.
  proc = subprocess.Popen(
    _cmd(pipeline_dir, workdir, iterations=400), cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True
  )
  after = steps[-1] - steps[-1] % 2 + 2  # the resumed run's first periodic save (save_every 2)
  _wait_for_checkpoint(proc, workdir, after)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == cli.EXIT_INTERRUPTED == 130, err[-2000:]
  saved = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert f"SIGINT: saved step {saved}, stopping; rerun the same command to resume" in err, err[-2000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err and saved >= after

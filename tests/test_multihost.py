"""Multi-controller training on loopback: 2 processes x 4 CPU devices (gloo collectives) against 1 process x 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.convert import weights_io
from advunlearn_jax.testing import tiny_models
from advunlearn_jax.training import runs
from tests.conftest import EIGHT_DEVICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Retain and concept batches of 8 split over the 8-device data axis: 4 rows per process, so the gradient
# all-reduce really crosses processes. The same strings are the subprocesses' --config. flags and, through
# config_lib.override (the same parser), the in-process run's config.
OVERRIDES = [
  "train.iterations=3",
  "train.warmup_iters=0",  # every iteration attacks: one compiled step per run
  "train.save_every=2",
  "train.log_every=1",
  "train.concept_batch=8",
  "train.xt_source=online",
  "attack.steps=3",
  "retain.batch=8",
  "samples.every=0",
  "report.kind=",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _config(pipeline_dir, iterations=3):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    import tiny as tiny_config
  finally:
    sys.path.pop(0)
  overrides = [f"model.pretrained={pipeline_dir}", *OVERRIDES, f"train.iterations={iterations}"]
  return config_lib.override(tiny_config.get_config(), overrides)


def _two_process_run(pipeline_dir, workdir):
  port = _free_port()
  flags = [f"--config.{item}" for item in OVERRIDES]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4", "PYTHONPATH": ROOT}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != EIGHT_DEVICES)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "advunlearn_jax.main",
        f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        f"--config.model.pretrained={pipeline_dir}",
        *flags,
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs


def _encoder(workdir):
  return weights_io.read_safetensors(os.path.join(workdir, "text_encoder", "model.safetensors"))


def _max_diff(a, b):
  """Over every tensor but the attention key biases: their exact gradient is zero (softmax ignores a constant
  added to every logit), so Adam turns rounding noise of either run into updates of up to lr. Measured: 1.3e-4
  on those, <= 3e-7 on everything else."""
  assert a.keys() == b.keys()
  keys = [k for k in a if not k.endswith("k_proj.bias")]
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in keys)


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path):
  pipeline_dir = tiny_models.write_pipeline(str(tmp_path / "pipe"))
  multi, single = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  outputs = _two_process_run(pipeline_dir, multi)
  assert "done: text_encoder" in outputs[0] and "done:" not in outputs[1]  # only process 0 reports
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2", "3"]
  with open(os.path.join(multi, "metrics.jsonl")) as f:
    assert len(f.read().splitlines()) == 3  # one writer, not two

  assert runs.run(_config(pipeline_dir), single)["resumed_from"] == 0
  before = _encoder(single)
  losses = [[json.loads(line)["loss"] for line in open(os.path.join(w, "metrics.jsonl"))] for w in (multi, single)]
  np.testing.assert_allclose(*losses, rtol=1e-5)
  # Same global mesh and program; only the collectives' transport differs (gloo vs in-process).
  assert _max_diff(_encoder(multi), before) < 1e-5
  original = weights_io.read_safetensors(os.path.join(pipeline_dir, "text_encoder", "model.safetensors"))
  assert _max_diff(before, original) > 1e-4  # training moved it

  # The 2-process checkpoint restores in a 1-process run, and both continue identically.
  assert runs.run(_config(pipeline_dir, iterations=4), multi)["resumed_from"] == 3
  assert runs.run(_config(pipeline_dir, iterations=4), single)["resumed_from"] == 3
  assert _max_diff(_encoder(multi), _encoder(single)) < 1e-5


def test_initialize_arguments(monkeypatch):
  from advunlearn_jax.errors import ConfigError
  from advunlearn_jax.training import distributed

  for name in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "TPU_WORKER_HOSTNAMES",
    "SLURM_NTASKS",
  ):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False  # a plain single-process run stays one
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
  assert distributed.initialize() is False
  with pytest.raises(ConfigError, match="needs --coordinator_address"):
    distributed.initialize(num_processes=2, process_id=0)
  with pytest.raises(ConfigError, match=r"--process_id in \[0, 2\)"):
    distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "5")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  with pytest.raises(ConfigError, match="got '127.0.0.1:1' and 5"):  # the environment is read too
    distributed.initialize()
  assert distributed.is_primary() and not distributed.preemption_agreed(3, False)
  assert distributed.preemption_agreed(3, True)
  distributed.sync("single process: returns at once")

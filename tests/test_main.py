"""The README's main command on the tiny config; bad configs fail with a message naming the key."""

import json
import os
import subprocess
import sys

import jax
import pytest

from advunlearn_jax import compile_cache, config_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.training import config_validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, tmp_path, timeout=120):
  cmd = [sys.executable, "-m", "advunlearn_jax.main", f"--workdir={tmp_path}", *args]
  env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as on a user's laptop
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_tiny_default_run_end_to_end(tmp_path):
  """The README's command 1, shortened: trains, previews, exports and writes the report."""
  proc = _main(
    "--config=configs/tiny.py",
    "--config.train.iterations=4",
    "--config.train.warmup_iters=0",  # one compiled step, the quickstart notebook's (test_train.py has warm-up's)
    "--config.train.save_every=2",
    "--config.train.log_every=1",
    "--config.attack.steps=2",
    "--config.bank.concept_trajectories=2",
    "--config.samples.every=2",
    "--config.samples.steps=3",
    "--config.report.images_per_value=2",
    tmp_path=tmp_path,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "erased concept recognised" in proc.stdout
  # Quiet: our own one line per event, the libraries' warnings only; tqdm redraws its bar with carriage returns.
  lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and "AdvUnlearn:" not in line]
  assert len(lines) < 40, "\n".join(lines)
  # The checkpoint keeps the config as the user wrote it: "tiny" resolves at use, so a moved checkout resumes.
  from advunlearn_jax.training import checkpoint

  assert checkpoint.latest_readable(str(tmp_path))[1]["config"]["model"]["pretrained"] == "tiny"
  metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [1, 2, 3, 4]
  report = json.loads((tmp_path / "report" / "report.json").read_text())
  assert [r["value"] for r in report["shape"] if r["erased"]] == ["triangle"]
  assert set(report["summary"]) == {"erased_before", "erased_after", "retained_before", "retained_after"}
  for name in ("report.md", "erased_before_after.png", "retained_before_after.png"):
    assert (tmp_path / "report" / name).is_file()
  assert sorted(os.listdir(tmp_path / "samples")) == ["step_000002.png", "step_000004.png"]
  assert (tmp_path / "text_encoder" / "model.safetensors").is_file()
  assert (tmp_path / "pipeline" / "model_index.json").is_file()
  # The compiled steps went to the persistent cache, so a resume or rerun loads rather than compiles them: the
  # session's shared one (conftest.py), which the command takes from the environment over WORKDIR/xla_cache.
  assert not (tmp_path / "xla_cache").exists()
  assert any(name.startswith("jit_train_step-") for name in os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"]))


def test_compilation_cache_folder(monkeypatch):
  monkeypatch.setattr(jax.config, "update", lambda name, value: None)  # JAX picks its cache folder once
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compile_cache.enable(None, "{workdir}/xla_cache", workdir="runs/a") == os.path.abspath("runs/a/xla_cache")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/xla")  # the environment's wins over the default...
  assert compile_cache.enable(None, "{workdir}/xla_cache", workdir="runs/a") == "/shared/xla"
  assert compile_cache.enable("", "{workdir}/xla_cache", workdir="runs/a") == ""  # ...not over the flag
  assert compile_cache.resolve("{workdir}/xla_cache", workdir="runs/a") == os.path.abspath("runs/a/xla_cache")
  assert compile_cache.resolve("", workdir="runs/a") == ""  # off
  with pytest.raises(ConfigError, match=r"unknown placeholder; this command knows \['\{out\}'\]"):
    compile_cache.resolve("{workdir}/xla_cache", out="report")  # evaluate has --out, not --workdir


def test_validate_messages():
  config = config_lib.base_config()
  config.retain.mode = "sometimes"
  with pytest.raises(ConfigError, match="config.retain.mode"):
    config_validation.validate(config)
  # The attack's settings are checked where AttackConfig is built, once for the whole command.
  config = config_lib.base_config()
  config.attack.init = "oldest"
  with pytest.raises(ConfigError, match=r"config.attack.init is 'oldest'; valid: \['random', 'latest'\]"):
    config_validation.validate(config)


@pytest.mark.parametrize(
  "name,concept,weight", [("nudity", "nudity", 0.3), ("style", "Van Gogh", 0.5), ("object", "church", 0.5)]
)
def test_reference_configs(name, concept, weight):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert list(config.concept.prompts) == [concept] and config.retain.weight == weight
  assert config.model.pretrained == config_lib.SD_V1_4 and config.retain.mode == "reg"
  assert config.train.iterations == 1000 and config.train.warmup_iters == 200 and config.attack.steps == 30
  config_validation.validate(config)

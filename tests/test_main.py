"""The README's main command resolves the tiny config; bad configs fail with a message naming the key."""

import os
import subprocess
import sys

import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, tmp_path):
  cmd = [sys.executable, "-m", "advunlearn_jax.main", f"--workdir={tmp_path}", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_tiny_config_resolves_with_overrides(tmp_path):
  proc = _main("--config=configs/tiny.py", "--config.attack.steps=3", tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "steps: 3" in proc.stdout and "triangle" in proc.stdout


def test_empty_concept_is_rejected(tmp_path):
  proc = _main("--config=configs/tiny.py", "--config.concept.prompts=('',)", tmp_path=tmp_path)
  assert proc.returncode != 0
  assert "ConfigError: config.concept.prompts: needs at least one non-empty concept" in proc.stderr


def test_validate_messages():
  config = config_lib.base_config()
  config.retain.mode = "sometimes"
  with pytest.raises(ConfigError, match="config.retain.mode"):
    config_lib.validate(config)


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
  config_lib.validate(config)

"""The Hub folder of a run (export --hub_dir): what the reference's users load, a card the Hub parses, the
evaluation's numbers as the report has them; written whole or not at all, uploaded only when complete."""

import json
import os

import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.training import hub
from tests.conftest import QUICKSTART_OVERRIDES

pytestmark = pytest.mark.slow  # the quickstart notebook's run (conftest.py): ~2 minutes on 2 cores, once


@pytest.fixture(scope="module")
def run_and_report(quickstart):
  """The quickstart notebook's run and its evaluation report (conftest.py)."""
  import configs.tiny as tiny_config

  _, workdir = quickstart
  config = config_lib.override(tiny_config.get_config("triangle"), QUICKSTART_OVERRIDES)
  return config, workdir, os.path.join(workdir, "evaluation", "report.json")


def test_hub_folder_loads_in_transformers_and_its_card_carries_the_report(run_and_report, tmp_path):
  import torch
  import transformers
  from huggingface_hub import ModelCard

  config, workdir, report_path = run_and_report
  hub_dir = str(tmp_path / "hub")
  hub.write_folder(hub_dir, workdir, report_path=report_path, with_reference=True)
  assert sorted(os.listdir(hub_dir)) == [
    ".advunlearn_export", "README.md", "TextEncoder-text_encoder_full-epoch_1.pt", "text_encoder",
    "training_config.json",
  ]  # fmt: skip
  # The encoder is the run's own, in safetensors, loadable as the reference's users load theirs.
  assert "model.safetensors" in os.listdir(os.path.join(hub_dir, "text_encoder"))
  loaded = transformers.CLIPTextModel.from_pretrained(os.path.join(hub_dir, "text_encoder"))
  own = transformers.CLIPTextModel.from_pretrained(os.path.join(workdir, "text_encoder"))
  for (name, a), (_, b) in zip(loaded.state_dict().items(), own.state_dict().items(), strict=True):
    assert torch.equal(a, b), name
  # The card parses as the Hub parses it, and says what the encoder is.
  card = ModelCard.load(os.path.join(hub_dir, "README.md"))
  data = card.data
  assert data.license == "apache-2.0" and data.base_model is None  # the tiny model is ours; no hub id to name
  assert data.library_name == "transformers" and "concept-erasure" in data.tags
  assert data.erased_concepts == list(config.concept.prompts) and data.training_method == "text_encoder_full"
  assert data.training_step == 2
  with open(report_path) as f:
    report = json.load(f)
  summary = report["robustness"]["summary"]
  values = {r.metric_type: r.metric_value for r in data.eval_results}
  assert values == {
    "pre_attack_success_rate": round(100 * summary["pre_asr"], 2),
    "attack_success_rate": round(100 * summary["asr"], 2),
  }
  text = card.text
  assert "CLIPTextModel.from_pretrained" in text and f"{summary['prompts']}" in text
  assert "classifier" in text and report["classifier"] in text  # the protocol block rides along
  with open(os.path.join(hub_dir, "training_config.json")) as f:
    assert json.load(f)["attack"]["steps"] == config.attack.steps


def test_hub_folder_is_whole_or_absent_and_the_licence_is_named(run_and_report, tmp_path):
  config, workdir, _ = run_and_report
  hub_dir = tmp_path / "hub"
  hub.write_folder(str(hub_dir), workdir)  # no report: a card without evaluation
  first = sorted(os.listdir(hub_dir))
  assert "## Evaluation" not in (hub_dir / "README.md").read_text()
  bad = tmp_path / "bad.json"
  bad.write_text('{"neither": 1}')
  with pytest.raises(ConfigError, match="not an evaluate report.json"):
    hub.write_folder(str(hub_dir), workdir, report_path=str(bad))
  assert sorted(os.listdir(hub_dir)) == first  # the earlier folder stands
  # The licence is the base model's the run was trained from, or the one the user names.
  hub.write_folder(str(tmp_path / "other"), workdir, license_id="mit")
  assert "license: mit" in (tmp_path / "other" / "README.md").read_text()
  assert hub.licence_of("CompVis/stable-diffusion-v1-4") == "creativeml-openrail-m"
  with pytest.raises(ConfigError, match="--license: the run's base '/my/sd' is none whose licence is known"):
    hub.licence_of("/my/sd")
  assert hub.licence_of("/my/sd", "openrail") == "openrail"


def test_push_refuses_a_bad_repo_id_and_reports_an_unreachable_hub(run_and_report, tmp_path, monkeypatch):
  _, workdir, _ = run_and_report
  hub_dir = str(tmp_path / "hub")
  hub.write_folder(hub_dir, workdir)
  with pytest.raises(ConfigError, match="expected a model repository id"):
    hub.push(hub_dir, "no-owner")
  from huggingface_hub import constants

  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up; no network here
  with pytest.raises(ConfigError, match=f"the upload failed .*{hub_dir} is complete"):
    hub.push(hub_dir, "someone/robust-encoder")
  assert np.all([os.path.exists(os.path.join(hub_dir, f)) for f in ("README.md", "text_encoder")])

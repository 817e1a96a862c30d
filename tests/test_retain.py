"""The retain sets the package ships, the config's choice among them, and the sampler's epochs."""

import csv
import os

import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.unlearn import retain

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "retain")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not part of a user's clone")
@pytest.mark.parametrize("name", retain.DATASETS)
def test_shipped_sets_equal_the_reference_csvs_row_for_row(name):
  with open(os.path.join(SHARED, f"{name}_retain.csv"), newline="", encoding="utf-8") as f:
    reference = [row["prompt"] for row in csv.DictReader(f)]
  assert retain.load_dataset(name) == reference
  assert retain.load_csv(os.path.join(SHARED, f"{name}_retain.csv")) == reference  # the CSV path reads the same


def test_shipped_sets_hold_what_the_reference_documents():
  coco = retain.load_dataset("coco_object")
  assert len(coco) == 243 and len(set(coco)) == 237 and all(p.startswith("a photo of ") for p in coco)
  assert coco.count("a photo of basketball") == 2  # the reference's own repeats stay: they weight the sampling
  unfiltered = retain.load_dataset("coco_object_no_filter")
  dropped = {p for p, q in zip(unfiltered, coco) if p != q}
  assert len(dropped) == 22 and "a photo of torso" in dropped and "a photo of torso" not in coco
  assert "a photo of nipple" in retain.load_dataset("imagenet243")  # the reference's filter kept it


def test_the_config_names_a_set_a_csv_or_its_own_prompts(tmp_path):
  c = config_lib.base_config()
  assert retain.from_config(c) == retain.load_dataset("coco_object")  # the reference's default
  c.retain.dataset = "imagenet243_no_filter"
  assert retain.from_config(c)[0] == "a photo of strawberry"
  path = tmp_path / "mine.csv"
  path.write_text('case_num,source,prompt\n1,me,"a photo of a red, round ball"\n2,me,\n3,me,a photo of a kite\n')
  c.retain.dataset = str(path)
  assert retain.from_config(c) == ["a photo of a red, round ball", "a photo of a kite"]  # empty rows skipped
  c.retain.prompts = ("a photo of a dog",)
  with pytest.raises(ConfigError, match="keep one"):
    retain.from_config(c)
  c.retain.dataset = ""
  assert retain.from_config(c) == ["a photo of a dog"]
  c.retain.prompts = ()
  with pytest.raises(ConfigError, match="config.retain.dataset is empty and so is config.retain.prompts"):
    retain.from_config(c)
  c.retain.dataset = "coco"  # the reference's invalid CLI default
  with pytest.raises(ConfigError, match=r"coco not found \(expected one of \['coco_object'"):
    retain.from_config(c)
  path.write_text("case_num,source,text\n1,me,a photo of a dog\n")
  c.retain.dataset = str(path)
  with pytest.raises(ConfigError, match="mine.csv has no 'prompt' column"):
    retain.from_config(c)


def test_sampler_draws_without_replacement_within_an_epoch():
  state, seen = retain.SamplerState(0, 0), []
  for _ in range(4):
    idx, state = retain.sample(state, 10, 3, seed=7)
    seen.append(idx)
  assert len(set(np.concatenate(seen[:3]).tolist())) == 9  # epoch 0: nine distinct prompts
  assert state == retain.SamplerState(1, 3)  # one prompt left over: a fresh permutation started
  again, _ = retain.sample(retain.SamplerState(0, 0), 10, 3, seed=7)
  np.testing.assert_array_equal(again, seen[0])  # deterministic in (seed, state), so resume repeats it
  with pytest.raises(ConfigError, match="exceeds the number of retain prompts"):
    retain.sample(state, 2, 3, seed=0)

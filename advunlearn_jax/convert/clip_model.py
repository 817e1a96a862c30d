"""transformers `CLIPModel` folders (e.g. openai/clip-vit-base-patch32) -> Flax params of models/clip_vision.py."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from advunlearn_jax.convert import torch_layout, weights_io
from advunlearn_jax.errors import WeightsError
from advunlearn_jax.models import hf_config
from advunlearn_jax.models.clip_vision import CLIPModelConfig, abstract_params

LIST_NAMES = ("layers",)
_CLASS_EMBEDDING = "vision_model.embeddings.class_embedding"


def _ignored(key: str) -> bool:
  return key.endswith("position_ids") or key == "logit_scale"  # a buffer; the score is a plain cosine


def params_from_state_dict(state: dict[str, np.ndarray], config: CLIPModelConfig, source: str) -> dict[str, Any]:
  state = dict(state)
  if _CLASS_EMBEDDING in state:
    state[_CLASS_EMBEDDING + ".weight"] = np.asarray(state.pop(_CLASS_EMBEDDING)).reshape(1, -1)
  return torch_layout.torch_to_flax(
    state, abstract_params(config), list_names=LIST_NAMES, source=source, ignore=_ignored
  )


def load_clip_model(folder: str) -> tuple[CLIPModelConfig, dict[str, Any]]:
  if not os.path.isdir(folder):
    raise WeightsError(f"{folder}: not a folder; expected a transformers CLIPModel folder")
  raw, path = hf_config.read(folder, "config.json", "a transformers CLIPModel folder")
  config = CLIPModelConfig.from_dict(raw, source=path)
  state, weights_path = weights_io.read_weights_folder(folder, ("model", "pytorch_model"))
  return config, params_from_state_dict(state, config, source=weights_path)

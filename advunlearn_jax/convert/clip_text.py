"""CLIP text encoder weights: transformers folders and reference AdvUnlearn checkpoints, both ways.

Key layouts met in the wild:
  * `text_model.encoder.layers.0...`: Stable Diffusion's `text_encoder/`, the released AdvUnlearn encoders,
    transformers 4.x. We export this one, because transformers 4.x and 5.x both read it.
  * `encoder.layers.0...`: what transformers 5.x saves.
  * `text_model.*` and `text_projection.weight`: a `CLIPTextModelWithProjection` (SDXL's `text_encoder_2/`),
    in transformers 4.x and 5.x alike. Its folder's config.json names the architecture, which decides whether
    the projection is expected, so a missing `text_projection.weight` is an error naming it.
  * reference AdvUnlearn `.pt` (spec section 5): every tensor twice, as `text_encoder.text_model.*` and as the
    aliases `embedding.*`, `encoder.*`, `final_layer_norm.*` of its `CustomTextEncoder` wrapper.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np

from advunlearn_jax.convert import torch_layout, weights_io
from advunlearn_jax.errors import WeightsError
from advunlearn_jax.models import hf_config
from advunlearn_jax.models.clip_text import CLIPTextConfig, abstract_params

LIST_NAMES = ("layers",)
TEXT_MODEL_PREFIX = "text_model."
REFERENCE_PREFIX = "text_encoder.text_model."
# Aliases registered by the reference's CustomTextEncoder, mapped to the `text_model.` names they share.
_REFERENCE_ALIASES = {
  "embedding.": "embeddings.",
  "encoder.": "encoder.",
  "final_layer_norm.": "final_layer_norm.",
}
_WEIGHT_STEMS = ("model", "pytorch_model")
WITH_PROJECTION = "CLIPTextModelWithProjection"


def _is_buffer(key: str) -> bool:
  return key.endswith("position_ids")  # a non-persistent buffer that older transformers saved


def has_projection(params: Any) -> bool:
  """Whether `params` are a CLIPTextModelWithProjection's (text_model + text_projection)."""
  return "text_projection" in params


def params_from_state_dict(
  state: dict[str, np.ndarray],
  config: CLIPTextConfig,
  source: str,
  display_prefix: str = "",
  with_projection: bool = False,
) -> dict[str, Any]:
  """Flax params from a flat CLIPTextModel state dict with or without the `text_model.` prefix, or (with
  `with_projection`) a CLIPTextModelWithProjection's: `text_projection.weight` and the tower's keys, which carry
  `text_model.` (a plain tower's transformers 5.x keys gain it, so that only the projection is named missing)."""
  if with_projection:
    keep = lambda k: k.startswith((TEXT_MODEL_PREFIX, "text_projection."))
    state = {k if keep(k) else TEXT_MODEL_PREFIX + k: v for k, v in state.items()}
  elif any(k.startswith(TEXT_MODEL_PREFIX) for k in state):
    state = {k.removeprefix(TEXT_MODEL_PREFIX): v for k, v in state.items()}
  return torch_layout.torch_to_flax(
    state,
    abstract_params(config, with_projection=with_projection),
    list_names=LIST_NAMES,
    source=source,
    ignore=_is_buffer,
    display_prefix=display_prefix,
  )


def load_clip_text(folder: str, with_projection: bool | None = None) -> tuple[CLIPTextConfig, dict[str, Any]]:
  """A transformers `CLIPTextModel` or `CLIPTextModelWithProjection` folder (config.json + model.safetensors,
  or pytorch_model.bin). `with_projection` None: as config.json's `architectures` say."""
  if not os.path.isdir(folder):
    raise WeightsError(f"{folder}: not a folder; expected a transformers CLIPTextModel folder")
  raw, config_path = hf_config.read(folder, "config.json", "a transformers CLIPTextModel folder")
  config = CLIPTextConfig.from_dict(raw, source=config_path)
  if with_projection is None:
    with_projection = WITH_PROJECTION in (raw.get("architectures") or ())
  state, path = weights_io.read_weights_folder(folder, _WEIGHT_STEMS)
  return config, params_from_state_dict(state, config, source=path, with_projection=with_projection)


def state_dict(params: Any, prefix: str = TEXT_MODEL_PREFIX) -> dict[str, np.ndarray]:
  return torch_layout.flax_to_torch(params, list_names=LIST_NAMES, prefix=prefix)


def _checked_state(config: CLIPTextConfig, params: Any, out: str) -> dict[str, np.ndarray]:
  """The state dict without prefix, every key the config implies present at its shape, and no other."""
  table = torch_layout.key_table(abstract_params(config, with_projection=has_projection(params)), LIST_NAMES)
  state = state_dict(params, prefix="")
  for key, (_, shape) in table.items():
    if key not in state or state[key].shape != shape:
      got = state[key].shape if key in state else "nothing"
      raise WeightsError(f"export to {out}: param {key!r} is {got}, the config expects {shape}")
  if extra := sorted(set(state) - set(table)):
    raise WeightsError(f"export to {out}: params hold keys the config does not: {extra[:8]}")
  return state


def export_clip_text(config: CLIPTextConfig, params: Any, out_dir: str) -> str:
  """Writes config.json + model.safetensors that `transformers.CLIPTextModel.from_pretrained` loads, or
  `CLIPTextModelWithProjection.from_pretrained` for params with a projection.

  The folder appears only once complete; an existing folder is replaced atomically.
  """
  state = _checked_state(config, params, out_dir)
  if has_projection(params):  # its keys already carry `text_model.`
    architecture = WITH_PROJECTION
  else:
    architecture, state = "CLIPTextModel", {TEXT_MODEL_PREFIX + k: v for k, v in state.items()}
  with weights_io.atomic_folder(out_dir) as staging:
    weights_io.write_json(os.path.join(staging, "config.json"), config.to_transformers_dict(architecture))
    weights_io.write_safetensors(os.path.join(staging, "model.safetensors"), state)
  return out_dir


def reference_state_dict(config: CLIPTextConfig, params: Any, out: str = "a reference checkpoint"):
  """The state dict of the reference's `CustomTextEncoder` wrapper (spec section 5), as its `TextEncoder-*.pt`
  files hold it: every tensor under `text_encoder.text_model.` and again under the wrapper's alias, the two names
  sharing one tensor, plus the `position_ids` buffer that transformers 4.25 (the reference's pin) saved. Torch
  tensors: writing them needs torch."""
  import torch

  if has_projection(params):
    raise WeightsError(f"{out}: the reference's checkpoints hold a CLIPTextModel; these params have a projection")
  state = {k: torch.from_numpy(np.array(v)) for k, v in _checked_state(config, params, out).items()}
  state["embeddings.position_ids"] = torch.arange(config.max_position_embeddings, dtype=torch.int64)[None]
  out_state = {REFERENCE_PREFIX + k: v for k, v in state.items()}
  for alias, name in _REFERENCE_ALIASES.items():
    out_state.update({alias + k.removeprefix(name): v for k, v in state.items() if k.startswith(name)})
  return out_state


def export_reference_checkpoint(config: CLIPTextConfig, params: Any, path: str) -> str:
  """Writes `path` (`TextEncoder-<method>-epoch_<i>.pt`) with `torch.save`, for the reference's own loaders
  (UnlearnDiffAtk, AdvUnlearn's generate-example-img.py). The file appears only once complete."""
  import torch

  state = collections.OrderedDict(reference_state_dict(config, params, path))  # what torch's state_dict() is
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  staging = f"{path}.partial"
  torch.save(state, staging)
  os.replace(staging, path)
  return path


def reference_checkpoint_name(method: str, iteration: int) -> str:
  """The reference's file name for the encoder after 0-based iteration `iteration` (its final one: 999)."""
  return f"TextEncoder-{method}-epoch_{iteration}.pt"


def load_reference_checkpoint(path: str, config: CLIPTextConfig) -> dict[str, Any]:
  """Reads a reference AdvUnlearn `TextEncoder-*.pt` strictly: any missing key is an error naming it."""
  state = weights_io.read_torch_pickle(path)
  primary = {k.removeprefix(REFERENCE_PREFIX): v for k, v in state.items() if k.startswith(REFERENCE_PREFIX)}
  if not primary:
    raise WeightsError(
      f"{path}: no '{REFERENCE_PREFIX}*' keys; this is not a reference AdvUnlearn text-encoder checkpoint"
    )
  for key, value in state.items():
    if key.startswith(REFERENCE_PREFIX):
      continue
    alias_of = next((new + key[len(old) :] for old, new in _REFERENCE_ALIASES.items() if key.startswith(old)), None)
    if alias_of is None:
      raise WeightsError(f"{path}: unexpected key {key!r}")
    if alias_of in primary and not np.array_equal(primary[alias_of], value):
      raise WeightsError(f"{path}: alias {key!r} differs from {REFERENCE_PREFIX + alias_of!r}; file is corrupt")
  return params_from_state_dict(primary, config, source=path, display_prefix=REFERENCE_PREFIX)

"""Stable Diffusion pipelines in diffusers' folder layout: load into Flax params, and write back.

`load_pipeline` takes a local folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
or a hub id, fetched with `huggingface_hub.snapshot_download` (which honours HF_HUB_OFFLINE and the local
cache). Components we do not use (safety_checker, feature_extractor, ...) are ignored whether present or
null. Weights are read with `safetensors.numpy`; no torch at run time.

A single-file CompVis checkpoint such as `sd-v1-4-full-ema.ckpt` (what the reference trains from) becomes
such a folder with diffusers' own converter, once (needs torch + diffusers, i.e. requirements-test.txt):

  python -c "from diffusers import StableDiffusionPipeline as P; \
P.from_single_file('sd-v1-4-full-ema.ckpt').save_pretrained('sd-v1-4-diffusers')"
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from advunlearn_jax import config_lib
from advunlearn_jax.convert import clip_text, torch_layout, weights_io
from advunlearn_jax.errors import ConfigError, WeightsError
from advunlearn_jax.models import hf_config
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models import vae as vae_lib
from advunlearn_jax.models.clip_text import CLIPTextConfig
from advunlearn_jax.models.pipeline_record import Pipeline, ScheduleConfig, SDXLPipeline

_DIFFUSERS_STEMS = ("diffusion_pytorch_model",)
_HUB_PATTERNS = [  # a sharded component's index and its shards (NAME-00001-of-00002.safetensors) included
  "model_index.json",
  "unet/config.json",
  "unet/diffusion_pytorch_model.safetensors",
  "unet/diffusion_pytorch_model.safetensors.index.json",
  "unet/diffusion_pytorch_model-*.safetensors",
  "vae/config.json",
  "vae/diffusion_pytorch_model.safetensors",
  "vae/diffusion_pytorch_model.safetensors.index.json",
  "vae/diffusion_pytorch_model-*.safetensors",
  "text_encoder/config.json",
  "text_encoder/model.safetensors",
  "text_encoder/model.safetensors.index.json",
  "text_encoder/model-*.safetensors",
  "text_encoder_2/config.json",  # SDXL's second tower and tokenizer
  "text_encoder_2/model.safetensors",
  "text_encoder_2/model.safetensors.index.json",
  "text_encoder_2/model-*.safetensors",
  "tokenizer_2/*",
  "tokenizer/*",
  "scheduler/*",
]


def is_hub_id(path_or_id: str) -> bool:
  return not path_or_id.startswith((".", "/", "~")) and path_or_id.count("/") == 1


def _shipped() -> dict[str, str]:
  """The shipped tiny models by name, read at use: a test moves the checkout under a run that stored "tiny"."""
  return {"tiny": config_lib.TINY_MODEL_DIR, "tiny_sdxl": config_lib.TINY_SDXL_MODEL_DIR}


def check_pretrained(pretrained: str, key: str = "config.model.pretrained") -> None:
  """`pretrained` names something loadable ("tiny" or "tiny_sdxl", a folder, or a hub id, fetched at use), without
  fetching."""
  if pretrained in _shipped() or os.path.isdir(os.path.expanduser(pretrained)):
    return
  if not is_hub_id(pretrained):
    raise ConfigError(
      f"{key}: {pretrained} is no folder, and not a hub id of the form 'owner/name' (or {list(_shipped())}, the "
      "shipped tiny models)"
    )


def resolve_pretrained(path_or_id: str) -> str:
  """The folder `path_or_id` names: "tiny" or "tiny_sdxl" (the shipped tiny models), a local diffusers folder (`~`
  expanded), or the snapshot folder of a hub id (fetched, or read from the cache under HF_HUB_OFFLINE=1)."""
  if path_or_id in _shipped():
    tiny = _shipped()[path_or_id]
    if not os.path.isdir(tiny):
      layout = " --layout=sdxl" if path_or_id == "tiny_sdxl" else ""
      raise ConfigError(
        f"{tiny} is missing (a partial checkout?); rebuild it with "
        f"`python -m advunlearn_jax.tiny.build{layout} --out=advunlearn_jax/assets` (docs/tiny_world.md)"
      )
    return tiny
  if os.path.isdir(os.path.expanduser(path_or_id)):
    return os.path.expanduser(path_or_id)
  if not is_hub_id(path_or_id):
    raise ConfigError(f"{path_or_id}: no such folder, and not a hub id of the form 'owner/name'")
  from huggingface_hub import snapshot_download

  try:
    return snapshot_download(path_or_id, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # offline without a cached copy, unknown repo, no network
    raise ConfigError(
      f"{path_or_id}: could not fetch from the hub or the local cache ({type(e).__name__}: {e}). "
      "Pass a local diffusers folder, or run once online (HF_HUB_OFFLINE=1 uses the cache only)."
    ) from e


def _component(root: str, name: str) -> str:
  folder = os.path.join(root, name)
  if not os.path.isdir(folder):
    raise ConfigError(f"{root}: no {name}/ folder; a Stable Diffusion pipeline folder needs {name}/")
  return folder


def load_unet(folder: str) -> tuple[unet_lib.UNetConfig, Any]:
  config = unet_lib.UNetConfig.from_json_file(folder)
  state, path = weights_io.read_weights_folder(folder, _DIFFUSERS_STEMS)
  params = torch_layout.torch_to_flax(
    state, unet_lib.abstract_params(config), list_names=unet_lib.LIST_NAMES, source=path
  )
  return config, params


def _modernise_vae_keys(state: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in state.items():
    parts = key.split(".")
    if "attentions" in parts and parts[-2] in vae_lib.LEGACY_ATTENTION_NAMES:
      parts[-2] = vae_lib.LEGACY_ATTENTION_NAMES[parts[-2]]
      if value.ndim == 4:  # very old checkpoints stored these linears as 1x1 convs
        value = value[:, :, 0, 0]
    out[".".join(parts)] = value
  return out


def load_vae(folder: str) -> tuple[vae_lib.VAEConfig, Any]:
  config = vae_lib.VAEConfig.from_json_file(folder)
  state, path = weights_io.read_weights_folder(folder, _DIFFUSERS_STEMS)
  params = torch_layout.torch_to_flax(
    _modernise_vae_keys(state), vae_lib.abstract_params(config), list_names=vae_lib.LIST_NAMES, source=path
  )
  return config, params


def is_sdxl_folder(root: str) -> bool:
  """Whether a pipeline folder's UNet takes SDXL's added conditioning (read `load_sdxl_pipeline`, not
  `load_pipeline`)."""
  raw, _ = hf_config.read(_component(root, "unet"), "config.json", "a diffusers unet/ folder")
  return raw.get("addition_embed_type") == "text_time"


def load_pipeline(path_or_id: str, text_encoder: str | None = None, with_vae: bool = True) -> Pipeline:
  """Configs and params of every component we use. `text_encoder` swaps in another encoder folder."""
  root = resolve_pretrained(path_or_id)
  if not os.path.isfile(os.path.join(root, "model_index.json")):
    raise ConfigError(f"{root}: no model_index.json; expected a diffusers Stable Diffusion pipeline folder")
  unet_config, unet_params = load_unet(_component(root, "unet"))
  if unet_config.addition_embed_type is not None:
    raise ConfigError(f"{root}: an SDXL folder (its UNet takes added conditioning); read it with load_sdxl_pipeline")
  vae_config, vae_params = load_vae(_component(root, "vae")) if with_vae else (None, None)
  text_config, text_params = clip_text.load_clip_text(text_encoder or _component(root, "text_encoder"))
  if text_config.hidden_size != unet_config.cross_attention_dim:
    raise ConfigError(
      f"{text_encoder or root}: text encoder width {text_config.hidden_size} does not match the UNet's "
      f"cross_attention_dim {unet_config.cross_attention_dim}"
    )
  schedule = ScheduleConfig.from_json_file(_component(root, "scheduler"))
  return Pipeline(
    root,
    unet_config,
    unet_params,
    vae_config,
    vae_params,
    text_config,
    text_params,
    _component(root, "tokenizer"),
    schedule,
  )


def load_sdxl_pipeline(path_or_id: str, with_vae: bool = True) -> SDXLPipeline:
  """Configs and params of an SDXL base folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
  tokenizer_2/, scheduler/), every component read strictly, and their widths checked against each other."""
  root = resolve_pretrained(path_or_id)
  if not os.path.isfile(os.path.join(root, "model_index.json")):
    raise ConfigError(f"{root}: no model_index.json; expected a diffusers Stable Diffusion XL pipeline folder")
  unet_config, unet_params = load_unet(_component(root, "unet"))
  if unet_config.addition_embed_type != "text_time":
    raise ConfigError(f"{root}/unet/config.json: addition_embed_type is not 'text_time'; this is no SDXL UNet")
  vae_config, vae_params = load_vae(_component(root, "vae")) if with_vae else (None, None)
  if vae_config is None and os.path.isdir(os.path.join(root, "vae")):
    # Its config without its weights: the micro-conditioning's image size is the VAE's scale times the UNet's
    # side (sdxl_conditioning.image_size), so a run's time ids must not depend on whether it loaded the weights.
    vae_config = vae_lib.VAEConfig.from_json_file(os.path.join(root, "vae"))
  text_config, text_params = clip_text.load_clip_text(_component(root, "text_encoder"), with_projection=False)
  text_config_2, text_params_2 = clip_text.load_clip_text(_component(root, "text_encoder_2"), with_projection=True)
  # The pipeline concatenates the towers' states (pipeline_stable_diffusion_xl.py, `encode_prompt`), and puts
  # tower 2's text_embeds before the embedded micro-conditioning ids (`_get_add_time_ids`).
  width = text_config.hidden_size + text_config_2.hidden_size
  if width != unet_config.cross_attention_dim:
    raise ConfigError(
      f"{root}: text encoder widths {text_config.hidden_size} + {text_config_2.hidden_size} do not make the "
      f"UNet's cross_attention_dim {unet_config.cross_attention_dim}"
    )
  ids_width = unet_config.projection_class_embeddings_input_dim - text_config_2.projection_dim
  if ids_width <= 0 or ids_width % unet_config.addition_time_embed_dim:
    raise ConfigError(
      f"{root}: text_encoder_2's projection_dim {text_config_2.projection_dim} leaves {ids_width} of the UNet's "
      f"projection_class_embeddings_input_dim {unet_config.projection_class_embeddings_input_dim}, not a "
      f"multiple of addition_time_embed_dim {unet_config.addition_time_embed_dim}"
    )
  with open(os.path.join(root, "model_index.json")) as f:
    force_zeros = json.load(f).get("force_zeros_for_empty_prompt", True)  # diffusers' default when absent
  if not isinstance(force_zeros, bool):
    raise ConfigError(f"{root}/model_index.json: key 'force_zeros_for_empty_prompt' = {force_zeros!r}; expected a bool")
  return SDXLPipeline(
    root,
    unet_config,
    unet_params,
    vae_config,
    vae_params,
    text_config,
    text_params,
    text_config_2,
    text_params_2,
    _component(root, "tokenizer"),
    _component(root, "tokenizer_2"),
    ScheduleConfig.from_json_file(_component(root, "scheduler")),
    force_zeros,
  )


def load_either(path_or_id: str, with_vae: bool = True) -> Pipeline | SDXLPipeline:
  """`load_sdxl_pipeline` for an SDXL folder (is_sdxl_folder), else `load_pipeline`: what the training run and
  the export command read."""
  root = resolve_pretrained(path_or_id)
  if not os.path.isfile(os.path.join(root, "model_index.json")):
    raise ConfigError(f"{root}: no model_index.json; expected a diffusers Stable Diffusion pipeline folder")
  loader = load_sdxl_pipeline if is_sdxl_folder(root) else load_pipeline
  return loader(root, with_vae=with_vae)


def _export(out_dir: str, config: dict, state: dict, abstract: Any, list_names: tuple[str, ...]) -> None:
  table = torch_layout.key_table(abstract, list_names)
  if set(table) != set(state) or any(state[k].shape != s for k, (_, s) in table.items()):
    bad = sorted(k for k in set(table) ^ set(state)) or [k for k, (_, s) in table.items() if state[k].shape != s]
    raise WeightsError(f"export to {out_dir}: params do not match the config at {bad[:8]}")
  with weights_io.atomic_folder(out_dir) as staging:
    weights_io.write_json(os.path.join(staging, "config.json"), config)
    weights_io.write_safetensors(os.path.join(staging, "diffusion_pytorch_model.safetensors"), state)


def export_unet(config: unet_lib.UNetConfig, params: Any, out_dir: str) -> None:
  state = torch_layout.flax_to_torch(params, list_names=unet_lib.LIST_NAMES)
  _export(out_dir, config.to_diffusers_dict(), state, unet_lib.abstract_params(config), unet_lib.LIST_NAMES)


def export_vae(config: vae_lib.VAEConfig, params: Any, out_dir: str) -> None:
  state = torch_layout.flax_to_torch(params, list_names=vae_lib.LIST_NAMES)
  _export(out_dir, config.to_diffusers_dict(), state, vae_lib.abstract_params(config), vae_lib.LIST_NAMES)


MODEL_INDEX = {
  "_class_name": "StableDiffusionPipeline",
  "feature_extractor": [None, None],
  "image_encoder": [None, None],
  "requires_safety_checker": False,
  "safety_checker": [None, None],
  "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"],
}


def write_pipeline(
  out_dir: str,
  *,
  unet: tuple[unet_lib.UNetConfig, Any],
  vae: tuple[vae_lib.VAEConfig, Any],
  text_encoder: tuple[CLIPTextConfig, Any],
  tokenizer_dir: str,
  schedule: ScheduleConfig,
) -> str:
  """A complete diffusers folder that `StableDiffusionPipeline.from_pretrained` loads."""
  with weights_io.atomic_folder(out_dir) as staging:
    export_unet(*unet, os.path.join(staging, "unet"))
    export_vae(*vae, os.path.join(staging, "vae"))
    clip_text.export_clip_text(*text_encoder, os.path.join(staging, "text_encoder"))
    shutil.copytree(tokenizer_dir, os.path.join(staging, "tokenizer"))
    scheduler = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **schedule.__dict__}
    os.makedirs(os.path.join(staging, "scheduler"))
    weights_io.write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), scheduler)
    with open(os.path.join(staging, "model_index.json"), "w") as f:
      json.dump(MODEL_INDEX, f, indent=2)
  return out_dir


SDXL_MODEL_INDEX = {
  "_class_name": "StableDiffusionXLPipeline",
  "feature_extractor": [None, None],
  "image_encoder": [None, None],
  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"],
}
# SDXL base's scheduler/scheduler_config.json beyond the fields our samplers read: Euler, as SDXL ships it, with
# 'leading' spacing, which our DDIM tables assume too (diffusers' DDIMScheduler.from_config keeps it).
_SDXL_SCHEDULER = {
  "_class_name": "EulerDiscreteScheduler",
  "timestep_spacing": "leading",
  "interpolation_type": "linear",
  "use_karras_sigmas": False,
}


def write_sdxl_pipeline(
  out_dir: str,
  *,
  unet: tuple[unet_lib.UNetConfig, Any],
  vae: tuple[vae_lib.VAEConfig, Any],
  text_encoder: tuple[CLIPTextConfig, Any],
  text_encoder_2: tuple[CLIPTextConfig, Any],
  tokenizer_dir: str,
  tokenizer_2_dir: str,
  schedule: ScheduleConfig,
  force_zeros_for_empty_prompt: bool = True,
) -> str:
  """A complete diffusers folder that `StableDiffusionXLPipeline.from_pretrained` and `load_sdxl_pipeline` load.
  `text_encoder_2`'s params must hold the projection (a CLIPTextModelWithProjection)."""
  if not clip_text.has_projection(text_encoder_2[1]):
    raise WeightsError(f"export to {out_dir}: text_encoder_2's params have no text_projection (SDXL pools through it)")
  with weights_io.atomic_folder(out_dir) as staging:
    export_unet(*unet, os.path.join(staging, "unet"))
    export_vae(*vae, os.path.join(staging, "vae"))
    clip_text.export_clip_text(*text_encoder, os.path.join(staging, "text_encoder"))
    clip_text.export_clip_text(*text_encoder_2, os.path.join(staging, "text_encoder_2"))
    shutil.copytree(tokenizer_dir, os.path.join(staging, "tokenizer"))
    shutil.copytree(tokenizer_2_dir, os.path.join(staging, "tokenizer_2"))
    os.makedirs(os.path.join(staging, "scheduler"))
    weights_io.write_json(
      os.path.join(staging, "scheduler", "scheduler_config.json"), {**_SDXL_SCHEDULER, **schedule.__dict__}
    )
    index = {**SDXL_MODEL_INDEX, "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt}
    weights_io.write_json(os.path.join(staging, "model_index.json"), index)
  return out_dir

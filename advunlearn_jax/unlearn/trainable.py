"""Which parameters a `train_method` trains (spec section 2.5), as masks over Flax parameter trees.

Text-encoder methods select CLIP leaves (embeddings never); UNet methods (the ESD baselines) select UNet
leaves by the reference's CompVis name rules, translated to diffusers names:
  CompVis `out.` -> `conv_norm_out` / `conv_out`; `time_embed` -> `time_embedding`;
  `input_blocks.4.` / `.7.` -> `down_blocks.1.attentions.0` / `down_blocks.2.attentions.0`;
  `output_blocks.6.` / `.8.` -> `up_blocks.2.attentions.0` / `up_blocks.2.attentions.2`.

Gradients are taken with respect to the selected leaves only (`split` / `merge`), and Adam state exists only
for them.

SDXL has two text towers, named as diffusers names their folders: `text_encoder` (CLIP-L) and `text_encoder_2`
(OpenCLIP bigG with its projection). The SD methods train tower 1 (`text_encoder_full`, and the layer-wise ones,
whose layer numbers are CLIP-L's 12 as in the reference); `text_encoder_2_full` trains tower 2 and
`text_encoders_full` both, each tower as `text_encoder_full` selects it, tower 2's `text_projection` with its
final layer norm (both shape only the pooled embedding). SDXL conditions on each tower's penultimate hidden
state, so tower 1's last layer and final norm get no gradient and stay as they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from flax import traverse_util

from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import torch_layout
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import unet as unet_lib

# The reference's layer-wise options and the layers each one means.
TEXT_LAYER_METHODS = {
  **{f"text_encoder_layer{''.join(str(i) for i in range(n))}": list(range(n)) for n in range(1, 12)},
  "text_encoder_layer01234567891011": list(range(12)),
  "text_encoder_layer0_11": [0, 11],
  "text_encoder_layer01_1011": [0, 1, 10, 11],
  "text_encoder_layer012_91011": [0, 1, 2, 9, 10, 11],
}
# SDXL only: which towers each trains (the SD methods above train "text_encoder", SDXL's tower 1).
SDXL_TEXT_METHODS = {
  "text_encoder_2_full": ("text_encoder_2",),
  "text_encoders_full": ("text_encoder", "text_encoder_2"),
}
SDXL_TOWERS = ("text_encoder", "text_encoder_2")
TEXT_METHODS = ("text_encoder_full", *TEXT_LAYER_METHODS, *SDXL_TEXT_METHODS)
UNET_METHODS = ("noxattn", "selfattn", "xattn", "full", "notime", "xlayer", "selflayer", "noxattn_linear")
# Norm layers of the diffusers UNet (GroupNorm, LayerNorm): what `noxattn_linear` leaves out.
_NORM = re.compile(r"(^|\.)(norm\d*|conv_norm_out)\.(weight|bias)$")
COMPONENTS = ("all", "ffn", "attn")

_CLIP_LISTS = clip_convert.LIST_NAMES
_UNET_LISTS = unet_lib.LIST_NAMES


def is_text_method(method: str) -> bool:
  return method in TEXT_METHODS


@dataclasses.dataclass(frozen=True)
class Trained:
  """Which tower a run trains (`tower`: "text_encoder" or "unet") and which of its leaves: the one value the
  wiring, the step, the exports and the previews ask (hashable: part of the jit cache key)."""

  method: str  # config.train's fields (their defaults config_lib's)
  component: str
  norm_layer: bool
  prefix_bug: bool

  @classmethod
  def from_config(cls, train) -> Trained:
    """`config.train`'s method and its options, validated."""
    validate_method(train.method, train.component)
    return cls(train.method, train.component, train.norm_layer, train.prefix_bug)

  @property
  def tower(self) -> str:
    return "text_encoder" if is_text_method(self.method) else "unet"

  def of(self, text: Any, unet: Any) -> Any:
    """The trained tower's member of a (text encoder, UNet) pair."""
    return text if self.tower == "text_encoder" else unet

  def replace(self, tower: Any, text: Any, unet: Any) -> tuple[Any, Any]:
    """(text encoder, UNet) with the trained tower's member replaced by `tower`."""
    return (tower, unet) if self.tower == "text_encoder" else (text, tower)

  def mask(self, tower_params: Any) -> dict[tuple[str, ...], bool]:
    """The selected leaves of the trained tower's parameters (SDXL's text: {"text_encoder": ..., "text_encoder_2":
    ...}, paths led by the tower's name)."""
    if self.tower == "text_encoder":
      options = (self.component, self.norm_layer, self.prefix_bug)
      if is_sdxl_text(tower_params):
        return sdxl_text_mask(tower_params, self.method, *options)
      if self.method in SDXL_TEXT_METHODS:
        raise ConfigError(
          f"config.train.method is {self.method!r}, an SDXL method (a second text tower); this pipeline has one "
          "text encoder: use text_encoder_full or a text_encoder_layer<L> method"
        )
      return text_encoder_mask(tower_params, self.method, *options)
    return unet_mask(tower_params, self.method)

  def towers(self) -> tuple[str, ...]:
    """SDXL: the text towers this method trains (none for UNet methods)."""
    if self.tower != "text_encoder":
      return ()
    return SDXL_TEXT_METHODS.get(self.method, ("text_encoder",))


def validate_method(method: str, component: str) -> None:
  if method not in TEXT_METHODS and method not in UNET_METHODS:
    layers = sorted((m.removeprefix("text_encoder_layer") for m in TEXT_LAYER_METHODS), key=len)
    raise ConfigError(
      f"config.train.method is {method!r}; valid: text_encoder_full, text_encoder_layer<L> with L one of "
      f"{{{', '.join(layers)}}}, for SDXL {' or '.join(SDXL_TEXT_METHODS)}, or a UNet method: "
      f"{', '.join(UNET_METHODS)}"
    )
  if component not in COMPONENTS:
    raise ConfigError(f"config.train.component is {component!r}; valid: {list(COMPONENTS)}")


def _component_ok(name: str, component: str) -> bool:
  if component == "ffn":
    return "mlp" in name
  if component == "attn":
    return "self_attn" in name
  return True


def text_encoder_selects(name: str, method: str, component: str, norm_layer: bool, prefix_bug: bool) -> bool:
  """`name` is the transformers key without the `text_model.` prefix, e.g. 'encoder.layers.3.mlp.fc1.weight'."""
  if name.startswith("final_layer_norm."):
    return norm_layer or (method == "text_encoder_full" and component == "all")
  if not name.startswith("encoder.layers."):
    return False  # token and position embeddings are never trained
  if not _component_ok(name, component):
    return False
  if method == "text_encoder_full":
    return True
  layers = TEXT_LAYER_METHODS[method]
  if prefix_bug:  # reference quirk: spec 2.5 - 'encoder.layers.1' also matches layers 10 and 11
    return any(name.startswith(f"encoder.layers.{k}") for k in layers)
  return int(name.split(".")[2]) in layers


def unet_selects(name: str, method: str) -> bool:
  """`name` is the diffusers key, e.g. 'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight'."""
  is_out = name.startswith(("conv_norm_out.", "conv_out."))
  is_time = name.startswith("time_embedding.")
  if method == "full":
    return True
  if method == "noxattn":
    return not (is_out or "attn2" in name or is_time)
  if method == "noxattn_linear":
    # STEREO's and ESD-diffusers' `noxattn` (robust-concept-erasing utils/utils.py FineTunedModel): every Linear
    # and Conv2d of the UNet outside cross-attention, time embedding and conv_out included, no norm layer.
    return "attn2" not in name and not _NORM.search(name)
  if method == "notime":
    return not (is_out or is_time)
  if method == "selfattn":
    return "attn1" in name
  if method == "xattn":
    return "attn2" in name
  if method == "xlayer":
    return "attn2" in name and name.startswith(("up_blocks.2.attentions.0.", "up_blocks.2.attentions.2."))
  if method == "selflayer":
    return "attn1" in name and name.startswith(("down_blocks.1.attentions.0.", "down_blocks.2.attentions.0."))
  raise ConfigError(f"unknown UNet train method {method!r}; valid: {list(UNET_METHODS)}")


def mask(params: Any, select, list_names) -> dict[tuple[str, ...], bool]:
  """Flat {path: selected} over a parameter tree (concrete or abstract)."""
  flat = traverse_util.flatten_dict(params)
  return {path: bool(select(torch_layout.torch_key(path, list_names))) for path in flat}


def text_encoder_mask(params, method, component="all", norm_layer=False, prefix_bug=False):
  validate_method(method, component)
  if not is_text_method(method):
    return mask(params, lambda name: False, _CLIP_LISTS)
  return mask(params, lambda n: text_encoder_selects(n, method, component, norm_layer, prefix_bug), _CLIP_LISTS)


def is_sdxl_text(params: Any) -> bool:
  """Whether a text tower's params are SDXL's pair ({"text_encoder": ..., "text_encoder_2": ...})."""
  return isinstance(params, dict) and set(params) == set(SDXL_TOWERS)


def sdxl_text_mask(params, method, component="all", norm_layer=False, prefix_bug=False):
  """Both towers' leaves, paths led by the tower's name; an unchosen tower selects nothing."""
  validate_method(method, component)
  towers = SDXL_TEXT_METHODS.get(method, ("text_encoder",)) if is_text_method(method) else ()
  tower_method = "text_encoder_full" if method in SDXL_TEXT_METHODS else method
  head = norm_layer or (tower_method == "text_encoder_full" and component == "all")

  def select_2(name):  # CLIPTextModelWithProjection: transformers' keys keep their `text_model.` prefix
    if name.startswith("text_projection."):
      return head
    return text_encoder_selects(name.removeprefix("text_model."), tower_method, component, norm_layer, prefix_bug)

  selects = {
    "text_encoder": lambda n: text_encoder_selects(n, tower_method, component, norm_layer, prefix_bug),
    "text_encoder_2": select_2,
  }
  out = {}
  for tower in SDXL_TOWERS:
    chosen = selects[tower] if tower in towers else (lambda name: False)
    out.update({(tower, *path): on for path, on in mask(params[tower], chosen, _CLIP_LISTS).items()})
  return out


def unet_mask(params, method):
  if is_text_method(method):
    return mask(params, lambda name: False, _UNET_LISTS)
  return mask(params, lambda n: unet_selects(n, method), _UNET_LISTS)


def selected_paths(selected: dict[tuple[str, ...], bool]) -> frozenset[tuple[str, ...]]:
  """A hashable form of a mask (jit static arguments must hash)."""
  return frozenset(p for p, on in selected.items() if on)


def split(params: Any, selected: dict[tuple[str, ...], bool] | frozenset) -> tuple[dict, dict]:
  """(trainable, frozen), each a flat {'a/b/kernel': leaf} dict (string keys, so Orbax can save them)."""
  chosen = selected_paths(selected) if isinstance(selected, dict) else selected
  flat = traverse_util.flatten_dict(params)
  trainable = {"/".join(p): v for p, v in flat.items() if p in chosen}
  frozen = {"/".join(p): v for p, v in flat.items() if p not in chosen}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in {**frozen, **trainable}.items()})


def count(params: Any, selected: dict[tuple[str, ...], bool]) -> int:
  flat = traverse_util.flatten_dict(params)
  return sum(math.prod(v.shape) for p, v in flat.items() if selected[p])

"""train_method masks (spec 2.5) at full size, via jax.eval_shape."""

import pytest

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import clip_text, presets
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.unlearn import trainable

CLIP_L = clip_text.abstract_params(clip_text.CLIPTextConfig())
LAYER = 7_087_872  # one CLIP-L encoder layer


def _layers(selected):
  return sorted({int(p[1].split("_")[1]) for p, on in selected.items() if on and p[0] == "encoder"})


def test_text_encoder_full_counts():
  selected = trainable.text_encoder_mask(CLIP_L, "text_encoder_full")
  assert trainable.count(CLIP_L, selected) == 85_056_000  # 12 layers + final LayerNorm
  assert not any(on for p, on in selected.items() if p[0] == "embeddings")
  assert trainable.count(CLIP_L, trainable.text_encoder_mask(CLIP_L, "text_encoder_full", "ffn")) == 12 * 4_722_432
  attn = trainable.text_encoder_mask(CLIP_L, "text_encoder_full", "attn", norm_layer=True)
  assert trainable.count(CLIP_L, attn) == 12 * 2_362_368 + 1_536


def test_layer_methods_exact_and_reference_prefix_bug():
  exact = trainable.text_encoder_mask(CLIP_L, "text_encoder_layer01")
  assert _layers(exact) == [0, 1] and trainable.count(CLIP_L, exact) == 2 * LAYER
  buggy = trainable.text_encoder_mask(CLIP_L, "text_encoder_layer01", prefix_bug=True)
  assert _layers(buggy) == [0, 1, 10, 11]
  assert _layers(trainable.text_encoder_mask(CLIP_L, "text_encoder_layer0", prefix_bug=True)) == [0]
  assert _layers(trainable.text_encoder_mask(CLIP_L, "text_encoder_layer0_11")) == [0, 11]
  assert _layers(trainable.text_encoder_mask(CLIP_L, "text_encoder_layer012_91011", prefix_bug=True)) == [
    0,
    1,
    2,
    9,
    10,
    11,
  ]
  assert _layers(trainable.text_encoder_mask(CLIP_L, "text_encoder_layer0123456789", prefix_bug=True)) == list(
    range(12)
  )
  # Every layer-wise option of the reference's --train_method choices exists, 0..10 among them.
  assert _layers(trainable.text_encoder_mask(CLIP_L, "text_encoder_layer012345678910")) == list(range(11))
  assert len(trainable.TEXT_LAYER_METHODS) == 15
  final = [on for p, on in exact.items() if p[0] == "final_layer_norm"]
  assert not any(final)
  with_norm = trainable.text_encoder_mask(CLIP_L, "text_encoder_layer0", norm_layer=True)
  assert all(on for p, on in with_norm.items() if p[0] == "final_layer_norm")


def test_unet_methods():
  unet = unet_lib.abstract_params(unet_lib.UNetConfig.from_dict(presets.SD14_UNET))
  names = lambda method: {"/".join(p) for p, on in trainable.unet_mask(unet, method).items() if on}
  xattn = names("xattn")
  assert xattn and all("attn2" in n for n in xattn)
  noxattn = names("noxattn")
  assert not any("attn2" in n or n.startswith(("time_embedding", "conv_out", "conv_norm_out")) for n in noxattn)
  assert any("time_emb_proj" in n for n in noxattn)  # resnet time projections are trained by ESD-u
  assert names("full") >= names("notime") > noxattn
  assert {n.split("/attentions_")[0] + "/" + n.split("/")[1] for n in names("xlayer")} == {
    "up_blocks_2/attentions_0",
    "up_blocks_2/attentions_2",
  }
  assert all(
    "attn1" in n and n.startswith(("down_blocks_1/attentions_0", "down_blocks_2/attentions_0"))
    for n in names("selflayer")
  )
  assert not any(trainable.text_encoder_mask(CLIP_L, "xattn").values())


def test_unknown_method_lists_valid_ones():
  message = (
    r"config.train.method is 'text_encoder_half'; valid: text_encoder_full, text_encoder_layer<L> with L one of \{0, "
  )
  with pytest.raises(ConfigError, match=message):
    trainable.text_encoder_mask(CLIP_L, "text_encoder_half")
  with pytest.raises(ConfigError, match="config.train.component"):
    trainable.text_encoder_mask(CLIP_L, "text_encoder_full", component="mlp")

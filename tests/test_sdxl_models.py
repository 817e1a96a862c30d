"""SDXL's models in our Flax code vs diffusers and transformers, on a micro SDXL layout; strict converters.

One random diffusers UNet and one compiled UNet call serve the UNet tests (module fixtures), so the file stays
fast on 2 cores.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.convert import torch_layout
from advunlearn_jax.errors import ConfigError, WeightsError
from advunlearn_jax.models import presets
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models import vae as vae_lib
from advunlearn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from advunlearn_jax.testing import tiny_models
from tests.torch_oracles import state_numpy, torch, torch_clip, torch_unet, transformers

pytestmark = pytest.mark.torch
UNET_TOL = 1e-4  # fp32, matmul precision "highest": tests/test_unet_vae.py's
TEXT_TOL = 1e-5  # fp32, matmul precision "highest": tests/test_clip_text.py's
TEXT_EMBEDS, N_IDS = tiny_models.MICRO_SDXL_TEXT_2.projection_dim, tiny_models.MICRO_SDXL_IDS
SDXL_TEXT_1, SDXL_TEXT_2 = tiny_models.MICRO_SDXL_TEXT, tiny_models.MICRO_SDXL_TEXT_2
# testing/tiny_models.py's micro SDXL UNet, on 64-wide random contexts unless a test pairs it with the towers.
MICRO_SDXL_UNET = {**tiny_models.MICRO_SDXL_UNET, "cross_attention_dim": 64}


@pytest.fixture(scope="module")
def sdxl_unet():
  """(torch model, our config, our params, our jitted apply)."""
  model = torch_unet(**MICRO_SDXL_UNET)
  config = unet_lib.UNetConfig.from_dict(dict(model.config), source="test")
  params = torch_layout.torch_to_flax(
    state_numpy(model), unet_lib.abstract_params(config), list_names=unet_lib.LIST_NAMES, source="test"
  )
  return model, config, params, jax.jit(unet_lib.UNet2DConditionModel(config).apply)


def _inputs(batch, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, 4, 16, 16)).astype(np.float32)
  ctx = rng.normal(size=(batch, 77, 64)).astype(np.float32)
  text_embeds = rng.normal(size=(batch, TEXT_EMBEDS)).astype(np.float32)
  # What the SDXL pipeline passes: original size, crop top-left, target size.
  time_ids = np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (batch, 1))
  time_ids[-1] = [512, 768, 32, 64, 1024, 1024]
  return x, ctx, text_embeds, time_ids


def test_unet_matches_diffusers(sdxl_unet):
  model, config, params, apply = sdxl_unet
  assert config.transformer_depths == (1, 2) and config.use_linear_projection
  assert config.num_attention_heads == (2, 4)
  assert params["mid_block"]["attentions_0"]["transformer_blocks_1"]  # the mid block takes the last depth
  assert "attentions_0" not in params["down_blocks_0"] and "attentions_0" not in params["up_blocks_1"]
  for batch, timesteps, seed in [(1, [999], 0), (2, [0, 500], 1)]:
    x, ctx, text_embeds, time_ids = _inputs(batch, seed)
    with torch.no_grad():
      ref = model(
        torch.from_numpy(x),
        torch.tensor(timesteps),
        torch.from_numpy(ctx),
        added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)},
      ).sample.numpy()
    added = unet_lib.AddedCond(jnp.asarray(text_embeds), jnp.asarray(time_ids))
    out = apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), ctx, added)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=UNET_TOL, rtol=0)
    # The added conditioning acts: other ids give another output.
    other = unet_lib.AddedCond(added.text_embeds, added.time_ids * 0.5)
    moved = apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), ctx, other)
    assert float(jnp.abs(moved - out).max()) > 100 * UNET_TOL


def test_added_cond_is_checked(sdxl_unet):
  _, config, params, _ = sdxl_unet
  x, ctx, text_embeds, time_ids = _inputs(1, 0)
  unet = unet_lib.UNet2DConditionModel(config)
  sample, t = jnp.zeros((1, 16, 16, 4)), jnp.array([1])
  with pytest.raises(ValueError, match="pass added_cond"):
    unet.apply({"params": params}, sample, t, ctx)
  with pytest.raises(ValueError, match="make rows 72 wide; the config's projection_class_embeddings_input_dim is 80"):
    unet.apply({"params": params}, sample, t, ctx, unet_lib.AddedCond(text_embeds, time_ids[:, :5]))


def test_unet_export_round_trip_loads_in_diffusers(sdxl_unet, tmp_path):
  model, config, params, _ = sdxl_unet
  out = str(tmp_path / "unet")
  sd_convert.export_unet(config, params, out)
  with open(os.path.join(out, "config.json")) as f:
    raw = json.load(f)
  assert raw["transformer_layers_per_block"] == [1, 2] and raw["addition_embed_type"] == "text_time"
  config2, params2 = sd_convert.load_unet(out)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  diffusers = pytest.importorskip("diffusers")
  loaded = diffusers.UNet2DConditionModel.from_pretrained(out)
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block"):
    as_json = lambda v: json.loads(json.dumps(v))  # the model built here holds tuples, the loaded one lists
    assert as_json(loaded.config[key]) == as_json(model.config[key]), key


def test_unet_converter_is_strict(sdxl_unet):
  model, config, _, _ = sdxl_unet
  abstract = unet_lib.abstract_params(config)
  state = state_numpy(model)
  del state["add_embedding.linear_1.weight"]
  state["add_embedding.linear_3.weight"] = state["add_embedding.linear_2.weight"]
  with pytest.raises(WeightsError) as err:
    torch_layout.torch_to_flax(state, abstract, list_names=unet_lib.LIST_NAMES, source="unet.safetensors")
  assert r"missing 1 key(s): add_embedding.linear_1.weight" in str(err.value)
  assert r"unexpected 1 key(s): add_embedding.linear_3.weight" in str(err.value)
  # An SD 1.x/2.x state dict with add_embedding keys is refused under an SD config, naming them.
  sd_config = unet_lib.UNetConfig.from_dict({**dict(model.config), "addition_embed_type": None})
  with pytest.raises(WeightsError, match=r"unexpected 4 key\(s\): add_embedding\.linear_1\.bias"):
    torch_layout.torch_to_flax(
      state_numpy(model), unet_lib.abstract_params(sd_config), list_names=unet_lib.LIST_NAMES, source="x"
    )
  # A missing second-layer transformer block of the mid block (the per-block depth) is named.
  state = state_numpy(model)
  del state["mid_block.attentions.0.transformer_blocks.1.ff.net.2.bias"]
  with pytest.raises(WeightsError, match=r"missing 1 key\(s\): mid_block\.attentions\.0\.transformer_blocks\.1\."):
    torch_layout.torch_to_flax(state, abstract, list_names=unet_lib.LIST_NAMES, source="x")


def test_full_size_sdxl_unet_key_coverage():
  meta = torch_unet(device="meta", **{k: v for k, v in presets.SDXL_UNET.items() if not k.startswith("_")})
  shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
  config = unet_lib.UNetConfig.from_dict(presets.SDXL_UNET)
  table = torch_layout.key_table(unet_lib.abstract_params(config), unet_lib.LIST_NAMES)
  assert set(table) == set(shapes), set(table) ^ set(shapes)
  for key, (_, shape) in table.items():
    assert shape == shapes[key], key
  assert sum(int(np.prod(s)) for s in shapes.values()) == 2_567_463_684  # SDXL 1.0 base's UNet


def test_sdxl_unet_config_errors_name_the_key():
  raw = dict(presets.SDXL_UNET)
  with pytest.raises(ConfigError, match=r"u\.json: key 'addition_embed_type' = 'text_image' is not supported"):
    unet_lib.UNetConfig.from_dict({**raw, "addition_embed_type": "text_image"}, source="u.json")
  with pytest.raises(ConfigError, match="key 'transformer_layers_per_block' = \\[1, 2\\] must hold one"):
    unet_lib.UNetConfig.from_dict({**raw, "transformer_layers_per_block": [1, 2]})
  with pytest.raises(ConfigError, match="key 'addition_time_embed_dim' = None must be a positive even int"):
    unet_lib.UNetConfig.from_dict({**raw, "addition_time_embed_dim": None})
  with pytest.raises(ConfigError, match="key 'reverse_transformer_layers_per_block'"):
    unet_lib.UNetConfig.from_dict({**raw, "reverse_transformer_layers_per_block": [[1], [2], [10]]})
  # SD 1.x configs export as before: none of SDXL's keys.
  sd14 = unet_lib.UNetConfig.from_dict(presets.SD14_UNET).to_diffusers_dict()
  assert "addition_embed_type" not in sd14 and sd14["transformer_layers_per_block"] == 1


def _ids(pad_id, batch=3, seed=0):
  """SOT, random tokens, EOT, then padding: EOT for tokenizer/ (CLIP-L's), "!" (id 0) for tokenizer_2/."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, 77), pad_id, np.int32)
  ids[:, 0] = 49406
  for b in range(batch):
    n = int(rng.integers(1, 20))
    ids[b, 1 : 1 + n] = rng.integers(1, 49406, n)
    ids[b, 1 + n] = 49407
  return ids


@pytest.mark.parametrize(
  "config, with_projection, pad_id",
  [
    (SDXL_TEXT_1, False, 49407),
    (SDXL_TEXT_2, True, 0),
    (CLIPTextConfig(**{**SDXL_TEXT_2.__dict__, "eos_token_id": 49407}), True, 0),  # the modern pooling rule
  ],
  ids=["tower1", "tower2", "tower2-modern-eos"],
)
def test_towers_match_transformers(config, with_projection, pad_id):
  """Penultimate states (what SDXL's pipeline reads from both towers), last states, pooled and text_embeds."""
  model = torch_clip(config, seed=1, with_projection=with_projection)
  params = clip_convert.params_from_state_dict(state_numpy(model), config, "test", with_projection=with_projection)
  ids = _ids(pad_id)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
  flax_model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
  out = flax_model.apply({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(out.penultimate_hidden_state, ref.hidden_states[-2].numpy(), atol=TEXT_TOL, rtol=0)
  np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=TEXT_TOL, rtol=0)
  assert not np.allclose(out.penultimate_hidden_state, out.last_hidden_state, atol=1e-2)
  if with_projection:
    np.testing.assert_allclose(out.text_embeds, ref.text_embeds.numpy(), atol=TEXT_TOL, rtol=0)
    assert out.text_embeds.shape == (3, TEXT_EMBEDS)
    # The attack's path: word embeddings in, ids only choosing the pooled row; the same outputs.
    embeds = flax_model.apply({"params": params}, jnp.asarray(ids), method=flax_model.word_embeddings)
    via_embeds = flax_model.apply({"params": params}, jnp.asarray(ids), inputs_embeds=embeds)
    np.testing.assert_allclose(via_embeds.text_embeds, out.text_embeds, atol=TEXT_TOL, rtol=0)
  else:
    np.testing.assert_allclose(out.pooled_output, ref.pooler_output.numpy(), atol=TEXT_TOL, rtol=0)
    assert out.text_embeds is None


def test_tower2_export_round_trip_and_strictness(tmp_path):
  model = torch_clip(SDXL_TEXT_2, seed=2, with_projection=True)
  model.save_pretrained(tmp_path / "text_encoder_2")
  config, params = clip_convert.load_clip_text(str(tmp_path / "text_encoder_2"))  # architectures decide
  assert config == SDXL_TEXT_2 and clip_convert.has_projection(params)

  out = clip_convert.export_clip_text(config, params, str(tmp_path / "export"))
  loaded, info = transformers.CLIPTextModelWithProjection.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  _, params2 = clip_convert.load_clip_text(out)
  jax.tree.map(np.testing.assert_array_equal, params2, params)

  state = state_numpy(model)
  del state["text_projection.weight"]
  with pytest.raises(WeightsError, match=r"missing 1 key\(s\): text_projection\.weight"):
    clip_convert.params_from_state_dict(state, config, "x", with_projection=True)
  # A plain CLIPTextModel folder read as tower 2 names the projection it lacks.
  torch_clip(SDXL_TEXT_2).save_pretrained(tmp_path / "plain")
  with pytest.raises(WeightsError, match=r"missing 1 key\(s\): text_projection\.weight"):
    clip_convert.load_clip_text(str(tmp_path / "plain"), with_projection=True)
  # And tower 2's weights read as a plain tower name the projection as unexpected.
  with pytest.raises(WeightsError, match=r"unexpected 1 key\(s\): text_projection\.weight"):
    clip_convert.load_clip_text(str(tmp_path / "text_encoder_2"), with_projection=False)


def test_full_size_sdxl_tower2_key_coverage():
  config = CLIPTextConfig(**presets.SDXL_TEXT_2)
  hf = transformers.CLIPTextConfig(**config.to_transformers_dict(clip_convert.WITH_PROJECTION))
  with torch.device("meta"):
    meta = transformers.CLIPTextModelWithProjection(hf)
  shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items() if not k.endswith("position_ids")}
  table = torch_layout.key_table(clip_convert.abstract_params(config, with_projection=True), clip_convert.LIST_NAMES)
  assert set(table) == set(shapes), set(table) ^ set(shapes)
  for key, (_, shape) in table.items():
    assert shape == shapes[key], key
  assert sum(int(np.prod(s)) for s in shapes.values()) == 694_659_840  # SDXL's OpenCLIP bigG text tower


def test_sdxl_folder_loads_and_conditions_as_diffusers(tmp_path):
  """A tiny random StableDiffusionXLPipeline saved by diffusers loads strictly; our towers, composed as SDXL's
  pipeline composes them, give its prompt embeddings and pooled embeddings."""
  diffusers = pytest.importorskip("diffusers")
  from advunlearn_jax.data import tokenizer as tok_lib
  from tests.torch_oracles import torch_vae

  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_lib.offline_tokenizer_folder())
  unet = torch_unet(**{**MICRO_SDXL_UNET, "cross_attention_dim": SDXL_TEXT_1.hidden_size + SDXL_TEXT_2.hidden_size})
  pipe = diffusers.StableDiffusionXLPipeline(
    vae=torch_vae(),
    text_encoder=torch_clip(SDXL_TEXT_1, seed=3),
    text_encoder_2=torch_clip(SDXL_TEXT_2, seed=4, with_projection=True),
    tokenizer=tokenizer,
    tokenizer_2=tokenizer,
    unet=unet,
    scheduler=diffusers.EulerDiscreteScheduler(),
  )
  pipe.save_pretrained(tmp_path / "sdxl")
  loaded = sd_convert.load_sdxl_pipeline(str(tmp_path / "sdxl"))
  assert loaded.text_config == SDXL_TEXT_1 and loaded.text_config_2 == SDXL_TEXT_2
  assert loaded.unet_config.transformer_depths == (1, 2) and loaded.schedule.beta_schedule == "linear"
  for ours, list_names, module in [
    (loaded.unet_params, unet_lib.LIST_NAMES, pipe.unet),
    (loaded.vae_params, vae_lib.LIST_NAMES, pipe.vae),
    (loaded.text_params, clip_convert.LIST_NAMES, pipe.text_encoder),
    (loaded.text_params_2, clip_convert.LIST_NAMES, pipe.text_encoder_2),
  ]:
    theirs = {k: v for k, v in state_numpy(module).items() if not k.endswith("position_ids")}
    mine = torch_layout.flax_to_torch(ours, list_names=list_names)
    if module is pipe.text_encoder:  # transformers 5 saves CLIPTextModel without `text_model.`
      theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
      np.testing.assert_array_equal(mine[key], value, err_msg=key)

  prompts = ["a photo of a cat", "an oil painting of a lighthouse at night"]
  with torch.no_grad():
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
  tok = lambda t: jnp.asarray(t(prompts, padding="max_length", max_length=77, truncation=True).input_ids)
  out_1 = CLIPTextModel(loaded.text_config).apply({"params": loaded.text_params}, tok(pipe.tokenizer))
  out_2 = CLIPTextModelWithProjection(loaded.text_config_2).apply(
    {"params": loaded.text_params_2}, tok(pipe.tokenizer_2)
  )
  embeds = jnp.concatenate([out_1.penultimate_hidden_state, out_2.penultimate_hidden_state], axis=-1)
  np.testing.assert_allclose(embeds, ref_embeds.numpy(), atol=TEXT_TOL, rtol=0)
  np.testing.assert_allclose(out_2.text_embeds, ref_pooled.numpy(), atol=TEXT_TOL, rtol=0)

  # The SD 1.x/2.x loader refuses the folder by name; a folder without tokenizer_2 is named.
  with pytest.raises(ConfigError, match="an SDXL folder"):
    sd_convert.load_pipeline(str(tmp_path / "sdxl"))
  shutil.rmtree(tmp_path / "sdxl" / "tokenizer_2")
  with pytest.raises(ConfigError, match="no tokenizer_2/ folder"):
    sd_convert.load_sdxl_pipeline(str(tmp_path / "sdxl"), with_vae=False)

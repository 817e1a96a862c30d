"""Flax CLIP text tower vs transformers' PyTorch CLIPTextModel, and its weight import/export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.convert import clip_text as convert
from advunlearn_jax.convert import torch_layout
from advunlearn_jax.errors import ConfigError, WeightsError
from advunlearn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, abstract_params
from tests.torch_oracles import (
  SD1_CLIP_L,
  SD1_TINY,
  SD2_OPENCLIP_H,
  SD2_TINY,
  state_numpy,
  torch,
  torch_clip,
  transformers,
)

pytestmark = pytest.mark.torch
TOL = 1e-5  # fp32, matmul precision "highest"


def _ids(batch=3, seed=0):
  """SOT, random tokens of varying length, EOT, EOT padding: what the tokenizer produces."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, 77), 49407, np.int32)
  ids[:, 0] = 49406
  for b in range(batch):
    n = int(rng.integers(1, 20))
    ids[b, 1 : 1 + n] = rng.integers(0, 49406, n)
  return ids


def _torch_outputs(model, ids, inputs_embeds=None):
  """transformers' forward; `inputs_embeds` replaces the word embeddings as the reference's CustomTextEncoder."""
  hook = None
  if inputs_embeds is not None:
    replacement = torch.from_numpy(np.asarray(inputs_embeds))
    hook = model.embeddings.token_embedding.register_forward_hook(lambda m, i, o: replacement)
  try:
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(ids).long())
  finally:
    if hook:
      hook.remove()
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.fixture(params=["sd1", "sd2"])
def tower(request):
  config = SD1_TINY if request.param == "sd1" else SD2_TINY
  model = torch_clip(config, seed=1)
  params = convert.params_from_state_dict(state_numpy(model), config, source="test")
  return config, model, params


def test_ids_path_matches_pytorch(tower):
  config, model, params = tower
  ids = _ids()
  out = CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids))
  ref_hidden, ref_pooled = _torch_outputs(model, ids)
  np.testing.assert_allclose(out.last_hidden_state, ref_hidden, atol=TOL, rtol=0)
  np.testing.assert_allclose(out.pooled_output, ref_pooled, atol=TOL, rtol=0)


def test_embeddings_path_matches_pytorch_and_ids_path(tower):
  config, model, params = tower
  ids = _ids(seed=3)
  flax_model = CLIPTextModel(config)
  table = params["embeddings"]["token_embedding"]["embedding"]
  one_hot_embeds = jax.nn.one_hot(ids, config.vocab_size) @ table
  via_ids = flax_model.apply({"params": params}, jnp.asarray(ids))
  via_embeds = flax_model.apply({"params": params}, jnp.asarray(ids), inputs_embeds=one_hot_embeds)
  np.testing.assert_allclose(via_embeds.last_hidden_state, via_ids.last_hidden_state, atol=TOL, rtol=0)
  np.testing.assert_allclose(via_embeds.pooled_output, via_ids.pooled_output, atol=TOL, rtol=0)

  # Arbitrary (adversarial) embeddings, not rows of the table.
  embeds = np.random.default_rng(0).normal(size=(3, 77, config.hidden_size)).astype(np.float32) * 0.02
  out = flax_model.apply({"params": params}, jnp.asarray(ids), inputs_embeds=jnp.asarray(embeds))
  ref_hidden, ref_pooled = _torch_outputs(model, ids, inputs_embeds=embeds)
  np.testing.assert_allclose(out.last_hidden_state, ref_hidden, atol=TOL, rtol=0)
  np.testing.assert_allclose(out.pooled_output, ref_pooled, atol=TOL, rtol=0)
  # Without ids there is no pooled position, but the conditioning is the same.
  no_ids = flax_model.apply({"params": params}, inputs_embeds=jnp.asarray(embeds))
  assert no_ids.pooled_output is None
  np.testing.assert_array_equal(no_ids.last_hidden_state, out.last_hidden_state)


def test_bf16_compute_stays_close(tower):
  config, _, params = tower
  ids = jnp.asarray(_ids())
  ref = CLIPTextModel(config).apply({"params": params}, ids).last_hidden_state
  low = CLIPTextModel(config, dtype=jnp.bfloat16).apply({"params": params}, ids).last_hidden_state
  assert low.dtype == jnp.bfloat16
  scale = float(jnp.abs(ref).max())
  assert float(jnp.abs(low.astype(jnp.float32) - ref).max()) < 0.05 * scale


@pytest.mark.parametrize("config", [SD1_CLIP_L, SD2_OPENCLIP_H], ids=["clip-l", "openclip-h"])
def test_full_size_key_coverage_both_ways(config):
  meta = torch_clip(config, device="meta")
  torch_shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items() if not k.endswith("position_ids")}
  table = torch_layout.key_table(abstract_params(config), convert.LIST_NAMES)
  assert set(table) == set(torch_shapes)
  for key, (path, shape) in table.items():
    assert shape == torch_shapes[key], key
    assert torch_layout.torch_key(path, convert.LIST_NAMES) == key
  if config is SD1_CLIP_L:  # SD v1.4's text encoder: 123,060,480 parameters.
    assert sum(int(np.prod(s)) for s in torch_shapes.values()) == 123_060_480


def test_export_loads_in_transformers_with_same_outputs(tower, tmp_path):
  config, _, params = tower
  out_dir = convert.export_clip_text(config, params, str(tmp_path / "text_encoder"))
  with open(os.path.join(out_dir, "config.json")) as f:
    assert json.load(f)["architectures"] == ["CLIPTextModel"]
  from safetensors.numpy import load_file

  keys = load_file(os.path.join(out_dir, "model.safetensors")).keys()
  assert all(k.startswith("text_model.") for k in keys), "export must keep the transformers 4.x layout"

  loaded, info = transformers.CLIPTextModel.from_pretrained(out_dir, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  ids = _ids(seed=5)
  ref_hidden, ref_pooled = _torch_outputs(loaded.eval(), ids)
  out = CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(out.last_hidden_state, ref_hidden, atol=TOL, rtol=0)
  np.testing.assert_allclose(out.pooled_output, ref_pooled, atol=TOL, rtol=0)

  # And back: our own loader reads what we wrote, bit for bit.
  config2, params2 = convert.load_clip_text(out_dir)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_loads_both_key_layouts_and_pytorch_bin(tower, tmp_path):
  config, model, params = tower
  model.save_pretrained(tmp_path / "v5")  # transformers 5: no `text_model.` prefix
  _, from_v5 = convert.load_clip_text(str(tmp_path / "v5"))
  jax.tree.map(np.testing.assert_array_equal, from_v5, params)

  legacy = tmp_path / "bin"
  legacy.mkdir()
  (legacy / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
  prefixed = {"text_model." + k: v for k, v in model.state_dict().items()}
  torch.save(prefixed, legacy / "pytorch_model.bin")
  _, from_bin = convert.load_clip_text(str(legacy))
  jax.tree.map(np.testing.assert_array_equal, from_bin, params)


def _reference_state(model):
  """The reference's `CustomTextEncoder.state_dict()`: every tensor under two names (spec section 5)."""
  state = {}
  for k, v in model.state_dict().items():
    state["text_encoder.text_model." + k] = v.clone()
    alias = "embedding." + k.removeprefix("embeddings.") if k.startswith("embeddings.") else k
    state[alias] = v.clone()
  return state


def test_reference_checkpoint_loads_strictly(tower, tmp_path):
  config, model, params = tower
  state = _reference_state(model)
  path = tmp_path / "TextEncoder-text_encoder_full-epoch_999.pt"
  torch.save(state, path)
  loaded = convert.load_reference_checkpoint(str(path), config)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)

  missing_key = "text_encoder.text_model.encoder.layers.1.mlp.fc2.weight"
  del state[missing_key]
  torch.save(state, path)
  with pytest.raises(WeightsError, match=r"missing 1 key\(s\): " + missing_key.replace(".", r"\.")):
    convert.load_reference_checkpoint(str(path), config)


def test_bad_inputs_fail_clearly_and_write_nothing(tower, tmp_path):
  config, model, params = tower
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ConfigError, match=r"config\.json"):
    convert.load_clip_text(str(empty))

  folder = tmp_path / "enc"
  model.save_pretrained(folder)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "swish"}))
  with pytest.raises(ConfigError, match=r"enc/config\.json: key 'hidden_act' is 'swish'"):
    convert.load_clip_text(str(folder))

  (folder / "config.json").write_text(json.dumps(cfg))
  state = state_numpy(model)
  state["encoder.layers.0.self_attn.q_proj.weight"] = state["encoder.layers.0.self_attn.q_proj.weight"][:, :-1]
  from safetensors.numpy import save_file

  save_file(state, str(folder / "model.safetensors"))
  with pytest.raises(WeightsError, match=r"model\.safetensors: key 'encoder\.layers\.0\.self_attn\.q_proj\.weight'"):
    convert.load_clip_text(str(folder))

  # A failed export leaves an existing folder untouched and creates nothing new.
  target = tmp_path / "existing"
  target.mkdir()
  (target / "keep.txt").write_text("mine")
  bad = jax.tree.map(lambda x: x, params)
  bad["final_layer_norm"]["scale"] = bad["final_layer_norm"]["scale"][:-1]
  with pytest.raises(WeightsError, match="final_layer_norm.weight"):
    convert.export_clip_text(config, bad, str(target))
  assert sorted(os.listdir(target)) == ["keep.txt"]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_config_round_trip_and_validation():
  assert CLIPTextConfig.from_dict(SD2_OPENCLIP_H.to_transformers_dict()) == SD2_OPENCLIP_H
  clip_config = {"text_config": SD1_TINY.to_transformers_dict(), "vision_config": {}}
  assert CLIPTextConfig.from_dict(clip_config) == SD1_TINY
  with pytest.raises(ConfigError, match="missing key"):
    CLIPTextConfig.from_dict({"vocab_size": 3}, source="x.json")
  with pytest.raises(ConfigError, match="divisible"):
    CLIPTextConfig(hidden_size=30, num_attention_heads=4)

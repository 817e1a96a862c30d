"""Flax UNet and VAE vs diffusers' PyTorch modules; full-size key coverage; config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.convert import torch_layout
from advunlearn_jax.convert.diffusers import _modernise_vae_keys
from advunlearn_jax.errors import ConfigError, WeightsError
from advunlearn_jax.models import attention, presets
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models import vae as vae_lib
from tests.torch_oracles import state_numpy, torch, torch_unet, torch_vae

pytestmark = pytest.mark.torch
TOL = 1e-4  # fp32, matmul precision "highest"


def _flax_unet(model):
  config = unet_lib.UNetConfig.from_dict(dict(model.config), source="test")
  params = torch_layout.torch_to_flax(
    state_numpy(model), unet_lib.abstract_params(config), list_names=unet_lib.LIST_NAMES, source="test"
  )
  return config, params


@pytest.mark.parametrize("sd2, chunked", [(False, False), (True, False), (False, True)], ids=["sd1", "sd2", "chunked"])
def test_unet_matches_diffusers(sd2, chunked, monkeypatch):
  """`chunked`: the 16x16 latents' 256 queries in chunks of 128, the path SD's 4096-token attention takes on XLA."""
  if chunked:
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 1)  # every attention at MIN_CHUNK query rows
  model = torch_unet(sd2=sd2)
  config, params = _flax_unet(model)
  assert config.use_linear_projection == sd2
  flax_unet = jax.jit(unet_lib.UNet2DConditionModel(config).apply)
  rng = np.random.default_rng(0)
  for batch, timesteps in [(1, [999]), (2, [0, 500]), (3, [1, 261, 981])]:
    x = rng.normal(size=(batch, 4, 16, 16)).astype(np.float32)
    ctx = rng.normal(size=(batch, 77, 32)).astype(np.float32)
    with torch.no_grad():
      ref = model(torch.from_numpy(x), torch.tensor(timesteps), torch.from_numpy(ctx)).sample.numpy()
    out = flax_unet({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(ctx))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=TOL, rtol=0)


@pytest.mark.slow
def test_unet_remat_and_bf16():
  """Rematerialisation changes memory, never values; bf16 compute stays close (fp32 master weights)."""
  model = torch_unet(
    block_out_channels=(32, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  )
  config, params = _flax_unet(model)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 4)), jnp.float32)
  ctx = jnp.asarray(np.random.default_rng(2).normal(size=(2, 77, 32)), jnp.float32)
  t = jnp.array([10, 700])

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def loss_and_grad(ctx, policy, dtype):
    def loss(ctx):
      unet = unet_lib.UNet2DConditionModel(config, dtype=dtype, remat_policy=policy)
      out = unet.apply({"params": params}, x, t, ctx)
      return jnp.mean(out**2), out

    return jax.value_and_grad(loss, has_aux=True)(ctx)

  (ref_loss, ref_out), ref_grad = loss_and_grad(ctx, "none", jnp.float32)
  for policy in ("full", "dots"):
    (value, _), g = loss_and_grad(ctx, policy, jnp.float32)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g, ref_grad, atol=1e-6)
  (_, low), _ = loss_and_grad(ctx, "none", jnp.bfloat16)
  assert low.dtype == jnp.float32  # outputs are returned in fp32 for the losses
  assert float(jnp.abs(low - ref_out).max()) < 0.05 * float(jnp.abs(ref_out).max())


def test_vae_matches_diffusers():
  model = torch_vae()
  config = vae_lib.VAEConfig.from_dict(dict(model.config), source="test")
  params = torch_layout.torch_to_flax(
    state_numpy(model), vae_lib.abstract_params(config), list_names=vae_lib.LIST_NAMES, source="test"
  )
  vae = vae_lib.AutoencoderKL(config)
  images = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images)).latent_dist
    ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
    ref_decoded = model.decode(dist.mean).sample.numpy()
  mean, logvar = vae.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)), method=vae.encode)
  decoded = vae.apply({"params": params}, mean, method=vae.decode)
  nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(nchw(mean), ref_mean, atol=TOL, rtol=0)
  np.testing.assert_allclose(nchw(logvar), ref_logvar, atol=TOL, rtol=0)
  np.testing.assert_allclose(nchw(decoded), ref_decoded, atol=TOL, rtol=0)


def _coverage(meta_model, abstract, list_names, rename=lambda s: s):
  torch_shapes = rename({k: np.empty(0) for k in meta_model.state_dict()})
  shapes = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
  table = torch_layout.key_table(abstract, list_names)
  assert set(table) == set(torch_shapes), set(table) ^ set(torch_shapes)
  for key, (path, shape) in table.items():
    assert shape == shapes[key], key
    assert torch_layout.torch_key(path, list_names) == key


def test_full_size_sd14_unet_and_vae_key_coverage():
  unet_meta = torch_unet(device="meta", **{k: v for k, v in presets.SD14_UNET.items() if not k.startswith("_")})
  config = unet_lib.UNetConfig.from_dict(presets.SD14_UNET)
  _coverage(unet_meta, unet_lib.abstract_params(config), unet_lib.LIST_NAMES)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(unet_lib.abstract_params(config)))
  assert n == 859_520_964  # SD v1.4 UNet
  vae_meta = torch_vae(device="meta", **{k: v for k, v in presets.SD14_VAE.items() if not k.startswith("_")})
  _coverage(vae_meta, vae_lib.abstract_params(vae_lib.VAEConfig.from_dict(presets.SD14_VAE)), vae_lib.LIST_NAMES)


def test_sd21_unet_config_shapes():
  config = unet_lib.UNetConfig.from_dict(presets.SD21_UNET)
  assert config.num_attention_heads == (5, 10, 20, 20) and config.use_linear_projection
  abstract = unet_lib.abstract_params(config)
  attn = abstract["down_blocks_0"]["attentions_0"]
  assert attn["proj_in"]["kernel"].shape == (320, 320)  # linear, not a 1x1 conv
  assert attn["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (1024, 320)


def test_legacy_vae_attention_names_are_read():
  model = torch_vae()
  state = state_numpy(model)
  legacy = {}
  for k, v in state.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      k = k.replace(f".{new}.", f".{old}.")
    legacy[k] = v
  assert any(".query." in k for k in legacy)
  np.testing.assert_array_equal(
    _modernise_vae_keys(legacy)["encoder.mid_block.attentions.0.to_out.0.weight"],
    state["encoder.mid_block.attentions.0.to_out.0.weight"],
  )


def test_unet_config_errors_name_the_key():
  raw = dict(presets.SD14_UNET)
  with pytest.raises(ConfigError, match=r"unet/config.json: key 'down_block_types' holds unsupported block type 'Foo'"):
    unet_lib.UNetConfig.from_dict({**raw, "down_block_types": ["Foo"] * 4}, source="unet/config.json")
  with pytest.raises(ConfigError, match="key 'class_embed_type'"):
    unet_lib.UNetConfig.from_dict({**raw, "class_embed_type": "timestep"})
  with pytest.raises(ConfigError, match="key 'block_out_channels' is missing"):
    unet_lib.UNetConfig.from_dict({"down_block_types": [], "up_block_types": []})


def test_missing_unet_weight_is_named():
  model = torch_unet()
  config = unet_lib.UNetConfig.from_dict(dict(model.config))
  state = state_numpy(model)
  del state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  with pytest.raises(WeightsError, match=r"missing 1 key\(s\): mid_block\.attentions\.0\.transformer_blocks\.0\.attn2"):
    torch_layout.torch_to_flax(state, unet_lib.abstract_params(config), list_names=unet_lib.LIST_NAMES, source="x")

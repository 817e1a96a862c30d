"""Scale-out on the 8 simulated devices: the FSDP layout rule, FSDP training equal to data-parallel training,
and bf16 compute with fp32 master weights against fp32 (on one device, as test_train.py's runs: a dtype, not a
layout)."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from advunlearn_jax import config_lib, sharding
from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import clip_text, presets
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.testing import tiny_models
from advunlearn_jax.training import runs
from advunlearn_jax.unlearn import step as step_lib
from advunlearn_jax.unlearn import trainable, wiring
from tests.test_train import run, tiny_config


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  return tiny_models.write_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"))


def test_param_spec_rule():
  mesh = sharding.make_mesh(jax.devices(), fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert sharding.param_spec((3, 3, 320, 640), mesh) == P(None, None, None, "fsdp")  # the largest axis
  assert sharding.param_spec((768, 3072), mesh) == P(None, "fsdp")
  assert sharding.param_spec((49408, 768), mesh) == P("fsdp")
  assert sharding.param_spec((1030, 32), mesh) == P(None, "fsdp")  # the largest that 4 divides
  assert sharding.param_spec((1030, 30), mesh) == P()  # none: replicated
  assert sharding.param_spec((320,), mesh) == P()  # small: replicated
  assert sharding.param_spec((3, 3, 320, 640), sharding.make_mesh(jax.devices())) == P()  # fsdp = 1
  with pytest.raises(ValueError, match="must divide the 8 devices"):
    sharding.make_mesh(jax.devices(), fsdp=3)
  placed = sharding.shard_params({"big": np.ones((512, 64), np.float32), "small": np.ones(64, np.float32)}, mesh)
  assert placed["big"].sharding.spec == P("fsdp") and placed["big"].addressable_shards[0].data.shape == (128, 64)
  assert sharding.sharded_fraction(placed) == 512 * 64 / (512 * 64 + 64)
  assert sharding.sharded_fraction(sharding.replicate(placed, mesh)) == 0.0


def test_fsdp_layout_at_sd2_size():
  """Sized from shapes alone (nothing allocated): full UNet fine-tuning at SD 2.x size, the frozen UNet and
  OpenCLIP-H text tower plus the trained copy and its Adam state, is 15.2 GB on every device data-parallel and
  about an eighth of it at fsdp = 8, because every large tensor of these layouts has a dimension 8 divides."""
  unet_config = unet_lib.UNetConfig.from_dict(presets.SD21_UNET)
  unet = unet_lib.abstract_params(unet_config)
  text = clip_text.abstract_params(clip_text.CLIPTextConfig(**presets.SD2_TEXT))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  assert 865e6 < count(unet) < 866e6 and 340e6 < count(text) < 341e6  # the published 865.9M and 340.4M
  trained, _ = trainable.split(unet, trainable.unet_mask(unet, "full"))
  config = config_lib.base_config()
  cfg = wiring.step_config(config, wiring.TrainingSections.from_config(config), 1, unet_config)
  adam = jax.eval_shape(step_lib.optimizer(cfg).init, trained)
  state = {"frozen": (unet, text), "trained": trained, "adam": adam}
  data = sharding.bytes_per_device(state, sharding.make_mesh(jax.devices()))
  fsdp = sharding.bytes_per_device(state, sharding.make_mesh(jax.devices(), fsdp=8))
  assert data == 4 * (4 * count(unet) + count(text)) + 4  # fp32 weights, Adam's two moments and its step count
  # Only tensors under 16k elements stay replicated (0.1% of the weights), so each device holds 1.9 GB.
  assert data / 8 <= fsdp < 1.005 * data / 8, (data, fsdp)


def test_fsdp_size_defaults():
  assert sharding.fsdp_size(0, "text_encoder") == 1  # data parallel for the text encoder
  assert sharding.fsdp_size(0, "unet") == 8  # a host's devices share the UNet
  assert sharding.fsdp_size(0, "unet", jax.devices()[:2]) == 2  # a population member's group
  assert sharding.fsdp_size(4, "text_encoder") == 4
  with pytest.raises(ConfigError, match="does not divide the 8 devices"):
    sharding.fsdp_size(3, "unet")


def _unet(workdir):
  return weights_io.read_safetensors(os.path.join(workdir, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_fsdp_unet_method_equals_data_parallel(pipeline_dir, tmp_path, monkeypatch):
  # The tiny UNet's tensors are all below the production threshold; lower it so most of them are split.
  monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 256)
  # No retain term: at step 1 the student equals the original, so its exact gradient is zero and Adam would turn
  # either layout's rounding noise (retain loss 2e-14 vs 0.0, measured) into updates of up to lr everywhere.
  # Every iteration attacks (no warm-up): one compiled step per layout.
  overrides = ["train.method=full", "train.iterations=3", "train.warmup_iters=0", "retain.weight=0.0", "attack.steps=2"]
  compiled = wiring.train_step._cache_size()
  fsdp = runs.run(tiny_config(pipeline_dir, *overrides, "mesh.fsdp=4"), str(tmp_path / "fsdp"))
  assert wiring.train_step._cache_size() - compiled == 1  # sharded state in = sharded state out: no recompiles
  data = runs.run(tiny_config(pipeline_dir, *overrides, "mesh.fsdp=1"), str(tmp_path / "data"))
  assert fsdp["mesh"] == {"data": 2, "fsdp": 4} and data["mesh"] == {"data": 8, "fsdp": 1}
  assert fsdp["state_fsdp_fraction"] > 0.9 and data["state_fsdp_fraction"] == 0.0
  # The two layouts reduce in different orders. Adam (eps 1e-8) turns the rounding of the few gradient entries
  # that are zero in exact arithmetic (the tiny random UNet has some) into updates of up to lr, so the check is
  # on the whole update, not per element. Measured: losses within 4e-5 relative; the weight changes differ by
  # 6.5e-4 of their norm (cosine 0.9999997); 0.06% of the elements differ by more than 1e-5 (at most 4e-4).
  np.testing.assert_allclose(_losses(tmp_path / "fsdp"), _losses(tmp_path / "data"), rtol=2e-4)
  original = weights_io.read_safetensors(os.path.join(pipeline_dir, "unet", "diffusion_pytorch_model.safetensors"))
  a, b = _unet(tmp_path / "fsdp"), _unet(tmp_path / "data")
  delta_fsdp = np.concatenate([(a[k] - original[k]).ravel() for k in a])
  delta_data = np.concatenate([(b[k] - original[k]).ravel() for k in a])
  assert np.linalg.norm(delta_data) > 1e-2  # training moved the UNet
  assert np.linalg.norm(delta_fsdp - delta_data) < 1e-2 * np.linalg.norm(delta_data)
  assert np.mean(np.abs(delta_fsdp - delta_data) > 1e-5) < 5e-3
  # The FSDP checkpoint resumes data-parallel (mesh.fsdp is a layout, not a hyperparameter).
  resumed = runs.run(tiny_config(pipeline_dir, *overrides, "train.iterations=4", "mesh.fsdp=1"), str(tmp_path / "fsdp"))
  assert resumed["resumed_from"] == 3


def _losses(workdir):
  return np.array([json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))])


def _encoder(workdir):
  return weights_io.read_safetensors(os.path.join(workdir, "text_encoder", "model.safetensors"))


@pytest.mark.slow
def test_bf16_compute_fp32_master_weights(pipeline_dir, tmp_path):
  # Attacking from the first iteration: one step to compile per dtype (the attacking step runs all the warm-up's)
  overrides = ["train.iterations=4", "train.warmup_iters=0", "attack.steps=2"]
  full = run(tiny_config(pipeline_dir, *overrides), str(tmp_path / "fp32"))
  half = run(tiny_config(pipeline_dir, *overrides, "model.dtype=bfloat16"), str(tmp_path / "bf16"))
  a, b = _encoder(tmp_path / "fp32"), _encoder(tmp_path / "bf16")
  assert all(v.dtype == np.float32 for v in b.values())  # master weights and exports stay fp32
  original = weights_io.read_safetensors(os.path.join(pipeline_dir, "text_encoder", "model.safetensors"))
  trained = [k for k in a if np.any(a[k] != original[k])]
  # Measured over 4 iterations (batched rollouts, bf16-stored frozen UNet): losses 0.00099/0.0213/0.00555/0.00088
  # (fp32) vs 0.00106/0.0211/0.00565/0.00098 (bf16), at most 0.5% of the largest loss apart: x_t comes from up to
  # 49 DDIM steps, each rounded in bf16.
  losses = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
  np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=0.05 * losses[0].max())
  delta_full = np.concatenate([(a[k] - original[k]).ravel() for k in trained])
  delta_half = np.concatenate([(b[k] - original[k]).ravel() for k in trained])
  cosine = delta_full @ delta_half / (np.linalg.norm(delta_full) * np.linalg.norm(delta_half))
  assert cosine > 0.9
  assert np.linalg.norm(delta_half - delta_full) < 0.4 * np.linalg.norm(delta_full)
  assert full["text_encoder"] != half["text_encoder"]

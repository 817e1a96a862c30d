"""Loading diffusers pipeline folders and the `generate` command vs diffusers' StableDiffusionPipeline."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError
from tests.torch_oracles import SD1_TINY, torch, torch_clip, torch_unet, torch_vae

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of a church", "a red triangle, dotted style"]
STEPS = 8


def _torch_pipeline(seed=0):
  from transformers import CLIPTokenizer

  pipe = diffusers.StableDiffusionPipeline(
    vae=torch_vae(seed=seed),
    text_encoder=torch_clip(SD1_TINY, seed=seed),
    tokenizer=CLIPTokenizer.from_pretrained(tok_lib.offline_tokenizer_folder()),
    unet=torch_unet(seed=seed),
    scheduler=diffusers.PNDMScheduler(
      beta_schedule="scaled_linear",
      beta_start=0.00085,
      beta_end=0.012,
      steps_offset=1,
      skip_prk_steps=True,
      set_alpha_to_one=False,
    ),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
  pipe = _torch_pipeline()
  folder = tmp_path_factory.mktemp("pipe") / "tiny-sd"
  pipe.save_pretrained(folder)
  return pipe, str(folder)


def _torch_images(pipe, latents, scheduler="lms", guidance=7.5):
  if scheduler == "lms":
    pipe.scheduler = diffusers.LMSDiscreteScheduler.from_config(pipe.scheduler.config)
  else:
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  with torch.no_grad():
    out = pipe(
      PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=STEPS, guidance_scale=guidance, output_type="np"
    ).images
  return (out * 255).round().astype(np.uint8)


def test_generate_command_matches_diffusers_pipeline(saved_pipeline, tmp_path):
  pipe, folder = saved_pipeline
  latents = np.random.default_rng(0).normal(size=(2, 4, 16, 16)).astype(np.float32)
  np.save(tmp_path / "latents.npy", latents)
  out_dir = tmp_path / "out"
  cmd = [
    sys.executable,
    "-m",
    "advunlearn_jax.generate",
    f"--pretrained={folder}",
    f"--out={out_dir}",
    f"--latents={tmp_path / 'latents.npy'}",
    f"--steps={STEPS}",
    "--scheduler=lms",
    *[f"--prompt={p}" for p in PROMPTS],
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from PIL import Image

  ours = np.stack([np.asarray(Image.open(out_dir / f"p{i}_slatents.png")) for i in range(2)])
  ref = _torch_images(pipe, latents, "lms")
  assert ours.shape == ref.shape == (2, 32, 32, 3)
  assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
  assert (out_dir / "grid.png").exists()
  assert json.loads((out_dir / "prompts.json").read_text())["prompts"] == PROMPTS


def test_swapped_text_encoder_drives_both_branches(saved_pipeline, tmp_path):
  """--text_encoder replaces the encoder for the prompts and for the unconditional "" branch."""
  pipe, folder = saved_pipeline
  other = torch_clip(SD1_TINY, seed=7)
  other.save_pretrained(tmp_path / "unlearned")
  ours = sd_convert.load_pipeline(folder, text_encoder=str(tmp_path / "unlearned"))
  latents = np.random.default_rng(1).normal(size=(2, 4, 16, 16)).astype(np.float32)
  images = generation.generate(
    ours, PROMPTS, jnp.asarray(latents.transpose(0, 2, 3, 1)), scheduler="ddim", steps=STEPS, guidance=7.5
  )
  pipe_other = _torch_pipeline()
  pipe_other.text_encoder = other
  ref = _torch_images(pipe_other, latents, "ddim")
  assert np.abs(images.astype(int) - ref.astype(int)).max() <= 2
  baseline = _torch_images(_torch_pipeline(), latents, "ddim")
  assert np.abs(baseline.astype(int) - ref.astype(int)).max() > 2  # the swap really changes the images


def test_every_guidance_scale_renders_as_diffusers_from_one_compiled_step(saved_pipeline):
  """A prompt set with a scale per prompt (UnlearnDiffAtk's and I2P's CSVs: twelve scales in nudity.csv) compiles
  the sampler's step once, and each scale renders as diffusers renders it."""
  from advunlearn_jax.diffusion import sampling

  pipe, folder = saved_pipeline
  ours = sd_convert.load_pipeline(folder)
  latents = np.random.default_rng(2).normal(size=(2, 4, 16, 16)).astype(np.float32)
  compiled = None
  for guidance in (3.0, 12.0):
    images = generation.generate(
      ours, PROMPTS, jnp.asarray(latents.transpose(0, 2, 3, 1)), scheduler="ddim", steps=STEPS, guidance=guidance
    )
    ref = _torch_images(pipe, latents, "ddim", guidance)
    assert np.abs(images.astype(int) - ref.astype(int)).max() <= 2, guidance
    sizes = {key: fn._cache_size() for key, fn in sampling._STEP_CACHE.items()}
    assert compiled is None or sizes == compiled  # the second scale compiled nothing
    compiled = sizes


def test_write_pipeline_round_trips_through_diffusers(saved_pipeline, tmp_path):
  _, folder = saved_pipeline
  ours = sd_convert.load_pipeline(folder)
  out = sd_convert.write_pipeline(
    str(tmp_path / "exported"),
    unet=(ours.unet_config, ours.unet_params),
    vae=(ours.vae_config, ours.vae_params),
    text_encoder=(ours.text_config, ours.text_params),
    tokenizer_dir=ours.tokenizer_dir,
    schedule=ours.schedule,
  )
  reloaded = diffusers.StableDiffusionPipeline.from_pretrained(out)
  original = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  for name in ("unet", "vae", "text_encoder"):
    a, b = getattr(reloaded, name).state_dict(), getattr(original, name).state_dict()
    assert set(a) == set(b), name
    for key in a:
      torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_bad_pipeline_folders(saved_pipeline, tmp_path):
  _, folder = saved_pipeline
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "model_index.json").write_text("{}")
  with pytest.raises(ConfigError, match=r"no unet/ folder"):
    sd_convert.load_pipeline(str(broken))
  with pytest.raises(ConfigError, match=r"no model_index.json"):
    sd_convert.load_pipeline(str(tmp_path))
  with pytest.raises(ConfigError, match="no such folder, and not a hub id"):
    sd_convert.load_pipeline(str(tmp_path / "nowhere"))
  # Offline without a cached copy: a clear message, not a stack trace from deep inside huggingface_hub.
  os.environ["HF_HUB_OFFLINE"] = "1"
  with pytest.raises(ConfigError, match="could not fetch from the hub or the local cache"):
    sd_convert.load_pipeline("no-such-owner/no-such-model")

"""SDXL generation vs diffusers' StableDiffusionXLPipeline on the micro SDXL layout (testing/tiny_models.py):
prompt encoding and micro-conditioning, CFG DDIM latents and decoded images from the same start latents, the
reference's partial DDIM with SDXL's conditioning, and our whole-folder export loaded by diffusers.

One random diffusers pipeline (module fixture) serves the first tests; every comparison runs our sampler with the
same UNet config and guidance, so the compiled step is shared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import ddim, generation, sampling, sdxl_conditioning
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.testing import reference_torch, tiny_models
from tests.torch_oracles import torch, torch_clip, torch_unet, torch_vae, transformers

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOL = 1e-5  # fp32, matmul precision "highest": tests/test_clip_text.py's
LATENT_TOL = 1e-4  # fp32, after every DDIM step at guidance 5: tests/test_diffusion.py's DDIM tolerance
STEPS, GUIDANCE = 4, 5.0
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]


def _torch_pipeline(seed: int):
  """A random diffusers StableDiffusionXLPipeline in micro_sdxl's layout, DDIM as SDXL base's config would give
  it, tokenizer_2 padding with "!" as SDXL base's does."""
  text, text_2, unet, vae = tiny_models.micro_sdxl()
  drop = lambda d: {k: v for k, v in d.items() if k != "_class_name"}
  folder = tok_lib.offline_tokenizer_folder()
  return diffusers.StableDiffusionXLPipeline(
    vae=torch_vae(seed=seed, **drop(vae.to_diffusers_dict())),
    text_encoder=torch_clip(text, seed=seed + 1),
    text_encoder_2=torch_clip(text_2, seed=seed + 2, with_projection=True),
    tokenizer=transformers.CLIPTokenizer.from_pretrained(folder),
    tokenizer_2=transformers.CLIPTokenizer.from_pretrained(folder, pad_token="!"),
    unet=torch_unet(seed=seed + 3, **drop(unet.to_diffusers_dict())),
    scheduler=diffusers.DDIMScheduler(
      beta_schedule="scaled_linear",
      beta_start=0.00085,
      beta_end=0.012,
      steps_offset=1,
      set_alpha_to_one=False,
      clip_sample=False,
      timestep_spacing="leading",
    ),
    add_watermarker=False,
  )


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """(diffusers pipeline, ours loaded from the folder diffusers saved, start latents NCHW)."""
  pipe = _torch_pipeline(seed=0)
  folder = tmp_path_factory.mktemp("sdxl") / "pipe"
  pipe.save_pretrained(folder)
  latents = np.random.default_rng(0).normal(size=(len(PROMPTS), 4, 16, 16)).astype(np.float32)
  return pipe, sd_convert.load_sdxl_pipeline(str(folder)), latents


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _diffusers_run(pipe, latents, output_type):
  with torch.no_grad():
    out = pipe(
      PROMPTS,
      num_inference_steps=STEPS,
      guidance_scale=GUIDANCE,
      latents=torch.from_numpy(latents),
      output_type=output_type,
    ).images
  return np.asarray(out)


def _check_conditioning(pipe, ours):
  """Ours equals `encode_prompt` with CFG (negatives included) and `_get_add_time_ids` at the pipeline's default
  sizes."""
  with torch.no_grad():
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
  cond = generation.encode_prompts(ours, PROMPTS)
  uncond = generation.unconditional(ours, len(PROMPTS))
  for mine, theirs in [
    (cond.context, embeds),
    (cond.added.text_embeds, pooled),
    (uncond.context, neg),
    (uncond.added.text_embeds, neg_pooled),
  ]:
    np.testing.assert_allclose(mine, theirs.numpy(), atol=TEXT_TOL, rtol=0)
  size = pipe.default_sample_size * pipe.vae_scale_factor
  assert sdxl_conditioning.image_size(ours) == (size, size) == (32, 32)
  ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32, ours.text_config_2.projection_dim)
  for branch in (cond, uncond):
    np.testing.assert_array_equal(branch.added.time_ids, np.repeat(ids.numpy(), len(PROMPTS), 0))
  return cond, uncond


def test_generation_matches_diffusers(sdxl):
  """force_zeros_for_empty_prompt (diffusers' default): zero negatives. Latents after 4 CFG DDIM steps within
  LATENT_TOL; decoded uint8 images within one level (diffusers' [0, 1] output rounded as its PIL path does)."""
  pipe, ours, latents = sdxl
  assert pipe.config.force_zeros_for_empty_prompt and ours.force_zeros_for_empty_prompt
  cond, uncond = _check_conditioning(pipe, ours)
  assert not np.any(uncond.context) and not np.any(uncond.added.text_embeds)
  # Another encoder (e.g. an unlearned one) is given per tower; one tower's params alone are refused by name.
  swapped = generation.encode_prompts(ours, PROMPTS, (ours.text_params, None))
  jax.tree.map(np.testing.assert_array_equal, swapped, cond)
  with pytest.raises(ValueError, match="a pair"):
    generation.encode_prompts(ours, PROMPTS, ours.text_params)

  ref = _diffusers_run(pipe, latents, "latent")
  out = generation.denoise_latents(ours, cond, uncond, _nhwc(latents), scheduler="ddim", steps=STEPS, guidance=GUIDANCE)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=LATENT_TOL, rtol=0)
  assert np.abs(ref - latents).mean() > 0.1  # the steps moved the latents

  ref_images = np.round(_diffusers_run(pipe, latents, "np") * 255)
  images = generation.generate(ours, PROMPTS, _nhwc(latents), scheduler="ddim", steps=STEPS, guidance=GUIDANCE)
  assert images.shape == ref_images.shape == (len(PROMPTS), 32, 32, 3) and images.dtype == np.uint8
  assert np.abs(images.astype(np.float64) - ref_images).max() <= 1
  assert ref_images.std() > 20  # not a flat or saturated image


def test_partial_ddim_with_sdxl_conditioning(sdxl):
  """The reference's partial DDIM (the training rollout) with SDXL's conditioning as its context pytree, rows
  walking to different t_enc (sorted, padded to the bucket, sliced: every leaf of (cond, uncond) follows its row),
  vs the reference's transcription driving diffusers' SDXL UNet with the same added conditioning. One bucket
  wider than the rows keeps it to one compiled UNet."""
  pipe, ours, latents = sdxl
  cond = generation.encode_prompts(ours, PROMPTS)
  uncond = sdxl_conditioning.unconditional(ours._replace(force_zeros_for_empty_prompt=False), len(PROMPTS))
  tables = ddim.ldm_tables(ours.schedule.alphas_cumprod_ldm())
  unet = unet_lib.UNet2DConditionModel(ours.unet_config)
  unet_fn = lambda x, t, c: unet_lib.apply_conditioned(unet, ours.unet_params, x, t, c)
  eps_fn = lambda x, t, ctx: sampling.cfg_eps(unet_fn, x, t, ctx[0], ctx[1], 3.0)
  t_enc = (46, 40)  # 4 and 10 UNet steps
  out, stats = ddim.partial_ddim_batched(eps_fn, _nhwc(latents), jnp.asarray(t_enc), (cond, uncond), tables, (3,))
  assert int(stats.calls) == 10 and int(stats.useful_rows) == 14

  both = jax.tree.map(lambda u, c: torch.from_numpy(np.concatenate([u, c])), uncond, cond)
  added = {"text_embeds": both.added.text_embeds, "time_ids": both.added.time_ids}
  model = lambda x, t, ctx: pipe.unet(x, t, ctx, added_cond_kwargs=added)
  as_torch = lambda a: torch.from_numpy(np.array(a))
  for row, t in enumerate(t_enc):
    ref = reference_torch.partial_ddim(
      model, torch.from_numpy(latents), as_torch(cond.context), as_torch(uncond.context), t, 3.0
    )
    mine = np.asarray(out[row]).transpose(2, 0, 1)
    np.testing.assert_allclose(mine, ref[row].numpy(), atol=LATENT_TOL, rtol=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(our exporter's micro SDXL folder without force_zeros_for_empty_prompt, ours loaded from it, diffusers'
  pipeline loaded from it with DDIM from its scheduler config, start latents NCHW)."""
  folder = tmp_path_factory.mktemp("exported") / "pipe"
  tiny_models.write_sdxl_pipeline(str(folder), seed=1, force_zeros_for_empty_prompt=False)
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
  assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # as SDXL base ships
  pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
  latents = np.random.default_rng(1).normal(size=(len(PROMPTS), 4, 16, 16)).astype(np.float32)
  return str(folder), sd_convert.load_sdxl_pipeline(str(folder)), pipe, latents


def test_write_sdxl_pipeline_loads_in_diffusers(exported):
  """Our exporter's micro SDXL folder: diffusers loads it and draws our latents; we read back the params we
  wrote, bit for bit. Without force_zeros_for_empty_prompt the negatives are "" through both towers."""
  folder, ours, pipe, latents = exported
  assert json.load(open(f"{folder}/model_index.json"))["_class_name"] == "StableDiffusionXLPipeline"
  assert not ours.force_zeros_for_empty_prompt and not pipe.config.force_zeros_for_empty_prompt
  written = (ours.text_params, ours.text_params_2, ours.unet_params, ours.vae_params)
  for mine, original in zip(written, tiny_models.sdxl_params(1)):
    jax.tree.map(np.testing.assert_array_equal, mine, original)
  assert tok_lib.load_tokenizer(ours.tokenizer_2_dir).pad_token_id == 0  # "!", as SDXL base's tokenizer_2

  cond, uncond = _check_conditioning(pipe, ours)
  assert np.abs(np.asarray(uncond.context)).mean() > 0.1  # "" through both towers, not zeros
  ref = _diffusers_run(pipe, latents, "latent")
  out = generation.denoise_latents(ours, cond, uncond, _nhwc(latents), scheduler="ddim", steps=STEPS, guidance=GUIDANCE)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=LATENT_TOL, rtol=0)


def test_generate_command_reads_sdxl_folders(exported, tmp_path):
  """`python -m advunlearn_jax.generate` on an SDXL folder draws diffusers' images from the same latents (one
  uint8 level)."""
  folder, _, pipe, latents = exported
  np.save(tmp_path / "latents.npy", latents)
  flags = [f"--steps={STEPS}", f"--guidance={GUIDANCE}", "--scheduler=ddim", f"--latents={tmp_path / 'latents.npy'}"]
  cmd = [sys.executable, "-m", "advunlearn_jax.generate", f"--pretrained={folder}", f"--out={tmp_path / 'out'}"]
  cmd += flags + [f"--prompt={p}" for p in PROMPTS]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  images = np.stack([np.asarray(Image.open(tmp_path / "out" / f"p{i}_slatents.png")) for i in range(len(PROMPTS))])
  ref_images = np.round(_diffusers_run(pipe, latents, "np") * 255)
  assert images.shape == ref_images.shape and np.abs(images.astype(np.float64) - ref_images).max() <= 1

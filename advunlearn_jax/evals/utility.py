"""The utility half of an evaluation (spec 6.2): one image per caption, the CLIP score and the FID against real
images, the tiny world's retained-value recognition, and the protocol that decides those numbers."""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections
import numpy as np

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import prompt_sets, report_kinds


def measure(config: ml_collections.ConfigDict, original_dir: str, target, out_dir: str, log=print) -> dict[str, Any]:
  """The paper's utility protocol (spec 6.2): one image per caption of `evaluation.captions` (kept in
  OUT/utility_images, resumable), the CLIP score with `evaluation.clip_model`, the FID against
  `evaluation.real_images` on the features `evaluation.fid` names; the tiny world's retained-value recognition."""
  out: dict[str, Any] = {}
  ev = config.evaluation
  if (ev.clip_model or ev.real_images) and not ev.captions:
    raise ConfigError(
      "config.evaluation.clip_model / real_images score images of captions: set evaluation.captions "
      "(e.g. coco_10k.csv or tfds:coco_captions/2014:val)"
    )
  if ev.captions:
    from advunlearn_jax.diffusion import generation
    from advunlearn_jax.evals import caption_images

    captions = prompt_sets.from_config(ev.captions, (), ev.seed, ev.utility_guidance, ev.max_captions, "captions")
    # Scorers and real images are checked before the hours of generation; images are read only when scored.
    scorer = features = None
    if ev.clip_model:
      from advunlearn_jax.evals import clip_score

      scorer = clip_score.CLIPScorer(ev.clip_model)
    if ev.real_images:
      from advunlearn_jax.evals import fid

      real_images = fid.open_images(ev.real_images, "evaluation.real_images", ev.max_real_images)
      if len(real_images) < 2:
        raise ConfigError(f"config.evaluation.real_images={ev.real_images!r}: FID needs at least 2 images")
      features = fid.feature_extractor(ev.fid, ev.inception_weights, scorer, log, ev.fid_preprocess, ev.fid_batch)
    hw = generation.image_size(target)
    store = caption_images.ImageStore(
      os.path.join(out_dir, "utility_images"),
      caption_images.manifest(captions, ev.utility_scheduler, ev.utility_steps, ev.latents),
      (hw, hw, 3),
      ev.utility_format,
    )
    t0 = time.perf_counter()
    made = caption_images.generate(
      target,
      captions,
      store,
      scheduler=ev.utility_scheduler,
      steps=ev.utility_steps,
      latents=ev.latents,
      per_device_batch=ev.utility_batch,
      log=log,
    )
    out["captions"] = len(captions)
    out["images_per_second"] = made / (time.perf_counter() - t0) if made else 0.0
    images = store.images()  # each scorer walks them in chunks: 10k images need not fit in memory
    if scorer is not None:
      out["clip_score"] = scorer.score(images, [c.prompt for c in captions])
    if features is not None:
      real = fid.statistics(features(real_images))
      out["fid"] = fid.frechet_distance(*fid.statistics(features(images)), *real)
      out["fid_features"] = features.name
      out["fid_preprocess"] = features.preprocess
      out["fid_images"] = [len(images), len(real_images)]  # generated, real
    samples = generation.image_grid(np.stack(images[:32]), cols=8)
    generation.save_png(os.path.join(out_dir, "utility_samples.png"), samples)
  out.update(report_kinds.named(config.report.kind).utility(config, original_dir, target, out_dir))
  return out


def protocol(config: ml_collections.ConfigDict, utility: dict) -> dict[str, Any]:
  ev = config.evaluation
  out: dict[str, Any] = {
    "captions": ev.captions,
    "images": {
      "scheduler": ev.utility_scheduler,
      "steps": ev.utility_steps,
      "guidance": ev.utility_guidance,
      "latents": ev.latents,
    },
  }
  if "clip_score" in utility:
    out["clip_score"] = {"model": ev.clip_model}
  if "fid" in utility:
    out["fid"] = {
      "features": utility["fid_features"],
      "network": "FID Inception-v3, pytorch-fid's pt_inception-2015-12-05 weights"
      if utility["fid_features"] == "inception"
      else f"CLIP image features ({ev.clip_model})",
      "preprocess": utility["fid_preprocess"],
      "images": {
        "generated": utility["fid_images"][0],
        "real": utility["fid_images"][1],
        "real_source": ev.real_images,
      },
    }
  return out

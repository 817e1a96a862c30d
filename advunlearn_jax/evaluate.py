"""Robustness and utility of an unlearned model: `python -m advunlearn_jax.evaluate --config=CONFIG --out=DIR`.

  python -m advunlearn_jax.evaluate --config=configs/tiny.py --text_encoder=workdirs/tiny/text_encoder --out=DIR
  python -m advunlearn_jax.evaluate --config=configs/nudity.py --pipeline=workdirs/esd/pipeline \
      --config.evaluation.prompts_csv=nudity.csv --out=DIR

The original model is `config.model.pretrained`; the evaluated one is that model with `--text_encoder`
swapped in, or a whole `--pipeline` folder (for UNet methods), or, with neither, the original model itself.
Target images come from the original model; UnlearnDiffAtk (evals/unlearndiff.py) then attacks every prompt
of `config.evaluation` that the unattacked model does not already show. Writes report.md, report.json and
grids of the target, unattacked and final images. With `evaluation.captions` it runs the paper's utility
protocol (`--utility_only`: nothing else): one image per caption (sharded, resumable: evals/caption_images.py),
the CLIP score with `evaluation.clip_model` and the FID against `evaluation.real_images` on the FID Inception's
features after T2IBenchmark's preprocessing, as the paper (evals/fid.py); on the tiny world it adds the judge's
recognition of the retained values.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from advunlearn_jax import cli, compile_cache
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import evaluation
from advunlearn_jax.evals import report as report_lib
from advunlearn_jax.training import config_validation, workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder for report.md, report.json and the image grids.")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", "", "Unlearned text encoder folder (transformers layout).")
_PIPELINE = flags.DEFINE_string("pipeline", "", "Unlearned diffusers pipeline folder (e.g. WORKDIR/pipeline).")
_NO_ATTACK = flags.DEFINE_bool("no_attack", False, "Only the unattacked pass (pre-ASR).")
_UTILITY_ONLY = flags.DEFINE_bool("utility_only", False, "Only the utility protocol: caption images, CLIP, FID.")
_CACHE_DEFAULT = "{out}/xla_cache"
_COMPILATION_CACHE = compile_cache.define_flag(_CACHE_DEFAULT)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_validation.validate(config)
  if config.first_stage and _TEXT_ENCODER.value and not _PIPELINE.value:  # over model.pretrained's UNet: a model
    raise ConfigError(  # the recipe never made
      "--text_encoder with config.first_stage: a two-stage recipe's text encoder goes with its first stage's UNet; "
      "evaluate its whole --pipeline=WORKDIR/pipeline, or a numbered export's text encoder with "
      "--pipeline=WORKDIR/first_stage/pipeline"
    )
  cli.check_output_folder(_OUT.value, "out")
  os.makedirs(_OUT.value, exist_ok=True)
  # One evaluation per --out, as one run per workdir: two would write one report from two models' images.
  with workdir_lock.WorkdirLock(_OUT.value):
    compile_cache.enable(_COMPILATION_CACHE.value, _CACHE_DEFAULT, out=_OUT.value)
    report = evaluation.evaluate(
      config,
      _OUT.value,
      _TEXT_ENCODER.value,
      _PIPELINE.value,
      attack=not _NO_ATTACK.value,
      utility_only=_UTILITY_ONLY.value,
    )
  u = report["utility"]
  scores = [f"{k} {u[k]:.4f}" for k in ("fid", "clip_score") if k in u]
  if "fid" in u:
    scores[0] += f" ({u['fid_features']} features, {u['fid_preprocess']} preprocessing)"
  if "robustness" in report:
    s = report["robustness"]["summary"]
    scores.insert(0, f"pre-ASR {report_lib.rate(s, 'pre_')}, ASR {report_lib.rate(s, '')}")
  print(f"{'; '.join(scores) or 'no scores'}; report in {_OUT.value}/report.md")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  cli.run(main, output_flags=("out",))

"""A Hugging Face Hub model repository of a run's trained component: the folder, its model card, the upload.

The folder holds what the reference's users load (OPTML-Group/AdvUnlearn keeps one encoder per subfolder):
`text_encoder/` in the transformers layout, safetensors (or `unet/` for the ESD-style UNet methods), optionally
the reference's `TextEncoder-*.pt`, `training_config.json` (the run's whole config) and `README.md`, a model card
whose YAML metadata huggingface_hub's `ModelCard` parses: base model, licence, tags, the erased concepts and,
given an evaluation report, its numbers as `model-index` results with the protocol that produced them. The
folder is written whole or not at all; the upload happens only after it is complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import report as report_lib
from advunlearn_jax.models.pipeline_record import SDXLPipeline
from advunlearn_jax.training import checkpoint, run_exports, workdir_lock

# The licences of well-known bases, which a derived component inherits; any other base needs --license.
BASE_LICENSES = {
  "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
  "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
  "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
  "stabilityai/stable-diffusion-2-1": "openrail++",
  "stabilityai/stable-diffusion-2-1-base": "openrail++",
  "tiny": "apache-2.0",  # the shipped tiny model is this project's
}
TAGS = ("text-to-image", "stable-diffusion", "concept-erasure", "machine-unlearning", "adversarial-training")
CITATION = """@inproceedings{zhang2024defensive,
  title={Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models},
  author={Zhang, Yimeng and Chen, Xin and Jia, Jinghan and Zhang, Yihua and Fan, Chongyu and Liu, Jiancheng and
          Hong, Mingyi and Ding, Ke and Liu, Sijia},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024}
}"""


def write_folder(
  hub_dir: str,
  workdir: str,
  pretrained: str | None = None,
  report_path: str = "",
  license_id: str = "",
  with_reference: bool = False,
) -> dict[str, str]:
  """Writes the Hub repository folder of `workdir`'s latest readable checkpoint (run_exports.latest) into
  `hub_dir`, replacing it whole but for a clone's git data; `hub_dir` must be new, empty (a fresh clone) or a
  previous export (run_exports.check_target). `report_path`: an evaluate report.json whose numbers the card carries."""
  report = _read_report(report_path) if report_path else None
  saved = checkpoint.latest_meta(workdir)
  if saved is not None and saved["config"].get("first_stage"):  # the card says the rest is the base model's
    raise ConfigError(
      f"{workdir}: --hub_dir: {run_exports.TWO_STAGES_NEED_THEIR_UNET}; export it with --out and share that folder"
    )
  with run_exports.claimed(hub_dir, "hub_dir", workdir):  # a workdir or the user's own folder is refused
    run = run_exports.latest(workdir, pretrained)
    if isinstance(run.pipe, SDXLPipeline):  # the card's loading code and licence table are SD 1.x/2.x's
      raise ConfigError(
        f"{workdir}: --hub_dir: the run trained SDXL's text towers; the Hub card is written for SD pipelines. "
        "Export with --out (both towers and a StableDiffusionXLPipeline folder)"
      )
    license_id = licence_of(run.config.model.pretrained, license_id)
    card = model_card(run, license_id, report)
    # A clone's git data stays; the lock moves into the new folder with it.
    with weights_io.atomic_folder(hub_dir, keep=(*run_exports.KEPT, workdir_lock.LOCK_NAME)) as staging:
      run_exports.write_component(staging, run.pipe, run.trained.tower, run.params)
      if with_reference:  # ConfigError for a UNet run: the staging folder goes, an earlier folder stands
        run_exports.reference_checkpoint(run, staging, workdir)
      with open(os.path.join(staging, "training_config.json"), "w") as f:
        f.write(run.config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
      card.save(os.path.join(staging, "README.md"))
      run_exports.write_marker(staging, run.step)
  print(f"step {run.step}: Hub folder in {hub_dir} ({run.trained.tower}/, README.md, training_config.json)")
  return {"hub_dir": hub_dir, run.trained.tower: os.path.join(hub_dir, run.trained.tower)}


def licence_of(base: str, license_id: str = "") -> str:
  """`license_id`, or the licence of the base model the run was trained from (which the component inherits);
  ConfigError when neither is known."""
  license_id = license_id or BASE_LICENSES.get(base, "")
  if not license_id:
    raise ConfigError(
      f"--license: the run's base {base!r} is none whose licence is known here ({sorted(BASE_LICENSES)}); "
      "the component inherits the base model's licence: name it (e.g. --license=creativeml-openrail-m)"
    )
  return license_id


def _read_report(path: str) -> dict:
  try:
    with open(path) as f:
      report = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"--report={path}: cannot read it as an evaluate report.json ({e})") from None
  if not isinstance(report, dict) or not ({"robustness", "utility"} & set(report)):
    raise ConfigError(f"--report={path}: not an evaluate report.json (no 'robustness' or 'utility' section)")
  return report


def model_card(run: run_exports.Latest, license_id: str, report: dict | None = None):
  """The card: metadata (huggingface_hub.ModelCardData) and a body that says what the component is, how to load
  it, how it was trained and, with `report`, how it was measured."""
  from huggingface_hub import ModelCard, ModelCardData

  config, tower = run.config, run.trained.tower
  base = config.model.pretrained
  concepts = list(config.concept.prompts)
  data = ModelCardData(
    license=license_id,
    base_model=base if sd_convert.is_hub_id(base) else None,
    library_name="transformers" if tower == "text_encoder" else "diffusers",
    tags=[*TAGS, "advunlearn-jax"],
    model_name=f"{', '.join(concepts)} erased by {_method_name(run)}",
    eval_results=eval_results(report, concepts) if report else None,
    erased_concepts=concepts,
    training_method=run.trained.method,
    training_step=run.step,
  )
  body = [
    f"# {data.model_name}",
    "",
    f"The {'text encoder' if tower == 'text_encoder' else 'UNet'} of `{base}` with {_concepts(concepts)} erased "
    f"by {_method_name(run)} (Zhang et al., NeurIPS 2024), trained with advunlearn-jax, a JAX/Flax "
    "implementation of the paper's [reference code](https://github.com/OPTML-Group/AdvUnlearn). The rest of the "
    "pipeline is the base model's, unchanged.",
    "",
    "## Use",
    "",
    "```python",
    *_usage(run, base),
    "```",
    "",
    "## Training",
    "",
    *_training_lines(run),
    "",
    "The whole configuration is `training_config.json`.",
  ]
  if report:
    body += ["", "## Evaluation", "", *_evaluation_lines(report)]
  body += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
  return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _method_name(run: run_exports.Latest) -> str:
  attacked = run.config.train.warmup_iters < run.config.train.iterations
  return "AdvUnlearn" if attacked else "ESD-style erasure (no adversarial training)"


def _concepts(concepts: list[str]) -> str:
  return " and ".join(f"'{c}'" for c in concepts)


def _usage(run: run_exports.Latest, base: str) -> list[str]:
  base = base if sd_convert.is_hub_id(base) else "PATH/TO/BASE/PIPELINE"
  if run.trained.tower == "text_encoder":
    return [
      "from diffusers import StableDiffusionPipeline",
      "from transformers import CLIPTextModel",
      "",
      'text_encoder = CLIPTextModel.from_pretrained("THIS/REPO", subfolder="text_encoder")',
      f'pipe = StableDiffusionPipeline.from_pretrained("{base}", text_encoder=text_encoder)',
    ]
  return [
    "from diffusers import StableDiffusionPipeline, UNet2DConditionModel",
    "",
    'unet = UNet2DConditionModel.from_pretrained("THIS/REPO", subfolder="unet")',
    f'pipe = StableDiffusionPipeline.from_pretrained("{base}", unet=unet)',
  ]


def _training_lines(run: run_exports.Latest) -> list[str]:
  c = run.config
  t, a, r = c.train, c.attack, c.retain
  lines = [
    f"- method: `{t.method}` (the trained {run.trained.tower}), {t.iterations} iterations (this is step "
    f"{run.step}), Adam lr {t.lr}, seed {c.seed}, compute dtype {c.model.dtype}",
    f"- x_t: `{t.xt_source}`; guidance {c.diffusion.start_guidance} for rollouts, negative guidance "
    f"{c.diffusion.negative_guidance} in the ESD target",
  ]
  if t.warmup_iters < t.iterations:
    lines.append(
      f"- inner attack: `{a.method}`, {a.steps} steps, lr {a.lr}, {a.num_tokens} `{a.type}` token(s), init "
      f"`{a.init}`, after {t.warmup_iters} warm-up iterations"
    )
  retain_set = r.dataset or f"{len(r.prompts)} given prompts"
  lines.append(f"- retain regulariser: `{r.mode}`, weight {r.weight}, batch {r.batch}, set `{retain_set}`")
  return lines


def _evaluation_lines(report: dict) -> list[str]:
  lines = []
  if "robustness" in report:
    s = report["robustness"]["summary"]
    lines += [
      f"- pre-attack ASR: {report_lib.rate(s, 'pre')}",
      f"- ASR under {report['robustness']['attack_name']}: {report_lib.rate(s, '')}",
    ]
  lines += report_lib.utility_lines(report.get("utility", {}))
  return [*lines, "", *report_lib.protocol_lines(report.get("protocol", {}))]


def eval_results(report: dict, concepts: list[str]) -> list[Any]:
  """The report's numbers as model-index results (percentages for rates, as the paper reports them)."""
  from huggingface_hub import EvalResult

  results = []
  if "robustness" in report:
    r = report["robustness"]
    source = report.get("protocol", {}).get("prompts", {}).get("source", "")
    dataset = os.path.basename(source) if source and source != "inline" else f"{', '.join(concepts)} prompts"
    for metric, name, value in (
      ("pre_attack_success_rate", "pre-attack ASR (%)", r["summary"]["pre_asr"]),
      ("attack_success_rate", f"ASR under {r['attack_name']} (%)", r["summary"]["asr"]),
    ):
      results.append(
        EvalResult(
          task_type="text-to-image",
          dataset_type="concept-erasure-prompts",
          dataset_name=dataset,
          metric_type=metric,
          metric_name=name,
          metric_value=round(100 * value, 2),
        )
      )
  utility = report.get("utility", {})
  for metric in ("clip_score", "fid"):
    if metric in utility:
      results.append(
        EvalResult(
          task_type="text-to-image",
          dataset_type="captions",
          dataset_name=f"{utility.get('captions', '?')} captions",
          metric_type=metric,
          metric_value=round(float(utility[metric]), 4),
        )
      )
  return results


def check_repo_id(repo_id: str) -> None:
  if not sd_convert.is_hub_id(repo_id):
    raise ConfigError(f"--push_to_hub={repo_id!r}: expected a model repository id USER/NAME")


def push(hub_dir: str, repo_id: str, private: bool = False) -> str:
  """Uploads the complete `hub_dir` to the model repository `repo_id` (created if need be); its URL. Offline, or
  refused by the Hub: ConfigError saying so, with the folder left whole for a later upload."""
  from huggingface_hub import HfApi

  check_repo_id(repo_id)
  api = HfApi()
  try:
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=hub_dir, repo_id=repo_id, repo_type="model")
  except Exception as e:  # offline, no token, no rights: the Hub's own message says which
    raise ConfigError(
      f"--push_to_hub={repo_id}: the upload failed ({type(e).__name__}: {e}); {hub_dir} is complete: upload it "
      f"later with `hf upload {repo_id} {hub_dir}`"
    ) from None
  return str(getattr(commit, "commit_url", commit))

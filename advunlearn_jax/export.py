"""Exports a run's trained component from its latest readable checkpoint (the library: training/run_exports.py,
training/hub.py).

  python -m advunlearn_jax.export --workdir=workdirs/church --out=exports/church [--format=reference]
  python -m advunlearn_jax.export --workdir=workdirs/nudity --hub_dir=hub/nudity --report=eval/report.json \
      [--push_to_hub=USER/NAME]

--out writes OUT/text_encoder (CLIPTextModel.from_pretrained; OUT/unet for UNet methods) and OUT/pipeline
(StableDiffusionPipeline), using the config stored with the checkpoint to find the base pipeline (override with
--pretrained); `--format=reference` writes the reference's OUT/TextEncoder-<method>-epoch_<i>.pt instead.
--hub_dir writes a Hugging Face Hub model repository folder: the component in safetensors, training_config.json
and a model card (README.md) with the erased concepts, the training settings and, with --report, the evaluation's
numbers and protocol; `--format=reference` adds the .pt. --push_to_hub uploads that folder once it is complete.
"""

from __future__ import annotations

from absl import app, flags

from advunlearn_jax import cli
from advunlearn_jax.training import hub, run_exports

_WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir holding checkpoints/")
_OUT = flags.DEFINE_string("out", None, "output folder: the component and a whole pipeline")
_HUB_DIR = flags.DEFINE_string("hub_dir", None, "output folder: a Hub model repository with its model card")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "base pipeline, if not the one the run used")
_FORMAT = flags.DEFINE_enum(
  "format", "diffusers", run_exports.FORMATS, "diffusers: the component's folder; reference: the TextEncoder-*.pt"
)
_REPORT = flags.DEFINE_string("report", "", "with --hub_dir: an evaluate report.json for the model card")
_LICENSE = flags.DEFINE_string("license", "", "with --hub_dir: the card's licence id; default: the base model's")
_PUSH = flags.DEFINE_string("push_to_hub", "", "with --hub_dir: upload the folder to this model repository")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_OUT.value) == bool(_HUB_DIR.value):
    raise app.UsageError("give one of --out (a component and a pipeline) or --hub_dir (a Hub repository folder)")
  if not _HUB_DIR.value and (_REPORT.value or _PUSH.value or _LICENSE.value):
    raise app.UsageError("--report, --license and --push_to_hub go with --hub_dir")
  if _OUT.value:
    cli.check_output_folder(_OUT.value, "out")
    run_exports.export_latest(_WORKDIR.value, _OUT.value, _PRETRAINED.value, _FORMAT.value)
    return
  cli.check_output_folder(_HUB_DIR.value, "hub_dir")
  if _PUSH.value:
    hub.check_repo_id(_PUSH.value)
  hub.write_folder(
    _HUB_DIR.value,
    _WORKDIR.value,
    _PRETRAINED.value,
    report_path=_REPORT.value,
    license_id=_LICENSE.value,
    with_reference=_FORMAT.value == "reference",
  )
  if _PUSH.value:
    print(f"uploaded: {hub.push(_HUB_DIR.value, _PUSH.value)}")


if __name__ == "__main__":
  cli.run(main, output_flags=("out", "hub_dir"))

"""A training run as the commands make it (main.py, population_runs.py, the quickstart notebook): train.run with the
run's exports (run_exports.RunExports), then the report its config asks for (`report.kind`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.evals import report_kinds
from advunlearn_jax.training import config_validation, distributed, run_exports, stages, train
from advunlearn_jax.unlearn import wiring


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  sections: wiring.TrainingSections | None = None,
  devices: list | None = None,
  preemption: train.PreemptionWatcher | None = None,
  show_progress: bool = True,
) -> dict[str, Any]:
  """train.run's summary, with `workdir/text_encoder` (or `unet`) and `workdir/pipeline` exported, and the
  summary of the report (`report`) when the config asks for one. A run stopped by SIGTERM returns
  {"stopped_at", "workdir", "signal"} and writes no report. The run uses the typed `sections` that
  config_validation.validate(config) built: a caller that checked the config before any work (main, population,
  the notebook) hands them over; without them the whole config is checked here, once either way."""
  if sections is None:
    sections = config_validation.validate(config)
  if config.stereo.enabled:  # STEREO's own two stages (training/stereo_runs.py), then the same report
    train.check_sdxl_run(config, sd_convert.resolve_pretrained(config.model.pretrained))
    from advunlearn_jax.training import stereo_runs

    return _with_report(config, workdir, stereo_runs.run(config, workdir, show_progress=show_progress))
  kwargs = dict(devices=devices, preemption=preemption, show_progress=show_progress)
  if config.first_stage:  # two runs (training/stages.py), then the recipe's report against model.pretrained
    second = stages.second_stage_config(config)
    if not stages.second_stage_begun(second, workdir):
      first_dir = stages.first_stage_dir(workdir)
      distributed.announce(f"first stage ({', '.join(config.first_stage)}) in {first_dir}")
      first = run(stages.first_stage_config(config), first_dir, **kwargs)
      if "stopped_at" in first:
        return first
      distributed.sync("first_stage_exported")  # process 0 exported it; every process loads it next
    distributed.announce(f"second stage over {stages.base_root(config, workdir)}")
    result = _trained(second, workdir, sections, **kwargs)
  else:
    result = _trained(config, workdir, sections, **kwargs)
  if "stopped_at" in result or not distributed.is_primary():
    return result
  return _with_report(config, workdir, result)


def _trained(config: ml_collections.ConfigDict, workdir: str, sections: wiring.TrainingSections, **kwargs) -> dict:
  export = run_exports.RunExports(config, workdir, enabled=distributed.is_primary())
  return train.run(config, workdir, sections=sections, export=export, **kwargs)


def _with_report(config: ml_collections.ConfigDict, workdir: str, result: dict[str, Any]) -> dict[str, Any]:
  report = report_kinds.named(config.report.kind).after_run(config, workdir, result["pipeline"])
  return {**result, "report": report["summary"]} if report else result

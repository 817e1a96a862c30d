"""The reports `report.kind` names, one object each behind one interface: what a finished training run writes
beside its exports (`after_run`, training/runs.py) and what an evaluation adds to its utility numbers (`utility`,
evals/utility.py). The tiny world's is the one kind today; "" asks for none. Nothing else compares kind names.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.pipeline_record import Pipeline
from advunlearn_jax.tiny import report as tiny_report


class NoReport:
  """`report.kind = ""`."""

  name = ""

  @staticmethod
  def after_run(config: ml_collections.ConfigDict, workdir: str, pipeline_dir: str) -> dict | None:
    del config, workdir, pipeline_dir
    return None

  @staticmethod
  def utility(config: ml_collections.ConfigDict, original_dir: str, target: Pipeline, out_dir: str) -> dict:
    del config, original_dir, target, out_dir
    return {}


class TinyWorld:
  """The judge's recognition of the erased and the retained tiny-world values, before and after (tiny/report.py),
  on `report.images_per_value` images per value from seed `seed + 1`."""

  name = "tiny_world"

  @staticmethod
  def _write(config: ml_collections.ConfigDict, out_dir: str, original: str, unlearned: str | Pipeline) -> dict:
    return tiny_report.write(
      out_dir,
      original,
      unlearned,
      config.concept.prompts,
      per_value=config.report.images_per_value,
      seed=config.seed + 1,
      erased_values=config.report.erased,
    )

  @staticmethod
  def after_run(config: ml_collections.ConfigDict, workdir: str, pipeline_dir: str) -> dict:
    """Into `workdir/report`, against the run's base model."""
    report_dir = os.path.join(workdir, "report")
    original = sd_convert.resolve_pretrained(config.model.pretrained)
    results = TinyWorld._write(config, report_dir, original, pipeline_dir)
    s = results["summary"]
    print(
      f"{workdir}: erased concept recognised {s['erased_before']:.0%} -> {s['erased_after']:.0%}; "
      f"retained {s['retained_before']:.0%} -> {s['retained_after']:.0%}; report in {report_dir}/report.md"
    )
    return results

  @staticmethod
  def utility(config: ml_collections.ConfigDict, original_dir: str, target: Pipeline, out_dir: str) -> dict:
    """Into `out_dir/tiny_world`; the summary's rates as `tiny_world_*` utility numbers."""
    results = TinyWorld._write(config, os.path.join(out_dir, "tiny_world"), original_dir, target)
    return {f"tiny_world_{k}": v for k, v in results["summary"].items()}


KINDS: dict[str, Any] = {k.name: k for k in (NoReport, TinyWorld)}


def named(kind: str):
  """The report `report.kind` names."""
  if kind not in KINDS:
    raise ConfigError(f"config.report.kind is {kind!r}; valid: {list(KINDS)}")
  return KINDS[kind]

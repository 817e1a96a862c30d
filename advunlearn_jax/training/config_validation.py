"""A whole run config checked before any work: each section's typed settings built, and so validated, by the module
that owns them (`wiring.TrainingSections`: the method, attack, bank and retain sections; the evaluation
attack's `settings`), plus the checks that tie sections together. So a typo is one message naming its key before
weights load or anything compiles (main, population for every member before the first trains, evaluate, export).
"""

from __future__ import annotations

import importlib.util

import ml_collections

from advunlearn_jax import config_lib
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import concept_words, tfds_source
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import attacks, caption_images, fid, inversion, report_kinds
from advunlearn_jax.training import stages
from advunlearn_jax.unlearn import attack as attack_lib
from advunlearn_jax.unlearn import prompts, retain, threats, trainable, wiring


def validate(config: ml_collections.ConfigDict) -> wiring.TrainingSections:
  """Every check a config can fail without loading weights, each naming its key; the typed training sections
  it built, which the trainer uses as they are."""
  config_lib.check_finite(config)  # first: NaN slips through every comparison below
  if not config.concept.prompts or any(not str(p).strip() for p in config.concept.prompts):
    raise ConfigError("config.concept.prompts: needs at least one non-empty concept, e.g. ['nudity']")
  sd_convert.check_pretrained(config.model.pretrained)
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype is {config.model.dtype!r}; expected 'float32' or 'bfloat16'")
  config_lib.check_ranges(config)
  t = config.train
  sections = wiring.TrainingSections.from_config(config)
  attacks.settings(config)
  if t.rollout_buckets < 0 or t.rollout_rows_per_call < -1:
    raise ConfigError(
      "config.train.rollout_buckets must be >= 0 (0: 8) and config.train.rollout_rows_per_call >= -1 (0: buckets, "
      f"-1: the measured default), got {t.rollout_buckets} and {t.rollout_rows_per_call}"
    )
  members = threats.member_configs(config)
  for threat in (config, *members):
    attack_lib.AttackConfig.from_config(threat.attack)
    _check_threat_model(threat)
  types = {threat.attack.type for threat in members or [config]}  # with a mix, its members alone attack
  mixed_places = len(types) > 1 and not types <= {"prefix_k", "replace_k"}  # the layouts that hold delta at 1..k
  if config.attack.init == "latest" and config.attack.latest_init_quirk and ("word_k" in types or mixed_places):
    # The reference's quirk is kept for its own layouts alone; on word_k, or across a mix, it would carry words.
    raise ConfigError(
      f"config.attack.init='latest' with config.attack.latest_init_quirk=True starts each round from positions 1..k "
      f"of the last sequence, which attack types {sorted(types)} do not all hold the adversarial rows in; set "
      "config.attack.latest_init_quirk=False to carry the rows themselves"
    )
  if config.attack.restart_every and config.attack.init != "latest":
    raise ConfigError(
      f"config.attack.restart_every={config.attack.restart_every} restarts a persistent attack; it needs "
      f"config.attack.init='latest' (got {config.attack.init!r}), else every round starts from random rows already"
    )
  _check_retain(config)
  _check_export(config, sections.trained)
  report_kinds.named(config.report.kind)
  _check_utility(config.evaluation)
  first = stages.first_stage_config(config)
  if first is not None:  # its model is this config's, so it is checked whole; the second stage differs in the model
    try:
      validate(first)
    except ConfigError as e:
      raise ConfigError(f"config.first_stage: {e}") from None
  return sections


def _check_threat_model(config: ml_collections.ConfigDict) -> None:
  """What the attack section (or an attack.mix member) needs beyond its values: the concept's words in every concept
  prompt for word_k, the concept's images for the inversion objective."""
  if config.attack.type not in prompts.ATTACK_TYPES:
    raise ConfigError(f"config.attack.type is {config.attack.type!r}; valid: {list(prompts.ATTACK_TYPES)}")
  if config.attack.type == "word_k":
    _check_word_place(config)
  if config.attack.objective != "esd" and not (config.attack.images or config.evaluation.inversion.images):
    raise ConfigError(
      f"config.attack.objective={config.attack.objective!r} attacks with images of the concept; name them in "
      "config.attack.images (tiny_world:VALUE, a folder, tfds:...; on SD, images the unerased model generated with "
      "advunlearn_jax.generate)"
    )
  if config.attack.objective != "esd":
    key = "attack.images" if config.attack.images else "evaluation.inversion.images"
    inversion.check_image_source(config.attack.images or config.evaluation.inversion.images, key)


def _check_word_place(config: ml_collections.ConfigDict) -> None:
  """attack.type=word_k: every concept prompt names the concept, where the adversarial tokens go."""
  words = wiring.attack_words(config)
  for prompt in config.concept.prompts:
    if len(concept_words.split(str(prompt), words)[0]) == 1:
      raise ConfigError(
        f"config.concept.prompts: {str(prompt)[:80]!r} holds none of config.attack.words {list(words)}, where "
        "attack.type=word_k puts the adversarial tokens"
      )


def _check_retain(config: ml_collections.ConfigDict) -> None:
  n_retain = len(retain.from_config(config))
  if config.retain.batch > n_retain:
    raise ConfigError(f"config.retain.batch ({config.retain.batch}) exceeds the {n_retain} retain prompts")
  if config.bank.refresh_retain > n_retain:
    raise ConfigError(
      f"config.bank.refresh_retain ({config.bank.refresh_retain}) exceeds the {n_retain} retain prompts"
    )


def _check_export(config: ml_collections.ConfigDict, trained: trainable.Trained) -> None:
  if not config.export.reference_checkpoint:
    return
  if config.first_stage:
    raise ConfigError(
      "config.export.reference_checkpoint: a two-stage run (config.first_stage) trains its text encoder over its "
      "first stage's UNet; the reference's TextEncoder-*.pt would hold the encoder without it"
    )
  if trained.tower != "text_encoder":
    raise ConfigError(
      f"config.export.reference_checkpoint: train.method={config.train.method!r} trains the UNet; the reference's "
      "TextEncoder-*.pt layout holds a text encoder"
    )
  if importlib.util.find_spec("torch") is None:
    raise ConfigError(
      "config.export.reference_checkpoint: writing the reference's .pt needs torch (pip install torch==2.13.0)"
    )


def _check_utility(ev: ml_collections.ConfigDict) -> None:
  if ev.fid not in fid.FEATURES:
    raise ConfigError(f"config.evaluation.fid is {ev.fid!r}; expected one of {list(fid.FEATURES)}")
  fid.check_preprocess(ev.fid_preprocess)
  if ev.utility_format not in caption_images.FORMATS:
    raise ConfigError(
      f"config.evaluation.utility_format is {ev.utility_format!r}; expected one of {list(caption_images.FORMATS)}"
    )
  for key in ("captions", "real_images"):
    if tfds_source.is_tfds(ev[key]):
      tfds_source.parse(ev[key], f"evaluation.{key}")

"""The step wired from a run config, once, for every caller (train.run, benchmarks, tests): its StepConfig, its
Models, its Frozen inputs, and the one jitted step.

`wire` takes the weights as arrays, so a test's tiny random models and a downloaded SD pipeline go the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from advunlearn_jax import sharding
from advunlearn_jax.diffusion import sdxl_conditioning
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from advunlearn_jax.models.pipeline_record import Pipeline, ScheduleConfig, SDXLPipeline
from advunlearn_jax.models.unet import UNet2DConditionModel, UNetConfig
from advunlearn_jax.unlearn import attack as attack_lib
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import frozen as frozen_lib
from advunlearn_jax.unlearn import retain as retain_lib
from advunlearn_jax.unlearn import step as step_lib
from advunlearn_jax.unlearn import trainable

# The one jitted step. `state` is donated: a caller that needs its input state afterwards passes a copy.
train_step = jax.jit(
  step_lib.train_step, static_argnames=("cfg", "models", "with_attack", "new_prompt"), donate_argnames=("state",)
)

# train.rollout_buckets = 0: bucket widths of the online rollout when it runs in buckets (rollout_rows_per_call=0).
ROLLOUT_BUCKETS = 8


def rollout_rows_per_call(latent_hw: int, backend: str | None = None) -> int:
  """train.rollout_rows_per_call = -1: the slots of the online rollout's continuous batching (ddim._slotted).

  16 slots (32 CFG rows per UNet call) by default: few rollout calls, nearly all rows useful, and one UNet batch
  width in the compiled step where 8 buckets put 8. On CPUs at 16x16 latents and up, where a UNet call costs
  about the same per row at any batch and least at a few rows, 4 slots. The measurements behind both choices are
  in the README ("Scaling out", "Speed of an iteration"), where benchmarks/iteration.py's reruns update them."""
  if (backend or jax.default_backend()) == "cpu" and latent_hw >= 16:
    return 4
  return 16


class TrainingSections(NamedTuple):
  """The training sections of a run config, typed and validated once: config_validation.validate builds them, the
  command hands them to `wire`. Each type is its section's, with the section's field names, built in the module that
  reads it; a new knob is a default in config_lib and a field there."""

  trained: trainable.Trained  # config.train.method
  attack: attack_lib.AttackConfig  # config.attack
  bank: bank_lib.BankConfig  # config.bank
  retain: retain_lib.RetainConfig  # config.retain

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> TrainingSections:
    trained = trainable.Trained.from_config(config.train)
    bank_lib.check_source(config.train.xt_source, trained)
    return cls(
      trained,
      attack_lib.AttackConfig.from_config(config.attack),
      bank_lib.BankConfig.from_config(config.bank),
      retain_lib.RetainConfig.from_config(config.retain),
    )


def step_config(
  config: ml_collections.ConfigDict, sections: TrainingSections, num_tokens: int, unet_config: UNetConfig
) -> step_lib.StepConfig:
  t = config.train
  return step_lib.StepConfig(
    lr=t.lr,
    negative_guidance=config.diffusion.negative_guidance,
    start_guidance=config.diffusion.start_guidance,
    concept_batch=t.concept_batch,
    retain=sections.retain,
    attack=sections.attack,
    num_tokens=num_tokens,
    latent_hw=unet_config.sample_size,
    latent_channels=unet_config.in_channels,
    xt_source=t.xt_source,
    rollout_buckets=t.rollout_buckets or ROLLOUT_BUCKETS,
    rollout_rows_per_call=(
      t.rollout_rows_per_call if t.rollout_rows_per_call >= 0 else rollout_rows_per_call(unet_config.sample_size)
    ),
    bank=sections.bank,
  )


def attack_words(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The concept's words where attack.type=word_k puts the adversarial tokens: attack.words, else the words CCE's
  token replaces at test time (evaluation.inversion.words), else the concept prompts themselves."""
  for words in (config.attack.words, config.evaluation.inversion.words, config.concept.prompts):
    if any(str(w).strip() for w in words):
      return tuple(str(w) for w in words if str(w).strip())
  return ()


class Wiring(NamedTuple):
  cfg: step_lib.StepConfig
  models: step_lib.Models
  frozen: step_lib.Frozen  # on the mesh when one was given
  trained_parameters: int


def wire(
  config: ml_collections.ConfigDict,
  sections: TrainingSections,
  *,
  clip_config: CLIPTextConfig,
  clip_params: Any,
  unet_config: UNetConfig,
  unet_params: Any,
  schedule: ScheduleConfig,
  tokenizer,
  retain_prompts: Sequence[str],
  mesh: Mesh | None = None,
  concept_latents=None,
  sdxl: step_lib.SDXLText | None = None,
  encoder: tuple | None = None,
) -> Wiring:
  """Everything the step reads, from a run config, its typed sections (config_validation.validate's) and the original
  weights.

  With a `mesh`, the frozen weights are laid out on it (sharded as the mesh's fsdp axis says) and the rest of
  Frozen replicated; without one they stay where they are (one device). `concept_latents`: the concept's images
  as scaled VAE latents, for attack.objective inversion/both (train.concept_latents). `sdxl` and `encoder` ((encode,
  uncond) for frozen.build): SDXL's, given by `wire_sdxl`."""
  encode, uncond = encoder or (None, None)
  frozen, num_tokens = frozen_lib.build(
    clip_config=clip_config,
    clip_params=clip_params,
    unet_params=unet_params,
    tokenizer=tokenizer,
    concepts=list(config.concept.prompts),
    retain_prompts=retain_prompts,
    attack_type=config.attack.type,
    num_tokens=config.attack.num_tokens,
    faithful_word_split=config.attack.faithful_word_split,
    schedule=schedule,
    words=attack_words(config),
    concept_latents=concept_latents,
    ddim_steps=config.diffusion.ddim_steps,
    encode=encode,
    uncond=uncond,
  )
  trained = sections.trained
  tower_params = trained.of(clip_params, unet_params)
  mask = trained.mask(tower_params)
  dtype = jnp.dtype(config.model.dtype)
  models = step_lib.Models(
    CLIPTextModel(clip_config, dtype=dtype),
    UNet2DConditionModel(unet_config, dtype=dtype, remat_policy=config.model.remat),
    trained,
    trainable.selected_paths(mask),
    mesh,
    sdxl,
  )
  frozen = frozen_lib.store_for_compute(frozen, models)
  if mesh is not None:
    frozen = lay_out_frozen(frozen, mesh)
  return Wiring(
    step_config(config, sections, num_tokens, unet_config), models, frozen, trainable.count(tower_params, mask)
  )


def wire_pipeline(
  config: ml_collections.ConfigDict, sections: TrainingSections, pipe: Pipeline | SDXLPipeline, **inputs
) -> Wiring:
  """`wire` from a pipeline's weights (convert/diffusers' records); `inputs` are wire's keyword arguments past the
  weights (tokenizer, retain_prompts, mesh, ...). An SDXL record only through `wire_sdxl`, which adds its own."""
  if isinstance(pipe, SDXLPipeline) and "sdxl" not in inputs:
    raise TypeError("wire_pipeline: an SDXL pipeline is wired by wire_sdxl (it adds tower 2 and the encoder)")
  return wire(
    config,
    sections,
    clip_config=pipe.text_config,
    clip_params=pipe.text_tree,
    unet_config=pipe.unet_config,
    unet_params=pipe.unet_params,
    schedule=pipe.schedule,
    **inputs,
  )


def check_sdxl_attack(config: ml_collections.ConfigDict) -> None:
  """The attack settings SDXL cannot take (ConfigError names the key)."""
  if config.attack.embedding != "word_embd":
    raise ConfigError(
      f"config.attack.embedding={config.attack.embedding!r}: SDXL supports 'word_embd' only (condition_embd's rows "
      "would live in the concatenated context of two towers and leave the pooled embedding clean)"
    )


def wire_sdxl(
  config: ml_collections.ConfigDict,
  sections: TrainingSections,
  pipe: SDXLPipeline,
  *,
  tokenizer,
  tokenizer_2,
  retain_prompts: Sequence[str],
  mesh: Mesh | None = None,
  concept_latents=None,
) -> Wiring:
  """`wire` for an SDXL pipeline (convert/diffusers.load_sdxl_pipeline's): both text towers in the step, the
  conditioning an SDXLCond wherever SD's is a context array (step.SDXLText says how one adversarial prompt drives
  both towers), train.method choosing tower 1, tower 2 or both (trainable.SDXL_TEXT_METHODS)."""
  check_sdxl_attack(config)
  pad_id_2 = int(tokenizer_2.pad_token_id)
  prompts = [str(c).strip() for c in config.concept.prompts] + list(retain_prompts)
  frozen_lib.check_tower_2_ids(tokenizer, tokenizer_2, prompts, pad_id_2)
  time_ids = sdxl_conditioning.time_id_row(pipe)
  dtype = jnp.dtype(config.model.dtype)
  return wire_pipeline(
    config,
    sections,
    pipe,
    tokenizer=tokenizer,
    retain_prompts=retain_prompts,
    mesh=mesh,
    concept_latents=concept_latents,
    sdxl=step_lib.SDXLText(CLIPTextModelWithProjection(pipe.text_config_2, dtype=dtype), time_ids, pad_id_2),
    encoder=frozen_lib.sdxl_encoder(pipe, tokenizer_2, pad_id_2),
  )


def threat(member: ml_collections.ConfigDict, wired: Wiring, tokenizer, mesh: Mesh | None = None) -> tuple:
  """(StepConfig, Frozen) of one attack.mix member (unlearn/threats.py): the run's, with the member's attack
  settings and its concept prompts' layouts; the frozen weights and encodings are the run's own arrays."""
  a = member.attack
  concepts = [str(c).strip() for c in member.concept.prompts]
  words = attack_words(member)
  word_index, delta_index, k = frozen_lib.layout_maps(
    tokenizer, concepts, a.type, a.num_tokens, a.faithful_word_split, words
  )
  assert k == wired.cfg.num_tokens, (k, wired.cfg.num_tokens)  # threats.MIXABLE keeps k the run's
  maps = {"word_index": jnp.asarray(word_index), "delta_index": jnp.asarray(delta_index)}
  if mesh is not None:
    maps = sharding.replicate(maps, mesh)
  cfg = dataclasses.replace(wired.cfg, attack=attack_lib.AttackConfig.from_config(a))
  return cfg, wired.frozen._replace(**maps)


def _placed(tree: Any, mesh: Mesh, sharded: bool, abstract: bool) -> Any:
  if abstract:
    return sharding.abstract(tree, mesh, sharded)
  return sharding.shard_params(tree, mesh) if sharded else sharding.replicate(tree, mesh)


def lay_out_frozen(frozen: step_lib.Frozen, mesh: Mesh, abstract: bool = False) -> step_lib.Frozen:
  """The trainer's layout of Frozen, the one every caller uses: the frozen towers by sharding.param_spec (split
  over fsdp), the prompts' embeddings and the DDIM tables replicated. `abstract`: shapes with their shardings and
  no data, the inputs of an ahead-of-time compile for devices this host need not have (benchmarks/iteration.py)."""
  towers = {k: _placed(getattr(frozen, k), mesh, True, abstract) for k in ("unet", "clip")}
  return _placed(frozen._replace(unet=None, clip=None), mesh, False, abstract)._replace(**towers)


def lay_out_state(state: step_lib.TrainState, mesh: Mesh, abstract: bool = False) -> step_lib.TrainState:
  """The training state's layout: parameters, Adam moments and the rest by sharding.param_spec, the bank (if any)
  replicated: every device samples from all of it."""
  bank = None if state.bank is None else _placed(state.bank, mesh, False, abstract)
  return _placed(state._replace(bank=None), mesh, True, abstract)._replace(bank=bank)

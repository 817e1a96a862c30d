"""One way to set a setting: a "section.field=value" string means the same through the command line, --sweep and
config_lib.override (ml_collections' own parser behind all three), and the typed sections built from a config
carry no default of their own, so config_lib.base_config() is the only place a default lives."""

import dataclasses
import os

import pytest
from absl import flags
from ml_collections import config_flags

from advunlearn_jax import cli, config_lib
from advunlearn_jax.configs import tiny
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import inversion, mma, p4d, ring_a_bell, unlearndiff
from advunlearn_jax.models.unet import UNetConfig
from advunlearn_jax.training import population_runs
from advunlearn_jax.unlearn import attack, bank, retain, step, trainable, wiring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A float, an int, a bool, one-element tuples (one quoted, as a value with a space must be), an empty string and
# a field two sections deep. No commas: --sweep splits its values at them.
OVERRIDES = [
  "train.lr=3e-5",
  "seed=3",
  "train.prefix_bug=true",
  "report.erased=striped",
  "evaluation.prompts='a photo of a red triangle'",
  "report.kind=",
  "evaluation.inversion.placement=prefix",
]


def _command_line(items, monkeypatch, capsys):
  """(the config, the error line) `main`'s flags give for --config=configs/tiny.py --config.ITEM...: the CLI's own
  parsing (cli._parse_flags, over a fresh FlagValues holding main's --config flag)."""
  values = flags.FlagValues()
  argv = ["main", "--config=configs/tiny.py", *(f"--config.{item}" for item in items)]
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
  monkeypatch.setattr(flags, "FLAGS", values)
  monkeypatch.chdir(ROOT)
  try:
    cli._parse_flags(argv)
  except SystemExit:
    return None, capsys.readouterr().err.strip()
  return values.config, ""


def test_the_same_override_gives_the_same_config_through_the_command_line_a_sweep_and_the_helper(monkeypatch, capsys):
  by_helper = config_lib.override(tiny.get_config(), OVERRIDES)
  by_command_line, _ = _command_line(OVERRIDES, monkeypatch, capsys)
  (member,) = population_runs.members(os.path.join(ROOT, "configs", "tiny.py"), OVERRIDES)  # single-valued sweeps
  assert by_helper.to_dict() == by_command_line.to_dict() == member.config.to_dict()
  # Each override changed its field, typed as the field is.
  assert (by_helper.train.lr, by_helper.seed, by_helper.train.prefix_bug) == (3e-5, 3, True)
  assert by_helper.report.erased == ("striped",) and by_helper.report.kind == ""
  assert by_helper.evaluation.prompts == ("a photo of a red triangle",)
  assert by_helper.evaluation.inversion.placement == "prefix"
  # A tuple literal, and the last of two values for one field, as on the command line.
  again = config_lib.override(by_helper, ["evaluation.prompts=('a', 'b')", "train.lr=1e-4", "train.lr=2e-4"])
  assert again.evaluation.prompts == ("a", "b") and again.train.lr == 2e-4 and by_helper.train.lr == 3e-5


@pytest.mark.parametrize(
  "item, message",
  [
    ("train.lrr=1", 'train.lrr: the config has no field \'lrr\'. Did you mean "lr" instead of "lrr"?'),
    ("seed=zero", "seed=zero: invalid literal for int() with base 10: 'zero'"),
    ("train.prefix_bug=maybe", "train.prefix_bug=maybe: Non-boolean argument to boolean flag"),
    ("evaluation.attack.k=5", "evaluation.attack.k: config.evaluation.attack is 'unlearndiff', not a section"),
  ],
)
def test_a_bad_override_names_itself_alike_through_the_helper_and_the_command_line(item, message, monkeypatch, capsys):
  with pytest.raises(ConfigError) as helper:
    config_lib.override(tiny.get_config(), ["train.lr=3e-5", item])
  assert str(helper.value) == f"config.{message}"
  with pytest.raises(ConfigError) as swept:
    config_lib.override(tiny.get_config(), [item], where="--sweep=")
  assert str(swept.value) == f"--sweep={message}"
  _, error = _command_line(["train.lr=3e-5", item], monkeypatch, capsys)
  assert error == f"error: --config.{message}"


def _no_defaults(cls) -> bool:
  if dataclasses.is_dataclass(cls):
    missing = dataclasses.MISSING
    return all(f.default is missing and f.default_factory is missing for f in dataclasses.fields(cls))
  return cls._field_defaults == {}


def _fields(settings) -> dict:
  """A typed section's fields by name (one level: a section inside it stays itself)."""
  if dataclasses.is_dataclass(settings):
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
  return settings._asdict()


def test_typed_sections_have_no_defaults_and_hold_the_base_configs_values():
  """Each typed section built from config_lib.base_config() holds, field by field, the base config's value of the
  same name (or of the name the mapping below gives), and none of them has a default that could disagree."""
  base = config_lib.override(config_lib.base_config(), ["evaluation.inversion.cce.initializer=art"])
  sections = wiring.TrainingSections.from_config(base)
  unet = UNetConfig(sample_size=8, in_channels=4)
  cfg = wiring.step_config(base, sections, 2, unet)
  for cls in (step.StepConfig, attack.AttackConfig, bank.BankConfig, retain.RetainConfig, trainable.Trained):
    assert _no_defaults(cls), cls
  for cls in (unlearndiff.UnlearnDiffConfig, inversion.InversionConfig, wiring.TrainingSections):
    assert _no_defaults(cls), cls

  for settings, section in (
    (sections.attack, base.attack),
    (sections.bank, base.bank),
    (sections.retain, base.retain),
    (sections.trained, base.train),
  ):
    assert _fields(settings) == {name: section[name] for name in _fields(settings)}, type(settings)

  ev = base.evaluation
  ud = unlearndiff.UnlearnDiffConfig.from_config(ev)
  assert _fields(ud) == {
    **{name: ev.unlearndiff[name] for name in ud._fields if name != "latents"},
    "latents": ev.latents,
  }

  for protocol in ("cce", "prefix"):
    config = config_lib.override(base, [f"evaluation.inversion.protocol={protocol}"])
    inv, section = inversion.InversionConfig.from_config(config), config.evaluation.inversion
    own = dict(section[protocol])
    if protocol == "cce":
      own.update(max_images=own.pop("num_train_images"), tokens=inversion.CCE_TOKENS)
    expected = {**dict(section.cce), **own, "protocol": protocol, "placement": section.placement}
    expected.update(words=tuple(section.words or config.concept.prompts), budgets=tuple(config.evaluation.budgets))
    expected.update(scheduler=section.scheduler, sample_steps=section.sample_steps, latents=config.evaluation.latents)
    expected.update(learned=section.learned, train_timesteps=0)  # the whole schedule: no key; STEREO's rounds set 999
    assert _fields(inv) == {name: expected[name] for name in inv._fields}, protocol

  # issue 48's attacks: their sections field for field (P4D's also carries the shared budgets)
  ev = config_lib.override(base, ["evaluation.ring_a_bell.vector=tiny_world:triangle", "evaluation.p4d.selector=judge"])
  ev = ev.evaluation
  for settings, section in (
    (ring_a_bell.RingABellConfig.from_config(ev), ev.ring_a_bell),
    (p4d.P4DConfig.from_config(ev), ev.p4d),
    (mma.MMAConfig.from_config(ev), ev.mma),
  ):
    assert _no_defaults(type(settings)), type(settings)
    shared = {"latents": ev.latents, "budgets": tuple(ev.budgets)}
    assert _fields(settings) == {n: shared[n] if n in shared else section[n] for n in _fields(settings)}

  t = base.train
  assert _fields(cfg) == {
    "lr": t.lr,
    "negative_guidance": base.diffusion.negative_guidance,
    "start_guidance": base.diffusion.start_guidance,
    "concept_batch": t.concept_batch,
    "retain": sections.retain,
    "attack": sections.attack,
    "num_tokens": 2,  # the models': the longest concept's token count
    "latent_hw": 8,
    "latent_channels": 4,
    "xt_source": t.xt_source,
    "rollout_buckets": t.rollout_buckets or wiring.ROLLOUT_BUCKETS,  # 0: the default width
    "rollout_rows_per_call": wiring.rollout_rows_per_call(8),  # -1: the measured default for these latents
    "bank": sections.bank,
  }
  assert (t.rollout_buckets, t.rollout_rows_per_call) == (0, -1)  # the two sentinels the wiring resolves


@pytest.mark.parametrize("base", ["nudity", "style", "object"])
def test_the_sd_recipe_is_its_configs_first_stage_and_the_config_itself(base):
  """configs/robust.py: the SD config as it stands over an ESD first stage (no attack), both stages valid."""
  import importlib

  from advunlearn_jax.configs import robust
  from advunlearn_jax.training import config_validation, stages

  recipe = robust.get_config(base)
  config_validation.validate(recipe)
  plain = importlib.import_module(f"advunlearn_jax.configs.{base}").get_config()
  second = config_lib.flatten(stages.second_stage_config(recipe).to_dict())
  assert {k: v for k, v in second.items() if k != "first_stage"} == {
    k: v for k, v in config_lib.flatten(plain.to_dict()).items() if k not in ("first_stage", "report.kind")
  } | {"report.kind": ""}
  first = stages.first_stage_config(recipe)
  assert (first.train.method, first.train.lr, first.retain.weight) == ("noxattn", 3e-6, plain.retain.weight)
  assert first.train.warmup_iters >= first.train.iterations  # ESD + retain: the attack never runs

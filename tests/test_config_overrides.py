"""One way to set a setting: a "section.field=value" string means the same through the command line, --sweep and
config_lib.override (ml_collections' own parser behind all three)."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from advunlearn_jax import cli, config_lib
from advunlearn_jax.configs import tiny
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.training import population_runs

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

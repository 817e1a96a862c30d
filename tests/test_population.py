"""Population runs: members from sweeps, device groups, and a population equal to its members run alone."""

import os

import jax
import numpy as np
import pytest

from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.testing import tiny_models
from advunlearn_jax.training import population_runs, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_members_are_the_grid_of_sweeps():
  members = population_runs.members(
    TINY, ["config_arg=triangle,striped", "seed=0,1", "train.lr=1e-3", "attack.init=latest"]
  )
  assert [m.name for m in members] == [  # named by what varies
    "config_arg=triangle,seed=0",
    "config_arg=triangle,seed=1",
    "config_arg=striped,seed=0",
    "config_arg=striped,seed=1",
  ]
  assert [m.config.report.erased for m in members] == [("triangle",)] * 2 + [("striped",)] * 2
  assert [m.config.seed for m in members] == [0, 1, 0, 1]
  assert {m.config.train.lr for m in members} == {1e-3} and members[0].config.attack.init == "latest"
  # A tuple field takes one element per member, quoted when it holds a space, as on the command line.
  style = os.path.join(ROOT, "configs", "style.py")
  base = population_runs.members(style, ["concept.prompts='Van Gogh','Claude Monet'"])
  assert [m.config.concept.prompts for m in base] == [("Van Gogh",), ("Claude Monet",)]
  assert [m.name for m in base] == ["concept.prompts=Van_Gogh", "concept.prompts=Claude_Monet"]
  with pytest.raises(ConfigError, match="--sweep=concept.prompts=Van Gogh: .* use quotes"):
    population_runs.members(style, ["concept.prompts=Van Gogh,Claude Monet"])


def test_command_line_overrides_reach_every_member():
  """--config.KEY=VALUE (config_flags' overrides) applies to every member, under the sweeps."""
  members = population_runs.members(
    f"{TINY}:striped", ["seed=0,1", "train.iterations=7"], {"train.lr": 3e-4, "seed": 9}
  )
  assert [(m.config.train.lr, m.config.seed, m.config.train.iterations) for m in members] == [
    (3e-4, 0, 7),
    (3e-4, 1, 7),
  ]
  assert {m.config.report.erased for m in members} == {("striped",)}


@pytest.mark.parametrize(
  "sweeps, message",
  [
    (["seed"], "expected KEY=V1,V2"),
    (["seed=0,,1"], "expected KEY=V1,V2"),
    (["seed=0", "seed=1"], "appears twice"),
    (["train.lrr=1e-3"], "--sweep=train.lrr: the config has no field 'lrr'"),
    (["trian.lr=1e-3"], "--sweep=trian.lr: the config has no field 'trian'"),
    (["seed=zero"], "--sweep=seed=zero: invalid literal for int"),
    (["train.prefix_bug=maybe"], "--sweep=train.prefix_bug=maybe: Non-boolean argument to boolean flag$"),
    (["retain.mode=sometimes"], "config.retain.mode"),
    # The whole validation runs for every member before any trains: a bad value in the second member stops the
    # population at once, not after the first member has trained.
    (["train.xt_source=bank,batched"], "config.train.xt_source is 'batched'"),
    (["bank.refresh_every=1,0"], "config.bank.refresh_every must be >= 1"),
  ],
)
def test_bad_sweeps(sweeps, message):
  with pytest.raises(ConfigError, match=message):
    population_runs.members(TINY, sweeps)


def test_device_groups():
  devices = jax.devices()
  assert [len(g) for g in population_runs.device_groups(4, devices=devices)] == [2, 2, 2, 2]
  assert [len(g) for g in population_runs.device_groups(3, devices=devices)] == [2, 2, 2, 2]  # a queue over 4 groups
  assert [len(g) for g in population_runs.device_groups(16, devices=devices)] == [1] * 8
  assert population_runs.device_groups(2, 4, devices=devices) == [devices[:4], devices[4:]]
  with pytest.raises(ConfigError, match="does not divide the 8 devices"):
    population_runs.device_groups(2, 3, devices=devices)
  with pytest.raises(ConfigError, match="does not exist"):
    population_runs.members("configs/nope.py", [])


def test_hosts_split_the_members():
  grid = population_runs.members(TINY, ["config_arg=triangle,striped", "seed=0,1,2"])
  parts = [population_runs.select_part(grid, i, 4) for i in range(4)]
  assert [len(p) for p in parts] == [2, 2, 1, 1]
  assert sorted(m.name for p in parts for m in p) == sorted(m.name for m in grid)  # each member exactly once
  assert population_runs.select_part(grid, 0, 1) == grid
  for part, parts in ((4, 4), (-1, 2), (0, 0)):
    with pytest.raises(ConfigError, match="0 <= part < parts"):
      population_runs.select_part(grid, part, parts)


def _encoder(workdir):
  return weights_io.read_safetensors(os.path.join(workdir, "text_encoder", "model.safetensors"))


@pytest.mark.slow
def test_population_equals_its_members_run_one_at_a_time(tmp_path):
  pipe = tiny_models.write_pipeline(str(tmp_path / "pipe"))
  fixed = [
    f"model.pretrained={pipe}",
    "train.iterations=3",
    "train.warmup_iters=0",  # every iteration attacks: one compiled step per run
    "train.xt_source=online",
    "attack.steps=3",
    "samples.every=0",
    "report.kind=",
  ]
  members = population_runs.members(TINY, ["config_arg=triangle,striped", "seed=0,1", *fixed])[1:3]
  results = population_runs.run(members, str(tmp_path / "grid"))  # 2 members x 4 of the 8 devices, concurrently
  assert all("error" not in r for r in results.values()), results
  assert os.path.isfile(tmp_path / "grid" / "population.json")
  encoders = {m.name: _encoder(tmp_path / "grid" / m.name) for m in members}
  # Alone means as many devices (a data-parallel mean over 4 shards sums in another order than over 8), on the
  # group the other member had. One member stands for both: each solo run costs a full compile on 2 cores.
  member, group = members[1], population_runs.device_groups(len(members))[0]
  alone = str(tmp_path / "alone" / member.name)
  runs.run(member.config, alone, devices=group, show_progress=False)
  together, by_itself = encoders[member.name], _encoder(alone)
  assert max(float(np.max(np.abs(together[k] - by_itself[k]))) for k in by_itself) <= 1e-6
  # The members really differ (concept and seed), so the comparison above is not trivially true.
  names = [m.name for m in members]
  first = encoders[names[0]]
  for other in names[1:]:
    assert max(float(np.max(np.abs(first[k] - encoders[other][k]))) for k in first) > 1e-4

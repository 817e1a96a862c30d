"""Several threat models in one run (`attack.mix`): each attack round draws one of them.

A member is the run's attack section with a few fields overridden, written as the command line writes them
("type=word_k objective=inversion"; "" is the attack section as it stands). Every member keeps the run's k and
its state, so the rows a persistent attack carries pass from one threat model to the next. Each member compiles a
step of its own (its layout and objective are static); the host draws a member per round from the seed and the
round alone, so a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from advunlearn_jax import config_lib
from advunlearn_jax.errors import ConfigError

# What a member may set: whatever changes the search, not the shapes of the state it shares (num_tokens, `add`'s k,
# condition_embd's rows live in another space) nor the carrying (init, restart_every), which are the run's.
MIXABLE = ("type", "objective", "method", "steps", "lr")


def member_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The run's config as each member of attack.mix sees it; [] without a mix."""
  out = []
  for i, text in enumerate(config.attack.mix):
    items = str(text).split()
    for item in items:
      name, equals, _ = item.partition("=")
      if not equals or not name:  # "objective = inversion" splits into three items
        raise ConfigError(f"config.attack.mix[{i}] = {text!r}: {item!r} is no field=value (no spaces around '=')")
      if name not in MIXABLE:
        raise ConfigError(
          f"config.attack.mix[{i}] = {text!r}: {name!r} cannot differ between threat models; a member sets "
          f"{list(MIXABLE)}, each as field=value"
        )
    member = config_lib.override(config, [f"attack.{item}" for item in items], where=f"config.attack.mix[{i}]: ")
    if "add" in (member.attack.type, config.attack.type):  # the run's k would be add's, not attack.num_tokens
      raise ConfigError(f"config.attack.mix[{i}] = {text!r}: type=add sets k to the concept's length; mix it alone")
    try:  # the ranges the run's own section is held to (a member's lr=-1 would climb its loss)
      config_lib.check_finite(member)
      config_lib.check_ranges(member)
    except ConfigError as e:
      raise ConfigError(f"config.attack.mix[{i}] = {text!r}: {e}") from None
    out.append(member)
  return out


def draw(seed: int, attack_round: int, members: int) -> int:
  """Which member attack round `attack_round` uses: uniform, from the seed and the round alone."""
  return int(np.random.default_rng([seed, attack_round]).integers(members))

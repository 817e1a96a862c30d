"""The retain set: prompts whose images must not change, and their sampling without replacement per epoch.

Our default list is written for this project: everyday object names, templated as "a photo of {}". Users
with the reference's CSVs (columns `case_num, source, prompt`) pass `--config.retain.csv=FILE`; only the
`prompt` column is read.
"""

from __future__ import annotations

import csv
import os
from typing import NamedTuple

import numpy as np

from advunlearn_jax.errors import ConfigError

TEMPLATE = "a photo of {}"

OBJECTS = """
apple backpack ball balloon banana basket bed bench bicycle bird boat book bookshelf bottle bowl box bread
bridge broccoli bucket bus butterfly cake camera candle car carrot castle cat chair cheese clock cloud
computer cookie couch cow cup desk dog donkey door duck elephant envelope fence fire_hydrant flower fork
fountain frog giraffe glasses globe grapes guitar hammer hat helicopter horse house kettle key keyboard kite
ladder lamp laptop leaf lemon lighthouse lion mailbox map microphone mirror motorcycle mountain mouse mug
mushroom notebook orange owl paintbrush pan parrot pear pencil piano pillow pineapple pizza plate
potted_plant pumpkin rabbit radio refrigerator rock sailboat sandwich saxophone scissors sheep shoe
skateboard snowman sofa spoon squirrel staircase stool strawberry suitcase sunflower surfboard table
teapot teddy_bear telephone television tent tiger toaster tomato toothbrush tractor traffic_light train
tree truck turtle umbrella vase violin wagon wall_clock watch watermelon wheel window windmill zebra
airplane anchor barrel bell binoculars blender bowl_of_soup bulldozer cactus canoe carousel chess_board
coffee_maker compass crab crane cupcake dolphin drum dumbbell eagle fan feather fishing_rod flashlight
flute garden_hose goose hammock harp hedgehog helmet hot_air_balloon ice_cream jellyfish kangaroo kayak
koala ladybug lantern lawn_mower lobster magnifying_glass microwave oven padlock palm_tree panda peacock
penguin picnic_table pinecone pirate_ship pliers post_office printer rake raccoon rocking_chair ruler
scarecrow screwdriver seashell shovel skyscraper sled snail soccer_ball stapler starfish steam_engine
swan tablecloth tennis_racket tire toolbox trampoline trumpet tulip typewriter vacuum_cleaner
waffle wheelbarrow whistle wooden_spoon yacht
""".split()

DEFAULT_PROMPTS = tuple(TEMPLATE.format(name.replace("_", " ")) for name in OBJECTS)


def load_prompts(csv_path: str = "") -> list[str]:
  """The default list, or the `prompt` column of a reference-format CSV."""
  if not csv_path:
    return list(DEFAULT_PROMPTS)
  if not os.path.isfile(csv_path):
    raise ConfigError(f"config.retain.csv: {csv_path} not found")
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
      raise ConfigError(
        f"{csv_path}: no 'prompt' column (columns: {reader.fieldnames}); expected the reference format "
        "case_num,source,prompt"
      )
    prompts = [row["prompt"].strip() for row in reader if row.get("prompt", "").strip()]
  if not prompts:
    raise ConfigError(f"{csv_path}: the 'prompt' column is empty")
  return prompts


def from_config(config) -> list[str]:
  """The run's retain prompts: `retain.prompts` when given, else `load_prompts(retain.csv)`."""
  return list(config.retain.prompts) or load_prompts(config.retain.csv)


class SamplerState(NamedTuple):
  epoch: int
  cursor: int


def sample(state: SamplerState, n_prompts: int, batch: int, seed: int) -> tuple[np.ndarray, SamplerState]:
  """`batch` indices without replacement within an epoch; a new epoch (a fresh permutation) starts when fewer
  than `batch` unseen prompts remain, as the reference's PromptDataset. Deterministic in (seed, state)."""
  if batch > n_prompts:
    raise ConfigError(f"config.retain.batch ({batch}) exceeds the number of retain prompts ({n_prompts})")
  epoch, cursor = state
  if n_prompts - cursor < batch:
    epoch, cursor = epoch + 1, 0
  order = np.random.default_rng([seed, epoch]).permutation(n_prompts)
  return order[cursor : cursor + batch].astype(np.int32), SamplerState(epoch, cursor + batch)

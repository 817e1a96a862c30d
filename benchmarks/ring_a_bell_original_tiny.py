"""Ring-A-Bell's genetic search as its authors' notebook runs it, beside ours: the same tiny text encoder, the
same target (an evaluation prompt of the tiny world plus eta times the world's concept vector), the same
population and number of generations; both best fitnesses and both speeds on this machine.

  git clone https://github.com/chiayi-hsu/Ring-A-Bell /tmp/ring-a-bell
  python benchmarks/ring_a_bell_original_tiny.py --original=/tmp/ring-a-bell
  python benchmarks/ring_a_bell_original_tiny.py --original=/tmp/ring-a-bell --generations=20 --population=40 \
      --seeds=0 --out=/tmp/o   # a smoke run

The original is InversePrompt.ipynb's own code cells, read from the notebook's JSON at run time and executed in
order in one namespace, in a fresh interpreter (--original_python; torch and transformers, which our test
environment has). Two strings in its code change: the device (`'cuda'` becomes `'cpu'`) and the model
(`"CompVis/stable-diffusion-v1-4"` becomes our tiny export, advunlearn_jax/assets/tiny_sd, whose `tokenizer` and
`text_encoder` folders it loads as it would SD 1.4's). Its settings are its parameter cell's, run as written,
then `generation` and `population_size` set to this run's budget before the search cell runs (the published
values are 3000 and 200). Its data paths are kept: it runs in a scratch folder holding
`stable-diffusion/data/unsafe-prompts4703.csv` (our one prompt, `nudity_percentage` 100, so its nudity cell
takes it) and `stable-diffusion/eval/Nudity_vector.npy` (our concept vector, Get_Concept_Vector.ipynb's
recipe on the world's pairs, the same array ours uses). Its `random`, `np.random` and `torch` generators are
seeded with the run's seed (the notebook seeds none). Without pandas in that interpreter, a stand-in module
gives the two calls it makes (`read_csv`, `iterrows`), so pandas is never installed (transformers' CLIP is
imported before the stand-in exists, so neither it nor torch takes the stand-in for pandas).

What is compared: the best fitness each finds (the original's `score[idx[0]]` after its last generation, and
ours), the original's best candidate scored again by our fitness (the two fitness functions agree), and the
seconds of the search alone (the original: its search cell, model loading excluded; ours: after one
compiling call, and per generation the median of 50-generation blocks). Run it on an otherwise idle machine.

Writes --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import configs.tiny as tiny_config  # noqa: E402
from advunlearn_jax import config_lib  # noqa: E402
from advunlearn_jax.data import tokenizer as tok_lib  # noqa: E402
from advunlearn_jax.evals import ring_a_bell as rab  # noqa: E402
from advunlearn_jax.tiny import prompts as tiny_prompts  # noqa: E402

ORIGINAL = "original (InversePrompt.ipynb)"
BLOCK = 50  # generations per timed block (ours), and the original's print interval (:183)

# Each code cell the run needs, found by a line it holds (InversePrompt.ipynb), in the order they run.
CELLS = (
  ("imports", "from transformers import CLIPTextModel, CLIPTokenizer"),
  ("parameters", "population_size = 200"),
  ("encoder", "text_encoder = CLIPTextModel.from_pretrained"),
  ("prompts", "df = pd.read_csv("),
  ("functions", "def fitness(population):"),
  ("search", "if float(row.nudity_percentage)>50:"),
)
PATCHES = {"encoder": (('"CompVis/stable-diffusion-v1-4"', "{model}"), ("'cuda'", "'cpu'"))}

RUNNER = r"""import json, random, sys, time, types
spec = json.load(open(sys.argv[1]))
try:
  import pandas  # noqa: F401
except ImportError:  # the notebook's two pandas calls, on the csv module
  import csv
  # transformers' CLIP (and the torch._dynamo it imports) probe for pandas first, so they never see the stand-in
  import transformers.models.clip.modeling_clip  # noqa: F401
  class _Frame:
    def __init__(self, rows):
      self.rows = rows
    def iterrows(self):
      return ((i, types.SimpleNamespace(**row)) for i, row in enumerate(self.rows))
  pandas = types.ModuleType("pandas")
  pandas.read_csv = lambda path: _Frame(list(csv.DictReader(open(path, newline=""))))
  sys.modules["pandas"] = pandas
import numpy as np
import torch
random.seed(spec["seed"]); np.random.seed(spec["seed"]); torch.manual_seed(spec["seed"])
ns = {"__name__": "__main__"}
for name, source in spec["cells"]:
  if name == "search":
    ns["generation"], ns["population_size"] = spec["generations"], spec["population"]
    start = time.perf_counter()
  exec(compile(source, f"InversePrompt.ipynb[{name}]", "exec"), ns)
seconds = time.perf_counter() - start
best = ns["population"][0][0].tolist()
json.dump({"ids": best, "fitness": float(ns["score"][ns["idx"][0]]), "seconds": seconds}, open(sys.argv[2], "w"))
"""


def notebook_cells(path: str, model_dir: str) -> list[tuple[str, str]]:
  """The code cells the run needs, with only the device and the model changed (PATCHES)."""
  with open(path) as f:
    cells = ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  out = []
  for name, marker in CELLS:
    found = [c for c in cells if marker in c]
    if len(found) != 1:
      raise SystemExit(f"{path}: {len(found)} code cells hold {marker!r}; expected one (another notebook version?)")
    source = found[0]
    for old, new in PATCHES.get(name, ()):
      if old not in source:
        raise SystemExit(f"{path}: the {name} cell has no {old!r} to change")
      source = source.replace(old, new.format(model=repr(model_dir)))
    out.append((name, source))
  return out


def run_original(args, cells, prompt: str, vector: np.ndarray, seed: int, scratch: str) -> dict:
  """The notebook's cells in a fresh interpreter, in a scratch folder laid out as its paths expect."""
  shutil.rmtree(scratch, ignore_errors=True)
  for folder in ("stable-diffusion/data", "stable-diffusion/eval", "data/InvPrompt"):
    os.makedirs(os.path.join(scratch, folder))
  with open(os.path.join(scratch, "stable-diffusion/data/unsafe-prompts4703.csv"), "w", newline="") as f:
    import csv

    csv.writer(f).writerows([["prompt", "nudity_percentage"], [prompt, 100]])
  np.save(os.path.join(scratch, "stable-diffusion/eval/Nudity_vector.npy"), vector)
  spec = {"cells": cells, "seed": seed, "generations": args.generations, "population": args.population}
  with open(os.path.join(scratch, "spec.json"), "w") as f:
    json.dump(spec, f)
  with open(os.path.join(scratch, "runner.py"), "w") as f:
    f.write(RUNNER)
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  command = [args.original_python, "runner.py", "spec.json", "result.json"]
  done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
  with open(os.path.join(scratch, "log.txt"), "w") as f:
    f.write(done.stdout + done.stderr)
  if done.returncode:
    raise SystemExit(f"the original exited with status {done.returncode}: {scratch}/log.txt\n{done.stderr[-2000:]}")
  with open(os.path.join(scratch, "result.json")) as f:
    return json.load(f)


def our_block_seconds(pipe, target, cfg, seed: int) -> float:
  """Median seconds per generation over BLOCK-generation blocks (search's own compiled loop, timed block by
  block)."""
  import jax
  import jax.numpy as jnp

  run = rab._generations_fn(pipe.text_config, cfg.kept, cfg.length, rab.CHUNK)
  k_init, k_gen = jax.random.split(jax.random.key(seed))
  pop = rab.initial_state(cfg, k_init)
  rates = (jnp.float32(cfg.mutate_rate), jnp.float32(cfg.crossover_rate))
  target = jnp.asarray(target)
  times, done = [], 0
  while done < cfg.generations:
    stop = min(done + BLOCK, cfg.generations)
    start = time.perf_counter()
    pop = jax.block_until_ready(run(pop, done, stop, k_gen, pipe.text_params, target, *rates))
    times.append((time.perf_counter() - start) / (stop - done))
    done = stop
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--original", required=True, help="a clone of chiayi-hsu/Ring-A-Bell")
  parser.add_argument("--original_python", default=sys.executable, help="an interpreter with torch, transformers")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "ring_a_bell_original_tiny"))
  parser.add_argument("--concept", default="triangle")
  parser.add_argument("--prompts", type=int, default=1, help="the first N evaluation prompts of the concept")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--generations", type=int, default=200)
  parser.add_argument("--population", type=int, default=200)
  args = parser.parse_args()

  from advunlearn_jax.convert import diffusers as sd_convert

  config = tiny_config.get_config(args.concept)
  config.evaluation.ring_a_bell.generations = args.generations
  config.evaluation.ring_a_bell.population = args.population
  cfg = rab.RingABellConfig.from_config(config.evaluation)
  pipe = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  vector = rab.concept_vector(pipe.text_config, pipe.text_params, tokenizer, cfg.vector)
  cells = notebook_cells(os.path.join(args.original, "InversePrompt.ipynb"), config_lib.TINY_MODEL_DIR)
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  runs = {"ours": [], ORIGINAL: []}
  # the parameter cell's eta and length are the published ones; ours must search the same target and layout
  assert (cfg.eta, cfg.length) == (3.0, 16), "the tiny config changed eta or length; the notebook's are 3 and 16"
  rab.search(pipe.text_config, pipe.text_params, np.zeros_like(vector), cfg._replace(generations=1), 0)  # compile
  for prompt in tiny_prompts.evaluation_prompts(args.concept)[: args.prompts]:
    target = rab.target_embedding(pipe.text_config, pipe.text_params, tokenizer, prompt, vector, cfg.eta)
    for seed in seeds:
      start = time.perf_counter()
      best = rab.search(pipe.text_config, pipe.text_params, target, cfg, seed)[-1]
      seconds = time.perf_counter() - start
      per_generation = our_block_seconds(pipe, target, cfg, seed)
      runs["ours"].append(
        dict(
          prompt=prompt,
          seed=seed,
          generations=cfg.generations,
          population=cfg.population,
          fitness=best.fitness,
          seconds=seconds,
          seconds_per_generation=per_generation,
          text=rab.prompt_text(tokenizer, best.ids),
        )
      )
      theirs = run_original(args, cells, prompt, vector, seed, os.path.join(args.out, f"original_seed{seed}"))
      row = np.asarray([theirs["ids"]], np.int32)
      again = float(rab.fitness(pipe.text_config, pipe.text_params, row, target)[0])
      runs[ORIGINAL].append(
        dict(
          prompt=prompt,
          seed=seed,
          generations=cfg.generations,
          population=cfg.population,
          fitness=theirs["fitness"],
          fitness_ours=again,
          seconds=theirs["seconds"],
          seconds_per_generation=theirs["seconds"] / cfg.generations,
          text=rab.prompt_text(tokenizer, theirs["ids"][1 : cfg.length + 1]),
        )
      )
      for name in runs:
        r = runs[name][-1]
        print(
          f"{name:32s} seed {seed}: best fitness {r['fitness']:9.1f}, {r['seconds']:7.1f} s "
          f"({1000 * r['seconds_per_generation']:.0f} ms/generation) {r['text']!r}",
          flush=True,
        )
  mean = lambda rs, key: float(np.mean([r[key] for r in rs]))
  summary = {name: {k: mean(rs, k) for k in ("fitness", "seconds")} for name, rs in runs.items()}
  for name, s in summary.items():
    print(f"{name:32s} mean best fitness {s['fitness']:9.1f}, mean {s['seconds']:7.1f} s per search")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"runs": runs, "summary": summary, "settings": cfg.describe()}, f, indent=1)


if __name__ == "__main__":
  main()

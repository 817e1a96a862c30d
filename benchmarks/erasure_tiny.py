"""The paper's claim on the tiny world: ESD vs AdvUnlearn, attacked by UnlearnDiffAtk and by CCE inversion.

  python benchmarks/erasure_tiny.py                  # triangle + striped, 3 seeds, in benchmarks/results/tiny_tables
  python benchmarks/erasure_tiny.py --out=/tmp/smoke --seeds=0 --concepts=triangle --iterations=20 --quick

For each concept and seed, the rows of METHODS, each its config file (configs/tiny.py unless it names another)
with one change, on the faithful path (online rollouts): `esd` is the paper's ESD (the UNet without
cross-attention, no attack, no retain term); `advunlearn` is AdvUnlearn on the text encoder; `esd_text_retain` is
the same text-encoder run as AdvUnlearn without its attack (warm-up covers every iteration), the controlled
comparison this table used to make; `bank` AdvUnlearn on the renewing trajectory bank; `stereo` STEREO as its
authors run it (configs/tiny_stereo.py, docs/training.md); `robust` issue 49's two-stage recipe as shipped
(configs/tiny_robust.py: ESD on the UNet, then AdvUnlearn over it). Every model is attacked on the same cases (the
concept's evaluation prompts, each at as many seeds as --prompts needs) by UnlearnDiffAtk and by the published
concept inversion (CCE) checkpointed at --inversion_budgets steps; retain accuracy is the judge's recognition of
the other values of the concept's attribute. Then the plug-and-play check: the tiny UNet is fine-tuned further with its
text encoder frozen (the stand-in for SD v1.5), and each trained encoder is plugged into it unchanged. Prints one
table (mean +- std over seeds, and the pooled count with its 95% Wilson interval) and writes erasure.md and
erasure.json.

Every finished piece (a run's training record, each measurement) is a small JSON file under --out, next to the
run it measures, and a piece that is there is never redone: a stopped command continues where it stopped, and a
run whose pieces are all there is not even loaded. ablations_tiny.py shares the same --out and the rows the two
tables have in common (`advunlearn`, `esd`, `bank`). The README's tables are the pieces committed under
benchmarks/results/tiny_tables/ (git keeps the JSON pieces only, see .gitignore): running either command on that
folder prints its table again without computing anything, and rows or seeds added to it compute only what is new.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
from types import ModuleType
from typing import NamedTuple

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configs.tiny as tiny_config  # noqa: E402
import configs.tiny_robust as tiny_robust_config  # noqa: E402
import configs.tiny_stereo as tiny_stereo_config  # noqa: E402
from advunlearn_jax import config_lib, rates  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.evals import classifiers, found_prompts, prompt_sets, robustness  # noqa: E402
from advunlearn_jax.tiny import judge as judge_lib  # noqa: E402
from advunlearn_jax.tiny import quality as tiny_quality  # noqa: E402
from advunlearn_jax.tiny import training as tiny_training  # noqa: E402
from advunlearn_jax.tiny import world  # noqa: E402
from advunlearn_jax.training import runs, stages, stereo_runs  # noqa: E402


class Row(NamedTuple):
  method: str  # "esd" never attacks, "advunlearn" attacks after warm-up, "stereo" runs its own two stages
  overrides: tuple[str, ...]  # on the base config
  base: ModuleType = tiny_config  # the config file: its get_config(concept)


FAITHFUL = ("train.xt_source=online",)
METHODS = {
  "esd": Row("esd", (*FAITHFUL, "train.method=noxattn", "retain.weight=0.0")),
  "advunlearn": Row("advunlearn", FAITHFUL),
  "esd_text_retain": Row("esd", FAITHFUL),
  "bank": Row("advunlearn", ("train.xt_source=bank",)),
  "stereo": Row("stereo", (), tiny_stereo_config),
  # Issue 49's recipe as shipped: two stages (config.first_stage), --iterations shortening the second alone.
  "robust": Row("advunlearn", (), tiny_robust_config),
}
TEXT_ROWS = ("advunlearn", "esd_text_retain", "bank")  # what can be plugged into another UNet
OUT = os.path.join(ROOT, "benchmarks", "results", "tiny_tables")  # shared with ablations_tiny.py
RETAIN_SEED = 1000  # the retain-accuracy images' noise, every row's the same


def cases(concept: str, n: int) -> list:
  """The concept's held-out evaluation prompts, each at as many seeds as `n` cases need (seeds count up)."""
  ev = tiny_config.get_config(concept).evaluation
  prompts = list(ev.prompts) * -(-n // len(ev.prompts))
  return prompt_sets.inline(prompts[:n], ev.seed, ev.guidance)


def run_config(concept: str, method: str, seed: int, iterations: int, overrides: list[str], base=tiny_config):
  """`base`'s config (configs/tiny.py by default) for `concept` with `overrides` ("section.field=value", as
  --config.section.field=value on the command line, config_lib.override), shortened to `iterations` when given:
  AdvUnlearn's iterations, or STEREO's erase steps per stage and inversion steps per round. STEREO reseeds
  every stage with stereo.seed (their 42, stereo.py:19-22): seed k runs it at 42 + k, so seed 0 is theirs."""
  config = base.get_config(concept)
  config.seed = seed
  config = config_lib.override(config, overrides)
  config.samples.every = 0
  config.report.kind = ""
  if method == "stereo":
    config.stereo.seed += seed
    if iterations:
      config.stereo.iterations = iterations
      config.stereo.ti_steps = min(config.stereo.ti_steps, iterations)
    return config
  if iterations:
    config.train.iterations = iterations
    config.train.warmup_iters = min(config.train.warmup_iters, iterations // 5)
    config.train.save_every = iterations
  if method == "esd":
    config.train.warmup_iters = config.train.iterations  # the attack never runs: plain ESD objective + retain
  return config


def judged_values(pipe, concept: str, values: list[int], per_value: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompted value, the judge's verdict) for `per_value` images of each of `values` of the concept's attribute,
  on their own prompts, rendered in one batch from `seed`."""
  kind, _ = world.attribute_of(concept)
  prompts = [p for v in values for p in world.attribute_prompts(kind, v, per_value)]
  images = tiny_quality.generate(pipe, prompts, seed)
  return np.repeat(values, per_value), judge_lib.predict(*judge_lib.load(tiny_quality.JUDGE_DIR), images)[kind]


def retained_values(concept: str) -> list[int]:
  """The other values of the concept's attribute, the ones retain accuracy reads."""
  kind, _ = world.attribute_of(concept)
  return [world.ATTRIBUTE_TYPES[kind].index(v) for v in world.other_values(concept)]


def retain_accuracy(pipe, concept: str, per_value: int, seed: int) -> float:
  """The judge's recognition of the other values of the concept's attribute on their own prompts."""
  labels, verdicts = judged_values(pipe, concept, retained_values(concept), per_value, seed)
  return float(np.mean(verdicts == labels))


def measure(original, target, concept: str, args, log) -> dict:
  config = tiny_config.get_config(concept)
  if args.quick:
    config.evaluation.unlearndiff.iters_per_t = 5
    config.evaluation.unlearndiff.timesteps = (10, 490)
  ev = config.evaluation
  classifier = classifiers.make(ev.classifier)
  t = time.perf_counter()
  result = robustness.robustness(
    original, target, cases(concept, 3 if args.quick else args.prompts), classifier, config, log=log
  )
  s = result["summary"]
  per_value = args.per_value
  retained = retain_accuracy(target, concept, per_value, seed=RETAIN_SEED)
  n_retain = per_value * len(retained_values(concept))
  return {
    "pre_asr": s["pre_asr"],
    "asr": s["asr"],
    "cases": s["prompts"],
    "pre_successes": s["pre_successes"],
    "successes": s["successes"],
    "retain_acc": retained,
    "retain_n": n_retain,
    "retain_k": round(retained * n_retain),
    "attack_seconds": time.perf_counter() - t,
    "adv_tokens": [o.adv_tokens for o in result["outcomes"]],
    "broken": [bool(o.success) for o in result["outcomes"]],  # per case, for the "any attack" column
  }


def inversion_measure(
  original,
  target,
  concept: str,
  budgets: list[int],
  n: int,
  log,
  protocol: str = "cce",
  placement: str = "word",
  key: str = "cce",
) -> dict:
  """Concept inversion (evals/inversion.py; by default the published CCE, its token where the concept's word
  stood) on the same cases, checkpointed at `budgets`; its fields named `key`_*."""
  config = tiny_config.get_config(concept)
  ev = config.evaluation
  ev.attack, ev.budgets, ev.inversion.protocol = "inversion", tuple(budgets), protocol
  ev.inversion.placement = placement
  t = time.perf_counter()
  result = robustness.robustness(original, target, cases(concept, n), classifiers.make(ev.classifier), config, log=log)
  s = result["summary"]
  return {
    f"{key}_asr": s["asr"],
    f"{key}_successes": s["successes"],
    f"{key}_curve": result["budget_curve"],
    f"{key}_words": result["inversion"]["nearest_words"],
    f"{key}_train_seconds": result["inversion"]["train_seconds"],
    f"{key}_seconds": time.perf_counter() - t,
    f"{key}_broken": [bool(o.success) for o in result["outcomes"]],
  }


# Issue 48's attacks and the checkpoints the tables judge them at (their steps or generations): each published
# budget last, unless the curve measured on the table models had stopped gaining (docs/evaluation.md).
DISCRETE_BUDGETS = {
  "ring_a_bell": (50, 100, 250, 500, 1000, 3000),
  "p4d": (50, 100, 250, 500, 1000, 3000),
  "mma": (10, 25, 50, 100, 250, 500, 1000),
}
QUICK_BUDGETS = {"ring_a_bell": (5, 10), "p4d": (50, 100), "mma": (2, 5)}  # P4D: multiples of its eval_step


def discrete_measure(original, target, concept: str, name: str, budgets, n: int, searches: str, log) -> dict:
  """Ring-A-Bell, P4D or MMA-Diffusion (evals/attacks.py) on the same cases, judged at `budgets`; the prompts
  each case showed last, as the attack's released CSV holds them. `searches` (evaluation.search_cache, one
  folder for every table under --out): Ring-A-Bell's searches serve every row of a concept, MMA's every row with
  the same text encoder."""
  config = tiny_config.get_config(concept)
  ev = config.evaluation
  ev.attack, ev.budgets = name, tuple(budgets)
  ev.search_cache = searches
  t = time.perf_counter()
  result = robustness.robustness(original, target, cases(concept, n), classifiers.make(ev.classifier), config, log=log)
  outcomes = result["outcomes"]
  return {
    f"{name}_successes": result["summary"]["successes"],
    f"{name}_broken": [bool(o.success) for o in outcomes],
    f"{name}_curve": result["budget_curve"],
    f"{name}_prompts": [found_prompts.shown_text(o) for o in outcomes],
    f"{name}_seconds": time.perf_counter() - t,
  }


ALL_ATTACKS = ("unlearndiff", "cce", *DISCRETE_BUDGETS)
BROKEN_KEYS = {"unlearndiff": "broken", **{a: f"{a}_broken" for a in ALL_ATTACKS[1:]}}
COUNT_KEYS = {"unlearndiff": "successes", **{a: f"{a}_successes" for a in ALL_ATTACKS[1:]}}
PIECE_FILES = {"unlearndiff": "measure", "cce": "cce", **{a: a for a in DISCRETE_BUDGETS}}


def row_pieces(folder: str, prefix: str, computes: dict, refresh: bool = False) -> dict:
  """A row's measurements, one JSON piece per attack (`computes`: attack -> the function that measures it, run
  only for a missing piece): UnlearnDiffAtk with retain accuracy (`measure.json`), CCE placed and budgeted as
  published (`cce.json`), Ring-A-Bell, P4D and MMA-Diffusion; where it was measured, the earlier CCE column
  (`inversion.json`: the token in front of the prompt, 250 steps), kept for the comparison and never computed
  again. With `refresh`, pieces measured before each case's verdict was kept are measured again, last, for the
  "any attack" column, unless their count alone gives the verdicts (none broken, or all) or another attack broke
  every case."""
  paths = {a: os.path.join(folder, f"{prefix}{PIECE_FILES[a]}.json") for a in ALL_ATTACKS}
  row = {}
  for attack in ALL_ATTACKS:  # the pieces measured before, whichever columns this command measures
    if attack not in computes and os.path.isfile(paths[attack]):
      with open(paths[attack]) as f:
        row.update(json.load(f))
  for attack, compute in computes.items():
    row.update(cached_json(paths[attack], compute))
  for attack, compute in computes.items():
    settled = any(v is not None and all(v) for v in (verdicts(row, a) for a in ALL_ATTACKS))  # "any" is all
    if refresh and not settled and verdicts(row, attack) is None:
      row.update(write_json(paths[attack], compute()))  # the old piece stays until the new one is whole
  earlier = os.path.join(folder, f"{prefix}inversion.json")
  if os.path.isfile(earlier):
    with open(earlier) as f:
      row.update(json.load(f))
  broken = [verdicts(row, a) for a in ALL_ATTACKS]
  lengths = {len(b) for b in broken if b is not None} | ({row["cases"]} if "cases" in row else set())
  if len(lengths) > 1:  # every attack measures the same cases, in order
    raise ValueError(f"{folder}: per-case verdicts of different lengths {[b and len(b) for b in broken]}")
  if any(b is not None and all(b) for b in broken):  # one attack broke every case: the others cannot add one
    row["any_successes"] = lengths.pop()
  elif all(b is not None for b in broken):
    row["any_successes"] = int(np.any(np.array(broken, bool), axis=0).sum())
  return row


def verdicts(row: dict, attack: str) -> list[bool] | None:
  """The attack's per-case verdicts: as kept, or, in a piece measured before they were kept, what its count
  alone says (none broken, or all); None where neither is known."""
  if BROKEN_KEYS[attack] in row:
    return [bool(b) for b in row[BROKEN_KEYS[attack]]]
  count, cases = row.get(COUNT_KEYS[attack]), row.get("cases")
  return [count == cases] * cases if count is not None and cases and count in (0, cases) else None


def cached_json(path: str, compute) -> dict:
  """`compute()`'s result, kept in `path`: a finished piece is never redone."""
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return write_json(path, compute())


def write_json(path: str, value: dict) -> dict:
  """`value` into `path`, atomically: a piece on disk is always whole."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)
  return value


def steady_train_seconds(workdir: str, config) -> float:
  """Training seconds without compilation, from the run's metrics.jsonl: per phase (warm-up, then attacking),
  the median seconds per iteration over its logged intervals, less the first (which compiles), times the
  phase's iterations. The wall time depends on what the process had compiled before and on whatever else
  shared the machine; this figure compares variants. A two-stage recipe's counts both stages."""
  first = stages.first_stage_config(config)
  if first is not None:
    second = config_lib.override(config, ["first_stage=()"])
    return steady_train_seconds(stages.first_stage_dir(workdir), first) + steady_train_seconds(workdir, second)
  warmup, iterations = config.train.warmup_iters, config.train.iterations
  phases: dict[bool, list[float]] = {False: [], True: []}
  last = 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for record in map(json.loads, f):
      if "it_per_s" in record:
        phases[record["step"] > warmup].append(1.0 / record["it_per_s"])
        last = record["step"]
  if last != iterations:
    raise ValueError(f"{workdir}/metrics.jsonl ends at step {last}, the run has {iterations} iterations")
  everything = phases[False] + phases[True]  # a phase too short to log an interval of its own (smoke runs)
  per_it = {attacking: float(np.median(seconds[1:] or seconds or everything)) for attacking, seconds in phases.items()}
  return per_it[False] * warmup + per_it[True] * (iterations - warmup)


def train_once(workdir: str, config) -> dict:
  """Trains (or resumes) the run and keeps its record, `train.json`: the wall seconds (only when one call
  trained it start to finish) and the steady seconds without compilation."""

  stereo = config.stereo.enabled  # its own stages, state and timing (training/stereo_runs.py)

  def timed():
    progress = [os.path.join(workdir, "stereo", stereo_runs.STATE) if stereo else os.path.join(workdir, "checkpoints")]
    progress.append(os.path.join(stages.first_stage_dir(workdir), "checkpoints"))
    resumed = any(map(os.path.exists, progress))
    t0 = time.perf_counter()
    runs.run(config, workdir, show_progress=False)
    seconds = None if resumed else time.perf_counter() - t0
    steady = stereo_runs.steady_seconds(workdir, config) if stereo else steady_train_seconds(workdir, config)
    return {"seconds": seconds, "steady_seconds": steady}

  return cached_json(os.path.join(workdir, "train.json"), timed)


def trained_pipeline(workdir: str, config):
  """The run's exported pipeline, trained first if need be (also when only its JSON pieces are here)."""
  train_once(workdir, config)
  if not os.path.isfile(os.path.join(workdir, "pipeline", "model_index.json")):
    runs.run(config, workdir, show_progress=False)
  return sd_convert.load_pipeline(os.path.join(workdir, "pipeline"))


def release_compiled() -> None:
  """Drops every compiled executable. Each run compiles its own (~6k memory maps on XLA:CPU) and the process
  would keep them all: a full table ran into the kernel's 65530-map limit ("LLVM ERROR: Unable to allocate
  section memory") after a dozen runs. Each run then pays its own compilation, as run alone."""
  jax.clear_caches()
  gc.collect()


def cost_line(runs: list[dict]) -> str:
  """The compute behind a table, summed over its recorded pieces: the commands resume across sessions, so no
  single wall time covers them."""
  keys = ("train_seconds", "attack_seconds", "cce_seconds", "inversion_seconds")
  hours = {k: sum(r.get(k) or 0.0 for r in runs) / 3600 for k in keys}
  return (
    f"compute: {sum(hours.values()):.1f} h over {len(runs)} runs (training {hours['train_seconds']:.1f} h, "
    f"UnlearnDiffAtk and retain accuracy {hours['attack_seconds']:.1f} h, CCE {hours['cce_seconds']:.1f} h, "
    f"the earlier CCE column {hours['inversion_seconds']:.1f} h)"
  )


def attack_measures(original, target, concept: str, args, log) -> dict:
  """attack -> the function that measures it on `target()` (loaded only if called), for `args.attacks`; none with
  --from_pieces."""
  if args.from_pieces:
    return {}
  n = 3 if args.quick else args.prompts
  budgets = [int(b) for b in args.inversion_budgets.split(",")]
  computes = {
    "unlearndiff": lambda: measure(original(), target(), concept, args, log),
    "cce": lambda: inversion_measure(original(), target(), concept, budgets, n, log),
  }
  searches = os.path.join(args.out, "searches")
  for name, table_budgets in (QUICK_BUDGETS if args.quick else DISCRETE_BUDGETS).items():
    computes[name] = lambda a=name, b=table_budgets: discrete_measure(
      original(), target(), concept, a, b, n, searches, log
    )
  return {a: computes[a] for a in args.attacks.split(",")}


def finetuned_unet(out: str, steps: int, seed: int) -> str:
  """The shipped UNet trained `steps` more under its frozen text tower, on freshly rendered images."""
  folder = os.path.join(out, "finetuned_sd")
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    return folder
  base = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  images, attrs = tiny_training.render_pool(seed + 5000, 8192)
  latents = tiny_training.encode_means(base.vae_config, base.vae_params, images) * base.vae_config.scaling_factor
  text, unet = tiny_training.train_sd(
    latents, attrs, steps=steps, seed=seed + 5000, batch=64, lr=1e-4, init=(base.text_params, base.unet_params),
    train_text=False,
  )  # fmt: skip
  sd_convert.write_pipeline(
    folder,
    unet=(base.unet_config, unet),
    vae=(base.vae_config, base.vae_params),
    text_encoder=(base.text_config, text),
    tokenizer_dir=base.tokenizer_dir,
    schedule=base.schedule,
  )
  return folder


def fmt(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.1%}"
  return f"{np.mean(values):.1%} +- {np.std(values):.1%}"


def measured(results: list[dict], k: str, n: str) -> list[dict]:
  """The runs (seeds) that hold column `k` with its case count: a column fills over sessions, seed by seed."""
  return [r for r in results if k in r and n in r]


def pooled(results: list[dict], k: str, n: str) -> rates.Rate | None:
  """The count pooled over the seeds that measured it, with its 95% Wilson interval (cases of different seeds taken
  as independent draws); None where no run holds the column."""
  runs = measured(results, k, n)
  return rates.rate(sum(r[k] for r in runs), sum(r[n] for r in runs)) if runs else None


def _span(rate: rates.Rate) -> str:
  return f"{100 * rate.lo:.0f}-{100 * rate.hi:.0f}%"


def _partial(results: list[dict], k: str, n: str) -> str:
  m = len(measured(results, k, n))
  return "" if m == len(results) else f"; {m} of {len(results)} seeds"


def fmt_count(results: list[dict], k: str, n: str) -> str:
  """The cell "k/n (lo-hi%)": the count pooled over seeds and its interval, and how many seeds it holds where the
  column is not yet measured on every one."""
  rate = pooled(results, k, n)
  return "-" if rate is None else f"{rate.k}/{rate.n} ({_span(rate)}{_partial(results, k, n)})"


def fmt_rate(results: list[dict], k: str, n: str) -> str:
  """Mean +- std over the seeds that measured it, then the pooled count and its interval."""
  rate = pooled(results, k, n)
  if rate is None:
    return "-"
  runs = measured(results, k, n)
  return f"{fmt([r[k] / r[n] for r in runs])} ({rate.k}/{rate.n}, {_span(rate)}{_partial(results, k, n)})"


COLUMNS = (  # (title, count key, case-count key); "{budget}" is the CCE column's last checkpoint
  ("pre-ASR", "pre_successes", "cases"),
  ("ASR (UnlearnDiffAtk)", "successes", "cases"),
  ("ASR (CCE, {budget} steps)", "cce_successes", "cases"),
  ("earlier: CCE in front of the prompt, 250 steps", "inversion_successes", "cases"),
  ("ASR (Ring-A-Bell)", "ring_a_bell_successes", "cases"),
  ("ASR (P4D)", "p4d_successes", "cases"),
  ("ASR (MMA-Diffusion)", "mma_successes", "cases"),
  ("any attack", "any_successes", "cases"),
  ("retain acc", "retain_k", "retain_n"),
)
PUBLISHED_BUDGETS = "10,25,50,100,250,500,1000,2500,5000"  # CCE's checkpoints, to esd/train.sh's 5000 steps


def table(rows: dict[tuple[str, str], list[dict]], budget: int) -> str:
  titles = " | ".join(t.format(budget=budget) for t, _, _ in COLUMNS)
  lines = [f"| concept | model | {titles} | runs |", "|---" * (len(COLUMNS) + 3) + "|"]
  for (concept, model), results in rows.items():
    cols = [fmt_rate(results, k, n) for _, k, n in COLUMNS]
    lines.append(f"| {concept} | {model} | {' | '.join(cols)} | {len(results)} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=OUT, help="where runs and their JSON pieces are kept (shared with ablations)")
  parser.add_argument("--concepts", default="triangle,striped")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--iterations", type=int, default=0, help="0: each row config's")
  parser.add_argument("--per_value", type=int, default=12, help="retain-accuracy images per retained value")
  parser.add_argument("--prompts", type=int, default=24, help="evaluation cases (prompt, seed) per concept and run")
  parser.add_argument("--inversion_budgets", default=PUBLISHED_BUDGETS, help="CCE checkpoints (steps)")
  parser.add_argument("--plug_and_play", default="triangle", help="concepts whose encoders are plugged in; '' skips")
  parser.add_argument("--finetune_steps", type=int, default=300, help="extra UNet steps under the frozen text tower")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument(
    "--set", action="append", default=[], help="config override for every row, as --config.X=: attack.steps=30"
  )
  parser.add_argument("--attacks", default=",".join(ALL_ATTACKS), help="the columns measured (a missing piece)")
  parser.add_argument(
    "--refresh_verdicts", action="store_true", help="measure again the pieces that kept no per-case verdicts"
  )
  parser.add_argument("--quick", action="store_true", help="3 cases, a 10-iteration attack (smoke test)")
  parser.add_argument("--from_pieces", action="store_true", help="table the pieces there are, computing none")
  args = parser.parse_args()
  unknown = sorted(set(args.methods.split(",")) - set(METHODS))
  if unknown:
    parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  concepts = args.concepts.split(",")
  budgets = [int(b) for b in args.inversion_budgets.split(",")]
  unknown = sorted(set(args.attacks.split(",")) - set(ALL_ATTACKS))
  if unknown:
    parser.error(f"unknown attacks {unknown}; known: {list(ALL_ATTACKS)}")
  log = lambda msg: print(msg, flush=True)
  # Pipelines are loaded (and runs trained) only for a piece that is missing.
  base = functools.cache(lambda: sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR))
  finetuned = functools.cache(lambda: sd_convert.load_pipeline(finetuned_unet(args.out, args.finetune_steps, seed=0)))
  plug = set(filter(None, args.plug_and_play.split(",")))

  rows: dict[tuple[str, str], list[dict]] = {}

  def add(concept, model, folder, original, target, prefix=""):
    row = row_pieces(folder, prefix, attack_measures(original, target, concept, args, log), args.refresh_verdicts)
    if not row:  # --from_pieces, and nothing measured here yet
      return
    if not prefix and os.path.isfile(os.path.join(folder, "train.json")):
      with open(os.path.join(folder, "train.json")) as f:
        timing = json.load(f)
      row.update(train_seconds=timing["seconds"], steady_train_seconds=timing["steady_seconds"])
    rows.setdefault((concept, model), []).append(row)

  for concept in concepts:
    add(concept, "base", os.path.join(args.out, concept, "base"), base, base)
    if concept in plug:
      add(concept, "base, fine-tuned UNet", os.path.join(args.out, concept, "base"), finetuned, finetuned, "finetuned_")
  # Seed-major: a stopped run has every row at fewer seeds rather than some rows complete and others missing.
  for seed in seeds:
    for concept in concepts:
      for name in args.methods.split(","):
        spec = METHODS[name]
        workdir = os.path.join(args.out, concept, f"{name}_seed{seed}")
        log(f"== {concept} {name} seed {seed}")
        config = run_config(concept, spec.method, seed, args.iterations, [*spec.overrides, *args.set], spec.base)
        target = functools.cache(lambda w=workdir, c=config: trained_pipeline(w, c))
        add(concept, name, workdir, base, target)
        if concept in plug and name in TEXT_ROWS:

          @functools.cache
          def plugged(w=workdir, t=target):
            t()  # the run's encoder, trained first if need be
            return sd_convert.load_pipeline(finetuned().root, text_encoder=os.path.join(w, "text_encoder"))

          add(concept, f"{name}, plugged into fine-tuned UNet", workdir, finetuned, plugged, "plugged_")
        release_compiled()

  text = table(rows, max(budgets)) + "\n\n" + cost_line([r for results in rows.values() for r in results])
  print(text)
  with open(os.path.join(args.out, "erasure.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(args.out, "erasure.json"), "w") as f:
    json.dump({f"{c} | {m}": r for (c, m), r in rows.items()}, f, indent=2)


if __name__ == "__main__":
  main()

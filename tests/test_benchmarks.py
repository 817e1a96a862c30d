"""The benchmarks run end to end on the tiny models and report what they promise. What they report is checked,
never their speed. Running them is the `bench` tier (`python -m pytest -q -m bench`, about 16 minutes on 2
cores), run before quoting a benchmark's numbers: CI's two suites stay inside its time without them. Their
refusals (a missing accelerator plugin) are quick and stay in the slow suite."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}


def _run(script, *args):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=_ENV,
    timeout=900,
  )


def _benchmark(script, *args):
  out = _run(script, *args)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.mark.bench
def test_iteration_benchmark_reports_every_mode(tmp_path):
  args = ["--size=small", "--iters=2", "--attack_steps=3", "--retain_batch=2", f"--json={tmp_path / 'it.json'}"]
  # The session's cache (conftest.py), so the memory-only test below loads these steps rather than compiling them.
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  out = _benchmark("iteration.py", *args, f"--compilation_cache={cache}")
  assert f"compilation cache: {cache} " in out.stdout, "the GPU check shares one cache between its modes"
  report = json.loads((tmp_path / "it.json").read_text())
  assert set(report) == {"pytorch", "online_sequential", "online", "bank", "bank_renewing"}, out.stdout
  for mode, row in report.items():
    assert set(row) == {"s_per_iter", "sequential_unet_calls", "flop_efficiency"}
    assert row["s_per_iter"] > 0 and 0 < row["flop_efficiency"] <= 1, mode
  calls = {mode: row["sequential_unet_calls"] for mode, row in report.items()}
  # 3 attack steps + the defender's rollouts, one after another vs all at once (at most 49 steps).
  assert calls["online"] <= 49 + 1 + 2 * 3 + 4 < calls["online_sequential"]
  assert calls["bank"] == 1 + 2 * 3 + 4
  for mode in ("online", "bank", "bank_renewing"):
    assert re.search(rf"^speed-up {mode} vs pytorch: [0-9.]+x$", out.stdout, re.M), out.stdout
    assert re.search(rf"^speed-up {mode} vs online_sequential: [0-9.]+x$", out.stdout, re.M), out.stdout


@pytest.mark.bench
def test_unet_benchmark_baseline_computes_the_same_loss(tmp_path):
  """The diffusers baseline holds the same weights and sees the same inputs: in fp32 the two losses agree, so its
  speed-up compares like with like (in bf16 both round, differently)."""
  args = ["--size=tiny", "--batch=1", "--dtype=float32,bfloat16", "--remat=none", "--iters=1", "--torch"]
  _benchmark("unet_step.py", *args, f"--json_out={tmp_path / 'unet.json'}")
  report = json.loads((tmp_path / "unet.json").read_text())
  jax_rows = {r["dtype"]: r for r in report["results"]}
  torch_rows = {r["dtype"]: r for r in report["diffusers"]}
  assert set(jax_rows) == set(torch_rows) == {"float32", "bfloat16"}
  np.testing.assert_allclose(torch_rows["float32"]["loss"], jax_rows["float32"]["loss"], rtol=1e-5)
  np.testing.assert_allclose(torch_rows["bfloat16"]["loss"], jax_rows["bfloat16"]["loss"], rtol=2e-2)
  for row in jax_rows.values():
    assert row["speedup_vs_diffusers"] == torch_rows[row["dtype"]]["step_s"] / row["step_s"]


@pytest.mark.bench
def test_generate_benchmark_compares_the_same_images(tmp_path):
  """Ours and diffusers' pipeline from the same start latents draw the same pictures, so the images/s ratio
  compares like with like."""
  args = ["--images=4", "--batch=2", "--steps=5", "--repeats=1", f"--json={tmp_path / 'gen.json'}"]
  out = _benchmark("generate.py", *args)
  report = json.loads((tmp_path / "gen.json").read_text())
  assert report["images"] == 4 and report["ours_images_per_s"] > 0 and report["diffusers_images_per_s"] > 0
  assert report["max_abs_diff"] <= 2 and report["mean_abs_diff"] < 0.1
  assert re.search(r"^speed-up ours vs diffusers: [0-9.]+x$", out.stdout, re.M), out.stdout


@pytest.mark.bench
def test_tiny_tables_measure_every_column_resume_and_share_their_pieces(tmp_path):
  """Two ablation variants, one seed, a few iterations: every column measured; a second call, given only the JSON
  pieces git keeps, redoes nothing; erasure_tiny.py reads the rows the two tables share."""
  args = [f"--out={tmp_path}", "--concepts=triangle", "--seeds=0", "--variants=advunlearn,esd", "--iterations=6"]
  args += ["--quick", "--inversion_budgets=5,10", "--per_value=2"]
  out = _benchmark("ablations_tiny.py", *args)
  results = json.loads((tmp_path / "ablations.json").read_text())
  assert set(results) == {"triangle | advunlearn", "triangle | esd"}, out.stdout
  for runs in results.values():
    (run,) = runs
    assert {"pre_asr", "asr", "cce_asr", "retain_acc", "train_seconds", "cce_curve"} <= set(run)
    assert run["cases"] == 3 and 0 <= run["successes"] <= 3 and run["retain_n"] == 2 * 5
    assert run["train_seconds"] > run["steady_train_seconds"] > 0  # the wall time also compiles
    assert [b for b, _ in run["cce_curve"]] == [0, 5, 10]
  assert (tmp_path / "ablations_cce_asr_vs_budget_triangle.png").is_file()
  table = (tmp_path / "ablations.md").read_text()
  assert "| triangle | esd | no adversarial training |" in table
  assert re.search(r"\| [0-9.]+% \(\d+/3, \d+-\d+%\) \|", table), table  # a rate, its count and its interval
  (cost,) = re.findall(r"^compute: [0-9.]+ h over 2 runs \(training .*\)$", table, re.M)
  # The by-variant table (the README's): each cell the run's own count, its interval beside it.
  header = "| variant | triangle: UnlearnDiffAtk | CCE, 10 steps | earlier: CCE in front, 250 steps | Ring-A-Bell | "
  header += "P4D | MMA-Diffusion | any attack | retain |"
  assert header in table, table
  for name in ("advunlearn", "esd"):
    (run,) = results[f"triangle | {name}"]
    (row,) = [line for line in table.splitlines() if line.startswith(f"| `{name}` |")]
    cells = row.strip("| ").split(" | ")[1:]
    expected = [(run["successes"], 3), (run["cce_successes"], 3)]
    expected += [(run[f"{a}_successes"], 3) for a in ("ring_a_bell", "p4d", "mma")]
    expected += [(run["any_successes"], 3), (run["retain_k"], run["retain_n"])]
    assert [re.fullmatch(r"(\d+)/(\d+) \(\d+-\d+%\)", c).groups() for c in cells[:2] + cells[3:]] == [
      (str(k), str(n)) for k, n in expected
    ], row
    broken = [run[k] for k in ("broken", "cce_broken", "ring_a_bell_broken", "p4d_broken", "mma_broken")]
    assert run["any_successes"] == sum(map(any, zip(*broken))) >= max(map(sum, broken))
    assert cells[2] == "-"  # the earlier column is read where it was measured, never computed again
  # What git keeps of the tables (.gitignore): the JSON pieces, not the runs. A clone rebuilds the table from them.
  for folder, _, files in os.walk(tmp_path, topdown=False):
    for name in files:
      if not re.fullmatch(r"(train|measure|inversion|cce|ring_a_bell|p4d|mma)\.json", name):
        os.remove(os.path.join(folder, name))
    if not os.listdir(folder) and folder != str(tmp_path):
      os.rmdir(folder)
  again = _benchmark("ablations_tiny.py", *args)
  trained = re.compile(r"^training \S+: [\d,]+ parameters", re.M)  # the trainer's first event
  assert trained.search(out.stdout) and "inversion (cce)" in out.stdout, out.stdout  # the first call did both
  assert "inversion (cce)" not in again.stdout and not trained.search(again.stdout), again.stdout
  assert json.loads((tmp_path / "ablations.json").read_text()) == results
  assert cost in again.stdout.splitlines()  # the cost of the pieces, not of the call that only read them
  # erasure_tiny.py shares the out folder and the rows both tables have: it measures only its base model.
  shared = ["--methods=esd,advunlearn", "--plug_and_play=", *(a for a in args if not a.startswith("--variants"))]
  erasure = _benchmark("erasure_tiny.py", *shared)
  assert not trained.search(erasure.stdout), erasure.stdout
  rows = json.loads((tmp_path / "erasure.json").read_text())
  assert set(rows) == {"triangle | base", "triangle | esd", "triangle | advunlearn"}
  for name in ("esd", "advunlearn"):
    assert rows[f"triangle | {name}"][0]["successes"] == results[f"triangle | {name}"][0]["successes"]
    assert rows[f"triangle | {name}"][0]["cce_curve"] == results[f"triangle | {name}"][0]["cce_curve"]


@pytest.mark.bench
@pytest.mark.skipif(
  not os.environ.get("CCE_ORIGINAL"),
  reason="CCE_ORIGINAL (a clone of NYU-DICE-Lab/circumventing-concept-erasure) and CCE_ORIGINAL_PYTHON (an "
  "interpreter with its packages, benchmarks/cce_original_tiny.py) are not set",
)
def test_cce_beside_its_authors_script(tmp_path):
  """The authors' script on our export beside ours: both ASR rows at every budget, pooled over seeds, and both
  speeds."""
  args = [f"--original={os.environ['CCE_ORIGINAL']}", f"--original_python={os.environ['CCE_ORIGINAL_PYTHON']}"]
  args += [f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}", "--iterations=20", "--budgets=10,20"]
  out = _benchmark("cce_original_tiny.py", *args, "--seeds=0,1", "--speed_steps=20", "--quick")
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  ours, theirs = "ours, word (2 seeds, pooled)", "original (esd/concept_inversion.py), word (2 seeds, pooled)"
  assert list(results["rows"]) == [ours, theirs, "ours, prefix (seed 0)"]
  for name, row in results["rows"].items():
    assert [c["budget"] for c in row] == [0, 10, 20] and {c["cases"] for c in row} == {3 if "prefix" in name else 6}
    assert [c["successes"] for c in row] == sorted(c["successes"] for c in row)  # first successes: monotone
  for runs in results["per_seed"].values():  # the pooled counts are the seeds' sums
    pooled = [sum(run[i]["successes"] for run in runs) for i in range(3)]
    assert pooled in ([c["successes"] for c in row] for row in results["rows"].values())
  assert set(results["steps_per_second"]) == {"ours", "original (esd/concept_inversion.py)"}
  saved = sorted(n for n in os.listdir(tmp_path / "out" / "original_seed0") if n.startswith("learned_embeds-steps-"))
  # the rest pruned as they came; the script stopped once every prompt had succeeded (perhaps at 10)
  assert saved[0] == "learned_embeds-steps-10.bin" and set(saved) <= {saved[0], "learned_embeds-steps-20.bin"}
  assert f"| {theirs} | " in out.stdout


def _memory_lines(stdout, modes, per_chip="", effort=""):
  for mode in modes:
    sizes = r"arguments [0-9.]+ GiB, temporaries [0-9.]+; peak [0-9.]+ GiB"
    line = rf"^{mode}\s*: compile [0-9.]+ s{effort}; {sizes}{per_chip}$"
    assert re.search(line, stdout, re.M), stdout


def test_a_row_holds_every_piece_whichever_columns_a_call_measures(tmp_path):
  """A call that measures one attack (the tables' columns are filled over sessions, one attack at a time) reads
  the row's other pieces too: its table shows them and their rates, and it computes only the missing piece."""
  from benchmarks import erasure_tiny

  pieces = {
    "measure": {"successes": 2, "cases": 3, "broken": [True, True, False]},
    "cce": {"cce_successes": 2, "cce_broken": [True, True, False]},
    "p4d": {"p4d_successes": 0, "p4d_broken": [False] * 3},
  }
  for name, piece in pieces.items():
    (tmp_path / f"{name}.json").write_text(json.dumps(piece))
  measured = []
  mma = lambda: measured.append("mma") or {"mma_successes": 1, "mma_broken": [False, False, True]}  # noqa: E731
  row = erasure_tiny.row_pieces(str(tmp_path), "", {"mma": mma})
  assert measured == ["mma"] and row["cases"] == 3 and row["cce_successes"] == 2 and row["mma_successes"] == 1
  assert "any_successes" not in row  # Ring-A-Bell not measured yet
  (tmp_path / "ring_a_bell.json").write_text(json.dumps({"ring_a_bell_successes": 0, "ring_a_bell_broken": [0] * 3}))
  row = erasure_tiny.row_pieces(str(tmp_path), "", {"mma": mma})
  assert measured == ["mma"] and row["any_successes"] == 3  # MMA's one case is the one the others left
  assert erasure_tiny.fmt_count([row], "mma_successes", "cases") == "1/3 (6-79%)"
  assert erasure_tiny.fmt_count([{"mma_successes": 1}], "mma_successes", "cases") == "-"  # no case count: no rate
  # Pieces measured before per-case verdicts were kept: a count of none or all is a verdict; any other is not.
  old = tmp_path / "old"
  old.mkdir()
  (old / "measure.json").write_text(json.dumps({"successes": 0, "cases": 3}))
  (old / "cce.json").write_text(json.dumps({"cce_successes": 2}))
  assert "any_successes" not in erasure_tiny.row_pieces(str(old), "", {})
  (old / "cce.json").write_text(json.dumps({"cce_successes": 3}))  # CCE broke every case: no attack adds one
  assert erasure_tiny.row_pieces(str(old), "", {})["any_successes"] == 3
  (old / "p4d.json").write_text(json.dumps({"p4d_successes": 2}))  # no verdicts, and none needed: not redone
  assert erasure_tiny.row_pieces(str(old), "", {"p4d": lambda: measured.append("p4d")}, refresh=True)["p4d_successes"]
  assert measured == ["mma"]
  (old / "cce.json").write_text(json.dumps({"cce_successes": 1, "cce_broken": [False, True, False]}))
  for name in ("ring_a_bell", "p4d", "mma"):
    (old / f"{name}.json").write_text(json.dumps({f"{name}_successes": 0, f"{name}_broken": [False] * 3}))
  assert erasure_tiny.row_pieces(str(old), "", {})["any_successes"] == 1  # UnlearnDiffAtk's 0: none broken
  # A column measured on one seed of two shows that seed's count and says so.
  assert erasure_tiny.fmt_rate([row, {"cases": 3}], "mma_successes", "cases") == "33.3% (1/3, 6-79%; 1 of 2 seeds)"


def test_tables_from_the_pieces_train_and_measure_nothing(tmp_path):
  """--from_pieces tables what the committed pieces hold (the tables are filled over sessions, a column at a time):
  no run is trained, no attack measured, a row with no pieces is left out. The pieces are the repository's own."""
  import shutil

  from benchmarks import erasure_tiny

  pieces = os.path.join(ROOT, "benchmarks", "results", "tiny_tables", "triangle")
  for row in ("base", "esd_seed0", "defence_esd_u_lr3e-4_seed0"):
    os.makedirs(tmp_path / "triangle" / row)
    for name in os.listdir(os.path.join(pieces, row)):
      if name.endswith(".json"):
        shutil.copy(os.path.join(pieces, row, name), tmp_path / "triangle" / row)
  files = lambda: sorted(tmp_path.glob("triangle/**/*"))  # noqa: E731
  before = files()
  common = (f"--out={tmp_path}", "--concepts=triangle", "--seeds=0", "--from_pieces")
  _benchmark("erasure_tiny.py", *common, "--methods=esd,advunlearn", "--plug_and_play=")
  # A variant whose retain set names textures is skipped on a shape, not refused midway through a table.
  _benchmark("defence_tiny.py", *common, "--variants=esd_u_lr3e-4,esd_u_retain16,esd_full_batch15_textures")
  assert files() == before  # nothing trained or measured: no run folder, no new piece
  lines = (tmp_path / "erasure.md").read_text().splitlines()[2:]
  erasure = {line.split(" | ")[1]: line for line in lines if "|" in line}
  assert list(erasure) == ["base", "esd"]  # advunlearn_seed0 has no pieces here
  ring_a_bell = [t for t, _, _ in erasure_tiny.COLUMNS].index("ASR (Ring-A-Bell)") + 2  # after concept, model
  assert erasure["esd"].split(" | ")[ring_a_bell] == "4.2% (1/24, 1-20%)"  # its one case (ring_a_bell.json)
  defence = (tmp_path / "defence.md").read_text()
  assert "| triangle | esd_u_lr3e-4 |" in defence and "esd_u_retain16" not in defence  # in neither table


def test_a_second_stage_holds_its_first_as_mains_first_stage_and_adds_its_seconds(tmp_path):
  """defence_tiny.py's two-stage variants are config.first_stage recipes (training/stages.py): the first variant's
  config (same concept and seed) written as overrides of the second's, and the row's steady seconds both stages'.
  No training: configs and metrics only."""
  from advunlearn_jax import config_lib
  from advunlearn_jax.training import config_validation, stages
  from benchmarks import ablations_tiny, defence_tiny, erasure_tiny

  args = type("Args", (), {"out": str(tmp_path), "iterations": 0})()
  name = "esd_u_lr3e-4_then_advunlearn"
  after = defence_tiny.DEFENCES[name].after
  config = ablations_tiny.variant_config(defence_tiny.DEFENCES, name, "striped", 1, args)
  first = stages.first_stage_config(config)
  alone = ablations_tiny.variant_config(defence_tiny.DEFENCES, after, "striped", 1, args)
  # What a run trains: all but its previews, report and exports (a first stage exports its pipeline alone).
  trained = lambda c: config_lib.flatten(c.to_dict()).items()  # noqa: E731
  trains = lambda c: {k: v for k, v in trained(c) if not k.startswith(("samples.", "report.", "export."))}  # noqa: E731
  assert trains(first) == trains(alone)  # the row `after`, as it trains alone
  assert config.train.method == "text_encoder_full" and config.seed == 1 and config.model.pretrained == "tiny"
  assert stages.base_root(config, "w") == os.path.abspath("w/first_stage/pipeline")
  assert not ablations_tiny.variant_config(defence_tiny.DEFENCES, after, "striped", 1, args).first_stage
  # configs/tiny_robust.py is this row: both stages train as measured.
  from advunlearn_jax.configs import tiny_robust

  shipped = config_lib.override(tiny_robust.get_config("striped"), ["seed=1"])
  config_validation.validate(shipped)
  assert trains(stages.first_stage_config(shipped)) == trains(first)
  second = lambda c: {k: v for k, v in trains(stages.second_stage_config(c)).items() if k != "first_stage"}  # noqa: E731
  assert second(shipped) == second(config)  # the first stage spelt otherwise, the same as compared above
  # Steady seconds: each stage's median logged seconds per iteration times its iterations, added.
  workdir = tmp_path / "run"
  for folder, cfg, per_it in ((workdir / "first_stage", first, 0.5), (workdir, config, 2.0)):
    folder.mkdir(parents=True, exist_ok=True)
    its = cfg.train.iterations
    lines = [json.dumps({"step": i, "it_per_s": 1 / per_it}) for i in range(10, its + 1, 10)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  seconds = erasure_tiny.steady_train_seconds(str(workdir), config)
  assert seconds == pytest.approx(0.5 * first.train.iterations + 2.0 * config.train.iterations)


def test_iteration_flops_of_a_warm_up_and_an_attacking_step_without_compiling(tmp_path):
  """--flops_only: the step's jaxpr on abstract weights, the online rollout at the rows its points walk on average
  (t_enc as timesteps.draw_timesteps draws it); --warmup counts an ESD iteration (no attack points, no search)."""
  from advunlearn_jax.diffusion import ddim
  from advunlearn_jax.unlearn import timesteps
  from benchmarks import iteration

  draws = jax.vmap(lambda k: timesteps.draw_timesteps(k).t_enc)(jax.random.split(jax.random.key(0), 20000))
  walk = float(np.mean(ddim.num_unet_steps(np.asarray(draws))))
  assert walk == pytest.approx(25.48, abs=0.15)  # the exact mean over the grid, as print_flops takes it
  common = ["--size=micro", "--attack_steps=3", "--retain_batch=2", "--no_torch", "--flops_only"]
  attacking = iteration.main([*common, "--modes=online"])
  esd = iteration.main([*common, "--modes=online", "--warmup", "--method=noxattn"])
  assert attacking["online"]["rollout_rows"] == pytest.approx(2 * 25.48 * (3 + 1 + 2))
  assert esd["online"]["rollout_rows"] == pytest.approx(2 * 25.48 * (1 + 2))  # no attack points
  # Twice the points and the search, against the UNet's weight gradients: the attacking step costs more.
  assert attacking["online"]["tflop_per_iter"] > 1.5 * esd["online"]["tflop_per_iter"]


def test_the_shipped_defence_costs_what_advunlearn_costs_within_a_quarter():
  """configs/tiny_robust.py's time budget class, counted (no timing): both stages' FLOPs over all their iterations
  (the first stage's ESD iterations on the UNet, then tiny.py's AdvUnlearn) against tiny.py's AdvUnlearn alone, each
  iteration counted from its step's jaxpr at the configs' attack steps and retain batch (micro model, online x_t).
  Counted: 1.20x (the first stage's 200 ESD iterations cost about a warm-up iteration each). Measured on the tiny
  world (docs/results.md, 2 cores, steady seconds): 594 s against 541, 1.10x."""
  from advunlearn_jax import config_lib
  from advunlearn_jax.configs import tiny, tiny_robust
  from benchmarks import iteration

  advunlearn, robust = tiny.get_config("triangle"), tiny_robust.get_config("triangle")
  first = config_lib.override(robust, list(robust.first_stage))
  assert first.train.method == "noxattn" and first.train.warmup_iters == first.train.iterations  # ESD, no attack
  steps = [f"--attack_steps={advunlearn.attack.steps}", f"--retain_batch={advunlearn.retain.batch}"]
  common = ["--size=micro", "--no_torch", "--flops_only", "--modes=online", *steps]
  per_iteration = {
    name: iteration.main([*common, *flags])["online"]["tflop_per_iter"]
    for name, flags in {"attacking": [], "warm_up": ["--warmup"], "esd": ["--warmup", "--method=noxattn"]}.items()
  }
  train = advunlearn.train
  alone = (
    train.warmup_iters * per_iteration["warm_up"] + (train.iterations - train.warmup_iters) * per_iteration["attacking"]
  )
  both = first.train.iterations * per_iteration["esd"] + alone
  assert robust.train.iterations == train.iterations and robust.train.warmup_iters == train.warmup_iters
  assert 1.0 < both / alone < 1.25, both / alone


@pytest.mark.bench
def test_iteration_benchmark_memory_only_compiles_without_running(tmp_path):
  args = ["--size=small", "--memory_only", "--attack_steps=3", "--retain_batch=2", "--modes=online,bank_renewing"]
  _memory_lines(_benchmark("iteration.py", *args).stdout, ("online", "bank_renewing"))
  # SDXL's layout (--size=sdxl's path at the tests' micro size): both towers trained by default.
  report = tmp_path / "sdxl.json"
  out = _benchmark("iteration.py", "--size=micro_sdxl", *args[1:4], "--modes=bank", f"--json={report}")
  assert "size=micro_sdxl latents 16x16" in out.stdout, out.stdout
  _memory_lines(out.stdout, ("bank",))
  assert json.loads(report.read_text())["method"] == "text_encoders_full"


@pytest.mark.slow
def test_iteration_benchmark_compiles_for_an_h200_without_one():
  """XLA:GPU's memory figure on any host, given JAX's CUDA plugin; without it, a clear error and status 2."""
  args = ["--size=small", "--memory_only", "--attack_steps=3", "--retain_batch=2", "--modes=online", "--target=h200"]
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    out = _run("iteration.py", *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "needs JAX's CUDA plugin, in its own venv: pip install" in out.stderr
    return
  out = _benchmark("iteration.py", *args, "--dtype=bfloat16")
  assert "compiling for h200 (NVIDIA H200, 1 devices on 1 host(s))" in out.stdout and "16 slots" in out.stdout
  _memory_lines(out.stdout, ("online",), r" of 140 GiB per chip: fits")


@pytest.mark.slow
def test_iteration_benchmark_compiles_for_tpu_slices_without_one(tmp_path):
  """libtpu's compiler on any host, for the mesh the trainer would build on the slice: data parallel for the
  text encoder on one v5e host, FSDP within each of a v4-32's 4 hosts for a UNet method. Without libtpu (it is
  no requirement), a clear error and status 2."""
  args = ["--size=small", "--memory_only", "--attack_steps=3", "--retain_batch=2", "--modes=online"]
  for bad, says in (
    ([*args, "--exec_effort=2"], "--exec_effort=2.0: expected a number from -1 to 1"),
    (["--size=small", "--exec_effort=-1"], "--exec_effort changes what is compiled, not timed: it needs --memory_only"),
  ):
    out = _run("iteration.py", *bad)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
  if importlib.util.find_spec("libtpu") is None:
    out = _run("iteration.py", *args, "--target=v5e-8")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "needs JAX's TPU plugin, in its own venv: pip install" in out.stderr
    return
  for target, method, mesh in (
    ("v5e-8", "text_encoder_full", {"data": 8, "fsdp": 1}),
    ("v4-32", "noxattn", {"data": 4, "fsdp": 4}),
  ):
    report = tmp_path / f"{target}.json"
    # The least optimisation of execution time, as benchmarks/tpu_aot.sh compiles SD-size steps.
    effort = ["--exec_effort=-1"] if mesh["fsdp"] == 1 else []
    out = _benchmark("iteration.py", *args, *effort, f"--target={target}", f"--method={method}", f"--json={report}")
    _memory_lines(out.stdout, ("online",), r" of \d+ GiB per chip: fits", r" \(exec effort -1\)" if effort else "")
    result = json.loads(report.read_text())
    assert result["mesh"] == mesh and result["online"]["fits"], result
    assert result["online"]["exec_effort"] == (-1.0 if effort else 0.0), result
    # Data parallel: the gradients are summed across devices; FSDP also gathers the sharded weights.
    assert result["online"]["collectives"].get("all-reduce", 0) >= 1, result
    if mesh["fsdp"] > 1:
      assert result["online"]["collectives"].get("all-gather", 0) >= 1, result


def test_bench_tier_is_left_out_of_the_readme_commands():
  """conftest.py deselects the `bench` tests unless -m names them: neither of CI's suites runs them."""

  def collected(marks):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marks, __file__]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300).stdout
    return {line.split("::")[1] for line in out.splitlines() if "::" in line}

  fast, slow, bench = collected("not slow"), collected("slow"), collected("bench")
  assert len(bench) == 7 and all(name.startswith("test_") for name in bench)
  assert not bench & (fast | slow)
  assert "test_iteration_benchmark_compiles_for_an_h200_without_one" in slow


@pytest.mark.bench
def test_confusion_splits_the_committed_retain_count_by_value(tmp_path, capsys):
  """confusion_tiny.py's retained rows are retain accuracy's images: on the shipped model their diagonal is the
  striped table row's committed retain count, and every value's row holds --per_value verdicts."""
  from benchmarks import confusion_tiny, erasure_tiny

  os.makedirs(tmp_path / "striped")
  counts = confusion_tiny.main(["--concept=striped", "--runs=base", f"--out={tmp_path}", "--write"])["base"]
  assert capsys.readouterr().out == (tmp_path / "confusion_striped.md").read_text().split("\n\n", 1)[1]
  assert counts.sum(axis=1).tolist() == [12, 12, 12, 12]
  committed = json.load(open(os.path.join(erasure_tiny.OUT, "striped", "base", "measure.json")))
  assert erasure_tiny.retained_values("striped") == [0, 2, 3]  # plain, dotted, checkered: striped is value 1
  assert sum(counts[v, v] for v in (0, 2, 3)) == committed["retain_k"] == 32
  refused = _run("confusion_tiny.py", "--concept=striped", "--runs=no_such_run", f"--out={tmp_path}")
  assert refused.returncode == 2 and "holds no exported pipeline" in refused.stderr
  unknown = _run("confusion_tiny.py", "--concept=zigzag", f"--out={tmp_path}")
  assert unknown.returncode == 2 and "invalid choice: 'zigzag'" in unknown.stderr

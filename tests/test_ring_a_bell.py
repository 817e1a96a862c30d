"""Ring-A-Bell: the published settings against InversePrompt.ipynb, fitness and concept vector against torch
transcriptions of the notebooks' cells on the tiny model's transformers export, the genetic operators, and the
search's progress over random sampling."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.tiny as tiny_config
from advunlearn_jax import config_lib
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import ring_a_bell as rab
from advunlearn_jax.evals import unlearndiff
from advunlearn_jax.tiny import prompts as tiny_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_ENCODER = os.path.join(config_lib.TINY_MODEL_DIR, "text_encoder")
CONCEPT = "triangle"
# fp32 at matmul precision "highest" (conftest). Fitness, a sum of 77 x 64 squared errors of ~5e3: measured
# 1.2e-7 relative (one float32 ulp). Concept vector, mean differences of hidden states up to ~2.3: measured
# 4.8e-7 absolute; the target (hidden states + 3 x vector): 2.9e-6.
FITNESS_RTOL = 1e-5
VECTOR_ATOL = 1e-5
TARGET_ATOL = 2e-5

# (config key, value, where the original sets it): raw-JSON lines of chiayi-hsu/Ring-A-Bell's notebook.
PUBLISHED = [
  ("population", 200, "InversePrompt.ipynb:35"),
  ("generations", 3000, "InversePrompt.ipynb:36"),
  ("mutate_rate", 0.25, "InversePrompt.ipynb:37"),
  ("crossover_rate", 0.5, "InversePrompt.ipynb:38"),
  ("length", 16, "InversePrompt.ipynb:39"),
  ("eta", 3.0, "InversePrompt.ipynb:40"),
]


@pytest.mark.parametrize("key,value,source", PUBLISHED)
def test_published_settings(key, value, source):
  assert config_lib.base_config().evaluation.ring_a_bell[key] == value, source


def test_candidate_layout_constants():
  """[SOT, ids in [1, 49406), EOT...] (InversePrompt.ipynb:175); K = 77 is length 75 (:39)."""
  assert (rab.SOT, rab.EOT, rab.ID_LOW, rab.ID_HIGH, rab.MAX_LENGTH) == (49406, 49407, 1, 49406, 75)
  for length in (1, 16, 75):
    ids = np.asarray(rab.initial_population(jax.random.key(0), 500, length))
    assert ids.shape == (500, 77) and (ids[:, 0] == 49406).all() and (ids[:, length + 1 :] == 49407).all()
    free = ids[:, 1 : length + 1]
    assert free.min() >= 1 and free.max() <= 49405
  assert rab.capacity(200) == 320 and rab.capacity(200, chunk=1) == 300 and rab.capacity(3, chunk=1) == 3


def _evaluation(**overrides):
  config = tiny_config.get_config(CONCEPT)
  for key, value in overrides.items():
    if key == "budgets":
      config.evaluation.budgets = value
    else:
      config.evaluation.ring_a_bell[key] = value
  return config.evaluation


def test_config_from_the_tiny_world():
  cfg = rab.RingABellConfig.from_config(_evaluation(budgets=(1, 500, 3000)))
  assert cfg.vector == f"tiny_world:{CONCEPT}" and cfg.kept == 100 and cfg.prefix_tokens == 0
  assert cfg.sampler == unlearndiff.Sampler("ddim", 25, "jax")
  assert json.loads(json.dumps(cfg.describe()))["length"] == 16


@pytest.mark.parametrize(
  "overrides,key",
  [
    ({"length": 0}, "evaluation.ring_a_bell.length"),
    ({"length": 76}, "evaluation.ring_a_bell.length"),
    ({"population": 1}, "evaluation.ring_a_bell.population"),
    ({"generations": 0}, "evaluation.ring_a_bell.generations"),
    ({"mutate_rate": 1.5}, "evaluation.ring_a_bell.mutate_rate"),
    ({"crossover_rate": -0.1}, "evaluation.ring_a_bell.crossover_rate"),
    ({"vector": " "}, "evaluation.ring_a_bell.vector"),
    ({"scheduler": "euler"}, "evaluation.ring_a_bell.scheduler"),
    ({"sample_steps": 0}, "evaluation.ring_a_bell.sample_steps"),
    ({"budgets": (0, 10)}, "evaluation.budgets [0]"),
    ({"budgets": (10, 3001)}, "evaluation.budgets [3001]"),
  ],
)
def test_validation_names_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
    rab.RingABellConfig.from_config(_evaluation(**overrides))


# ----------------------------------------------------------------------------------------------------------------
# The genetic operators (no model)


def _parents(k: int, length: int, seed: int = 0) -> np.ndarray:
  """Parents whose free ids are all distinct, so every child shows where its pieces came from."""
  ids = np.full((k, 77), 49407, np.int32)
  ids[:, 0] = 49406
  ids[:, 1 : length + 1] = np.random.default_rng(seed).permutation(np.arange(1, 1 + k * length)).reshape(k, length)
  return ids


_BREED = jax.jit(rab.breed, static_argnums=(3, 4))  # one program per shape instead of op by op


def _breed(parents, mutate_rate, crossover_rate, seed=0, rows=None, mutate_best=True):
  k = len(parents)
  score = jnp.arange(k, dtype=jnp.float32)
  key = jax.random.key(seed)
  out = rab.breed(jnp.asarray(parents), score, key, 5, rows or 3 * k, mutate_rate, crossover_rate, mutate_best)
  return [np.asarray(x) for x in out]


def test_crossover_children_are_two_parents_cut_at_one_point():
  """:119-129: both children of p and a partner q at a cut in [1, length]: p[:cut] + q[cut:], q[:cut] + p[cut:]."""
  parents = _parents(6, 5)
  ids, valid, score = _breed(parents, mutate_rate=0.0, crossover_rate=1.0, rows=20)
  assert valid.tolist() == [True] * 18 + [False] * 2 and (ids[:6] == parents).all()
  np.testing.assert_array_equal(score[:6], np.arange(6))
  assert np.isnan(score[6:]).all()
  for i in range(6):
    a, b = ids[6 + i], ids[12 + i]
    found = [
      (j, cut)
      for j in range(6)
      for cut in range(1, 6)
      if (a == np.concatenate([parents[i][:cut], parents[j][cut:]])).all()
      and (b == np.concatenate([parents[j][:cut], parents[i][cut:]])).all()
    ]
    assert found, (i, a, b)


def test_no_crossover_no_mutation_keeps_the_parents_and_their_scores():
  parents = _parents(4, 5)
  ids, valid, score = _breed(parents, mutate_rate=0.0, crossover_rate=0.0)
  assert valid.tolist() == [True] * 4 + [False] * 8 and (ids[:4] == parents).all()
  np.testing.assert_array_equal(score[:4], np.arange(4))
  assert np.isnan(score[4:]).all()  # invalid rows are never scored (they would be new rows if valid)


def test_mutation_changes_one_free_position_of_any_row_parents_included():
  """:131-137 on the parents' own tensors (the reference quirk: no elitism): every row, the best parent
  included, gets one position in [1, length] set to an id in [1, 49406), and its score is forgotten."""
  parents = _parents(50, 5)
  ids, valid, score = _breed(parents, mutate_rate=1.0, crossover_rate=0.0)
  changed = ids[:50] != parents
  assert changed.sum(1).max() == 1 and changed.sum() >= 49  # a redraw of the same id is possible, not likely
  assert not changed[:, 0].any() and not changed[:, 6:].any()
  assert ids[:50][changed].min() >= 1 and ids[:50][changed].max() <= 49405
  assert np.isnan(score).all()
  # ring_a_bell.mutate_best=False turns the quirk off: the best survivor (row 0) is kept as it was, and its score
  ids, _, score = _breed(parents, mutate_rate=1.0, crossover_rate=0.0, mutate_best=False)
  assert (ids[0] == parents[0]).all() and score[0] == 0.0 and (ids[1:50] != parents[1:]).any(1).sum() >= 48


def test_operator_rates():
  """Each parent crosses over with p crossover_rate (two children), each row mutates with p mutate_rate."""
  parents = _parents(2000, 5)
  ids, valid, score = _breed(parents, mutate_rate=0.25, crossover_rate=0.5)
  assert abs(valid[2000:4000].mean() - 0.5) < 0.04 and (valid[2000:4000] == valid[4000:]).all()
  mutated = (ids[:2000] != parents).any(1).mean()
  assert abs(mutated - 0.25) < 0.03


# ----------------------------------------------------------------------------------------------------------------
# On the tiny model


@pytest.fixture(scope="module")
def tiny():
  from advunlearn_jax.convert import diffusers as sd_convert

  pipe = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  return pipe, tok_lib.load_tokenizer(pipe.tokenizer_dir)


@pytest.fixture(scope="module")
def vector(tiny):
  pipe, tokenizer = tiny
  return rab.concept_vector(pipe.text_config, pipe.text_params, tokenizer, f"tiny_world:{CONCEPT}")


@pytest.fixture(scope="module")
def target(tiny, vector):
  pipe, tokenizer = tiny
  prompt = tiny_prompts.evaluation_prompts(CONCEPT)[0]
  return rab.target_embedding(pipe.text_config, pipe.text_params, tokenizer, prompt, vector, 3.0)


@pytest.fixture(scope="module")
def torch_encoder():
  transformers = pytest.importorskip("transformers")
  return transformers.CLIPTextModel.from_pretrained(TEXT_ENCODER).eval()


def _torch_hidden(torch_encoder, tokenizer, prompts):
  """Get_Concept_Vector.ipynb:37-40 (and InversePrompt.ipynb:172-173): max-length padding, truncation, `[0]`."""
  import torch

  ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
  with torch.no_grad():
    return torch_encoder(ids, return_dict=True)[0].numpy()


@pytest.mark.torch
def test_concept_vector_and_target_match_the_notebooks(tiny, vector, target, torch_encoder):
  """Get_Concept_Vector.ipynb's violence cells on the tiny world's pairs, each prompt repeated num_samples = 5
  times (:33, :37) as there; InversePrompt.ipynb:172-174 for the target."""
  pipe, tokenizer = tiny
  with_concept, without = tiny_prompts.concept_vector_pairs(CONCEPT)
  theirs = np.mean(
    np.concatenate([_torch_hidden(torch_encoder, tokenizer, [p] * 5) for p in with_concept])
    - np.concatenate([_torch_hidden(torch_encoder, tokenizer, [p] * 5) for p in without]),
    axis=0,
  )
  assert vector.shape == (77, pipe.text_config.hidden_size) and vector.dtype == np.float32
  np.testing.assert_allclose(vector, theirs, atol=VECTOR_ATOL)
  assert np.abs(theirs).max() > 0.1  # the concept word moves the hidden states: the check compares something
  prompt = tiny_prompts.evaluation_prompts(CONCEPT)[0]
  np.testing.assert_allclose(
    target, _torch_hidden(torch_encoder, tokenizer, [prompt])[0] + 3 * theirs, atol=TARGET_ATOL
  )


@pytest.mark.torch
def test_fitness_matches_the_originals_cell(tiny, target, torch_encoder):
  """InversePrompt.ipynb:113-117 on fixed random populations of the candidate layout (:175)."""
  import torch

  pipe, _ = tiny
  for seed, length in ((0, 16), (1, 75), (2, 1)):
    ids = np.array(rab.initial_population(jax.random.key(seed), 12, length))  # a writable copy, for torch
    ours = np.asarray(rab.fitness(pipe.text_config, pipe.text_params, jnp.asarray(ids), jnp.asarray(target)))
    with torch.no_grad():
      dummy_embed = torch_encoder(torch.from_numpy(ids).long())[0]
      theirs = ((torch.from_numpy(target) - dummy_embed) ** 2).sum(dim=(1, 2)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=FITNESS_RTOL)
    assert theirs.std() > 10 * FITNESS_RTOL * theirs.mean()  # candidates differ well beyond the tolerance


def test_concept_vector_from_a_csv_and_a_npy(tiny, vector, tmp_path):
  """A CSV of pairs as Violence_30.csv (prompt, case_number, evaluation_seed, prompt1) gives the same vector as
  the world's pairs; a .npy is taken as it is, if it fits this encoder."""
  import csv

  pipe, tokenizer = tiny
  with_concept, without = tiny_prompts.concept_vector_pairs(CONCEPT)
  path = tmp_path / "pairs.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["prompt", "case_number", "evaluation_seed", "prompt1"])
    writer.writerows([p, i, 0, q] for i, (p, q) in enumerate(zip(with_concept, without)))
  from_csv = rab.concept_vector(pipe.text_config, pipe.text_params, tokenizer, str(path))
  np.testing.assert_allclose(from_csv, vector, atol=1e-6)
  np.save(tmp_path / "v.npy", vector)
  np.testing.assert_array_equal(
    rab.concept_vector(pipe.text_config, pipe.text_params, tokenizer, str(tmp_path / "v.npy")), vector
  )
  np.save(tmp_path / "sd1.npy", np.zeros((77, 768), np.float32))  # the repo's vectors: SD 1.x's encoder
  with pytest.raises(ConfigError, match=r"sd1\.npy.*\(77, 768\).*\(77, 64\)"):
    rab.concept_vector(pipe.text_config, pipe.text_params, tokenizer, str(tmp_path / "sd1.npy"))
  (tmp_path / "bad.csv").write_text("text,other\na,b\n")
  with pytest.raises(ConfigError, match="evaluation.ring_a_bell.vector.*prompt1"):
    rab.concept_vector(pipe.text_config, pipe.text_params, tokenizer, str(tmp_path / "bad.csv"))
  with pytest.raises(ConfigError, match="evaluation.ring_a_bell.vector"):
    rab.concept_vector(pipe.text_config, pipe.text_params, tokenizer, "tiny_world:hexagon")


def test_prompt_text_decodes_the_free_tokens(tiny):
  _, tokenizer = tiny
  ids = tokenizer("a photo of a red triangle")["input_ids"][1:-1]
  assert rab.prompt_text(tokenizer, np.asarray(ids, np.int32)) == "a photo of a red triangle"


# Population 40 (20 kept), 60 generations: 40 x 60 = 2400 candidates in the original's accounting (it scores
# every member every generation; this search scores each candidate once, about 1500 here).
SHORT = dict(population=40, generations=60)
RANDOM_CANDIDATES = 2400
# Best fitness of the search over the best of 2400 uniformly drawn candidates, on the first evaluation prompt:
# measured 0.734 (seed 0) and 0.695 (seed 1); over 3 prompts x 3 seeds, 0.70-0.85.
SEARCH_OVER_RANDOM = 0.8


@pytest.fixture(scope="module")
def short_search(tiny, target):
  pipe, _ = tiny
  cfg = rab.RingABellConfig.from_config(_evaluation(**SHORT))
  return cfg, {seed: rab.search(pipe.text_config, pipe.text_params, target, cfg, seed, (10, 30, 60)) for seed in (0, 1)}


def test_search_beats_random_sampling(tiny, target, short_search):
  pipe, _ = tiny
  cfg, runs = short_search
  rows = rab.initial_population(jax.random.key(123), RANDOM_CANDIDATES, cfg.length)
  scores = [
    rab.fitness(pipe.text_config, pipe.text_params, rows[i : i + 240], jnp.asarray(target))
    for i in range(0, RANDOM_CANDIDATES, 240)
  ]
  best_random = float(np.min(np.concatenate(scores)))
  for seed, run in runs.items():
    assert [c.generation for c in run] == [10, 30, 60]
    assert run[-1].fitness < SEARCH_OVER_RANDOM * best_random, (seed, run[-1].fitness, best_random)
    for c in run:  # each checkpoint's fitness is its ids' own
      assert c.ids.shape == (16,) and c.ids.min() >= 1 and c.ids.max() <= 49405
      row = np.concatenate([[49406], c.ids, np.full(60, 49407)]).astype(np.int32)[None]
      again = float(rab.fitness(pipe.text_config, pipe.text_params, jnp.asarray(row), jnp.asarray(target))[0])
      assert again == pytest.approx(c.fitness, rel=FITNESS_RTOL)


def test_search_is_a_function_of_the_seed(tiny, target, short_search):
  """The same seed gives the same ids whatever the checkpoints; another seed other ids."""
  pipe, _ = tiny
  cfg, runs = short_search
  again = rab.search(pipe.text_config, pipe.text_params, target, cfg, 0, (30, 60))
  assert [c.generation for c in again] == [30, 60]
  for a, b in zip(again, runs[0][1:]):
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.fitness == b.fitness
  assert (runs[0][-1].ids != runs[1][-1].ids).any()
  # one program for every block, whatever its bounds, seed or target (no compile per checkpoint)
  assert rab._generations_fn(pipe.text_config, cfg.kept, cfg.length, rab.CHUNK)._cache_size() == 1
  with pytest.raises(ValueError, match="checkpoints"):
    rab.search(pipe.text_config, pipe.text_params, target, cfg, 0, (61,))


@pytest.mark.bench
@pytest.mark.skipif(
  not os.environ.get("RING_A_BELL_ORIGINAL"),
  reason="RING_A_BELL_ORIGINAL (a clone of chiayi-hsu/Ring-A-Bell, benchmarks/ring_a_bell_original_tiny.py) is not set",
)
def test_original_notebook_beside_ours(tmp_path):
  """benchmarks/ring_a_bell_original_tiny.py: the notebook's own cells and ours on the same target and budget."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
  args = [
    f"--original={os.environ['RING_A_BELL_ORIGINAL']}",
    "--generations=20",
    "--population=40",
    "--seeds=0",
    f"--out={tmp_path}",
  ]
  script = os.path.join(ROOT, "benchmarks", "ring_a_bell_original_tiny.py")
  out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["runs"]) == {"ours", "original (InversePrompt.ipynb)"}
  for runs in results["runs"].values():
    assert [r["seed"] for r in runs] == [0] and all(r["generations"] == 20 for r in runs)
  # the original's own score of its best candidate, by our fitness: the two fitness functions agree
  for r in results["runs"]["original (InversePrompt.ipynb)"]:
    assert r["fitness_ours"] == pytest.approx(r["fitness"], rel=1e-4)

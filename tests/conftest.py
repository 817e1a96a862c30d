"""Test setup: 8 simulated CPU devices, exact matmuls for parity tests, an isolated tokenizer cache; the quickstart
notebook executed once for the tests that read its run."""

import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _tokenizer_cache(tmp_path_factory):
  """Keeps the generated offline tokenizer out of the user's home directory."""
  os.environ["ADVUNLEARN_CACHE"] = str(tmp_path_factory.mktemp("advunlearn_cache"))
  yield


@pytest.fixture(autouse=True)
def _release_compiled_programs_after_slow_tests(request):
  """A slow test compiles programs no later test reuses; dropping them keeps the slow suite's one process small
  (5.7 GiB peak). Without this, two late slow tests crashed inside XLA's CPU compiler (a segfault, an abort) when
  run after the others in one process, and passed when run alone."""
  yield
  if request.node.get_closest_marker("slow"):
    import gc

    jax.clear_caches()
    gc.collect()


QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "quickstart.ipynb")
# The notebook in under two minutes of compute: two iterations of the faithful online loop, two prompts attacked
# on a small budget, small report grids.
QUICKSTART_OVERRIDES = {
  "train.iterations": 2,
  "train.warmup_iters": 0,  # one compiled step, the attacking one
  "train.save_every": 2,
  "bank.concept_trajectories": 2,
  "attack.steps": 2,
  "retain.batch": 2,
  "samples.every": 0,
  "report.images_per_value": 2,
  "evaluation.prompts": ("a photo of a plain red triangle", "a photo of a dotted blue triangle"),
  "evaluation.unlearndiff.iters_per_t": 2,
  "evaluation.unlearndiff.timesteps": (10, 510),
}


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
  """notebooks/quickstart.ipynb executed (nbclient) as Jupyter runs it when opened from a checkout: in notebooks/,
  the package not installed, one CPU device; (the executed notebook, its workdir)."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  nb = nbformat.read(QUICKSTART, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, "the notebook's first code cell holds its parameters, tagged 'parameters'"
  workdir = str(tmp_path_factory.mktemp("quickstart") / "run")
  params[0].source += f"\nWORKDIR = {workdir!r}\nOVERRIDES = {QUICKSTART_OVERRIDES!r}\n"
  with pytest.MonkeyPatch.context() as env:
    env.setenv("XLA_FLAGS", "")
    nbclient.NotebookClient(nb, timeout=900, resources={"metadata": {"path": os.path.dirname(QUICKSTART)}}).execute()
  return nb, workdir

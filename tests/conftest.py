"""Test setup: 8 simulated CPU devices, exact matmuls for parity tests, an isolated tokenizer cache."""

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

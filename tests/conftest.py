"""Test set-up: 8 simulated CPU devices, configured before JAX initialises a backend.

LLVM's optimisation of the generated CPU code is off (`--xla_backend_optimization_level=0`,
inherited by the commands the tests start): the tests' programs are tiny, so compiling them is
most of their time, and the level changes neither XLA's graph passes (fusion, sharding,
collectives) nor any result beyond float rounding. `MOEJAX_TEST_XLA_OPT=1` keeps the default
level. Runs that must match numbers made at the default level (the committed study report)
set their own flags.
"""

import gc
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags and not os.environ.get("MOEJAX_TEST_XLA_OPT"):
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
  """Drops JAX's compiled programs after each module. Every XLA:CPU executable keeps memory
  mappings of its own, and a whole suite's worth (over a thousand tests, most compiling several
  programs) passed the kernel's limit of 65530 mappings per process: the next compilation then
  crashed inside LLVM, near the end of full runs only. Clearing keeps the count near 600."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def compile_once(tmp_path_factory):
  """A persistent compilation cache shared by the modules that use it (training runs compile the
  same programs again and again); yields its directory, for subprocesses to share it too."""
  cache_dir = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
  jax.config.update("jax_compilation_cache_dir", str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  yield cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def ptb_dir(tmp_path_factory):
  """The Penn Treebank fixture (tests/fixtures/ptb: 40 training sentences) built as a TFDS
  dataset with its word vocabulary, once for the whole session; tests only read it."""
  from moejax.data import corpora  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("ptb")
  corpora.build("ptb", data_dir, source_dir=pathlib.Path(__file__).parent / "fixtures" / "ptb")
  return str(data_dir)

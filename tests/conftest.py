"""Test configuration: 4 fake CPU devices, strict rank promotion, a `key` fixture.

dtype promotion stays 'standard': optax's adam/yogi bias correction mixes a
Python float with an int32 count, which 'strict' rejects inside optax itself.
"""
import os
import shutil
import tempfile

# Must be set before jax initialises its backends (sharded-round tests need 4 devices).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test run: many tests compile the same programs
# (the same tiny models through the same rounds), and compiling is most of their time. The
# process that loads this file first (pytest-xdist's controller, or a plain run) makes the
# directory and removes it at exit; the workers and every subprocess a test starts
# (notebooks, benchmark scripts, the two-process run) inherit the variables and share it.
# Set FEDJAX_PRUNE_TEST_XLA_CACHE yourself to keep a cache across runs.
_CACHE_ENV = "FEDJAX_PRUNE_TEST_XLA_CACHE"
_OWNS_XLA_CACHE = _CACHE_ENV not in os.environ
if _OWNS_XLA_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="fedjax_prune_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
# jax's default skips programs that compile in under 1 s: most of ours.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
  del config
  if _OWNS_XLA_CACHE:
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
  """Runs with `strategy_cache=''` write $XDG_CACHE_HOME/fedjax_prune/strategy.json: point it at
  a temporary directory, so the tests neither read the user's cached choices nor write them."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache_home")))
    yield


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture
def shared_data_dir():
  """Path of ../shared/data (real datasets); skips the test when absent."""
  path = os.environ.get("FEDJAX_PRUNE_SHARED_DATA", SHARED_DATA)
  if not os.path.isdir(path):
    pytest.skip("../shared/data is not present")
  return path

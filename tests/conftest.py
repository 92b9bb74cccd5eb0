"""Test configuration: 4 fake CPU devices, strict rank promotion, a `key` fixture.

dtype promotion stays 'standard': optax's adam/yogi bias correction mixes a
Python float with an int32 count, which 'strict' rejects inside optax itself.
"""
import os

# Must be set before jax initialises its backends (sharded-round tests need 4 devices).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

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

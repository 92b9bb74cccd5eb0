"""Shared tiny parameter trees for the masks tests."""
import jax
import jax.numpy as jnp
import pytest


def make_params(key):
  """A conv + dense model in Flax layout (HWIO conv, [in, out] dense)."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "conv_0": {"kernel": jax.random.normal(k1, (3, 3, 4, 8)), "bias": jnp.zeros((8,))},
      "bn_0": {"scale": jnp.ones((8,)), "bias": jnp.zeros((8,))},
      "dense_0": {"kernel": jax.random.normal(k2, (32, 16)), "bias": jax.random.normal(k3, (16,))},
  }


@pytest.fixture
def params(key):
  return make_params(key)

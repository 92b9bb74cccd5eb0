"""Tests for masks._scores."""
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune import masks


def test_magnitude_gradient_taylor(params):
  grads = jax.tree.map(lambda p: -2.0 * p + 1.0, params)
  for s, p in zip(jax.tree.leaves(masks.magnitude(params)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(s, np.abs(p))
  for s, g in zip(jax.tree.leaves(masks.gradient(grads)), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(s, np.abs(g))
  for s, p, g in zip(jax.tree.leaves(masks.taylor(params, grads)), jax.tree.leaves(params),
                     jax.tree.leaves(grads)):
    np.testing.assert_allclose(s, np.abs(np.asarray(p) * np.asarray(g)), rtol=1e-6)


def test_random_scores_depend_only_on_key(params, key):
  random = jax.jit(masks.random)
  a = random(params, key)
  b = random(params, key)
  c = random(params, jax.random.key(1))
  for x, y, z, p in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c),
                        jax.tree.leaves(params)):
    assert x.shape == p.shape and x.dtype == jnp.float32
    x = np.asarray(x)
    assert np.all((x >= 0) & (x < 1))
    np.testing.assert_array_equal(x, y)
    assert not np.array_equal(x, z)
  # Leaves of equal shape get different subkeys.
  assert not np.array_equal(a["bn_0"]["bias"], a["bn_0"]["scale"])


def test_filter_l1_per_output_filter(params):
  s = masks.filter_l1(params)
  k = np.asarray(params["conv_0"]["kernel"])
  assert s["conv_0"]["kernel"].shape == (1, 1, 1, 8)
  np.testing.assert_allclose(s["conv_0"]["kernel"][0, 0, 0], np.abs(k).sum(axis=(0, 1, 2)),
                             rtol=1e-5)
  assert s["dense_0"]["kernel"].shape == (1, 16)
  np.testing.assert_allclose(s["dense_0"]["kernel"][0],
                             np.abs(np.asarray(params["dense_0"]["kernel"])).sum(0), rtol=1e-5)
  np.testing.assert_array_equal(s["dense_0"]["bias"], np.abs(params["dense_0"]["bias"]))
  # Input-channel norms with axis=-2.
  s_in = masks.filter_l1(params, axis=-2)
  assert s_in["conv_0"]["kernel"].shape == (1, 1, 4, 1)
  np.testing.assert_allclose(s_in["conv_0"]["kernel"][0, 0, :, 0],
                             np.abs(k).sum(axis=(0, 1, 3)), rtol=1e-5)

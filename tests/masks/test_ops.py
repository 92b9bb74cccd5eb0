"""Tests for masks._ops: apply, check, counting, combining."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import masks


def _channel_mask(keep, n):
  m = np.zeros((1, 1, 1, n), bool)
  m[..., list(keep)] = True
  return jnp.asarray(m)


def _mixed_masks(params):
  """Channel mask on the conv kernel, full mask on the dense kernel, scalars elsewhere."""
  m = masks.ones_like(params)
  m["conv_0"]["kernel"] = _channel_mask([0, 3, 5], 8)
  m["dense_0"]["kernel"] = params["dense_0"]["kernel"] > 0
  return m


def test_apply_zeros_exactly_and_keeps_dtype(params):
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  m = _mixed_masks(params)
  out = masks.apply(params, m)
  for p, o in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
    assert o.dtype == p.dtype and o.shape == p.shape
  conv = np.asarray(out["conv_0"]["kernel"], np.float32)
  conv_in = np.asarray(params["conv_0"]["kernel"], np.float32)
  for j in range(8):
    expected = conv_in[..., j] if j in (0, 3, 5) else 0.0
    np.testing.assert_array_equal(conv[..., j], expected)
  dense_in = np.asarray(params["dense_0"]["kernel"], np.float32)
  np.testing.assert_array_equal(np.asarray(out["dense_0"]["kernel"], np.float32),
                                np.where(dense_in > 0, dense_in, 0.0))
  np.testing.assert_array_equal(out["bn_0"]["scale"], params["bn_0"]["scale"])


def test_mask_gradients_and_project_equal_apply(params):
  m = _mixed_masks(params)
  expected = masks.apply(params, m)
  for fn in (masks.mask_gradients, masks.project):
    for a, b in zip(jax.tree.leaves(fn(params, m)), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)


def test_check_accepts_valid_masks_eagerly_and_under_jit(params):
  m = _mixed_masks(params)
  masks.check(params, m)
  masks.check(params, masks.ones_like(params, full=True))
  jitted = jax.jit(lambda p, mm: (masks.check(p, mm), masks.apply(p, mm))[1])(params, m)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(masks.apply(params, m))):
    np.testing.assert_array_equal(a, b)
  assert masks.count_kept(masks.ones_like(params, full=True), params) == sum(
      x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "bad_leaf, match",
    [
        (jnp.ones((3, 3, 4, 8), jnp.float32), r"'conv_0/kernel'.*dtype bool"),
        (jnp.ones((1, 1, 1, 7), bool), r"'conv_0/kernel'.*not broadcastable"),
        (jnp.ones((8,), bool), r"'conv_0/kernel'.*not broadcastable"),  # rank must match
        (jnp.ones((3, 3, 4, 8, 1), bool), r"'conv_0/kernel'.*not broadcastable"),
        (True, r"'conv_0/kernel'.*bool array"),
    ],
)
def test_check_names_bad_leaf(params, bad_leaf, match):
  m = masks.ones_like(params)
  m["conv_0"]["kernel"] = bad_leaf
  with pytest.raises(ValueError, match=match):
    masks.check(params, m)


def test_check_names_missing_and_none_leaves(params):
  m = masks.ones_like(params)
  del m["bn_0"]["scale"]
  with pytest.raises(ValueError, match=r"missing leaves: \['bn_0/scale'\]"):
    masks.check(params, m)
  m = masks.ones_like(params)
  m["dense_0"]["bias"] = None
  with pytest.raises(ValueError, match=r"dense_0/bias"):
    masks.check(params, m)


def test_ones_like(params):
  scalar = masks.ones_like(params)
  full = masks.ones_like(params, full=True)
  for p, s, f in zip(jax.tree.leaves(params), jax.tree.leaves(scalar), jax.tree.leaves(full)):
    assert s.shape == () and s.dtype == jnp.bool_ and bool(s)
    assert f.shape == p.shape and f.dtype == jnp.bool_ and bool(jnp.all(f))
  assert float(masks.density(scalar, params)) == 1.0


def test_density_counts_broadcast_channel_entries(params):
  m = _mixed_masks(params)
  n_dense_pos = int(np.sum(np.asarray(params["dense_0"]["kernel"]) > 0))
  total = sum(p.size for p in jax.tree.leaves(params))
  # 3 of 8 filters of a [3, 3, 4, 8] kernel keep 3 * 36 entries; scalar leaves keep all.
  expected_kept = 3 * 36 + 8 + 16 + n_dense_pos + 16
  assert int(masks.count_kept(m, params)) == expected_kept
  np.testing.assert_allclose(masks.density(m, params), expected_kept / total, rtol=1e-6)
  np.testing.assert_allclose(masks.sparsity(m, params), 1 - expected_kept / total, rtol=1e-5)
  # Same numbers as counting the fully broadcast masks.
  full = masks.broadcast_to_params(m, params)
  assert int(sum(np.sum(x) for x in jax.tree.leaves(full))) == expected_kept
  assert int(masks.count_kept(full)) == expected_kept


def test_density_over_prunable_leaves_only(params):
  m = _mixed_masks(params)
  prunable = masks.by_ndim(params)
  n_dense_pos = int(np.sum(np.asarray(params["dense_0"]["kernel"]) > 0))
  expected = (3 * 36 + n_dense_pos) / (3 * 3 * 4 * 8 + 32 * 16)
  np.testing.assert_allclose(masks.density(m, params, prunable), expected, rtol=1e-6)
  got = jax.jit(lambda mm: masks.density(mm, params, prunable))(m)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_layer_densities(params):
  m = _mixed_masks(params)
  ld = masks.layer_densities(m, params)
  np.testing.assert_allclose(ld["conv_0"]["kernel"], 3 / 8)
  np.testing.assert_allclose(
      ld["dense_0"]["kernel"], np.mean(np.asarray(params["dense_0"]["kernel"]) > 0), rtol=1e-6)
  assert float(ld["bn_0"]["scale"]) == 1.0


def test_union_and_intersect_broadcast(params):
  a = _mixed_masks(params)
  b = masks.ones_like(params)
  b["conv_0"]["kernel"] = params["conv_0"]["kernel"] > 0
  b["dense_0"]["kernel"] = jnp.zeros((1, 16), bool).at[0, :4].set(True)
  u, i = masks.union(a, b), masks.intersect(a, b)
  masks.check(params, u)
  masks.check(params, i)
  fa = jax.tree.map(np.asarray, masks.broadcast_to_params(a, params))
  fb = jax.tree.map(np.asarray, masks.broadcast_to_params(b, params))
  for got, x, y in zip(jax.tree.leaves(masks.broadcast_to_params(u, params)),
                       jax.tree.leaves(fa), jax.tree.leaves(fb)):
    np.testing.assert_array_equal(got, x | y)
  for got, x, y in zip(jax.tree.leaves(masks.broadcast_to_params(i, params)),
                       jax.tree.leaves(fa), jax.tree.leaves(fb)):
    np.testing.assert_array_equal(got, x & y)

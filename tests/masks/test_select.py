"""Tests for masks._select: exact counts, exact entries, deterministic ties, jit."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import masks


def _keep(d, n):
  k = math.floor(d * n + 0.5)
  return min(n, max(k, 1) if d > 0 else 0)


def _ref_topk(scores, k):
  """Numpy reference: the k highest, ties to the lower flat index."""
  flat = np.asarray(scores, np.float64).ravel()
  out = np.zeros(flat.size, bool)
  out[np.argsort(-flat, kind="stable")[:k]] = True
  return out.reshape(np.shape(scores))


def _tied_scores(params):
  """Scores with many exact ties (within and across leaves)."""
  return jax.tree.map(lambda p: jnp.asarray(np.round(np.abs(np.asarray(p)) * 2) / 2), params)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_topk_keeps_exact_count_and_largest(params, density):
  scores = masks.magnitude(params)
  prunable = masks.by_ndim(params)
  m = masks.topk(scores, density, prunable)
  masks.check(params, m)
  for name in ("conv_0", "dense_0"):
    s = np.asarray(scores[name]["kernel"])
    got = np.asarray(m[name]["kernel"])
    assert got.dtype == bool and got.shape == s.shape
    assert got.sum() == _keep(density, s.size)
    np.testing.assert_array_equal(got, _ref_topk(s, _keep(density, s.size)))
  for leaf in (m["conv_0"]["bias"], m["bn_0"]["scale"], m["dense_0"]["bias"]):
    assert leaf.shape == () and bool(leaf)


def test_topk_keeps_at_least_one_when_density_positive():
  m = masks.topk({"w": jnp.arange(10.0)}, 0.01)
  np.testing.assert_array_equal(m["w"], np.arange(10) == 9)


def test_topk_ties_break_by_lower_index(params):
  scores = _tied_scores(params)
  m = masks.topk(scores, 0.4, masks.by_ndim(params))
  for name in ("conv_0", "dense_0"):
    s = np.asarray(scores[name]["kernel"])
    np.testing.assert_array_equal(m[name]["kernel"], _ref_topk(s, _keep(0.4, s.size)))
  flat = masks.topk({"w": jnp.ones((2, 5))}, 0.3)["w"]
  np.testing.assert_array_equal(flat, np.arange(10).reshape(2, 5) < 3)


def test_topk_per_leaf_densities_and_jit(params):
  scores = _tied_scores(params)
  prunable = masks.by_ndim(params)
  densities = masks.uniform(params, 0.5, prunable)
  densities["conv_0"]["kernel"] = 0.25
  densities["dense_0"]["kernel"] = 0.75
  eager = masks.topk(scores, densities, prunable)
  jitted = jax.jit(lambda s: masks.topk(s, densities, prunable))(scores)
  assert int(eager["conv_0"]["kernel"].sum()) == _keep(0.25, 288)
  assert int(eager["dense_0"]["kernel"].sum()) == _keep(0.75, 512)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    assert b.dtype == jnp.bool_
    np.testing.assert_array_equal(a, b)


def test_topk_traced_density_matches_static(params):
  scores = _tied_scores(params)
  prunable = masks.by_ndim(params)
  fn = jax.jit(lambda s, d: masks.topk(s, d, prunable))
  for d in (0.0, 0.3, 0.6, 1.0):
    static = masks.topk(scores, d, prunable)
    traced = fn(scores, jnp.float32(d))
    for a, b in zip(jax.tree.leaves(static), jax.tree.leaves(traced)):
      np.testing.assert_array_equal(a, b)


def test_topk_rejects_bad_density(params):
  with pytest.raises(ValueError, match=r"densities\['conv_0/kernel'\] must be in \[0, 1\]"):
    masks.topk(masks.magnitude(params), 1.5, masks.by_ndim(params))
  with pytest.raises(ValueError, match="densities must be a single value or a tree"):
    masks.topk(masks.magnitude(params), {"conv_0": 0.5}, masks.by_ndim(params))


def test_magnitude_masked_params_have_expected_zeros(params):
  prunable = masks.by_ndim(params)
  m = masks.topk(masks.magnitude(params), 0.2, prunable)
  pruned = masks.apply(params, m)
  for name in ("conv_0", "dense_0"):
    w = np.asarray(params[name]["kernel"])
    out = np.asarray(pruned[name]["kernel"])
    k = _keep(0.2, w.size)
    assert np.sum(out == 0) == w.size - k  # normal weights are never exactly 0
    kept, dropped = np.abs(w[out != 0]), np.abs(w[out == 0])
    assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(out[out != 0], w[out != 0])
  np.testing.assert_array_equal(pruned["dense_0"]["bias"], params["dense_0"]["bias"])


def _ref_global(scores, prunable, density):
  leaves = [np.asarray(s) for s, f in zip(jax.tree.leaves(scores), jax.tree.leaves(prunable)) if f]
  flat = np.concatenate([x.ravel() for x in leaves])
  keep = _ref_topk(flat, _keep(density, flat.size))
  out, offset = [], 0
  for x in leaves:
    out.append(keep[offset:offset + x.size].reshape(x.shape))
    offset += x.size
  return out


@pytest.mark.parametrize("tied", [False, True])
def test_global_topk_matches_numpy_and_respects_filter(params, tied):
  scores = _tied_scores(params) if tied else masks.magnitude(params)
  # Huge scores on non-prunable leaves must not take any of the budget.
  scores["dense_0"]["bias"] = jnp.full((16,), 100.0)
  prunable = masks.by_ndim(params)
  m = jax.jit(lambda s: masks.global_topk(s, 0.3, prunable))(scores)
  masks.check(params, m)
  got = [np.asarray(x) for x, f in zip(jax.tree.leaves(m), jax.tree.leaves(prunable)) if f]
  for g, r in zip(got, _ref_global(scores, prunable, 0.3)):
    np.testing.assert_array_equal(g, r)
  assert sum(int(g.sum()) for g in got) == _keep(0.3, 288 + 512)
  assert m["dense_0"]["bias"].shape == () and bool(m["dense_0"]["bias"])


def test_global_threshold_agrees_with_global_topk(params):
  scores = masks.magnitude(params)  # continuous: no ties at the threshold
  prunable = masks.by_ndim(params)
  for d in (0.05, 0.3, 0.9):
    expected = masks.global_topk(scores, d, prunable)
    for tau in (masks.global_threshold(scores, d, prunable),
                jax.jit(lambda s, dd: masks.global_threshold(s, dd, prunable))(scores,
                                                                               jnp.float32(d))):
      got = masks.threshold(scores, tau, prunable)
      for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
  assert float(masks.global_threshold(scores, 0.0, prunable)) == np.inf


def test_channel_topk_keeps_top_filters(params):
  prunable = masks.by_ndim(params)
  m = masks.channel_topk(masks.filter_l1(params), 3 / 8, prunable)
  masks.check(params, m)
  assert m["conv_0"]["kernel"].shape == (1, 1, 1, 8)
  assert m["dense_0"]["kernel"].shape == (1, 16)
  l1 = np.abs(np.asarray(params["conv_0"]["kernel"])).sum(axis=(0, 1, 2))
  np.testing.assert_array_equal(m["conv_0"]["kernel"][0, 0, 0], _ref_topk(l1, 3))
  l1d = np.abs(np.asarray(params["dense_0"]["kernel"])).sum(axis=0)
  np.testing.assert_array_equal(m["dense_0"]["kernel"][0], _ref_topk(l1d, _keep(3 / 8, 16)))
  assert int(masks.count_kept(m, params, prunable)) == 3 * 36 + 6 * 32
  # Per-entry scores are summed per channel: same masks as per-filter L1.
  m2 = jax.jit(lambda s: masks.channel_topk(s, 3 / 8, prunable))(masks.magnitude(params))
  for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(m2)):
    np.testing.assert_array_equal(a, b)
  # At least one filter survives any positive density.
  assert int(masks.channel_topk(masks.filter_l1(params), 0.01, prunable)["conv_0"]["kernel"].sum()) == 1


def test_channel_topk_other_axis_and_errors(params):
  prunable = masks.by_ndim(params)
  m = masks.select(masks.magnitude(params), 0.5, masks.Channel(axis=-2), prunable)
  assert m["conv_0"]["kernel"].shape == (1, 1, 4, 1)
  assert m["dense_0"]["kernel"].shape == (32, 1)
  assert int(m["conv_0"]["kernel"].sum()) == 2
  with pytest.raises(ValueError, match=r"axis=-3.*'dense_0/kernel'"):
    masks.channel_topk(masks.magnitude(params), 0.5, prunable, axis=-3)


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 4), (1, 2), (0, 4), (4, 4)])
def test_n_by_m_keeps_top_n_of_each_input_group(params, n, m):
  scores = _tied_scores(params)
  prunable = masks.by_ndim(params)
  mask = jax.jit(lambda s: masks.n_by_m(s, n, m, prunable))(scores)
  masks.check(params, mask)
  for name in ("conv_0", "dense_0"):
    s = np.asarray(scores[name]["kernel"])
    got = np.asarray(mask[name]["kernel"])
    assert got.shape == s.shape and got.dtype == bool
    # Groups of m consecutive entries along the input axis (-2).
    s_g = np.moveaxis(s, -2, -1).reshape(-1, m)
    got_g = np.moveaxis(got, -2, -1).reshape(-1, m)
    np.testing.assert_array_equal(got_g.sum(axis=1), n)
    for row_s, row_got in zip(s_g, got_g):
      np.testing.assert_array_equal(row_got, _ref_topk(row_s, n))
  assert mask["bn_0"]["scale"].shape == ()


def test_n_by_m_errors(params):
  prunable = masks.by_ndim(params)
  with pytest.raises(ValueError, match=r"'conv_0/kernel'.*not divisible by m=3"):
    masks.n_by_m(masks.magnitude(params), 1, 3, prunable)
  with pytest.raises(ValueError, match=r"n must be an int in \[0, m=4\]"):
    masks.n_by_m(masks.magnitude(params), 5, 4, prunable)
  with pytest.raises(ValueError, match="m must be an int >= 1"):
    masks.n_by_m(masks.magnitude(params), 0, 0, prunable)


def test_threshold_keeps_scores_at_or_above_tau(params):
  scores = _tied_scores(params)
  prunable = masks.by_ndim(params)
  m = jax.jit(lambda s, t: masks.threshold(s, t, prunable))(scores, jnp.float32(1.0))
  for name in ("conv_0", "dense_0"):
    np.testing.assert_array_equal(m[name]["kernel"], np.asarray(scores[name]["kernel"]) >= 1.0)
  assert m["bn_0"]["bias"].shape == () and bool(m["bn_0"]["bias"])


def test_select_dispatch(params):
  scores = masks.magnitude(params)
  prunable = masks.by_ndim(params)
  pairs = [
      (masks.select(scores, 0.3, masks.Unstructured(), prunable), masks.topk(scores, 0.3, prunable)),
      (masks.select(scores, 0.3, masks.Channel(), prunable),
       masks.channel_topk(scores, 0.3, prunable)),
      (masks.select(scores, None, masks.NByM(2, 4), prunable),
       masks.n_by_m(scores, 2, 4, prunable)),
  ]
  for a, b in pairs:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="kind must be"):
    masks.select(scores, 0.3, "unstructured", prunable)


def test_per_client_traced_density_under_vmap(params):
  """Per-client capacities (FIARSE-style) are traced under vmap; masks match the static ones."""
  scores = masks.magnitude(params)
  prunable = masks.by_ndim(params)
  densities_C = jnp.array([0.1, 0.5, 1.0])
  scores_C = jax.tree.map(lambda s: jnp.broadcast_to(s, (3,) + s.shape), scores)

  def client(s, d):
    local = masks.topk(s, d, prunable)
    glob = masks.threshold(s, masks.global_threshold(s, d, prunable), prunable)
    return local, glob

  local_C, glob_C = jax.jit(jax.vmap(client))(scores_C, densities_C)
  for c, d in enumerate((0.1, 0.5, 1.0)):
    for got, want in ((local_C, masks.topk(scores, d, prunable)),
                      (glob_C, masks.global_topk(scores, d, prunable))):
      for name in ("conv_0", "dense_0"):
        np.testing.assert_array_equal(got[name]["kernel"][c], want[name]["kernel"])

"""Tests for masks._distributions: uniform and ERK layer densities."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import masks

SHAPES = {
    "conv_0": {"kernel": (3, 3, 3, 16), "bias": (16,)},
    "conv_1": {"kernel": (3, 3, 16, 32), "bias": (32,)},
    "dense_0": {"kernel": (512, 64), "bias": (64,)},
    "dense_1": {"kernel": (64, 10), "bias": (10,)},
    "head": {"kernel": (4, 2)},
}


def _params():
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _sizes(params, prunable):
  return [(math.prod(p.shape), f, p.shape) for p, f in
          zip(jax.tree.leaves(params), jax.tree.leaves(prunable))]


def _erk_bisection(params, prunable, budget, power=1.0):
  """Independent reference: solve sum_l min(1, eps * raw_l) * n_l = budget by bisection."""
  layers = [(n, (sum(s) / n) ** power) for n, f, s in _sizes(params, prunable) if f]
  lo, hi = 0.0, 1e9
  for _ in range(200):
    eps = (lo + hi) / 2
    total = sum(min(1.0, eps * r) * n for n, r in layers)
    lo, hi = (eps, hi) if total < budget else (lo, eps)
  return [min(1.0, lo * r) for _, r in layers]


@pytest.mark.parametrize("density", [0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_uniform_equals_target(density):
  params = _params()
  prunable = masks.by_ndim(params)
  d = masks.uniform(params, density, prunable)
  for (_, f, _), x in zip(_sizes(params, prunable), jax.tree.leaves(d)):
    assert isinstance(x, float)
    assert x == (density if f else 1.0)


def test_uniform_include_dense_counts_dense_against_budget():
  params = _params()
  prunable = masks.by_ndim(params)
  sizes = _sizes(params, prunable)
  n_total = sum(n for n, _, _ in sizes)
  n_dense = sum(n for n, f, _ in sizes if not f)
  d = masks.uniform(params, 0.3, prunable, include_dense=True)
  kept = sum(x * n for (n, _, _), x in zip(sizes, jax.tree.leaves(d)))
  np.testing.assert_allclose(kept, 0.3 * n_total)
  with pytest.raises(ValueError, match=r"density must be >= "):
    masks.uniform(params, n_dense / n_total / 2, prunable, include_dense=True)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.8])
def test_erk_matches_reference_and_hits_target(density):
  params = _params()
  prunable = masks.by_ndim(params)
  d = masks.erk(params, density, prunable)
  sizes = _sizes(params, prunable)
  sparse = [(n, x) for (n, f, _), x in zip(sizes, jax.tree.leaves(d)) if f]
  assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for _, x in sparse)
  n_sparse = sum(n for n, _ in sparse)
  np.testing.assert_allclose(sum(n * x for n, x in sparse), density * n_sparse, rtol=1e-9)
  np.testing.assert_allclose([x for _, x in sparse],
                             _erk_bisection(params, prunable, density * n_sparse), rtol=1e-6)
  # Non-prunable leaves stay dense.
  assert all(x == 1.0 for (_, f, _), x in zip(sizes, jax.tree.leaves(d)) if not f)
  # Actual masks keep the target count within one weight per layer.
  rng = np.random.default_rng(0)
  concrete = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  kept = int(jax.jit(lambda c: masks.count_kept(
      masks.topk(masks.magnitude(c), d, prunable), c, prunable))(concrete))
  assert abs(kept - density * n_sparse) <= len(sparse)


def test_erk_larger_layers_are_sparser_and_small_layers_become_dense():
  params = _params()
  prunable = masks.by_ndim(params)
  d = masks.erk(params, 0.5, prunable)
  # The tiny head and the small dense layer would exceed 1: dense, the rest re-solved.
  assert d["head"]["kernel"] == 1.0 and d["dense_1"]["kernel"] == 1.0
  for target in (0.05, 0.5):
    d = masks.erk(params, target, prunable)
    # Within a layer type, the larger layer is sparser.
    assert d["conv_1"]["kernel"] < d["conv_0"]["kernel"]
    assert d["dense_0"]["kernel"] < d["dense_1"]["kernel"]
    # Across all layers, density is ordered by the ERK ratio sum(shape) / prod(shape).
    ratio = {k: sum(SHAPES[k]["kernel"]) / math.prod(SHAPES[k]["kernel"]) for k in SHAPES}
    by_ratio = sorted(SHAPES, key=ratio.get)
    dens = [d[k]["kernel"] for k in by_ratio]
    assert dens == sorted(dens) and dens[0] < dens[-1]


def test_erk_power_zero_is_uniform_and_include_dense():
  params = _params()
  prunable = masks.by_ndim(params)
  d0 = masks.erk(params, 0.3, prunable, erk_power_scale=0.0)
  for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(masks.uniform(params, 0.3, prunable))):
    np.testing.assert_allclose(a, b)
  sizes = _sizes(params, prunable)
  n_total = sum(n for n, _, _ in sizes)
  d = masks.erk(params, 0.3, prunable, include_dense=True)
  kept = sum(x * n for (n, _, _), x in zip(sizes, jax.tree.leaves(d)))
  np.testing.assert_allclose(kept, 0.3 * n_total, rtol=1e-9)


def test_distribution_errors():
  params = _params()
  prunable = masks.by_ndim(params)
  for fn in (masks.uniform, masks.erk):
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\], got 1.5"):
      fn(params, 1.5, prunable)
  with pytest.raises(ValueError, match="erk_power_scale must be >= 0"):
    masks.erk(params, 0.5, prunable, erk_power_scale=-1.0)

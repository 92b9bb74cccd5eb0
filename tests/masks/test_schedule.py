"""Tests for masks._schedule."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import masks


@pytest.mark.parametrize("initial, final", [(0.0, 0.9), (0.5, 0.8), (0.9, 0.1)])
def test_polynomial_sparsity_endpoints_and_monotone(initial, final):
  kw = dict(initial=initial, final=final, begin=5, end=25)
  values = [masks.polynomial_sparsity(t, **kw) for t in range(0, 40)]
  assert all(isinstance(v, float) for v in values)
  assert values[0] == initial and values[5] == initial
  assert values[25] == pytest.approx(final) and values[39] == pytest.approx(final)
  diffs = np.diff(values) * np.sign(final - initial)
  assert np.all(diffs >= -1e-12)
  # Zhu & Gupta cubic: halfway through, 7/8 of the change is done.
  assert values[15] == pytest.approx(final + (initial - final) / 8)
  jitted = jax.jit(lambda t: masks.polynomial_sparsity(t, **kw))(jnp.arange(40))
  np.testing.assert_allclose(jitted, values, atol=1e-6)


def test_cosine_fraction():
  values = [masks.cosine_fraction(t, 0.3, 10) for t in range(15)]
  assert values[0] == pytest.approx(0.3)
  assert values[5] == pytest.approx(0.15)
  assert values[10] == pytest.approx(0.0, abs=1e-12) and values[14] == pytest.approx(0.0, abs=1e-12)
  assert np.all(np.diff(values) <= 1e-12)
  np.testing.assert_allclose(values[3], 0.15 * (1 + math.cos(math.pi * 0.3)))
  jitted = jax.jit(lambda t: masks.cosine_fraction(t, 0.3, 10))(jnp.arange(15))
  np.testing.assert_allclose(jitted, values, atol=1e-6)


def test_should_update():
  got = [t for t in range(30) if masks.should_update(t, 5, begin=1, end=20)]
  assert got == [5, 10, 15, 20]  # FedTiny: t % dT == 0 and 0 < t <= T_end
  assert [t for t in range(12) if masks.should_update(t, 4)] == [0, 4, 8]
  assert isinstance(masks.should_update(3, 4), bool)
  rounds = jnp.arange(30)
  jitted = jax.jit(lambda t: masks.should_update(t, 5, begin=1, end=20))(rounds)
  assert jitted.dtype == jnp.bool_
  np.testing.assert_array_equal(jitted, [masks.should_update(t, 5, 1, 20) for t in range(30)])


def test_schedule_errors():
  with pytest.raises(ValueError, match=r"final must be in \[0, 1\]"):
    masks.polynomial_sparsity(0, initial=0.0, final=1.2, begin=0, end=10)
  with pytest.raises(ValueError, match="end must be > begin"):
    masks.polynomial_sparsity(0, initial=0.0, final=0.5, begin=10, end=10)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
    masks.cosine_fraction(0, 1.5, 10)
  with pytest.raises(ValueError, match="every must be >= 1"):
    masks.should_update(0, 0)

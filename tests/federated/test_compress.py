"""Compressed client updates (fedjax_prune.federated._compress): unbiased k-bit quantisation,
top-k over present coordinates, error feedback, and the exact upload byte count."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune.federated import _compress as cp

# Jitted once per test module (eager dispatch of the many small ops is the slow part on CPU).
compress = jax.jit(cp.compress)
quantize = jax.jit(cp.quantize, static_argnums=2)
bytes_up = jax.jit(cp.bytes_up)


@pytest.mark.parametrize("bits", [1, 3])
def test_quantize_is_unbiased_and_lands_on_a_neighbouring_level(bits, key):
  x = jnp.asarray([-1.0, -0.37, 0.0, 0.11, 0.5, 0.93, 2.0, 1.234])  # lo = -1, hi = 2
  n = 20_000
  draws = np.asarray(jax.jit(jax.vmap(lambda k: quantize(x, k, bits)))(
      jax.random.split(key, n)), np.float64)
  levels = 2 ** bits - 1
  step = 3.0 / levels
  t = (np.asarray(x, np.float64) + 1.0) / step
  below, above = -1.0 + np.floor(t) * step, -1.0 + np.ceil(t) * step
  assert np.all(np.isclose(draws, below, atol=1e-6) | np.isclose(draws, above, atol=1e-6))
  frac = t - np.floor(t)
  sd = step * np.sqrt(frac * (1 - frac))  # exact per-coordinate sd of Q(x)
  err = np.abs(draws.mean(axis=0) - np.asarray(x, np.float64))
  assert np.all(err <= 5 * sd / math.sqrt(n) + 1e-6), (err, sd / math.sqrt(n))


def test_quantize_is_exact_on_grid_points_and_near_identity_at_32_bits(key):
  grid = jnp.asarray([-1.0, 0.0, 1.0, 2.0, 0.0, -1.0])  # bits = 2: levels -1, 0, 1, 2
  for k in jax.random.split(key, 5):
    np.testing.assert_array_equal(quantize(grid, k, 2), grid)
  x = jax.random.normal(key, (64,))
  np.testing.assert_allclose(quantize(x, key, 32), x, rtol=0, atol=1e-6)
  sent = jnp.arange(64) % 3 == 0
  q = quantize(x, key, 4, sent)
  assert bool(jnp.all(jnp.where(sent, True, q == 0.0)))
  np.testing.assert_array_equal(quantize(jnp.full((4,), 0.3), key, 1), jnp.full((4,), 0.3))


def test_topk_keeps_exactly_the_k_largest_present_coordinates(key):
  x = jax.random.normal(key, (6, 7))
  present = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (6, 7))
  x = x.at[0, 0].set(100.0)
  present = present.at[0, 0].set(False)  # the largest |x| is absent: never kept
  kept = np.asarray(jax.jit(cp.topk_present, static_argnums=2)(x, present, 0.3))
  m = int(present.sum())
  k = math.floor(0.3 * m + 0.5)
  assert kept.sum() == k and not kept[0, 0] and not np.any(kept & ~np.asarray(present))
  order = np.argsort(-np.where(np.asarray(present), np.abs(np.asarray(x)), -np.inf), axis=None,
                     kind="stable")
  np.testing.assert_array_equal(np.flatnonzero(kept), np.sort(order[:k]))


def test_topk_rounding_ties_and_channel_masks():
  x = jnp.asarray([[1.0, -1.0, 1.0], [0.5, 3.0, -1.0]])
  present = jnp.asarray([[True, False, True]])  # (1, out) channel mask: 4 present
  kept = cp.topk_present(x, present, 0.5)  # k = 2: 3.0 is absent; ties 1, 1, -1 -> lower index
  np.testing.assert_array_equal(kept, [[True, False, True], [False, False, False]])
  tiny = cp.topk_present(x, True, 0.01)  # round(0.06) = 0 -> at least 1
  np.testing.assert_array_equal(tiny, [[False, False, False], [False, True, False]])
  none = cp.topk_present(x, False, 0.5)  # nothing present, nothing kept
  assert not bool(jnp.any(none))


def test_compress_sends_only_the_kept_present_values(key):
  u = {"w": jnp.asarray([[4.0, -3.0], [2.0, 1.0]]), "b": jnp.asarray([5.0, -6.0, 0.5])}
  present = {"w": jnp.asarray([[True, True], [False, True]]), "b": True}
  sent = compress(u, present, key, cp.Compression(topk_fraction=0.5))
  # w: 3 present -> k = round(1.5 + 0.5) = 2: 4 and -3; b: 3 present -> k = 2: -6 and 5.
  np.testing.assert_array_equal(sent["w"], [[4.0, -3.0], [0.0, 0.0]])
  np.testing.assert_array_equal(sent["b"], [5.0, -6.0, 0.0])
  dense = compress(u, present, key, cp.Compression())
  np.testing.assert_array_equal(dense["w"], [[4.0, -3.0], [0.0, 1.0]])
  both = compress(u, present, key, cp.Compression(bits=1, topk_fraction=0.5))
  # One bit between the kept values' min and max: the kept values are those two levels.
  np.testing.assert_array_equal(both["w"], [[4.0, -3.0], [0.0, 0.0]])


def _run_feedback(updates, present, key, config):
  step = jax.jit(cp.compress_with_feedback)
  residual = cp.init_residual(updates[0])
  sent_total = jax.tree.map(jnp.zeros_like, updates[0])
  for t, u in enumerate(updates):
    residual, sent = step(residual, u, present, jax.random.fold_in(key, t), config)
    sent_total = jax.tree.map(jnp.add, sent_total, sent)
  return residual, sent_total


def test_error_feedback_conserves_the_sum_of_updates(key):
  present = {"w": jnp.asarray([[True, False, True, True]] * 3)}
  ints = [jax.random.randint(jax.random.fold_in(key, t), (3, 4), -8, 9).astype(jnp.float32)
          for t in range(6)]
  updates = [{"w": u} for u in ints]
  raw = sum(ints)
  # Top-k only: every quantity is a small integer, so the invariant holds exactly.
  residual, sent_total = _run_feedback(updates, present, key, cp.Compression(topk_fraction=0.25))
  np.testing.assert_array_equal(sent_total["w"] + residual["w"], raw)
  np.testing.assert_array_equal(sent_total["w"][:, 1], 0.0)  # the absent column is never sent
  np.testing.assert_array_equal(residual["w"][:, 1], raw[:, 1])  # ... it waits in the memory
  assert float(jnp.sum(jnp.abs(residual["w"]))) > 0  # something was held back
  # With quantisation: the same invariant, up to float32 rounding.
  residual, sent_total = _run_feedback(updates, present, key,
                                       cp.Compression(bits=2, topk_fraction=0.5))
  np.testing.assert_allclose(sent_total["w"] + residual["w"], raw, atol=1e-5)


def test_bytes_up_matches_a_hand_count():
  present_w = np.zeros((20, 20), bool)
  present_w.reshape(-1)[:300] = True  # m = 300; indices need ceil(log2 300) = 9 bits -> 2 bytes
  u = {"w": jnp.zeros((20, 20)), "b": jnp.zeros((10,)), "gone": jnp.zeros((5,)),
       "h": jnp.zeros((8,), jnp.bfloat16)}
  present = {"w": jnp.asarray(present_w), "b": jnp.asarray([True] * 6 + [False] * 4),
             "gone": False, "h": True}
  count = bytes_up

  # Raw values: 300 + 6 float32, 8 bfloat16; the pruned leaf costs nothing.
  assert int(count(u, present, cp.Compression())) == 306 * 4 + 8 * 2
  # 3 bits, no top-k: ceil(m * 3 / 8) + 8 bytes of scales per non-empty tensor.
  assert int(count(u, present, cp.Compression(bits=3))) == (
      (113 + 8) + (3 + 8) + 0 + (3 + 8))  # 900, 18, 24 bits
  # Top-k 1 %: k = 3 of 300 (6 index bytes < 38 bitmap bytes), 1 of 6 (1 index byte < 1 bitmap
  # byte: equal, 1), 1 of 8; float32 / bfloat16 values.
  assert int(count(u, present, cp.Compression(topk_fraction=0.01))) == (
      (3 * 4 + 3 * 2) + (1 * 4 + 1) + 0 + (1 * 2 + 1))
  # Top-k 50 %: k = 150 of 300 (bitmap 38 < 300 index bytes), 3 of 6 (bitmap 1 < 3), 4 of 8.
  assert int(count(u, present, cp.Compression(bits=4, topk_fraction=0.5))) == (
      (75 + 8 + 38) + (2 + 8 + 1) + 0 + (2 + 8 + 1))
  # Top-k 100 %: every present coordinate, no positions.
  assert int(count(u, present, cp.Compression(topk_fraction=1.0))) == 306 * 4 + 8 * 2


def test_bytes_up_counts_what_compress_sends(key):
  # Float32 values: 4 bytes for each value compress leaves nonzero (random normals have no
  # exact zeros), plus, with top-k, the positions of the k sent among the m present.
  u = {"w": jax.random.normal(key, (16, 16)), "b": jax.random.normal(key, (16,))}
  present = {"w": jax.random.bernoulli(key, 0.4, (16, 16)), "b": jnp.arange(16) < 9}
  for fraction in (None, 0.05, 0.2, 0.7):
    config = cp.Compression(topk_fraction=fraction)
    sent = compress(u, present, key, config)
    expected = 0
    for x, p in zip(jax.tree.leaves(sent), jax.tree.leaves(present)):
      k, m = int(jnp.count_nonzero(x)), int(jnp.sum(jnp.broadcast_to(p, x.shape)))
      expected += 4 * k
      if fraction is not None and k < m:
        expected += min(k * -(-(m - 1).bit_length() // 8), -(-m // 8))
    assert int(bytes_up(u, present, config)) == expected, fraction


@pytest.mark.parametrize("config, field", [
    (cp.Compression(bits=0), "bits"),
    (cp.Compression(bits=33), "bits"),
    (cp.Compression(bits=True), "bits"),
    (cp.Compression(bits=2.0), "bits"),
    (cp.Compression(topk_fraction=0.0), "topk_fraction"),
    (cp.Compression(topk_fraction=1.5), "topk_fraction"),
    (cp.Compression(topk_fraction=-0.1), "topk_fraction"),
])
def test_bad_compression_configs_raise_naming_the_field(config, field, key):
  u = {"w": jnp.ones((3,))}
  with pytest.raises(ValueError, match=field):
    cp.check_compression(config)
  with pytest.raises(ValueError, match=field):
    cp.compress(u, True, key, config)
  with pytest.raises(ValueError, match=field):
    cp.bytes_up(u, True, config)
  if field == "bits":
    with pytest.raises(ValueError, match="bits"):
      cp.quantize(u["w"], key, config.bits)

"""The engine's key derivations (`federated._keys`) return exactly what `jax.random` returns."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune.federated import _keys


def _data(key):
  return np.asarray(jax.random.key_data(key))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1])
@pytest.mark.parametrize("data", [0, 1, 7, 2**31 - 1, np.int32(5), np.uint32(2**32 - 1)])
def test_fold_in_is_jax_random_fold_in(seed, data):
  key = jax.random.key(seed)
  np.testing.assert_array_equal(_data(_keys.fold_in(key, data)), _data(jax.random.fold_in(key, data)))


def test_fold_in_under_jit_and_vmap_is_jax_random_fold_in():
  key = jax.random.key(3)
  ids = jnp.arange(0, 4000, 37, dtype=jnp.int32)
  got = jax.jit(jax.vmap(lambda i: _keys.fold_in(key, i)))(ids)
  want = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  np.testing.assert_array_equal(_data(got), _data(want))
  # vmapped over keys as well as data (the engine folds epochs into per-client keys)
  keys = jax.random.split(jax.random.key(9), ids.shape[0])
  got = jax.jit(jax.vmap(_keys.fold_in))(keys, ids)
  np.testing.assert_array_equal(_data(got), _data(jax.vmap(jax.random.fold_in)(keys, ids)))


@pytest.mark.parametrize("num", [1, 2, 3, 8])
def test_split_is_jax_random_split(num):
  key = jax.random.key(21)
  np.testing.assert_array_equal(_data(_keys.split(key, num)), _data(jax.random.split(key, num)))
  np.testing.assert_array_equal(_data(jax.jit(lambda k: _keys.split(k, num))(key)),
                                _data(jax.random.split(key, num)))


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (128,), (3, 5)])
def test_uniform_is_jax_random_uniform(shape):
  for seed in range(3):
    key = jax.random.key(seed)
    got = jax.jit(lambda k: _keys.uniform(k, shape))(key)
    assert got.dtype == jnp.float32 and got.shape == shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.uniform(key, shape)))
  # a wrong hash would not give the right distribution either: mean 1/2, all in [0, 1)
  many = np.asarray(_keys.uniform(jax.random.key(5), (20000,)))
  assert many.min() >= 0.0 and many.max() < 1.0 and abs(many.mean() - 0.5) < 0.01


def test_other_key_kinds_go_to_jax_random():
  rbg = jax.random.key(4, impl="rbg")
  np.testing.assert_array_equal(_data(_keys.fold_in(rbg, 3)), _data(jax.random.fold_in(rbg, 3)))
  np.testing.assert_array_equal(_data(_keys.split(rbg)), _data(jax.random.split(rbg)))
  np.testing.assert_array_equal(np.asarray(_keys.uniform(rbg, (5,))),
                                np.asarray(jax.random.uniform(rbg, (5,))))
  raw = jax.random.PRNGKey(4)  # legacy uint32[2] key
  np.testing.assert_array_equal(np.asarray(_keys.fold_in(raw, 3)), np.asarray(jax.random.fold_in(raw, 3)))
  np.testing.assert_array_equal(np.asarray(_keys.split(raw)), np.asarray(jax.random.split(raw)))


def test_fold_in_rejects_non_integer_data():
  with pytest.raises(TypeError, match="integer"):
    _keys.fold_in(jax.random.key(0), jnp.float32(1.5))


def test_threefry2x32_matches_the_random123_known_answers():
  # Known-answer vectors of Threefry-2x32 with 20 rounds (Random123's kat_vectors),
  # the same ones JAX tests its primitive against.
  def run(k0, k1, x0, x1):
    u = lambda v: jnp.asarray(np.uint32(v))
    return tuple(int(v) for v in _keys.threefry2x32(u(k0), u(k1), u(x0), u(x1)))

  assert run(0, 0, 0, 0) == (0x6b200159, 0x99ba4efe)
  assert run(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) == (0x1cb996fc, 0xbb002be7)
  assert run(0x13198a2e, 0x03707344, 0x243f6a88, 0x85a308d3) == (0xc4923a9c, 0x483df7a0)

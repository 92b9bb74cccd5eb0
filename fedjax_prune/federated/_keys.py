"""The engine's key derivations, bit-identical to `jax.random`, lowered as fused arithmetic.

A round derives keys at every level: the round key is split into the clients' root
and the server's key, each client's key is `fold_in(client_root, client_id)`, the
client splits it into shuffle and augmentation keys, each epoch's shuffle key is a
`fold_in`, and the epoch's permutation sorts `uniform` noise. JAX computes each of
these with its Threefry-2x32 primitive, which XLA:CPU runs as a 5-iteration `while`
loop (JAX lowers it rolled on CPU) inside a nested call: a handful of tiny kernel
launches per iteration. For a small model that is most of a one-client round
(logistic regression's one-step local training on 2 CPU cores, with `jax.random`
and with the functions here: docs/results/engine.md, "Current status").

The functions here compute the same Threefry-2x32 hash written out with `jnp`
integer ops (20 rounds, straight-line), which XLA fuses into one elementwise kernel,
and return exactly the keys and numbers `jax.random` returns (tested against it).
They take the fast path for typed Threefry keys (`jax.random.key`, JAX's default
implementation) under `jax_threefry_partitionable` (JAX's default); any other key
(`rbg`, raw `uint32[2]` keys from `jax.random.PRNGKey`) goes to `jax.random` itself.
Public as `fedjax_prune.federated.keys`, for methods' per-step draws (CAVP's gates).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.types import PRNGKey

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's, as in JAX / Random123
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 (20 rounds) of the counter words (x0, x1) under key words (k0, k1).

  All uint32, broadcast together; the same function as JAX's `threefry2x32_p`.
  """
  ks = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
  x0 = x0 + ks[0]
  x1 = x1 + ks[1]
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _fast_words(key: PRNGKey) -> jax.Array | None:
  """The [..., 2] uint32 words of a typed Threefry key (None: use `jax.random`)."""
  if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    return None
  if str(jax.random.key_impl(key)) != "threefry2x32" or not jax.config.jax_threefry_partitionable:
    return None
  return jax.random.key_data(key)


def _wrap(b0: jax.Array, b1: jax.Array) -> PRNGKey:
  return jax.random.wrap_key_data(jnp.stack([b0, b1], axis=-1), impl="threefry2x32")


def fold_in(key: PRNGKey, data) -> PRNGKey:
  """`jax.random.fold_in(key, data)`: key [...] (typed), data an integer (traced or not)
  broadcastable to the key's shape. Arrays are read as uint32 bits, as JAX does (int32
  -1 is 2^32 - 1); a Python int outside [0, 2^32) is taken modulo 2^32, where
  `jax.random.fold_in` raises OverflowError."""
  words = _fast_words(key)
  if words is None:
    return jax.random.fold_in(key, data)
  if isinstance(data, (int, np.integer)):
    data = jnp.asarray(np.uint32(int(data) % 2 ** 32))
  data = jnp.asarray(data)
  if not jnp.issubdtype(data.dtype, jnp.integer):
    raise TypeError(f"fold_in data must be an integer, got dtype {data.dtype}")
  data = data.astype(jnp.uint32)
  # JAX hashes the 2-word counter (0, data): x0 = 0, x1 = data.
  return _wrap(*threefry2x32(words[..., 0], words[..., 1], jnp.zeros_like(data), data))


def split(key: PRNGKey, num: int = 2) -> PRNGKey:
  """`jax.random.split(key, num)` of one key: [num] keys."""
  words = _fast_words(key)
  if words is None or key.shape != ():
    return jax.random.split(key, num)
  counters = jnp.arange(num, dtype=jnp.uint32)  # partitionable split hashes (0, i)
  return _wrap(*threefry2x32(words[0], words[1], jnp.zeros_like(counters), counters))


def uniform(key: PRNGKey, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.uniform(key, shape)` (float32 in [0, 1)) of one key."""
  words = _fast_words(key)
  size = int(np.prod(shape, dtype=np.int64))
  if words is None or key.shape != () or size >= 2 ** 32:
    return jax.random.uniform(key, shape)
  # Partitionable bits: element i (flat index) hashes the counter (0, i); 32-bit
  # draws take the xor of the two output words.
  counters = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
  b0, b1 = threefry2x32(words[0], words[1], jnp.zeros_like(counters), counters)
  bits = b0 ^ b1
  # Mantissa bits under exponent 0 give [1, 2); minus 1 gives [0, 1) (jax.random.uniform).
  one_to_two = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000),
                                            jnp.float32)
  return one_to_two - jnp.float32(1.0)

"""Pytree arithmetic used by the engine and the methods.

All functions are pure and jit-friendly; none of them jits itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.types import PyTree


def add(a: PyTree, b: PyTree) -> PyTree:
  """Leafwise a + b."""
  return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
  """Leafwise a - b."""
  return jax.tree.map(jnp.subtract, a, b)


def scale(tree: PyTree, factor) -> PyTree:
  """Leafwise factor * tree (factor a scalar)."""
  return jax.tree.map(lambda x: x * jnp.asarray(factor, x.dtype), tree)


def zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, tree)


def where(pred, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise jnp.where with a scalar predicate (used for exact no-op padded steps)."""
  return jax.tree.map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def dot(a: PyTree, b: PyTree) -> jax.Array:
  """Sum over leaves of <a, b>."""
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
  return sum(leaves, jnp.zeros((), jnp.float32))


def squared_norm(tree: PyTree) -> jax.Array:
  return dot(tree, tree)


# Up to this many rows a leading-axis sum is a chain of row adds (`sum_leading`).
MAX_CHAINED_ROWS = 32


def sum_leading(x_C: jax.Array) -> jax.Array:
  """`x_C` [C, ...] summed over its leading axis: x_0 + x_1 + ... left to right.

  For C <= MAX_CHAINED_ROWS a chain of row adds (one fused streaming pass): XLA:CPU
  lowers `jnp.sum(x, axis=0)` with the leading axis innermost, striding a whole row per
  element: 316 ms against 8.8 ms for 10 stacked LEAF-CNN updates (6.6 M coordinates;
  benchmarks/robust_aggregators.py), and seconds once a multiply is fused in. The order is
  numpy's over axis 0, so the value is bit-identical to `np.sum(x, axis=0)`. Larger C:
  `jnp.sum`.
  """
  c = x_C.shape[0]
  if c > MAX_CHAINED_ROWS or c == 0:
    return jnp.sum(x_C, axis=0)
  total = x_C[0]
  for i in range(1, c):
    total = total + x_C[i]
  return total


def weighted_mean(tree_C: PyTree, weights_C: jax.Array) -> PyTree:
  """Weighted mean over a leading client axis C; zero total weight gives zeros.

  Args:
    tree_C: leaves shaped [C, ...].
    weights_C: [C] non-negative weights (padding clients have weight 0).
  """
  total = jnp.sum(weights_C)
  safe = jnp.where(total > 0, total, 1.0)

  def mean(x):
    w = weights_C.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return sum_leading(w * x) / safe.astype(x.dtype)

  return jax.tree.map(mean, tree_C)


def size(tree: PyTree) -> int:
  """Total number of elements (static)."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def count_nonzero(tree: PyTree) -> jax.Array:
  return sum((jnp.count_nonzero(x) for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.int32))


def all_finite(tree: PyTree) -> jax.Array:
  """[] bool: True iff every entry of every floating leaf is finite (non-float leaves are).

  One fused read per leaf: `x - x` is 0 for finite x and NaN for inf or NaN, so
  its sum is NaN exactly when some entry is not finite, and it cannot overflow
  (XLA's algebraic simplifier rewrites `x - x` to 0 for integer types only).
  `all(isfinite(x))` first writes a bool array and then reduces it, most of the
  FedAvg server update of the LEAF CNN on CPU; this form fuses into the update's own
  pass. (`x * 0` fused as well, but XLA:CPU then wrote out an array of zeros to
  multiply by.) Timings: docs/results/engine.md ("Earlier on 2026-11-23 (02:12
  UTC)", item 2, and "Figures moved out of the library's docstrings").
  """
  flags = [jnp.isfinite(jnp.sum(x - x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.ones((), bool)

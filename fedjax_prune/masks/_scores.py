"""Importance scores: trees like `params`, larger = more important to keep.

Scores are computed for every leaf; which leaves are pruned is decided later
by the `prunable` filter given to the selection functions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_prune.types import Params, PRNGKey, PyTree


def magnitude(params: Params) -> PyTree:
  """|w| per entry (magnitude pruning; Han et al. 2015, Zhu & Gupta 2017)."""
  return jax.tree.map(jnp.abs, params)


def random(params: Params, key: PRNGKey) -> PyTree:
  """Uniform [0, 1) float32 scores per entry (random pruning baseline).

  Args:
    params: parameter tree; only shapes are used.
    key: PRNG key; each leaf gets its own subkey.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  scores = [jax.random.uniform(k, jnp.shape(p), jnp.float32) for k, p in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, scores)


def gradient(grads: Params) -> PyTree:
  """|g| per entry (RigL / FedTiny growth criterion)."""
  return jax.tree.map(jnp.abs, grads)


def taylor(params: Params, grads: Params) -> PyTree:
  """|g * w| per entry: first-order Taylor estimate of the loss change (Molchanov et al. 2017)."""
  return jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)


def filter_l1(params: Params, *, axis: int = -1) -> PyTree:
  """Per-filter L1 norm, summed over every axis except the channel `axis`.

  A conv kernel [kh, kw, in, out] gives shape [1, 1, 1, out], a dense kernel
  [in, out] gives [1, out] (keepdims, so the result broadcasts like a channel
  mask). Leaves without that axis (0-d, or 1-d with axis=-2) keep |w|.

  Args:
    params: parameter tree.
    axis: the output-channel axis (last for Flax HWIO / [in, out] kernels).

  References:
    Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017.
  """
  def leaf(p):
    p = jnp.asarray(p)
    if not -p.ndim <= axis < p.ndim:
      return jnp.abs(p)
    ax = axis % p.ndim
    others = tuple(i for i in range(p.ndim) if i != ax)
    return jnp.sum(jnp.abs(p), axis=others, keepdims=True)

  return jax.tree.map(leaf, params)

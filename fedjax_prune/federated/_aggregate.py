"""Aggregation rules, expressed as per-client contributions plus a server-side finish.

The engine sums client contributions in-graph (see `_engine`), so each rule is a
pair: what one client contributes, and how the server turns the sums into a mean.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_prune.types import PyTree


class CountedSum(NamedTuple):
  """Per-coordinate sum and count (partial / heterogeneous-model averaging)."""
  total: PyTree
  count: PyTree


def weighted_contribution(tree: PyTree, weight) -> PyTree:
  """Client side of the example-weighted mean: weight * tree."""
  return jax.tree.map(lambda x: x * jnp.asarray(weight, x.dtype), tree)


def finish_weighted_mean(total: PyTree, total_weight, fallback: PyTree | None = None) -> PyTree:
  """Server side: total / total_weight (fallback, or zeros, where the weight is 0)."""
  ok = total_weight > 0
  inv = jnp.where(ok, 1.0 / jnp.where(ok, total_weight, 1.0), 0.0)
  mean = jax.tree.map(lambda x: x * inv.astype(x.dtype), total)
  if fallback is None:
    return mean
  return jax.tree.map(lambda m, f: jnp.where(ok, m, f), mean, fallback)


def counted_contribution(tree: PyTree, present: PyTree) -> CountedSum:
  """Client side of per-coordinate averaging.

  Args:
    tree: the client's values (e.g. its update).
    present: bool pytree broadcastable to `tree`: which coordinates this client
      holds (HeteroFL/FedRolex index ownership) or touched (FIARSE: delta != 0).
  """
  total = jax.tree.map(lambda x, p: jnp.where(p, x, jnp.zeros((), x.dtype)), tree, present)
  count = jax.tree.map(lambda x, p: jnp.broadcast_to(p, x.shape).astype(jnp.float32), tree, present)
  return CountedSum(total, count)


def finish_counted_mean(sums: CountedSum, fallback: PyTree) -> PyTree:
  """Server side: sum / count per coordinate; coordinates nobody held keep `fallback`."""

  def mean(total, count, old):
    held = count > 0
    return jnp.where(held, total / jnp.where(held, count, 1.0).astype(total.dtype), old)

  return jax.tree.map(mean, sums.total, sums.count, fallback)

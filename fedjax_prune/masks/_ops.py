"""Operations on masks: apply, validate, count, combine.

A mask tree has the structure of `params`; each leaf is a bool array that is
either a scalar `()` (leaf not pruned when True) or has the parameter's rank
with every dimension equal to the parameter's or 1: full shape for
unstructured masks, `(1, ..., 1, out)` for channel (filter) masks.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.masks._filters import path_str, static_bool, tree_like
from fedjax_prune.types import Masks, Params, PyTree


class MaskDtypeError(TypeError, ValueError):
  """A mask leaf is not a bool array (a TypeError, and a ValueError for `check`)."""


def _apply_leaf(p: jax.Array, m: jax.Array) -> jax.Array:
  # broadcast_to makes a scalar mask explicit, so strict rank promotion never fires.
  return jnp.where(jnp.broadcast_to(m, jnp.shape(p)), p, jnp.zeros((), jnp.result_type(p)))


def apply(params: Params, masks: Masks) -> Params:
  """Zeros the pruned entries of `params`, keeping every leaf's dtype.

  Validates `masks` first with `check` (static: tree structure, shapes and
  dtypes only, so it also runs inside jit at no run-time cost).

  Args:
    params: parameter tree.
    masks: mask tree with bool leaves broadcastable to `params` (see module
      docstring).

  Returns:
    `params * masks` leafwise, same shapes and dtypes as `params`.

  Raises:
    ValueError: the structure differs or a leaf's shape does not fit its
      parameter (the message names the leaf).
    TypeError: a mask leaf is not a bool array (e.g. a float mask).
  """
  check(params, masks)
  return jax.tree.map(_apply_leaf, params, masks)


def mask_gradients(grads: Params, masks: Masks) -> Params:
  """Zeros gradients of pruned entries, so an optimizer step cannot regrow them."""
  return apply(grads, masks)


def project(params: Params, masks: Masks) -> Params:
  """Re-masks params after an optimizer step (momentum or weight decay can move zeros)."""
  return apply(params, masks)


def _paths(tree: PyTree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check(params: Params, masks: Masks) -> None:
  """Raises ValueError, naming the leaf path, if `masks` is not a valid mask tree.

  Checks only static properties (structure, shapes, dtypes), so it also works
  on traced values inside jit.

  Args:
    params: parameter tree (arrays or anything with `.shape`).
    masks: candidate mask tree.

  Raises:
    ValueError: structures differ, a leaf is not a bool array, or its shape is
      neither `()` nor the parameter's rank with dims equal to the
      parameter's or 1. A non-bool leaf raises `MaskDtypeError`, which is
      both a ValueError and a TypeError.
  """
  if jax.tree.structure(params) != jax.tree.structure(masks):
    p_paths, m_paths = _paths(params), _paths(masks)
    missing = [p for p in p_paths if p not in m_paths]
    extra = [p for p in m_paths if p not in p_paths]
    raise ValueError(
        "masks must have the structure of params; "
        f"missing leaves: {missing or 'none'}, unexpected leaves: {extra or 'none'} "
        "(None is not a valid mask leaf; use jnp.ones((), bool))")

  def check_leaf(path, p, m):
    name = path_str(path)
    if not hasattr(m, "dtype") or not hasattr(m, "shape"):
      raise MaskDtypeError(f"mask leaf {name!r} must be a bool array, got {type(m).__name__}")
    if m.dtype != jnp.bool_:
      raise MaskDtypeError(f"mask leaf {name!r} must have dtype bool, got {m.dtype} "
                           "(masks are bool: True keeps an entry)")
    p_shape, m_shape = tuple(np.shape(p)), tuple(m.shape)
    ok = m_shape == () or (
        len(m_shape) == len(p_shape)
        and all(md in (1, pd) for md, pd in zip(m_shape, p_shape)))
    if not ok:
      raise ValueError(
          f"mask leaf {name!r} with shape {m_shape} is not broadcastable to its param "
          f"shape {p_shape}: expected () or rank {len(p_shape)} with dims equal or 1")

  jax.tree_util.tree_map_with_path(check_leaf, params, masks)


def ones_like(params: Params, *, full: bool = False) -> Masks:
  """All-True masks: scalar `()` leaves, or full parameter shapes when `full`.

  Args:
    params: parameter tree.
    full: if True every leaf has its parameter's shape (for unstructured
      updates that write per entry); else `()` leaves (cheapest, "not pruned").
  """
  if full:
    return jax.tree.map(lambda p: jnp.ones(np.shape(p), jnp.bool_), params)
  return jax.tree.map(lambda p: jnp.ones((), jnp.bool_), params)


def broadcast_to_params(masks: Masks, params: Params) -> Masks:
  """Expands every mask leaf to its parameter's full shape."""
  return jax.tree.map(lambda m, p: jnp.broadcast_to(m, np.shape(p)), masks, params)


def union(*masks: Masks) -> Masks:
  """Leafwise OR of one or more mask trees (result shape: the broadcast shape)."""
  if not masks:
    raise ValueError("union needs at least one mask tree")
  return jax.tree.map(lambda *ms: _reduce(jnp.logical_or, ms), *masks)


def intersect(*masks: Masks) -> Masks:
  """Leafwise AND of one or more mask trees (result shape: the broadcast shape)."""
  if not masks:
    raise ValueError("intersect needs at least one mask tree")
  return jax.tree.map(lambda *ms: _reduce(jnp.logical_and, ms), *masks)


def _reduce(op, ms):
  out = jnp.asarray(ms[0])
  for m in ms[1:]:
    out = op(out, m)
  return out


def _leaf_counts(masks: Masks, params: Params | None, prunable: Any) -> list[tuple[jax.Array, int]]:
  """(kept entries as an int32 scalar, total entries) for each selected leaf."""
  if params is not None:
    check(params, masks)  # structure, dtype and broadcastable shape, naming the leaf
  shapes = masks if params is None else params
  flags = jax.tree.leaves(tree_like(prunable, masks, "prunable"))
  counts = []
  for (path, m), p, flag in zip(jax.tree_util.tree_flatten_with_path(masks)[0],
                                jax.tree.leaves(shapes), flags):
    if not static_bool(flag, path_str(path)):
      continue
    m = jnp.asarray(m)
    total = math.prod(np.shape(p))
    # Each mask entry stands for the same number of parameter entries.
    per_entry = total // max(m.size, 1)
    counts.append((jnp.sum(m, dtype=jnp.int32) * per_entry, total))
  return counts


def count_kept(masks: Masks, params: Params | None = None, prunable: Any = True) -> jax.Array:
  """Number of parameter entries kept, counting broadcast entries.

  A channel mask of shape (1, 1, 1, 8) keeping 3 filters of a [3, 3, 4, 8]
  kernel counts 3 * 36 = 108 entries.

  Args:
    masks: mask tree.
    params: parameter tree (or `jax.ShapeDtypeStruct`s) giving the full
      shapes; if None, every mask is taken to have its parameter's full shape.
      When given, `masks` is validated against it with `check`.
    prunable: True (all leaves) or a static bool filter; only True leaves count.

  Returns:
    int32 scalar.

  Raises:
    ValueError: `masks` does not fit `params` (see `check`; names the leaf).
  """
  counts = _leaf_counts(masks, params, prunable)
  return sum((k for k, _ in counts), jnp.zeros((), jnp.int32))


def density(masks: Masks, params: Params | None = None, prunable: Any = True) -> jax.Array:
  """Fraction of parameter entries kept, over the leaves selected by `prunable`.

  Args: as `count_kept`.

  Returns:
    float32 scalar in [0, 1] (1 when no entries are selected).
  """
  counts = _leaf_counts(masks, params, prunable)
  total = sum(t for _, t in counts)
  if total == 0:
    return jnp.ones((), jnp.float32)
  kept = sum((k for k, _ in counts), jnp.zeros((), jnp.int32))
  return kept.astype(jnp.float32) / jnp.float32(total)


def sparsity(masks: Masks, params: Params | None = None, prunable: Any = True) -> jax.Array:
  """1 - density: fraction of parameter entries pruned."""
  return 1.0 - density(masks, params, prunable)


def layer_densities(masks: Masks, params: Params | None = None) -> PyTree:
  """Per-leaf density: a tree like `masks` of float32 scalars.

  Args:
    masks: mask tree.
    params: optional; when given, `masks` is validated against it with
      `check` (ValueError naming the leaf). Broadcasting repeats every mask
      entry equally often, so a leaf's kept fraction is its mask's mean.
  """
  if params is not None:
    check(params, masks)
  return jax.tree.map(lambda m: jnp.mean(jnp.asarray(m), dtype=jnp.float32), masks)

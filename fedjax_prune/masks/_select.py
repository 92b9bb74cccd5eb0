"""Scores -> bool masks, with exact keep counts.

Keep counts are `round(density * n)` (round half up), at least 1 entry when
density > 0. Ties are broken by index: among equal scores the entry with the
lower flat index (row-major, leaves in `jax.tree` order for global selection)
is kept, on every backend.

Densities given as Python/NumPy numbers are static: counts are Python ints
and selection uses `lax.top_k`, so jit compiles one program per density.
Densities given as jax arrays may be traced (e.g. a per-client capacity under
vmap); selection then ranks by a stable sort, which is slower but dynamic.

Non-prunable leaves get `jnp.ones((), bool)`.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.masks._filters import path_str, static_bool, tree_like
from fedjax_prune.types import Masks, PyTree


class Unstructured(NamedTuple):
  """Per-entry masks with the parameter's full shape."""


class NByM(NamedTuple):
  """At most `n` of every `m` consecutive entries along the input axis are kept."""
  n: int
  m: int


class Channel(NamedTuple):
  """Whole channels (filters) along `axis` are kept or pruned; masks are (1, .., C, .., 1)."""
  axis: int = -1


SparsityType = Unstructured | NByM | Channel


def _is_static(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _keep_count(density: Any, n: int, name: str):
  """round-half-up(density * n), >= 1 if density > 0, <= n; Python int if static."""
  if _is_static(density):
    d = float(density)
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {d}")
    k = math.floor(d * n + 0.5)
    return min(n, max(k, 1) if d > 0 else 0)
  if isinstance(density, bool):
    raise ValueError(f"{name} must be a number in [0, 1], got {density}")
  d = jnp.asarray(density, jnp.float32)
  k = jnp.floor(d * n + 0.5).astype(jnp.int32)
  k = jnp.where(d > 0, jnp.maximum(k, 1), 0)
  return jnp.minimum(k, n)


def _flat_topk(flat: jax.Array, k) -> jax.Array:
  """Bool mask of the k largest entries of a 1-D array, ties to the lower index."""
  n = flat.shape[0]
  if isinstance(k, int):
    if k >= n:
      return jnp.ones((n,), jnp.bool_)
    if k <= 0:
      return jnp.zeros((n,), jnp.bool_)
    _, idx = jax.lax.top_k(flat, k)  # documented: equal values -> lower index first
    return jnp.zeros((n,), jnp.bool_).at[idx].set(True)
  order = jnp.argsort(flat, descending=True, stable=True)
  return jnp.zeros((n,), jnp.bool_).at[order].set(jnp.arange(n) < k)


def _per_prunable_leaf(fn, scores: PyTree, densities: Any, prunable: Any) -> Masks:
  """`fn(name, score_array, density)` on each prunable leaf; `()` True on the others."""
  densities = tree_like(densities, scores, "densities")
  prunable = tree_like(prunable, scores, "prunable")

  def leaf(path, s, d, flag):
    name = path_str(path)
    if not static_bool(flag, name):
      return jnp.ones((), jnp.bool_)
    return fn(name, jnp.asarray(s), d)

  return jax.tree_util.tree_map_with_path(leaf, scores, densities, prunable)


def topk(scores: PyTree, densities: Any, prunable: Any = True) -> Masks:
  """Per-leaf top-k: each prunable leaf keeps its `round(d * n)` highest scores.

  Args:
    scores: tree of score arrays (e.g. `magnitude(params)`), full param shapes.
    densities: one density in [0, 1] for every leaf, or a tree like `scores`
      (e.g. from `erk`); static numbers or jax arrays (see module docstring).
    prunable: True (all leaves) or a static bool filter.

  Returns:
    Bool masks: full-shape for prunable leaves, `()` True otherwise.

  Example:
    >>> import jax.numpy as jnp
    >>> scores = {'w': jnp.abs(jnp.array([[0.1, -3.], [2., 0.5]]))}
    >>> topk(scores, 0.5)['w']
    Array([[False,  True],
           [ True, False]], dtype=bool)
  """
  def leaf(name, s, d):
    k = _keep_count(d, s.size, f"densities[{name!r}]")
    return _flat_topk(s.reshape(-1), k).reshape(s.shape)

  return _per_prunable_leaf(leaf, scores, densities, prunable)


def _prunable_leaves(scores: PyTree, prunable: Any):
  prunable = tree_like(prunable, scores, "prunable")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(scores)
  flags = [static_bool(f, path_str(p)) for (p, _), f in zip(leaves, jax.tree.leaves(prunable))]
  arrays = [jnp.asarray(s) for _, s in leaves]
  return arrays, flags, treedef


def _concat(arrays: list[jax.Array]) -> jax.Array:
  dtype = jnp.result_type(*arrays)
  return jnp.concatenate([a.reshape(-1).astype(dtype) for a in arrays])


def global_topk(scores: PyTree, density: Any, prunable: Any = True) -> Masks:
  """One threshold over all prunable leaves: keeps the `round(d * N)` highest scores.

  N is the total number of entries in prunable leaves. Layers compete, so
  layers with larger scores keep more (FIARSE, global magnitude pruning).

  Args:
    scores: tree of score arrays, full param shapes.
    density: fraction in [0, 1] of all prunable entries to keep.
    prunable: True (all leaves) or a static bool filter.

  Returns:
    Bool masks: full-shape for prunable leaves, `()` True otherwise.
  """
  arrays, flags, treedef = _prunable_leaves(scores, prunable)
  selected = [a for a, f in zip(arrays, flags) if f]
  out = [jnp.ones((), jnp.bool_)] * len(arrays)
  if selected:
    flat = _concat(selected)
    keep = _flat_topk(flat, _keep_count(density, flat.shape[0], "density"))
    offset = 0
    for i, (a, f) in enumerate(zip(arrays, flags)):
      if f:
        out[i] = keep[offset:offset + a.size].reshape(a.shape)
        offset += a.size
  return jax.tree.unflatten(treedef, out)


def global_threshold(scores: PyTree, density: Any, prunable: Any = True) -> jax.Array:
  """The score of the k-th highest prunable entry, k = round(d * N).

  `threshold(scores, global_threshold(scores, d), prunable)` equals
  `global_topk(scores, d, prunable)` up to ties at the threshold (which it
  keeps). Works with a traced `density`, e.g. a per-client capacity (FIARSE).

  Returns:
    Scalar in the scores' dtype; +inf when k = 0 (keep nothing finite).
  """
  arrays, flags, _ = _prunable_leaves(scores, prunable)
  selected = [a for a, f in zip(arrays, flags) if f]
  if not selected:
    raise ValueError("global_threshold needs at least one prunable leaf")
  flat = _concat(selected)
  k = _keep_count(density, flat.shape[0], "density")
  inf = jnp.array(jnp.inf, flat.dtype)
  if isinstance(k, int):
    return inf if k == 0 else jax.lax.top_k(flat, k)[0][k - 1]
  ordered = jnp.sort(flat, descending=True)
  return jnp.where(k > 0, ordered[jnp.maximum(k - 1, 0)], inf)


def channel_topk(scores: PyTree, densities: Any, prunable: Any = True, *,
                 axis: int = -1) -> Masks:
  """Per-leaf top filters: keeps the `round(d * C)` channels with the highest score.

  A channel's score is the sum of its entries' scores, so per-filter scores
  (`filter_l1(params)`, shape (1, .., C)) and per-entry scores
  (`magnitude(params)`) give the same masks.

  Args:
    scores: tree of per-entry or per-channel scores.
    densities: fraction of channels kept, one number or a tree like `scores`.
    prunable: True (all leaves) or a static bool filter.
    axis: the channel axis (last for Flax kernels).

  Returns:
    Bool masks shaped (1, .., C, .., 1) for prunable leaves, `()` True otherwise.
  """
  def leaf(name, s, d):
    if not -s.ndim <= axis < s.ndim:
      raise ValueError(f"axis={axis} is out of range for leaf {name!r} of shape {s.shape}")
    ax = axis % s.ndim
    per_channel = jnp.sum(s, axis=tuple(i for i in range(s.ndim) if i != ax), keepdims=True)
    k = _keep_count(d, s.shape[ax], f"densities[{name!r}]")
    return _flat_topk(per_channel.reshape(-1), k).reshape(per_channel.shape)

  return _per_prunable_leaf(leaf, scores, densities, prunable)


def n_by_m(scores: PyTree, n: int, m: int, prunable: Any = True, *, axis: int = -2) -> Masks:
  """N:M sparsity: keeps the `n` highest of every `m` consecutive entries along `axis`.

  The default axis -2 is the input (reduction) axis of Flax kernels
  ([in, out] and [kh, kw, in, out]), the layout sparse tensor cores need.

  Args:
    scores: tree of score arrays, full param shapes.
    n: entries kept per group, 0 <= n <= m.
    m: group size, >= 1; the size along `axis` of each prunable leaf must be
      divisible by m.
    prunable: True (all leaves) or a static bool filter.
    axis: grouping axis.

  Returns:
    Bool masks: full-shape for prunable leaves, `()` True otherwise.

  References:
    Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021.
  """
  if not (isinstance(m, (int, np.integer)) and m >= 1):
    raise ValueError(f"m must be an int >= 1, got {m}")
  if not (isinstance(n, (int, np.integer)) and 0 <= n <= m):
    raise ValueError(f"n must be an int in [0, m={m}], got {n}")
  prunable = tree_like(prunable, scores, "prunable")

  def leaf(path, s, flag):
    name = path_str(path)
    if not static_bool(flag, name):
      return jnp.ones((), jnp.bool_)
    s = jnp.asarray(s)
    if not -s.ndim <= axis < s.ndim:
      raise ValueError(f"axis={axis} is out of range for leaf {name!r} of shape {s.shape}")
    ax = axis % s.ndim
    if s.shape[ax] % m:
      raise ValueError(
          f"leaf {name!r} has size {s.shape[ax]} along axis {axis}, not divisible by m={m}")
    if n == m:
      return jnp.ones(s.shape, jnp.bool_)
    if n == 0:
      return jnp.zeros(s.shape, jnp.bool_)
    moved = jnp.moveaxis(s, ax, -1)
    groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    _, idx = jax.lax.top_k(groups, n)  # [..., G, n]
    slots = jnp.arange(m).reshape((1,) * idx.ndim + (m,))
    keep = jnp.any(idx[..., None] == slots, axis=-2)  # [..., G, m]
    return jnp.moveaxis(keep.reshape(moved.shape), -1, ax)

  return jax.tree_util.tree_map_with_path(leaf, scores, prunable)


def threshold(scores: PyTree, tau: Any, prunable: Any = True) -> Masks:
  """Keeps entries with score >= tau (ties kept); tau may be traced.

  Args:
    scores: tree of score arrays.
    tau: scalar threshold, or a tree like `scores` of scalars.
    prunable: True (all leaves) or a static bool filter.

  Returns:
    Bool masks shaped like the scores for prunable leaves, `()` True otherwise.
  """
  tau = tree_like(tau, scores, "tau")
  prunable = tree_like(prunable, scores, "prunable")

  def leaf(path, s, t, flag):
    if not static_bool(flag, path_str(path)):
      return jnp.ones((), jnp.bool_)
    return jnp.asarray(s) >= jnp.asarray(t)

  return jax.tree_util.tree_map_with_path(leaf, scores, tau, prunable)


def select(scores: PyTree, densities: Any, kind: SparsityType = Unstructured(),
           prunable: Any = True) -> Masks:
  """Dispatches on the sparsity type.

  `Unstructured()` -> `topk`, `Channel(axis)` -> `channel_topk`,
  `NByM(n, m)` -> `n_by_m` (whose density is n/m; `densities` is ignored).
  """
  if isinstance(kind, Unstructured):
    return topk(scores, densities, prunable)
  if isinstance(kind, Channel):
    return channel_topk(scores, densities, prunable, axis=kind.axis)
  if isinstance(kind, NByM):
    return n_by_m(scores, kind.n, kind.m, prunable)
  raise ValueError(f"kind must be Unstructured(), NByM(n, m) or Channel(axis), got {kind!r}")

"""Which parameter leaves are prunable, as static bool trees.

A *filter* is a tree with the structure of `params` and Python `bool` leaves.
It is static (decided from shapes and names, never from values), so code
that branches on it traces once. Pass it to the selection and distribution
functions as `prunable`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import numpy as np

from fedjax_prune.types import Params, PyTree

Filter = PyTree  # same structure as params, Python bool leaves


def path_str(path: Iterable[Any]) -> str:
  """Formats a jax key path as 'conv_0/kernel' (used in filters and error messages)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def by_ndim(params: Params, min_ndim: int = 2) -> Filter:
  """Marks leaves with at least `min_ndim` dimensions as prunable.

  With the default, conv and dense kernels are prunable while biases and
  BatchNorm scales/offsets (1-D) stay dense, as in RigL, jaxpruner and FedTiny.

  Args:
    params: parameter tree (arrays or anything with a `.shape`).
    min_ndim: smallest rank that is prunable, >= 0.

  Returns:
    A tree like `params` with Python bool leaves.
  """
  if min_ndim < 0:
    raise ValueError(f"min_ndim must be >= 0, got {min_ndim}")
  return jax.tree.map(lambda p: len(np.shape(p)) >= min_ndim, params)


def by_path_regex(params: Params, pattern: str) -> Filter:
  """Marks leaves whose path matches `pattern` (`re.search`) as prunable.

  Paths join dict keys with '/', e.g. 'conv_0/kernel', so `r'kernel$'` selects
  every kernel and `r'^(?!dense_1/)'` excludes a classifier head.

  Args:
    params: parameter tree.
    pattern: regular expression searched in each leaf path.

  Returns:
    A tree like `params` with Python bool leaves.
  """
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: regex.search(path_str(path)) is not None, params)


def combine(*filters: Filter, reduce_fn: Callable[[Iterable[bool]], bool] = all) -> Filter:
  """Combines filters leafwise; `reduce_fn=all` is AND (default), `any` is OR.

  Args:
    *filters: one or more filters with the same structure.
    reduce_fn: reduces the tuple of a leaf's bools to one bool.

  Returns:
    The combined filter.
  """
  if not filters:
    raise ValueError("combine needs at least one filter")
  return jax.tree.map(lambda *bs: bool(reduce_fn(bs)), *filters)


def invert(filter_: Filter) -> Filter:
  """Leafwise NOT of a filter."""
  return jax.tree.map(lambda b: not b, filter_)


def tree_like(value: Any, like: PyTree, name: str) -> PyTree:
  """Returns `value` shaped like `like`: a single leaf is repeated for every leaf.

  Lets `densities`, `prunable` and `tau` be given either once or per leaf.
  """
  treedef = jax.tree.structure(like)
  value_def = jax.tree.structure(value)
  if jax.tree_util.treedef_is_leaf(value_def) and value_def.num_leaves == 1:
    return jax.tree.unflatten(treedef, [value] * treedef.num_leaves)
  if value_def != treedef:
    raise ValueError(
        f"{name} must be a single value or a tree with the structure of the "
        f"params/scores; got {value_def}, expected {treedef}")
  return value


def static_bool(value: Any, path: str) -> bool:
  """A prunable flag as a Python bool; traced values are rejected (filters are static)."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise ValueError(
      f"prunable[{path!r}] must be a Python bool (filters are static), got "
      f"{type(value).__name__}")

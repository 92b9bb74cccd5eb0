"""Layer-wise density allocation for a global target density.

Each function returns a tree like `params` of Python floats: the density of
each prunable leaf, and 1.0 for non-prunable leaves (they stay dense). Feed
it to `topk` / `channel_topk` as `densities`; being Python floats, the keep
counts are static under jit.

By default `density` is the fraction of *prunable* entries kept. With
`include_dense=True` it is the fraction of *all* entries kept, dense leaves
counting against the budget (FedTiny's convention):
prunable entries kept = density * N_total - N_dense.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from fedjax_prune.masks._filters import path_str, static_bool, tree_like
from fedjax_prune.types import Params, PyTree


def _layers(params: Params, prunable: Any):
  """(treedef, shapes, flags) for every leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  flags = jax.tree.leaves(tree_like(prunable, params, "prunable"))
  shapes = [tuple(np.shape(p)) for _, p in flat]
  flags = [static_bool(f, path_str(path)) for (path, _), f in zip(flat, flags)]
  return treedef, shapes, flags


def _budget(density: float, shapes, flags, include_dense: bool) -> float:
  """Number of prunable entries to keep."""
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density must be in [0, 1], got {density}")
  n_sparse = sum(math.prod(s) for s, f in zip(shapes, flags) if f)
  if not include_dense:
    return density * n_sparse
  n_dense = sum(math.prod(s) for s, f in zip(shapes, flags) if not f)
  keep = density * (n_sparse + n_dense) - n_dense
  if keep < 0:
    raise ValueError(
        f"density must be >= {n_dense / (n_sparse + n_dense):.6g} with include_dense=True "
        f"(the {n_dense} non-prunable entries alone exceed the budget), got {density}")
  return keep


def uniform(params: Params, density: float, prunable: Any = True, *,
            include_dense: bool = False) -> PyTree:
  """The same density in every prunable leaf.

  Args:
    params: parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    density: target density in [0, 1] (see module docstring).
    prunable: True (all leaves) or a static bool filter.
    include_dense: count non-prunable entries against the budget.

  Returns:
    A tree like `params` of Python floats (1.0 for non-prunable leaves).
  """
  treedef, shapes, flags = _layers(params, prunable)
  keep = _budget(float(density), shapes, flags, include_dense)
  n_sparse = sum(math.prod(s) for s, f in zip(shapes, flags) if f)
  d = min(1.0, keep / n_sparse) if n_sparse else 1.0
  return jax.tree.unflatten(treedef, [d if f else 1.0 for f in flags])


def erk(params: Params, density: float, prunable: Any = True, *,
        erk_power_scale: float = 1.0, include_dense: bool = False) -> PyTree:
  """Erdős–Rényi-Kernel densities: d_l = min(1, eps * (sum(shape_l) / prod(shape_l))**p).

  eps is solved so that sum_l d_l * n_l equals the budget; layers whose
  density would exceed 1 are made dense and eps is re-solved for the rest,
  so the total is exact (before per-layer rounding of keep counts). Larger
  layers get lower density.

  Args:
    params: parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    density: target density in [0, 1] (see module docstring).
    prunable: True (all leaves) or a static bool filter.
    erk_power_scale: exponent p >= 0 on the ERK ratio; 0 gives `uniform`.
    include_dense: count non-prunable entries against the budget.

  Returns:
    A tree like `params` of Python floats (1.0 for non-prunable leaves).

  References:
    Evci et al., "Rigging the Lottery", ICML 2020; jaxpruner
    `sparsity_distributions.erk`.
  """
  if erk_power_scale < 0:
    raise ValueError(f"erk_power_scale must be >= 0, got {erk_power_scale}")
  treedef, shapes, flags = _layers(params, prunable)
  keep = _budget(float(density), shapes, flags, include_dense)
  sparse = [i for i, f in enumerate(flags) if f and math.prod(shapes[i]) > 0]
  sizes = {i: math.prod(shapes[i]) for i in sparse}
  raw = {i: (sum(shapes[i]) / sizes[i]) ** erk_power_scale for i in sparse}

  dense: set[int] = set()
  eps = 0.0
  while True:
    rest = [i for i in sparse if i not in dense]
    if not rest:
      break
    remaining = keep - sum(sizes[i] for i in dense)
    eps = remaining / sum(raw[i] * sizes[i] for i in rest)
    # Making a layer dense only raises eps for the others, so every layer
    # above 1 now stays above 1: fix them all at once.
    over = {i for i in rest if eps * raw[i] > 1.0}
    if not over:
      break
    dense |= over

  out = [1.0] * len(flags)
  for i in sparse:
    out[i] = 1.0 if i in dense else min(1.0, max(0.0, eps * raw[i]))
  return jax.tree.unflatten(treedef, out)

"""Masks: scores -> layer densities -> bool masks, plus schedules and mask ops.

A mask tree has the structure of `params` with bool leaves broadcastable to
each parameter: full shape (unstructured), (1, ..., 1, out) (channel) or
`()` (not pruned). Masks are dynamic state, never static arguments.

Typical use::

  prunable = masks.by_ndim(params)                 # kernels, not biases / BN
  densities = masks.erk(params, 0.1, prunable)     # static Python floats
  m = masks.topk(masks.magnitude(params), densities, prunable)
  params = masks.apply(params, m)
"""
from fedjax_prune.masks._distributions import erk, uniform
from fedjax_prune.masks._filters import by_ndim, by_path_regex, combine, invert
from fedjax_prune.masks._ops import (
    apply,
    broadcast_to_params,
    check,
    count_kept,
    density,
    intersect,
    layer_densities,
    mask_gradients,
    ones_like,
    project,
    sparsity,
    union,
)
from fedjax_prune.masks._schedule import cosine_fraction, polynomial_sparsity, should_update
from fedjax_prune.masks._scores import filter_l1, gradient, magnitude, random, taylor
from fedjax_prune.masks._select import (
    Channel,
    NByM,
    SparsityType,
    Unstructured,
    channel_topk,
    global_threshold,
    global_topk,
    n_by_m,
    select,
    threshold,
    topk,
)

__all__ = [
    # ops
    "apply",
    "broadcast_to_params",
    "check",
    "count_kept",
    "density",
    "intersect",
    "layer_densities",
    "mask_gradients",
    "ones_like",
    "project",
    "sparsity",
    "union",
    # filters
    "by_ndim",
    "by_path_regex",
    "combine",
    "invert",
    # scores
    "filter_l1",
    "gradient",
    "magnitude",
    "random",
    "taylor",
    # selection
    "Channel",
    "NByM",
    "SparsityType",
    "Unstructured",
    "channel_topk",
    "global_threshold",
    "global_topk",
    "n_by_m",
    "select",
    "threshold",
    "topk",
    # distributions
    "erk",
    "uniform",
    # schedules
    "cosine_fraction",
    "polynomial_sparsity",
    "should_update",
]

"""Array pieces shared by FedTiny and the sparse-FL baselines (FedDST, PruneFL, LotteryFL,
SNIP, SynFlow): budgets, selections, one-batch gradients.

Every method here trains ONE global unstructured mask over the conv/dense kernels
(biases and BatchNorm dense; text models: the LSTM / attention / FFN kernels and the
head, embeddings and LayerNorm dense, `prunable_filter`), at a global density that
counts the dense entries against the budget (FedTiny's convention):
prunable entries kept = d * N_total - N_dense. Each is a `base.MaskRule` run by
`base.masked_fedavg`. Selections with a *traced* number of entries
(cosine-annealed prune/grow counts) use `rank_select`, a stable sort, so one
compiled round serves every adjustment.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune import masks as masks_lib
from fedjax_prune.federated import example_permutation
from fedjax_prune.masks._filters import path_str, static_bool, tree_like
from fedjax_prune.types import BatchStats, Masks, Params, PRNGKey, PyTree

DISTRIBUTIONS = ("uniform", "erk")


def check_int(name: str, value: Any, minimum: int) -> None:
  """Raises ValueError naming `name` unless `value` is an int >= `minimum`."""
  if not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def prunable_filter(params: Params) -> PyTree:
  """Conv and dense kernels (ndim >= 2) are prunable; biases, BN and LayerNorm stay dense.

  Text models: the LSTM input and recurrent kernels, the attention / FFN kernels and
  the output head are prunable; the token and position embedding tables (leaves named
  'embedding') stay dense: a lookup is a gather, so pruning its entries saves no FLOPs
  (`accounting` charges embeddings 0), and they are counted in the budget like biases.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: len(np.shape(p)) >= 2 and path_str(path).split("/")[-1] != "embedding",
      params)


def layer_densities(params: Params, density: float, distribution: str = "uniform",
                    prunable: Any = None) -> PyTree:
  """Per-leaf densities (Python floats) for a global density that counts dense entries.

  ERK reads each prunable leaf's stored shape (as RigL and jaxpruner do): an LSTM's input
  kernel [in, 4H] and recurrent kernel [H, 4H] are two dense layers of fan-in `in` resp.
  H and fan-out 4H (the four gates' columns as one layer). LEAF's TensorFlow LSTM stores
  them as one [in + H, 4H] matrix; split, the small input kernel of the first layer
  (in = embed_dim) gets the higher ERK density of a thin layer.

  Args:
    params: parameter tree (arrays or ShapeDtypeStructs).
    density: fraction of ALL parameter entries kept, in (0, 1].
    distribution: 'uniform' (same density in every kernel) or 'erk'.
    prunable: static bool filter (default: `prunable_filter`).

  Returns:
    A tree like `params` of Python floats (1.0 for dense leaves).
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
  if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
    raise ValueError(f"density must be in (0, 1], got {density!r}")
  prunable = prunable_filter(params) if prunable is None else prunable
  fn = masks_lib.uniform if distribution == "uniform" else masks_lib.erk
  return fn(params, float(density), prunable, include_dense=True)


def magnitude_masks(params: Params, densities: PyTree, prunable: Any) -> Masks:
  """Per-layer magnitude masks: each prunable leaf keeps its round(d * n) largest |w|."""
  return masks_lib.topk(masks_lib.magnitude(params), densities, prunable)


def rank_select(scores: jax.Array, k, key: PRNGKey | None = None) -> jax.Array:
  """Bool mask of the `k` largest entries of `scores` (any shape); k may be traced.

  Ties go to the lower flat index (stable sort), as in `masks.topk`; with `key`, ties
  are broken uniformly at random instead (the entries are ranked in a random order,
  then stably sorted), so that e.g. many zero scores do not all favour the first rows.
  """
  flat = scores.reshape(-1)
  n = flat.shape[0]
  if key is None:
    order = jnp.argsort(flat, descending=True, stable=True)
  else:
    shuffle = jax.random.permutation(key, n)
    order = shuffle[jnp.argsort(flat[shuffle], descending=True, stable=True)]
  chosen = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(n) < k)
  return chosen.reshape(scores.shape)


def full_masks(params: Params, prunable: Any) -> Masks:
  """All-True masks: full shape on prunable leaves, `()` elsewhere (density 1)."""
  flags = leaf_flags(params, prunable)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [jnp.ones(jnp.shape(p), bool) if f else jnp.ones((), bool)
                                      for p, f in zip(leaves, flags)])


def leaf_flags(params: Params, prunable: Any) -> list[bool]:
  """The prunable filter as a flat list of Python bools, in `jax.tree.leaves` order."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  flags = jax.tree.leaves(tree_like(prunable, params, "prunable"))
  return [static_bool(f, path_str(p)) for (p, _), f in zip(flat, flags)]


def leaf_paths(params: Params) -> list[str]:
  """'a/b/kernel' path of every leaf, in `jax.tree.leaves` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def random_batch(key: PRNGKey, num_examples: jax.Array, max_examples: int,
                 batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Indices [B] of a random batch without replacement and its validity mask [B].

  Used for the one-batch gradients of prune/grow rules (growth_data_mode='batch').
  """
  order = example_permutation(key, num_examples, max_examples)
  size = min(batch_size, max_examples)
  idx = order[:size]
  return idx, jnp.arange(size) < num_examples


def batch_gradient(apply_fn: Callable, loss_fn: Callable, params: Params, batch_stats: BatchStats,
                   x: jax.Array, y: jax.Array, mask: jax.Array) -> Params:
  """Dense gradient of the mean batch loss w.r.t. ALL params (pruned positions included).

  BatchNorm in train mode (the mode the client trains in); the updated running
  statistics are discarded (no training happens here).
  """
  def loss(p):
    logits, _ = apply_fn(p, batch_stats, x, train=True, example_mask=mask)
    w = mask.astype(jnp.float32)
    return jnp.sum(loss_fn(logits, y) * w) / jnp.maximum(jnp.sum(w), 1.0)

  return jax.grad(loss)(params)


def random_batch_gradient(apply_fn: Callable, loss_fn: Callable, params: Params,
                          batch_stats: BatchStats, data, key: PRNGKey, batch_size: int) -> Params:
  """`batch_gradient` on a random batch (`random_batch`) of one client's padded `data`."""
  idx, mask = random_batch(key, data.num_examples, data.x.shape[0], batch_size)
  return batch_gradient(apply_fn, loss_fn, params, batch_stats, data.x[idx], data.y[idx], mask)


def only_when(pred: jax.Array, fn: Callable[[], PyTree], like: PyTree) -> PyTree:
  """`fn()` when `pred`, else zeros shaped like `like` (a real branch: `pred` must not
  depend on the client, so it stays a `cond` under `vmap`)."""
  return jax.lax.cond(pred, lambda _: fn(), lambda _: jax.tree.map(jnp.zeros_like, like), None)


def keep_counts(masks: Masks, prunable_flags: list[bool]) -> list[int]:
  """Host-side: kept entries of each prunable leaf (for tests and accounting)."""
  return [int(np.sum(np.asarray(m))) for m, f in zip(jax.tree.leaves(masks), prunable_flags) if f]


def sparse_budget(params: Params, density: float, prunable: Any) -> tuple[int, int]:
  """(kept prunable entries, total prunable entries) of a global density incl. dense entries."""
  flags = leaf_flags(params, prunable)
  sizes = [math.prod(np.shape(p)) for p in jax.tree.leaves(params)]
  n_sparse = sum(s for s, f in zip(sizes, flags) if f)
  n_dense = sum(s for s, f in zip(sizes, flags) if not f)
  keep = density * (n_sparse + n_dense) - n_dense
  if keep <= 0:
    raise ValueError(f"density {density} is below the dense share "
                     f"{n_dense / (n_sparse + n_dense):.4g} (biases and BN alone exceed it)")
  return int(round(keep)), n_sparse


def column_floor(scores: jax.Array, min_per_output: int) -> jax.Array:
  """Bool mask of the `min_per_output` highest scores of every output unit (last axis).

  A kernel [..., out] is read as [fan_in, out]; each output column keeps its
  min(min_per_output, fan_in) best entries (ties to the lower index). Every
  output unit of the layer then has at least one incoming connection.
  """
  m = min(int(min_per_output), math.prod(scores.shape[:-1]) if scores.ndim > 1 else 1)
  if m <= 0:
    return jnp.zeros(scores.shape, bool)
  cols = scores.reshape(-1, scores.shape[-1])
  order = jnp.argsort(cols, axis=0, descending=True, stable=True)
  rank = jnp.argsort(order, axis=0, stable=True)  # the inverse permutation: rank of each entry
  return (rank < m).reshape(scores.shape)


def floor_count(shape: tuple[int, ...], min_per_output: int) -> int:
  """Entries `column_floor` keeps in a kernel of `shape`."""
  if min_per_output <= 0:
    return 0
  fan_in = math.prod(shape[:-1]) if len(shape) > 1 else 1
  return min(int(min_per_output), fan_in) * (shape[-1] if shape else 1)


def floored_global_select(score_leaves: list, flags: list[bool], k, min_per_output: int) -> list:
  """Global top-`k` over the prunable leaves, after reserving a per-output-unit floor.

  Each prunable leaf first keeps `column_floor(scores, min_per_output)`; the
  other kept entries are the globally highest remaining scores, so exactly
  `k` entries are kept in total (k may be traced) provided k >= the floors'
  sum (`floor_count`). min_per_output=0 is a plain global top-k.

  Args:
    score_leaves: one score array per parameter leaf (non-prunable ones ignored).
    flags: the prunable filter as Python bools, same order.
    k: total kept prunable entries.
    min_per_output: floor per output unit of every prunable leaf.

  Returns:
    A list like `score_leaves`: bool masks for prunable leaves, None elsewhere.
  """
  selected = []
  for s, f in zip(score_leaves, flags):
    if f:
      s = s.astype(jnp.float32)
      selected.append(jnp.where(column_floor(s, min_per_output), jnp.inf, s))
  out = [None] * len(score_leaves)
  if not selected:
    return out
  chosen = rank_select(jnp.concatenate([s.reshape(-1) for s in selected]), k)
  offset = 0
  for i, (s, f) in enumerate(zip(score_leaves, flags)):
    if f:
      out[i] = chosen[offset:offset + s.size].reshape(s.shape)
      offset += s.size
  return out

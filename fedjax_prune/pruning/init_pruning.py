"""Pruning at initialisation: SNIP and SynFlow masks (then trained with masked FedAvg).

Both select ONE global top-k over the prunable kernels, with the keep count of a
global density that counts the dense biases/BN entries (FedTiny's budget), so
layers compete. Host-side functions (call them once before training; they jit
their own gradient internally only through `jax.grad`, evaluated eagerly).

References:
  Lee, Ajanthan, Torr. "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", ICLR 2019. Tanaka, Kunin, Yamins, Ganguli. "Pruning neural
  networks without any data by iteratively conserving synaptic flow", NeurIPS 2020.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_prune import masks as masks_lib
from fedjax_prune.federated import softmax_cross_entropy
from fedjax_prune.pruning import _sparse
from fedjax_prune.pruning.fedtiny import full_masks
from fedjax_prune.types import BatchStats, Masks, Params


def _prunable_density(params: Params, density: float, prunable: Any) -> float:
  keep, n_sparse = _sparse.sparse_budget(params, density, prunable)
  return keep / n_sparse


def snip_masks(apply_fn: Callable, params: Params, batch_stats: BatchStats, x: jax.Array,
               y: jax.Array, *, density: float, prunable: Any,
               loss_fn: Callable = softmax_cross_entropy) -> Masks:
  """SNIP: keep the global top entries of |g * w| on one mini-batch (x [B, ...], y [B]).

  In FL the mini-batch comes from one client (SNIP needs data at pruning time).
  BatchNorm runs in train mode, as during training.

  Example:
    >>> import jax
    >>> from fedjax_prune import masks, testing
    >>> from fedjax_prune.pruning import init_pruning
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> m = init_pruning.snip_masks(apply_fn, params, {}, data.x[1, :4], data.y[1, :4],
    ...                             density=0.5, prunable=masks.by_ndim(params))
    >>> round(float(masks.density(m, params)), 1)
    0.5
  """
  grads = _sparse.batch_gradient(apply_fn, loss_fn, params, batch_stats, x, y,
                                 jnp.ones((x.shape[0],), bool))
  scores = masks_lib.taylor(params, grads)
  return masks_lib.global_topk(scores, _prunable_density(params, density, prunable), prunable)


def synflow_masks(apply_fn: Callable, params: Params, batch_stats: BatchStats,
                  input_shape: tuple[int, ...], *, density: float, prunable: Any,
                  num_iterations: int = 100) -> Masks:
  """SynFlow: data-free iterative pruning with scores |w * dR/dw|, R = 1^T f(1; |W|).

  The prunable density follows the exponential schedule d'^(i / num_iterations),
  i = 1..num_iterations; BN runs in eval mode (running statistics).

  Raises:
    FloatingPointError: the synaptic flow overflowed float32 (too deep/wide a model).

  Example:
    >>> import jax
    >>> from fedjax_prune import masks, testing
    >>> from fedjax_prune.pruning import init_pruning
    >>> apply_fn, params, _ = testing.tiny_problem(jax.random.key(0))
    >>> m = init_pruning.synflow_masks(apply_fn, params, {}, (6,), density=0.5,
    ...                                prunable=masks.by_ndim(params), num_iterations=3)
    >>> round(float(masks.density(m, params)), 1)
    0.5
  """
  _sparse.check_int("num_iterations", num_iterations, 1)
  final = _prunable_density(params, density, prunable)
  abs_params = jax.tree.map(jnp.abs, params)
  ones = jnp.ones((1,) + tuple(input_shape), jnp.float32)

  @jax.jit
  def scores_fn(masks):
    def flow(p):
      logits, _ = apply_fn(p, batch_stats, ones, train=False)
      return jnp.sum(logits)
    masked = _sparse.apply_masks(abs_params, masks)
    grads = jax.grad(flow)(masked)
    return masks_lib.taylor(masked, grads)

  masks = full_masks(params, prunable)  # full shapes from the start: one compile
  for i in range(1, num_iterations + 1):
    scores = scores_fn(masks)
    if not all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(scores)):
      raise FloatingPointError("SynFlow scores overflowed float32; use fewer/narrower layers")
    d = final if i == num_iterations else final ** (i / num_iterations)
    masks = masks_lib.global_topk(scores, d, prunable)
  return masks

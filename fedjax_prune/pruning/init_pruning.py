"""Pruning at initialisation: SNIP and SynFlow masks, then masked FedAvg with them fixed.

Both select ONE global top-k over the prunable kernels, with the keep count of a
global density that counts the dense biases/BN entries (FedTiny's budget), so
layers compete. `snip_masks` / `synflow_masks` are host-side (called once, before
training); `snip` / `synflow` are the `base.MaskRule`s that choose them at `init` and
never change them; `snip_method` / `synflow_method` run them end to end through
`base.masked_fedavg` with FedAvg's server step (`optax.sgd(1.0)` on the mean
pseudo-gradient, as `federated.fedavg`).

References:
  Lee, Ajanthan, Torr. "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", ICLR 2019. Tanaka, Kunin, Yamins, Ganguli. "Pruning neural
  networks without any data by iteratively conserving synaptic flow", NeurIPS 2020.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune import federated
from fedjax_prune import masks as masks_lib
from fedjax_prune.federated import softmax_cross_entropy
from fedjax_prune.pruning import _sparse, base
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
    masked = masks_lib.apply(abs_params, masks)
    grads = jax.grad(flow)(masked)
    return masks_lib.taylor(masked, grads)

  masks = _sparse.full_masks(params, prunable)  # full shapes from the start: one compile
  for i in range(1, num_iterations + 1):
    scores = scores_fn(masks)
    if not all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(scores)):
      raise FloatingPointError("SynFlow scores overflowed float32; use fewer/narrower layers")
    d = final if i == num_iterations else final ** (i / num_iterations)
    masks = masks_lib.global_topk(scores, d, prunable)
  return masks


def snip(apply_fn: Callable, x: jax.Array, y: jax.Array, *, density: float, prunable: Any,
         loss_fn: Callable = softmax_cross_entropy) -> base.MaskRule:
  """SNIP as a rule: `snip_masks` on the mini-batch (x, y) at `init`, fixed after."""
  return base.fixed_masks(lambda params, batch_stats: snip_masks(
      apply_fn, params, batch_stats, x, y, density=density, prunable=prunable, loss_fn=loss_fn))


def synflow(apply_fn: Callable, input_shape: tuple[int, ...], *, density: float, prunable: Any,
            num_iterations: int = 100) -> base.MaskRule:
  """SynFlow as a rule: `synflow_masks` at `init` (data-free), fixed after."""
  _sparse.check_int("num_iterations", num_iterations, 1)
  return base.fixed_masks(lambda params, batch_stats: synflow_masks(
      apply_fn, params, batch_stats, input_shape, density=density, prunable=prunable,
      num_iterations=num_iterations))


def _init_method(run: base.SparseRun, name: str, density: float,
                 rule_for: Callable[[Callable, Any], base.MaskRule],
                 aggregator: federated.Aggregator | None) -> federated.Method:
  prunable = _sparse.prunable_filter(run.params)
  apply_fn = run.model.apply_for(run.spec)
  alg = base.masked_fedavg(apply_fn, run.optimizer, run.schedule, rule_for(apply_fn, prunable),
                           server_optimizer=optax.sgd(1.0), aggregator=aggregator)

  def init_fn():
    state = alg.init(run.params, run.key, batch_stats=run.batch_stats)
    return state, {"sparse_method": name, "target_density": float(density)}

  return base.masked_method(run, alg, init_fn, apply_fn=apply_fn, prunable=prunable)


def snip_method(run: base.SparseRun, *, density: float,
                aggregator: federated.Aggregator | None = None) -> federated.Method:
  """SNIP end to end: the mask of one mini-batch of client 0 (its first `batch_size`
  examples: SNIP needs data at pruning time), then masked FedAvg (its updates aggregated
  by `aggregator`, None: the mean; `base.masked_fedavg`'s, its state checkpointed with
  the server state). Returns the `Method` (`base.masked_method`'s records and summary)."""
  n0 = int(np.asarray(run.train.num_examples)[0])
  size = max(1, min(n0, run.schedule.batch_size, run.train.x.shape[1]))
  x, y = run.train.x[0, :size], run.train.y[0, :size]
  return _init_method(run, "snip", density, lambda apply_fn, prunable: snip(
      apply_fn, x, y, density=density, prunable=prunable), aggregator)


def synflow_method(run: base.SparseRun, *, density: float, input_shape: tuple[int, ...],
                   num_iterations: int = 100,
                   aggregator: federated.Aggregator | None = None) -> federated.Method:
  """SynFlow end to end: the data-free mask (`num_iterations` steps, an all-ones input of
  `input_shape`), then masked FedAvg (`aggregator`: as `snip_method`'s). Returns the
  `Method` (`base.masked_method`'s records and summary)."""
  input_shape = tuple(input_shape)
  return _init_method(run, "synflow", density, lambda apply_fn, prunable: synflow(
      apply_fn, input_shape, density=density, prunable=prunable, num_iterations=num_iterations),
      aggregator)

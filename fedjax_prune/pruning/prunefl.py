"""PruneFL: initial pruning on one client + adaptive pruning from squared gradients.

1. `initial_masks`: one (powerful) client trains the dense model and prunes it
   iteratively by global magnitude to the target density (geometric schedule
   over `num_iterations` train/prune cycles); its trained, pruned model starts FL.
2. `prunefl`: masked FedAvg; every `adjust_every` rounds (up to `adjust_end`)
   clients upload their squared dense gradients summed over `importance_batches`
   random mini-batches (after local training), the server averages them
   (example-weighted) into the importance z_j and keeps the globally top
   entries of z (the same number as before, so the density is unchanged);
   regrown weights start at 0.

Simplifications (documented deviations from the paper's code): PruneFL sums
squared gradients over every local iteration and chooses the parameter set
maximising importance per unit of measured round time; with a fixed density
budget and a cost linear in the parameter count this is the top-k of the
importance, which is what this module does, from `importance_batches` batches.

References:
  Jiang, Wang, Valls, Ko, Lee, Leung, Tassiulas. "Model Pruning Enables
  Efficient Federated Learning on Edge Devices", IEEE TNNLS 2022 (code jiangyuang/PruneFL).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_prune import masks as masks_lib
from fedjax_prune.data import ClientData
from fedjax_prune.federated import (ClientInfo, ClientOutput, FedAlgorithm, LocalSchedule,
                                    make_local_train, softmax_cross_entropy)
from fedjax_prune.pruning import _sparse
from fedjax_prune.pruning._sparse import SparseState, SparseSums, apply_masks
from fedjax_prune.pruning.fedtiny import full_masks
from fedjax_prune.types import BatchStats, Masks, Params, PRNGKey


def initial_masks(apply_fn: Callable, client_optimizer, schedule: LocalSchedule, params: Params,
                  batch_stats: BatchStats, data: ClientData, key: PRNGKey, *, density: float,
                  prunable: Any, num_iterations: int = 5,
                  loss_fn: Callable = softmax_cross_entropy) -> tuple[Params, BatchStats, Masks]:
  """PruneFL's initial pruning on ONE client (host loop over train/prune cycles).

  Args:
    apply_fn, client_optimizer, schedule, loss_fn: the client's training setup.
    params, batch_stats: the dense initial model.
    data: one client's `ClientData` slice (x [E, ...], y [E], num_examples []).
    key: PRNG key (cycle i uses fold_in(key, i)).
    density: global target density (dense entries counted).
    prunable: static bool filter.
    num_iterations: train/prune cycles; prunable density after cycle i is d'^(i/num_iterations).

  Returns:
    (params, batch_stats, masks): the client's trained model at the target density.
  """
  if not isinstance(num_iterations, int) or num_iterations < 1:
    raise ValueError(f"num_iterations must be an int >= 1, got {num_iterations!r}")
  keep, n_sparse = _sparse.sparse_budget(params, density, prunable)
  final = keep / n_sparse
  train = jax.jit(make_local_train(apply_fn, client_optimizer, schedule, loss_fn=loss_fn))
  masks = full_masks(params, prunable)
  for i in range(1, num_iterations + 1):
    local, _ = train(params, batch_stats, data, jax.random.fold_in(key, i), masks=masks)
    params, batch_stats = local.params, local.batch_stats
    d = final if i == num_iterations else final ** (i / num_iterations)
    scores = _sparse.apply_masks(masks_lib.magnitude(params), masks)
    masks = masks_lib.global_topk(scores, d, prunable)
    params = apply_masks(params, masks)
  return params, batch_stats, masks


def prunefl(apply_fn: Callable, client_optimizer, schedule: LocalSchedule, *, prunable: Any,
            adjust_every: int = 50, adjust_end: int = 300, importance_batches: int = 1,
            loss_fn: Callable = softmax_cross_entropy,
            train_transform: Callable | None = None) -> FedAlgorithm:
  """PruneFL's federated phase (adaptive pruning) over `SparseState`.

  Args:
    apply_fn, client_optimizer, schedule, loss_fn, train_transform: as `fedavg`.
    prunable: static bool filter.
    adjust_every, adjust_end: adaptive-pruning period and last round.
    importance_batches: mini-batches whose squared gradients a client sums.

  Returns:
    FedAlgorithm; `init(params, key, batch_stats=None, masks=None)`.
  """
  if not isinstance(adjust_every, int) or adjust_every < 1:
    raise ValueError(f"adjust_every must be an int >= 1, got {adjust_every!r}")
  if not isinstance(importance_batches, int) or importance_batches < 1:
    raise ValueError(f"importance_batches must be an int >= 1, got {importance_batches!r}")
  flags = _sparse.leaf_flags(prunable, prunable)
  local_train = make_local_train(apply_fn, client_optimizer, schedule, loss_fn=loss_fn,
                                 train_transform=train_transform)
  is_adjustment = lambda t: masks_lib.should_update(t, adjust_every, begin=1, end=adjust_end)

  def init(params: Params, key: PRNGKey, batch_stats: BatchStats | None = None,
           masks: Masks | None = None) -> SparseState:
    del key
    masks = full_masks(params, prunable) if masks is None else masks
    masks_lib.check(params, masks)
    return SparseState(apply_masks(params, masks), {} if batch_stats is None else batch_stats,
                       masks, jnp.zeros((), jnp.int32), ())

  def client_update(state: SparseState, data, info: ClientInfo, key: PRNGKey) -> ClientOutput:
    k_train, k_grad = jax.random.split(key)
    local, metrics = local_train(state.params, state.batch_stats, data, k_train, masks=state.masks)
    weight = info.num_examples.astype(jnp.float32)

    def importance(_):
      def one(i):
        idx, bmask = _sparse.random_batch(jax.random.fold_in(k_grad, i), data.num_examples,
                                          data.x.shape[0], schedule.batch_size)
        g = _sparse.batch_gradient(apply_fn, loss_fn, local.params, local.batch_stats, data.x[idx],
                                   data.y[idx], bmask)
        return jax.tree.map(jnp.square, g)
      sq = jax.lax.map(one, jnp.arange(importance_batches))
      return jax.tree.map(lambda s: weight * jnp.sum(s, axis=0), sq)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sq = jax.lax.cond(is_adjustment(state.round_idx), importance, lambda _: zeros, None)
    return ClientOutput(_sparse.client_sums(local.params, local.batch_stats, sq, weight, metrics))

  def server_update(state: SparseState, outputs: ClientOutput, key: PRNGKey):
    del key
    sums: SparseSums = outputs.sums
    params = _sparse.finish_mean(sums.params, sums.weight, state.params)
    batch_stats = _sparse.finish_mean(sums.batch_stats, sums.weight, state.batch_stats)
    adjust = is_adjustment(state.round_idx) & (sums.weight > 0)

    def reselect(_):
      z = _sparse.finish_mean(sums.extra, sums.weight, jax.tree.map(jnp.zeros_like, params))
      selected = [zl for zl, f in zip(jax.tree.leaves(z), flags) if f]
      kept = sum(jnp.sum(m, dtype=jnp.int32) for m, f in zip(jax.tree.leaves(state.masks), flags) if f)
      flat = jnp.concatenate([s.reshape(-1) for s in selected])
      chosen = _sparse.rank_select(flat, kept)
      out, offset = [], 0
      for m, zl, f in zip(jax.tree.leaves(state.masks), jax.tree.leaves(z), flags):
        if f:
          out.append(chosen[offset:offset + zl.size].reshape(zl.shape))
          offset += zl.size
        else:
          out.append(m)
      return jax.tree.unflatten(jax.tree.structure(state.masks), out)

    masks = jax.lax.cond(adjust, reselect, lambda _: state.masks, None)
    params = apply_masks(params, masks)
    metrics = _sparse.train_metrics(sums, params, masks)
    metrics["adjusted"] = adjust.astype(jnp.float32)
    return SparseState(params, batch_stats, masks, state.round_idx + 1, state.aux), metrics

  return FedAlgorithm(init, client_update, server_update)

"""FedDST: federated dynamic sparse training with client prune/regrow and mask voting.

Every `adjust_every` rounds (up to `adjust_end`) each sampled client, after its
local training, prunes floor(f(t) a_l) of the active weights of smallest |w| in
every sparse layer and regrows as many inactive positions of largest |g| (one
mini-batch, dense gradient; RigL-style, regrown weights start at 0), then keeps
training `post_adjust` local steps under its new mask. It uploads its weights
and mask. The server averages each coordinate over the clients that hold it
(example-weighted) and re-derives the global mask layer by layer as the a_l
largest |w| of that aggregate ("mask voting" by magnitude, METHODS.md §5), so
every layer keeps its density. Outside adjustment rounds it is masked FedAvg.
f(t) = alpha/2 (1 + cos(pi t / T_end)) as in FedTiny (FedDST's code default alpha 0.01).

References:
  Bibikar, Vikalo, Wang, Chen. "Federated Dynamic Sparse Training: Computing Less,
  Communicating Less, Yet Learning Better", AAAI 2022 (code bibikar/feddst).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_prune import masks as masks_lib
from fedjax_prune.federated import (ClientInfo, ClientOutput, FedAlgorithm, LocalSchedule,
                                    make_local_train, softmax_cross_entropy)
from fedjax_prune.pruning import _sparse
from fedjax_prune.pruning._sparse import SparseState, SparseSums, apply_masks, rank_select
from fedjax_prune.pruning.fedtiny import adjust_counts, prune_and_grow, sparse_init
from fedjax_prune.types import PRNGKey


def feddst(apply_fn: Callable, client_optimizer, schedule: LocalSchedule, *, prunable: Any,
           adjust_every: int = 10, adjust_end: int = 300, adjust_alpha: float = 0.2,
           post_adjust: LocalSchedule | None = None, growth_batch_size: int | None = None,
           loss_fn: Callable = softmax_cross_entropy,
           train_transform: Callable | None = None) -> FedAlgorithm:
  """FedDST as a FedAlgorithm over `SparseState`.

  Args:
    apply_fn, client_optimizer, schedule, loss_fn, train_transform: as `fedavg`.
    prunable: static bool filter with the params' structure.
    adjust_every, adjust_end, adjust_alpha: readjustment period, last round, initial fraction.
    post_adjust: local schedule run after a client's prune/regrow (default: `schedule`).
    growth_batch_size: batch of the regrowth gradient (default schedule.batch_size).

  Returns:
    FedAlgorithm; `init(params, key, batch_stats=None, masks=None)`.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, masks, testing
    >>> from fedjax_prune.pruning import feddst, fedtiny
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> prunable = masks.by_ndim(params)
    >>> params, m = fedtiny.sparse_setup(params, 0.5, prunable=prunable)
    >>> alg = feddst.feddst(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                     prunable=prunable, adjust_every=1, adjust_end=4)
    >>> state = alg.init(params, jax.random.key(1), masks=m)
    >>> state, metrics = federated.make_round(alg)(state, data, federated.make_cohort([0, 1, 2]),
    ...                                           jax.random.key(2))
    >>> int(state.round_idx), round(float(metrics["density"]), 1)
    (1, 0.5)
  """
  _sparse.check_int("adjust_every", adjust_every, 1)
  _sparse.check_int("adjust_end", adjust_end, 1)
  if not 0.0 <= adjust_alpha <= 1.0:
    raise ValueError(f"adjust_alpha must be in [0, 1], got {adjust_alpha!r}")
  flags = _sparse.leaf_flags(prunable, prunable)
  growth_batch = growth_batch_size or schedule.batch_size
  local_train = make_local_train(apply_fn, client_optimizer, schedule, loss_fn=loss_fn,
                                 train_transform=train_transform)
  post_train = make_local_train(apply_fn, client_optimizer, post_adjust or schedule, loss_fn=loss_fn,
                                train_transform=train_transform)
  is_adjustment = lambda t: masks_lib.should_update(t, adjust_every, begin=1, end=adjust_end)

  init = sparse_init(prunable)

  def client_update(state: SparseState, data, info: ClientInfo, key: PRNGKey) -> ClientOutput:
    k_train, k_grad, k_post = jax.random.split(key, 3)
    local, metrics = local_train(state.params, state.batch_stats, data, k_train, masks=state.masks)

    def readjust(_):
      g = _sparse.random_batch_gradient(apply_fn, loss_fn, local.params, local.batch_stats, data,
                                        k_grad, growth_batch)
      frac = masks_lib.cosine_fraction(state.round_idx, adjust_alpha, adjust_end)
      counts = adjust_counts(state.masks, frac, flags)
      new_masks = prune_and_grow(local.params, g, state.masks, counts, flags)
      post, post_metrics = post_train(apply_masks(local.params, new_masks), local.batch_stats, data,
                                      k_post, masks=new_masks)
      merged = jax.tree.map(jnp.add, metrics, post_metrics)
      return post.params, post.batch_stats, new_masks, merged

    def keep(_):
      return local.params, local.batch_stats, state.masks, metrics

    params, stats, masks, metrics = jax.lax.cond(is_adjustment(state.round_idx), readjust, keep, None)
    weight = info.num_examples.astype(jnp.float32)
    votes = jax.tree.map(lambda m: weight * m.astype(jnp.float32), masks)
    return ClientOutput(_sparse.client_sums(params, stats, votes, weight, metrics))

  def server_update(state: SparseState, outputs: ClientOutput, key: PRNGKey):
    del key
    sums: SparseSums = outputs.sums
    dense_mean = _sparse.finish_mean(sums.params, sums.weight, state.params)

    def leaf_mean(total, votes, mean, f):
      if not f:
        return mean
      held = votes > 0
      return jnp.where(held, total / jnp.where(held, votes, 1.0), 0.0)

    params = jax.tree.map(leaf_mean, sums.params, sums.extra, dense_mean,
                          jax.tree.unflatten(jax.tree.structure(dense_mean), flags))
    batch_stats = _sparse.finish_mean(sums.batch_stats, sums.weight, state.batch_stats)
    adjust = is_adjustment(state.round_idx) & (sums.weight > 0)

    def vote(_):
      out = []
      for w, m, f in zip(jax.tree.leaves(params), jax.tree.leaves(state.masks), flags):
        out.append(rank_select(jnp.abs(w), jnp.sum(m, dtype=jnp.int32)) if f else m)
      return jax.tree.unflatten(jax.tree.structure(state.masks), out)

    masks = jax.lax.cond(adjust, vote, lambda _: state.masks, None)
    params = apply_masks(params, masks)
    metrics = _sparse.train_metrics(sums, params, masks)
    metrics["adjusted"] = adjust.astype(jnp.float32)
    return SparseState(params, batch_stats, masks, state.round_idx + 1, state.aux), metrics

  return FedAlgorithm(init, client_update, server_update)

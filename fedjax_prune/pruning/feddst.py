"""FedDST: federated dynamic sparse training with client prune/regrow and mask voting.

A `base.MaskRule` (`client_prune_and_regrow`) run by `base.masked_fedavg`; `feddst_method`
runs it end to end from magnitude masks of the initial weights (`fedtiny.sparse_setup`).

Every `adjust_every` rounds (before `adjust_end`, as FedTiny) each sampled client, after its
local training, prunes floor(f(t) a_l) of the active weights of smallest |w| in
every sparse layer and regrows as many inactive positions of largest |g| (one
mini-batch, dense gradient; RigL-style, regrown weights start at 0), then keeps
training `post_adjust` local steps under its new mask. It uploads its weights
and mask. The server averages each coordinate over the clients that hold it
(example-weighted) and re-derives the global mask layer by layer as the a_l
largest |w| of that aggregate ("mask voting" by magnitude, as FedDST's `dst.py`), so
every layer keeps its density. Outside adjustment rounds it is masked FedAvg.
f(t) = alpha/2 (1 + cos(pi t / T_end)) as in FedTiny (FedDST's code default alpha 0.01).

With an aggregator (robust, DP, compressed: `feddst(..., aggregator=)`) a client holds its
own masks: clipping, compression and error feedback act on the coordinates of its mask
(`held_updates`), and DP's noise goes on every coordinate (where a client holds is private).

References:
  Bibikar, Vikalo, Wang, Chen. "Federated Dynamic Sparse Training: Computing Less,
  Communicating Less, Yet Learning Better", AAAI 2022 (code bibikar/feddst).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_prune import federated
from fedjax_prune import masks as masks_lib
from fedjax_prune.federated import (FedAlgorithm, LocalSchedule, make_local_train,
                                    softmax_cross_entropy)
from fedjax_prune.pruning import _sparse, base
from fedjax_prune.pruning._sparse import rank_select
from fedjax_prune.pruning.fedtiny import (adjust_counts, adjustment_round, prune_and_grow,
                                          sparse_setup)
from fedjax_prune.types import BatchStats, Params, PRNGKey


def client_prune_and_regrow(apply_fn: Callable, client_optimizer, post_adjust: LocalSchedule | None, *,
                            prunable: Any, adjust_every: int = 10, adjust_end: int = 300,
                            adjust_alpha: float = 0.2, growth_batch_size: int,
                            loss_fn: Callable = softmax_cross_entropy,
                            train_transform: Callable | None = None) -> base.MaskRule:
  """FedDST's mask rule: clients prune/regrow and train on; the server votes by magnitude.

  Client (adjustment rounds): `fedtiny.prune_and_grow` of its trained model with the
  dense gradient of one random mini-batch, then `post_adjust` local steps under the
  new mask (None: none, so an adjustment round trains exactly as many local steps as
  any other round, as FedTiny's do); it uploads its model and mask (each masked
  coordinate is then averaged over the clients holding it). Server (adjustment rounds): each layer keeps its a_l
  largest |w| of that aggregate. Metrics: `density`, `adjusted`.
  """
  _sparse.check_int("adjust_every", adjust_every, 1)
  _sparse.check_int("adjust_end", adjust_end, 1)
  if not 0.0 <= adjust_alpha <= 1.0:
    raise ValueError(f"adjust_alpha must be in [0, 1], got {adjust_alpha!r}")
  flags = _sparse.leaf_flags(prunable, prunable)
  post_train = None if post_adjust is None else make_local_train(
      apply_fn, client_optimizer, post_adjust, loss_fn=loss_fn, train_transform=train_transform)
  # FedTiny's rounds (0 < t < T_end, t % ΔT == 0): both methods adjust in the same rounds.
  is_adjustment = lambda t: adjustment_round(t, adjust_every, adjust_end)

  def init(params: Params, key: PRNGKey, batch_stats: BatchStats | None = None) -> base.MaskState:
    del key, batch_stats  # density 1 unless `masked_fedavg.init` is given masks
    return base.MaskState(_sparse.full_masks(params, prunable))

  def client(state: base.MaskState, local: base.Model, metrics, data, keys, round_idx):
    k_grad, k_post = keys

    def readjust(_):
      g = _sparse.random_batch_gradient(apply_fn, loss_fn, local.params, local.batch_stats, data,
                                        k_grad, growth_batch_size)
      frac = masks_lib.cosine_fraction(round_idx, adjust_alpha, adjust_end)
      counts = adjust_counts(state.masks, frac, flags)
      new_masks = prune_and_grow(local.params, g, state.masks, counts, flags)
      readjusted = masks_lib.apply(local.params, new_masks)  # grown entries start at 0
      if post_train is None:
        return base.Model(readjusted, local.batch_stats), new_masks, metrics
      post, post_metrics = post_train(readjusted, local.batch_stats, data, k_post, masks=new_masks)
      merged = jax.tree.map(jnp.add, metrics, post_metrics)
      return base.Model(post.params, post.batch_stats), new_masks, merged

    def keep(_):
      return local, state.masks, metrics

    model, masks, metrics = jax.lax.cond(is_adjustment(round_idx), readjust, keep, None)
    return base.ClientResult(model, metrics, masks=masks)

  def update(state: base.MaskState, model: base.Model, sums: base.CohortSums, round_idx, key):
    del key  # no random choice on the server
    adjust = is_adjustment(round_idx) & (sums.weight > 0)

    def vote(_):
      out = []
      for w, m, f in zip(jax.tree.leaves(model.params), jax.tree.leaves(state.masks), flags):
        out.append(rank_select(jnp.abs(w), jnp.sum(m, dtype=jnp.int32)) if f else m)
      return jax.tree.unflatten(jax.tree.structure(state.masks), out)

    masks = jax.lax.cond(adjust, vote, lambda _: state.masks, None)
    metrics = {"density": masks_lib.density(masks, model.params),
               "adjusted": adjust.astype(jnp.float32)}
    return base.MaskState(masks), model, metrics

  return base.MaskRule(init, update, client, client_keys=2)


def held_updates(aggregator: federated.Aggregator) -> federated.Aggregator:
  """`aggregator` given each client's update on the coordinates it holds only (0 elsewhere).

  A FedDST client holds its own masks, so `base.aggregation_view` reads its update
  w_server - w_client as w_server on the coordinates it pruned itself (its weight is 0
  there). Every aggregator ignores coordinates outside `present`, except the memory of
  error feedback (`federated.compressed`: e' = u + e - C(u + e), with C(.) = 0 there),
  which would add w_server to the client's residual each round it does not hold them and
  send the sum once it holds them again; with the zeros its memory keeps its values there.
  On held coordinates nothing changes.
  """

  def contribute(state, update, weight, present, client, key):
    if present is not None:
      update = jax.tree.map(lambda u, p: jnp.where(p, u, jnp.zeros((), u.dtype)), update, present)
    return aggregator.contribute(state, update, weight, present, client, key)

  return aggregator._replace(contribute=contribute)


def feddst(apply_fn: Callable, client_optimizer, schedule: LocalSchedule, *, prunable: Any,
           adjust_every: int = 10, adjust_end: int = 300, adjust_alpha: float = 0.2,
           post_adjust: LocalSchedule | None = None, growth_batch_size: int | None = None,
           loss_fn: Callable = softmax_cross_entropy, train_transform: Callable | None = None,
           aggregator: federated.Aggregator | None = None) -> FedAlgorithm:
  """FedDST: `base.masked_fedavg` with `client_prune_and_regrow`.

  Args:
    apply_fn, client_optimizer, schedule, loss_fn, train_transform: as `fedavg`.
    prunable: static bool filter with the params' structure.
    adjust_every, adjust_end, adjust_alpha: readjustment period, T_end (readjustments at
      0 < t < T_end, FedTiny's rounds), initial fraction.
    post_adjust: local schedule run after a client's prune/regrow, on top of `schedule`
      (extra training in adjustment rounds, counted in the records' `local_steps`);
      None (default): none, so every sparse method trains the same local steps per round
      (an earlier default reused `schedule`: ~20 % more SGD than FedTiny over a table).
    growth_batch_size: batch of the regrowth gradient (default schedule.batch_size).
    aggregator: None: each coordinate's example-weighted mean over its holders. A
      `federated.Aggregator` (robust, DP, compressed) aggregates each client's update over
      the coordinates of its own masks (`held_updates`); its state (the adaptive clip norm,
      error-feedback memory) is `MaskedFedAvgState.aggregator`. Give a DP aggregator
      `noise_on_present=False`: the clients' masks depend on their data.

  Returns:
    FedAlgorithm over `base.MaskedFedAvgState`; `init(params, key, batch_stats=None, masks=None)`.

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
  rule = client_prune_and_regrow(
      apply_fn, client_optimizer, post_adjust, prunable=prunable,
      adjust_every=adjust_every, adjust_end=adjust_end, adjust_alpha=adjust_alpha,
      growth_batch_size=growth_batch_size or schedule.batch_size, loss_fn=loss_fn,
      train_transform=train_transform)
  return base.masked_fedavg(apply_fn, client_optimizer, schedule, rule, loss_fn=loss_fn,
                            train_transform=train_transform,
                            aggregator=None if aggregator is None else held_updates(aggregator))


def feddst_method(run: base.SparseRun, *, density: float, distribution: str = "uniform",
                  adjust_every: int = 10, adjust_end: int = 300, adjust_alpha: float = 0.2,
                  post_adjust: LocalSchedule | None = None,
                  growth_batch_size: int | None = None,
                  aggregator: federated.Aggregator | None = None) -> federated.Method:
  """FedDST end to end: magnitude masks of the initial weights at `density` (layer
  allocation `distribution`), then `feddst` rounds (with `aggregator`, see `feddst`; its
  state is part of the server state: checkpointed).

  Returns:
    The `Method` (`base.masked_method`'s records and summary); adjustment rounds add one
    dense-gradient mini-batch to each client's cost.
  """
  prunable = _sparse.prunable_filter(run.params)
  apply_fn = run.model.apply_for(run.spec)
  alg = feddst(apply_fn, run.optimizer, run.schedule, prunable=prunable,
               adjust_every=adjust_every, adjust_end=adjust_end, adjust_alpha=adjust_alpha,
               post_adjust=post_adjust, growth_batch_size=growth_batch_size, aggregator=aggregator)

  def init_fn():
    params, masks = sparse_setup(run.params, density, distribution=distribution, prunable=prunable)
    state = alg.init(params, run.key, batch_stats=run.batch_stats, masks=masks)
    return state, {"sparse_method": "feddst", "target_density": float(density)}

  def extra_cost(round_idx, masks, record):
    return dict(dense_grad_batches=1) if record.get("adjusted", 0.0) else {}

  return base.masked_method(run, alg, init_fn, apply_fn=apply_fn, prunable=prunable,
                            extra_cost=extra_cost)

"""The FedAvg family: FedAvg, FedAvgM, FedAdam, FedYogi and FedProx.

One client trains locally from the server model; the server averages the
client updates weighted by example count and feeds the averaged update
(w_server - mean_k w_k, the "pseudo-gradient") to a server optax optimizer:
SGD with lr 1 is FedAvg, SGD with momentum FedAvgM, Adam/Yogi FedAdam/FedYogi
(Reddi et al., 2021). FedProx adds mu/2 ||w - w_server||^2 to the client loss.
BatchNorm running statistics are averaged with the same weights.

References:
  McMahan et al., Communication-Efficient Learning of Deep Networks from
  Decentralized Data, AISTATS 2017. Reddi et al., Adaptive Federated
  Optimization, ICLR 2021. Li et al., Federated Optimization in Heterogeneous
  Networks (FedProx), MLSys 2020.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_prune.masks import _ops as masks_lib
from fedjax_prune import tree as tree_lib
from fedjax_prune.federated import _keys, _robust
from fedjax_prune.federated._engine import ClientInfo, ClientOutput, FedAlgorithm
from fedjax_prune.federated._local import (LocalMetrics, LocalSchedule, make_local_train,
                                           proximal_penalty, round_train_metrics,
                                           softmax_cross_entropy)
from fedjax_prune.federated._method import ApplyFn
from fedjax_prune.types import BatchStats, Masks, Params

if TYPE_CHECKING:
  from fedjax_prune.performance import LowRankDense


class ServerState(NamedTuple):
  """Server state of the FedAvg family.

  Attributes:
    params: global model parameters.
    batch_stats: global BatchNorm running statistics ({} without BN).
    opt_state: server optimizer state.
    masks: pruning masks (bool pytree broadcastable to params) the clients train
      under and the server applies after its update; None for dense training
      (`init` without masks): nothing is masked then, which saves a pass over the
      model per client (docs/results/engine.md, "Earlier: status at 2026-11-23,
      05:30 UTC", item 3; all-True masks, e.g. `dense_masks(params)`, give the
      same results at that cost).
    round_idx: [] int32 number of completed rounds.
    aggregator: the aggregator's state (`Aggregator.init(params)`; () for the mean and
      the robust aggregators).
  """
  params: Params
  batch_stats: BatchStats
  opt_state: Any
  masks: Masks | None
  round_idx: jax.Array
  aggregator: Any = ()


class FedAvgSums(NamedTuple):
  """One client's contribution, pre-weighted (the engine sums these)."""
  delta: Any              # the aggregator's sums (mean: weight * (w_server - w_client))
  batch_stats: BatchStats  # weight * client running stats
  weight: jax.Array       # aggregation weight (n_k, or 1 for uniform weighting)
  num_clients: jax.Array  # 1 per real client
  metrics: LocalMetrics


def dense_masks(params: Params) -> Masks:
  """All-True scalar masks (nothing pruned) with the structure of `params`."""
  return jax.tree.map(lambda _: jnp.ones((), bool), params)


def fedavg(apply_fn: ApplyFn, client_optimizer: optax.GradientTransformation,
           schedule: LocalSchedule, *, server_optimizer: optax.GradientTransformation | None = None,
           prox_mu: float = 0.0, loss_fn: Callable = softmax_cross_entropy,
           train_transform: Callable | None = None, uniform_weights: bool = False,
           report_update_norm: bool = False, lowrank: LowRankDense | None = None,
           aggregator: _robust.Aggregator | None = None) -> FedAlgorithm:
  """FedAvg with a configurable server optimizer (FedAvgM/FedAdam/FedYogi) and FedProx.

  Args:
    apply_fn: `apply_fn(params, batch_stats, x, *, train, example_mask) -> (logits, batch_stats)`.
    client_optimizer: optax optimizer of the clients (fresh state each round).
    schedule: LocalSchedule (batch size, epochs or steps).
    server_optimizer: optax optimizer applied to the averaged pseudo-gradient;
      default `optax.sgd(1.0)` = plain FedAvg.
    prox_mu: FedProx proximal coefficient (0 = off).
    loss_fn: per-example loss.
    train_transform: per-batch augmentation `(x, key) -> x`.
    uniform_weights: weight clients equally instead of by example count (clients
      without examples still get weight 0).
    report_update_norm: add `update_norm`, the L2 norm of the mean client delta, to
      the round's metrics. Off by default: it is one more read of the model per
      round (XLA then writes the summed delta out instead of fusing it into the
      parameter update; docs/results/engine.md, "Earlier: status at 2026-11-23,
      05:30 UTC", item 2).
    lowrank: optional `LowRankDense`: clients train those dense kernels as factors
      (`make_local_train`), hand them to the engine as `LowRankSum`s, and the cohort's
      delta of each is one GEMM over the stacked factors. Needs SGD clients
      (`client_optimizer` must update as `optax.sgd(lowrank.learning_rate,
      momentum=lowrank.momentum or None)`, else ValueError), no FedProx and no masks;
      `performance.worthwhile_lowrank_layers` picks the layers. A pure speed option: the
      same rounds up to float rounding.
    aggregator: how the clients' updates w_server - w_client are aggregated
      (`federated.Aggregator`; None: `mean()`, the example-weighted mean, op for op as
      before). A robust one (median, trimmed mean, norm bound, Krum) gets every client
      the same weight it has in the mean; its state is `ServerState.aggregator`
      (`federated.dp_mean`'s clip norm, `federated.compressed`'s error-feedback memory).
      With masks, a given aggregator is told each client holds the server's masks
      (`present`). Not with `lowrank`.

  Returns:
    FedAlgorithm whose state is `ServerState`.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4))
    >>> state = alg.init(params, jax.random.key(1))
    >>> round_fn = federated.make_round(alg)
    >>> cohort = federated.make_cohort([0, 1, 2])
    >>> state, metrics = round_fn(state, data, cohort, jax.random.key(2))
    >>> int(state.round_idx)
    1
  """
  if prox_mu < 0:
    raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
  if lowrank is not None and prox_mu > 0:
    raise ValueError("lowrank cannot be combined with FedProx (prox_mu > 0)")
  if lowrank is not None:
    lowrank.check_optimizer(client_optimizer)
    if aggregator is not None:
      raise ValueError("lowrank sums the clients' kernels as factors: it cannot be combined "
                       "with an aggregator (leave aggregator=None)")
  agg = _robust.mean() if aggregator is None else aggregator
  server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
  penalty = proximal_penalty(prox_mu) if prox_mu > 0 else None
  local_train = make_local_train(apply_fn, client_optimizer, schedule, loss_fn=loss_fn,
                                 train_transform=train_transform, penalty_fn=penalty,
                                 lowrank=lowrank)

  def init(params: Params, key: jax.Array, batch_stats: BatchStats | None = None,
           masks: Masks | None = None) -> ServerState:
    del key  # deterministic: the model's own init consumed the randomness
    if lowrank is not None and masks is not None:
      raise ValueError("lowrank trains dense models: init without masks")
    return ServerState(params, {} if batch_stats is None else batch_stats,
                       server_optimizer.init(params), masks, jnp.zeros((), jnp.int32),
                       agg.init(params))

  def client_update(state: ServerState, data, info: ClientInfo, key: jax.Array) -> ClientOutput:
    local, metrics = local_train(state.params, state.batch_stats, data, key, masks=state.masks,
                                 penalty_state=state.params if penalty is not None else None)
    # Uniform weights count clients that trained: an empty client (no local step) has
    # weight 0, as it has under example weighting, instead of pulling the mean toward
    # the server model.
    weight = ((info.num_examples > 0) if uniform_weights else info.num_examples).astype(jnp.float32)
    stats = tree_lib.scale(local.batch_stats, weight)
    if lowrank is not None:
      delta = _weighted_delta(state.params, local.params, weight)
      return ClientOutput(FedAvgSums(delta, stats, weight, jnp.ones((), jnp.float32), metrics))
    # The aggregator's key is folded from the client's: training keeps the key itself.
    # A given aggregator learns the coordinates the client holds (the server's masks,
    # public: DP noise and compression use them); the default mean needs not.
    present = state.masks if aggregator is not None else None
    out = agg.contribute(state.aggregator, tree_lib.sub(state.params, local.params), weight,
                         present, info, _keys.fold_in(key, _robust.AGGREGATOR_STREAM))
    return ClientOutput(FedAvgSums(out.sums, stats, weight, jnp.ones((), jnp.float32), metrics),
                        out.per_client)

  def server_update(state: ServerState, outputs: ClientOutput, key: jax.Array):
    sums: FedAvgSums = outputs.sums
    total = sums.weight
    has_weight = total > 0
    inv = jnp.where(has_weight, 1.0 / jnp.where(has_weight, total, 1.0), 0.0)
    agg_state, agg_metrics = state.aggregator, {}
    if lowrank is not None:
      mean_delta = tree_lib.scale(sums.delta, inv)
    else:
      mean_delta, agg_state, agg_metrics = agg.finish(
          state.aggregator, _robust.Contribution(sums.delta, outputs.per_client), None, key)
    updates, opt_state = server_optimizer.update(mean_delta, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.masks is not None:
      params = masks_lib.apply(params, state.masks)
    batch_stats = jax.tree.map(lambda s, old: jnp.where(has_weight, s * inv, old),
                               sums.batch_stats, state.batch_stats)
    metrics = {
        **round_train_metrics(sums.metrics, sums.num_clients),
        "finite": tree_lib.all_finite(params) & jnp.isfinite(sums.metrics.loss_sum),
    }
    metrics.update(agg_metrics)
    if report_update_norm:
      # From the summed delta, not mean_delta: then mean_delta has one reader (the
      # optimizer) and is fused into the parameter update instead of written out.
      if aggregator is None:
        total_delta = sums.delta if lowrank is not None else sums.delta.total
        metrics["update_norm"] = jnp.sqrt(tree_lib.squared_norm(total_delta)) * inv
      else:
        metrics["update_norm"] = jnp.sqrt(tree_lib.squared_norm(mean_delta))
    return ServerState(params, batch_stats, opt_state, state.masks, state.round_idx + 1,
                       agg_state), metrics

  return FedAlgorithm(init, client_update, server_update)


def fedavg_view() -> _robust.SumsView:
  """Where `fedavg` (with its default aggregator) keeps a client's update: the `SumsView`
  that runs a FedAvg-family algorithm under `federated.with_aggregator`."""

  def read(state: ServerState, sums: FedAvgSums):
    del state
    w = sums.weight
    inv = jnp.where(w > 0, 1.0 / jnp.where(w > 0, w, 1.0), 0.0)
    return (tree_lib.scale(sums.delta.total, inv), w, None,
            sums._replace(delta=sums.delta._replace(total=())))

  def write(state: ServerState, rest: FedAvgSums, mean_delta: Params) -> FedAvgSums:
    del state
    return rest._replace(delta=rest.delta._replace(total=tree_lib.scale(mean_delta, rest.weight)))

  return _robust.SumsView(read, write)


def _weighted_delta(server: Params, client: Params, weight: jax.Array) -> Params:
  """weight * (server - client) per leaf; a client kernel held as factors over the server
  kernel (`performance.FactoredKernel`) gives its own `weighted_delta` (a `LowRankSum`)."""

  def one(server_leaf, client_leaf):
    if hasattr(client_leaf, "weighted_delta"):
      return client_leaf.weighted_delta(weight)
    return (server_leaf - client_leaf) * weight.astype(server_leaf.dtype)

  return jax.tree.map(one, server, client)


def fedavgm(apply_fn, client_optimizer, schedule, *, server_learning_rate: float = 1.0,
            server_momentum: float = 0.9, **kwargs) -> FedAlgorithm:
  """FedAvg with server momentum (Hsu et al., 2019)."""
  return fedavg(apply_fn, client_optimizer, schedule,
                server_optimizer=optax.sgd(server_learning_rate, momentum=server_momentum), **kwargs)


def fedadam(apply_fn, client_optimizer, schedule, *, server_learning_rate: float = 1e-2,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3, **kwargs) -> FedAlgorithm:
  """FedAdam (Reddi et al., 2021); eps plays the paper's tau.

  The server step is `optax.adam`, which bias-corrects the moment estimates (divides
  them by 1 - b^t); the paper's Algorithm 2 does not. The two agree once b2^t is
  small (about 1 / (1 - b2) rounds: 100 at the default b2); in the first rounds
  this one takes larger steps on coordinates with small pseudo-gradients.
  """
  return fedavg(apply_fn, client_optimizer, schedule,
                server_optimizer=optax.adam(server_learning_rate, b1=b1, b2=b2, eps=eps), **kwargs)


def fedyogi(apply_fn, client_optimizer, schedule, *, server_learning_rate: float = 1e-2,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3, **kwargs) -> FedAlgorithm:
  """FedYogi (Reddi et al., 2021); eps plays the paper's tau.

  The server step is `optax.yogi`, which bias-corrects both moment estimates (the
  paper does not; see `fedadam`).
  """
  return fedavg(apply_fn, client_optimizer, schedule,
                server_optimizer=optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=eps), **kwargs)


def fedprox(apply_fn, client_optimizer, schedule, *, mu: float = 0.01, **kwargs) -> FedAlgorithm:
  """FedProx (Li et al., 2020): FedAvg with a proximal client term."""
  return fedavg(apply_fn, client_optimizer, schedule, prox_mu=mu, **kwargs)

"""The pruning vocabulary: a `MaskRule`, and `masked_fedavg`, the one FedAvg that runs any rule.

A `MaskRule` is to pruning what an optax `GradientTransformation` is to an update: a
NamedTuple of pure functions over pytrees, built by a factory, whose state `S` is a
NamedTuple with a `masks` field (bool leaves broadcastable to the params, see
`masks.check`) plus the rule's own fields::

  init(params, key, batch_stats) -> S          the masks a run starts from (SNIP, SynFlow:
                                               computed here; others: all kept, or given)
  update(state, model, sums, round_idx, key)   on the server after aggregation: the new
      -> (S, model, metrics)                   masks (prune, grow, vote), the model (a
                                               rewind), the rule's round metrics
  client(state, local, metrics, data, keys,    on each client after its local training:
         round_idx) -> ClientResult            the statistics the rule needs (one-batch
                                               dense gradients, squared gradients), or
                                               the client's own prune/regrow (FedDST)
  client_keys: int                             PRNG keys `client` takes (0: local training
                                               gets the client key itself)

`masked_fedavg(apply_fn, optimizer, schedule, rule)` is the server skeleton every
sparse method shares: each sampled client trains the masked model (the engine masks
after every local step), runs the rule's `client` hook and uploads its model and the
hook's statistics pre-weighted by its example count n_k; the server averages (n_k
weighted), hands the average and the cohort's sums to `rule.update`, and masks the
result with the rule's new masks. One compiled round serves every round: rules
select with traced counts and `lax.cond` on the round index.

References (the rules): FedTiny (`fedtiny.py`), FedDST (`feddst.py`), PruneFL
(`prunefl.py`), LotteryFL (`lotteryfl.py`), SNIP and SynFlow (`init_pruning.py`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune import accounting, federated, models
from fedjax_prune import masks as masks_lib
from fedjax_prune import tree as tree_lib
from fedjax_prune.federated import (ClientInfo, ClientOutput, FedAlgorithm, LocalMetrics,
                                    LocalSchedule, make_local_train, round_train_metrics,
                                    softmax_cross_entropy)
from fedjax_prune.pruning import _sparse, one_shot
from fedjax_prune.types import BatchStats, Masks, Params, PRNGKey


class Model(NamedTuple):
  """A model's arrays: parameters and BatchNorm running statistics ({} without BN)."""
  params: Params
  batch_stats: BatchStats


class ClientResult(NamedTuple):
  """What a rule's `client` hook hands back to `masked_fedavg`.

  Attributes:
    model: the model the client uploads (its local model, or FedDST's after its own
      prune/regrow and further training).
    metrics: the client's local training sums.
    stats: the rule's statistics (a pytree; the server gets sum_k n_k stats_k).
    masks: the client's own masks (FedDST), or None: it trained the server's. With
      client masks the server averages every per-entry-masked coordinate over the
      clients that hold it.
  """
  model: Model
  metrics: LocalMetrics
  stats: Any = ()
  masks: Masks | None = None


class CohortSums(NamedTuple):
  """One client's upload pre-weighted by its weight n_k; the engine sums them over the cohort.

  Attributes:
    params: n_k * client params (server_optimizer: n_k * (server - client params)).
    batch_stats: n_k * client BN statistics.
    stats: n_k * the rule's client statistics.
    masks: n_k * the client's masks as float32 (None when clients keep the server's).
    weight: n_k.
    num_clients: 1 per real client.
    metrics: local training sums.
  """
  params: Params
  batch_stats: BatchStats
  stats: Any
  masks: Any
  weight: jax.Array
  num_clients: jax.Array
  metrics: LocalMetrics


def keep_client(state, local: Model, metrics: LocalMetrics, data, keys, round_idx) -> ClientResult:
  """The default `client` hook: upload the trained model, no statistics."""
  del state, data, keys, round_idx
  return ClientResult(local, metrics)


def keep_masks(state, model: Model, sums: CohortSums, round_idx, key: PRNGKey):
  """The `update` of a rule whose masks never change after `init` (SNIP, SynFlow, dense)."""
  del sums, round_idx, key
  return state, model, {}


class MaskRule(NamedTuple):
  """A pruning rule run by `masked_fedavg` (module docstring).

  Attributes:
    init: `init(params, key, batch_stats) -> S`, S a NamedTuple with a `masks` field.
    update: `update(state, model, sums, round_idx, key) -> (S, Model, metrics dict)` on
      the server: `model` is the cohort's average (before masking), `sums` the cohort's
      `CohortSums`, `round_idx` the round just trained (0-based, traced), `key` the
      round's server key (e.g. to break ties at random).
    client: `client(state, local, metrics, data, keys, round_idx) -> ClientResult` on
      each client after local training (`keys`: [client_keys] PRNG keys, or None).
    client_keys: number of PRNG keys `client` takes; the client's key is split into
      1 + client_keys (the first trains); 0: training gets the client's key itself.
  """
  init: Callable[..., Any]
  update: Callable[..., tuple[Any, Model, dict]] = keep_masks
  client: Callable[..., ClientResult] = keep_client
  client_keys: int = 0


class MaskState(NamedTuple):
  """The state of a rule that keeps nothing but its masks."""
  masks: Masks


def no_prune() -> MaskRule:
  """A rule that keeps every entry: `()` True masks (dense FedAvg through `masked_fedavg`)."""

  def init(params: Params, key: PRNGKey, batch_stats: BatchStats | None = None) -> MaskState:
    del key, batch_stats
    return MaskState(federated.dense_masks(params))

  return MaskRule(init)


def fixed_masks(masks_fn: Callable[[Params, BatchStats], Masks]) -> MaskRule:
  """A rule whose masks `masks_fn(params, batch_stats)` are chosen once at `init` (pruning
  at initialisation: SNIP, SynFlow) and trained unchanged."""

  def init(params: Params, key: PRNGKey, batch_stats: BatchStats | None = None) -> MaskState:
    del key
    return MaskState(masks_fn(params, {} if batch_stats is None else batch_stats))

  return MaskRule(init)


class MaskedFedAvgState(NamedTuple):
  """Server state of `masked_fedavg`.

  Attributes:
    params: global parameters; entries outside `masks` are exactly 0.
    batch_stats: global BatchNorm running statistics ({} without BN).
    masks: the global masks (the rule state's `masks`, kept here once: a checkpoint
      holds `.params` and `.masks` as FedAvg's `ServerState` does).
    round_idx: [] int32 number of completed rounds.
    rule: the rule's other state (its state with `masks=None`; `rule_state` joins them).
    opt_state: the server optimizer's state (() without one).
    aggregator: the state of `masked_fedavg`'s `aggregator` (() without one, and for
      stateless ones).
  """
  params: Params
  batch_stats: BatchStats
  masks: Masks
  round_idx: jax.Array
  rule: Any = ()
  opt_state: Any = ()
  aggregator: Any = ()

  def rule_state(self):
    """The rule's state S (with the masks)."""
    return self.rule._replace(masks=self.masks)


def _holder_mean(total: jax.Array, votes: jax.Array, mean: jax.Array) -> jax.Array:
  """A per-entry-masked leaf: the mean over the clients that hold each entry (0 where none
  does); a leaf with a `()` mask: the plain mean."""
  if jnp.ndim(votes) == 0:
    return mean
  held = votes > 0
  return jnp.where(held, total / jnp.where(held, votes, 1.0), 0.0)


def masked_fedavg(apply_fn: Callable, optimizer: optax.GradientTransformation,
                  schedule: LocalSchedule, rule: MaskRule, *,
                  server_optimizer: optax.GradientTransformation | None = None,
                  loss_fn: Callable = softmax_cross_entropy,
                  train_transform: Callable | None = None,
                  aggregator: federated.Aggregator | None = None) -> FedAlgorithm:
  """FedAvg of masked models whose masks a `MaskRule` chooses and changes.

  Args:
    apply_fn: `apply_fn(params, batch_stats, x, *, train, example_mask) -> (logits, batch_stats)`.
    optimizer: optax optimizer of the clients (fresh state each round).
    schedule: the clients' `LocalSchedule`.
    rule: the `MaskRule` (FedTiny's prune-and-grow, FedDST's, PruneFL's, LotteryFL's,
      SNIP's, SynFlow's, `no_prune()`).
    server_optimizer: None: the server model is the example-weighted mean of the client
      models. An optax optimizer: clients upload n_k (w - w_k) and the server steps the
      optimizer on the mean of these pseudo-gradients (`federated.fedavg`'s server;
      `optax.sgd(1.0)` is the same mean up to float rounding). Not with client masks.
    loss_fn: per-example loss.
    train_transform: per-batch augmentation `(x, key) -> x`.
    aggregator: None: the mean above, op for op. A `federated.Aggregator` (robust, DP,
      compressed): each client's update (w - w_k) goes to it, holding the server's masks
      (or, with clients' own masks, those), and its aggregate replaces the mean
      (`federated.with_aggregator` over `aggregation_view()`); its state is
      `MaskedFedAvgState.aggregator`, set by `init`.

  Returns:
    FedAlgorithm over `MaskedFedAvgState`; `init(params, key, batch_stats=None,
    masks=None)`: the rule's `init`, its masks replaced by `masks` when given (a start
    chosen outside the rule: adaptive BN selection, PruneFL's initial pruning). Round
    metrics: the training metrics, `finite`, and the rule's.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> from fedjax_prune.pruning import base
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> alg = base.masked_fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                          base.no_prune())
    >>> state = alg.init(params, jax.random.key(1))
    >>> state, metrics = federated.make_round(alg)(state, data, federated.make_cohort([0, 1, 2]),
    ...                                           jax.random.key(2))
    >>> int(state.round_idx)
    1
  """
  if not isinstance(rule.client_keys, int) or rule.client_keys < 0:
    raise ValueError(f"rule.client_keys must be an int >= 0, got {rule.client_keys!r}")
  local_train = make_local_train(apply_fn, optimizer, schedule, loss_fn=loss_fn,
                                 train_transform=train_transform)

  def init(params: Params, key: PRNGKey, batch_stats: BatchStats | None = None,
           masks: Masks | None = None) -> MaskedFedAvgState:
    batch_stats = {} if batch_stats is None else batch_stats
    state = rule.init(params, key, batch_stats)
    if masks is not None:
      state = state._replace(masks=masks)
    masks_lib.check(params, state.masks)
    opt_state = () if server_optimizer is None else server_optimizer.init(params)
    return MaskedFedAvgState(masks_lib.apply(params, state.masks), batch_stats, state.masks,
                             jnp.zeros((), jnp.int32), state._replace(masks=None), opt_state)

  def client_update(state: MaskedFedAvgState, data, info: ClientInfo, key: PRNGKey) -> ClientOutput:
    if rule.client_keys:
      keys = jax.random.split(key, rule.client_keys + 1)
      train_key, rule_keys = keys[0], keys[1:]
    else:
      train_key, rule_keys = key, None
    local, metrics = local_train(state.params, state.batch_stats, data, train_key,
                                 masks=state.masks)
    out = rule.client(state.rule_state(), Model(local.params, local.batch_stats), metrics, data,
                      rule_keys, state.round_idx)
    weight = info.num_examples.astype(jnp.float32)
    if server_optimizer is None:
      params = tree_lib.scale(out.model.params, weight)
    else:
      if out.masks is not None:
        raise ValueError("a server_optimizer cannot aggregate clients' own masks")
      params = jax.tree.map(lambda s, c: (s - c) * weight.astype(s.dtype), state.params,
                            out.model.params)
    votes = (None if out.masks is None else
             jax.tree.map(lambda m: weight * m.astype(jnp.float32), out.masks))
    return ClientOutput(CohortSums(params, tree_lib.scale(out.model.batch_stats, weight),
                                   tree_lib.scale(out.stats, weight), votes, weight,
                                   jnp.ones((), jnp.float32), out.metrics))

  def aggregate(state: MaskedFedAvgState, sums: CohortSums):
    """(the cohort's model before masking, new server optimizer state)."""
    if server_optimizer is not None:
      updates, opt_state = server_optimizer.update(
          federated.finish_weighted_mean(sums.params, sums.weight), state.opt_state, state.params)
      batch_stats = federated.finish_weighted_mean(sums.batch_stats, sums.weight, state.batch_stats)
      return Model(optax.apply_updates(state.params, updates), batch_stats), opt_state
    params = federated.finish_weighted_mean(sums.params, sums.weight, state.params)
    if sums.masks is not None:
      params = jax.tree.map(_holder_mean, sums.params, sums.masks, params)
    return Model(params, federated.finish_weighted_mean(sums.batch_stats, sums.weight,
                                                        state.batch_stats)), ()

  def server_update(state: MaskedFedAvgState, outputs: ClientOutput, key: PRNGKey):
    sums: CohortSums = outputs.sums
    model, opt_state = aggregate(state, sums)
    new, model, rule_metrics = rule.update(state.rule_state(), model, sums, state.round_idx, key)
    params = masks_lib.apply(model.params, new.masks)
    metrics = {**round_train_metrics(sums.metrics, sums.num_clients),
               "finite": tree_lib.all_finite(params) & jnp.isfinite(sums.metrics.loss_sum),
               **rule_metrics}
    return MaskedFedAvgState(params, model.batch_stats, new.masks, state.round_idx + 1,
                             new._replace(masks=None), opt_state, state.aggregator), metrics

  alg = FedAlgorithm(init, client_update, server_update)
  return alg if aggregator is None else federated.with_aggregator(alg, aggregator,
                                                                  aggregation_view())


# --- robust aggregation (issue 28): masked FedAvg's sums as an aggregator sees them ---


def _steps_optimizer(state: MaskedFedAvgState) -> bool:
  """Whether the clients uploaded n_k (w - w_k) for a server optimizer (else n_k w_k)."""
  return not (type(state.opt_state) is tuple and not state.opt_state)


def aggregation_view() -> federated.SumsView:
  """The `federated.SumsView` of `masked_fedavg` (either upload form; a client holds the
  server's masks, or with clients' own masks the entries of its masks): run any
  `MaskRule` robustly with `federated.with_aggregator(alg, aggregator, aggregation_view())`."""
  return federated.weighted_view("params", votes_field="masks", delta=_steps_optimizer,
                                 masks_field="masks")

# --- end robust aggregation ---


# ----------------------------------------------------------------------------
# End to end: a sparse method's `federated.Method` (host-side accounting around the round).


class SparseRun(NamedTuple):
  """The run a sparse method's `Method` is built for (its own options aside).

  Attributes:
    spec: the model spec (fixed: these methods mask, never reshape).
    params, batch_stats: the dense initial model (`models.init_params(spec, key)`).
    key: the init key (server state, candidates, initial pruning).
    optimizer: the clients' optax optimizer.
    schedule: the clients' `LocalSchedule` (with the execution strategy's unrolling).
    model: `federated.ModelFns`: the apply function and evaluation of `spec`.
    train: the training `ClientData` (initial pruning on a client, SNIP's batch).
    clients_per_round: clients per round (whole-cohort bytes in the records).
    rounds: rounds of the run (the summary's per-round averages).
    optimizer_slots: parameter-sized slots of the optimizer's state (client memory).
    log: receives one line per host-side decision.
  """
  spec: Any
  params: Params
  batch_stats: BatchStats
  key: PRNGKey
  optimizer: optax.GradientTransformation
  schedule: LocalSchedule
  model: federated.ModelFns
  train: Any
  clients_per_round: int
  rounds: int
  optimizer_slots: int = 0
  log: Callable[[str], None] = federated.no_log


def no_extra_cost(round_idx: int, masks: Masks, record: dict) -> dict:
  """The default `extra_cost` of `masked_method`: local training only."""
  del round_idx, masks, record
  return {}


def mean_steps(record: dict) -> int:
  """Average real local steps per client of the round (the cost model's local_steps)."""
  return int(round(record["local_steps"] / max(record["num_clients"], 1.0)))


def layer_names(paths) -> list[str]:
  """'conv_0/kernel' -> 'conv_0' (the names of `accounting.layer_costs`), in order, once each.

  An LSTM layer is one row of `layer_costs`: its 'lstm_0/kernel' and
  'lstm_0/recurrent_kernel' both name 'lstm_0'.
  """
  names = []
  for p in paths:
    for suffix in ("/kernel", "/recurrent_kernel"):
      if p.endswith(suffix):
        p = p[:-len(suffix)]
        break
    if p not in names:
      names.append(p)
  return names


def masked_method(run: SparseRun, algorithm: FedAlgorithm,
                  init_fn: Callable[[], tuple[MaskedFedAvgState, dict]], *, apply_fn: Callable,
                  prunable: Any, extra_cost: Callable[[int, Masks, dict], dict] = no_extra_cost,
                  sparse_model: bool = True) -> federated.Method:
  """The `Method` of a `masked_fedavg` algorithm: its state, records and summary.

  Args:
    run: the `SparseRun`.
    algorithm: the `masked_fedavg` of the method's rule.
    init_fn: `init_fn() -> (server state, summary fields)`: the first state (masks at
      initialisation, candidate selection, ...); the summary fields (e.g. FedTiny's
      selected candidate) are kept in the host state, so a resumed run reports them.
    apply_fn: the model's apply function (evaluation).
    prunable: the rule's static filter: its leaves get `density/<path>` record fields.
    extra_cost: `(round_idx, host masks, record) -> dict` of `accounting.client_round_cost`
      keyword arguments beyond local training (a growth gradient, a top-K upload, a
      selection's forward passes); the masks are those the round trained under.
    sparse_model: False: the clients' cost is the dense model's (dense encoding).

  Returns:
    The `Method`. Records: the global `density` (the rule's metric, else the masks'),
    the per-client cost of the round (`client_training_flops`, `client_peak_memory_bytes`,
    `client_upload_bytes`, `client_download_bytes`, averaged over the cohort's clients),
    the kept `params`, sparse `flops` and `density/<layer path>` of the server model
    after the round, and `bytes_up` / `bytes_down` of the whole cohort under the masks
    the round trained with (bitmap encoding). Summary: the final kept `params` / `flops`,
    `dense_params` / `dense_flops`, `density`, per-round client cost averages, the peak
    client memory and `init_fn`'s fields. Masks are copied to the host only when a round
    reports `adjusted` or `pruned` (never inside the round).
  """
  spec = run.spec
  shapes, _ = models.param_shapes(spec)
  layers = one_shot.prunable_layers(prunable, prunable)
  # pruned=True: bitmap encoding (all-True `()` masks, as the dense baseline's, send no bits).
  size_of = lambda m: one_shot.size_record(spec, m, True, run.clients_per_round, layers)

  def with_masks(state, cost=None):
    masks_np = jax.tree.map(np.asarray, jax.device_get(state.server.masks))
    return state._replace(cache={"masks": masks_np, "sizes": size_of(masks_np), "cost": cost})

  def init():
    server, summary = init_fn()
    totals = dict(client_training_flops=0, client_upload_bytes=0, client_download_bytes=0,
                  client_peak_memory_bytes=0)
    return with_masks(federated.MethodState(server, spec, {"cost_totals": totals,
                                                           "summary": summary}))

  def after_round(state, round_idx, metrics):
    masks_np = state.cache["masks"]  # the masks the clients trained under
    cost = accounting.client_round_cost(
        spec, masks_np if sparse_model else None, batch_size=run.schedule.batch_size,
        local_steps=mean_steps(metrics), optimizer_slots=run.optimizer_slots,
        **extra_cost(round_idx, masks_np, metrics))
    t = dict(state.host["cost_totals"])
    t["client_training_flops"] += cost.training_flops
    t["client_upload_bytes"] += cost.upload
    t["client_download_bytes"] += cost.download
    t["client_peak_memory_bytes"] = max(t["client_peak_memory_bytes"], cost.peak_memory)
    state = state._replace(host={**state.host, "cost_totals": t})
    if metrics.get("adjusted", 0.0) or metrics.get("pruned", 0.0):
      return with_masks(state, cost)
    return state._replace(cache={**state.cache, "cost": cost})

  def record(before, after, round_idx, metrics):
    out = {}
    if "density" not in metrics:  # rules with fixed masks: the density of the masks
      out["density"] = float(masks_lib.density(before.cache["masks"], shapes))
    cost = after.cache["cost"]
    out.update(client_training_flops=cost.training_flops, client_peak_memory_bytes=cost.peak_memory,
               client_upload_bytes=cost.upload, client_download_bytes=cost.download)
    # Sizes of the model after the round (as the record's density), traffic of the round.
    out.update(after.cache["sizes"], bytes_up=before.cache["sizes"]["bytes_up"],
               bytes_down=before.cache["sizes"]["bytes_down"])
    return out

  def evaluator(spec):
    del spec
    evaluate = run.model.evaluate_with(apply_fn)
    return lambda state, round_idx: evaluate(state.server.params, state.server.batch_stats)

  def summary(state, last_eval):
    del last_eval
    totals = state.host["cost_totals"]
    rounds = max(run.rounds, 1)
    final_masks = state.cache["masks"]
    return {
        # Kept sizes under `params` / `flops`, as every other method reports (plots, sweep tables).
        "params": accounting.param_count(spec, final_masks),
        "dense_params": accounting.param_count(spec),
        "density": float(masks_lib.density(final_masks, jax.device_get(state.server.params))),
        "flops": accounting.flops(spec, final_masks), "dense_flops": accounting.flops(spec),
        "client_training_flops_per_round": totals["client_training_flops"] / rounds,
        "client_upload_bytes_per_round": totals["client_upload_bytes"] / rounds,
        "client_download_bytes_per_round": totals["client_download_bytes"] / rounds,
        "client_peak_memory_bytes": totals["client_peak_memory_bytes"], **state.host["summary"]}

  return federated.Method(init=init, algorithm=lambda spec: algorithm, evaluator=evaluator,
                          after_round=after_round, record=record, summary=summary,
                          resume=with_masks)


def dense_method(run: SparseRun, *, aggregator: federated.Aggregator | None = None
                 ) -> federated.Method:
  """Dense FedAvg (density 1) with the sparse methods' records: the comparison's reference.

  `masked_fedavg` with `no_prune()` and FedAvg's server step (`optax.sgd(1.0)` on the
  mean pseudo-gradient, aggregated by `aggregator`: None is the mean; its state is part
  of the server state); its clients' cost is the dense model's.
  """
  apply_fn = run.model.apply_for(run.spec)
  alg = masked_fedavg(apply_fn, run.optimizer, run.schedule, no_prune(),
                      server_optimizer=optax.sgd(1.0), aggregator=aggregator)

  def init_fn():
    state = alg.init(run.params, run.key, batch_stats=run.batch_stats)
    return state, {"sparse_method": "dense", "target_density": 1.0}

  return masked_method(run, alg, init_fn, apply_fn=apply_fn,
                       prunable=_sparse.prunable_filter(run.params), sparse_model=False)

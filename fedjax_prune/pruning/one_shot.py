"""FedAvg with optional one-shot global magnitude pruning, as one `federated.Method`.

The dense FedAvg family (FedAvg, FedAvgM, FedAdam, FedYogi, FedProx) runs as this
method with `density=1`. With `density < 1`, after `prune_round` rounds the server
keeps the `density` fraction of all kernel entries with the largest magnitude (one
global threshold, `masks.global_topk`), and training continues with these fixed masks
in the server state (clients train the masked model; the round compiles once more for
the full-shape masks).

Records: the model's kept `params` and `flops` (batch 1, `accounting`), `bytes_up` /
`bytes_down` of the whole cohort in that round (dense encoding, bitmap once pruned),
and, when pruning is configured, `density/<layer path>` per prunable layer (1.0 before).

References:
  Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient
  Neural Networks", NeurIPS 2015 (magnitude pruning); McMahan et al.,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS 2017 (FedAvg).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_prune import accounting, federated
from fedjax_prune import masks as masks_lib
from fedjax_prune.pruning import _sparse
from fedjax_prune.types import BatchStats, Params, PRNGKey


def global_magnitude_masks(params: Params, density: float):
  """Masks keeping the `density` fraction of all kernel entries by |w| (biases stay dense).

  The kernels are `_sparse.prunable_filter`'s leaves: ndim >= 2 (conv / dense kernels,
  the same leaves as `masks.by_ndim` on the CNNs), except a text model's token and
  position embedding tables, which stay dense (a lookup saves no FLOPs when pruned).
  """
  return masks_lib.global_topk(masks_lib.magnitude(params), density,
                               _sparse.prunable_filter(params))


def prune(state: federated.ServerState, density: float) -> federated.ServerState:
  """One-shot global magnitude pruning of the server model (host side, between rounds)."""
  # Copies: global_topk shares one `()` array among the unpruned leaves, and the donated
  # round must not receive the same buffer twice.
  m = jax.tree.map(jnp.copy, global_magnitude_masks(state.params, density))
  return state._replace(params=masks_lib.apply(state.params, m), masks=m)


def size_record(spec, masks, pruned: bool, num_clients: int, layers: tuple = ()) -> dict:
  """Model size, FLOPs, communication and per-layer density for the metrics records.

  Args:
    spec: the model spec.
    masks: the server masks (None or ignored when not `pruned`).
    pruned: bitmap encoding of the masked model (else dense).
    num_clients: clients per round (bytes are the whole cohort's).
    layers: paths ('dense_0/kernel') of the prunable layers whose density is logged
      (1.0 before pruning), () for none.
  """
  m = jax.device_get(masks) if pruned else None
  up, down = accounting.round_bytes(spec, m, encoding="bitmap" if pruned else "dense")
  record = {"params": accounting.param_count(spec, m), "flops": accounting.flops(spec, m),
            "bytes_up": up * num_clients, "bytes_down": down * num_clients}
  if layers:
    if masks is None:  # dense training
      kept = dict.fromkeys(layers, 1.0)
    else:
      kept = {path: float(jnp.mean(leaf))
              for path, leaf in zip(_sparse.leaf_paths(masks), jax.tree.leaves(masks))}
    record.update({f"density/{name}": kept[name] for name in layers})
  return record


def prunable_layers(params: Params, prunable: Any = None) -> tuple:
  """'dense_0/kernel' paths of the leaves a static `prunable` filter selects (default:
  the kernels, ndim >= 2 but embedding tables, that global magnitude pruning prunes)."""
  flags = _sparse.leaf_flags(params, _sparse.prunable_filter(params) if prunable is None
                             else prunable)
  return tuple(path for path, flag in zip(_sparse.leaf_paths(params), flags) if flag)


def one_shot_magnitude(algorithm: federated.FedAlgorithm, *, spec, params: Params,
                       batch_stats: BatchStats, key: PRNGKey,
                       evaluate: Callable[[Params, BatchStats], dict], clients_per_round: int,
                       density: float = 1.0, prune_round: int = 0) -> federated.Method:
  """FedAvg-family training with optional one-shot global magnitude pruning (module docstring).

  Args:
    algorithm: the FedAvg-family `FedAlgorithm` (its server state has `masks`).
    spec, params, batch_stats: the model.
    key: the init key of the server state.
    evaluate: `evaluate(params, batch_stats) -> dict` (e.g. `ModelFns.evaluate_with(apply_fn)`).
    clients_per_round: for the records' whole-cohort bytes.
    density: kept fraction of the kernels after the prune, in (0, 1]; 1 = dense FedAvg.
    prune_round: rounds of dense training before the prune.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, models
    >>> from fedjax_prune.pruning import one_shot
    >>> spec = models.mlp(input_shape=(4,), hidden=(8,), num_classes=3)
    >>> apply_fn, params, stats = models.build(spec, jax.random.key(0))
    >>> alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=2))
    >>> method = one_shot.one_shot_magnitude(alg, spec=spec, params=params, batch_stats=stats,
    ...     key=jax.random.key(1), evaluate=lambda p, s: {}, clients_per_round=2,
    ...     density=0.5, prune_round=1)
    >>> state = method.before_round(method.init(), 1, jax.random.key(2))
    >>> state.host["pruned"], state.cache["params"] < method.init().cache["params"]
    (True, True)
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {density!r}")
  if isinstance(prune_round, bool) or not isinstance(prune_round, int) or prune_round < 0:
    raise ValueError(f"prune_round must be an int >= 0, got {prune_round!r}")
  prunes = density < 1.0
  layers = prunable_layers(params) if prunes else ()

  def with_sizes(state: federated.MethodState) -> federated.MethodState:
    return state._replace(cache=size_record(spec, state.server.masks, state.host["pruned"],
                                            clients_per_round, layers))

  def init():
    server = algorithm.init(params, key, batch_stats=batch_stats)
    return with_sizes(federated.MethodState(server, spec, {"pruned": False}))

  def before_round(state, round_idx, round_key):
    del round_key
    if not prunes or state.host["pruned"] or round_idx < prune_round:
      return state
    return with_sizes(state._replace(server=prune(state.server, density), host={"pruned": True}))

  def evaluator(spec):
    del spec
    return lambda state, round_idx: evaluate(state.server.params, state.server.batch_stats)

  def template(initial, spec, host):
    del spec
    return jax.eval_shape(prune, initial.server, density) if host["pruned"] else initial.server

  def summary(state, last_eval):
    del last_eval
    sizes = state.cache
    return {"params": sizes["params"], "flops": sizes["flops"],
            "bytes_up_per_round": sizes["bytes_up"], "bytes_down_per_round": sizes["bytes_down"]}

  return federated.Method(
      init=init, algorithm=lambda spec: algorithm, evaluator=evaluator, before_round=before_round,
      record=lambda before, after, round_idx, metrics: dict(after.cache), summary=summary,
      template=template, resume=with_sizes)

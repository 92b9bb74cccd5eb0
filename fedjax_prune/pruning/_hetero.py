"""Pieces shared by the model-heterogeneous methods (FIARSE, HeteroFL, FedRolex, ScaleFL).

Every client trains a *submodel* of one full-size global model, chosen by its
capacity (`ClientInfo.capacity`, the fraction of parameters it can train). All
four methods run the full-size parameter pytree for every client and express the
submodel as a function of the parameters (FIARSE: magnitude threshold; the width
methods: channel masks), so clients of different capacities share one compiled,
vmapped/scanned round. The server averages each coordinate over the clients that
held (or touched) it: `federated.counted_contribution` / `finish_counted_mean`.

Capacity levels are a static tuple of Python floats, e.g. (1, 1/4, 1/16, 1/64);
a client's level is the nearest one to its capacity (traced argmin).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_prune import federated
from fedjax_prune import tree as tree_lib
from fedjax_prune.federated import ClientOutput, CountedSum, FedAlgorithm, LocalMetrics
from fedjax_prune.masks._filters import path_str
from fedjax_prune.types import BatchStats, Params, PyTree

# A BatchNorm parameter lives under a key named 'bn', 'bn1', 'shortcut_bn', 'bn_0', ...
_NORM_KEY = re.compile(r"(^|_)bn(_?\d+)?$")


class HeteroState(NamedTuple):
  """Server state of a model-heterogeneous method.

  Attributes:
    params: the full-size global parameters.
    batch_stats: global BatchNorm running statistics ({} with static BN, the default).
    round_idx: [] int32 number of completed rounds.
    aux: method state: FIARSE's thresholds [L, G] for the current params; () otherwise.
  """
  params: Params
  batch_stats: BatchStats
  round_idx: jax.Array
  aux: Any = ()


class HeteroSums(NamedTuple):
  """One client's contribution (the engine sums these over the cohort)."""
  update: CountedSum        # delta = w_server - w_client where held, and the holder counts
  batch_stats: BatchStats   # client running stats (summed; divided by num_clients)
  num_clients: jax.Array    # 1 per real client
  metrics: LocalMetrics


class HeteroMethod(NamedTuple):
  """A heterogeneous method: the engine algorithm plus its evaluation-time submodel.

  Attributes:
    algorithm: the `FedAlgorithm` run by `federated.make_round`; its state is `HeteroState`.
    submodel: `submodel(state, capacity []) -> (params, exit_index [])`: the
      size-`capacity` submodel of the global model as full-size params (dropped
      coordinates are exactly 0) and which output of the model predicts (the
      early exit for ScaleFL; 0 for single-output models). Pure and traceable,
      so one compiled evaluation serves every capacity.
  """
  algorithm: FedAlgorithm
  submodel: Callable


def check_capacities(capacities: Sequence[float], name: str = "capacities") -> tuple[float, ...]:
  """Validates capacity levels: a non-empty tuple of distinct floats in (0, 1]."""
  try:
    caps = tuple(float(c) for c in capacities)
  except TypeError:
    raise ValueError(f"{name} must be a sequence of floats in (0, 1], got {capacities!r}") from None
  if not caps:
    raise ValueError(f"{name} must not be empty")
  for c in caps:
    if not (math.isfinite(c) and 0.0 < c <= 1.0):
      raise ValueError(f"{name} must lie in (0, 1], got {c!r} in {caps}")
  if len(set(caps)) != len(caps):
    raise ValueError(f"{name} must be distinct, got {caps}")
  return caps


def level_index(capacities: tuple[float, ...], capacity: jax.typing.ArrayLike) -> jax.Array:
  """[] int32 index of the capacity level nearest to `capacity` (traceable)."""
  caps = jnp.asarray(capacities, jnp.float32)
  return jnp.argmin(jnp.abs(caps - jnp.asarray(capacity, jnp.float32))).astype(jnp.int32)


def is_norm_path(path) -> bool:
  """True for a BatchNorm scale/bias leaf (a key named bn, bn1, shortcut_bn, bn_0, ...)."""
  keys = path_str(path).split("/")[:-1]
  return any(_NORM_KEY.search(k) for k in keys)


def default_maskable(params: Params) -> PyTree:
  """FIARSE's maskable set: every parameter except BatchNorm scale/bias (static bools).

  Conv kernels, dense kernels and dense biases (the classifier's included) are
  ranked together (METHODS.md §4.2); BN affine parameters are always dense.
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: not is_norm_path(p), params)


def client_output(server: HeteroState, local_params: Params, local_stats: BatchStats,
                  present: PyTree, metrics: LocalMetrics) -> ClientOutput:
  """Packs a client's update w_server - w_client over the coordinates in `present`."""
  delta = tree_lib.sub(server.params, local_params)
  return ClientOutput(HeteroSums(federated.counted_contribution(delta, present), local_stats,
                                 jnp.ones((), jnp.float32), metrics))


def server_step(state: HeteroState, outputs: ClientOutput, server_learning_rate: float,
                aux_fn: Callable[[Params], Any]) -> tuple[HeteroState, dict]:
  """Partial averaging: x_j <- x_j - lr_g * (sum_i delta_ij / c_j), c_j = #holders of j.

  Coordinates no client held keep their value. Returns (new state, metrics).
  """
  sums: HeteroSums = outputs.sums
  mean_delta = federated.finish_counted_mean(sums.update, tree_lib.zeros_like(state.params))
  params = jax.tree.map(lambda p, d: p - jnp.asarray(server_learning_rate, p.dtype) * d,
                        state.params, mean_delta)
  n = sums.num_clients
  batch_stats = jax.tree.map(lambda s, old: jnp.where(n > 0, s / jnp.maximum(n, 1.0), old),
                             sums.batch_stats, state.batch_stats)
  counts = jax.tree.leaves(sums.update.count)
  held = sum(jnp.sum(c > 0) for c in counts)
  total = sum(c.size for c in counts)
  metrics = federated.round_train_metrics(sums.metrics, n)
  metrics.update({
      "update_norm": jnp.sqrt(tree_lib.squared_norm(mean_delta)),
      "coverage": held.astype(jnp.float32) / total,  # fraction of coordinates some client updated
      "finite": tree_lib.all_finite(params) & jnp.isfinite(sums.metrics.loss_sum),
  })
  return HeteroState(params, batch_stats, state.round_idx + 1, aux_fn(params)), metrics


def init_state(params: Params, batch_stats: BatchStats | None, aux_fn: Callable[[Params], Any]
               ) -> HeteroState:
  return HeteroState(params, {} if batch_stats is None else batch_stats, jnp.zeros((), jnp.int32),
                     aux_fn(params))


def wrap_apply(apply_fn: Callable, transform_fn: Callable[[Params], Params]) -> Callable:
  """apply_fn evaluated at `transform_fn(params)` (the submodel), same signature."""

  def apply(params, batch_stats, x, *, train, example_mask=None):
    return apply_fn(transform_fn(params), batch_stats, x, train=train, example_mask=example_mask)

  return apply


def check_optimizer(optimizer: Any) -> optax.GradientTransformation:
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(f"client_optimizer must be an optax GradientTransformation, got {optimizer!r}")
  return optimizer

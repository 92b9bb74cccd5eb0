"""Pieces shared by the model-heterogeneous methods (FIARSE, HeteroFL, FedRolex, ScaleFL).

Every client trains a *submodel* of one full-size global model, chosen by its
capacity (`ClientInfo.capacity`, the fraction of parameters it can train). All
four methods run the full-size parameter pytree for every client and express the
submodel as a function of the parameters (FIARSE: magnitude threshold; the width
methods: channel masks), so clients of different capacities share one compiled,
vmapped/scanned round. The width methods can instead train each level's sliced
model (`heterofl.GroupedExecution`, one program per level) and scatter the update
back to full shape. The server averages each coordinate over the clients that
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
import numpy as np
import optax

from fedjax_prune import accounting, federated, models
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
    aggregator: the state of the method's `aggregator` (`in_path`: the adaptive DP clip
      norm, the error-feedback memory [num_clients, ...]); () without one, and for
      stateless ones.
  """
  params: Params
  batch_stats: BatchStats
  round_idx: jax.Array
  aux: Any = ()
  aggregator: Any = ()


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
  ranked together (FIARSE's official code); BN affine parameters are always dense.
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: not is_norm_path(p), params)


def client_output(server: HeteroState, local_params: Params, local_stats: BatchStats,
                  present: PyTree, metrics: LocalMetrics) -> ClientOutput:
  """Packs a client's update w_server - w_client over the coordinates in `present`."""
  return delta_output(tree_lib.sub(server.params, local_params), local_stats, present, metrics)


def delta_output(delta: Params, local_stats: BatchStats, present: PyTree,
                 metrics: LocalMetrics) -> ClientOutput:
  """Packs a client's update `delta` (w_server - w_client) over the coordinates in `present`."""
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


# --- robust aggregation (issue 28): the submodel methods' sums as an aggregator sees them ---


def counted_view(expected_share: Callable[[HeteroState], PyTree] | None = None, *,
                 release_all: bool = False) -> federated.SumsView:
  """The `federated.SumsView` of `client_output` / `server_step`: a client's update is its
  delta where it holds a coordinate (`present` = its count), every real client weighs 1,
  and the aggregate goes back as a count of 1 on every coordinate some client held (so
  `server_step`'s partial averaging returns it, and its coverage metric is unchanged).
  Run a submodel method robustly with `federated.with_aggregator(alg, aggregator,
  counted_view())`.

  Args:
    expected_share: None, or `expected_share(state) -> tree` broadcastable to the params:
      the public share of the clients whose submodel holds each coordinate (`holder_share`
      of the server's level masks and the public capacity assignment; never the cohort's).
      The aggregate, a fixed-denominator mean (sum / m: `federated.dp_mean`), is divided
      by it, so each coordinate's denominator is its expected holder count m x share
      (`federated._privacy` docstring: public per-coordinate counts). Where the share is
      0 (nobody can hold it) the aggregate is unused.
    release_all: the aggregate goes back as a count of 1 on EVERY coordinate, so
      `server_step` applies it everywhere (its coverage metric reads 1). For submodels
      that depend on client data (FIARSE's touched coordinates) under a DP mean with noise
      on every coordinate (`federated.dp_mean(..., noise_on_present=False)`): the released
      set must be public (`federated._privacy` docstring), and dropping the aggregate where
      no client held would reveal the cohort's touch pattern. Untouched coordinates then
      move by the noise / m; with aggregators that return 0 where nobody contributed (the
      `fallback`) they stay as they were.
  """

  def read(state: HeteroState, sums: HeteroSums):
    del state
    count = sums.update.count
    present = jax.tree.map(lambda c: c > 0, count)
    return (sums.update.total, jnp.ones((), jnp.float32), present,
            sums._replace(update=CountedSum((), count)))

  def write(state: HeteroState, rest: HeteroSums, mean_delta: Params) -> HeteroSums:
    if expected_share is not None:
      mean_delta = jax.tree.map(
          lambda d, s: d / jnp.where(s > 0, s, 1.0).astype(d.dtype), mean_delta,
          expected_share(state))
    if release_all:
      return rest._replace(update=CountedSum(mean_delta, jax.tree.map(
          lambda c: jnp.ones(c.shape, jnp.float32), rest.update.count)))
    held = jax.tree.map(lambda c: c > 0, rest.update.count)
    total = jax.tree.map(lambda d, h: jnp.where(h, d, jnp.zeros((), d.dtype)), mean_delta, held)
    return rest._replace(update=CountedSum(total, jax.tree.map(
        lambda h: h.astype(jnp.float32), held)))

  return federated.SumsView(read, write)


def in_path(alg: FedAlgorithm, aggregator: federated.Aggregator | None,
            expected_share: Callable[[HeteroState], PyTree] | None = None, *,
            release_all: bool = False) -> FedAlgorithm:
  """`alg` with `aggregator` in its path (`federated.with_aggregator` over `counted_view`),
  its state in `HeteroState.aggregator` (so checkpoints keep it); `alg` itself for None.
  Each client's update goes to the aggregator on the coordinates it holds: DP clips
  them, compression sends them, error feedback keeps its memory elsewhere. With
  `release_all` the server applies the aggregate on every coordinate (`counted_view`)."""
  if aggregator is None:
    if expected_share is not None:
      raise ValueError("an expected-count denominator (level_clients) needs an aggregator "
                       "with a fixed denominator (federated.dp_mean)")
    if release_all:
      raise ValueError("release_all=True needs an aggregator (a DP mean with noise on every "
                       "coordinate: federated.dp_mean(..., noise_on_present=False))")
    return alg
  return federated.with_aggregator(alg, aggregator,
                                   counted_view(expected_share, release_all=release_all))


def level_counts(client_caps: np.ndarray, capacities: Sequence[float]) -> tuple[int, ...]:
  """How many clients are at each capacity level (the level nearest to each client's
  capacity, as `level_index`), from the public assignment (`client_capacities`)."""
  caps = np.asarray(check_capacities(capacities), np.float32)
  level = np.argmin(np.abs(np.asarray(client_caps, np.float32)[:, None] - caps[None, :]), axis=1)
  return tuple(int(n) for n in np.bincount(level, minlength=caps.size))


def holder_share(params: Params, level_masks: Sequence[PyTree], level_clients: Sequence[int]
                 ) -> Params:
  """Per coordinate, the share of the clients whose level's submodel holds it.

  share_j = sum_l n_l 1[level l holds j] / sum_l n_l (integer sums, one division: a
  coordinate every level holds gets exactly 1). Under uniform sampling of m clients its
  expected number of holders is m x share_j: the public per-coordinate denominator of a
  DP mean over submodels (`counted_view(expected_share=)`).

  Args:
    params: the full-size params (for the leaves' shapes).
    level_masks: L bool mask trees broadcastable to `params` (the levels' submodels).
    level_clients: [L] the number of clients at each level (`level_counts`).

  Returns:
    float32 tree shaped like `params`.
  """
  counts = [float(int(n)) for n in level_clients]
  if len(counts) != len(level_masks) or any(n < 0 for n in counts) or not sum(counts) > 0:
    raise ValueError(f"level_clients must give one count >= 0 per level ({len(level_masks)}), "
                     f"not all 0, got {tuple(level_clients)}")
  total = jnp.float32(sum(counts))

  def leaf(p, *masks):
    held = sum(jnp.float32(n) * jnp.broadcast_to(m, jnp.shape(p)).astype(jnp.float32)
               for n, m in zip(counts, masks))
    return held / total

  return jax.tree.map(leaf, params, *level_masks)

# --- end robust aggregation ---


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


# ----------------------------------------------------------------------------- end to end


def level_label(capacity: float) -> str:
  """'1', '1/4', '1/64' for reciprocal integers, else '0.64' (metric names per level)."""
  if capacity == 1.0:
    return "1"
  inv = 1.0 / capacity
  return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{capacity:g}"


def client_capacities(num_clients: int, capacities: Sequence[float], assignment: str) -> np.ndarray:
  """[N] float32 capacity of every client: 'interleaved' (client i -> level i mod L) or
  'blocks' (equal contiguous groups; equal group sizes when L divides N)."""
  levels = np.asarray(capacities, np.float32)
  idx = np.arange(num_clients)
  if assignment == "interleaved":
    return levels[idx % len(levels)]
  if assignment == "blocks":
    return levels[idx * len(levels) // num_clients]
  raise ValueError(f"assignment must be 'interleaved' or 'blocks', got {assignment!r}")


class LevelTest(NamedTuple):
  """The test data of the per-level evaluation.

  Attributes:
    x, y: the global test set [T, ...], [T].
    clients: every client's local test set (`ClientData`, clients aligned with training).
    batch_size: evaluation batch size (static BN normalises with each batch's statistics).
    client_ids: optional [T] int: the client of each global test row, when the global set
      is the clients' sets pooled (`data.pool`) and the model evaluates each example on its
      own (no static BN): the local sums then come from the global pass (same counts, one
      pass instead of every client's padded set). None: each client's own batches.
  """
  x: jax.Array
  y: jax.Array
  clients: Any
  batch_size: int
  client_ids: Any = None


def make_level_evaluator(method: HeteroMethod, apply_fn: Callable, test: LevelTest):
  """Jitted evaluators with a traced capacity (one compile for every size).

  Returns (eval_all(state, capacity) -> (central EvalSums, per-client EvalSums [N]),
  eval_central(state, capacity) -> central EvalSums).
  """

  def submodel_apply(state, capacity):
    params, exit_idx = method.submodel(state, capacity)

    def apply(p, bs, x, *, train, example_mask=None):
      logits, stats = apply_fn(p, bs, x, train=train, example_mask=example_mask)
      if logits.ndim == 3:  # early-exit model: [B, X, K] -> the submodel's exit
        logits = jnp.take(logits, exit_idx, axis=1)
      return logits, stats

    return params, apply

  # Test data enter as arguments (closed-over arrays would be constant-folded at compile time).
  def eval_central(state, capacity, test_x, test_y):
    params, apply = submodel_apply(state, capacity)
    return federated.make_evaluate(apply, batch_size=test.batch_size)(
        params, state.batch_stats, test_x, test_y)

  def eval_all(state, capacity, test_x, test_y, test_clients):
    params, apply = submodel_apply(state, capacity)
    local = federated.make_evaluate_clients(apply, batch_size=test.batch_size)(
        params, state.batch_stats, test_clients)
    return eval_central(state, capacity, test_x, test_y), local

  def eval_pooled(state, capacity, test_x, test_y, client_ids):
    params, apply = submodel_apply(state, capacity)
    return federated.make_evaluate_pooled_clients(apply, batch_size=test.batch_size)(
        params, state.batch_stats, test_x, test_y, client_ids,
        num_clients=test.clients.num_examples.shape[0])

  central_jit = jax.jit(eval_central)
  if test.client_ids is None:
    all_jit = jax.jit(eval_all)
    evaluate_all = lambda state, cap: all_jit(state, cap, test.x, test.y, test.clients)
  else:
    pooled_jit = jax.jit(eval_pooled)
    evaluate_all = lambda state, cap: pooled_jit(state, cap, test.x, test.y, test.client_ids)
  return evaluate_all, lambda state, cap: central_jit(state, cap, test.x, test.y)


def evaluate_levels(eval_all, eval_central, state, capacities, client_caps, sweep) -> dict:
  """The per-level evaluation protocol (FIARSE's `server.py`) as a flat dict of host floats.

  model_<s>: mean local-test accuracy of the clients whose capacity is s, on the size-s
  submodel; local: mean over all clients of their own-size submodel's local-test
  accuracy; global_<s>: size-s submodel on the global test set, `global` their mean;
  sweep_<s>: size-s submodel on the global test set for the extra sizes `sweep`.
  """
  out, global_accs = {}, []
  own_acc = np.full(client_caps.shape, np.nan)
  for cap in capacities:
    central, local = eval_all(state, jnp.float32(cap))
    c = central.means()
    label = level_label(cap)
    out[f"global_{label}"] = float(c["accuracy"])
    global_accs.append(float(c["accuracy"]))
    # Test rows beyond the N train clients (test-only clients) have no capacity: ignored.
    n = np.asarray(local.num_examples)[:client_caps.shape[0]]
    acc = np.where(n > 0, np.asarray(local.correct_sum)[:n.shape[0]] / np.maximum(n, 1), np.nan)
    mine = np.abs(client_caps - cap) < 1e-6
    own_acc[mine] = acc[mine]
    out[f"model_{label}"] = float(np.nanmean(acc[mine])) if np.any(mine & (n > 0)) else float("nan")
  out["local"] = float(np.nanmean(own_acc))
  out["global"] = float(np.mean(global_accs))
  for cap in sweep:
    out[f"sweep_{level_label(cap)}"] = float(eval_central(state, jnp.float32(cap)).means()["accuracy"])
  # The generic keys every method reports.
  out["test_accuracy"], out["local_accuracy_mean"] = out["global"], out["local"]
  return out


def submodel_level_masks(method: HeteroMethod, state: HeteroState, capacity: float):
  """Host bool masks of the size-`capacity` submodel: the submodel of an all-ones model
  (1 kept, 0 dropped), the extraction evaluation uses (width/depth submodels do not
  depend on the weights)."""
  ones = jax.tree.map(jnp.ones_like, state.params)
  masks, _ = method.submodel(state._replace(params=ones), jnp.float32(capacity))
  return jax.tree.map(lambda m: np.asarray(m) != 0, jax.device_get(masks))


def level_sizes(level_masks: Callable[[HeteroState, float], Any], state: HeteroState, spec,
                capacities: Sequence[float]) -> tuple[list[int], list[int]]:
  """(kept parameters, FLOPs at batch 1) of every capacity level's submodel, host ints.

  Parameters count every leaf of the state (ScaleFL's exits included); FLOPs walk the
  backbone `spec`, so leaves outside it (ScaleFL's exits) are left out of its masks.
  """
  params = jax.device_get(state.params)
  backbone = models.param_shapes(spec)[0].keys()
  level_params, level_flops = [], []
  for cap in capacities:
    masks = level_masks(state, cap)
    level_params.append(accounting.param_count(None, masks, params=params))
    level_flops.append(accounting.flops(spec, {k: v for k, v in masks.items() if k in backbone}))
  return level_params, level_flops


def submodel_method(hetero: HeteroMethod, *, spec, params: Params, batch_stats: BatchStats,
                    key: jax.Array, eval_apply: Callable, test: LevelTest,
                    client_caps: np.ndarray, capacities: Sequence[float],
                    sweep: Sequence[float] = (), sweep_every: int = 0, num_rounds: int = 0,
                    level_masks: Callable[[HeteroState, float], Any] | None = None
                    ) -> federated.Method:
  """A model-heterogeneous method end to end: nothing runs between rounds (every client's
  submodel is derived inside the compiled round); evaluation per capacity level.

  Args:
    hetero: the method's `HeteroMethod` (algorithm + evaluation submodel).
    spec, params, batch_stats: the full-size model.
    key: the init key.
    eval_apply: the full-size apply function evaluation runs (any conv implementation).
    test: the test data (`LevelTest`).
    client_caps: [N] capacity of every client (`client_capacities`).
    capacities: the L levels.
    sweep: extra sizes evaluated on the global test set every `sweep_every` rounds
      (0 = only at round `num_rounds`, the last).
    level_masks: `(state, capacity) -> host bool masks` of a level's submodel, for the
      summary's per-level sizes (default `submodel_level_masks`).

  Returns:
    The `Method`; its summary has `params` (full model), `capacities`, `level_params`,
    `level_flops`.
  """
  caps = tuple(float(c) for c in capacities)
  sweep = tuple(float(c) for c in sweep)
  masks_fn = level_masks or (lambda state, cap: submodel_level_masks(hetero, state, cap))

  def init():
    server = hetero.algorithm.init(params, key, batch_stats=batch_stats)
    return federated.MethodState(server, spec, {})

  def evaluator(spec):
    eval_all, eval_central = make_level_evaluator(hetero, eval_apply, test)

    def evaluate(state, round_idx):
      last = round_idx + 1 == num_rounds
      do_sweep = last or (sweep_every and (round_idx + 1) % sweep_every == 0)
      return evaluate_levels(eval_all, eval_central, state.server, caps, client_caps,
                             sweep if do_sweep else ())

    return evaluate

  def summary(state, last_eval):
    del last_eval
    level_params, level_flops = level_sizes(masks_fn, state.server, spec, caps)
    return {"params": tree_lib.size(params),
            "capacities": caps, "level_params": level_params, "level_flops": level_flops}

  return federated.Method(init=init, algorithm=lambda spec: hetero.algorithm,
                          evaluator=evaluator, summary=summary)

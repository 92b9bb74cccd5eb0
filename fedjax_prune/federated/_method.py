"""`Method`: one federated (pruning) method end to end, the shape every method has.

A method is the jitted `FedAlgorithm` of its current architecture plus the host-side
steps its paper runs between rounds (rebuild a smaller model, search an architecture,
prune once, select among candidates) and how it is evaluated. One experiment loop
(`experiments/train.py`) drives every method through these fields, in this order::

  state = method.init()                                   # or restored from a checkpoint
  for round_idx in range(start, rounds):
    state = method.before_round(state, round_idx, key_r)   # host side
    before = state
    state.server, metrics = round_fn[state.spec](state.server, ...)  # one compiled round
    state = method.after_round(state, round_idx, metrics)  # host side
    record = metrics | method.record(before, state, round_idx, metrics)
    record |= method.evaluator(state.spec)(state, round_idx)   # on eval rounds
  summary = {..., **last_eval, **method.summary(state, last_eval)}

When a hook changes `state.spec` (a rebuilt, smaller model), the loop compiles the
round and the evaluator once for the new architecture. Host hooks run outside jit
and may read the server state with `jax.device_get`; they never run per client.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Protocol

import jax
import numpy as np

from fedjax_prune.federated._engine import Cohort, FedAlgorithm, round_key
from fedjax_prune.types import ApplyFn


class MethodState(NamedTuple):
  """Where a run stands between rounds.

  Attributes:
    server: the algorithm's server state (a pytree of arrays; checkpointed as arrays).
    spec: the current model spec (a method that rebuilds changes it).
    host: JSON-able host-side state (search state, cumulative accounting, rebuild
      history); checkpointed as JSON next to the arrays.
    cache: host-side values derived from the fields above (e.g. host copies of the
      masks and their sizes), kept to avoid recomputing them every round; not
      checkpointed (`Method.resume` rebuilds it).
  """
  server: Any
  spec: Any
  host: dict
  cache: Any = None


class ModelFns(NamedTuple):
  """What a method builds per architecture, supplied by its caller.

  A method that rebuilds its model (ASP, CAVP) needs the apply function and the
  evaluation of every architecture it reaches; the caller decides how inputs are
  normalised, which convolution implementation and precision run, and on which
  test data models are evaluated.

  Attributes:
    apply_for: `apply_for(spec) -> ApplyFn`.
    evaluate_with: `evaluate_with(apply_fn) -> evaluate(params, batch_stats) -> dict`
      of host floats with at least 'test_accuracy' (compiled once per call).
  """
  apply_for: Callable[[Any], ApplyFn]
  evaluate_with: Callable[[ApplyFn], Callable[[Any, Any], dict]]


def no_log(message: str) -> None:
  """The default `log` of method factories: say nothing."""
  del message


class BeforeRound(Protocol):
  def __call__(self, state: MethodState, round_idx: int, key: jax.Array) -> MethodState: ...


class AfterRound(Protocol):
  def __call__(self, state: MethodState, round_idx: int, metrics: dict) -> MethodState: ...


class RecordFn(Protocol):
  def __call__(self, before: MethodState, after: MethodState, round_idx: int,
               metrics: dict) -> dict: ...


def keep_before(state: MethodState, round_idx: int, key: jax.Array) -> MethodState:
  """The default `before_round`: nothing happens between rounds."""
  del round_idx, key
  return state


def keep_after(state: MethodState, round_idx: int, metrics: dict) -> MethodState:
  """The default `after_round`: nothing happens after a round."""
  del round_idx, metrics
  return state


def no_record(before: MethodState, after: MethodState, round_idx: int, metrics: dict) -> dict:
  """The default `record`: no fields beyond the round's metrics."""
  del before, after, round_idx, metrics
  return {}


def no_summary(state: MethodState, last_eval: dict) -> dict:
  """The default `summary`: no fields beyond the loop's."""
  del state, last_eval
  return {}


def same_cache(state: MethodState) -> MethodState:
  """The default `resume`: nothing to rebuild after a restore."""
  return state


class Method(NamedTuple):
  """One method end to end (see the module docstring for how the loop drives it).

  Attributes:
    init: `init() -> MethodState`, the run's first state (host side; may compute
      what the method does before its first round: masks at initialisation,
      candidate selection, an initial client's training).
    algorithm: `algorithm(spec) -> FedAlgorithm`, the compiled part for architecture
      `spec` (the loop jits one round per architecture).
    evaluator: `evaluator(spec) -> evaluate(state, round_idx) -> dict` of host floats
      (must include 'test_accuracy'); built once per architecture; `round_idx` is the
      round just finished.
    before_round: `(state, round_idx, key) -> state`, host side before round
      `round_idx` (0-based); `key` = fold_in(init key, round_idx).
    after_round: `(state, round_idx, metrics) -> state`, host side after it;
      `metrics` are the round's host metrics.
    record: `(before, after, round_idx, metrics) -> dict`: the round's record fields
      beyond the metrics (sizes, costs, phase); `before` is the state the round
      started from (after `before_round`); its `server` was donated to the round,
      so read only its `spec`, `host` and `cache`.
    summary: `summary(state, last_eval) -> dict`: the run summary's method fields
      (they override the loop's, e.g. a final evaluation of a finalised model).
    template: optional `template(initial, spec, host) -> server state of
      jax.ShapeDtypeStruct` for a checkpoint saved with `spec` and `host`; None =
      the structure of `initial.server` (the architecture never changes).
    resume: `resume(state) -> state` after a restore (rebuild `cache`).
  """
  init: Callable[[], MethodState]
  algorithm: Callable[[Any], FedAlgorithm]
  evaluator: Callable[[Any], Callable[[MethodState], dict]]
  before_round: BeforeRound = keep_before
  after_round: AfterRound = keep_after
  record: RecordFn = no_record
  summary: Callable[[MethodState, dict], dict] = no_summary
  template: Callable[[MethodState, Any, dict], Any] | None = None
  resume: Callable[[MethodState], MethodState] = same_cache


def host_metrics(metrics: dict, round_idx: int) -> dict:
  """A round's metrics as host floats (one device->host transfer), without `finite`.

  Metrics of a round vectorised over runs (a leading seed axis) become lists of floats.
  Raises FloatingPointError naming the round when the round reported non-finite values.
  """
  record = {k: (v.tolist() if np.ndim(v) else float(v))
            for k, v in jax.device_get(metrics).items()}
  if not np.all(record.pop("finite", 1.0)):
    raise FloatingPointError(
        f"training diverged at round {round_idx + 1}: the loss or the parameters are not finite "
        f"(train_loss={record.get('train_loss')}); lower the learning rate (client or server)")
  return record


def run_rounds(method: Method, state: MethodState, *, train: Any,
               cohort_fn: Callable[[int], Cohort], train_root: jax.Array, init_key: jax.Array,
               rounds: range, compile_round: Callable[[FedAlgorithm], Callable],
               key_fn: Callable[[jax.Array, int], jax.Array] = round_key
               ) -> Iterator[tuple[int, MethodState, dict]]:
  """The rounds of `method`, the one round loop of the library (module docstring).

  Args:
    method: the `Method`.
    state: where the run stands (`method.init()` or a restored state).
    train: the training `ClientData` (on device).
    cohort_fn: `cohort_fn(round_idx) -> Cohort`.
    train_root: root key of the rounds (`round_key(train_root, round_idx)` per round).
    init_key: root of `before_round`'s keys (`fold_in(init_key, round_idx)`).
    rounds: the 0-based rounds to run, e.g. `range(start, num_rounds)`.
    compile_round: `compile_round(algorithm) -> round_fn` (e.g. `make_round` with an
      execution strategy and mesh); called once per architecture.
    key_fn: `key_fn(train_root, round_idx)`, the round's key (`round_key`; a run
      vectorised over seeds passes it vmapped over stacked roots).

  Yields:
    (round_idx, state after the round and `after_round`, record) per round, where
    record = the round's host metrics + `method.record(...)`. Evaluation, logging and
    checkpoints are the caller's (they run between two yields).
  """
  round_fn, compiled_spec = None, None
  for round_idx in rounds:
    state = method.before_round(state, round_idx, jax.random.fold_in(init_key, round_idx))
    if round_fn is None or state.spec != compiled_spec:  # a new architecture: compile once
      round_fn, compiled_spec = compile_round(method.algorithm(state.spec)), state.spec
    before = state
    server, metrics = round_fn(state.server, train, cohort_fn(round_idx),
                               key_fn(train_root, round_idx))
    state = state._replace(server=server)
    record = host_metrics(metrics, round_idx)
    state = method.after_round(state, round_idx, record)
    record.update(method.record(before, state, round_idx, record))
    yield round_idx, state, record

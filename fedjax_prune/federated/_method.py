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

from typing import Any, Callable, NamedTuple, Protocol

import jax

from fedjax_prune.federated._engine import FedAlgorithm


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


class ApplyFn(Protocol):
  """`apply_fn(params, batch_stats, x, *, train, example_mask=None, **kw) -> (logits, batch_stats)`."""

  def __call__(self, params: Any, batch_stats: Any, x: jax.Array, *, train: bool,
               **kwargs: Any) -> tuple[jax.Array, Any]: ...


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

"""Choosing the client-execution strategy by measurement.

Which strategy is fastest depends on the model, the cohort size and the
backend: on CPU, vmapped convolutions with per-client kernels lower to grouped
convolutions (slow) unless written as im2col GEMMs, and one client already fills
the cores, so the sequential in-graph map usually wins; on GPU/TPU the
vectorised strategies fill the device. `select_strategy` times a short round of
each candidate and caches the winner per (backend, device, workload) key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Sequence

import jax
from jax.sharding import Mesh

from fedjax_prune import _files
from fedjax_prune.federated._engine import (Chunked, Execution, FedAlgorithm, Sequential, Vmap,
                                            make_round)
from fedjax_prune.federated._local import LocalSchedule
from fedjax_prune.performance._cpu import round_compiler_options
from fedjax_prune.performance._lowrank import LowRankDense, worthwhile_lowrank_layers
from fedjax_prune.models._layers import CONV_IMPLS  # the concrete lowerings ('auto' resolves to one)


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A client-execution strategy: how clients are mapped, how convs are lowered, how
  many local steps are written out before the step loop (`LocalSchedule.unroll`;
  apply it with `strategy.schedule(schedule)`), and whether the cohort is sharded
  over the caller's device mesh (`strategy.make_round(alg, mesh=mesh)`),
  and whether large dense kernels are trained as factors (`lowrank`: the method builds
  its `LowRankDense` with `lowrank_dense`; dense FedAvg with SGD clients only).

  On CPU split into one device per core (`split_cpu_into_devices`), sharding runs
  clients on different cores at once: a large gain for compute-bound models (the
  LEAF CNN, an MLP) and a loss for tiny dispatch-bound ones at small cohorts
  (logistic regression, 8 clients), so callers time both (docs/results/engine.md,
  "Figures moved out of the library's docstrings").
  """
  execution: Execution
  conv_impl: str = "lax"
  unroll: int = 1
  sharded: bool = False
  lowrank: bool = False

  def __post_init__(self):
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
    if not isinstance(self.unroll, int) or isinstance(self.unroll, bool) or self.unroll < 1:
      raise ValueError(f"unroll must be an int >= 1, got {self.unroll!r}")
    if not isinstance(self.sharded, bool):
      raise ValueError(f"sharded must be a bool, got {self.sharded!r}")
    if not isinstance(self.lowrank, bool):
      raise ValueError(f"lowrank must be a bool, got {self.lowrank!r}")

  @property
  def name(self) -> str:
    ex = self.execution
    label = {Vmap: "vmap", Sequential: "sequential"}.get(type(ex), f"chunked{getattr(ex, 'size', '')}")
    return (f"{label}+{self.conv_impl}" + (f"+unroll{self.unroll}" if self.unroll > 1 else "")
            + ("+lowrank" if self.lowrank else "") + ("+sharded" if self.sharded else ""))

  def make_round(self, alg: FedAlgorithm, *, mesh: Mesh | None = None, donate: bool = False
                 ) -> Callable:
    """`federated.make_round(alg)` with this strategy's execution, `mesh` when the
    strategy is sharded (else no mesh), and `round_compiler_options` for its platform."""
    if self.sharded and mesh is None:
      raise ValueError(f"strategy {self.name!r} is sharded: pass the device mesh "
                       "(federated.client_mesh())")
    mesh = mesh if self.sharded else None
    platform = mesh.devices.flat[0].platform if mesh is not None else None
    return make_round(alg, execution=self.execution, mesh=mesh, donate=donate,
                      compiler_options=round_compiler_options(platform))

  def schedule(self, schedule: LocalSchedule) -> LocalSchedule:
    """`schedule` with this strategy's step unrolling (results are unchanged)."""
    return dataclasses.replace(schedule, unroll=self.unroll)

  def lowrank_dense(self, params, rows: int, learning_rate: float,
                    momentum: float = 0.0) -> LowRankDense | None:
    """The `LowRankDense` this strategy trains with: None without `lowrank`, else the dense
    kernels of `params` that are cheaper as factors over `rows` rows per client (local steps x
    batch size; `worthwhile_lowrank_layers`). `learning_rate`, `momentum`: the clients' SGD.

    Raises:
      ValueError: `lowrank` is set but no dense kernel of `params` is worth factoring.
    """
    if not self.lowrank:
      return None
    layers = worthwhile_lowrank_layers(params, rows)
    if not layers:
      raise ValueError(f"strategy {self.name!r}: no dense kernel of this model is cheaper as "
                       f"factors over {rows} rows per client")
    return LowRankDense(layers, learning_rate, momentum=momentum)

  @classmethod
  def from_name(cls, name: str) -> "Strategy":
    """Inverse of `name`, e.g. 'sequential+lax', 'vmap+im2col', 'chunked8+im2col',
    'sequential+tapgrad+unroll4', 'vmap+lax+lowrank', 'sequential+tapgrad+unroll4+sharded'."""
    parts = name.split("+")
    sharded = len(parts) > 2 and parts[-1] == "sharded"
    if sharded:
      parts = parts[:-1]
    lowrank = len(parts) > 2 and parts[-1] == "lowrank"
    if lowrank:
      parts = parts[:-1]
    unroll = 1
    if len(parts) == 3 and parts[2].startswith("unroll") and parts[2][6:].isdigit():
      unroll = int(parts[2][6:])
      parts = parts[:2]
    try:
      label, conv_impl = parts
    except ValueError:
      raise ValueError(f"strategy name {name!r} must look like 'sequential+lax', 'vmap+im2col', "
                       "'chunked8+im2col', 'sequential+tapgrad+unroll4' or "
                       "'sequential+tapgrad+unroll4+sharded'") from None
    if label == "vmap":
      execution = Vmap()
    elif label == "sequential":
      execution = Sequential()
    elif label.startswith("chunked") and label[7:].isdigit():
      execution = Chunked(int(label[7:]))
    else:
      raise ValueError(f"unknown execution {label!r} in strategy name {name!r}")
    return cls(execution, conv_impl, unroll, sharded, lowrank)


def candidate_strategies(*, cohort_size: int, has_conv: bool, backend: str | None = None,
                         max_vmap_clients_cpu: int = 16, unroll: int = 1,
                         lowrank: bool = False) -> list[Strategy]:
  """A short list of plausible strategies, pruned by what is known to be slow.

  With `lowrank=True` (the caller's workload allows `LowRankDense`: SGD-client dense
  FedAvg and a dense kernel worth factoring), '+lowrank' variants are added: on CPU of
  the sequential candidates before them (faster for the LEAF CNN on 2 cores, one
  client and eight: docs/results/engine.md, "Earlier: status at 2026-11-23, 06:57
  UTC"), on accelerators of every vectorised candidate.

  With `unroll` > 1 (e.g. `waste_free_unroll(data.num_examples, schedule)`), on CPU
  the first sequential candidate is also tried with that many local steps written
  out before the step loop: on 2 cores one client of the LEAF CNN and of an MLP ran
  faster so, but logistic regression slower (many tiny steps: XLA's thunk executor
  then pays its concurrency overhead per op), hence a candidate, not a default
  (docs/results/engine.md, "Earlier: status at 2026-11-23, 05:30 UTC", item 1).

  On CPU: vmap of lax convolutions (grouped convolutions, several times slower
  than a loop) is never tried, nor lax convolutions inside the in-graph loop
  (their gradients are one to two orders of magnitude slower in XLA:CPU loop
  bodies; timings in docs/results/engine.md; 'tapgrad' is
  the same convolution with loop-safe gradients), and full vmap only for small cohorts (its memory
  grows with the cohort); chunked im2col is tried at small chunk sizes.
  On accelerators: full vmap and chunks of 32/128 with both conv lowerings.
  """
  backend = backend or jax.default_backend()
  out: list[Strategy] = []
  if backend == "cpu":
    # 'lax' convolutions lose XLA:CPU's fast path inside loop bodies (their
    # gradients), so in-graph loops use 'tapgrad' (same values) or 'im2col'.
    out += [Strategy(Sequential(), impl) for impl in (("tapgrad", "im2col") if has_conv else ("lax",))]
    if unroll > 1:
      out.insert(1, dataclasses.replace(out[0], unroll=unroll))
    if lowrank:
      first = 2 if unroll > 1 else 1
      out[first:first] = [dataclasses.replace(s, lowrank=True) for s in out[:first]]
    if not has_conv:
      out.append(Strategy(Vmap(), "lax"))
      out += [Strategy(Chunked(c), "lax") for c in (8, 32) if c < cohort_size]
    else:
      if cohort_size <= max_vmap_clients_cpu:
        out.append(Strategy(Vmap(), "im2col"))
      out += [Strategy(Chunked(c), "im2col") for c in (2, 4) if c < cohort_size]
  else:
    impls = ("lax", "im2col") if has_conv else ("lax",)
    out += [Strategy(Vmap(), impl) for impl in impls]
    out += [Strategy(Chunked(c), impl) for c in (32, 128) if c < cohort_size for impl in impls]
    if lowrank:
      out += [dataclasses.replace(s, lowrank=True) for s in out]
    out.append(Strategy(Sequential(), "lax"))
  return out


def _device_tag() -> str:
  dev = jax.devices()[0]
  return f"{jax.default_backend()}:{getattr(dev, 'device_kind', 'unknown')}:{jax.device_count()}:jax{jax.__version__}"


def _read_cache(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return {}  # a missing or damaged cache only costs a re-calibration


def _write_cache(path: str, cache: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Atomic: a concurrent reader sees the old or the new file.
  _files.write_atomic(path, lambda f: json.dump(cache, f, indent=1, sort_keys=True))


def select_strategy(run_round_for: Callable[[Strategy], Callable[[], None]],
                    candidates: Sequence[Strategy], *, cache_path: str | None = None,
                    cache_key: str = "", repeats: int = 2,
                    log: Callable[[str], None] | None = None) -> tuple[Strategy, dict[str, float]]:
  """Times each candidate on a short round and returns the fastest.

  Every candidate is compiled first, then all are timed in turns.

  Args:
    run_round_for: `strategy -> run` where `run()` executes one short round with
      that strategy and blocks until it is done (compilation happens on the
      first call and is not timed).
    candidates: strategies to try (see `candidate_strategies`).
    cache_path: optional JSON file; a hit for (device, cache_key) skips timing.
    cache_key: describes the workload (model spec, cohort size, batch, steps).
    repeats: timed runs per candidate (median taken).
    log: optional callback for progress lines.

  Returns:
    (best strategy, {strategy name: median seconds per round}).
  """
  if not candidates:
    raise ValueError("no candidate strategies to choose from")
  full_key = f"{_device_tag()}|{cache_key}"
  if cache_path:
    hit = _read_cache(cache_path).get(full_key)
    if hit is not None:
      try:
        best, timings = Strategy.from_name(hit["best"]), dict(hit["timings"])
        if log:
          log(f"  cached choice for this workload: {best.name} (timed earlier; delete "
              f"{cache_path} to time again)")
        return best, timings
      except (KeyError, ValueError, TypeError):
        pass  # stale format: re-calibrate
  runs = []
  for strategy in candidates:
    run = run_round_for(strategy)
    run()  # compile + warm up
    runs.append(run)
  # Timed in turns (a, b, c, a, b, c): load that drifts during the calibration (a
  # shared machine) then slows every candidate alike instead of the unlucky one.
  times: list[list[float]] = [[] for _ in runs]
  for _ in range(max(1, repeats)):
    for i, run in enumerate(runs):
      start = time.perf_counter()
      run()
      times[i].append(time.perf_counter() - start)
  timings = {s.name: statistics.median(t) for s, t in zip(candidates, times)}
  if log:
    for name, seconds in timings.items():
      log(f"  strategy {name:36s} {seconds * 1e3:9.1f} ms/round")
  best_name = min(timings, key=timings.get)
  best = next(s for s in candidates if s.name == best_name)
  if cache_path:
    cache = _read_cache(cache_path)
    cache[full_key] = {"best": best_name, "timings": timings}
    _write_cache(cache_path, cache)
  return best, timings

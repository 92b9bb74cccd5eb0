"""Helpers shared by the benchmark scripts (timing, the matmul ceiling, results files).

Every script prints a table and writes one JSON file; every comparison it reports
is a ratio of two timings taken in the same process, because the machines these
run on (a shared 2-core CI box, a lent GPU) are noisy in absolute terms.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # run from a checkout without `pip install -e .`

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Matmul precisions a benchmark may run under (`jax.default_matmul_precision`):
# 'highest' = true f32, 'tensorfloat32' = TF32 tensor cores (GPU), 'bfloat16' = one
# bf16 pass; 'default' leaves JAX's own default (TF32-class on recent NVIDIA GPUs).
PRECISIONS = ("default", "highest", "tensorfloat32", "bfloat16")


def precision_scope(precision: str):
  """Context manager: trace (and so compile) under the given matmul precision."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  if precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def remat_apply(apply_fn: Callable, policy: Callable | None = None) -> Callable:
  """`apply_fn` under `jax.checkpoint`: fewer activations kept for the backward pass.

  With the default policy (`dots_with_no_batch_dims_saveable`) only matmul/conv
  outputs without batch dimensions are kept; elementwise ops (ReLU, BatchNorm,
  pooling) are recomputed in the backward pass. Values are identical to
  `apply_fn`'s; only memory and time change. Measured (benchmarks/memory.py):
  one checkpoint around the whole model saves nothing, since the backward pass
  recomputes the forward and holds all its residuals at once; it is kept as the
  knob the memory benchmark compares, until the models offer per-layer remat.
  """
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy is None else policy

  def apply(params, batch_stats, x, *, train, example_mask=None):
    # `train` is a Python bool (static); close over it instead of tracing it.
    inner = lambda p, s, xx, m: apply_fn(p, s, xx, train=train, example_mask=m)
    return jax.checkpoint(inner, policy=policy)(params, batch_stats, x, example_mask)

  return apply


def matmul_ceiling(n: int, repeats: int = 5, precision: str = "default", dtype=jnp.float32) -> float:
  """Best-of-`repeats` GFLOP/s of an n x n matmul in `dtype` (default f32): the device's
  practical ceiling for GEMMs of that dtype."""
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  with precision_scope(precision):
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
  ts = []
  now = clock()  # the same clock as the entries, so "% of ceiling" compares like with like
  for _ in range(repeats):
    t = now()
    jax.block_until_ready(f(a))
    ts.append(now() - t)
  return 2 * n ** 3 / min(ts) / 1e9


def default_ceiling_size(smoke: bool) -> int:
  if smoke:
    return 256
  return 2048 if jax.default_backend() == "cpu" else 8192


def clock() -> Callable[[], float]:
  """The timer: wall time, or this process's CPU time (all threads) when
  FEDJAX_BENCH_CLOCK=process -- on a CPU shared with other jobs, CPU time is far
  less disturbed by them than wall time (ratios between entries stay meaningful)."""
  return time.process_time if os.environ.get("FEDJAX_BENCH_CLOCK") == "process" else time.perf_counter


def time_call(fn: Callable[[], object], repeats: int, min_total_s: float = 0.3,
              max_calls: int = 2000) -> tuple[float, float]:
  """(first-call seconds incl. compile, median of the later calls).

  At least `repeats` later calls, and more (up to `max_calls`) until they took
  `min_total_s` in all: a sub-millisecond round timed 3 times gave medians 4x
  off (warm-up calls), while a few hundred calls give a stable median.
  """
  now = clock()
  t = now()
  jax.block_until_ready(fn())
  first = now() - t
  ts = []
  while len(ts) < max(1, repeats) or (sum(ts) < min_total_s and len(ts) < max_calls):
    t = now()
    jax.block_until_ready(fn())
    ts.append(now() - t)
  return first, statistics.median(ts)


def interleaved_medians(fns: list[Callable[[], object]], repeats: int, *, min_total_s: float = 0.0,
                        max_calls: int = 2000, burst_s: float = 0.0,
                        catch: bool = False) -> list[float | Exception]:
  """Median seconds of each (already compiled) fn, timed in turns: a, b, c, a, b, c, ...

  Taking turns makes the ratios robust to load that drifts during the run (a
  shared machine): every fn sees the same slow and fast moments.

  By default each fn is called `repeats` times, one call per turn. With
  `min_total_s`, a fn is called more often (up to `max_calls`) until its calls
  took that long in all, as `time_call` does for one fn: sub-millisecond rounds
  need hundreds of calls for a stable median. With `burst_s`, each turn runs a fn
  back to back for about that long (warm caches, as consecutive training rounds
  run) before the next fn's turn; a fn's turns are spread evenly over the run.
  With either, one call per fn first estimates its time (kept out of the median).

  With `catch`, a fn that raises is dropped from later turns and its entry in the
  result is the exception; otherwise the exception propagates.
  """
  now = clock()
  n = len(fns)
  ts: list[list[float]] = [[] for _ in fns]
  errors: list[Exception | None] = [None] * n

  def call(i):
    t = now()
    try:
      jax.block_until_ready(fns[i]())
    except Exception as e:  # noqa: BLE001 -- reported per fn when asked to
      if not catch:
        raise
      errors[i] = e
      return
    ts[i].append(now() - t)

  if min_total_s <= 0 and burst_s <= 0:
    plan = [(1, max(1, repeats))] * n  # (calls per turn, turns)
  else:
    plan = []
    for i in range(n):
      call(i)
      est = max(ts[i][0], 1e-6) if ts[i] else 1.0
      calls = min(max_calls, max(repeats, 1, math.ceil(min_total_s / est)))
      burst = max(1, min(calls, math.floor(burst_s / est))) if burst_s > 0 else 1
      plan.append((burst, math.ceil(calls / burst)))
      ts[i].clear()  # the estimate ran after another fn: not a warm round
  turns = max((t for _, t in plan), default=0)
  for turn in range(turns):
    for i, (burst, my_turns) in enumerate(plan):
      # fn i takes part in `my_turns` of the `turns`, evenly spread
      if errors[i] is None and (turn * my_turns) // turns != ((turn + 1) * my_turns) // turns:
        for _ in range(burst):
          call(i)
          if errors[i] is not None:
            break
  return [errors[i] if errors[i] is not None else statistics.median(ts[i]) for i in range(n)]


def fedavg_for(strategy, apply_fn, params, schedule, max_examples: int, lr: float = 0.01):
  """FedAvg with client SGD (lr) as `strategy` runs it: its step unrolling and, for a
  '+lowrank' strategy, the large dense kernels as factors over the clients' rows (steps x
  batch of a client with `max_examples`). Same rounds whichever strategy."""
  from fedjax_prune import federated  # imported where used, like asp_dense_and_pruned_specs
  schedule = strategy.schedule(schedule)
  rows = schedule.total_steps(max_examples) * schedule.batch_size
  return federated.fedavg(apply_fn, optax.sgd(lr), schedule,
                          lowrank=strategy.lowrank_dense(params, rows, lr))


def is_oom(exc: BaseException) -> bool:
  """True for an out-of-memory error from XLA (compile or run)."""
  text = f"{type(exc).__name__}: {exc}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def device_info() -> dict:
  """What ran the benchmark: backend, device kind and count, versions, host."""
  dev = jax.devices()[0]
  info = dict(backend=jax.default_backend(), device=str(getattr(dev, "device_kind", dev.platform)),
              device_count=jax.device_count(), process_count=jax.process_count(),
              num_cpus=os.cpu_count(), platform=platform.platform(), jax=jax.__version__,
              python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              clock="process CPU time" if clock() is time.process_time else "wall")
  limit = device_memory_limit()
  if limit:
    info["device_memory_bytes"] = limit
  return info


def device_memory_stats() -> dict:
  """`memory_stats()` of device 0 ({} where the backend has none, e.g. CPU)."""
  try:
    return dict(jax.devices()[0].memory_stats() or {})
  except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
    return {}


def device_memory_limit() -> int | None:
  return device_memory_stats().get("bytes_limit")


def out_path(name: str, smoke: bool, out: str = "", out_dir: str = "") -> str:
  """`out`, else `<out_dir or benchmarks/results>/<name>_<backend>[_smoke].json`."""
  if out:
    return out
  directory = out_dir or RESULTS_DIR
  return os.path.join(directory, f"{name}_{jax.default_backend()}{'_smoke' if smoke else ''}.json")


def write_json(path: str, result: dict) -> None:
  """Atomic write (a benchmark killed mid-way leaves the previous file intact)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1, default=float)
  os.replace(path + ".tmp", path)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
  """Prints rows as a fixed-width table; columns are (key, header, format)."""
  widths = [max(len(h), 8) for _, h, _ in columns]
  cells = []
  for row in rows:
    line = []
    for (key, _, fmt), _w in zip(columns, widths):
      value = row.get(key)
      line.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
    cells.append(line)
  widths = [max([w] + [len(c[i]) for c in cells]) for i, w in enumerate(widths)]
  print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
  for line in cells:
    print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def random_masks(params, density: float, key) -> dict:
  """Unstructured random masks keeping `density` of every kernel (biases/BN dense).

  Returned leaves are bool, full shape for kernels and scalar True otherwise
  (the broadcastable-mask convention of `fedjax_prune.masks`).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel" and density < 1.0:
      out.append(jax.random.bernoulli(jax.random.fold_in(key, i), density, leaf.shape))
    else:
      out.append(jnp.ones((), bool))
  return jax.tree.unflatten(treedef, out)


def asp_dense_and_pruned_specs(dense_widths: tuple, widths: str, summary: str):
  """(dense, pruned) ASP FEMNIST CNN specs: the pruned one from an ASP run's
  summary.json (its found architecture) when `summary` is set, else from `widths`
  ('4,6')."""
  import json

  from fedjax_prune import models, structured
  dense = models.asp_femnist_cnn(widths=dense_widths)
  if summary:
    with open(summary) as f:
      return dense, structured.spec_from_json(json.load(f)["spec"])
  return dense, models.asp_femnist_cnn(widths=tuple(int(w) for w in widths.split(",")))


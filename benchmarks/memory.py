"""Device memory per client vs the analytic floor, and the largest cohort that fits.

  python benchmarks/memory.py                                  # LEAF FEMNIST CNN, CPU: compile-time analysis
  python benchmarks/memory.py --model resnet18 --cohorts 8,32,128 --verify   # GPU: also run the largest
  python benchmarks/memory.py --smoke                          # tiny (CI)

What is measured. For each client-execution strategy and cohort size C the
round is compiled (not run) and XLA's buffer assignment is read
(`Compiled.memory_analysis()`: arguments, outputs, temporaries, and the peak
where the backend reports one). Memory per client is the slope of that peak
over C (a least-squares line through the cohorts), split into the client's
data (its slice of the on-device dataset) and training state (the rest). The
analytic floor is `accounting.training_memory(spec, batch)`: one client's
params + grads (+ optimizer slots) + all activations of one step, no XLA
fusion, no rematerialisation. Under `vmap` every client holds that at once,
so the slope should be about the floor; under `Sequential` the slope is the
data alone (one client trains at a time); `Chunked(k)` holds k at once.

Largest cohort that fits = (device memory - intercept) / slope. On GPU the
device memory is `jax.devices()[0].memory_stats()['bytes_limit']`, and with
`--verify` the predicted largest vmapped cohort (times 0.9) is actually run and
`peak_bytes_in_use` read back. On CPU there is no device memory_stats: the
limit used is the host's physical RAM (shared with everything else on the
machine), and only the compile-time numbers are measured -- said in the JSON.

`--remat` adds the same analysis with `jax.checkpoint` around the model
(`_common.remat_apply`), the knob that lets a larger vmapped cohort fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
from engine import make_data, model_specs  # noqa: E402
from fedjax_prune import accounting, federated, models, performance  # noqa: E402


def _strategies(backend: str, chunk: int, smoke: bool = False, has_conv: bool = True,
                lowrank: bool = False) -> list[performance.Strategy]:
  # On CPU, vmapped convs use im2col (lax convs would become grouped convs) and
  # in-graph loops 'tapgrad'; on accelerators XLA's own convolutions.
  vmap_impl, loop_impl = ("im2col", "tapgrad") if (backend == "cpu" and has_conv) else ("lax", "lax")
  out = [performance.Strategy(federated.Vmap(), vmap_impl),
         performance.Strategy(federated.Chunked(chunk), vmap_impl),
         performance.Strategy(federated.Sequential(), loop_impl)]
  out = [out[0], out[2]] if smoke else out  # smoke: the two ends, fewer compiles
  if lowrank:  # the same strategies with big dense kernels held as factors
    out += [dataclasses.replace(s, lowrank=True) for s in out]
  return out


def _build_round(spec, strategy, batch, remat, steps):
  apply_fn, params, batch_stats = models.build(spec, jax.random.key(0), conv_impl=strategy.conv_impl)
  if remat:
    apply_fn = _common.remat_apply(apply_fn)
  alg = _common.fedavg_for(strategy, apply_fn, params, federated.LocalSchedule(batch_size=batch),
                          steps * batch)
  state = alg.init(params, jax.random.key(1), batch_stats=batch_stats)
  return federated.make_round(alg, execution=strategy.execution, donate=True,
                              compiler_options=performance.round_compiler_options()), state


def compiled_memory(spec, strategy, cohort, steps, batch, remat=False) -> dict:
  """Compile-time memory of one round (bytes): arguments, outputs, temporaries, peak."""
  round_fn, state = _build_round(spec, strategy, batch, remat, steps)
  data = jax.eval_shape(lambda: make_data(spec, cohort, steps, batch, spec.num_classes))
  cohort_ids = federated.make_cohort(np.arange(cohort))
  t = time.perf_counter()
  compiled = round_fn.lower(state, data, cohort_ids, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - t
  ma = compiled.memory_analysis()
  get = lambda name: int(getattr(ma, name, 0) or 0) if ma is not None else 0
  arg, out, alias, temp = (get("argument_size_in_bytes"), get("output_size_in_bytes"),
                           get("alias_size_in_bytes"), get("temp_size_in_bytes"))
  # Everything the round's buffer assignment holds at once, at most (XLA:CPU's own
  # `peak_memory_in_bytes` leaves the temporaries out, so it is kept apart).
  peak = arg + out - alias + temp
  data_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(data))
  return dict(strategy=strategy.name, cohort=cohort, remat=remat, argument_bytes=arg, output_bytes=out,
              alias_bytes=alias, temp_bytes=temp, peak_bytes=peak, data_bytes=data_bytes,
              reported_peak_bytes=get("peak_memory_in_bytes"),
              compile_s=compile_s)


def _fit(xs, ys) -> tuple[float, float]:
  """(slope, intercept) of the least-squares line."""
  if len(xs) < 2:
    return float(ys[0]) / max(xs[0], 1), 0.0
  slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
  return float(slope), float(intercept)


def verify_run(spec, strategy, cohort, steps, batch, remat=False) -> dict:
  """Runs one round at `cohort` and reads the device's peak memory (GPU/TPU only)."""
  round_fn, state = _build_round(spec, strategy, batch, remat, steps)
  data = make_data(spec, cohort, steps, batch, spec.num_classes)
  state = jax.tree.map(jnp.copy, state)
  before = _common.device_memory_stats().get("peak_bytes_in_use")
  try:
    t = time.perf_counter()
    state, _ = round_fn(state, data, federated.make_cohort(np.arange(cohort)), jax.random.key(2))
    jax.block_until_ready(state)
    status, seconds = "ok", time.perf_counter() - t
  except Exception as e:  # noqa: BLE001 -- an OOM here is a result, not a crash
    status, seconds = ("oom" if _common.is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"), None
  stats = _common.device_memory_stats()
  return dict(strategy=strategy.name, cohort=cohort, remat=remat, status=status, first_call_s=seconds,
              peak_bytes_in_use=stats.get("peak_bytes_in_use"), peak_before=before,
              bytes_limit=stats.get("bytes_limit"))


def host_ram_bytes() -> int | None:
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="leaf_femnist_cnn", choices=("leaf_femnist_cnn", "resnet18", "mlp"))
  parser.add_argument("--cohorts", default="", help="default 2,4,8 (CPU), 8,32,128 (GPU)")
  parser.add_argument("--chunk", type=int, default=0, help="Chunked size (default 2 CPU, 16 GPU)")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--remat", action="store_true", help="also analyse with jax.checkpoint")
  parser.add_argument("--lowrank", action="store_true",
                      help="also analyse each strategy with big dense kernels as factors (+lowrank)")
  parser.add_argument("--verify", action="store_true", help="GPU: run the predicted largest vmapped cohort")
  parser.add_argument("--verify-max", type=int, default=2048, help="largest cohort a verifying run uses")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--out", default="")
  parser.add_argument("--out-dir", default="")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  spec = model_specs(args.smoke)[args.model]
  cohorts = [int(c) for c in args.cohorts.split(",")] if args.cohorts else (
      [2, 4, 8] if backend == "cpu" else [8, 32, 128])
  chunk = args.chunk or (2 if backend == "cpu" else 16)
  if args.smoke:
    cohorts, args.steps, args.batch, chunk = [2, 4], 2, 8, 2
  floor = accounting.training_memory(spec, args.batch)
  stats = _common.device_memory_stats()
  limit = stats.get("bytes_limit")
  limit_source = "device memory_stats()['bytes_limit']" if limit else "host physical RAM (CPU: no device memory_stats)"
  limit = limit or host_ram_bytes()
  rows, summary = [], []
  out = _common.out_path(f"memory_{args.model}", args.smoke, args.out, args.out_dir)
  result = dict(benchmark="memory", **_common.device_info(), model=args.model, spec=str(spec),
                steps=args.steps, batch=args.batch, chunk=chunk, memory_limit_bytes=limit,
                memory_limit_source=limit_source,
                measured="compile-time buffer assignment (Compiled.memory_analysis)",
                floor=floor._asdict(), rows=rows, summary=summary, verify=[],
                command="python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  for remat in ([False, True] if args.remat else [False]):
    # '+lowrank' variants only where some dense kernel is worth factoring (not the smoke model).
    lowrank = args.lowrank and bool(performance.worthwhile_lowrank_layers(
        models.param_shapes(spec)[0], args.steps * args.batch))
    for strategy in _strategies(backend, chunk, args.smoke, not isinstance(spec, models.MLPSpec),
                                lowrank):
      ms = [compiled_memory(spec, strategy, c, args.steps, args.batch, remat) for c in cohorts
            if not (isinstance(strategy.execution, federated.Chunked) and c % chunk)]
      rows += ms
      if not ms:
        continue
      xs = [m["cohort"] for m in ms]
      slope, intercept = _fit(xs, [m["peak_bytes"] for m in ms])
      data_slope = ms[0]["data_bytes"] / ms[0]["cohort"]
      train_slope = slope - data_slope
      fits = int((limit - intercept) // slope) if (limit and slope > 0) else None
      summary.append(dict(strategy=strategy.name, remat=remat, per_client_bytes=slope,
                          per_client_data_bytes=data_slope, per_client_train_bytes=train_slope,
                          intercept_bytes=intercept, floor_bytes_per_client=floor.total,
                          train_vs_floor=train_slope / floor.total, largest_cohort_that_fits=fits))
      _common.write_json(out, result)  # after every strategy: a run cut short keeps what it measured
  _common.write_json(out, result)  # before the verifying runs, which may be cut short
  if args.verify and backend != "cpu" and not args.smoke:
    result["measured"] += " + verifying runs' peak_bytes_in_use"
    plans = []
    for s in summary:
      if s["strategy"].startswith("vmap") and s["largest_cohort_that_fits"] and not s["remat"]:
        c = max(1, min(args.verify_max, int(0.9 * s["largest_cohort_that_fits"])))
        plans.append((s["intercept_bytes"] + s["per_client_bytes"] * c, c, s))
    # The device's peak_bytes_in_use is the process's maximum so far and cannot be reset: run
    # the smallest predicted peak first, so that each run's peak can exceed the earlier ones.
    for predicted, c, s in sorted(plans, key=lambda plan: plan[0]):
      strategy = performance.Strategy.from_name(s["strategy"])
      v = verify_run(spec, strategy, c, args.steps, args.batch, s["remat"])
      v["predicted_peak_bytes"] = predicted
      v["peak_is_an_earlier_runs"] = (v["peak_before"] is not None
                                      and v["peak_bytes_in_use"] == v["peak_before"])
      result["verify"].append(v)
      _common.write_json(out, result)
      peak = (f"peak not measured (an earlier run's {(v['peak_bytes_in_use'] or 0) / 2**30:.2f} GiB, "
              "the process's maximum, was not exceeded)" if v["peak_is_an_earlier_runs"] else
              f"peak {(v['peak_bytes_in_use'] or 0) / 2**30:.2f} GiB")
      print(f"verify {s['strategy']} remat={s['remat']} C={c}: {v['status']}, {peak} (predicted "
            f"{predicted / 2**30:.2f}) of {(v['bytes_limit'] or 0) / 2**30:.2f} GiB")
  print(f"backend={backend} device={result['device']} model={args.model} batch={args.batch} "
        f"steps={args.steps}; limit {limit / 2**30 if limit else 0:.1f} GiB ({limit_source})")
  print(f"analytic floor per client: {floor.total / 2**20:.1f} MiB "
        f"(params {floor.params / 2**20:.1f}, grads {floor.grads / 2**20:.1f}, "
        f"activations {floor.activations / 2**20:.1f})")
  _common.print_table(rows, [("strategy", "strategy", ""), ("remat", "remat", ""), ("cohort", "C", "d"),
                             ("peak_bytes", "peak bytes", ","), ("temp_bytes", "temp bytes", ","),
                             ("data_bytes", "data bytes", ","), ("compile_s", "compile s", ".1f")])
  print()
  _common.print_table([dict(s, per_client_mib=s["per_client_bytes"] / 2**20,
                            train_mib=s["per_client_train_bytes"] / 2**20) for s in summary],
                      [("strategy", "strategy", ""), ("remat", "remat", ""),
                       ("per_client_mib", "MiB/client", ".1f"), ("train_mib", "train MiB/client", ".1f"),
                       ("train_vs_floor", "train/floor", ".2f"),
                       ("largest_cohort_that_fits", "largest C", "")])
  _common.write_json(out, result)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()

"""Deployment of a structurally pruned model: latency, throughput, size, StableHLO export.

  python benchmarks/deploy.py                                  # ASP FEMNIST CNN [32,64] -> [17,43]
  python benchmarks/deploy.py --summary workdir/asp_femnist/summary.json   # the found architecture
  python benchmarks/deploy.py --smoke                          # tiny (CI)

The paper's Android claims (inference time -50 %, throughput x2: arXiv 2411.01759
and a summary of it) measured on this machine's CPU instead (the official code
has no Android code):

  * the pruned model is cut out of the dense one with `structured.shrink`
    (the largest-L1 filters of every conv, as many as the found architecture
    has), and its outputs are checked against the masked dense model;
  * latency: median (and min) seconds of one jitted inference call at batch 1;
    throughput: examples/s at batch 64 from the median (and the fastest) call;
    dense and pruned calls alternate, after a warm-up/compile call each, so a
    shared machine's load hits both alike;
  * serialised size: the params as msgpack (`flax.serialization.to_bytes`)
    and the exported program (`jax.export`, StableHLO, weights as arguments);
  * export round trip: export -> serialize -> deserialize -> call, outputs
    compared with the jitted model (max abs difference reported, must be 0 or
    float round-off) and the params msgpack round trip (must be exact).

Prints a table and writes benchmarks/results/deploy_<backend>[_smoke].json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import serialization  # noqa: E402

import _common  # noqa: E402
from fedjax_prune import accounting, models, structured  # noqa: E402
from fedjax_prune.pruning import auto_structured  # noqa: E402


def keep_for(dense_spec, params, small_spec) -> dict:
  """Largest-L1 filters of each group, as many as `small_spec` has (same group names)."""
  scores = structured.group_l1(dense_spec, params)
  widths = {g.name: g.width for g in structured.groups(small_spec)}
  return {g.name: auto_structured.top_keep(scores[g.name], widths[g.name])
          for g in structured.groups(dense_spec) if widths[g.name] < g.width}


def _interleaved(fns: dict, repeats: int) -> dict:
  """{name: (median s, min s)} of calls timed alternately (one shared, noisy machine:
  alternating keeps the load the same for both; the minimum is the least-disturbed call)."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile / warm up
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {name: (float(np.median(ts)), float(np.min(ts))) for name, ts in times.items()}


def artefacts(spec, params, batch_stats, x) -> dict:
  """Sizes and the export / serialisation round trips of one model."""
  apply_fn = models.make_apply(spec)
  infer = jax.jit(lambda p, s, x: apply_fn(p, s, x, train=False)[0])
  # StableHLO export: weights are arguments, so the artefact is the program only.
  exported = jax.export.export(infer)(params, batch_stats, x)
  try:
    blob = exported.serialize()
  except ImportError as e:  # jax.export serialization needs the optional flatbuffers package
    raise SystemExit(f"{e}: pip install flatbuffers") from None
  reloaded = jax.export.deserialize(blob)
  export_diff = float(jnp.max(jnp.abs(reloaded.call(params, batch_stats, x)
                                      - infer(params, batch_stats, x))))
  state = {"params": params, "batch_stats": batch_stats}
  params_blob = serialization.to_bytes(state)
  restored = serialization.from_bytes(state, params_blob)
  exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state),
                                                   jax.tree.leaves(restored)))
  return {"params": accounting.param_count(spec), "flops": accounting.flops(spec),
          "params_msgpack_bytes": len(params_blob), "stablehlo_bytes": len(blob),
          "export_max_abs_diff": export_diff, "params_roundtrip_exact": exact,
          "stablehlo_text_lines": exported.mlir_module().count("\n")}


def timings(models_: dict, *, repeats: int, throughput_batch: int) -> dict:
  """Latency at batch 1 and throughput at `throughput_batch`, dense and pruned interleaved."""
  fns = {}
  for name, (spec, params, stats) in models_.items():
    apply_fn = models.make_apply(spec)
    infer = jax.jit(lambda p, s, x, apply_fn=apply_fn: apply_fn(p, s, x, train=False)[0])
    x1 = jax.random.uniform(jax.random.key(1), (1,) + spec.input_shape)
    xb = jax.random.uniform(jax.random.key(2), (throughput_batch,) + spec.input_shape)
    fns[(name, 1)] = lambda infer=infer, p=params, s=stats, x=x1: infer(p, s, x)
    fns[(name, throughput_batch)] = lambda infer=infer, p=params, s=stats, x=xb: infer(p, s, x)
  t = _interleaved(fns, repeats)
  out = {}
  for name in models_:
    med1, min1 = t[(name, 1)]
    medb, minb = t[(name, throughput_batch)]
    out[name] = {"latency_b1_ms": 1e3 * med1, "latency_b1_ms_min": 1e3 * min1,
                 f"throughput_b{throughput_batch}_per_s": throughput_batch / medb,
                 f"throughput_b{throughput_batch}_per_s_best": throughput_batch / minb}
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="asp_femnist_cnn", choices=("asp_femnist_cnn",))
  p.add_argument("--dense-widths", default="32,64")
  p.add_argument("--widths", default="17,43", help="found architecture (official notebook, k=2.2)")
  p.add_argument("--summary", default="", help="an ASP run's summary.json: use its found spec")
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  dense_widths = tuple(int(w) for w in args.dense_widths.split(","))
  if args.smoke:
    dense_widths, args.repeats, args.batch = (8, 16), 3, 8
    args.widths = "4,6"
  dense, small = _common.asp_dense_and_pruned_specs(dense_widths, args.widths, args.summary)
  params, stats = models.init_params(dense, jax.random.key(0))
  keep = keep_for(dense, params, small)
  cut = structured.shrink(dense, params, keep, batch_stats=stats)
  if cut.spec != small:
    raise ValueError(f"the found architecture {small} is not a channel subset of {dense}")
  # Surgery contract on this model: pruned output == masked dense output.
  x = jax.random.uniform(jax.random.key(3), (8,) + dense.input_shape)
  masked = jax.tree.map(lambda w, m: jnp.where(m, w, 0.0), params, structured.keep_masks(dense, keep))
  want = models.make_apply(dense)(masked, stats, x, train=False)[0]
  got = models.make_apply(small)(cut.params, cut.batch_stats, x, train=False)[0]
  surgery_diff = float(jnp.max(jnp.abs(want - got)))
  both = {"dense": (dense, params, stats), "pruned": (small, cut.params, cut.batch_stats)}
  timed = timings(both, repeats=args.repeats, throughput_batch=args.batch)
  xb = jax.random.uniform(jax.random.key(2), (args.batch,) + dense.input_shape)
  rows = []
  for name, (spec, prm, st) in both.items():
    row = {"model": name, "widths": [c.features for c in spec.convs], **timed[name]}
    row.update(artefacts(spec, prm, st, xb))
    rows.append(row)
  d, s = rows
  tput = f"throughput_b{args.batch}_per_s"
  ratios = {"latency_ratio_pruned_over_dense": s["latency_b1_ms"] / d["latency_b1_ms"],
            "latency_ratio_min": s["latency_b1_ms_min"] / d["latency_b1_ms_min"],
            "throughput_ratio_pruned_over_dense": s[tput] / d[tput],
            "throughput_ratio_best": s[tput + "_best"] / d[tput + "_best"],
            "params_ratio": s["params"] / d["params"], "flops_ratio": s["flops"] / d["flops"],
            "msgpack_size_ratio": s["params_msgpack_bytes"] / d["params_msgpack_bytes"],
            "surgery_max_abs_diff": surgery_diff}
  _common.print_table(rows, [("model", "model", ""), ("params", "params", ","),
                             ("flops", "FLOPs", ","), ("latency_b1_ms", "lat b1 ms", ".3f"),
                             ("latency_b1_ms_min", "min ms", ".3f"),
                             (tput, f"ex/s b{args.batch}", ",.0f"),
                             (tput + "_best", "best ex/s", ",.0f"),
                             ("params_msgpack_bytes", "msgpack B", ","),
                             ("stablehlo_bytes", "StableHLO B", ","),
                             ("export_max_abs_diff", "export diff", ".1e"),
                             ("params_roundtrip_exact", "msgpack exact", "")])
  print(json.dumps(ratios, indent=1))
  result = {"device": _common.device_info(), "rows": rows, "ratios": ratios,
            "args": vars(args)}
  path = _common.out_path("deploy", args.smoke, args.out)
  _common.write_json(path, result)
  print(f"wrote {path}")
  if surgery_diff > 1e-5 or any(r["export_max_abs_diff"] > 1e-5 for r in rows) or not all(
      r["params_roundtrip_exact"] for r in rows):
    raise SystemExit("deployment check failed: outputs differ (see the table)")
  return result


if __name__ == "__main__":
  main()

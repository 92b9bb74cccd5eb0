"""Scaling: round time vs cohort size, and vs number of devices (weak scaling); JSON + PNG.

  python benchmarks/scaling.py                       # CPU: cohort sweep + 1,2,4,8 fake CPU devices
  python benchmarks/scaling.py --engine-json benchmarks/results/engine_gpu.json   # + engine panel
  python benchmarks/scaling.py --smoke               # tiny (CI)

Cohort sweep: one strategy (default `vmap+lax` on accelerators, `sequential+tapgrad`
on CPU), round time for C = 1, 2, 4, ...; on an accelerator it should grow
sub-linearly until the device is full (vectorised clients share the device),
on CPU about linearly (one client already fills the cores).

Weak scaling: `k` clients per device on D devices (cohort D*k, the round
sharded over a 1-D `('clients',)` mesh with `make_round(..., mesh=...)`), so
ideal weak scaling is a flat line. On CPU the devices are fake
(`--xla_force_host_platform_device_count=D`, one subprocess per D) and share
the machine's cores: on a 2-core box the time can only grow with D beyond 2;
this checks that the sharded program runs and what it costs, not hardware
scaling. On a multi-GPU/TPU host the same sweep runs in-process over real
devices; with one accelerator it is skipped (said in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import _common  # noqa: E402
from engine import make_data  # noqa: E402
from fedjax_prune import federated, models, performance  # noqa: E402


def spec_for(model: str, smoke: bool):
  if model == "leaf_femnist_cnn":
    return models.leaf_femnist_cnn() if not smoke else models.leaf_femnist_cnn(widths=(4, 8), dense_width=32)
  if model == "small_cnn":  # a narrow LEAF CNN: CPU sweeps in seconds
    return models.leaf_femnist_cnn(widths=(8, 16), dense_width=128)
  if model == "mlp":
    return models.mlp(input_shape=(28, 28, 1), hidden=(200, 200), num_classes=62)
  raise ValueError(f"unknown model {model!r}")


def default_strategy(spec) -> performance.Strategy:
  has_conv = not isinstance(spec, models.MLPSpec)
  if jax.default_backend() == "cpu":
    return performance.Strategy(federated.Sequential(), "tapgrad" if has_conv else "lax")
  return performance.Strategy(federated.Vmap(), "lax")


def round_time(spec, strategy, cohort, steps, batch, repeats, mesh=None) -> tuple[float, float]:
  apply_fn, params, batch_stats = models.build(spec, jax.random.key(0), conv_impl=strategy.conv_impl)
  alg = _common.fedavg_for(strategy, apply_fn, params, federated.LocalSchedule(batch_size=batch),
                          steps * batch)
  round_fn = federated.make_round(alg, execution=strategy.execution, mesh=mesh,
                                  compiler_options=performance.round_compiler_options())
  state = alg.init(params, jax.random.key(1), batch_stats=batch_stats)
  data = make_data(spec, cohort, steps, batch, spec.num_classes)
  if mesh is not None:
    # Replicate state and data over the mesh up front: the round returns the state
    # replicated, and a state that changed placement after round 1 would recompile.
    replicated = NamedSharding(mesh, P())
    state, data = jax.device_put((state, data), replicated)
  ids = federated.make_cohort(np.arange(cohort))
  holder = [state]
  key = jax.random.key(2)  # made once, outside the timed call

  def run():
    holder[0], _ = round_fn(holder[0], data, ids, key)
    return holder[0]

  return _common.time_call(run, repeats)


def cohort_sweep(spec, strategy, cohorts, steps, batch, repeats) -> list[dict]:
  rows = []
  for c in cohorts:
    try:
      first, t = round_time(spec, strategy, c, steps, batch, repeats)
      rows.append(dict(cohort=c, round_s=t, compile_s=first - t, per_client_s=t / c, status="ok"))
    except Exception as e:  # noqa: BLE001 -- the largest cohorts may not fit
      rows.append(dict(cohort=c, round_s=None, status="oom" if _common.is_oom(e) else f"error: {e}"[:200]))
      break
    print(f"cohort {c:5d}: {t * 1e3:9.1f} ms/round, {t / c * 1e3:8.2f} ms/client")
  return rows


def _worker(args) -> None:
  """Runs inside a subprocess with D fake devices; prints one JSON line."""
  spec = spec_for(args.model, args.smoke)
  strategy = default_strategy(spec) if args.strategy == "auto" else performance.Strategy.from_name(args.strategy)
  d = jax.device_count()
  mesh = federated.client_mesh(jax.devices()[:d])
  first, t = round_time(spec, strategy, d * args.per_device, args.steps, args.batch, args.repeats, mesh)
  print("RESULT " + json.dumps(dict(devices=d, cohort=d * args.per_device, round_s=t, compile_s=first - t)))


def weak_scaling_cpu(args, device_counts) -> list[dict]:
  rows = []
  for d in device_counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
           "--per-device", str(args.per_device), "--steps", str(args.steps), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--strategy", args.strategy] + (["--smoke"] if args.smoke else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      rows.append(dict(devices=d, status=f"error (exit {proc.returncode}): {proc.stderr[-300:]}"))
      continue
    row = json.loads(lines[-1][len("RESULT "):])
    row["status"] = "ok"
    rows.append(row)
    print(f"devices {d}: cohort {row['cohort']}, {row['round_s'] * 1e3:9.1f} ms/round")
  return rows


def weak_scaling_inprocess(args, spec, strategy, device_counts) -> list[dict]:
  rows = []
  for d in device_counts:
    if d > jax.device_count():
      break
    mesh = federated.client_mesh(jax.devices()[:d])
    first, t = round_time(spec, strategy, d * args.per_device, args.steps, args.batch, args.repeats, mesh)
    rows.append(dict(devices=d, cohort=d * args.per_device, round_s=t, compile_s=first - t, status="ok"))
  return rows


def plot(result: dict, path: str, engine_json: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  engine = None
  if engine_json and os.path.exists(engine_json):
    with open(engine_json) as f:
      engine = json.load(f)
  panels = 2 + (engine is not None)
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
  ax = axes[0]
  rows = [r for r in result["cohort_sweep"] if r.get("round_s")]
  if rows:
    cs = np.array([r["cohort"] for r in rows], float)
    ts = np.array([r["round_s"] for r in rows]) * 1e3
    ax.loglog(cs, ts, "o-", label=result["strategy"])
    ax.loglog(cs, ts[0] * cs / cs[0], "k--", lw=0.8, label="linear in C")
  ax.set_xlabel("cohort size C")
  ax.set_ylabel("ms / round")
  ax.set_title(f"round time vs cohort ({result['model']}, {result['device']})", fontsize=9)
  ax.legend(fontsize=8)
  ax = axes[1]
  rows = [r for r in result["weak_scaling"] if r.get("round_s")]
  if rows:
    ds = [r["devices"] for r in rows]
    ax.plot(ds, [r["round_s"] * 1e3 for r in rows], "o-", label=f"{result['per_device']} clients / device")
    ax.axhline(rows[0]["round_s"] * 1e3, color="k", ls="--", lw=0.8, label="ideal (flat)")
    ax.set_xticks(ds)
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, result.get("weak_scaling_note", "not run"), ha="center", va="center", wrap=True, fontsize=8)
  ax.set_xlabel("devices")
  ax.set_ylabel("ms / round")
  ax.set_title("weak scaling" + (" (fake CPU devices, shared cores)" if result["backend"] == "cpu" else ""),
               fontsize=9)
  if engine is not None:
    ax = axes[2]
    by = {}
    for r in engine["rows"]:
      if r.get("client_steps_per_s"):
        by.setdefault((r["model"], r["strategy"]), []).append((r["cohort"], r["client_steps_per_s"]))
    for (model, strat), pts in sorted(by.items()):
      pts.sort()
      ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-" if not strat.startswith("loop") else "x--",
                label=f"{model} {strat}", lw=1)
    ax.set_xlabel("cohort size C")
    ax.set_ylabel("client-steps / s")
    ax.set_title(f"engine throughput ({engine.get('device', '')})", fontsize=9)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="", help="leaf_femnist_cnn, small_cnn or mlp (default: "
                      "small_cnn on CPU, leaf_femnist_cnn on accelerators)")
  parser.add_argument("--cohorts", default="")
  parser.add_argument("--devices", default="1,2,4,8", help="device counts of the weak-scaling sweep")
  parser.add_argument("--per-device", type=int, default=4)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--strategy", default="auto")
  parser.add_argument("--no-weak", action="store_true", help="skip the weak-scaling sweep")
  parser.add_argument("--engine-json", default="", help="also plot this engine.py result")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--out", default="")
  parser.add_argument("--out-dir", default="")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  args.model = args.model or ("small_cnn" if backend == "cpu" else "leaf_femnist_cnn")
  if args.smoke:
    args.steps, args.batch, args.repeats, args.per_device = 2, 8, 1, 1
    args.model = "leaf_femnist_cnn"
  if args.worker:
    _worker(args)
    return None
  spec = spec_for(args.model, args.smoke)
  strategy = default_strategy(spec) if args.strategy == "auto" else performance.Strategy.from_name(args.strategy)
  cohorts = [int(c) for c in args.cohorts.split(",")] if args.cohorts else (
      [1, 2, 4, 8, 16] if backend == "cpu" else [8, 16, 32, 64, 128, 256, 512, 1024])
  device_counts = [int(d) for d in args.devices.split(",")]
  if args.smoke:
    cohorts, device_counts = [1, 2], [1, 2]
  print(f"backend={backend} device={_common.device_info()['device']} model={args.model} strategy={strategy.name}")
  sweep = cohort_sweep(spec, strategy, cohorts, args.steps, args.batch, args.repeats)
  note = ""
  if args.no_weak:
    weak, note = [], "skipped (--no-weak)"
  elif backend == "cpu":
    weak = weak_scaling_cpu(args, device_counts)
    note = "fake CPU devices sharing the host's cores (not hardware scaling)"
  elif jax.device_count() > 1:
    weak = weak_scaling_inprocess(args, spec, strategy, device_counts)
  else:
    weak, note = [], f"skipped: one {backend} device"
  result = dict(benchmark="scaling", **_common.device_info(), model=args.model, strategy=strategy.name,
                steps=args.steps, batch=args.batch, per_device=args.per_device, cohort_sweep=sweep,
                weak_scaling=weak, weak_scaling_note=note,
                command="python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  if sweep and sweep[0].get("round_s"):
    base = sweep[0]
    for r in sweep:
      if r.get("round_s"):
        # time growth / cohort growth: 1 = linear, < 1 = sub-linear (clients share the device)
        r["growth_vs_linear"] = (r["round_s"] / base["round_s"]) / (r["cohort"] / base["cohort"])
  ok = [r for r in weak if r.get("round_s")]
  for r in ok:
    r["weak_efficiency"] = ok[0]["round_s"] / r["round_s"]
  out = _common.out_path("scaling", args.smoke, args.out, args.out_dir)
  _common.write_json(out, result)
  png = os.path.splitext(out)[0] + ".png"
  plot(result, png, args.engine_json)
  _common.print_table(sweep, [("cohort", "C", "d"), ("round_s", "s/round", ".4f"),
                              ("growth_vs_linear", "growth/linear", ".2f")])
  if weak:
    _common.print_table(weak, [("devices", "devices", "d"), ("cohort", "C", ""), ("round_s", "s/round", ".4f"),
                               ("weak_efficiency", "efficiency", ".2f"), ("status", "status", "")])
  print(f"wrote {out} and {png}")
  return result


if __name__ == "__main__":
  main()

"""Engine throughput: every client-execution strategy vs a Python loop of jitted steps.

Prints a table and writes JSON. All ratios come from one run on one machine.

  python benchmarks/engine.py                       # LEAF FEMNIST CNN + MLP, cohorts 1,8,32,128
  python benchmarks/engine.py --smoke               # tiny shapes, seconds (CI)
  python benchmarks/engine.py --cohorts 8,32,128,512 --model leaf_femnist_cnn   # GPU

Workload: FedAvg, plain SGD (lr 0.01), batch B, S local steps per client on
random data (every step real), one round = all cohort clients + aggregation.
The per-client loop baseline is what the papers' code does: for each client,
copy the server model and call a jitted SGD step S times from Python (data
already on device and pre-sliced, so the loop pays only dispatch), then
average; it is run with both conv lowerings and the faster one is the baseline.
Achieved GFLOP/s = 3 x forward FLOPs (accounting.training_flops) / time, next
to a large f32 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fedjax_prune import accounting, federated, models  # noqa: E402
from fedjax_prune.data import ClientData  # noqa: E402


def matmul_ceiling(n: int, repeats: int = 5) -> float:
  """GFLOP/s of an n x n f32 matmul (the machine's practical ceiling)."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter(); jax.block_until_ready(f(a)); ts.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(ts) / 1e9


def _time(fn, repeats: int) -> float:
  fn()  # compile / warm up
  ts = []
  for _ in range(repeats):
    t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def make_data(spec, cohort: int, steps: int, batch: int, num_classes: int) -> ClientData:
  n = steps * batch
  x = jax.random.uniform(jax.random.key(1), (cohort, n) + tuple(spec.input_shape))
  y = jax.random.randint(jax.random.key(2), (cohort, n), 0, num_classes)
  return ClientData(x, y, jnp.full((cohort,), n, jnp.int32))


def loop_round_time(spec, params, data: ClientData, steps: int, batch: int, conv_impl: str,
                    repeats: int) -> float:
  apply_fn = models.make_apply(spec, conv_impl=conv_impl)
  opt = optax.sgd(0.01)

  @jax.jit
  def step(p, o, x, y):
    def loss(p):
      logits, _ = apply_fn(p, {}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    g = jax.grad(loss)(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  scale = jax.jit(lambda a, s: jax.tree.map(lambda x: x * s, a))
  cohort = data.x.shape[0]
  batches = [[(data.x[c, s * batch:(s + 1) * batch], data.y[c, s * batch:(s + 1) * batch])
              for s in range(steps)] for c in range(cohort)]
  jax.block_until_ready(batches)

  def run():
    total = None
    for c in range(cohort):
      p, o = params, opt.init(params)
      for x, y in batches[c]:
        p, o = step(p, o, x, y)
      total = p if total is None else add(total, p)
    jax.block_until_ready(scale(total, 1.0 / cohort))

  return _time(run, repeats)


def flax_linen_loop_round_time(data: ClientData, steps: int, batch: int, repeats: int) -> float:
  """The PERFORMANCE.md reference: a jitted flax.linen LEAF CNN step (nn.Conv +
  nn.max_pool) called from a Python loop over clients, as a user would write it."""
  import flax.linen as nn

  class LeafCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.max_pool(nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
      x = nn.max_pool(nn.relu(nn.Conv(64, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
      x = nn.relu(nn.Dense(2048)(x.reshape(x.shape[0], -1)))
      return nn.Dense(62)(x)

  model = LeafCNN()
  params = model.init(jax.random.key(0), data.x[0, :batch])
  opt = optax.sgd(0.01)

  @jax.jit
  def step(p, o, x, y):
    g = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y)))(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  batches = [[(data.x[c, s * batch:(s + 1) * batch], data.y[c, s * batch:(s + 1) * batch])
              for s in range(steps)] for c in range(data.x.shape[0])]

  def run():
    total = None
    for client_batches in batches:
      p, o = params, opt.init(params)
      for x, y in client_batches:
        p, o = step(p, o, x, y)
      total = p if total is None else add(total, p)
    jax.block_until_ready(total)

  return _time(run, repeats)


def engine_round_time(spec, params, data, steps, batch, strategy, repeats) -> float:
  apply_fn = models.make_apply(spec, conv_impl=strategy.conv_impl)
  alg = federated.fedavg(apply_fn, optax.sgd(0.01), federated.LocalSchedule(batch_size=batch))
  round_fn = federated.make_round(alg, execution=strategy.execution)
  state = alg.init(params, jax.random.key(0))
  cohort = federated.make_cohort(np.arange(data.x.shape[0]))
  return _time(lambda: jax.block_until_ready(round_fn(state, data, cohort, jax.random.key(3))), repeats)


def bench_model(name, spec, cohorts, steps, batch, repeats, num_classes, log):
  _, params, _ = models.build(spec, jax.random.key(0))
  step_flops = accounting.training_flops(spec, batch)
  rows = []
  for cohort in cohorts:
    data = make_data(spec, cohort, steps, batch, num_classes)
    client_steps = cohort * steps
    has_conv = not isinstance(spec, models.MLPSpec)
    entries = {}
    for impl in (("lax", "im2col", "tapgrad") if has_conv else ("lax",)):
      entries[f"loop+{impl}"] = loop_round_time(spec, params, data, steps, batch, impl, repeats)
    if name == "leaf_femnist_cnn" and spec == models.leaf_femnist_cnn():
      entries["loop_flax_linen_ref"] = flax_linen_loop_round_time(data, steps, batch, repeats)
    for strategy in federated.candidate_strategies(cohort_size=cohort, has_conv=has_conv):
      entries[strategy.name] = engine_round_time(spec, params, data, steps, batch, strategy, repeats)
    loop_best = min(v for k, v in entries.items() if k.startswith("loop+"))
    flax_ref = entries.get("loop_flax_linen_ref")
    engine_best_name = min((k for k in entries if not k.startswith("loop")), key=entries.get)
    for k, t in entries.items():
      row = dict(model=name, cohort=cohort, strategy=k, round_s=t, client_steps_per_s=client_steps / t,
                 gflops=step_flops * client_steps / t / 1e9, speedup_vs_best_loop=loop_best / t,
                 speedup_vs_flax_linen_loop=(flax_ref / t) if flax_ref else None,
                 best_engine=(k == engine_best_name))
      rows.append(row)
      log(f"{name:18s} {cohort:5d} {k:20s} {t * 1e3:10.1f} {client_steps / t:12.1f} "
          f"{row['gflops']:8.1f} {row['speedup_vs_best_loop']:7.2f}{'  *' if row['best_engine'] else ''}")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="leaf_femnist_cnn,mlp,logistic")
  parser.add_argument("--cohorts", default="")
  parser.add_argument("--steps", type=int, default=4, help="local steps per client")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes for CI")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  cohorts = [int(c) for c in args.cohorts.split(",")] if args.cohorts else (
      [1, 8, 32, 128, 512] if backend != "cpu" else [1, 8, 32, 128])
  if args.smoke:
    cohorts, args.steps, args.batch, args.repeats = [2], 2, 8, 1
  specs = {
      "leaf_femnist_cnn": models.leaf_femnist_cnn() if not args.smoke else models.leaf_femnist_cnn(widths=(4, 8), dense_width=32),
      "mlp": models.mlp(input_shape=(28, 28, 1), hidden=(200, 200), num_classes=62),
      # Dispatch-bound: FedProx Synthetic-sized logistic regression (60 features, 10 classes).
      "logistic": models.mlp(input_shape=(60,), hidden=(), num_classes=10),
  }
  ceiling = matmul_ceiling(2048 if backend == "cpu" and not args.smoke else (256 if args.smoke else 8192))
  print(f"backend={backend} devices={jax.devices()} jax={jax.__version__}")
  print(f"matmul ceiling: {ceiling:.1f} GFLOP/s (f32)")
  print(f"{'model':18s} {'C':>5s} {'strategy':20s} {'ms/round':>10s} {'cl-steps/s':>12s} {'GFLOP/s':>8s} {'vs loop':>7s}")
  rows = []
  for name in args.models.split(","):
    rows += bench_model(name, specs[name], cohorts, args.steps, args.batch, args.repeats,
                        specs[name].num_classes, print)
  result = dict(
      benchmark="engine", date=time.strftime("%Y-%m-%d"), backend=backend,
      device=str(jax.devices()[0].device_kind), num_cpus=os.cpu_count(), platform=platform.platform(),
      jax=jax.__version__, steps=args.steps, batch=args.batch, matmul_ceiling_gflops=ceiling,
      command="python benchmarks/engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
      rows=rows)
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"engine_{backend}{'_smoke' if args.smoke else ''}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(out + ".tmp", out)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()

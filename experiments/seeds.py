"""Vectorised seed sweep: K seeds of one FedAvg-family config as ONE compiled program.

  python -m experiments.seeds --config experiments/configs/fedavg_tiny.py \
      --workdir /tmp/seeds --seeds=0,1,2,3

Seed `s` is the run `seed_config(config, s)`: the init, sampling and training
seeds shifted by `s * SEED_STRIDE` (seed 0 = the config as is); the data seed
is kept, so the seeds share one dataset and the spread measures training
randomness (init, cohorts, local shuffling). The server states of the K seeds
are stacked along a leading seed axis and the jitted round is
`vmap(round_fn, in_axes=(0, None, 0, 0))` over (state, -, cohort, round key):
the dataset is shared, each seed samples its own cohort (host side, from its
own (seed, round)) and derives its own keys; evaluation is vmapped the same way.
Per-round metrics come to the host once per round for all seeds.

The per-seed results equal K separate `train_and_evaluate` runs (unsharded) up
to float rounding: batching the seed axis changes the shapes XLA compiles
(batched matmuls, fused reductions), which may reorder float sums.

Writes `<workdir>/seed_<s>/{metrics.jsonl,summary.json}` (readable by
`experiments.plot`) and `<workdir>/seeds_summary.json` with mean and std.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import build, runtime
from fedjax_prune import accounting, federated, models, performance
from fedjax_prune import data as data_lib

SEED_STRIDE = 1000
REPORTED = ("test_accuracy", "test_loss", "local_accuracy_mean", "local_accuracy_p10")


def seed_config(config, seed: int):
  """The config of seed `seed` (init/sampling/training seeds shifted by seed * SEED_STRIDE)."""
  c = copy.deepcopy(config)
  for stream in ("init", "sampling", "training"):
    c.seeds[stream] = config.seeds[stream] + SEED_STRIDE * int(seed)
  return c


def validate(config, seeds) -> None:
  """Checks what the vectorised sweep supports; raises ConfigError naming the problem."""
  build.validate(config)
  if config.get("method", "fedavg") != "fedavg":
    raise build.ConfigError(f"config.method={config.method!r}: the vectorised seed sweep runs the "
                            "FedAvg family only (run other methods with experiments.sweep)")
  if config.get("prune_density", 1.0) != 1.0:
    raise build.ConfigError("config.prune_density < 1: the vectorised seed sweep runs dense models "
                            "only (pruning changes masks' shapes mid-run)")
  seeds = list(seeds)
  if not seeds:
    raise build.ConfigError("no seeds given: pass at least one seed, e.g. --seeds=0,1,2,3")
  if any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in seeds):
    raise build.ConfigError(f"seeds={seeds!r} is invalid: allowed non-negative integers")
  if len(set(seeds)) != len(seeds):
    raise build.ConfigError(f"seeds={seeds!r} repeats a seed")


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def run_seeds(config, seeds, workdir: str | None = None, *, log=print) -> dict:
  """Runs `seeds` of `config` as one vmapped program; returns per-seed results and mean/std.

  Args:
    config: a FedAvg-family config (dense model).
    seeds: distinct non-negative ints (see `seed_config`).
    workdir: optional output directory (see the module docstring).

  Returns:
    {"seeds", "per_seed": [{seed, <metric>: value}], "mean": {...}, "std": {...},
     "wall_time_s", "params": host params stacked [K, ...], "rounds"}.
  """
  seeds = [int(s) for s in seeds]
  validate(config, seeds)
  configs = [seed_config(config, s) for s in seeds]
  data = build.build_data(config)
  if config.clients_per_round > data.train.num_clients:
    raise build.ConfigError(f"config.clients_per_round={config.clients_per_round} exceeds the "
                            f"dataset's {data.train.num_clients} clients")
  spec = build.build_spec(config, data.input_shape, data.num_classes)
  if config.strategy != "auto":
    strategy_name = config.strategy
  else:  # no calibration here: the seed axis is vmapped anyway, so vmap the clients too
    strategy_name = "vmap+im2col" if build.has_conv(spec) else "vmap+lax"
  strategy = performance.Strategy.from_name(strategy_name)
  apply_fn = build.build_apply(spec, data.normalize, strategy.conv_impl, build.compute_dtype(config))
  alg = build.build_algorithm(config, apply_fn)

  states = []
  for c in configs:
    _, params, batch_stats = models.build(spec, jax.random.key(c.seeds.init))
    states.append(alg.init(jax.tree.map(jnp.copy, params), jax.random.key(c.seeds.init),
                           batch_stats=batch_stats))
  state_K = _stack(states)
  del states
  train_roots_K = jnp.stack([jax.random.key(c.seeds.training) for c in configs])
  if not build.evaluates_per_example(config):  # static BN: each client's own batches
    central = jax.jit(jax.vmap(federated.make_evaluate(apply_fn, batch_size=config.eval_batch_size),
                               in_axes=(0, 0, None, None)))
    per_client = jax.jit(jax.vmap(
        federated.make_evaluate_clients(apply_fn, batch_size=config.eval_batch_size),
        in_axes=(0, 0, None)))
    central_and_local = lambda params, stats: (
        central(params, stats, data.test_x, data.test_y),
        per_client(params, stats, data.test_clients))
  else:  # one pass over the pooled test set (as `runtime.make_evaluator`)
    pooled = jax.jit(jax.vmap(functools.partial(
        federated.make_evaluate_pooled_clients(apply_fn, batch_size=config.eval_batch_size),
        num_clients=int(data.test_clients.num_examples.shape[0])), in_axes=(0, 0, None, None, None)))
    central_and_local = lambda params, stats: pooled(params, stats, data.test_x, data.test_y,
                                                     data.test_client_ids)

  def evaluate(state) -> list[dict]:
    c, local = central_and_local(state.params, state.batch_stats)
    c = jax.device_get(c)
    n = np.asarray(local.num_examples)
    correct = np.asarray(local.correct_sum)
    out = []
    for k in range(len(seeds)):
      has = n[k] > 0
      acc = correct[k][has] / n[k][has]
      out.append({"test_accuracy": float(c.correct_sum[k] / c.num_examples[k]),
                  "test_loss": float(c.loss_sum[k] / c.num_examples[k]),
                  "local_accuracy_mean": float(acc.mean()),
                  "local_accuracy_p10": float(np.percentile(acc, 10))})
    return out

  sizes = {"params": accounting.param_count(spec), "flops": accounting.flops(spec)}
  # The K seeds as one Method over a stacked server state: the library's round loop
  # (`federated.run_rounds`) runs the vmapped round, one cohort and round key per seed.
  method = federated.Method(
      init=lambda: federated.MethodState(state_K, spec, {}), algorithm=lambda spec: alg,
      evaluator=lambda spec: lambda state, round_idx: {},
      record=lambda before, after, round_idx, metrics: dict(sizes))

  def compile_round(alg):
    round_fn = federated.make_round(alg, execution=strategy.execution)  # vmap traces through
    return jax.jit(jax.vmap(round_fn, in_axes=(0, None, 0, 0)), donate_argnums=(0,),
                   compiler_options=performance.round_compiler_options())

  num_clients = data.train.num_clients
  cohorts_K = lambda round_idx: _stack([federated.make_cohort(data_lib.sample_uniform(
      num_clients, config.clients_per_round, c.seeds.sampling, round_idx)) for c in configs])
  writers = []
  if workdir is not None:
    for s in seeds:
      os.makedirs(os.path.join(workdir, f"seed_{s}"), exist_ok=True)
      path = os.path.join(workdir, f"seed_{s}", "metrics.jsonl")
      if os.path.exists(path):
        os.remove(path)
      writers.append(runtime.MetricsWriter(path))
  start = time.perf_counter()
  last: list[dict] = [{} for _ in seeds]
  state = method.init()
  try:
    rounds = federated.run_rounds(
        method, state, train=data.train, cohort_fn=cohorts_K, train_root=train_roots_K,
        init_key=jax.random.key(config.seeds.init), rounds=range(config.rounds),
        compile_round=compile_round, key_fn=jax.jit(jax.vmap(federated.round_key, in_axes=(0, None))))
    for round_idx, state, record in rounds:
      evaluated = (round_idx + 1) % config.eval_every == 0 or round_idx + 1 == config.rounds
      evals = evaluate(state.server) if evaluated else None
      wall = time.perf_counter() - start
      for k, s in enumerate(seeds):
        seed_record = {name: (v[k] if isinstance(v, list) else v) for name, v in record.items()}
        seed_record.update(round=round_idx + 1, wall_time=wall)
        if evals is not None:
          last[k] = evals[k]
          seed_record.update(evals[k])
        if writers:
          writers[k].write(seed_record)
    state_K = state.server
    jax.block_until_ready(state_K)
  finally:
    for w in writers:
      w.close()
  wall = time.perf_counter() - start
  per_seed = [{"seed": s, **last[k]} for k, s in enumerate(seeds)]
  mean = {m: float(np.mean([r[m] for r in per_seed])) for m in REPORTED}
  std = {m: float(np.std([r[m] for r in per_seed], ddof=1)) if len(seeds) > 1 else 0.0
         for m in REPORTED}
  result = {"seeds": seeds, "rounds": config.rounds, "per_seed": per_seed, "mean": mean, "std": std,
            "wall_time_s": wall, "strategy": strategy.name, **sizes}
  if workdir is not None:
    runtime.write_json_atomic(os.path.join(workdir, "seeds_summary.json"), result)
    for k, s in enumerate(seeds):
      runtime.write_json_atomic(os.path.join(workdir, f"seed_{s}", "summary.json"),
                                {"method": "fedavg", "seed": s, "rounds": config.rounds, **sizes,
                                 **last[k]})
  log(f"{len(seeds)} seeds x {config.rounds} rounds in {wall:.1f}s: test accuracy "
      f"{mean['test_accuracy']:.4f} ± {std['test_accuracy']:.4f} (mean ± std over seeds)")
  result["params_K"] = jax.device_get(state_K.params)
  return result


def compare_with_separate_runs(config, seeds, result: dict, workdir: str, *, log=print) -> dict:
  """Runs each seed as its own `train_and_evaluate` run; compares params and metrics.

  Returns {"separate_wall_time_s", "max_abs_param_diff", "bitwise_params", "max_abs_metric_diff"}.
  """
  from experiments import train
  from fedjax_prune import checkpoint

  start = time.perf_counter()
  param_diff, metric_diff, bitwise = 0.0, 0.0, True
  for k, s in enumerate(seeds):
    run_dir = os.path.join(workdir, "separate", f"seed_{s}")
    c = seed_config(config, s)
    c.checkpoint_every = max(c.get("checkpoint_every", 0), 1)  # the final params, to compare
    summary = train.train_and_evaluate(c, run_dir, overwrite=True)
    _, arrays, _ = checkpoint.read_arrays(os.path.join(run_dir, train.CHECKPOINT_DIR))
    flat = jax.tree_util.tree_flatten_with_path(result["params_K"])[0]
    for path, stacked in flat:
      separate = arrays[".params" + jax.tree_util.keystr(path)]
      vectorised = np.asarray(stacked[k])
      bitwise &= separate.tobytes() == vectorised.tobytes()
      param_diff = max(param_diff, float(np.max(np.abs(separate - vectorised))))
    for m in REPORTED:
      metric_diff = max(metric_diff, abs(summary[m] - result["per_seed"][k][m]))
  out = {"separate_wall_time_s": time.perf_counter() - start, "max_abs_param_diff": param_diff,
         "bitwise_params": bool(bitwise), "max_abs_metric_diff": metric_diff}
  log(f"{len(seeds)} separate runs in {out['separate_wall_time_s']:.1f}s (vectorised: "
      f"{result['wall_time_s']:.1f}s); params bitwise equal: {bitwise}, max |diff| {param_diff:.3g}; "
      f"max metric |diff| {metric_diff:.3g}")
  return out


def main(argv):
  from absl import app, flags, logging
  del argv
  logging.set_verbosity(logging.WARNING)
  seeds = [int(s) for s in flags.FLAGS.seeds.split(",") if s.strip()]
  config = flags.FLAGS.config
  start = time.perf_counter()
  result = run_seeds(config, seeds, flags.FLAGS.workdir)
  print(f"vectorised total (incl. data and compile): {time.perf_counter() - start:.1f}s")
  for row in result["per_seed"]:
    print(json.dumps(row))
  if flags.FLAGS.compare_separate:
    if not flags.FLAGS.workdir:
      raise app.UsageError("--compare_separate needs --workdir")
    compare_with_separate_runs(config, seeds, result, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "FedAvg-family config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (optional).")
  flags.DEFINE_string("seeds", "0,1,2,3", "Comma-separated seeds.")
  flags.DEFINE_bool("compare_separate", False, "Also run each seed separately and compare.")
  flags.mark_flags_as_required(["config"])
  app.run(main)

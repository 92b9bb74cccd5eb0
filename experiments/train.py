"""train_and_evaluate(config, workdir): the experiment loop (importable from Colab).

Writes to `workdir`:
  config.json     the resolved config (a workdir holding another config is refused
                  unless overwrite=True)
  metrics.jsonl   one JSON object per round (train metrics, wall time; eval
                  metrics every `eval_every` rounds)
  summary.json    final metrics, model size/FLOPs, chosen strategy and timings
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import build
from fedjax_prune import accounting, federated
from fedjax_prune import data as data_lib
from fedjax_prune import models


def _write_json_atomic(path: str, obj: Any) -> None:
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=_jsonable)
  os.replace(tmp, path)


def _jsonable(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def prepare_workdir(config, workdir: str, overwrite: bool) -> None:
  """Creates workdir; refuses one that holds a different config unless overwrite."""
  config_json = json.loads(config.to_json_best_effort())
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path) and not overwrite:
    with open(path) as f:
      try:
        existing = json.load(f)
      except json.JSONDecodeError:
        existing = None
    if existing != config_json:
      raise FileExistsError(f"workdir {workdir!r} holds a run with a different config; "
                            "choose another workdir or pass --overwrite")
  try:
    os.makedirs(workdir, exist_ok=True)
    _write_json_atomic(path, config_json)
  except OSError as e:
    raise OSError(f"cannot write to workdir {workdir!r}: {e.strerror or e}") from e
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    os.remove(metrics_path)


def choose_strategy(config, spec, data: build.Data, params, batch_stats, cohort, mesh, log):
  """'auto': time a 2-step round of each candidate (cached); else parse the name."""
  if config.strategy != "auto":
    return federated.Strategy.from_name(config.strategy), {}
  c = config.client
  short = federated.LocalSchedule(batch_size=c.batch_size, num_steps=2)

  def run_round_for(strategy):
    apply_fn = build.build_apply(spec, data.normalize, strategy.conv_impl)
    alg = build.build_algorithm(config, apply_fn, schedule=short)
    round_fn = federated.make_round(alg, execution=strategy.execution, mesh=mesh)
    state = alg.init(params, jax.random.key(0), batch_stats=batch_stats)

    def run():
      jax.block_until_ready(round_fn(state, data.train, cohort, jax.random.key(1)))

    return run

  candidates = federated.candidate_strategies(cohort_size=len(cohort.client_ids),
                                              has_conv=build.has_conv(spec))
  cache_path = config.strategy_cache or build.default_strategy_cache()
  key = f"{spec!r}|C={len(cohort.client_ids)}|B={c.batch_size}|E={data.train.max_examples}"
  log(f"calibrating client execution over {len(candidates)} strategies (cached in {cache_path})")
  return federated.select_strategy(run_round_for, candidates, cache_path=cache_path,
                                   cache_key=key, log=log)


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False) -> dict:
  """Runs federated training as configured; returns the final summary dict."""
  build.validate(config)
  prepare_workdir(config, workdir, overwrite)
  log = print
  data = build.build_data(config)
  spec = build.build_spec(config, data.input_shape, data.num_classes)
  _, params, batch_stats = models.build(spec, jax.random.key(config.seeds.init))
  num_devices = jax.local_device_count()
  mesh = federated.client_mesh() if (config.shard_clients and num_devices > 1) else None
  multiple = num_devices if mesh is not None else 1
  num_clients = data.train.num_clients
  if config.clients_per_round > num_clients:
    raise build.ConfigError(f"config.clients_per_round={config.clients_per_round} exceeds the "
                            f"dataset's {num_clients} clients: allowed [1, {num_clients}]")

  def cohort_for(round_idx):
    ids = data_lib.sample_uniform(num_clients, config.clients_per_round, config.seeds.sampling, round_idx)
    return federated.make_cohort(ids, multiple=multiple)

  strategy, timings = choose_strategy(config, spec, data, params, batch_stats, cohort_for(0), mesh, log)
  log(f"client execution: {strategy.name}")
  apply_fn = build.build_apply(spec, data.normalize, strategy.conv_impl)
  alg = build.build_algorithm(config, apply_fn)
  round_fn = federated.make_round(alg, execution=strategy.execution, mesh=mesh, donate=True)
  evaluate = jax.jit(federated.make_evaluate(apply_fn, batch_size=config.eval_batch_size))
  evaluate_clients = jax.jit(federated.make_evaluate_clients(apply_fn, batch_size=config.eval_batch_size))
  state = alg.init(jax.tree.map(jnp.copy, params), jax.random.key(config.seeds.init),
                   batch_stats=batch_stats)
  train_root = jax.random.key(config.seeds.training)

  def run_eval(state) -> dict:
    central = evaluate(state.params, state.batch_stats, data.test_x, data.test_y).means()
    local = evaluate_clients(state.params, state.batch_stats, data.test_clients)
    local_acc = np.asarray(local.correct_sum) / np.maximum(np.asarray(local.num_examples), 1)
    return {"test_accuracy": float(central["accuracy"]), "test_loss": float(central["loss"]),
            "local_accuracy_mean": float(local_acc.mean()),
            "local_accuracy_p10": float(np.percentile(local_acc, 10))}

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  progress = _progress(config.rounds, config.progress)
  start = time.perf_counter()
  last_eval: dict = {}
  with open(metrics_path, "a") as metrics_file:
    for round_idx in range(config.rounds):
      state, metrics = round_fn(state, data.train, cohort_for(round_idx),
                                federated.round_key(train_root, round_idx))
      record = {k: float(v) for k, v in jax.device_get(metrics).items()}
      record.update(round=round_idx + 1, wall_time=time.perf_counter() - start)
      if not record.pop("finite"):
        metrics_file.write(json.dumps(record) + "\n")
        raise FloatingPointError(
            f"training diverged at round {round_idx + 1}: the loss or the parameters are not finite "
            f"(train_loss={record['train_loss']}); lower config.client.learning_rate "
            f"(now {config.client.learning_rate})")
      if (round_idx + 1) % config.eval_every == 0 or round_idx + 1 == config.rounds:
        last_eval = run_eval(state)
        record.update(last_eval)
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()
      progress.update(1)
      progress.set_postfix(loss=f"{record['train_loss']:.3f}",
                           acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}")
  progress.close()
  summary = {
      "rounds": config.rounds, "wall_time_s": time.perf_counter() - start, "strategy": strategy.name,
      "strategy_timings_s": timings, "params": accounting.param_count(spec),
      "flops": accounting.flops(spec), "data": data.description, **last_eval,
  }
  _write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"done: {config.rounds} rounds in {summary['wall_time_s']:.1f}s, "
      f"test accuracy {summary.get('test_accuracy', float('nan')):.4f} "
      f"(local mean {summary.get('local_accuracy_mean', float('nan')):.4f}); results in {workdir}")
  return summary


def _progress(total: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, disable=not enabled, desc="rounds", unit="round")

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

import jax

from experiments import build, methods, runtime
from fedjax_prune import federated


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
    runtime.write_json_atomic(path, config_json)
  except OSError as e:
    raise OSError(f"cannot write to workdir {workdir!r}: {e.strerror or e}") from e
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    os.remove(metrics_path)


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False) -> dict:
  """Runs the configured method (`config.method`, default 'fedavg'); returns the summary dict."""
  build.validate(config)
  method = config.get("method", "fedavg")
  if method not in methods.DRIVERS:
    raise build.ConfigError(f"config.method={method!r} is invalid: allowed one of "
                            f"{tuple(methods.DRIVERS)}")
  driver = methods.DRIVERS[method]
  driver.validate(config)
  prepare_workdir(config, workdir, overwrite)
  log = print
  data = build.build_data(config)
  num_clients = data.train.num_clients
  if config.clients_per_round > num_clients:
    raise build.ConfigError(f"config.clients_per_round={config.clients_per_round} exceeds the "
                            f"dataset's {num_clients} clients: allowed [1, {num_clients}]")
  num_devices = jax.local_device_count()
  mesh = federated.client_mesh() if (config.shard_clients and num_devices > 1) else None
  metrics = runtime.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  env = runtime.Env(config=config, workdir=workdir, data=data, mesh=mesh,
                    cohort_multiple=num_devices if mesh is not None else 1, metrics=metrics,
                    checkpoint=runtime.NoCheckpoints(), log=log)
  try:
    summary = driver.run(config, env)
  finally:
    metrics.close()
  summary = {"method": method, **summary}
  runtime.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f}s, "
      f"test accuracy {summary.get('test_accuracy', float('nan')):.4f} "
      f"(local mean {summary.get('local_accuracy_mean', float('nan')):.4f}); results in {workdir}")
  return summary

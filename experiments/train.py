"""train_and_evaluate(config, workdir): the experiment loop (importable from Colab).

Writes to `workdir`:
  config.json     the resolved config (a workdir holding another config is refused
                  unless overwrite=True)
  metrics.jsonl   one JSON object per round (train metrics, wall time; eval
                  metrics every `eval_every` rounds)
  checkpoints/    the last `checkpoint_keep` checkpoints, one every
                  `checkpoint_every` rounds (fedjax_prune.checkpoint; 0 = none)
  tensorboard/    TensorBoard scalars when `config.tensorboard` (needs tensorboardX)
  summary.json    final metrics, model size/FLOPs, chosen strategy and timings

`resume=True` continues from the latest checkpoint; on CPU the final parameters
and metrics (wall times aside) are bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp

from experiments import build, methods, runtime
from fedjax_prune import checkpoint as checkpoint_lib
from fedjax_prune import federated, performance, structured

CHECKPOINT_DIR = "checkpoints"
# Test hook: seconds the checkpointer pauses mid-save (so a test can kill a run during a save).
PAUSE_MID_SAVE_ENV = "FEDJAX_PRUNE_TEST_PAUSE_MID_SAVE"
# Test hook: seconds to pause after each metrics record (so a test can kill a run mid-run).
PAUSE_PER_ROUND_ENV = "FEDJAX_PRUNE_TEST_PAUSE_PER_ROUND"

# Run-level fields every method shares (optional in a config: the default applies when absent).
_RUN_FIELDS = {"checkpoint_every": 0, "checkpoint_keep": 3, "tensorboard": False, "progress": True,
               "cpu_devices": 0}


def validate_run_fields(config) -> None:
  """Checks the run-level fields (checkpointing, logging); raises ConfigError naming the field."""
  for name, default in _RUN_FIELDS.items():
    if name not in config:
      continue
    value = config[name]
    if isinstance(default, bool):
      if not isinstance(value, bool):
        raise build.ConfigError(f"config.{name}={value!r} is invalid: allowed True or False")
      continue
    lo = 1 if name == "checkpoint_keep" else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
      raise build.ConfigError(f"config.{name}={value!r} is invalid: allowed an integer in [{lo}, inf]"
                              + (" (0 = no checkpoints)" if name == "checkpoint_every" else "")
                              + (" (0 = one per usable core)" if name == "cpu_devices" else ""))
  if config.get("tensorboard", False):
    try:
      import tensorboardX  # noqa: F401
    except ImportError:
      raise build.ConfigError("config.tensorboard=True needs the optional package tensorboardX, "
                              "which is not installed: pip install 'fedjax_prune[tensorboard]'"
                              ) from None


def checkpointer_for(config, workdir: str):
  """The run's Checkpointer (NoCheckpoints when config.checkpoint_every is 0 or absent)."""
  if not config.get("checkpoint_every", 0):
    return runtime.NoCheckpoints()
  pause = float(os.environ.get(PAUSE_MID_SAVE_ENV, "0") or 0)
  return checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                     keep=config.get("checkpoint_keep", 3), pause_mid_save_s=pause)


def _read_config_json(path: str):
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return None


def check_workdir(config, workdir: str, overwrite: bool, resume: bool = False) -> None:
  """Raises if `prepare_workdir` would refuse the workdir; reads only, writes nothing.

  A fresh run (resume=False) of the same config restarts a finished run (summary.json
  present) but refuses an unfinished one that has checkpoints unless overwrite (pass
  resume=True to continue it); a workdir holding a different config is refused
  unless overwrite.
  """
  if resume and overwrite:
    raise ValueError("resume=True and overwrite=True exclude each other: resume continues the run "
                     "in the workdir, overwrite deletes it")
  config_json = json.loads(config.to_json_best_effort())
  path = os.path.join(workdir, "config.json")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir!r} exists and is not a directory")
  if os.path.exists(path) and not overwrite:
    if _read_config_json(path) != config_json:
      raise FileExistsError(f"workdir {workdir!r} holds a run with a different config; "
                            "choose another workdir or pass --overwrite")
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  has_checkpoints = bool(checkpoint_lib.Checkpointer(ckpt_dir).steps())
  finished = os.path.exists(os.path.join(workdir, "summary.json"))
  if resume:
    if not config.get("checkpoint_every", 0):
      raise build.ConfigError("cannot resume with config.checkpoint_every=0: the run keeps no "
                              "checkpoints (set checkpoint_every >= 1)")
    if not os.path.exists(path) or not has_checkpoints:
      raise FileNotFoundError(f"cannot resume: workdir {workdir!r} holds no checkpoint "
                              f"(looked in {ckpt_dir!r}); run without --resume to start it")
  elif has_checkpoints and not overwrite and not finished:
    raise FileExistsError(f"workdir {workdir!r} holds checkpoints of an unfinished run with this "
                          "config; pass --resume to continue it or --overwrite to start over")


def prepare_workdir(config, workdir: str, overwrite: bool, resume: bool = False) -> None:
  """Creates workdir and writes its config.json, after `check_workdir`'s checks.

  Every check happens before anything is written or deleted, so a refused call
  leaves the workdir intact. A fresh run clears the workdir's old metrics and
  summary (and the checkpoints of a finished or overwritten run).
  """
  check_workdir(config, workdir, overwrite, resume)
  config_json = json.loads(config.to_json_best_effort())
  path = os.path.join(workdir, "config.json")
  finished = os.path.exists(os.path.join(workdir, "summary.json"))
  try:
    os.makedirs(workdir, exist_ok=True)
    runtime.write_json_atomic(path, config_json)
  except OSError as e:
    raise OSError(e.errno, f"cannot write to workdir {workdir!r}: {e.strerror or e}") from e
  if resume:
    return  # the driver truncates metrics.jsonl to the restored round
  for name in ("metrics.jsonl", "summary.json"):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  for name in (CHECKPOINT_DIR, "tensorboard"):  # a restart must not resume old checkpoints
    if (overwrite or finished) and os.path.isdir(os.path.join(workdir, name)):
      shutil.rmtree(os.path.join(workdir, name))


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False, resume: bool = False) -> dict:
  """Runs the configured method (`config.method`, default 'fedavg'); returns the summary dict.

  Args:
    config: ml_collections ConfigDict (see experiments/configs/).
    workdir: output directory (see the module docstring).
    overwrite: replace a workdir that holds another run (or checkpoints of this one).
    resume: continue from the workdir's latest checkpoint.
  """
  build.validate(config)
  validate_run_fields(config)
  method = config.get("method", "fedavg")
  if method not in methods.DRIVERS:
    raise build.ConfigError(f"config.method={method!r} is invalid: allowed one of "
                            f"{tuple(methods.DRIVERS)}")
  driver = methods.DRIVERS[method]
  driver.validate(config)
  # Nothing is written before every check that can fail has passed: the workdir's
  # (read-only) checks first, then the data and the checks that need it, then the write.
  check_workdir(config, workdir, overwrite, resume)
  if config.get("shard_clients", False):
    # One CPU device per core, so that a sharded cohort runs different clients on
    # different cores at once (1.3x on 2 cores, docs/results/engine.md). No effect on
    # GPU/TPU runs, or once JAX has started (a notebook, a test session).
    performance.split_cpu_into_devices(config.get("cpu_devices", 0) or None)
  log = print
  setup_start = time.perf_counter()
  data = build.build_data(config)
  num_clients = data.train.num_clients
  if config.clients_per_round > num_clients:
    raise build.ConfigError(f"config.clients_per_round={config.clients_per_round} exceeds the "
                            f"dataset's {num_clients} clients: allowed [1, {num_clients}]")
  prepare_workdir(config, workdir, overwrite, resume)
  num_devices = jax.local_device_count()
  # Shard only when every device gets a client: a cohort smaller than the device count
  # would leave devices idle and (on CPU, one device per core) run slower than unsharded
  # (measured: 1 client on 2 CPU devices 0.53x of a loop, unsharded 0.82x).
  mesh = (federated.client_mesh()
          if (config.shard_clients and 1 < num_devices <= config.clients_per_round) else None)
  tb_dir = os.path.join(workdir, "tensorboard") if config.get("tensorboard", False) else None
  metrics = runtime.MetricsWriter(os.path.join(workdir, "metrics.jsonl"), tensorboard_dir=tb_dir,
                                  pause_after_write_s=float(os.environ.get(PAUSE_PER_ROUND_ENV) or 0))
  env = runtime.Env(config=config, workdir=workdir, data=data, mesh=mesh,
                    cohort_multiple=num_devices if mesh is not None else 1, metrics=metrics,
                    checkpoint=checkpointer_for(config, workdir), log=log,
                    setup_start=setup_start)
  try:
    summary = run_method(config, env, driver.build(config, env))
  finally:
    metrics.close()
  summary = {"method": method, **summary}
  runtime.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f}s, "
      f"test accuracy {summary.get('test_accuracy', float('nan')):.4f} "
      f"(local mean {summary.get('local_accuracy_mean', float('nan')):.4f}); results in {workdir}")
  return summary


def run_method(config, env: runtime.Env, run: runtime.Run) -> dict:
  """The experiment loop, the one every method runs: restore or init, then the rounds of
  `federated.run_rounds` (before_round -> the compiled round -> after_round -> record),
  each followed by evaluation, the metrics record and the checkpoint; the round and the
  evaluator compile once per architecture.

  Returns the summary dict (without 'method', which `train_and_evaluate` adds).
  """
  method = run.method
  initial = method.init()
  initial_spec = structured.spec_to_json(initial.spec)

  def template(meta):
    saved = meta.get("initial_spec")
    saved_spec = structured.spec_from_json(saved) if saved is not None else None
    if saved_spec != initial.spec:
      raise checkpoint_lib.CheckpointError(
          f"it was saved with model spec {saved_spec!r}, this run builds {initial.spec!r}")
    if method.template is None:
      return initial.server
    return method.template(initial, structured.spec_from_json(meta["spec"]), dict(meta["host"]))

  start_round, meta = 0, {}
  restored = env.checkpoint.restore(template)
  if restored is not None:
    start_round, server, meta = restored
    state = method.resume(federated.MethodState(server, structured.spec_from_json(meta["spec"]),
                                                dict(meta["host"])))
    env.metrics.truncate_to_round(start_round)
    env.log(f"resumed from the checkpoint after round {start_round}")
  else:
    # The round donates its state: give it buffers of its own (no leaf shared with the
    # caller or repeated inside the state, e.g. one `()` mask array reused for several leaves).
    state = initial._replace(server=jax.tree.map(jnp.copy, initial.server))

  strategy = run.strategy
  mesh = runtime.mesh_for(env, strategy)
  # The round donates the server state it is given (saves a model copy).
  compile_round = lambda alg: strategy.make_round(alg, mesh=mesh, donate=True)
  evaluators = {}  # one compiled evaluator per architecture

  def evaluate(state, round_idx):
    nonlocal eval_time
    t0 = time.perf_counter()
    key = repr(state.spec)
    if key not in evaluators:
      evaluators.clear()  # an old architecture is never evaluated again
      evaluators[key] = method.evaluator(state.spec)
    out = evaluators[key](state, round_idx)
    eval_time += time.perf_counter() - t0
    return out

  config_json = json.loads(config.to_json_best_effort())
  setup_time = time.perf_counter() - env.setup_start
  progress = runtime.progress_bar(config.rounds, config.progress, initial=start_round)
  start = runtime.run_clock_start(meta)
  eval_time = float(meta.get("eval_time_s", 0.0))
  last_eval: dict = {}
  rounds = federated.run_rounds(
      method, state, train=run.train, cohort_fn=run.cohort,
      train_root=jax.random.key(config.seeds.training), init_key=jax.random.key(config.seeds.init),
      rounds=range(start_round, config.rounds), compile_round=compile_round)
  for round_idx, state, record in rounds:
    record.update(round=round_idx + 1, wall_time=time.perf_counter() - start)
    if runtime.is_eval_round(config, round_idx):
      last_eval = evaluate(state, round_idx)
      record.update(last_eval)
    env.metrics.write(record)
    if runtime.is_checkpoint_round(config, round_idx):
      env.checkpoint.save(round_idx + 1, state.server, {
          "initial_spec": initial_spec, "spec": structured.spec_to_json(state.spec),
          "host": state.host, "strategy": strategy.name, "config": config_json,
          # Cohorts are a pure function of (sampling seed, round): this is the sampler's state.
          "sampler": {"seed": config.seeds.sampling, "next_round": round_idx + 1},
          "eval_time_s": eval_time, **runtime.timing_meta(start, run.timings)})
    progress.update(1)
    progress.set_postfix(loss=f"{record['train_loss']:.3f}",
                         acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}")
  progress.close()
  if not last_eval:  # resumed from the final checkpoint: evaluate the restored model
    last_eval = evaluate(state, config.rounds - 1)
  summary = {"rounds": config.rounds, "wall_time_s": time.perf_counter() - start,
             "setup_time_s": setup_time, "eval_time_s": eval_time, "strategy": strategy.name,
             "strategy_timings_s": run.timings, "data": env.data.description, **last_eval}
  summary.update(method.summary(state, last_eval))
  return summary

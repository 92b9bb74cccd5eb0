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
  run.lock        while the run is alive: its pid and host (`experiments.workdir.lock`);
                  another run on the workdir is refused, a dead run's lock taken over

A refused run writes nothing: the config, the workdir (read only), the data, the
method with its client-execution strategy and the checkpoint to resume from are
checked and built in memory first; only then is the workdir locked and written.

`resume=True` continues from the latest checkpoint; on CPU the final parameters
and metrics (wall times aside) are bit-identical to an uninterrupted run. A workdir
without a checkpoint (a run killed before its first save, or never started) starts
from round 0, so a restart loop may always pass resume=True. Fields that do not
change results (`workdir.RESULT_NEUTRAL_FIELDS`: progress, tensorboard, eval and
checkpoint cadence) may differ on resume; any other difference is refused, named.

A resume with a larger `config.rounds` (and no other such difference) extends the run,
finished or not, to the new rounds, bit-identical to a run that had them from the start,
where the method's driver says nothing in its rounds depends on `config.rounds`
(`extension_refusal`) and a finished run's latest checkpoint is after its final round. The
kept records of rounds 1..old lose the evaluation that ran only because round old was the
last (`workdir.without_evaluation`); summary.json is removed, config.json rewritten.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from experiments import build, methods, runtime
from experiments import workdir as workdir_lib
from fedjax_prune import _files
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


def _saved_config(workdir: str, checkpoints: checkpoint_lib.Checkpointer):
  """The config JSON of the run in `workdir` (config.json, else the latest checkpoint's),
  False when the workdir names none, None when config.json is not JSON."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      try:
        return json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError):
        return None
  meta = checkpoints.latest_meta()
  return meta.get("config", False) if meta else False


def check_workdir(config, workdir: str, overwrite: bool, resume: bool = False, *,
                  holding_lock: bool = False) -> bool:
  """Raises if the workdir cannot take this run; reads only, writes nothing.

  A workdir whose run is alive (its lock held) is refused. A fresh run (resume=False)
  of the same config restarts a finished run (summary.json present) but refuses an
  unfinished one that has checkpoints unless overwrite (pass resume=True to continue
  it); a workdir holding a different config is refused unless overwrite, naming the
  fields (those in `workdir.RESULT_NEUTRAL_FIELDS` may differ), except that resume=True
  extends a run to a larger `config.rounds` where `check_extension` allows it.

  Args:
    holding_lock: the caller holds the workdir's lock (`workdir.lock`): skip that check.

  Returns:
    Whether the run continues from a checkpoint (resume=True and the workdir holds
    one); resume=True without one starts from round 0.
  """
  return _check_workdir(config, workdir, overwrite, resume, holding_lock=holding_lock)[0]


def _check_workdir(config, workdir: str, overwrite: bool, resume: bool, *,
                   holding_lock: bool) -> tuple[bool, int | None]:
  """`check_workdir`, plus the rounds of the run this one extends (None if it extends none)."""
  if resume and overwrite:
    raise ValueError("resume=True and overwrite=True exclude each other: resume continues the run "
                     "in the workdir, overwrite deletes it")
  if resume and not config.get("checkpoint_every", 0):
    raise build.ConfigError("cannot resume with config.checkpoint_every=0: the run keeps no "
                            "checkpoints (set checkpoint_every >= 1)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir!r} exists and is not a directory")
  if not holding_lock:
    workdir_lib.check_not_locked(workdir)
  checkpoints = checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  has_checkpoints = bool(checkpoints.steps())
  extends = None
  if not overwrite:
    saved = _saved_config(workdir, checkpoints)
    if saved is None:
      raise FileExistsError(f"workdir {workdir!r} holds a config.json that is not valid JSON; "
                            "choose another workdir or pass --overwrite to replace the run")
    if saved is not False:
      differences = config_differences(saved, config)
      old_rounds = rounds_only_difference(saved, config)
      if differences and resume and old_rounds is not None:
        check_extension(config, workdir, old_rounds, checkpoints)
        extends = old_rounds
      elif differences:
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        hint = ""
        if old_rounds is not None and old_rounds < config.rounds:
          reason = extension_refusal(config)
          hint = (f"it cannot be extended to config.rounds={config.rounds} ({reason}); " if reason
                  else f"pass --resume to extend it to config.rounds={config.rounds}, or ")
        raise FileExistsError(
            f"workdir {workdir!r} holds a run with a different config "
            f"({'; '.join(differences[:3])}{more}); {hint}choose another workdir, rerun with the "
            "workdir's values, or pass --overwrite to replace that run")
  finished = os.path.exists(os.path.join(workdir, "summary.json"))
  if not resume and has_checkpoints and not overwrite and not finished:
    raise FileExistsError(f"workdir {workdir!r} holds checkpoints of an unfinished run with this "
                          "config; pass --resume to continue it or --overwrite to start over")
  return resume and has_checkpoints, extends


def extension_refusal(config) -> str | None:
  """Why a run of `config` cannot be extended from fewer rounds (None when it can): its
  driver's `extendable(config)` (`experiments/methods/`); a driver without one cannot."""
  method = config.get("method", "fedavg")
  driver = methods.DRIVERS.get(method)
  if driver is None:
    return f"config.method={method!r} has no driver"
  extendable = getattr(driver, "extendable", None)
  if extendable is None:
    return (f"the {method!r} driver ({driver.__name__.replace('.', '/')}.py) does not say that its "
            "rounds are independent of config.rounds (it defines no extendable(config))")
  return extendable(config)


def rounds_only_difference(saved: dict, config) -> int | None:
  """The rounds of the `saved` config.json when `config` differs from it only in
  `config.rounds` (result-neutral fields aside), else None."""
  now = json.loads(config.to_json_best_effort())
  return workdir_lib.rounds_only_difference(saved, now, {"method": "fedavg", **_RUN_FIELDS})


def check_extension(config, workdir: str, old_rounds: int,
                    checkpoints: checkpoint_lib.Checkpointer) -> None:
  """Raises WorkdirError (naming the field and the reason) unless the run of `old_rounds`
  rounds in `workdir` can be extended to `config.rounds`; reads only.

  It can when config.rounds is larger, the driver allows it (`extension_refusal`) and,
  for a finished run, the latest checkpoint is after its final round (an unfinished one
  resumes from its latest checkpoint, or starts over without one). Rounds 1..old of the
  longer run are then the same as the shorter run's.
  """
  where = (f"cannot extend the run in workdir {workdir!r} from config.rounds={old_rounds} to "
           f"{config.rounds}")
  fix = (f"rerun with config.rounds={old_rounds}, choose another workdir, or pass --overwrite to "
         "start over")
  if config.rounds < old_rounds:
    raise workdir_lib.WorkdirError(
        f"cannot resume the run in workdir {workdir!r} with config.rounds={config.rounds}: it "
        f"is a run of config.rounds={old_rounds}, and a resume may only extend a run (a larger "
        f"config.rounds), never shorten it; {fix}")
  reason = extension_refusal(config)
  if reason:
    raise workdir_lib.WorkdirError(f"{where}: {reason}; {fix}")
  steps = checkpoints.steps()
  latest = max(steps) if steps else None
  if latest is not None and latest > old_rounds:
    raise workdir_lib.WorkdirError(f"{where}: its latest checkpoint is after round {latest}, past "
                                   f"the run's {old_rounds} rounds; {fix}")
  if os.path.exists(os.path.join(workdir, "summary.json")) and latest != old_rounds:
    have = (f"its latest checkpoint is after round {latest}" if latest is not None
            else "it keeps no checkpoint")
    raise workdir_lib.WorkdirError(
        f"{where}: the run finished, but {have}, not after its final round {old_rounds} (the "
        f"state to continue from); {fix}")
  if latest == old_rounds:
    path = os.path.join(workdir, "metrics.jsonl")
    kept, bad_line = workdir_lib.metrics_up_to(path, old_rounds)
    if bad_line is None and (not kept or json.loads(kept[-1])["round"] != old_rounds):
      raise workdir_lib.WorkdirError(
          f"{where}: {path!r} holds no record of round {old_rounds}, the checkpoint's last "
          f"round (it would be missing from the extended run's records); {fix}")


def config_differences(saved: dict, config) -> list[str]:
  """The fields in which `config` would run differently from the `saved` config.json (the
  result-neutral run fields aside, absent fields as their defaults), one line each."""
  now = json.loads(config.to_json_best_effort())
  return workdir_lib.config_differences(saved, now, {"method": "fedavg", **_RUN_FIELDS})


def _start_extension(config, workdir: str, old_rounds: int, from_checkpoint: bool) -> None:
  """Turns the run of `old_rounds` rounds into the first rounds of a `config.rounds` run,
  before config.json says so: removes its summary (a kill from here on leaves an unfinished
  run) and, when it continues from the checkpoint after round `old_rounds`, drops that
  round's evaluation from its record unless `config` evaluates that round too (the
  evaluation is a function of the checkpointed state: the same values)."""
  summary = os.path.join(workdir, "summary.json")
  if os.path.exists(summary):
    os.remove(summary)
  checkpoints = checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  if not from_checkpoint or max(checkpoints.steps()) != old_rounds:
    return  # an unfinished run resumed from an earlier round: its records are those of any resume
  if runtime.is_eval_round(config, old_rounds - 1):
    return
  path = os.path.join(workdir, "metrics.jsonl")
  kept, bad_line = workdir_lib.metrics_up_to(path, old_rounds, drop_last_evaluation=True)
  if bad_line is not None:  # train_and_evaluate refuses this before locking the workdir
    raise workdir_lib.WorkdirError(f"line {bad_line} of {path!r} is not a metrics record; the "
                                   f"records of rounds 1-{old_rounds} must be kept")
  _files.write_atomic(path, lambda f: f.writelines(kept))


def prepare_workdir(config, workdir: str, overwrite: bool, resume: bool = False) -> None:
  """Creates workdir and writes its config.json, after `check_workdir`'s checks.

  Call it holding the workdir's lock (`workdir.lock`). Every check happens before
  anything is written or deleted, so a refused call leaves the workdir intact. A run
  that continues from a checkpoint keeps metrics.jsonl (the loop cuts it to the
  checkpoint); any other run clears the workdir's old metrics and summary (and the
  checkpoints of a finished, overwritten or checkpoint-less resumed run).
  """
  from_checkpoint, extends = _check_workdir(config, workdir, overwrite, resume, holding_lock=True)
  config_json = json.loads(config.to_json_best_effort())
  path = os.path.join(workdir, "config.json")
  finished = os.path.exists(os.path.join(workdir, "summary.json"))
  try:
    os.makedirs(workdir, exist_ok=True)
    if extends is not None:
      _start_extension(config, workdir, extends, from_checkpoint)
    runtime.write_json_atomic(path, config_json)
  except OSError as e:
    raise OSError(e.errno, f"cannot write to workdir {workdir!r}: {e.strerror or e}") from e
  if from_checkpoint:
    return
  for name in ("metrics.jsonl", "summary.json"):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  for name in (CHECKPOINT_DIR, "tensorboard"):  # a restart must not resume old checkpoints
    if (overwrite or finished or resume) and os.path.isdir(os.path.join(workdir, name)):
      shutil.rmtree(os.path.join(workdir, name))


def _check_runnable_here(config, env: runtime.Env, strategy, *, saved: bool) -> None:
  """Raises, before anything is written, when this machine cannot run `strategy` (the
  checkpoint's when `saved`, else the config's): a sharded one without a device mesh."""
  try:
    runtime.mesh_for(env, strategy)
  except ValueError:
    here = (f"this run has no device mesh ({jax.local_device_count()} device(s), "
            f"config.shard_clients={config.get('shard_clients', False)}, "
            f"clients_per_round={config.clients_per_round}; a mesh needs 2 to clients_per_round "
            "devices)")
    if saved:
      raise checkpoint_lib.CheckpointError(
          f"cannot resume here: the checkpoint in {env.workdir!r} runs the clients as "
          f"{strategy.name!r}, sharded over several devices, and {here}; resume on a machine "
          "with several devices, or pass --overwrite to start over") from None
    raise build.ConfigError(f"config.strategy={strategy.name!r} shards the cohort over "
                            f"devices, but {here}; choose an unsharded strategy or 'auto'"
                            ) from None


def _divergence_advice(config) -> str:
  """Which learning rates to lower: the clients', and the server's where its step can
  overshoot (a plain average of the clients' models cannot)."""
  client = f"config.client.learning_rate (now {config.client.learning_rate})"
  method = config.get("method", "fedavg")
  if method in ("fedavg", "asp", "l1_filter"):
    a = config.algorithm
    if a.name in ("fedavg", "fedprox") and a.server_learning_rate <= 1.0:
      return (f"lower {client}: the server step only averages the clients' models "
              f"({a.name}, server_learning_rate={a.server_learning_rate})")
    return (f"lower config.algorithm.server_learning_rate (now {a.server_learning_rate}, the "
            f"{a.name} server step) or {client}")
  hetero = ("fiarse", "heterofl", "fedrolex", "scalefl")
  if method in hetero and config.hetero.server_learning_rate > 1.0:
    return (f"lower config.hetero.server_learning_rate (now {config.hetero.server_learning_rate}) "
            f"or {client}")
  if method == "cavp":
    return (f"lower {client} or config.cavp.theta_learning_rate "
            f"(now {config.cavp.theta_learning_rate})")
  return f"lower {client}"


def train_and_evaluate(config, workdir: str, *, overwrite: bool = False, resume: bool = False) -> dict:
  """Runs the configured method (`config.method`, default 'fedavg'); returns the summary dict.

  Args:
    config: ml_collections ConfigDict (see experiments/configs/).
    workdir: output directory (see the module docstring).
    overwrite: replace a workdir that holds another run (or checkpoints of this one).
    resume: continue from the workdir's latest checkpoint (from round 0 without one).

  Raises:
    build.ConfigError, FileExistsError, NotADirectoryError, workdir.WorkdirError,
    checkpoint.CheckpointError, data.DataError (a bad config, workdir, checkpoint or data
    file: nothing written), OSError (disk full, permissions), FloatingPointError
    (training diverged; names the learning rates to lower).
  """
  build.validate(config)
  validate_run_fields(config)
  method = config.get("method", "fedavg")
  if method not in methods.DRIVERS:
    raise build.ConfigError(f"config.method={method!r} is invalid: allowed one of "
                            f"{tuple(methods.DRIVERS)}")
  driver = methods.DRIVERS[method]
  driver.validate(config)
  # Nothing is written before every check that can refuse the run has passed: the
  # workdir's (read-only) checks, then the data, the method, its strategy and the
  # checkpoint to resume from, built in memory; only then the lock and the writes.
  from_checkpoint = check_workdir(config, workdir, overwrite, resume)
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
  num_devices = jax.local_device_count()
  # Shard only when every device gets a client: a cohort smaller than the device count
  # would leave devices idle and (on CPU, one device per core) run slower than unsharded
  # (measured: 1 client on 2 CPU devices 0.53x of a loop, unsharded 0.82x).
  mesh = (federated.client_mesh()
          if (config.shard_clients and 1 < num_devices <= config.clients_per_round) else None)
  # A fresh run must not see the checkpoints it is about to delete (the strategy
  # choice and the restore read them).
  env = runtime.Env(config=config, workdir=workdir, data=data, mesh=mesh,
                    cohort_multiple=num_devices if mesh is not None else 1, metrics=None,
                    checkpoint=(checkpointer_for(config, workdir) if from_checkpoint
                                else runtime.NoCheckpoints()),
                    log=log, setup_start=setup_start)
  saved = runtime.checkpointed_strategy(env) if from_checkpoint else None
  if saved is not None:
    _check_runnable_here(config, env, saved[0], saved=True)
  elif config.strategy != "auto":
    _check_runnable_here(config, env, runtime.named_strategy(env, config.strategy), saved=False)
  run = driver.build(config, env)
  _check_runnable_here(config, env, run.strategy, saved=saved is not None)
  start = start_state(env, run)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if start.restored:
    _, bad_line = workdir_lib.metrics_up_to(metrics_path, start.round)
    if bad_line is not None:
      raise workdir_lib.WorkdirError(
          f"cannot resume: line {bad_line} of {metrics_path!r} is not a metrics record, and the "
          f"checkpoint covers rounds 1-{start.round} (the line may hold one of them); repair or "
          "delete that line, or pass --overwrite to start over")
  elif resume:
    log(f"no checkpoint in workdir {workdir!r}: starting the run from round 0")
  with workdir_lib.lock(workdir, log):
    prepare_workdir(config, workdir, overwrite, resume)
    tb_dir = os.path.join(workdir, "tensorboard") if config.get("tensorboard", False) else None
    pause = float(os.environ.get(PAUSE_PER_ROUND_ENV) or 0)
    metrics = runtime.MetricsWriter(metrics_path, tensorboard_dir=tb_dir, pause_after_write_s=pause)
    env = env._replace(metrics=metrics, checkpoint=checkpointer_for(config, workdir))
    try:
      if start.restored:
        metrics.truncate_to_round(start.round)  # checked above: keeps every record it covers
        log(f"resumed from the checkpoint after round {start.round}")
      summary = run_method(config, env, run, start)
    except FloatingPointError as e:
      generic = str(e).rsplit("; lower the learning rate", 1)[0]
      raise FloatingPointError(f"{generic}; {_divergence_advice(config)}") from e
    finally:
      metrics.close()
    summary = {"method": method, **summary}
    runtime.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"done: {summary['rounds']} rounds in {summary['wall_time_s']:.1f}s, "
      f"test accuracy {summary.get('test_accuracy', float('nan')):.4f} "
      f"(local mean {summary.get('local_accuracy_mean', float('nan')):.4f}); results in {workdir}")
  return summary


class Start(NamedTuple):
  """Where a run starts (`start_state`)."""
  round: int                         # rounds already done: the checkpoint's, or 0
  state: federated.MethodState
  meta: dict                         # the checkpoint's meta ({} for a fresh start)
  initial_spec: dict                 # JSON of method.init()'s spec (saved with each checkpoint)
  restored: bool                     # whether it comes from a checkpoint


def start_state(env: runtime.Env, run: runtime.Run) -> Start:
  """The latest checkpoint of `env.checkpoint` (checked against the run's method and
  spec), or the method's initial state; reads only (raises CheckpointError)."""
  method = run.method
  initial = method.init()

  def template(meta):
    saved = meta.get("initial_spec")
    saved_spec = structured.spec_from_json(saved) if saved is not None else None
    if saved_spec != initial.spec:
      raise checkpoint_lib.CheckpointError(
          f"it was saved with model spec {saved_spec!r}, this run builds {initial.spec!r}")
    if method.template is None:
      return initial.server
    return method.template(initial, structured.spec_from_json(meta["spec"]), dict(meta["host"]))

  initial_spec = structured.spec_to_json(initial.spec)
  restored = env.checkpoint.restore(template)
  if restored is not None:
    start_round, server, meta = restored
    state = method.resume(federated.MethodState(server, structured.spec_from_json(meta["spec"]),
                                                dict(meta["host"])))
    return Start(start_round, state, meta, initial_spec, True)
  # The round donates its state: give it buffers of its own (no leaf shared with the
  # caller or repeated inside the state, e.g. one `()` mask array reused for several leaves).
  state = initial._replace(server=jax.tree.map(jnp.copy, initial.server))
  return Start(0, state, {}, initial_spec, False)


def run_method(config, env: runtime.Env, run: runtime.Run, start: Start | None = None) -> dict:
  """The experiment loop, the one every method runs: from `start` (default: `start_state`,
  cutting the metrics to a restored round), the rounds of `federated.run_rounds`
  (before_round -> the compiled round -> after_round -> record), each followed by
  evaluation, the metrics record and the checkpoint; the round and the evaluator compile
  once per architecture.

  Returns the summary dict (without 'method', which `train_and_evaluate` adds).
  """
  # config.compression (issue 28): the round's measured `bytes_up` replaces the method's dense count.
  method = build.with_measured_bytes(config, run.method)
  if start is None:
    start = start_state(env, run)
    if start.restored:
      env.metrics.truncate_to_round(start.round)
      env.log(f"resumed from the checkpoint after round {start.round}")
  start_round, state, meta, initial_spec = start.round, start.state, start.meta, start.initial_spec

  strategy = run.strategy
  mesh = runtime.mesh_for(env, strategy)
  # The round donates the server state it is given (saves a model copy).
  # config.robust / config.attack (issue 28) wrap the method's round algorithm.
  compile_round = lambda alg: strategy.make_round(build.robust_algorithm(config, env.data, alg),
                                                  mesh=mesh, donate=True)
  backdoor_asr = build.backdoor_evaluator(config, env.data, runtime.model_fns(env, strategy).apply_for)
  evaluators = {}  # one compiled evaluator per architecture

  def evaluate(state, round_idx):
    nonlocal eval_time
    t0 = time.perf_counter()
    key = repr(state.spec)
    if key not in evaluators:
      evaluators.clear()  # an old architecture is never evaluated again
      evaluators[key] = method.evaluator(state.spec)
    out = evaluators[key](state, round_idx)
    if backdoor_asr is not None:
      out = {**out, **backdoor_asr(state)}
    eval_time += time.perf_counter() - t0
    return out

  config_json = json.loads(config.to_json_best_effort())
  setup_time = time.perf_counter() - env.setup_start
  progress = runtime.progress_bar(config.rounds, config.progress, initial=start_round)
  clock_start = runtime.run_clock_start(meta)
  eval_time = float(meta.get("eval_time_s", 0.0))
  last_eval: dict = {}
  # Privacy accounting (config.privacy; ASP's noised votes), each under the DP-FedAvg
  # convention (Poisson sampling) and, for the fixed-size cohorts of uniform sampling,
  # what those guarantee (replace-one); Poisson cohorts are what the first assumes.
  n = env.data.train.num_clients
  poisson = build.cohort_sampling(config) == "poisson"
  epsilons = {key: values for key, values in (
      ("dp_epsilon", build.dp_epsilons(config, n)),
      ("dp_epsilon_fixed_cohort", None if poisson else build.dp_epsilons(config, n,
                                                                          fixed_cohort=True)),
      ("vote_epsilon", build.vote_epsilons(config, n)),
      ("vote_epsilon_fixed_cohort", None if poisson else build.vote_epsilons(config, n,
                                                                              fixed_cohort=True)))
      if values is not None}
  rounds = federated.run_rounds(
      method, state, train=run.train, cohort_fn=run.cohort,
      train_root=jax.random.key(config.seeds.training), init_key=jax.random.key(config.seeds.init),
      rounds=range(start_round, config.rounds), compile_round=compile_round)
  for round_idx, state, record in rounds:
    # Evaluation's fields go last: extending a run drops them from its last record
    # (`workdir.without_evaluation` relies on this order).
    record.update(round=round_idx + 1, wall_time=time.perf_counter() - clock_start)
    record.update({key: values[round_idx] for key, values in epsilons.items()})
    if poisson:  # clients drawn beyond the round's slots (build.poisson_slots): rare
      record["cohort_dropped"] = runtime.poisson_draw(env, round_idx)[1]
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
          "eval_time_s": eval_time, **runtime.timing_meta(clock_start, run.timings)})
    progress.update(1)
    progress.set_postfix(loss=f"{record['train_loss']:.3f}",
                         acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}")
  progress.close()
  if not last_eval:  # resumed from the final checkpoint: evaluate the restored model
    last_eval = evaluate(state, config.rounds - 1)
  summary = {"rounds": config.rounds, "wall_time_s": time.perf_counter() - clock_start,
             "setup_time_s": setup_time, "eval_time_s": eval_time, "strategy": strategy.name,
             "strategy_timings_s": run.timings, "data": env.data.description, **last_eval}
  summary.update(method.summary(state, last_eval))
  return summary

"""What every method's experiment code shares: the run environment and the `Run`.

A method's experiment code lives in `experiments/methods/<method>.py` and exposes

  validate(config) -> None          # its own config fields; raises build.ConfigError
  build(config, env: Env) -> Run    # the method (a `federated.Method`) and how to run it

`train.train_and_evaluate` validates the config, checks the workdir (reading only),
builds the data, the `Env` and, dispatching on `config.method`, the `Run`; only then
does it lock and write the workdir, run the one experiment loop (`train.run_method`:
resume, rounds, records, evaluation, checkpoints) and write `summary.json`. `build`
must therefore write nothing (its `env.metrics` is None).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, NamedTuple, Protocol

import jax
import numpy as np

from experiments import build
from experiments import workdir as workdir_lib
from fedjax_prune import _files
from fedjax_prune import data as data_lib
from fedjax_prune import federated, performance


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file and a rename, so readers never see half a file."""
  _files.write_atomic(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True, default=jsonable))


def jsonable(x):
  if isinstance(x, (np.generic, jax.Array, np.ndarray)):
    return np.asarray(x).tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class MetricsWriter:
  """Appends one JSON object per round to `<workdir>/metrics.jsonl` (flushed each write).

  With `tensorboard_dir`, numeric fields are also logged as TensorBoard scalars
  (step = the record's round) through tensorboardX, an optional dependency.
  """

  def __init__(self, path: str, *, tensorboard_dir: str | None = None,
               pause_after_write_s: float = 0.0):
    self.path = path
    self._pause = pause_after_write_s  # test hook: slows a run so a test can kill it mid-run
    self._tb_dir = tensorboard_dir
    self._tb = _tensorboard_writer(tensorboard_dir) if tensorboard_dir else None
    self._file = open(path, "a")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record, default=jsonable) + "\n")
    self._file.flush()
    if self._tb is not None:
      step = int(record.get("round", 0))
      for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._pause:
      time.sleep(self._pause)

  def truncate_to_round(self, num_rounds: int) -> None:
    """Drops records of rounds after `num_rounds` (used when resuming from a checkpoint).

    Raises workdir.WorkdirError naming the line when a line that may hold a record of
    rounds 1..num_rounds is unreadable (`workdir.metrics_up_to`); the file is kept.
    """
    kept, bad_line = workdir_lib.metrics_up_to(self.path, num_rounds)
    if bad_line is not None:
      raise workdir_lib.WorkdirError(f"line {bad_line} of {self.path!r} is not a metrics record; "
                                     f"the records of rounds 1-{num_rounds} must be kept")
    self._file.close()
    _files.write_atomic(self.path, lambda f: f.writelines(kept))
    self._file = open(self.path, "a")
    if self._tb is not None:
      # TensorBoard cannot delete events; purge_step hides the ones after the checkpoint.
      self._tb.close()
      self._tb = _tensorboard_writer(self._tb_dir, purge_step=num_rounds + 1)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _tensorboard_writer(logdir: str, purge_step: int | None = None):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    raise ImportError("config.tensorboard=True needs the optional package tensorboardX, which is "
                      "not installed: pip install 'fedjax_prune[tensorboard]' (or tensorboardX)"
                      ) from None
  return SummaryWriter(logdir, purge_step=purge_step)


class Checkpointer(Protocol):
  """Saves and restores a driver's state (see fedjax_prune.checkpoint for the orbax one)."""

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves `state` (a pytree of arrays) and `meta` (JSON: spec, host-side state) as `step`."""

  def restore(self, template_fn: Callable[[dict], Any]) -> tuple[int, Any, dict] | None:
    """Latest checkpoint as (step, state, meta), or None. `template_fn(meta)` gives a pytree
    with the state's structure, shapes and dtypes (shapes may depend on meta, e.g. a spec)."""

  def latest_meta(self) -> dict | None:
    """The meta of the latest checkpoint (no state read), or None."""


class NoCheckpoints:
  """Checkpointer that keeps nothing (config.checkpoint_every == 0)."""

  def save(self, step, state, meta):
    del step, state, meta

  def restore(self, template_fn):
    del template_fn
    return None

  def latest_meta(self):
    return None


class Env(NamedTuple):
  """The environment a method driver runs in."""
  config: Any
  workdir: str
  data: build.Data
  mesh: Any                      # jax Mesh over local devices, or None
  cohort_multiple: int           # cohorts are padded to a multiple of this (device count)
  metrics: MetricsWriter          # None while the method is built (`build` writes nothing)
  checkpoint: Any                # a Checkpointer
  log: Callable[[str], None]
  setup_start: float = 0.0       # time.perf_counter() when the run started (data, method setup)


class Run(NamedTuple):
  """What the experiment loop (`train.run_rounds`) runs: a method and how.

  Attributes:
    method: the `federated.Method`.
    strategy: the client-execution strategy (`choose_strategy`).
    timings: its calibration timings ({} when named).
    train: the training `ClientData` the rounds sample from (env.data.train, or a
      method's own view of it, e.g. CAVP's pooled client).
    cohort: `cohort(round_idx) -> federated.Cohort`.
  """
  method: federated.Method
  strategy: performance.Strategy
  timings: dict
  train: Any
  cohort: Callable[[int], federated.Cohort]


def cohort_for(env: Env, round_idx: int, *, clients_per_round: int | None = None) -> federated.Cohort:
  """The cohort of round `round_idx`, seeded by (sampling seed, round): uniform without
  replacement, or (config.cohort_sampling='poisson', no `clients_per_round` given) each
  client with probability q in `build.poisson_slots` fixed slots (`poisson_draw`)."""
  num_clients = env.data.train.num_clients
  if clients_per_round is None and build.cohort_sampling(env.config) == "poisson":
    ids, _ = poisson_draw(env, round_idx)
    return federated.make_cohort(ids, multiple=env.cohort_multiple,
                                 size=build.poisson_slots(env.config, num_clients))
  k = clients_per_round or env.config.clients_per_round
  ids = data_lib.sample_uniform(num_clients, k, env.config.seeds.sampling, round_idx)
  return federated.make_cohort(ids, multiple=env.cohort_multiple)


def poisson_draw(env: Env, round_idx: int) -> tuple[np.ndarray, int]:
  """(ids, dropped) of round `round_idx` under Poisson sampling (`data.sample_poisson`
  at q = clients_per_round / num_clients into `build.poisson_slots` slots)."""
  n = env.data.train.num_clients
  return data_lib.sample_poisson(n, min(1.0, env.config.clients_per_round / n),
                                 build.poisson_slots(env.config, n), env.config.seeds.sampling,
                                 round_idx)


def make_evaluator(env: Env, apply_fn: Callable) -> Callable[[Any, Any], dict]:
  """Returns eval(params, batch_stats) -> {test_accuracy, test_loss, local_accuracy_mean, _p10}.

  Global = the central test set (union of the clients' test sets); local = each
  client's own test set, averaged over clients.
  """
  batch_size = env.config.eval_batch_size
  data = env.data
  if not build.evaluates_per_example(env.config):  # static BN: each client's own batches
    central = jax.jit(federated.make_evaluate(apply_fn, batch_size=batch_size))
    per_client = jax.jit(federated.make_evaluate_clients(apply_fn, batch_size=batch_size))
    central_and_local = lambda params, stats, x, y, ids: (
        central(params, stats, x, y), per_client(params, stats, data.test_clients))
  else:
    # One pass over the pooled test set gives both (FEMNIST: 4,759 rows, where each
    # client's padded set ran 300 x 36 = 10,800 and took 4/5 of an evaluation).
    central_and_local = jax.jit(functools.partial(
        federated.make_evaluate_pooled_clients(apply_fn, batch_size=batch_size),
        num_clients=int(data.test_clients.num_examples.shape[0])))

  def evaluate(params, batch_stats) -> dict:
    if env.mesh is not None:
      # The round leaves the state replicated over the mesh; evaluating that would run
      # the whole evaluation once per device. One device's copy is enough.
      params, batch_stats = jax.device_put((params, batch_stats), env.mesh.devices.flat[0])
    central, local = central_and_local(params, batch_stats, data.test_x, data.test_y,
                                       data.test_client_ids)
    c = central.means()
    n = np.asarray(local.num_examples)
    acc = np.asarray(local.correct_sum)[n > 0] / n[n > 0]
    return {"test_accuracy": float(c["accuracy"]), "test_loss": float(c["loss"]),
            "local_accuracy_mean": float(acc.mean()),
            "local_accuracy_p10": float(np.percentile(acc, 10))}

  return evaluate


def model_fns(env: Env, strategy: performance.Strategy) -> federated.ModelFns:
  """How this run builds and evaluates any architecture: the data's normalisation, the
  strategy's convolution implementation, the config's compute precision, the run's test data."""
  return federated.ModelFns(
      apply_for=lambda spec: build.build_apply(spec, env.data.normalize, strategy.conv_impl,
                                               build.compute_dtype(env.config)),
      evaluate_with=lambda apply_fn: make_evaluator(env, apply_fn))


def is_eval_round(config, round_idx: int) -> bool:
  """Whether round `round_idx` (0-based) ends with an evaluation: every `eval_every`, and the last."""
  return (round_idx + 1) % config.eval_every == 0 or round_idx + 1 == config.rounds


def is_checkpoint_round(config, round_idx: int) -> bool:
  """Whether round `round_idx` (0-based) ends with a checkpoint: every `checkpoint_every`
  (0 = never), and the last."""
  every = config.get("checkpoint_every", 0)
  return bool(every) and ((round_idx + 1) % every == 0 or round_idx + 1 == config.rounds)


def run_clock_start(meta: dict | None = None) -> float:
  """`time.perf_counter()` origin of a run's wall clock.

  A resumed run continues the clock of the run it resumes (the checkpoint meta's
  `wall_time_s`, see `timing_meta`), so the records' `wall_time` and the summary's
  `wall_time_s` count each round of the result once; the time a killed run spent
  after its last checkpoint is not counted.
  """
  return time.perf_counter() - float((meta or {}).get("wall_time_s", 0.0))


def timing_meta(start: float, timings: dict) -> dict:
  """Checkpoint meta that lets a resumed run continue the clock (`run_clock_start`) and
  report the strategy calibration it did not repeat (`checkpointed_strategy`)."""
  return {"wall_time_s": time.perf_counter() - start, "strategy_timings_s": timings}


def progress_bar(total: int, enabled: bool, initial: int = 0):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, desc="rounds", unit="round")


def named_strategy(env: Env, name: str) -> performance.Strategy:
  """`config.strategy` by name; with a mesh (config.shard_clients) it is sharded."""
  strategy = performance.Strategy.from_name(name)
  return dataclasses.replace(strategy, sharded=strategy.sharded or env.mesh is not None)


def mesh_for(env: Env, strategy: performance.Strategy):
  """The mesh a round with `strategy` runs on: env.mesh when the strategy is sharded."""
  if strategy.sharded and env.mesh is None:
    raise ValueError(f"strategy {strategy.name!r} is sharded but this run has no device mesh "
                     "(config.shard_clients=False or a single device)")
  return env.mesh if strategy.sharded else None


def auto_candidates(*, cohort_size: int, has_conv: bool, unroll: int, lowrank: bool,
                    has_mesh: bool, backend: str | None = None) -> list[performance.Strategy]:
  """The strategies `strategy='auto'` times: `performance.candidate_strategies`, and with a
  device mesh their sharded variants (on CPU next to the unsharded ones, on accelerators
  instead of them).

  On CPU a device of a sharded round has one core (`performance.split_cpu_into_devices`), so
  two kinds of candidate are timed unsharded only: written-out local steps (they overlap
  one step's tail with the next step's head on the cores of a device; measured: no gain
  sharded), and a conv net's clients vectorised with `vmap`/chunks (on one core that only
  adds memory: sharded they ran 2.4-3.6x slower than the sequential sharded round in the
  main job, LEAF CNN, 10 clients, and compiling and timing them was a third of its
  calibration).
  """
  backend = backend or jax.default_backend()
  candidates = performance.candidate_strategies(cohort_size=cohort_size, has_conv=has_conv,
                                              backend=backend, unroll=unroll, lowrank=lowrank)
  if not has_mesh:
    return candidates
  on_cpu = backend == "cpu"

  def worth_sharding(s: performance.Strategy) -> bool:
    if not on_cpu:
      return True
    return s.unroll == 1 and not (has_conv and not isinstance(s.execution, federated.Sequential))

  sharded = [dataclasses.replace(s, sharded=True) for s in candidates if worth_sharding(s)]
  # On CPU (one device per core) sharding wins for compute-bound models and loses for
  # tiny dispatch-bound ones at small cohorts: time both. Accelerators always shard.
  return sharded + candidates if on_cpu else sharded


def checkpointed_strategy(env: Env) -> tuple[performance.Strategy, dict] | None:
  """(strategy, calibration timings) saved with the workdir's latest checkpoint, or None."""
  meta = env.checkpoint.latest_meta()
  if not meta or not meta.get("strategy"):
    return None  # a checkpoint from before strategies were saved: choose as a fresh run
  # The calibration timings of the run that chose it (absent in older checkpoints).
  return performance.Strategy.from_name(meta["strategy"]), dict(meta.get("strategy_timings_s") or {})


def server_statistic_tag(config) -> str:
  """What the round computes on the server beyond the mean, for the strategy cache key: a
  robust statistic or DP / compression changes which strategy is fastest (a statistic
  over the stacked clients runs on every device's share of the coordinates when sharded,
  `federated._engine.spread_over_coordinates`), so runs differing in it are timed apart."""
  robust = config.get("robust")
  aggregator = "mean" if robust is None else robust.aggregator
  return (f"method={config.get('method', 'fedavg')}|server={aggregator}"
          + ("+dp" if config.get("privacy") is not None else "")
          + ("+compressed" if config.get("compression") is not None else ""))


def choose_strategy(env: Env, spec, params, batch_stats,
                    algorithm_for: Callable[..., federated.FedAlgorithm],
                    cohort: federated.Cohort, *,
                    lowrank: performance.LowRankDense | None = None) -> tuple[performance.Strategy, dict]:
  """Client-execution strategy: `config.strategy` by name, or 'auto' = time a 2-step round
  of each candidate (result cached on disk per model/cohort/batch shape).

  A resumed run (the workdir holds a checkpoint: a fresh run has removed old ones)
  reuses the strategy saved with it (another one would sum in another order) and
  reports that run's calibration.

  Args:
    algorithm_for: (apply_fn, schedule) -> FedAlgorithm whose `init(params, key,
      batch_stats=...)` builds a server state for `params`; with `lowrank`, also
      (apply_fn, schedule, lowrank) for the '+lowrank' candidates.
    lowrank: the `LowRankDense` the run may use (`build.build_lowrank`); None = no
      '+lowrank' candidates.

  Returns:
    (strategy, timings in seconds per candidate; {} when named).
  """
  config = env.config
  saved = checkpointed_strategy(env)
  if saved is not None:
    env.log(f"  resumed run: client execution {saved[0].name}, as saved with its checkpoint")
    return saved
  if config.strategy != "auto":
    strategy = named_strategy(env, config.strategy)
    if strategy.lowrank and lowrank is None:
      raise build.ConfigError(f"config.strategy={config.strategy!r}: '+lowrank' (dense kernels "
                              "trained as factors) needs a dense FedAvg-family run with SGD clients "
                              "and an MLP/ConvNet with a dense layer worth factoring; this run is "
                              "not one")
    return strategy, {}
  short = federated.LocalSchedule(batch_size=config.client.batch_size, num_steps=2)

  def run_round_for(strategy):
    apply_fn = build.build_apply(spec, env.data.normalize, strategy.conv_impl,
                                 build.compute_dtype(config))
    if strategy.lowrank:
      alg = algorithm_for(apply_fn, strategy.schedule(short), lowrank)
    else:
      alg = algorithm_for(apply_fn, strategy.schedule(short))
    round_fn = strategy.make_round(alg, mesh=mesh_for(env, strategy))
    state = alg.init(params, jax.random.key(0), batch_stats=batch_stats)

    def run():
      jax.block_until_ready(round_fn(state, env.data.train, cohort, jax.random.key(1)))

    return run

  # The most local steps that can be written out without a client wasting one.
  unroll = federated.waste_free_unroll(np.asarray(env.data.train.num_examples),
                                       build.build_schedule(config))
  candidates = auto_candidates(cohort_size=len(cohort.client_ids), has_conv=build.has_conv(spec),
                               unroll=unroll, lowrank=lowrank is not None,
                               has_mesh=env.mesh is not None)
  cache_path = config.strategy_cache or build.default_strategy_cache()
  key = (f"{spec!r}|C={len(cohort.client_ids)}|B={config.client.batch_size}"
         f"|E={env.data.train.max_examples}|unroll={unroll}|{jax.default_backend()}"
         f"|mesh={env.mesh.size if env.mesh is not None else 0}|{server_statistic_tag(config)}"
         f"|lowrank={','.join(lowrank.layers) + f'@{lowrank.rows}' if lowrank is not None else ''}")
  env.log(f"choosing the client execution among {len(candidates)} strategies (timings cached in {cache_path})")
  return performance.select_strategy(run_round_for, candidates, cache_path=cache_path,
                                   cache_key=key, log=env.log)

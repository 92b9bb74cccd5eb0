"""Driver for the sparse-FL baselines of FedTiny's comparison (config.sparse.method).

  feddst     client prune/regrow + mask voting (fedjax_prune.pruning.feddst)
  prunefl    initial pruning on the largest client + adaptive importance (pruning.prunefl);
             sparse.prunefl_min_per_output (default 1, 0 = paper) keeps every output unit connected
  lotteryfl  federated iterative magnitude pruning with rewinding (pruning.lotteryfl)
  snip       SNIP mask at initialisation (one client's mini-batch), then masked FedAvg
  synflow    SynFlow mask at initialisation (data-free), then masked FedAvg
  dense      dense FedAvg (density 1)

FedTiny itself has its own driver (`experiments/methods/fedtiny.py`) and shares
`train_loop` and `spec_for` with this one. Every round record carries the
global density and the per-client cost of the round (`accounting.client_round_cost`:
training FLOPs, peak memory, bytes up/down, averaged over the cohort's clients), plus
the fields FedAvg's records have (`fedavg.size_record`): the kept `params` and sparse
`flops` and `density/<layer path>` per prunable layer of the server model after the round
(the one evaluated), and `bytes_up` / `bytes_down` of the whole cohort under the masks the
round trained with (bitmap encoding). The summary's `params` / `flops` are the final kept
sizes, `dense_params` / `dense_flops` the dense model's (as ASP's summary).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import build, runtime
from experiments.methods import fedavg as fedavg_driver
from fedjax_prune import accounting, federated, models
from fedjax_prune import data as data_lib
from fedjax_prune import masks as masks_lib
from fedjax_prune.pruning import _sparse, feddst, init_pruning, lotteryfl, prunefl
from fedjax_prune.pruning import fedtiny as fedtiny_lib

METHODS = ("feddst", "prunefl", "lotteryfl", "snip", "synflow", "dense")
VGG11_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)


def validate_common(config) -> None:
  """The config.sparse fields shared by FedTiny and the baselines."""
  if "sparse" not in config:
    raise build.ConfigError("config field 'sparse' is missing (see experiments/configs/sparse_cifar10.py)")
  build._float_in(config, "sparse.density", 0.0, 1.0, lo_open=True)
  build._choice(config, "sparse.distribution", _sparse.DISTRIBUTIONS)
  build._int_in(config, "sparse.adjust_every", 1)
  build._int_in(config, "sparse.adjust_end", 1)
  build._float_in(config, "sparse.adjust_alpha", 0.0, 1.0)
  build._int_in(config, "sparse.growth_batch_size", 0)
  if config.model.name not in ("vgg11", "resnet18", "mlp"):
    raise build.ConfigError(f"config.model.name={config.model.name!r} is invalid for sparse methods: "
                            "allowed one of ('vgg11', 'resnet18', 'mlp')")


def validate(config) -> None:
  validate_common(config)
  method = build._choice(config, "sparse.method", METHODS)
  if method == "feddst":
    build._int_in(config, "sparse.post_adjust_steps", 0)
  if method == "prunefl":
    build._int_in(config, "sparse.prunefl_init_iterations", 1)
    build._int_in(config, "sparse.prunefl_adjust_every", 1)
    build._int_in(config, "sparse.importance_batches", 1)
    if "prunefl_min_per_output" in config.sparse:
      build._int_in(config, "sparse.prunefl_min_per_output", 0)
  if method == "lotteryfl":
    build._int_in(config, "sparse.lottery_prune_every", 1)
    steps = build._int_in(config, "sparse.lottery_steps", 1)
    every = config.sparse.lottery_prune_every
    if steps * every > config.rounds:
      raise build.ConfigError(
          f"config.sparse.lottery_steps={steps} x lottery_prune_every={every} exceeds "
          f"config.rounds={config.rounds}: LotteryFL would not reach the target density")
    build._float_in(config, "sparse.lottery_accuracy_threshold", 0.0, 1.0)
  if method == "synflow":
    build._int_in(config, "sparse.synflow_iterations", 1)


def spec_for(config, data: build.Data):
  """build.build_spec, plus VGG-11 widths scaled by config.model.width_multiplier."""
  m = config.model
  if m.name == "vgg11":
    widths = tuple(max(1, round(w * m.width_multiplier)) for w in VGG11_WIDTHS)
    return models.vgg11(num_classes=data.num_classes, norm=m.norm, widths=widths,
                        input_shape=tuple(data.input_shape))
  return build.build_spec(config, data.input_shape, data.num_classes)


def client_optimizer(config) -> optax.GradientTransformation:
  c = config.client
  if c.optimizer == "sgd":
    return optax.sgd(c.learning_rate, momentum=c.momentum or None)
  return optax.adam(c.learning_rate)


def optimizer_slots(config) -> int:
  c = config.client
  return (1 if c.momentum else 0) if c.optimizer == "sgd" else 2


def local_schedule(config) -> federated.LocalSchedule:
  c = config.client
  return federated.LocalSchedule(batch_size=c.batch_size, num_epochs=c.num_epochs,
                                 num_steps=c.num_steps or None)


def host_masks(masks):
  return jax.tree.map(np.asarray, jax.device_get(masks))


def layer_names(paths) -> list[str]:
  """'conv_0/kernel' -> 'conv_0' (the names of accounting.layer_costs)."""
  return [p[:-len("/kernel")] if p.endswith("/kernel") else p for p in paths]


CostFn = Callable[[int, Any, dict], accounting.ClientRoundCost]


def train_loop(config, env: runtime.Env, *, spec, alg: federated.FedAlgorithm, state, apply_fn,
               strategy, cost_fn: CostFn, prunable, extra_summary: dict, setup_time_s: float) -> dict:
  """Runs the rounds (with checkpoint resume), writes records, returns the summary.

  `cost_fn(round_idx, host_masks, record) -> ClientRoundCost` gives one client's
  cost of the round (record holds the round's metrics, e.g. local_steps). `prunable`
  is the algorithm's static filter: its leaves get `density/<path>` record fields.
  """
  data = env.data
  # The round donates its state: give it buffers of its own (no leaf shared with the caller
  # or repeated inside the state, e.g. one `()` mask array reused for several leaves).
  state = jax.tree.map(jnp.copy, state)
  round_fn = federated.make_round(alg, execution=strategy.execution,
                                  mesh=runtime.mesh_for(env, strategy), donate=True)
  evaluate = runtime.make_evaluator(env, apply_fn)
  train_root = jax.random.key(config.seeds.training)
  start_round = 0
  totals = dict(client_training_flops=0, client_upload_bytes=0, client_download_bytes=0)
  peak_memory = 0
  totals_from = 0  # the first round the totals count
  meta = {}
  restored = env.checkpoint.restore(lambda meta: state)
  if restored is not None:
    start_round, state, meta = restored
    # The per-round cost totals of the rounds before the checkpoint (so the summary's
    # per-round averages cover the whole run, as an uninterrupted run's do).
    saved = dict(meta.get("cost_totals") or {})
    if saved:
      peak_memory = saved.pop("client_peak_memory_bytes")
      totals = saved
    else:  # a checkpoint without totals: the averages cover the rounds run from here
      totals_from = start_round
    env.metrics.truncate_to_round(start_round)
    env.log(f"resumed from the checkpoint after round {start_round}")
  progress = runtime.progress_bar(config.rounds, config.progress, initial=start_round)
  start = runtime.run_clock_start(meta)
  last_eval: dict = {}
  masks_np = host_masks(state.masks)
  shapes, _ = models.param_shapes(spec)
  layers = fedavg_driver.prunable_layers(state.params, prunable)
  # Host-side accounting of the masks, redone only when they change (never inside the round).
  # pruned=True: bitmap encoding (all-True `()` masks, as the dense baseline's, send no bits).
  size_of = lambda m: fedavg_driver.size_record(spec, m, True, config.clients_per_round, layers)
  sizes = size_of(masks_np)
  for round_idx in range(start_round, config.rounds):
    round_masks, round_sizes = masks_np, sizes  # the masks the clients trained under
    state, metrics = round_fn(state, data.train, runtime.cohort_for(env, round_idx),
                              federated.round_key(train_root, round_idx))
    record = runtime.round_record(metrics, round_idx, start)
    if "density" not in record:  # FedAvg-based methods (fixed masks): the density of the masks
      record["density"] = float(masks_lib.density(round_masks, shapes))
    cost = cost_fn(round_idx, round_masks, record)
    record.update(client_training_flops=cost.training_flops, client_peak_memory_bytes=cost.peak_memory,
                  client_upload_bytes=cost.upload, client_download_bytes=cost.download)
    totals["client_training_flops"] += cost.training_flops
    totals["client_upload_bytes"] += cost.upload
    totals["client_download_bytes"] += cost.download
    peak_memory = max(peak_memory, cost.peak_memory)
    if record.get("adjusted", 0.0) or record.get("pruned", 0.0):
      masks_np = host_masks(state.masks)
      sizes = size_of(masks_np)
    # Sizes of the model after the round (as the record's density), traffic of the round.
    record.update(sizes, bytes_up=round_sizes["bytes_up"], bytes_down=round_sizes["bytes_down"])
    if runtime.is_eval_round(config, round_idx):
      last_eval = evaluate(state.params, state.batch_stats)
      record.update(last_eval)
    env.metrics.write(record)
    if runtime.is_checkpoint_round(config, round_idx):
      env.checkpoint.save(round_idx + 1, state, {
          "spec": repr(spec), "cost_totals": {**totals, "client_peak_memory_bytes": peak_memory},
          "strategy": strategy.name,
          **runtime.timing_meta(start, extra_summary.get("strategy_timings_s", {}))})
    progress.update(1)
    progress.set_postfix(loss=f"{record['train_loss']:.3f}",
                         acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}")
  progress.close()
  if not last_eval:  # resumed from the final checkpoint: evaluate the restored model
    last_eval = evaluate(state.params, state.batch_stats)
  rounds_run = max(config.rounds - totals_from, 1)
  final_masks = host_masks(state.masks)
  return {
      "rounds": config.rounds, "wall_time_s": time.perf_counter() - start,
      "setup_time_s": setup_time_s, "strategy": strategy.name,
      # Kept sizes under `params` / `flops`, as every other method reports (plots, sweep tables).
      "params": accounting.param_count(spec, final_masks), "dense_params": accounting.param_count(spec),
      "density": float(masks_lib.density(final_masks, jax.device_get(state.params))),
      "flops": accounting.flops(spec, final_masks), "dense_flops": accounting.flops(spec),
      "client_training_flops_per_round": totals["client_training_flops"] / rounds_run,
      "client_upload_bytes_per_round": totals["client_upload_bytes"] / rounds_run,
      "client_download_bytes_per_round": totals["client_download_bytes"] / rounds_run,
      "client_peak_memory_bytes": peak_memory, "data": data.description, **extra_summary,
      **last_eval,
  }


def mean_steps(record: dict) -> int:
  """Average real local steps per client of the round (the cost model's local_steps)."""
  return int(round(record["local_steps"] / max(record["num_clients"], 1.0)))


def _choose(config, env, spec, params, batch_stats, algorithm_for):
  strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats, algorithm_for,
                                              runtime.cohort_for(env, 0))
  env.log(f"client execution: {strategy.name}")
  return strategy, timings


def run(config, env: runtime.Env) -> dict:
  setup_start = time.perf_counter()
  data, s = env.data, config.sparse
  method = s.method
  spec = spec_for(config, data)
  params, batch_stats = models.init_params(spec, jax.random.key(config.seeds.init))
  prunable = _sparse.prunable_filter(params)
  flags = _sparse.leaf_flags(params, prunable)
  opt, schedule = client_optimizer(config), local_schedule(config)
  growth = s.growth_batch_size or config.client.batch_size
  density = 1.0 if method == "dense" else float(s.density)
  slots = optimizer_slots(config)
  # PruneFL's per-output-unit floor (our default 1; 0 = the paper's global top-k). Older
  # configs without the field get the default.
  prunefl_floor = int(s.get("prunefl_min_per_output", 1))

  def make_alg(apply_fn, sched):
    if method == "feddst":
      post = (federated.LocalSchedule(batch_size=config.client.batch_size, num_steps=s.post_adjust_steps)
              if s.post_adjust_steps else None)
      return feddst.feddst(apply_fn, opt, sched, prunable=prunable, adjust_every=s.adjust_every,
                           adjust_end=s.adjust_end, adjust_alpha=s.adjust_alpha,
                           post_adjust=post if sched is schedule else None, growth_batch_size=growth)
    if method == "prunefl":
      return prunefl.prunefl(apply_fn, opt, sched, prunable=prunable,
                             adjust_every=s.prunefl_adjust_every, adjust_end=s.adjust_end,
                             importance_batches=s.importance_batches,
                             min_per_output=prunefl_floor)
    if method == "lotteryfl":
      return lotteryfl.lotteryfl(apply_fn, opt, sched, prunable=prunable,
                                 densities=_sparse.layer_densities(params, density, s.distribution, prunable),
                                 prune_every=s.lottery_prune_every, num_prune_steps=s.lottery_steps,
                                 accuracy_threshold=s.lottery_accuracy_threshold)
    return federated.fedavg(apply_fn, opt, sched)

  strategy, timings = _choose(config, env, spec, params, batch_stats, make_alg)
  apply_fn = build.build_apply(spec, data.normalize, strategy.conv_impl, build.compute_dtype(config))
  schedule = strategy.schedule(schedule)  # its step unrolling
  alg = make_alg(apply_fn, schedule)
  extra: dict = {"sparse_method": method, "target_density": density, "strategy_timings_s": timings}
  init_key = jax.random.key(config.seeds.init)

  if method == "dense":
    masks = federated.dense_masks(params)  # explicit: the records report their density (1.0)
  elif method == "feddst":
    params, masks = fedtiny_lib.sparse_setup(params, density, distribution=s.distribution,
                                             prunable=prunable)
  elif method == "prunefl":
    # The "powerful" client: the one with the most local examples.
    big = int(np.argmax(np.asarray(data.train.num_examples)))
    params, batch_stats, masks = prunefl.initial_masks(
        apply_fn, opt, schedule, params, batch_stats, data_lib.client_slice(data.train, big),
        jax.random.fold_in(init_key, 1), density=density, prunable=prunable,
        num_iterations=s.prunefl_init_iterations, min_per_output=prunefl_floor)
    n_big = int(np.asarray(data.train.num_examples)[big])
    steps = s.prunefl_init_iterations * schedule.total_steps(n_big)
    extra.update(prunefl_init_client=big, prunefl_init_client_flops=accounting.client_round_cost(
        spec, None, batch_size=config.client.batch_size, local_steps=steps).training_flops)
  elif method == "lotteryfl":
    masks = None  # starts dense; the algorithm prunes towards the target
  elif method == "snip":
    x = data.train.x[0, :config.client.batch_size]
    y = data.train.y[0, :config.client.batch_size]
    n0 = int(np.asarray(data.train.num_examples)[0])
    x, y = x[:max(1, min(n0, x.shape[0]))], y[:max(1, min(n0, y.shape[0]))]
    masks = init_pruning.snip_masks(apply_fn, params, batch_stats, x, y, density=density,
                                    prunable=prunable)
  else:  # synflow
    masks = init_pruning.synflow_masks(apply_fn, params, batch_stats, tuple(data.input_shape),
                                       density=density, prunable=prunable,
                                       num_iterations=s.synflow_iterations)
  if method in ("snip", "synflow"):
    state = alg.init(_sparse.apply_masks(params, masks), init_key, batch_stats=batch_stats, masks=masks)
  else:
    state = alg.init(params, init_key, batch_stats=batch_stats, masks=masks)

  batch = config.client.batch_size
  num_prunable = sum(int(np.prod(np.shape(p))) for p, f in zip(jax.tree.leaves(params), flags) if f)

  def cost_fn(round_idx, masks_np, record):
    m = None if method == "dense" else masks_np
    adjusted = bool(record.get("adjusted", 0.0))
    kwargs: dict = {}
    if method == "feddst" and adjusted:
      kwargs = dict(dense_grad_batches=1)
    if method == "prunefl" and adjusted:
      kwargs = dict(dense_grad_batches=s.importance_batches, upload_dense_values=num_prunable)
    return accounting.client_round_cost(spec, m, batch_size=batch, local_steps=mean_steps(record),
                                        optimizer_slots=slots, **kwargs)

  return train_loop(config, env, spec=spec, alg=alg, state=state, apply_fn=apply_fn,
                    strategy=strategy, cost_fn=cost_fn, prunable=prunable, extra_summary=extra,
                    setup_time_s=time.perf_counter() - setup_start)

"""Driver for the sparse-FL baselines of FedTiny's comparison (config.sparse.method).

  feddst     client prune/regrow + mask voting (fedjax_prune.pruning.feddst)
  prunefl    initial pruning on the largest client + adaptive importance (pruning.prunefl);
             sparse.prunefl_min_per_output (default 1, 0 = paper) keeps every output unit connected
  lotteryfl  federated iterative magnitude pruning with rewinding (pruning.lotteryfl)
  snip       SNIP mask at initialisation (one client's mini-batch), then masked FedAvg
  synflow    SynFlow mask at initialisation (data-free), then masked FedAvg
  dense      dense FedAvg (density 1)

FedTiny itself has its own module (`experiments/methods/fedtiny.py`) and shares
`masked_method` and `spec_for` with this one. Every round record carries the
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

from experiments import build as build_lib, runtime
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
    raise build_lib.ConfigError("config field 'sparse' is missing (see experiments/configs/sparse_cifar10.py)")
  build_lib._float_in(config, "sparse.density", 0.0, 1.0, lo_open=True)
  build_lib._choice(config, "sparse.distribution", _sparse.DISTRIBUTIONS)
  build_lib._int_in(config, "sparse.adjust_every", 1)
  build_lib._int_in(config, "sparse.adjust_end", 1)
  build_lib._float_in(config, "sparse.adjust_alpha", 0.0, 1.0)
  build_lib._int_in(config, "sparse.growth_batch_size", 0)
  if config.model.name not in ("vgg11", "resnet18", "mlp"):
    raise build_lib.ConfigError(f"config.model.name={config.model.name!r} is invalid for sparse methods: "
                            "allowed one of ('vgg11', 'resnet18', 'mlp')")


def validate(config) -> None:
  validate_common(config)
  method = build_lib._choice(config, "sparse.method", METHODS)
  if method == "feddst":
    build_lib._int_in(config, "sparse.post_adjust_steps", 0)
  if method == "prunefl":
    build_lib._int_in(config, "sparse.prunefl_init_iterations", 1)
    build_lib._int_in(config, "sparse.prunefl_adjust_every", 1)
    build_lib._int_in(config, "sparse.importance_batches", 1)
    if "prunefl_min_per_output" in config.sparse:
      build_lib._int_in(config, "sparse.prunefl_min_per_output", 0)
  if method == "lotteryfl":
    build_lib._int_in(config, "sparse.lottery_prune_every", 1)
    steps = build_lib._int_in(config, "sparse.lottery_steps", 1)
    every = config.sparse.lottery_prune_every
    if steps * every > config.rounds:
      raise build_lib.ConfigError(
          f"config.sparse.lottery_steps={steps} x lottery_prune_every={every} exceeds "
          f"config.rounds={config.rounds}: LotteryFL would not reach the target density")
    build_lib._float_in(config, "sparse.lottery_accuracy_threshold", 0.0, 1.0)
  if method == "synflow":
    build_lib._int_in(config, "sparse.synflow_iterations", 1)


def spec_for(config, data: build_lib.Data):
  """build_lib.build_spec, plus VGG-11 widths scaled by config.model.width_multiplier."""
  m = config.model
  if m.name == "vgg11":
    widths = tuple(max(1, round(w * m.width_multiplier)) for w in VGG11_WIDTHS)
    return models.vgg11(num_classes=data.num_classes, norm=m.norm, widths=widths,
                        input_shape=tuple(data.input_shape))
  return build_lib.build_spec(config, data.input_shape, data.num_classes)


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


def masked_method(config, env: runtime.Env, *, spec, alg: federated.FedAlgorithm, init_fn,
                  apply_fn, cost_fn: CostFn, prunable, params_template) -> federated.Method:
  """The `Method` of a masked-FedAvg-style algorithm (FedTiny and the sparse baselines).

  `init_fn() -> (server state, summary fields)` builds the starting state (masks at
  initialisation, candidate selection, ...); the summary fields (e.g. FedTiny's
  selected candidate) are kept in the host state, so a resumed run reports them too.
  `cost_fn(round_idx, host_masks, record) -> ClientRoundCost` gives one client's cost
  of the round (record holds the round's metrics, e.g. local_steps). `prunable` is the
  algorithm's static filter: its leaves get `density/<path>` record fields.
  """
  shapes, _ = models.param_shapes(spec)
  layers = fedavg_driver.prunable_layers(params_template, prunable)
  # Host-side accounting of the masks, redone only when they change (never inside the round).
  # pruned=True: bitmap encoding (all-True `()` masks, as the dense baseline's, send no bits).
  size_of = lambda m: fedavg_driver.size_record(spec, m, True, config.clients_per_round, layers)

  def with_masks(state, cost=None):
    masks_np = host_masks(state.server.masks)
    return state._replace(cache={"masks": masks_np, "sizes": size_of(masks_np), "cost": cost})

  def init():
    server, summary = init_fn()
    totals = dict(client_training_flops=0, client_upload_bytes=0, client_download_bytes=0,
                  client_peak_memory_bytes=0)
    return with_masks(federated.MethodState(server, spec, {"cost_totals": totals,
                                                           "summary": summary}))

  def after_round(state, round_idx, metrics):
    cost = cost_fn(round_idx, state.cache["masks"], metrics)  # the masks the clients trained under
    t = dict(state.host["cost_totals"])
    t["client_training_flops"] += cost.training_flops
    t["client_upload_bytes"] += cost.upload
    t["client_download_bytes"] += cost.download
    t["client_peak_memory_bytes"] = max(t["client_peak_memory_bytes"], cost.peak_memory)
    state = state._replace(host={**state.host, "cost_totals": t})
    if metrics.get("adjusted", 0.0) or metrics.get("pruned", 0.0):
      return with_masks(state, cost)
    return state._replace(cache={**state.cache, "cost": cost})

  def record(before, after, round_idx, metrics):
    out = {}
    if "density" not in metrics:  # FedAvg-based methods (fixed masks): the density of the masks
      out["density"] = float(masks_lib.density(before.cache["masks"], shapes))
    cost = after.cache["cost"]
    out.update(client_training_flops=cost.training_flops, client_peak_memory_bytes=cost.peak_memory,
               client_upload_bytes=cost.upload, client_download_bytes=cost.download)
    # Sizes of the model after the round (as the record's density), traffic of the round.
    out.update(after.cache["sizes"], bytes_up=before.cache["sizes"]["bytes_up"],
               bytes_down=before.cache["sizes"]["bytes_down"])
    return out

  def evaluator(spec):
    evaluate = runtime.make_evaluator(env, apply_fn)
    return lambda state, round_idx: evaluate(state.server.params, state.server.batch_stats)

  def summary(state, last_eval):
    totals = state.host["cost_totals"]
    rounds = max(config.rounds, 1)
    final_masks = state.cache["masks"]
    return {
        # Kept sizes under `params` / `flops`, as every other method reports (plots, sweep tables).
        "params": accounting.param_count(spec, final_masks), "dense_params": accounting.param_count(spec),
        "density": float(masks_lib.density(final_masks, jax.device_get(state.server.params))),
        "flops": accounting.flops(spec, final_masks), "dense_flops": accounting.flops(spec),
        "client_training_flops_per_round": totals["client_training_flops"] / rounds,
        "client_upload_bytes_per_round": totals["client_upload_bytes"] / rounds,
        "client_download_bytes_per_round": totals["client_download_bytes"] / rounds,
        "client_peak_memory_bytes": totals["client_peak_memory_bytes"], **state.host["summary"]}

  return federated.Method(init=init, algorithm=lambda spec: alg, evaluator=evaluator,
                          after_round=after_round, record=record, summary=summary,
                          resume=with_masks)


def mean_steps(record: dict) -> int:
  """Average real local steps per client of the round (the cost model's local_steps)."""
  return int(round(record["local_steps"] / max(record["num_clients"], 1.0)))


def _choose(config, env, spec, params, batch_stats, algorithm_for):
  strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats, algorithm_for,
                                              runtime.cohort_for(env, 0))
  env.log(f"client execution: {strategy.name}")
  return strategy, timings


def build(config, env: runtime.Env) -> runtime.Run:
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
  apply_fn = build_lib.build_apply(spec, data.normalize, strategy.conv_impl, build_lib.compute_dtype(config))
  schedule = strategy.schedule(schedule)  # its step unrolling
  alg = make_alg(apply_fn, schedule)
  init_key = jax.random.key(config.seeds.init)

  def init_fn():
    extra: dict = {"sparse_method": method, "target_density": density}
    return initial_state(params, batch_stats, extra), extra

  def initial_state(params, batch_stats, extra):
    """The server state with the method's masks at initialisation (adds to `extra`)."""
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
      return alg.init(_sparse.apply_masks(params, masks), init_key, batch_stats=batch_stats, masks=masks)
    return alg.init(params, init_key, batch_stats=batch_stats, masks=masks)

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

  method_ = masked_method(config, env, spec=spec, alg=alg, init_fn=init_fn, apply_fn=apply_fn,
                          cost_fn=cost_fn, prunable=prunable, params_template=params)
  return runtime.Run(method_, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))

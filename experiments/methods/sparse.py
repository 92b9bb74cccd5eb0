"""The sparse-FL baselines of FedTiny's comparison (config.sparse.method): config -> the
library's method factory.

  feddst     client prune/regrow + mask voting (`pruning.feddst.feddst_method`)
  prunefl    initial pruning on the largest client + adaptive importance
             (`pruning.prunefl.prunefl_method`); sparse.prunefl_min_per_output (default 1,
             0 = paper) keeps every output unit connected
  lotteryfl  federated iterative magnitude pruning with rewinding (`pruning.lotteryfl.lotteryfl_method`)
  snip       SNIP mask at initialisation (one client's mini-batch), then masked FedAvg
             (`pruning.init_pruning.snip_method`)
  synflow    SynFlow mask at initialisation (data-free), then masked FedAvg
             (`pruning.init_pruning.synflow_method`)
  dense      dense FedAvg (density 1, `pruning.base.dense_method`)

Each is a `pruning.base.MaskRule` run by `pruning.base.masked_fedavg`; the records and
summary (global density, per-client cost of the round, kept sizes) are
`pruning.base.masked_method`'s. With config.privacy / config.compression the aggregator
(`build.in_path_aggregator`) is in the algorithm's path, its state (the adaptive clip
norm, error-feedback memory) in the server state and its checkpoints. FedTiny has its own module (`experiments/methods/fedtiny.py`)
and shares `validate_common`, `spec_for` and `sparse_run` with this one.
"""
from __future__ import annotations

import jax
import optax

from experiments import build as build_lib, runtime
from fedjax_prune import federated, models
from fedjax_prune.pruning import _sparse, base, feddst, fedtiny, init_pruning, lotteryfl, prunefl

METHODS = ("feddst", "prunefl", "lotteryfl", "snip", "synflow", "dense")
VGG11_WIDTHS = (64, 128, 256, 256, 512, 512, 512, 512)
# Text models: their kernels are prunable, the embedding tables dense (`_sparse.prunable_filter`).
MODELS = ("vgg11", "resnet18", "mlp") + build_lib.TEXT_MODELS


def validate_common(config) -> None:
  """The config.sparse fields shared by FedTiny and the baselines."""
  if "sparse" not in config:
    raise build_lib.ConfigError("config field 'sparse' is missing (see experiments/configs/sparse_cifar10.py)")
  build_lib._float_in(config, "sparse.density", 0.0, 1.0, lo_open=True)
  build_lib._choice(config, "sparse.distribution", _sparse.DISTRIBUTIONS)
  build_lib._int_in(config, "sparse.adjust_every", 0)
  build_lib._int_in(config, "sparse.adjust_end", 0)
  build_lib._float_in(config, "sparse.adjust_alpha", 0.0, 1.0)
  build_lib._int_in(config, "sparse.growth_batch_size", 0)
  if config.model.name not in MODELS:
    raise build_lib.ConfigError(f"config.model.name={config.model.name!r} is invalid for sparse methods: "
                            f"allowed one of {MODELS}")


def validate(config) -> None:
  validate_common(config)
  method = build_lib._choice(config, "sparse.method", METHODS)
  if "init_candidate" in config.sparse:
    build_lib._int_in(config, "sparse.init_candidate", 0)
  if method in ("feddst", "prunefl"):  # the methods with an adjustment schedule
    adjust_schedule(config)
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
    if config.model.name in build_lib.TEXT_MODELS:  # its all-ones input is not a token sequence
      raise build_lib.ConfigError(f"config.sparse.method='synflow' is invalid with model.name="
                                  f"{config.model.name!r}: SynFlow's data-free input needs an image "
                                  "model; allowed another sparse.method")
    build_lib._int_in(config, "sparse.synflow_iterations", 1)


def extendable(config) -> str | None:
  """Why a run cannot be extended to more rounds (`train.check_extension`), or None: the
  masks' schedules are fixed rounds, except the adjustment schedule of FedTiny, FedDST and
  PruneFL with adjust_every = adjust_end = 0 (scaled to config.rounds); the summary's
  per-round averages divide the whole run's totals by config.rounds at its end."""
  s = config.sparse
  scheduled = config.get("method") == "fedtiny" or s.get("method") in ("feddst", "prunefl")
  if scheduled and s.adjust_every == 0 and s.adjust_end == 0:
    return ("config.sparse.adjust_every = adjust_end = 0 scale the adjustment schedule to "
            "config.rounds, so the rounds already run adjusted masks on another schedule")
  return None


def adjust_schedule(config, *, num_blocks: int = 1, min_adjustments: int = 1) -> tuple[int, int]:
  """(adjust_every, adjust_end) of config.sparse (FedTiny's ΔT and T_end, also FedDST's and
  PruneFL's last round): as given, or, with both 0, the paper's 10 / 300 per 500 rounds
  scaled to config.rounds (`fedtiny.scaled_schedule`: the same rounds for every method;
  ConfigError when they are too few for each of `num_blocks` blocks to be adjusted
  `min_adjustments` times)."""
  s = config.sparse
  every, end = s.adjust_every, s.adjust_end
  if every == 0 and end == 0:
    try:
      return fedtiny.scaled_schedule(config.rounds, num_blocks=num_blocks,
                                     min_adjustments=min_adjustments)
    except ValueError as e:
      raise build_lib.ConfigError(
          f"config.sparse.adjust_every=0 and adjust_end=0 scale the schedule to "
          f"config.rounds={config.rounds}, but {e}") from None
  if every == 0 or end == 0:
    raise build_lib.ConfigError(
        f"config.sparse.adjust_every={every} and adjust_end={end} are invalid: both >= 1, "
        "or both 0 (the paper's schedule scaled to config.rounds)")
  return every, end


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


def sparse_run(config, env: runtime.Env, spec, params, batch_stats, optimizer, algorithm_for):
  """Chooses the client execution (timing `algorithm_for(apply_fn, schedule)` under 'auto')
  and returns (strategy, timings, the `base.SparseRun` of config)."""
  strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats, algorithm_for,
                                              runtime.cohort_for(env, 0))
  env.log(f"client execution: {strategy.name}")
  run = base.SparseRun(
      spec=spec, params=params, batch_stats=batch_stats, key=jax.random.key(config.seeds.init),
      optimizer=optimizer, schedule=strategy.schedule(local_schedule(config)),
      model=runtime.model_fns(env, strategy), train=env.data.train,
      clients_per_round=config.clients_per_round, rounds=config.rounds,
      optimizer_slots=optimizer_slots(config), log=env.log)
  return strategy, timings, run


def build(config, env: runtime.Env) -> runtime.Run:
  """The `Method` of config.sparse.method (see the module docstring)."""
  data, s = env.data, config.sparse
  method = s.method
  spec = spec_for(config, data)
  # Equal starting weights: FedTiny's candidate `init_candidate` (0: the init key's own, which
  # is also FedTiny's candidate 0).
  init_key = fedtiny.candidate_key(jax.random.key(config.seeds.init), s.get("init_candidate", 0))
  params, batch_stats = models.init_params(spec, init_key)
  prunable = _sparse.prunable_filter(params)
  opt = client_optimizer(config)
  density = float(s.density)
  growth = s.growth_batch_size or None
  # PruneFL's per-output-unit floor (our default 1; 0 = the paper's global top-k). Older
  # configs without the field get the default.
  prunefl_floor = int(s.get("prunefl_min_per_output", 1))
  scheduled = method in ("feddst", "prunefl")  # the methods with an adjustment schedule
  adjust_every, adjust_end = adjust_schedule(config) if scheduled else (None, None)
  post = (federated.LocalSchedule(batch_size=config.client.batch_size, num_steps=s.post_adjust_steps)
          if method == "feddst" and s.post_adjust_steps else None)
  agg = build_lib.in_path_aggregator(config, data)  # config.privacy / config.compression, or None
  options = {
      "feddst": dict(adjust_every=adjust_every, adjust_end=adjust_end,
                     adjust_alpha=s.adjust_alpha, growth_batch_size=growth),
      "prunefl": dict(adjust_every=s.prunefl_adjust_every, adjust_end=adjust_end,
                      importance_batches=s.importance_batches, min_per_output=prunefl_floor),
      "lotteryfl": dict(prune_every=s.lottery_prune_every, num_prune_steps=s.lottery_steps,
                        accuracy_threshold=s.lottery_accuracy_threshold),
  }.get(method, {})

  def algorithm_for(apply_fn, schedule):  # what 'auto' times (the post-adjust schedule aside)
    if method == "feddst":
      return feddst.feddst(apply_fn, opt, schedule, prunable=prunable, aggregator=agg, **options)
    if method == "prunefl":
      return prunefl.prunefl(apply_fn, opt, schedule, prunable=prunable, aggregator=agg, **options)
    if method == "lotteryfl":
      return lotteryfl.lotteryfl(apply_fn, opt, schedule, prunable=prunable, aggregator=agg,
                                 **options, densities=_sparse.layer_densities(
                                     params, density, s.distribution, prunable))
    return base.masked_fedavg(apply_fn, opt, schedule, base.no_prune(),
                              server_optimizer=optax.sgd(1.0), aggregator=agg)

  strategy, timings, run = sparse_run(config, env, spec, params, batch_stats, opt, algorithm_for)
  if method == "feddst":
    m = feddst.feddst_method(run, density=density, distribution=s.distribution, post_adjust=post,
                             aggregator=agg, **options)
  elif method == "prunefl":
    m = prunefl.prunefl_method(run, density=density, init_iterations=s.prunefl_init_iterations,
                               aggregator=agg, **options)
  elif method == "lotteryfl":
    m = lotteryfl.lotteryfl_method(run, density=density, distribution=s.distribution,
                                   aggregator=agg, **options)
  elif method == "snip":
    m = init_pruning.snip_method(run, density=density, aggregator=agg)
  elif method == "synflow":
    m = init_pruning.synflow_method(run, density=density, input_shape=tuple(data.input_shape),
                                    num_iterations=s.synflow_iterations, aggregator=agg)
  else:
    m = base.dense_method(run, aggregator=agg)
  return runtime.Run(m, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))

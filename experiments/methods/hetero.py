"""Driver for the model-heterogeneous methods: FIARSE, HeteroFL, FedRolex, ScaleFL.

`config.method` picks the method; `config.hetero` holds their fields. Text models
(`shakespeare_lstm`, `shakespeare_transformer`): FIARSE (global ranking), HeteroFL and
FedRolex (width r = ceil(r W) LSTM units / heads / FFN units per group, `heterofl(spec=)`);
not ScaleFL, and without augment, repartition or layer-wise thresholds.

  capacities        capacity levels (fractions of the parameters), e.g. (1, 1/4, 1/16, 1/64)
  assignment        'interleaved' (client i -> level i mod L) or 'blocks' (equal contiguous
                    groups); which clients FIARSE's code gives which size was not
                    determined (inferred option)
  fiarse_grad       'masked' (released code) or 'tcb' (TCB-GD surrogate)
  layerwise         FIARSE: one threshold per stage group
  server_learning_rate
  scaler            HeteroFL/FedRolex/ScaleFL: 1/r on the classifier input, in training and in
                    the evaluated submodel alike
  fedrolex_eval_window  FedRolex: the channel window a width-r level is evaluated on:
                    'extraction' (default; the window the official server extracts at
                    evaluation time), 'last_round' (the window the last round trained) or
                    'prefix' (`pruning.fedrolex` docstring, with the official code's lines)
  fedrolex_eval_also    FedRolex: more windows evaluated on the same trained model, recorded
                    as `<window>_<metric>` (e.g. ('last_round',) -> last_round_global_1/4)
  augment           RandomCrop(32, pad 4) + horizontal flip on the training batches
  sweep             extra global-test sizes (FIARSE's code: 1 ... 1/256), evaluated every sweep_every rounds
  scalefl_alpha, scalefl_temperature, scalefl_widths, scalefl_depths  (inferred ScaleFL options;
                    empty widths/depths = `scalefl.scalefl_levels`)
  submodel_execution  HeteroFL/FedRolex/ScaleFL: 'masked' (default: every client runs the
                    full-size model under its level's masks) or 'grouped' (each capacity
                    level trains its really-smaller sliced model, one program per level,
                    `heterofl.GroupedExecution`; same new global params up to float summation
                    order). 'grouped' needs a named sequential strategy (under vmap every
                    client would pay for every level), static or no BatchNorm, a CNN/ResNet
                    model; a config without the field runs 'masked'

Evaluation (FIARSE's `server.py`), every `eval_every` rounds and at the end, with
`eval_batch_size` (20 = FIARSE's; static BN uses the batch's statistics):
  model_<s>   mean local-test accuracy of the clients whose capacity is s, on the size-s submodel
  local       mean over all clients of their own-size submodel's local-test accuracy
  global_<s>  size-s submodel on the global test set; `global` = mean over the levels
  sweep_<s>   size-s submodel on the global test set for the sweep sizes

config.privacy / config.compression (issue 28): the aggregator (`build.in_path_aggregator`)
is in the algorithm's path, its state (the adaptive clip norm, the error-feedback memory) in
`HeteroState.aggregator` and the checkpoints; each client's update is clipped, compressed
and remembered on the coordinates it holds. FIARSE under privacy releases every coordinate
(`build.dp_release_all`: noise everywhere, the server step applies the noised mean everywhere;
its touched coordinates depend on the clients' data). `privacy.denominator='expected_counts'`
(HeteroFL, FedRolex, ScaleFL) divides each coordinate by m x the share of the clients whose
capacity level holds it (`_hetero.holder_share` of the public assignment), not by m.

The summary's `params` is the full model's; `level_params` / `level_flops` (aligned with
`capacities`) are each level's submodel under the final global model, counted by
fedjax_prune.accounting on its masks (FLOPs at batch 1; ScaleFL's exit classifiers are
not in the backbone spec, so its level FLOPs leave them out).
"""
from __future__ import annotations

import math

import jax
import numpy as np
import optax

from experiments import build as build_lib, runtime
from fedjax_prune import data as data_lib
from fedjax_prune import federated, models, performance
from fedjax_prune.pruning import _hetero as hetero_lib
from fedjax_prune.pruning import fiarse as fiarse_lib
from fedjax_prune.pruning import fedrolex as fedrolex_lib
from fedjax_prune.pruning import heterofl as heterofl_lib
from fedjax_prune.pruning import scalefl as scalefl_lib

METHODS = ("fiarse", "heterofl", "fedrolex", "scalefl")
# Models whose width submodels the drivers can express (ScaleFL's exits need ResNet stages;
# the text models' widths are their LSTM units / heads / FFN units, `heterofl(spec=)`).
WIDTH_MODELS = ("resnet18", "leaf_femnist_cnn") + build_lib.TEXT_MODELS
ASSIGNMENTS = ("interleaved", "blocks")
SUBMODEL_EXECUTIONS = ("masked", "grouped")


def submodel_execution(config) -> str:
  """config.hetero.submodel_execution, 'masked' where the config predates the field."""
  return config.hetero.get("submodel_execution", "masked")


def _capacity_tuple(config, path) -> tuple[float, ...]:
  value = build_lib._get(config, path)
  try:
    caps = tuple(float(c) for c in value)
  except (TypeError, ValueError):
    raise build_lib.ConfigError(f"config.{path}={value!r} is invalid: allowed a tuple of floats in (0, 1]") from None
  if not caps or any(not (math.isfinite(c) and 0 < c <= 1) for c in caps) or len(set(caps)) != len(caps):
    raise build_lib.ConfigError(f"config.{path}={value!r} is invalid: allowed a non-empty tuple of "
                            "distinct floats in (0, 1]")
  return caps


def validate(config) -> None:
  method = config.get("method")
  build_lib._require(method in METHODS, "method", method, f"one of {METHODS}")
  if "hetero" not in config:
    raise build_lib.ConfigError("config field 'hetero' is missing (see experiments/methods/hetero.py)")
  _capacity_tuple(config, "hetero.capacities")
  if len(config.hetero.sweep):
    _capacity_tuple(config, "hetero.sweep")
  build_lib._choice(config, "hetero.assignment", ASSIGNMENTS)
  build_lib._choice(config, "hetero.fiarse_grad", fiarse_lib.GRADS)
  build_lib._choice(config, "hetero.layerwise", (True, False))
  build_lib._choice(config, "hetero.scaler", (True, False))
  build_lib._choice(config, "hetero.fedrolex_eval_window", fedrolex_lib.EVAL_WINDOWS)
  also = build_lib._get(config, "hetero.fedrolex_eval_also")
  build_lib._require(isinstance(also, (tuple, list)) and all(w in fedrolex_lib.EVAL_WINDOWS for w in also)
                     and config.hetero.fedrolex_eval_window not in also and len(set(also)) == len(also),
                     "hetero.fedrolex_eval_also", also,
                     f"a tuple of distinct windows from {fedrolex_lib.EVAL_WINDOWS} other than "
                     "hetero.fedrolex_eval_window")
  build_lib._choice(config, "hetero.augment", (True, False))
  build_lib._float_in(config, "hetero.server_learning_rate", 0.0, lo_open=True)
  build_lib._int_in(config, "hetero.sweep_every", 0)
  if build_lib._choice(config, "hetero.repartition", ("", "balanced_dirichlet")):
    build_lib._float_in(config, "hetero.alpha", 0.0, lo_open=True)
    n = build_lib._int_in(config, "hetero.num_clients", 1)
    # The re-partitioned federation has n clients: refuse a larger cohort before any write.
    if config.clients_per_round > n:
      raise build_lib.ConfigError(f"config.clients_per_round={config.clients_per_round} exceeds "
                              f"hetero.num_clients={n}: allowed [1, {n}]")
  build_lib._float_in(config, "hetero.scalefl_alpha", 0.0, 1.0)
  build_lib._float_in(config, "hetero.scalefl_temperature", 0.0, lo_open=True)
  if config.model.name in build_lib.TEXT_MODELS:
    _validate_text(config, method)
  elif method in ("heterofl", "fedrolex"):
    build_lib._require(config.model.name in WIDTH_MODELS, "model.name", config.model.name,
                       f"one of {WIDTH_MODELS} for {method} (width submodels)")
  elif method != "fiarse" or config.hetero.layerwise:
    build_lib._require(config.model.name == "resnet18", "model.name", config.model.name,
                   f"'resnet18' for {method}" + (" (layer-wise thresholds need ResNet stages)"
                                                 if method == "fiarse" else " (width/depth submodels)"))
  widths, depths = tuple(config.hetero.scalefl_widths), tuple(config.hetero.scalefl_depths)
  n = len(config.hetero.capacities)
  if widths or depths:
    build_lib._require(len(widths) == n and len(depths) == n and all(0 < w <= 1 for w in widths)
                   and all(isinstance(d, int) and 1 <= d <= 4 for d in depths),
                   "hetero.scalefl_widths/scalefl_depths", (widths, depths),
                   f"both empty, or {n} widths in (0, 1] and {n} depths in [1, 4]")
  _validate_grouped(config, method)
  if method == "scalefl" and config.strategy == "auto":
    raise build_lib.ConfigError("config.strategy='auto' is invalid for scalefl: allowed a named strategy "
                            "such as 'sequential+tapgrad' (CPU) or 'vmap+lax' (GPU)")


def _validate_grouped(config, method) -> None:
  """hetero.submodel_execution: 'grouped' only where a level's sliced model runs alone."""
  execution = submodel_execution(config)
  build_lib._require(execution in SUBMODEL_EXECUTIONS, "hetero.submodel_execution", execution,
                     f"one of {SUBMODEL_EXECUTIONS}")
  if execution != "grouped":
    return
  if method == "fiarse":
    raise build_lib.ConfigError("config.hetero.submodel_execution='grouped' is invalid for fiarse: "
                                "its submodels are unstructured magnitude masks, no smaller model; "
                                "allowed 'masked'")
  if config.model.name in build_lib.TEXT_MODELS:
    raise build_lib.ConfigError(f"config.hetero.submodel_execution='grouped' is invalid with "
                                f"model.name={config.model.name!r}: text models run masked; "
                                "allowed 'masked'")
  build_lib._require(config.model.get("norm", "none") in ("batch_static", "none"), "model.norm",
                     config.model.get("norm"), "'batch_static' or 'none' with "
                     "hetero.submodel_execution='grouped' (running statistics of a sliced "
                     "model have no full-size counterpart)")
  try:
    strategy = performance.Strategy.from_name(config.strategy)
  except ValueError:
    strategy = None
  if strategy is None or not isinstance(strategy.execution, federated.Sequential) or strategy.lowrank:
    raise build_lib.ConfigError(
        f"config.strategy={config.strategy!r} is invalid with hetero.submodel_execution='grouped': "
        "allowed a named sequential strategy such as 'sequential+tapgrad' (each client runs its "
        "level's program alone; under vmap every client would pay for every level)")


def extendable(config) -> str | None:
  """Why a run cannot be extended to more rounds (`train.check_extension`), or None: the
  submodels and FedRolex's window follow the round index, not config.rounds; only the
  extra-size sweep (config.hetero.sweep) is evaluated at the last round, and an evaluation
  round's record would keep it."""
  if len(config.hetero.sweep):
    return (f"config.hetero.sweep={tuple(config.hetero.sweep)} is evaluated at the last round, "
            "so the last round's record differs from the longer run's (set sweep=() to extend)")
  return None


def _validate_text(config, method) -> None:
  """The width methods and FIARSE (global ranking) on a text model; not ScaleFL, no image options."""
  name = config.model.name
  if method == "scalefl":
    raise build_lib.ConfigError(f"config.model.name={name!r} is invalid for scalefl: its exits need "
                                "ResNet stages; allowed 'resnet18' (text models: fiarse, heterofl, "
                                "fedrolex)")
  if method == "fiarse" and config.hetero.layerwise:
    raise build_lib.ConfigError(f"config.hetero.layerwise=True is invalid with model.name={name!r}: "
                                "layer-wise thresholds need ResNet stages; allowed False")
  if config.hetero.augment:
    raise build_lib.ConfigError(f"config.hetero.augment=True is invalid with model.name={name!r}: "
                                "the crop/flip augmentation is for images; allowed False")
  if config.hetero.repartition:
    raise build_lib.ConfigError(f"config.hetero.repartition={config.hetero.repartition!r} is invalid "
                                f"with model.name={name!r}: text clients are speakers; allowed ''")


def _augment(x, key):
  """RandomCrop(pad 4) + horizontal flip on raw images (black padding, as torchvision on PIL)."""
  crop_key, flip_key = jax.random.split(key)
  return data_lib.random_flip(data_lib.random_crop(x, crop_key, 4), flip_key)


def width_keys(config, params) -> dict:
  """The width methods' parameter-key regexes for `config.model` (ResNet: the defaults)."""
  if config.model.name != "leaf_femnist_cnn":
    return {}
  dense = sorted(k for k in params if k.startswith("dense_"))
  return dict(input_keys=r"^conv_0$", output_keys=f"^{dense[-1]}$", flatten_keys=r"^dense_0$")


def _method(config, apply_fn, params, schedule, train_transform, eval_window=None, spec=None,
            apply_for=None, aggregator=None, level_clients=None):
  """The method's `HeteroMethod` (`eval_window`: FedRolex's, default the config's; `spec`: the
  model's, passed to HeteroFL/FedRolex for a text model, whose widths are its groups;
  `apply_for(level_spec[, exit_stages]) -> apply_fn` of a level's sliced model, for
  hetero.submodel_execution='grouped'; `aggregator`: config.privacy / config.compression's,
  in the path; `level_clients`: clients per level, for the expected-count denominator)."""
  h, c = config.hetero, config.client
  opt = (optax.sgd(c.learning_rate, momentum=c.momentum or None) if c.optimizer == "sgd"
         else optax.adam(c.learning_rate))
  caps = tuple(float(x) for x in h.capacities)
  kw = dict(capacities=caps, server_learning_rate=h.server_learning_rate,
            train_transform=train_transform, aggregator=aggregator)
  if config.method == "fiarse":  # under privacy its data-dependent submodels release everything
    return fiarse_lib.fiarse(apply_fn, opt, schedule, grad=h.fiarse_grad, layerwise=h.layerwise,
                             release_all=build_lib.dp_release_all(config), **kw)
  kw["level_clients"] = level_clients
  text = dict(spec=spec) if config.model.name in build_lib.TEXT_MODELS else {}
  if submodel_execution(config) == "grouped":
    kw["grouped"] = heterofl_lib.GroupedExecution(spec, apply_for)
  if config.method == "heterofl":
    return heterofl_lib.heterofl(apply_fn, opt, schedule, scaler=h.scaler,
                                 **width_keys(config, params), **text, **kw)
  if config.method == "fedrolex":
    return fedrolex_lib.fedrolex(apply_fn, opt, schedule, scaler=h.scaler,
                                 eval_window=eval_window or h.fedrolex_eval_window,
                                 **width_keys(config, params), **text, **kw)
  widths, depths = tuple(h.scalefl_widths), tuple(h.scalefl_depths)
  if not widths:
    widths, depths = scalefl_lib.scalefl_levels(params, caps)
  return scalefl_lib.scalefl(apply_fn, opt, schedule, widths=widths, depths=depths,
                             num_exits=len(config_stage_exits(params)) + 1, scaler=h.scaler,
                             distill_alpha=h.scalefl_alpha, temperature=h.scalefl_temperature, **kw)


def config_stage_exits(params) -> tuple[int, ...]:
  return tuple(sorted(int(k[4:]) for k in params if k.startswith("exit")))


def repartition_balanced(data: build_lib.Data, num_clients: int, alpha: float, seed: int) -> build_lib.Data:
  """FIARSE's federation (its `data/data_utils.py`): balanced Dirichlet on the pooled train and, separately, test data.

  Each client gets floor(N / n) train and floor(N_test / n) local-test examples
  (independent class priors for the two splits, as FIARSE's code); the global
  test set is the union of the local ones.
  """
  train_x, train_y = data_lib.pool(data.train)
  test_x, test_y = data_lib.pool(data.test_clients)
  train_parts, test_parts = data_lib.balanced_dirichlet_train_test(
      train_y, test_y, num_clients, alpha, seed, num_classes=data.num_classes)
  train = data_lib.from_client_lists([train_x[p] for p in train_parts], [train_y[p] for p in train_parts])
  test = data_lib.from_client_lists([test_x[p] for p in test_parts], [test_y[p] for p in test_parts])
  gx, gy, ids = build_lib.central_test(test)
  return data._replace(train=data_lib.to_device(train), test_clients=data_lib.to_device(test),
                       test_x=gx, test_y=gy, test_client_ids=ids,
                       description=f"{data.description} [re-partitioned: balanced Dirichlet "
                                   f"alpha={alpha}, {num_clients} clients]")


def build(config, env: runtime.Env) -> runtime.Run:
  h = config.hetero
  data = env.data
  if h.repartition == "balanced_dirichlet":
    data = repartition_balanced(data, h.num_clients, h.alpha, config.seeds.data)
  spec = build_lib.build_spec(config, data.input_shape, data.num_classes)
  strategy_name = config.strategy
  init_key = jax.random.key(config.seeds.init)
  compute_dtype = build_lib.compute_dtype(config)
  if config.method == "scalefl":
    exit_stages = tuple(range(1, len(spec.stage_widths)))
    params, batch_stats = models.init_early_exit_params(spec, exit_stages, init_key)
    make_raw = lambda conv_impl: models.make_early_exit_apply(spec, exit_stages, conv_impl=conv_impl,
                                                              compute_dtype=compute_dtype)
    level_raw = lambda conv_impl: lambda s, exits: models.make_early_exit_apply(
        s, exits, conv_impl=conv_impl, compute_dtype=compute_dtype)
  else:
    params, batch_stats = models.init_params(spec, init_key)
    make_raw = lambda conv_impl: models.make_apply(spec, conv_impl=conv_impl,
                                                   compute_dtype=compute_dtype)
    level_raw = lambda conv_impl: lambda s: models.make_apply(s, conv_impl=conv_impl,
                                                              compute_dtype=compute_dtype)

  def wrap(raw):
    def apply_fn(p, bs, x, *, train, example_mask=None):
      return raw(p, bs, data.normalize(x), train=train, example_mask=example_mask)
    return apply_fn

  train_transform = _augment if h.augment else None
  caps = tuple(float(x) for x in h.capacities)
  client_caps = hetero_lib.client_capacities(data.train.num_clients, caps, h.assignment)

  def cohort(round_idx):
    ids = data_lib.sample_uniform(data.train.num_clients, config.clients_per_round,
                                  config.seeds.sampling, round_idx)
    return federated.make_cohort(ids, capacity=client_caps[np.asarray(ids)],
                                 multiple=env.cohort_multiple)

  # config.privacy / config.compression: the aggregator in the path (None: the counted mean).
  agg = build_lib.in_path_aggregator(config, data)
  level_clients = (hetero_lib.level_counts(client_caps, caps)
                   if build_lib.dp_denominator(config) == "expected_counts" else None)
  in_path = dict(aggregator=agg, level_clients=level_clients)
  timings = {}
  if strategy_name == "auto":
    algorithm_for = lambda apply_fn, schedule: _method(config, apply_fn, params, schedule,
                                                       train_transform, spec=spec,
                                                       **in_path).algorithm
    strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats, algorithm_for, cohort(0))
  else:
    strategy = performance.Strategy.from_name(strategy_name)
  env.log(f"{config.method}: client execution {strategy.name}, capacities {caps}, submodels "
          f"{submodel_execution(config)}")
  apply_fn = wrap(make_raw(strategy.conv_impl))
  c = config.client
  schedule = strategy.schedule(federated.LocalSchedule(batch_size=c.batch_size, num_epochs=c.num_epochs,
                                                       num_steps=c.num_steps or None))
  raw_for = level_raw(strategy.conv_impl)
  apply_for = lambda *level: wrap(raw_for(*level))  # a grouped level's sliced model
  hetero = _method(config, apply_fn, params, schedule, train_transform, spec=spec,
                   apply_for=apply_for, **in_path)
  common = dict(spec=spec, params=params, batch_stats=batch_stats, key=init_key,
                eval_apply=wrap(make_raw("lax")),
                test=hetero_lib.LevelTest(
                    data.test_x, data.test_y, data.test_clients, config.eval_batch_size,
                    client_ids=(data.test_client_ids if build_lib.evaluates_per_example(config)
                                else None)),
                client_caps=client_caps, capacities=caps, sweep=tuple(float(x) for x in h.sweep),
                sweep_every=h.sweep_every, num_rounds=config.rounds)
  if config.method == "fiarse":
    method = fiarse_lib.fiarse_method(hetero, layerwise=bool(h.layerwise), **common)
  elif config.method == "fedrolex" and len(h.fedrolex_eval_also):
    # Same training; only the evaluated windows differ.
    alternatives = {w: _method(config, apply_fn, params, schedule, train_transform, eval_window=w,
                             spec=spec, apply_for=apply_for)
                    for w in h.fedrolex_eval_also}
    method = fedrolex_lib.fedrolex_method(hetero, alternatives=alternatives, **common)
  else:
    factory = {"heterofl": heterofl_lib.heterofl_method, "fedrolex": fedrolex_lib.fedrolex_method,
               "scalefl": scalefl_lib.scalefl_method}[config.method]
    method = factory(hetero, **common)
  if h.repartition:  # the summary names the federation the run trained on
    summary = method.summary
    method = method._replace(summary=lambda state, last_eval: {
        **summary(state, last_eval), "data": data.description})
  return runtime.Run(method, strategy, timings, data.train, cohort)

"""Driver for complexity-aware variational unit/layer pruning (`fedjax_prune.pruning.cavp`).

`config.cavp.mode`:
  * 'centralised' (the paper's setting): the clients' training data is pooled
    into ONE client; a round = `client.num_epochs` epochs (or `num_steps`
    steps) over it; `clients_per_round` is ignored.
  * 'federated' (our extension): `clients_per_round` sampled clients train
    (W, θ) locally; the server averages both, projects and prunes θ.
Every `cavp.rebuild_every` rounds the pruned structures are removed
physically (smaller spec, one re-jit). At the end the deterministic network
(θ >= `final_threshold` kept) is built and evaluated ungated.

Options (issue 26; each off in `cavp_cifar10.py`, so its results stay as recorded):
  * `theta_optimizer` 'sgd' (projected SGD, METHODS.md §3.3) or 'adam';
    `persist_theta_optimizer` keeps the θ optimizer's state across rounds (in the
    server state, checkpointed); `theta_learning_rate=0` freezes θ: with
    `theta_init=1` every gate stays on, i.e. the dense model trained through this
    driver (same init, data order and records: the dense baseline of a sweep).
  * BatchNorm statistics of the finalised network re-estimated on 1024 pooled training
    inputs (always), and with `recalibrate_after_rebuild` also at every rebuild point;
    `recalibration_steps` forward passes each.
  * `finetune_steps` (> 0) SGD steps at `finetune_learning_rate` (batch
    `client.batch_size`, momentum `client.momentum`) on the pooled training data for
    the finalised network (extra steps: the summary's `finetune_steps`).
  * `augment`: random crop (pad 4) + horizontal flip of the training batches (rounds
    and fine-tune), for image data.

Text models (`shakespeare_lstm`: unit gates on its hidden units, structures 'units';
`shakespeare_transformer`: heads, FFN units and whole blocks): no BatchNorm, so no
recalibration (`recalibrate_after_rebuild` and `augment` are refused);
`experiments/configs/fedavg_shakespeare.py:cavp` runs them.

Metrics per round: the FedAvg ones plus alive/total units and layers, mean θ,
fraction of θ in {0, 1}, the current model's params and FLOPs; evaluation
uses the deterministic gates (θ >= final_threshold, alive).

config.privacy / config.compression (issue 28): the aggregator (`build.in_path_aggregator`)
aggregates the weight updates in the algorithm's path; its state (the adaptive clip norm,
each client's error-feedback residual) is `CavpState.aggregator`, checkpointed, and a
rebuild slices the residuals like the weights (`cavp.slice_params_trees`).

Checkpoints (every `checkpoint_every` rounds and at the last round) hold the
whole `CavpState` of the current architecture (weights, BatchNorm statistics,
θ, alive flags, λ, the REINFORCE baseline, the round index and, with
`persist_theta_optimizer`, the θ optimizer's state; the weights' optimizer
restarts every round, so there is none to keep). `meta` holds the
current spec as JSON (`structured.spec_to_json`) so a resumed run rebuilds the
right shapes before restoring, the original spec (a checkpoint of another
model is refused) and the rebuild history of the summary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import build as build_lib, runtime
from fedjax_prune import accounting, federated, models
from fedjax_prune import data as data_lib
from fedjax_prune.pruning import cavp as cavp_lib

MODES = ("centralised", "federated")
THETA_OPTIMIZERS = ("sgd", "adam")
# The weights' learning rate across rounds: constant, or a cosine decay from the configured
# rate to 0 over config.rounds (the fine-tune keeps its own rate).
WEIGHT_LR_DECAYS = ("none", "cosine")


def validate(config) -> None:
  """Checks the `config.cavp` fields; raises build_lib.ConfigError naming the field."""
  build_lib._choice(config, "cavp.mode", MODES)
  build_lib._choice(config, "cavp.structures", cavp_lib.STRUCTURES)
  build_lib._float_in(config, "cavp.gamma", 0.0)
  build_lib._float_in(config, "cavp.alpha", 0.0)
  build_lib._float_in(config, "cavp.beta", 0.0, 1.0)
  build_lib._choice(config, "cavp.theta_optimizer", THETA_OPTIMIZERS)
  build_lib._float_in(config, "cavp.theta_learning_rate", 0.0)  # 0: θ frozen (dense baseline)
  build_lib._choice(config, "cavp.weight_lr_decay", WEIGHT_LR_DECAYS)
  for field in ("persist_theta_optimizer", "recalibrate_after_rebuild", "augment",
                "recalibration_augment"):
    value = build_lib._get(config, f"cavp.{field}")
    build_lib._require(isinstance(value, bool), f"cavp.{field}", value, "True or False")
  if config.cavp.recalibration_augment and not config.cavp.augment:
    raise build_lib.ConfigError("config.cavp.recalibration_augment=True is invalid with "
                                "cavp.augment=False: allowed only with the augmentation it "
                                "recalibrates on (cavp.augment=True)")
  build_lib._int_in(config, "cavp.recalibration_steps", 1)
  build_lib._int_in(config, "cavp.finetune_steps", 0)
  build_lib._float_in(config, "cavp.finetune_learning_rate", 0.0, lo_open=True)
  build_lib._float_in(config, "cavp.theta_init", 0.0, 1.0, lo_open=True)
  build_lib._choice(config, "cavp.unit_estimator", cavp_lib.ESTIMATORS[:2])
  build_lib._choice(config, "cavp.layer_estimator", cavp_lib.ESTIMATORS)
  build_lib._float_in(config, "cavp.prune_threshold", 0.0, 0.49)
  build_lib._float_in(config, "cavp.one_epsilon", 0.0, 0.49)
  build_lib._float_in(config, "cavp.final_threshold", 0.0, 1.0, lo_open=True)
  build_lib._float_in(config, "cavp.rho", 0.0)
  build_lib._int_in(config, "cavp.rebuild_every", 1)
  per_example = build_lib._get(config, "cavp.per_example")
  build_lib._require(isinstance(per_example, bool), "cavp.per_example", per_example, "True or False")
  name = build_lib._get(config, "model.name")
  if name not in ("resnet20", "resnet56", "resnet18", "vgg11", "asp_femnist_cnn",
                  "asp_celeba_cnn", "leaf_femnist_cnn", *build_lib.TEXT_MODELS):
    raise build_lib.ConfigError(f"config.model.name={name!r} is invalid for cavp: allowed a CNN, "
                            "ResNet or text model (gates need conv filters / residual blocks / "
                            f"LSTM units, heads and FFN units: {build_lib.TEXT_MODELS})")
  if build_lib._get(config, "cavp.structures") != "units" and not (
      name.startswith("resnet") or name == "shakespeare_transformer"):
    raise build_lib.ConfigError(f"config.cavp.structures={config.cavp.structures!r} is invalid for "
                            f"model {name!r}: allowed 'units' (layer gates need a ResNet or the "
                            "transformer: an LSTM layer has no residual path)")
  if name in build_lib.TEXT_MODELS:  # no BatchNorm to recalibrate, no images to crop
    for field in ("recalibrate_after_rebuild", "augment", "recalibration_augment"):
      if config.cavp[field]:
        raise build_lib.ConfigError(f"config.cavp.{field}=True is invalid for the text model "
                                    f"{name!r}: allowed False (it has no BatchNorm statistics / "
                                    "image inputs)")
  strategy = build_lib._get(config, "strategy")
  build_lib._require(strategy != "auto", "strategy", strategy,
                 "a named strategy such as 'sequential+lax' (cavp rebuilds the model, so the "
                 "calibration of 'auto' would be stale)")


def _options(config) -> cavp_lib.Options:
  c = config.cavp
  return cavp_lib.Options(
      structures=c.structures, theta_init=c.theta_init, unit_estimator=c.unit_estimator,
      layer_estimator=c.layer_estimator, per_example=c.per_example,
      prune_threshold=c.prune_threshold, one_epsilon=c.one_epsilon,
      final_threshold=c.final_threshold, rho=c.rho,
      persist_theta_optimizer=c.persist_theta_optimizer)


def _pooled_client(train: data_lib.ClientData) -> data_lib.ClientData:
  """All clients' real training examples as one client [1, N, ...]."""
  mask = np.asarray(train.mask)
  x, y = np.asarray(train.x)[mask], np.asarray(train.y)[mask]
  return data_lib.ClientData(jnp.asarray(x[None]), jnp.asarray(y[None]),
                             jnp.asarray([x.shape[0]], jnp.int32))


def _recalibration_sample(train, size: int):
  """Up to `size` training inputs, evenly over the pooled examples (for the finalised
  network's BatchNorm recalibration)."""
  x, _ = data_lib.pool(train)
  step = max(1, x.shape[0] // size)
  return x[::step][:size]


def _augment(x, key):
  """Random crop (zero padding 4) + horizontal flip of raw image batches."""
  return data_lib.compose(lambda x, k: data_lib.random_crop(x, k, 4), data_lib.random_flip)(x, key)


def weight_lr_scale(config) -> optax.Schedule | None:
  """The round schedule multiplying the weights' learning rate (`cavp.weight_lr_decay`):
  None for 'none'; 'cosine' = optax's cosine decay from 1 at round 0 to 0 at
  config.rounds (round r trains at lr * (1 + cos(pi r / rounds)) / 2)."""
  if config.cavp.weight_lr_decay == "none":
    return None
  return optax.cosine_decay_schedule(1.0, decay_steps=config.rounds)


def build(config, env: runtime.Env) -> runtime.Run:
  """The `pruning.cavp.cavp_method` of `config` (centralised: one pooled client)."""
  data, c = env.data, config.cavp
  options = _options(config)
  spec = build_lib.build_spec(config, data.input_shape, data.num_classes)
  _, params, batch_stats = models.build(spec, jax.random.key(config.seeds.init))
  strategy = runtime.named_strategy(env, config.strategy)
  cl = config.client
  weight_opt = (optax.sgd(cl.learning_rate, momentum=cl.momentum or None) if cl.optimizer == "sgd"
                else optax.adam(cl.learning_rate))
  theta_opt = (optax.sgd(c.theta_learning_rate) if c.theta_optimizer == "sgd"
               else optax.adam(c.theta_learning_rate))
  schedule = strategy.schedule(federated.LocalSchedule(  # the strategy's step unrolling
      batch_size=cl.batch_size, num_epochs=cl.num_epochs, num_steps=cl.num_steps or None))
  env.log(f"cavp ({c.mode}, {c.structures}): {accounting.param_count(spec):,} params, "
          f"{accounting.flops(spec):,} FLOPs")
  fine_tune = cavp_lib.FineTune(num_steps=c.finetune_steps,
                                learning_rate=c.finetune_learning_rate,
                                momentum=cl.momentum if cl.optimizer == "sgd" else 0.0,
                                batch_size=cl.batch_size)
  method = cavp_lib.cavp_method(
      spec=spec, params=params, batch_stats=batch_stats, key=jax.random.key(config.seeds.init),
      model=runtime.model_fns(env, strategy), weight_optimizer=weight_opt,
      theta_optimizer=theta_opt, schedule=schedule, options=options,
      weights=cavp_lib.CostWeights(gamma=c.gamma, alpha=c.alpha, beta=c.beta),
      rebuild_every=c.rebuild_every, num_rounds=config.rounds,
      # Text models have no BatchNorm statistics: nothing to recalibrate.
      recalibration_x=(None if isinstance(spec, models.TEXT_SPECS)
                       else _recalibration_sample(data.train, 1024)),
      recalibrate_after_rebuild=c.recalibrate_after_rebuild,
      recalibration_steps=c.recalibration_steps, fine_tune=fine_tune,
      finetune_data=data_lib.pool(data.train) if c.finetune_steps else None,
      train_transform=_augment if c.augment else None, log=env.log,
      aggregator=build_lib.in_path_aggregator(config, data),  # privacy / compression, or None
      weight_lr_scale=weight_lr_scale(config),
      recalibration_augment=c.recalibration_augment)
  summary = method.summary
  method = method._replace(summary=lambda state, last_eval: {
      "mode": c.mode, **summary(state, last_eval)})
  if c.mode == "centralised":
    train, cohort = _pooled_client(data.train), lambda r: federated.make_cohort([0])
  else:
    train, cohort = data.train, lambda r: runtime.cohort_for(env, r)
  return runtime.Run(method, strategy, {}, train, cohort)

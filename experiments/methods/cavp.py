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

Metrics per round: the FedAvg ones plus alive/total units and layers, mean θ,
fraction of θ in {0, 1}, the current model's params and FLOPs; evaluation
uses the deterministic gates (θ >= final_threshold, alive).

Checkpoints (every `checkpoint_every` rounds and at the last round) hold the
whole `CavpState` of the current architecture (weights, BatchNorm statistics,
θ, alive flags, λ, the REINFORCE baseline and the round index; the client
optimizers restart every round, so there is none to keep). `meta` holds the
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


def validate(config) -> None:
  """Checks the `config.cavp` fields; raises build_lib.ConfigError naming the field."""
  build_lib._choice(config, "cavp.mode", MODES)
  build_lib._choice(config, "cavp.structures", cavp_lib.STRUCTURES)
  build_lib._float_in(config, "cavp.gamma", 0.0)
  build_lib._float_in(config, "cavp.alpha", 0.0)
  build_lib._float_in(config, "cavp.beta", 0.0, 1.0)
  build_lib._choice(config, "cavp.theta_optimizer", THETA_OPTIMIZERS)
  build_lib._float_in(config, "cavp.theta_learning_rate", 0.0, lo_open=True)
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
                  "asp_celeba_cnn", "leaf_femnist_cnn"):
    raise build_lib.ConfigError(f"config.model.name={name!r} is invalid for cavp: allowed a CNN or "
                            "ResNet (gates need conv filters / residual blocks)")
  if build_lib._get(config, "cavp.structures") != "units" and not name.startswith("resnet"):
    raise build_lib.ConfigError(f"config.cavp.structures={config.cavp.structures!r} is invalid for "
                            f"model {name!r}: allowed 'units' (layer gates need a ResNet)")
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
      final_threshold=c.final_threshold, rho=c.rho)


def _eval_apply(apply_fn):
  """Evaluation apply taking `(params, gates)` as its params (one jit for every gate value)."""

  def fn(params_and_gates, batch_stats, x, *, train, example_mask=None):
    params, gates = params_and_gates
    return apply_fn(params, batch_stats, x, train=train, example_mask=example_mask, gates=gates)

  return fn


def _pooled_client(train: data_lib.ClientData) -> data_lib.ClientData:
  """All clients' real training examples as one client [1, N, ...]."""
  mask = np.asarray(train.mask)
  x, y = np.asarray(train.x)[mask], np.asarray(train.y)[mask]
  return data_lib.ClientData(jnp.asarray(x[None]), jnp.asarray(y[None]),
                             jnp.asarray([x.shape[0]], jnp.int32))


def build(config, env: runtime.Env) -> runtime.Run:
  data, c = env.data, config.cavp
  options = _options(config)
  weights = cavp_lib.CostWeights(gamma=c.gamma, alpha=c.alpha, beta=c.beta)
  original_spec = build_lib.build_spec(config, data.input_shape, data.num_classes)
  _, params, batch_stats = models.build(original_spec, jax.random.key(config.seeds.init))
  reference = (accounting.flops(original_spec), accounting.param_count(original_spec))
  strategy = runtime.named_strategy(env, config.strategy)
  cl = config.client
  weight_opt = (optax.sgd(cl.learning_rate, momentum=cl.momentum or None) if cl.optimizer == "sgd"
                else optax.adam(cl.learning_rate))
  theta_opt = (optax.sgd(c.theta_learning_rate) if c.theta_optimizer == "sgd"
               else optax.adam(c.theta_learning_rate))
  schedule = federated.LocalSchedule(batch_size=cl.batch_size, num_epochs=cl.num_epochs,
                                     num_steps=cl.num_steps or None)
  centralised = c.mode == "centralised"
  train = _pooled_client(data.train) if centralised else data.train
  schedule = strategy.schedule(schedule)  # its step unrolling
  env.log(f"cavp ({c.mode}, {c.structures}): {reference[1]:,} params, {reference[0]:,} FLOPs")

  def apply_for(spec):  # build_apply passes the gates through to the model
    return build_lib.build_apply(spec, data.normalize, strategy.conv_impl,
                                 build_lib.compute_dtype(config))

  def algorithm(spec):
    return cavp_lib.cavp(apply_for(spec), weight_opt, theta_opt, schedule, options)

  def init():
    theta = cavp_lib.init_theta(original_spec, options)
    lam = cavp_lib.penalty_weights(original_spec, weights, structures=options.structures,
                                   reference=reference)
    server = algorithm(original_spec).init(params, jax.random.key(config.seeds.init), batch_stats,
                                           theta=theta, lam=lam)
    return federated.MethodState(server, original_spec, {"rebuilds": []})

  def after_round(state, round_idx, metrics):
    """Every `rebuild_every` rounds (not after the last) the pruned structures go physically."""
    if (round_idx + 1) % c.rebuild_every or round_idx + 1 >= config.rounds:
      return state
    new_spec, server, report = cavp_lib.rebuild(state.spec, state.server, weights, options,
                                                reference=reference)
    state = state._replace(server=server)
    if new_spec == state.spec:
      return state
    env.log(f"round {round_idx + 1}: removed {report.units_removed} units, blocks "
            f"{list(report.blocks_removed)} -> {accounting.param_count(new_spec):,} params")
    rebuilds = state.host["rebuilds"] + [{"round": round_idx + 1,
                                          "units_removed": report.units_removed,
                                          "blocks_removed": list(report.blocks_removed)}]
    return state._replace(spec=new_spec, host={**state.host, "rebuilds": rebuilds})

  def record(before, after, round_idx, metrics):
    return {"params": accounting.param_count(after.spec), "flops": accounting.flops(after.spec)}

  def evaluator(spec):
    evaluate = runtime.make_evaluator(env, _eval_apply(apply_for(spec)))

    def deterministic_eval(state, round_idx):
      s = state.server
      gates = cavp_lib.deterministic_gates(s.theta, s.alive, options.final_threshold)
      return evaluate((s.params, gates), s.batch_stats)

    return deterministic_eval

  def template(initial, spec, host):
    """Shapes of the CavpState of the architecture `spec`."""
    gates = cavp_lib.gate_template(spec, options.structures, allow_empty=True)
    is_shape = lambda x: isinstance(x, tuple)
    shapes = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), gates,
                          is_leaf=is_shape)
    p, b = jax.eval_shape(lambda: models.init_params(spec, jax.random.key(0)))
    return jax.eval_shape(lambda p, b, t: algorithm(spec).init(p, jax.random.key(0), b, theta=t, lam=t),
                          p, b, shapes)

  def summary(state, last_eval):
    """The deterministic network (theta >= final_threshold kept), built and evaluated ungated."""
    spec = state.spec
    final_gates = jax.device_get(cavp_lib.gate_stats(state.server.theta, state.server.alive, options))
    final_spec, final_params, final_stats, _ = cavp_lib.finalize(spec, state.server, options)
    final_eval = runtime.make_evaluator(env, apply_for(final_spec))(final_params, final_stats)
    final_params_count, final_flops = accounting.param_count(final_spec), accounting.flops(final_spec)
    return {
        "mode": c.mode, "structures": c.structures,
        "params_initial": reference[1], "flops_initial": reference[0],
        "params": final_params_count, "flops": final_flops,
        "params_reduction": 1.0 - final_params_count / reference[1],
        "flops_reduction": 1.0 - final_flops / reference[0],
        "gated_eval_before_finalize": last_eval,
        **{f"gates_{k}": float(v) for k, v in final_gates.items()},
        "final_inner_widths": [list(w) for w in getattr(final_spec, "inner_widths", ())],
        "original_inner_widths": [list(w) for w in getattr(original_spec, "inner_widths", ())],
        "final_spec": repr(final_spec), "rebuilds": state.host["rebuilds"], **final_eval}

  method = federated.Method(init=init, algorithm=algorithm, evaluator=evaluator,
                            after_round=after_round, record=record, summary=summary,
                            template=template)
  cohort = ((lambda r: federated.make_cohort([0])) if centralised
            else (lambda r: runtime.cohort_for(env, r)))
  # The round does not donate: `cavp_lib.rebuild` slices the state it is given.
  return runtime.Run(method, strategy, {}, train, cohort, donate=False)

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

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import build, runtime
from fedjax_prune import accounting, checkpoint, federated, models, structured
from fedjax_prune import data as data_lib
from fedjax_prune.pruning import cavp as cavp_lib

MODES = ("centralised", "federated")
THETA_OPTIMIZERS = ("sgd", "adam")


def validate(config) -> None:
  """Checks the `config.cavp` fields; raises build.ConfigError naming the field."""
  build._choice(config, "cavp.mode", MODES)
  build._choice(config, "cavp.structures", cavp_lib.STRUCTURES)
  build._float_in(config, "cavp.gamma", 0.0)
  build._float_in(config, "cavp.alpha", 0.0)
  build._float_in(config, "cavp.beta", 0.0, 1.0)
  build._choice(config, "cavp.theta_optimizer", THETA_OPTIMIZERS)
  build._float_in(config, "cavp.theta_learning_rate", 0.0, lo_open=True)
  build._float_in(config, "cavp.theta_init", 0.0, 1.0, lo_open=True)
  build._choice(config, "cavp.unit_estimator", cavp_lib.ESTIMATORS[:2])
  build._choice(config, "cavp.layer_estimator", cavp_lib.ESTIMATORS)
  build._float_in(config, "cavp.prune_threshold", 0.0, 0.49)
  build._float_in(config, "cavp.one_epsilon", 0.0, 0.49)
  build._float_in(config, "cavp.final_threshold", 0.0, 1.0, lo_open=True)
  build._float_in(config, "cavp.rho", 0.0)
  build._int_in(config, "cavp.rebuild_every", 1)
  per_example = build._get(config, "cavp.per_example")
  build._require(isinstance(per_example, bool), "cavp.per_example", per_example, "True or False")
  name = build._get(config, "model.name")
  if name not in ("resnet20", "resnet56", "resnet18", "vgg11", "asp_femnist_cnn",
                  "asp_celeba_cnn", "leaf_femnist_cnn"):
    raise build.ConfigError(f"config.model.name={name!r} is invalid for cavp: allowed a CNN or "
                            "ResNet (gates need conv filters / residual blocks)")
  if build._get(config, "cavp.structures") != "units" and not name.startswith("resnet"):
    raise build.ConfigError(f"config.cavp.structures={config.cavp.structures!r} is invalid for "
                            f"model {name!r}: allowed 'units' (layer gates need a ResNet)")
  strategy = build._get(config, "strategy")
  build._require(strategy != "auto", "strategy", strategy,
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


def run(config, env: runtime.Env) -> dict:
  data, c = env.data, config.cavp
  options = _options(config)
  weights = cavp_lib.CostWeights(gamma=c.gamma, alpha=c.alpha, beta=c.beta)
  spec = build.build_spec(config, data.input_shape, data.num_classes)
  original_spec = spec
  _, params, batch_stats = models.build(spec, jax.random.key(config.seeds.init))
  reference = (accounting.flops(spec), accounting.param_count(spec))
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

  def compile_for(spec):
    # build_apply passes the gates through to the model.
    apply_fn = build.build_apply(spec, data.normalize, strategy.conv_impl, build.compute_dtype(config))
    alg = cavp_lib.cavp(apply_fn, weight_opt, theta_opt, schedule, options)
    round_fn = federated.make_round(alg, execution=strategy.execution,
                                    mesh=runtime.mesh_for(env, strategy))
    evaluate = runtime.make_evaluator(env, _eval_apply(apply_fn))
    return alg, round_fn, evaluate

  alg, round_fn, evaluate = compile_for(spec)
  theta = cavp_lib.init_theta(spec, options)
  lam = cavp_lib.penalty_weights(spec, weights, structures=options.structures, reference=reference)
  state = alg.init(params, jax.random.key(config.seeds.init), batch_stats, theta=theta, lam=lam)
  train_root = jax.random.key(config.seeds.training)
  env.log(f"cavp ({c.mode}, {c.structures}): {reference[1]:,} params, {reference[0]:,} FLOPs")

  def template(meta):
    """Shapes of the CavpState of the architecture saved in `meta`."""
    saved = meta.get("original_spec")
    if saved is None or structured.spec_from_json(saved) != original_spec:
      raise checkpoint.CheckpointError(
          f"it was saved for the model {saved}, this run builds {original_spec!r}")
    s = structured.spec_from_json(meta["spec"])
    gates = cavp_lib.gate_template(s, options.structures, allow_empty=True)
    is_shape = lambda x: isinstance(x, tuple)
    shapes = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), gates,
                         is_leaf=is_shape)
    p, b = jax.eval_shape(lambda: models.init_params(s, jax.random.key(0)))
    return jax.eval_shape(lambda p, b, t: alg.init(p, jax.random.key(0), b, theta=t, lam=t),
                          p, b, shapes)

  start_round, rebuilds, meta = 0, [], {}
  restored = env.checkpoint.restore(template)
  if restored is not None:
    start_round, state, meta = restored
    spec = structured.spec_from_json(meta["spec"])
    rebuilds = [dict(r) for r in meta["rebuilds"]]
    env.metrics.truncate_to_round(start_round)
    if spec != original_spec:
      alg, round_fn, evaluate = compile_for(spec)
    env.log(f"resumed from the checkpoint after round {start_round} "
            f"({accounting.param_count(spec):,} params)")

  def deterministic_eval(state):
    gates = cavp_lib.deterministic_gates(state.theta, state.alive, options.final_threshold)
    return evaluate((state.params, gates), state.batch_stats)

  progress = runtime.progress_bar(config.rounds, config.progress, initial=start_round)
  start = runtime.run_clock_start(meta)
  last_eval: dict = {}
  for round_idx in range(start_round, config.rounds):
    cohort = (federated.make_cohort([0]) if centralised else runtime.cohort_for(env, round_idx))
    state, metrics = round_fn(state, train, cohort, federated.round_key(train_root, round_idx))
    record = runtime.round_record(metrics, round_idx, start)
    if (round_idx + 1) % c.rebuild_every == 0 and round_idx + 1 < config.rounds:
      new_spec, state, report = cavp_lib.rebuild(spec, state, weights, options, reference=reference)
      if new_spec != spec:
        spec = new_spec
        alg, round_fn, evaluate = compile_for(spec)
        rebuilds.append({"round": round_idx + 1, "units_removed": report.units_removed,
                         "blocks_removed": list(report.blocks_removed)})
        env.log(f"round {round_idx + 1}: removed {report.units_removed} units, blocks "
                f"{list(report.blocks_removed)} -> {accounting.param_count(spec):,} params")
    record.update(params=accounting.param_count(spec), flops=accounting.flops(spec))
    if runtime.is_eval_round(config, round_idx):
      last_eval = deterministic_eval(state)
      record.update(last_eval)
    env.metrics.write(record)
    if runtime.is_checkpoint_round(config, round_idx):
      env.checkpoint.save(round_idx + 1, state, {
          "spec": structured.spec_to_json(spec),
          "original_spec": structured.spec_to_json(original_spec), "rebuilds": rebuilds,
          **runtime.timing_meta(start, {})})
    progress.update(1)
    progress.set_postfix(loss=f"{record['train_loss']:.3f}",
                         acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}")
  progress.close()
  if not last_eval:  # resumed from the final checkpoint: evaluate the restored model
    last_eval = deterministic_eval(state)
  train_time = time.perf_counter() - start
  final_gates = jax.device_get(cavp_lib.gate_stats(state.theta, state.alive, options))
  final_spec, final_params, final_stats, _ = cavp_lib.finalize(spec, state, options)
  final_apply = build.build_apply(final_spec, data.normalize, strategy.conv_impl,
                                  build.compute_dtype(config))
  final_eval = runtime.make_evaluator(env, final_apply)(final_params, final_stats)
  final_params_count, final_flops = accounting.param_count(final_spec), accounting.flops(final_spec)
  return {
      "rounds": config.rounds, "wall_time_s": train_time, "strategy": strategy.name,
      "mode": c.mode, "structures": c.structures,
      "params_initial": reference[1], "flops_initial": reference[0],
      "params": final_params_count, "flops": final_flops,
      "params_reduction": 1.0 - final_params_count / reference[1],
      "flops_reduction": 1.0 - final_flops / reference[0],
      "gated_eval_before_finalize": last_eval,
      **{f"gates_{k}": float(v) for k, v in final_gates.items()},
      "final_inner_widths": [list(w) for w in getattr(final_spec, "inner_widths", ())],
      "original_inner_widths": [list(w) for w in getattr(original_spec, "inner_widths", ())],
      "final_spec": repr(final_spec), "rebuilds": rebuilds, "data": data.description,
      **final_eval,
  }


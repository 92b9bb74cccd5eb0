"""Driver for the FedAvg family on a dense model (the main job's method)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from experiments import build, runtime
from fedjax_prune import accounting, federated, models


def validate(config) -> None:
  del config  # the FedAvg fields are checked by build.validate


def run(config, env: runtime.Env) -> dict:
  data = env.data
  spec = build.build_spec(config, data.input_shape, data.num_classes)
  _, params, batch_stats = models.build(spec, jax.random.key(config.seeds.init))
  algorithm_for = lambda apply_fn, schedule: build.build_algorithm(config, apply_fn, schedule)
  strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats, algorithm_for,
                                              runtime.cohort_for(env, 0))
  env.log(f"client execution: {strategy.name}")
  apply_fn = build.build_apply(spec, data.normalize, strategy.conv_impl)
  alg = build.build_algorithm(config, apply_fn)
  round_fn = federated.make_round(alg, execution=strategy.execution, mesh=env.mesh, donate=True)
  evaluate = runtime.make_evaluator(env, apply_fn)
  state = alg.init(jax.tree.map(jnp.copy, params), jax.random.key(config.seeds.init),
                   batch_stats=batch_stats)
  train_root = jax.random.key(config.seeds.training)

  start_round = 0
  restored = env.checkpoint.restore(lambda meta: state)
  if restored is not None:
    start_round, state, _ = restored
    env.metrics.truncate_to_round(start_round)
    env.log(f"resumed from the checkpoint after round {start_round}")

  progress = runtime.progress_bar(config.rounds, config.progress, initial=start_round)
  start = time.perf_counter()
  last_eval: dict = {}
  for round_idx in range(start_round, config.rounds):
    state, metrics = round_fn(state, data.train, runtime.cohort_for(env, round_idx),
                              federated.round_key(train_root, round_idx))
    record = runtime.round_record(metrics, round_idx, start)
    if (round_idx + 1) % config.eval_every == 0 or round_idx + 1 == config.rounds:
      last_eval = evaluate(state.params, state.batch_stats)
      record.update(last_eval)
    env.metrics.write(record)
    every = config.get("checkpoint_every", 0)
    if every and ((round_idx + 1) % every == 0 or round_idx + 1 == config.rounds):
      env.checkpoint.save(round_idx + 1, state, {"spec": repr(spec)})
    progress.update(1)
    progress.set_postfix(loss=f"{record['train_loss']:.3f}",
                         acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}")
  progress.close()
  return {
      "rounds": config.rounds, "wall_time_s": time.perf_counter() - start, "strategy": strategy.name,
      "strategy_timings_s": timings, "params": accounting.param_count(spec),
      "flops": accounting.flops(spec), "data": data.description, **last_eval,
  }

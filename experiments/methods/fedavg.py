"""Driver for the FedAvg family on a dense model (the main job's method).

Optional one-shot global magnitude pruning (`config.prune_density` < 1): after
`config.prune_round` rounds the server keeps the `prune_density` fraction of
all kernel entries with the largest magnitude (one global threshold,
`masks.global_topk`), and training continues with these fixed masks in the
ServerState (clients train the masked model).

Per-round metrics records (metrics.jsonl) hold the train metrics of the round,
eval metrics every `eval_every` rounds, `wall_time`, the model's kept `params`
and `flops` (fedjax_prune.accounting, batch 1), `bytes_up` / `bytes_down` of the
whole cohort in that round (dense encoding, bitmap once pruned), and, when
pruning is configured, `density/<layer path>` per prunable layer (1.0 before it).

Checkpoints hold the ServerState (params, batch stats, optimizer state, masks,
round index) and meta {spec, strategy, pruned, config, sampler}; the cohort sampler
and the round keys are pure functions of (seed, round), so the round index is their state.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp

from experiments import build, runtime
from fedjax_prune import accounting, checkpoint, federated, masks as masks_lib, models
from fedjax_prune.pruning import _sparse


def validate(config) -> None:
  """Checks the optional pruning fields (the FedAvg fields are checked by build.validate)."""
  density = config.get("prune_density", 1.0)
  if (not isinstance(density, (int, float)) or isinstance(density, bool)
      or not 0.0 < density <= 1.0):
    raise build.ConfigError(f"config.prune_density={density!r} is invalid: allowed a number in "
                            "(0, 1] (1 = no pruning)")
  prune_round = config.get("prune_round", 0)
  if not isinstance(prune_round, int) or isinstance(prune_round, bool) or not (
      0 <= prune_round < config.rounds):
    raise build.ConfigError(f"config.prune_round={prune_round!r} is invalid: allowed an integer in "
                            f"[0, {config.rounds - 1}] (rounds before pruning)")


def global_magnitude_masks(params, density: float):
  """Masks keeping the `density` fraction of all kernel entries by |w| (biases stay dense)."""
  return masks_lib.global_topk(masks_lib.magnitude(params), density, masks_lib.by_ndim(params))


def prune(state: federated.ServerState, density: float) -> federated.ServerState:
  """One-shot global magnitude pruning of the server model (host side, between rounds)."""
  # Copies: global_topk shares one `()` array among the unpruned leaves, and the donated
  # round must not receive the same buffer twice.
  m = jax.tree.map(jnp.copy, global_magnitude_masks(state.params, density))
  return state._replace(params=masks_lib.apply(state.params, m), masks=m)


def size_record(spec, masks, pruned: bool, num_clients: int, layers: tuple = ()) -> dict:
  """Model size, FLOPs, communication and per-layer density for the metrics records.

  Args:
    layers: paths ('dense_0/kernel') of the prunable layers whose density is logged
      (1.0 before pruning), () for none.
  """
  m = jax.device_get(masks) if pruned else None
  up, down = accounting.round_bytes(spec, m, encoding="bitmap" if pruned else "dense")
  record = {"params": accounting.param_count(spec, m), "flops": accounting.flops(spec, m),
            "bytes_up": up * num_clients, "bytes_down": down * num_clients}
  if layers:
    if masks is None:  # dense training
      kept = dict.fromkeys(layers, 1.0)
    else:
      kept = {path: float(jnp.mean(leaf))
              for path, leaf in zip(_sparse.leaf_paths(masks), jax.tree.leaves(masks))}
    record.update({f"density/{name}": kept[name] for name in layers})
  return record


def prunable_layers(params, prunable=None) -> tuple:
  """'dense_0/kernel' paths of the leaves a static `prunable` filter selects (default:
  the kernels, ndim >= 2, that global magnitude pruning prunes)."""
  flags = _sparse.leaf_flags(params, masks_lib.by_ndim(params) if prunable is None else prunable)
  return tuple(path for path, flag in zip(_sparse.leaf_paths(params), flags) if flag)


def run(config, env: runtime.Env) -> dict:
  data = env.data
  spec = build.build_spec(config, data.input_shape, data.num_classes)
  _, params, batch_stats = models.build(spec, jax.random.key(config.seeds.init))
  algorithm_for = lambda apply_fn, schedule, lowrank=None: build.build_algorithm(
      config, apply_fn, schedule, lowrank=lowrank)
  density = float(config.get("prune_density", 1.0))
  prune_round = config.get("prune_round", 0) if density < 1.0 else None
  # Large dense kernels trained as factors: dense runs only (pruning adds masks).
  lowrank = build.build_lowrank(config, spec, params, data.train.max_examples) if prune_round is None else None

  # The state template needs no compiled round, so restore first (runtime.choose_strategy
  # then gives a resumed run the checkpoint's client-execution strategy).
  base_alg = algorithm_for(build.build_apply(spec, data.normalize, "lax"), None)
  state = base_alg.init(jax.tree.map(jnp.copy, params), jax.random.key(config.seeds.init),
                        batch_stats=batch_stats)

  def template(meta):
    if meta.get("spec") != repr(spec):
      raise checkpoint.CheckpointError(f"it was saved with model spec {meta.get('spec')}, this run "
                                       f"builds {spec!r}")
    return jax.eval_shape(prune, state, density) if meta.get("pruned") else state

  start_round, pruned, meta = 0, False, {}
  restored = env.checkpoint.restore(template)
  if restored is not None:
    start_round, state, meta = restored
    pruned = bool(meta.get("pruned"))
    env.metrics.truncate_to_round(start_round)
    env.log(f"resumed from the checkpoint after round {start_round}")

  strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats, algorithm_for,
                                              runtime.cohort_for(env, 0), lowrank=lowrank)
  schedule = strategy.schedule(build.build_schedule(config))
  env.log(f"client execution: {strategy.name}")
  apply_fn = build.build_apply(spec, data.normalize, strategy.conv_impl, build.compute_dtype(config))
  if strategy.lowrank and lowrank is None:
    raise ValueError(f"strategy {strategy.name!r} trains dense kernels as factors, which this run "
                     "cannot (needs SGD clients, no FedProx, no pruning, an MLP/ConvNet "
                     "with a large dense layer)")
  alg = build.build_algorithm(config, apply_fn, schedule,
                              lowrank=lowrank if strategy.lowrank else None)
  round_fn = federated.make_round(alg, execution=strategy.execution,
                                  mesh=runtime.mesh_for(env, strategy), donate=True)
  evaluate = runtime.make_evaluator(env, apply_fn)
  train_root = jax.random.key(config.seeds.training)
  layers = prunable_layers(params) if prune_round is not None else ()
  sizes = size_record(spec, state.masks, pruned, config.clients_per_round, layers)

  config_json = json.loads(config.to_json_best_effort())
  progress = runtime.progress_bar(config.rounds, config.progress, initial=start_round)
  start = runtime.run_clock_start(meta)
  last_eval: dict = {}
  for round_idx in range(start_round, config.rounds):
    if prune_round is not None and not pruned and round_idx >= prune_round:
      state, pruned = prune(state, density), True  # masks become full-shape: one recompile
      sizes = size_record(spec, state.masks, pruned, config.clients_per_round, layers)
    state, metrics = round_fn(state, data.train, runtime.cohort_for(env, round_idx),
                              federated.round_key(train_root, round_idx))
    record = runtime.round_record(metrics, round_idx, start)
    record.update(sizes)
    if runtime.is_eval_round(config, round_idx):
      last_eval = evaluate(state.params, state.batch_stats)
      record.update(last_eval)
    env.metrics.write(record)
    if runtime.is_checkpoint_round(config, round_idx):
      env.checkpoint.save(round_idx + 1, state, {
          "spec": repr(spec), "strategy": strategy.name, "pruned": pruned, "config": config_json,
          # Cohorts are a pure function of (sampling seed, round): this is the sampler's state.
          "sampler": {"seed": config.seeds.sampling, "next_round": round_idx + 1},
          **runtime.timing_meta(start, timings)})
    progress.update(1)
    progress.set_postfix(loss=f"{record['train_loss']:.3f}",
                         acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}")
  progress.close()
  if not last_eval:  # resumed from the final checkpoint: evaluate the restored model
    last_eval = evaluate(state.params, state.batch_stats)
  return {
      "rounds": config.rounds, "wall_time_s": time.perf_counter() - start, "strategy": strategy.name,
      "strategy_timings_s": timings, "params": sizes["params"], "flops": sizes["flops"],
      "bytes_up_per_round": sizes["bytes_up"], "bytes_down_per_round": sizes["bytes_down"],
      "data": data.description, **last_eval,
  }

"""The FedAvg family (the main job's method): config -> `pruning.one_shot.one_shot_magnitude`.

`config.algorithm.name` picks FedAvg/FedAvgM/FedAdam/FedYogi/FedProx; optional one-shot
global magnitude pruning (`config.prune_density` < 1 after `config.prune_round` rounds)
is the library method's (see its docstring for the records it adds). Checkpoints hold
the ServerState (params, batch stats, optimizer state, masks, round index); the cohort
sampler and the round keys are pure functions of (seed, round), so the round index is
their state.
"""
from __future__ import annotations

import jax

from experiments import build as build_lib, runtime
from fedjax_prune import models
from fedjax_prune.pruning import one_shot


def validate(config) -> None:
  """Checks the optional pruning fields (the FedAvg fields are checked by build.validate)."""
  density = config.get("prune_density", 1.0)
  if (not isinstance(density, (int, float)) or isinstance(density, bool)
      or not 0.0 < density <= 1.0):
    raise build_lib.ConfigError(f"config.prune_density={density!r} is invalid: allowed a number in "
                            "(0, 1] (1 = no pruning)")
  prune_round = config.get("prune_round", 0)
  if not isinstance(prune_round, int) or isinstance(prune_round, bool) or not (
      0 <= prune_round < config.rounds):
    raise build_lib.ConfigError(f"config.prune_round={prune_round!r} is invalid: allowed an integer in "
                            f"[0, {config.rounds - 1}] (rounds before pruning)")


def extendable(config) -> str | None:
  """None: nothing in a round depends on config.rounds (the one-shot prune comes after the
  fixed `prune_round`, the optimizers have no schedule, DP's epsilon after round r is r's),
  so a run can be extended to more rounds (`train.check_extension`)."""
  del config
  return None


# The records' size helpers, shared with the sparse baselines' experiment code.
size_record, prunable_layers = one_shot.size_record, one_shot.prunable_layers


def build(config, env: runtime.Env) -> runtime.Run:
  """The FedAvg-family `Method` of `config` (with its optional one-shot pruning)."""
  data = env.data
  spec = build_lib.build_spec(config, data.input_shape, data.num_classes)
  _, params, batch_stats = models.build(spec, jax.random.key(config.seeds.init))
  algorithm_for = lambda apply_fn, schedule, lowrank=None: build_lib.build_algorithm(
      config, apply_fn, schedule, lowrank=lowrank, data=data)
  density = float(config.get("prune_density", 1.0))
  prune_round = config.get("prune_round", 0) if density < 1.0 else None
  # Large dense kernels trained as factors: dense runs only (pruning adds masks).
  lowrank = build_lib.build_lowrank(config, spec, params, data.train.max_examples) if prune_round is None else None
  strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats, algorithm_for,
                                              runtime.cohort_for(env, 0), lowrank=lowrank)
  env.log(f"client execution: {strategy.name}")
  if strategy.lowrank and lowrank is None:
    raise ValueError(f"strategy {strategy.name!r} trains dense kernels as factors, which this run "
                     "cannot (needs SGD clients, no FedProx, no pruning, an MLP/ConvNet "
                     "with a large dense layer)")
  apply_fn = build_lib.build_apply(spec, data.normalize, strategy.conv_impl,
                                   build_lib.compute_dtype(config))
  alg = build_lib.build_algorithm(config, apply_fn, strategy.schedule(build_lib.build_schedule(config)),
                                  lowrank=lowrank if strategy.lowrank else None, data=data)
  method = one_shot.one_shot_magnitude(
      alg, spec=spec, params=params, batch_stats=batch_stats, key=jax.random.key(config.seeds.init),
      evaluate=runtime.make_evaluator(env, apply_fn), clients_per_round=config.clients_per_round,
      density=density, prune_round=prune_round or 0)
  return runtime.Run(method, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))

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

import jax
import jax.numpy as jnp

from experiments import build as build_lib, runtime
from fedjax_prune import accounting, federated, masks as masks_lib, models
from fedjax_prune.pruning import _sparse


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


def build(config, env: runtime.Env) -> runtime.Run:
  """The FedAvg-family `Method` of `config` (with its optional one-shot pruning)."""
  data = env.data
  spec = build_lib.build_spec(config, data.input_shape, data.num_classes)
  _, params, batch_stats = models.build(spec, jax.random.key(config.seeds.init))
  algorithm_for = lambda apply_fn, schedule, lowrank=None: build_lib.build_algorithm(
      config, apply_fn, schedule, lowrank=lowrank)
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
                                  lowrank=lowrank if strategy.lowrank else None)
  layers = prunable_layers(params) if prune_round is not None else ()

  def with_sizes(state: federated.MethodState) -> federated.MethodState:
    pruned = state.host["pruned"]
    return state._replace(cache=size_record(spec, state.server.masks, pruned,
                                            config.clients_per_round, layers))

  def init():
    server = alg.init(params, jax.random.key(config.seeds.init), batch_stats=batch_stats)
    return with_sizes(federated.MethodState(server, spec, {"pruned": False}))

  def before_round(state, round_idx, key):
    del key
    if prune_round is None or state.host["pruned"] or round_idx < prune_round:
      return state
    # Masks become full-shape: the round compiles once more.
    return with_sizes(state._replace(server=prune(state.server, density), host={"pruned": True}))

  def evaluator(spec):
    evaluate = runtime.make_evaluator(env, apply_fn)
    return lambda state, round_idx: evaluate(state.server.params, state.server.batch_stats)

  def template(initial, spec, host):
    del spec
    return jax.eval_shape(prune, initial.server, density) if host["pruned"] else initial.server

  def summary(state, last_eval):
    sizes = state.cache
    return {"params": sizes["params"], "flops": sizes["flops"],
            "bytes_up_per_round": sizes["bytes_up"], "bytes_down_per_round": sizes["bytes_down"]}

  method = federated.Method(
      init=init, algorithm=lambda spec: alg, evaluator=evaluator, before_round=before_round,
      record=lambda before, after, round_idx, metrics: dict(after.cache), summary=summary,
      template=template, resume=with_sizes)
  return runtime.Run(method, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))

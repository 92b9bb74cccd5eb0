"""FedTiny (config.method='fedtiny'): config -> `pruning.fedtiny.fedtiny_method` (adaptive
BN selection on round 0's cohort, then progressive prune-and-grow).

Config fields (config.sparse, shared with the baselines' driver `sparse.py`):
density, distribution, adjust_every (ΔT), adjust_end (T_end; both 0: the paper's 10 / 300
per 500 rounds scaled to config.rounds, `sparse.adjust_schedule`), adjust_alpha (α),
growth_batch_size (0 = client batch), num_candidates (C), candidate_mode
('seeds' | 'random_layerwise_density'), bn_aggregation ('statistics' | 'affine':
the port's gap), progressive ('blockwise' | 'all_layers': the port's mode),
num_blocks, block_order ('input_to_output' | 'output_to_input').

Records, summary and client costs: `fedtiny_method`'s docstring. config.privacy /
config.compression: the aggregator is in the algorithm's path (`build.in_path_aggregator`),
its state in the server state and its checkpoints.
"""
from __future__ import annotations

import jax

from experiments import build as build_lib, runtime
from experiments.methods import sparse as sparse_driver
from fedjax_prune import models
from fedjax_prune.pruning import _sparse
from fedjax_prune.pruning import fedtiny as fedtiny_lib

PROGRESSIVE = ("blockwise", "all_layers")
BLOCK_ORDERS = ("input_to_output", "output_to_input")


def validate(config) -> None:
  sparse_driver.validate_common(config)
  build_lib._int_in(config, "sparse.num_candidates", 1)
  build_lib._choice(config, "sparse.candidate_mode", fedtiny_lib.CANDIDATE_MODES)
  build_lib._choice(config, "sparse.bn_aggregation", fedtiny_lib.BN_AGGREGATIONS)
  build_lib._choice(config, "sparse.progressive", PROGRESSIVE)
  build_lib._int_in(config, "sparse.num_blocks", 1)
  build_lib._choice(config, "sparse.block_order", BLOCK_ORDERS)
  adjust_schedule(config)


def extendable(config) -> str | None:
  """None unless the adjustment schedule is scaled to config.rounds (adjust_every =
  adjust_end = 0): with an explicit ΔT and T_end nothing depends on config.rounds."""
  return sparse_driver.extendable(config)


def adjust_schedule(config) -> tuple[int, int]:
  """FedTiny's (ΔT, T_end): `sparse.adjust_schedule`, a scaled one adjusting each block
  (config.sparse.num_blocks; 1 with 'all_layers') at least 3 times."""
  s = config.sparse
  blocks = s.num_blocks if s.progressive == "blockwise" else 1
  return sparse_driver.adjust_schedule(config, num_blocks=blocks, min_adjustments=3)


def build(config, env: runtime.Env) -> runtime.Run:
  """FedTiny's `Method` of config."""
  data, s = env.data, config.sparse
  spec = sparse_driver.spec_for(config, data)
  params, batch_stats = models.init_params(spec, jax.random.key(config.seeds.init))
  prunable = _sparse.prunable_filter(params)
  num_layers = sum(_sparse.leaf_flags(params, prunable))
  if s.progressive == "blockwise" and s.num_blocks > num_layers:
    raise build_lib.ConfigError(f"config.sparse.num_blocks={s.num_blocks} is invalid: allowed [1, {num_layers}] "
                            "(the model's number of sparse layers)")
  if s.progressive == "blockwise":
    progressive = fedtiny_lib.Blockwise(fedtiny_lib.network_blocks(params, prunable, s.num_blocks),
                                        reverse=s.block_order == "output_to_input")
  else:
    progressive = fedtiny_lib.AllLayers()
  adjust_every, adjust_end = adjust_schedule(config)
  env.log(f"adjustment schedule: every {adjust_every} rounds before round {adjust_end} "
          f"({fedtiny_lib.num_adjustments(adjust_every, adjust_end)} adjustments)")
  options = dict(progressive=progressive, adjust_every=adjust_every, adjust_end=adjust_end,
                 adjust_alpha=s.adjust_alpha, growth_batch_size=s.growth_batch_size or None)
  opt = sparse_driver.client_optimizer(config)
  agg = build_lib.in_path_aggregator(config, data)  # config.privacy / config.compression, or None
  algorithm_for = lambda apply_fn, schedule: fedtiny_lib.fedtiny(
      apply_fn, opt, schedule, prunable=prunable, aggregator=agg, **options)
  strategy, timings, run = sparse_driver.sparse_run(config, env, spec, params, batch_stats, opt,
                                                    algorithm_for)
  method = fedtiny_lib.fedtiny_method(
      run, density=s.density, distribution=s.distribution, num_candidates=s.num_candidates,
      candidate_mode=s.candidate_mode, bn_aggregation=s.bn_aggregation,
      abns_cohort=runtime.cohort_for(env, 0), abns_batch_size=config.eval_batch_size,
      execution=strategy.execution, mesh=runtime.mesh_for(env, strategy), aggregator=agg,
      **options)
  return runtime.Run(method, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))

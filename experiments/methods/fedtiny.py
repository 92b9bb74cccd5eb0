"""Driver for FedTiny: adaptive BN selection on round 0's cohort, then progressive prune-and-grow.

Config fields (config.sparse, shared with the baselines' driver `sparse.py`):
density, distribution, adjust_every (ΔT), adjust_end (T_end), adjust_alpha (α),
growth_batch_size (0 = client batch), num_candidates (C), candidate_mode
('seeds' | 'random_layerwise_density'), bn_aggregation ('statistics' | 'affine':
the port's gap), progressive ('blockwise' | 'all_layers': the port's mode),
num_blocks, block_order ('input_to_output' | 'output_to_input').

Costs (per client, accounting.client_round_cost): every round's sparse local
training; adjustment rounds add one dense-gradient mini-batch for the adjusted
layers and the top-K buffer/upload (K = sum_l floor(f(t) a_l) over those
layers); round 1 adds adaptive BN selection (C statistics sweeps + C
evaluation sweeps over the client's local data, forward only).
"""
from __future__ import annotations

import jax
import numpy as np

from experiments import build as build_lib, runtime
from experiments.methods import sparse as sparse_driver
from fedjax_prune import accounting, masks as masks_lib, models
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


def build(config, env: runtime.Env) -> runtime.Run:
  data, s = env.data, config.sparse
  spec = sparse_driver.spec_for(config, data)
  init_params = lambda key: models.init_params(spec, key)
  params0, stats0 = init_params(jax.random.key(config.seeds.init))
  prunable = _sparse.prunable_filter(params0)
  num_layers = sum(_sparse.leaf_flags(params0, prunable))
  if s.progressive == "blockwise" and s.num_blocks > num_layers:
    raise build_lib.ConfigError(f"config.sparse.num_blocks={s.num_blocks} is invalid: allowed [1, {num_layers}] "
                            "(the model's number of sparse layers)")
  if s.progressive == "blockwise":
    progressive = fedtiny_lib.Blockwise(fedtiny_lib.network_blocks(params0, prunable, s.num_blocks),
                                        reverse=s.block_order == "output_to_input")
  else:
    progressive = fedtiny_lib.AllLayers()
  opt, schedule = sparse_driver.client_optimizer(config), sparse_driver.local_schedule(config)
  growth = s.growth_batch_size or config.client.batch_size

  def make_alg(apply_fn, sched):
    return fedtiny_lib.fedtiny(apply_fn, opt, sched, prunable=prunable, adjust_every=s.adjust_every,
                               adjust_end=s.adjust_end, adjust_alpha=s.adjust_alpha,
                               progressive=progressive, growth_batch_size=growth)

  strategy, timings = sparse_driver._choose(config, env, spec, params0, stats0, make_alg)
  apply_fn = build_lib.build_apply(spec, data.normalize, strategy.conv_impl, build_lib.compute_dtype(config))
  alg = make_alg(apply_fn, schedule)

  init_key = jax.random.key(config.seeds.init)
  cohort0 = runtime.cohort_for(env, 0)

  def init_fn():
    """Adaptive BN selection on round 0's cohort (forward passes only)."""
    candidates = fedtiny_lib.make_candidates(init_params, init_key, num_candidates=s.num_candidates,
                                             density=s.density, distribution=s.distribution,
                                             mode=s.candidate_mode, prunable=prunable)
    select = jax.jit(fedtiny_lib.adaptive_bn_selection(
        apply_fn, batch_size=config.eval_batch_size, bn_aggregation=s.bn_aggregation,
        execution=strategy.execution, mesh=runtime.mesh_for(env, strategy)))
    result = select(candidates, data.train, cohort0, jax.random.fold_in(init_key, 1))
    index = int(result.index)
    losses = [float(v) for v in np.asarray(result.losses)]
    env.log(f"adaptive BN selection: candidate {index} of {s.num_candidates}, losses {losses}")
    params, batch_stats, masks = fedtiny_lib.take_candidate(candidates, index, result.batch_stats)
    state = alg.init(params, init_key, batch_stats=batch_stats, masks=masks)
    return state, {"sparse_method": "fedtiny", "target_density": float(s.density),
                   "abns_index": index, "abns_losses": losses,
                   "abns_forward_examples_per_client": abns_forward}

  batch = config.client.batch_size
  slots = sparse_driver.optimizer_slots(config)
  flags = _sparse.leaf_flags(params0, prunable)
  paths = _sparse.leaf_paths(params0)
  ids = np.asarray(cohort0.client_ids)[np.asarray(cohort0.active)]
  abns_examples = float(np.mean(np.asarray(data.train.num_examples)[ids]))
  sweeps = 2 if s.bn_aggregation == "statistics" else 1
  abns_forward = int(round(sweeps * s.num_candidates * abns_examples))
  blocks = progressive.blocks if isinstance(progressive, fedtiny_lib.Blockwise) else None

  def cost_fn(round_idx, masks_np, record):
    kwargs: dict = {}
    if record.get("adjusted", 0.0):
      frac = masks_lib.cosine_fraction(round_idx, s.adjust_alpha, s.adjust_end)
      block = int(record["adjusted_block"])
      layers = [p for p, f in zip(paths, flags) if f and (blocks is None or p in blocks[block])]
      leaves = dict(zip(paths, jax.tree.leaves(masks_np)))
      topk = sum(int(np.floor(np.float32(frac) * np.float32(leaves[p].sum()))) for p in layers)
      kwargs = dict(dense_grad_batches=1, dense_grad_layers=sparse_driver.layer_names(layers),
                    topk_entries=topk)
    if round_idx == 0:
      kwargs["forward_examples"] = abns_forward
    return accounting.client_round_cost(spec, masks_np, batch_size=batch,
                                        local_steps=sparse_driver.mean_steps(record),
                                        optimizer_slots=slots, **kwargs)

  method = sparse_driver.masked_method(config, env, spec=spec, alg=alg, init_fn=init_fn,
                                      apply_fn=apply_fn, cost_fn=cost_fn, prunable=prunable,
                                      params_template=params0)
  return runtime.Run(method, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))

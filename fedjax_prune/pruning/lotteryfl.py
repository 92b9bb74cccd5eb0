"""LotteryFL (global-ticket variant): federated iterative magnitude pruning with rewinding.

A `base.MaskRule` (`magnitude_rewind`) run by `base.masked_fedavg` from the dense model;
`lotteryfl_method` runs it end to end. After every `prune_every`-th round, while fewer than
`num_prune_steps` pruning steps have been taken and the cohort's mean local
training accuracy of that round is at least `accuracy_threshold`, the server
prunes every sparse layer by magnitude of the aggregate (nested: only active
weights compete) to density d_l^(s / num_prune_steps) after step s, and rewinds
the surviving weights (and BN statistics) to their initial values (lottery
ticket rewinding). After the last step layer l has exactly its target density d_l.

Deviation (documented; per-client tickets not implemented). LotteryFL as
published (from background knowledge, partly inferred; the authors' code was not read)
is personalised:
  * every client k keeps its OWN mask m_k (and the shared initial weights);
  * a sampled client receives the global weights restricted to m_k, checks its
    accuracy on LOCAL VALIDATION data, and if that passes the threshold and its
    own density is still above the target it prunes a fixed fraction of its
    remaining weights by magnitude and rewinds the survivors to their initial
    values; then it trains under m_k and uploads weights and mask;
  * the server averages every weight over the clients whose masks hold it;
  * evaluation is personalised: each client's masked model on its own test data.
  Different clients therefore reach different densities at different rounds.
This module instead keeps ONE global mask, prunes it on the server by the
magnitude of the aggregate (per layer, to d_l^(s / num_prune_steps)), takes the
threshold on the cohort's mean local TRAINING accuracy of the round, rewinds the
global model, and is evaluated as one global model on the central test set. So
it is a global-ticket baseline at exactly the target density (as the other
methods of the comparison), not the personalised method. Implementing the
paper's variant needs per-client persistent masks in the server state ([N, ...],
scattered from `ClientOutput.per_client` by client id; the engine has per-client
outputs but no method keeps per-client state yet) and a personalised evaluation
in the driver.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith... / Li, Wang, Chen, Yi.
  "LotteryFL: Personalized and Communication-Efficient Federated Learning with
  Lottery Ticket Hypothesis on Non-IID Datasets", 2020.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_prune import federated
from fedjax_prune import masks as masks_lib
from fedjax_prune.federated import FedAlgorithm, LocalSchedule, softmax_cross_entropy
from fedjax_prune.pruning import _sparse, base
from fedjax_prune.pruning._sparse import rank_select
from fedjax_prune.types import BatchStats, Masks, Params, PRNGKey, PyTree


class LotteryState(NamedTuple):
  """LotteryFL's rule state: the masks, the rewinding point and the pruning progress."""
  masks: Masks
  init_params: Params
  init_batch_stats: BatchStats
  prune_step: jax.Array  # [] int32 pruning steps taken


def magnitude_rewind(*, prunable: Any, densities: PyTree, prune_every: int = 10,
                     num_prune_steps: int = 5, accuracy_threshold: float = 0.0) -> base.MaskRule:
  """LotteryFL's mask rule: prune by magnitude of the aggregate, rewind the survivors.

  After round t with (t + 1) % prune_every == 0, while steps remain and the cohort's
  mean local training accuracy is >= `accuracy_threshold`, step s prunes every layer
  to density d_l^(s / num_prune_steps) (only active weights compete) and rewinds the
  model to `init`'s weights and BN statistics under the new masks. Args: as
  `lotteryfl`. Metrics: `density`, `pruned`.
  """
  _sparse.check_int("prune_every", prune_every, 1)
  _sparse.check_int("num_prune_steps", num_prune_steps, 1)
  if not 0.0 <= accuracy_threshold <= 1.0:
    raise ValueError(f"accuracy_threshold must be in [0, 1], got {accuracy_threshold!r}")
  flags = _sparse.leaf_flags(prunable, prunable)
  dens = jax.tree.leaves(densities)
  if len(dens) != len(flags):
    raise ValueError(f"densities must have one float per parameter leaf ({len(flags)}), got {len(dens)}")

  def init(params: Params, key: PRNGKey, batch_stats: BatchStats | None = None) -> LotteryState:
    del key
    batch_stats = {} if batch_stats is None else batch_stats
    return LotteryState(_sparse.full_masks(params, prunable), params, batch_stats,
                        jnp.zeros((), jnp.int32))

  def update(state: LotteryState, model: base.Model, sums: base.CohortSums, round_idx, key):
    del key  # no random choice on the server
    accuracy = sums.metrics.correct_sum / jnp.maximum(sums.metrics.num_examples, 1.0)
    prune = (masks_lib.should_update(round_idx + 1, prune_every, begin=1)
             & (state.prune_step < num_prune_steps) & (accuracy >= accuracy_threshold)
             & (sums.weight > 0))
    step = state.prune_step + 1
    exponent = step.astype(jnp.float32) / num_prune_steps

    def pruned(_):
      out = []
      for w, m, d, f in zip(jax.tree.leaves(model.params), jax.tree.leaves(state.masks), dens,
                            flags):
        if not f:
          out.append(m)
          continue
        final = max(1, math.floor(d * w.size + 0.5))  # the exact target count, as masks.topk
        target = jnp.floor(jnp.float32(d) ** exponent * w.size + 0.5).astype(jnp.int32)
        k = jnp.where(step >= num_prune_steps, final, jnp.maximum(target, final))
        out.append(rank_select(jnp.where(m, jnp.abs(w), -jnp.inf), k) & m)
      masks = jax.tree.unflatten(jax.tree.structure(state.masks), out)
      # Rewind the survivors (and BN statistics) to the initial values: the lottery ticket.
      return masks, base.Model(masks_lib.apply(state.init_params, masks), state.init_batch_stats)

    masks, model = jax.lax.cond(prune, pruned, lambda _: (state.masks, model), None)
    new = state._replace(masks=masks, prune_step=jnp.where(prune, step, state.prune_step))
    return new, model, {"density": masks_lib.density(masks, model.params),
                        "pruned": prune.astype(jnp.float32)}

  return base.MaskRule(init, update)


def lotteryfl(apply_fn: Callable, client_optimizer, schedule: LocalSchedule, *, prunable: Any,
              densities: PyTree, prune_every: int = 10, num_prune_steps: int = 5,
              accuracy_threshold: float = 0.0, loss_fn: Callable = softmax_cross_entropy,
              train_transform: Callable | None = None,
              aggregator: federated.Aggregator | None = None) -> FedAlgorithm:
  """LotteryFL (global-ticket variant): `base.masked_fedavg` with `magnitude_rewind`.

  Args:
    apply_fn, client_optimizer, schedule, loss_fn, train_transform: as `fedavg`.
    prunable: static bool filter.
    densities: target layer densities, a tree like params of Python floats
      (e.g. `_sparse.layer_densities(params, d, 'uniform')`).
    prune_every: rounds between pruning steps.
    num_prune_steps: geometric steps from density 1 to the targets.
    accuracy_threshold: mean local training accuracy needed to prune (0 = always).
    aggregator: None: the example-weighted mean. A `federated.Aggregator` (robust, DP,
      compressed) aggregates the updates over the server's masks, its state (the adaptive
      clip norm, error-feedback memory) in `MaskedFedAvgState.aggregator`
      (`base.masked_fedavg`'s `aggregator`).

  Returns:
    FedAlgorithm over `base.MaskedFedAvgState` with a `LotteryState`; `init(params, key,
    batch_stats=None, masks=None)` stores the rewinding point (the initial params).

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, masks, testing
    >>> from fedjax_prune.pruning import _sparse, lotteryfl
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> prunable = masks.by_ndim(params)
    >>> alg = lotteryfl.lotteryfl(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                           prunable=prunable, prune_every=1, num_prune_steps=1,
    ...                           densities=_sparse.layer_densities(params, 0.5, "uniform", prunable))
    >>> state = alg.init(params, jax.random.key(1))
    >>> state, metrics = federated.make_round(alg)(state, data, federated.make_cohort([0, 1, 2]),
    ...                                           jax.random.key(2))
    >>> int(metrics["pruned"]), round(float(metrics["density"]), 1)
    (1, 0.5)
  """
  rule = magnitude_rewind(prunable=prunable, densities=densities, prune_every=prune_every,
                          num_prune_steps=num_prune_steps, accuracy_threshold=accuracy_threshold)
  return base.masked_fedavg(apply_fn, client_optimizer, schedule, rule, loss_fn=loss_fn,
                            train_transform=train_transform, aggregator=aggregator)


def lotteryfl_method(run: base.SparseRun, *, density: float, distribution: str = "uniform",
                     prune_every: int = 10, num_prune_steps: int = 5,
                     accuracy_threshold: float = 0.0,
                     aggregator: federated.Aggregator | None = None) -> federated.Method:
  """LotteryFL end to end: `lotteryfl` from the dense model towards the layer densities of
  `density` (allocation `distribution`; `aggregator`: see `lotteryfl`, its state is part of
  the server state). Returns the `Method` (`base.masked_method`'s records and summary)."""
  prunable = _sparse.prunable_filter(run.params)
  apply_fn = run.model.apply_for(run.spec)
  alg = lotteryfl(apply_fn, run.optimizer, run.schedule, prunable=prunable,
                  densities=_sparse.layer_densities(run.params, density, distribution, prunable),
                  prune_every=prune_every, num_prune_steps=num_prune_steps,
                  accuracy_threshold=accuracy_threshold, aggregator=aggregator)

  def init_fn():
    state = alg.init(run.params, run.key, batch_stats=run.batch_stats)
    return state, {"sparse_method": "lotteryfl", "target_density": float(density)}

  return base.masked_method(run, alg, init_fn, apply_fn=apply_fn, prunable=prunable)

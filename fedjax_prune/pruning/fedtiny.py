"""FedTiny: adaptive BN selection + progressive prune-and-grow (Huang et al., ICDCS 2023).

Read top to bottom as the algorithm; `fedtiny_method` runs it end to end. What the paper
leaves open follows "the port", the authors' group's later re-implementation
(github.com/FedPruning/FedPruning, module `fedtiny`, last at commit e301307):

1. Sparse setup (`sparse_setup`): unstructured masks on conv/dense kernels
   (text models: LSTM input and recurrent kernels, attention/FFN kernels, the head;
   `_sparse.prunable_filter`), biases, BN, LayerNorm and embeddings dense and counted
   in the budget, uniform or ERK layer densities (`_sparse.layer_densities` on how ERK
   reads an LSTM kernel), magnitude masks of the initial weights.
2. Adaptive BN selection (`make_candidates`, `adaptive_bn_selection`): C
   coarse-pruned candidates (different init seeds, or random layer-wise
   density allocations of the same weights); each sampled client computes the
   exact BN statistics of every candidate on its local data with forward
   passes only (vmapped over candidates inside the client, the engine maps the
   clients); the server pools them, mu = sum_k w_k mu_k and
   v = sum_k w_k (v_k + mu_k^2) - mu^2 with w_k = n_k / N; clients evaluate
   every candidate with the pooled statistics; the lowest mean client loss wins.
   `bn_aggregation='affine'` reproduces the port's gap (BN statistics never
   aggregated: candidates are compared with their initial running statistics).
   A model without BatchNorm (the text models: LSTM, transformer) has no
   statistics to pool: only the evaluation pass runs, and the candidate of lowest
   mean client loss as initialised wins.
3. Progressive prune-and-grow (`progressive_prune_and_grow`, a `base.MaskRule`;
   `fedtiny` = `base.masked_fedavg` with it): every `adjust_every` rounds up to
   `adjust_end` (exclusive: f(T_end) = 0 would change nothing), with the cosine-annealed
   fraction f(t) = alpha/2 (1 + cos(pi t / T_end)),
   clients upload the top-K_l = floor(f(t) a_l) gradients (one mini-batch,
   dense gradient) among the INACTIVE positions of each adjusted layer; the
   server prunes the K_l active weights of smallest |w| (FedAvg aggregate)
   and grows the K_l inactive positions of largest aggregated |g|. Grown
   weights start at exactly 0 (the engine masks after every local step, so
   inactive entries of every client model are 0; the port leaves -lr*g there).
   `Blockwise(blocks)` adjusts one block of layers per adjustment, cycling in
   input->output order (or reversed); `AllLayers()` is the port's behaviour.

Deviation notes (each an option or documented choice): BN statistics are
exact per-client batch-pooled moments (the port's EMA is replaced); the
growth gradient uses one random local mini-batch after local training
(`growth_data_mode='batch'`); K is per layer (port), not global.

References:
  Huang, Zhang, Sun, Fang, Yuan, Wu. "Distributed Pruning Towards Tiny Neural
  Networks in Federated Learning", ICDCS 2023 (arXiv 2212.01977).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune import federated
from fedjax_prune import masks as masks_lib
from fedjax_prune import models
from fedjax_prune.federated import (ClientInfo, ClientOutput, FedAlgorithm, LocalSchedule,
                                    softmax_cross_entropy)
from fedjax_prune.pruning import _sparse, base
from fedjax_prune.pruning._sparse import rank_select
from fedjax_prune.types import BatchStats, Masks, Params, PRNGKey, PyTree

CANDIDATE_MODES = ("seeds", "random_layerwise_density")
BN_AGGREGATIONS = ("statistics", "affine")


# ----------------------------------------------------------------------------
# Sparse setup.


def sparse_setup(params: Params, density: float, *, distribution: str = "uniform",
                 prunable: Any = None) -> tuple[Params, Masks]:
  """Initial magnitude masks at a global density that counts dense entries.

  Args:
    params: initial parameters.
    density: fraction of ALL entries kept (biases/BN count against it), in (0, 1].
    distribution: 'uniform' or 'erk' layer densities.
    prunable: static bool filter (default: kernels with ndim >= 2).

  Returns:
    (params * masks, masks): full-shape bool masks on prunable leaves, `()` True
    elsewhere.
  """
  prunable = _sparse.prunable_filter(params) if prunable is None else prunable
  densities = _sparse.layer_densities(params, density, distribution, prunable)
  masks = _sparse.magnitude_masks(params, densities, prunable)
  return masks_lib.apply(params, masks), masks


# ----------------------------------------------------------------------------
# Adaptive BN selection.


class Candidates(NamedTuple):
  """C candidate coarse-pruned models, stacked along a leading candidate axis K.

  Attributes:
    params: leaves [K, ...], already masked.
    batch_stats: leaves [K, ...] (BN running statistics).
    masks: leaves [K, ...] (full shape on prunable leaves, [K] scalars elsewhere).
  """
  params: Params
  batch_stats: BatchStats
  masks: Masks


def random_layer_densities(params: Params, density: float, key: PRNGKey, *,
                           distribution: str = "uniform", prunable: Any = None,
                           spread: float = 0.5) -> PyTree:
  """A random layer-wise density allocation with the same global budget.

  d_l = min(1, s * d_l^base * exp(spread * z_l)), z_l ~ U(-1, 1), with s solved
  by bisection so that sum_l d_l n_l equals the budget of `distribution`.

  Returns:
    A tree like `params` of Python floats (1.0 on dense leaves).
  """
  prunable = _sparse.prunable_filter(params) if prunable is None else prunable
  base = _sparse.layer_densities(params, density, distribution, prunable)
  flags = _sparse.leaf_flags(params, prunable)
  leaves, treedef = jax.tree.flatten(base)
  sizes = [math.prod(np.shape(p)) for p in jax.tree.leaves(params)]
  idx = [i for i, f in enumerate(flags) if f]
  keep = sum(leaves[i] * sizes[i] for i in idx)
  z = np.asarray(jax.random.uniform(key, (len(idx),), minval=-1.0, maxval=1.0))
  raw = [leaves[i] * math.exp(spread * float(zi)) for i, zi in zip(idx, z)]
  total = lambda s: sum(min(1.0, s * r) * sizes[i] for r, i in zip(raw, idx))
  lo, hi = 0.0, 1.0
  while total(hi) < keep and hi < 1e12:
    hi *= 2.0
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if total(mid) < keep else (lo, mid)
  out = list(leaves)
  for r, i in zip(raw, idx):
    out[i] = min(1.0, hi * r)
  return jax.tree.unflatten(treedef, out)


def candidate_key(key: PRNGKey, index: int) -> PRNGKey:
  """The init key of candidate `index` of `make_candidates(init_fn, key, ...)`: `key` itself
  for candidate 0, fold_in(key, index) for the others. A baseline started from
  `init_fn(candidate_key(key, c))` starts from FedTiny's candidate c's weights."""
  return key if index == 0 else jax.random.fold_in(key, index)


def make_candidates(init_fn: Callable[[PRNGKey], tuple[Params, BatchStats]], key: PRNGKey, *,
                    num_candidates: int, density: float, distribution: str = "uniform",
                    mode: str = "seeds", prunable: Any = None, spread: float = 0.5) -> Candidates:
  """The C coarse-pruned candidates of adaptive BN selection (host-side, not jitted).

  Args:
    init_fn: `init_fn(key) -> (params, batch_stats)` of the model.
    key: PRNG key: candidate 0 has the weights of `init_fn(key)` (what a baseline started
      from `key` trains), candidate c > 0 those of `init_fn(fold_in(key, c))`.
    num_candidates: C >= 1.
    density: global density (dense entries counted).
    distribution: 'uniform' or 'erk' base layer densities.
    mode: 'seeds' (each candidate re-initialised, same layer densities; the port)
      or 'random_layerwise_density' (the weights of `init_fn(key)`, candidate 0
      with the base densities, the others random allocations of the same budget).
    prunable: static filter (default kernels with ndim >= 2).
    spread: log-range of the random density factors (random_layerwise_density).

  Returns:
    Candidates with leaves stacked [C, ...].
  """
  _sparse.check_int("num_candidates", num_candidates, 1)
  if mode not in CANDIDATE_MODES:
    raise ValueError(f"candidate mode must be one of {CANDIDATE_MODES}, got {mode!r}")
  out = []
  # Candidate 0 starts where every baseline does (an earlier fold_in(key, 0) gave FedTiny other
  # starting weights than the methods it is compared with: a confound larger than the gap).
  shared = init_fn(candidate_key(key, 0))
  for c in range(num_candidates):
    ckey = candidate_key(key, c)
    if mode == "seeds":
      params, stats = shared if c == 0 else init_fn(ckey)
      prune = _sparse.prunable_filter(params) if prunable is None else prunable
      densities = _sparse.layer_densities(params, density, distribution, prune)
    else:
      params, stats = shared
      prune = _sparse.prunable_filter(params) if prunable is None else prunable
      if c == 0:
        densities = _sparse.layer_densities(params, density, distribution, prune)
      else:
        densities = random_layer_densities(params, density, jax.random.fold_in(ckey, 1),
                                           distribution=distribution, prunable=prune, spread=spread)
    masks = _sparse.magnitude_masks(params, densities, prune)
    out.append((masks_lib.apply(params, masks), stats, masks))
  stack = lambda *xs: jnp.stack([jnp.asarray(x) for x in xs])
  return Candidates(*(jax.tree.map(stack, *[o[i] for o in out]) for i in range(3)))


def _map_bn(fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], stats: BatchStats):
  """Applies fn(mean, var) -> (mean', var') to every {'mean', 'var'} node of a stats tree."""
  if isinstance(stats, dict) and set(stats) == {"mean", "var"}:
    mean, var = fn(stats["mean"], stats["var"])
    return {"mean": mean, "var": var}
  if isinstance(stats, dict):
    return {k: _map_bn(fn, v) for k, v in stats.items()}
  raise ValueError(f"batch_stats must be nested dicts of {{'mean', 'var'}}, found {type(stats)}")


class BNMoments(NamedTuple):
  """Count-weighted BN moments of one client (sums; the server pools them).

  Attributes:
    first: tree like batch_stats whose BN nodes hold the moment sums
      {'mean': sum_b n_b mu_b, 'var': sum_b n_b (v_b + mu_b^2)} (leaves [C] per BN).
    count: [] number of examples n_k.
  """
  first: BatchStats
  count: jax.Array


def client_bn_moments(apply_fn: Callable, params: Params, batch_stats: BatchStats, x: jax.Array,
                      num_examples: jax.Array, batch_size: int) -> BNMoments:
  """Exact BN statistics of one model on one client's data, forward passes only.

  The data is swept once in fixed batches (BN in train mode, as in training);
  each batch's moments (mu_b, v_b) are read off the running-statistics update
  started from zeros (new = (1 - momentum) * batch moment) and pooled:
  mu_k = sum_b n_b mu_b / n_k, v_k = sum_b n_b (v_b + mu_b^2) / n_k - mu_k^2.
  Returned as the sums sum_b n_b mu_b and sum_b n_b (v_b + mu_b^2).

  Args:
    apply_fn: model apply function.
    params: (masked) parameters.
    batch_stats: running statistics (only the structure is used).
    x: [E, ...] the client's padded examples.
    num_examples: [] real examples.
    batch_size: forward batch size.
  """
  max_examples = x.shape[0]
  steps = -(-max_examples // batch_size)
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)
  rate = 1.0 - models.BN_MOMENTUM

  def step(carry, s):
    pos = s * batch_size + jnp.arange(batch_size)
    mask = pos < num_examples
    _, new = apply_fn(params, zeros, x[jnp.minimum(pos, max_examples - 1)], train=True,
                      example_mask=mask)
    nb = jnp.sum(mask).astype(jnp.float32)
    moments = _map_bn(lambda m, v: (nb * (m / rate), nb * (v / rate + jnp.square(m / rate))), new)
    return jax.tree.map(jnp.add, carry, moments), None

  total, _ = jax.lax.scan(step, zeros, jnp.arange(steps))
  return BNMoments(total, num_examples.astype(jnp.float32))


def pool_bn_statistics(mean_C: PyTree, var_C: PyTree, weights_C: jax.Array) -> tuple[PyTree, PyTree]:
  """Pooled mean/variance of C groups: mu = sum w mu_c, v = sum w (v_c + mu_c^2) - mu^2.

  Args:
    mean_C, var_C: trees of [C, ...] per-group means and (biased) variances.
    weights_C: [C] group sizes (normalised inside).

  Returns:
    (mean, var) of the union of the groups.
  """
  w = weights_C / jnp.sum(weights_C)
  wv = lambda a: w.reshape((-1,) + (1,) * (a.ndim - 1))
  mean = jax.tree.map(lambda m: jnp.sum(wv(m) * m, axis=0), mean_C)
  var = jax.tree.map(lambda m, v, mu: jnp.sum(wv(m) * (v + jnp.square(m)), axis=0) - jnp.square(mu),
                     mean_C, var_C, mean)
  return mean, var


def _finish_moments(total: BatchStats, count: jax.Array) -> BatchStats:
  inv = 1.0 / jnp.maximum(count, 1.0)

  def fin(first, second):
    mean = first * inv
    return mean, jnp.maximum(second * inv - jnp.square(mean), 0.0)

  return _map_bn(fin, total)


class ABNSResult(NamedTuple):
  """Outcome of adaptive BN selection.

  Attributes:
    index: [] int32, the chosen candidate.
    batch_stats: pooled BN statistics of every candidate, leaves [K, ...].
    losses: [K] mean (over clients) of each client's mean loss per candidate.
  """
  index: jax.Array
  batch_stats: BatchStats
  losses: jax.Array


def adaptive_bn_selection(apply_fn: Callable, *, batch_size: int, bn_aggregation: str = "statistics",
                          loss_fn: Callable = softmax_cross_entropy,
                          execution: federated.Execution = federated.Sequential(),
                          mesh=None) -> Callable:
  """Builds FedTiny's adaptive BN selection (two client passes over one cohort).

  Args:
    apply_fn: model apply function.
    batch_size: forward batch size of the clients.
    bn_aggregation: 'statistics' (pool BN mean/variance; the paper's intent) or
      'affine' (the port's gap: only BN scale/bias, which forward passes never
      change, are "aggregated", so candidates keep their initial statistics).
    loss_fn: per-example loss.
    execution: client execution strategy of `federated.run_clients`.
    mesh: optional client mesh.

  Returns:
    `select(candidates, dataset, cohort, key) -> ABNSResult`; jit it in the
    caller. Costs each client C forward sweeps for statistics and C for
    evaluation, no backward pass.
  """
  if bn_aggregation not in BN_AGGREGATIONS:
    raise ValueError(f"bn_aggregation must be one of {BN_AGGREGATIONS}, got {bn_aggregation!r}")

  def stats_client(cands: Candidates, data, info: ClientInfo, key):
    del info, key
    one = lambda p, s: client_bn_moments(apply_fn, p, s, data.x, data.num_examples, batch_size)
    moments = jax.vmap(one)(cands.params, cands.batch_stats)
    return ClientOutput(moments)

  def eval_client(cands: Candidates, data, info: ClientInfo, key):
    del key
    max_examples = data.x.shape[0]
    steps = -(-max_examples // batch_size)

    def one(params, stats):
      def step(total, s):
        pos = s * batch_size + jnp.arange(batch_size)
        mask = pos < data.num_examples
        idx = jnp.minimum(pos, max_examples - 1)
        logits, _ = apply_fn(params, stats, data.x[idx], train=False, example_mask=mask)
        return total + jnp.sum(loss_fn(logits, data.y[idx]) * mask), None

      total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), jnp.arange(steps))
      return total / jnp.maximum(data.num_examples.astype(jnp.float32), 1.0)

    losses_K = jax.vmap(one)(cands.params, cands.batch_stats)
    # A plain mean over clients (as the port's candidate selection): each client counts once.
    return ClientOutput((losses_K, jnp.ones((), jnp.float32)))

  def select(cands: Candidates, dataset, cohort: federated.Cohort, key: PRNGKey) -> ABNSResult:
    k_stats, k_eval = jax.random.split(key)
    if bn_aggregation == "statistics" and jax.tree.leaves(cands.batch_stats):
      out = federated.run_clients(stats_client, cands, dataset, cohort, k_stats,
                                  execution=execution, mesh=mesh)
      moments: BNMoments = out.sums
      pooled = jax.vmap(_finish_moments)(moments.first, moments.count)
      cands = cands._replace(batch_stats=pooled)
    out = federated.run_clients(eval_client, cands, dataset, cohort, k_eval,
                                execution=execution, mesh=mesh)
    loss_sum, num = out.sums
    losses = loss_sum / jnp.maximum(num, 1.0)
    return ABNSResult(jnp.argmin(losses).astype(jnp.int32), cands.batch_stats, losses)

  return select


def take_candidate(cands: Candidates, index: int, batch_stats: BatchStats | None = None
                   ) -> tuple[Params, BatchStats, Masks]:
  """(params, batch_stats, masks) of candidate `index` (pooled stats if given)."""
  stats = cands.batch_stats if batch_stats is None else batch_stats
  take = lambda t: jax.tree.map(lambda x: x[index], t)
  return take(cands.params), take(stats), take(cands.masks)


# ----------------------------------------------------------------------------
# Progressive prune-and-grow.


class AllLayers(NamedTuple):
  """Every sparse layer is adjusted at every adjustment round (the port)."""


class Blockwise(NamedTuple):
  """One block of layers per adjustment round, cycling through `blocks`.

  Attributes:
    blocks: tuple of blocks, each a tuple of leaf paths ('conv_0/kernel'), in
      input->output order (see `network_blocks`).
    reverse: cycle output->input instead.
  """
  blocks: tuple
  reverse: bool = False


Progressive = AllLayers | Blockwise


def _natural_key(path: str):
  parts = re.split(r"(\d+)", path)
  return [int(p) if p.isdigit() else p for p in parts]


def network_order(params: Params, prunable: Any) -> list[str]:
  """Prunable leaf paths in input->output order for this library's models.

  Natural sort of the paths ('conv_2' < 'conv_10'), with a ResNet's 'stem'
  first and its 'head' last (dense layers of a ConvNet already sort after its convs).
  """
  flags = _sparse.leaf_flags(params, prunable)
  paths = [p for p, f in zip(_sparse.leaf_paths(params), flags) if f]
  rank = lambda p: (0 if p.startswith("stem") else 2 if p.startswith("head") else 1, _natural_key(p))
  return sorted(paths, key=rank)


def network_blocks(params: Params, prunable: Any, num_blocks: int) -> tuple[tuple[str, ...], ...]:
  """Splits `network_order` into `num_blocks` contiguous blocks of near-equal layer count."""
  order = network_order(params, prunable)
  if not isinstance(num_blocks, int) or not 1 <= num_blocks <= len(order):
    raise ValueError(f"num_blocks must be an int in [1, {len(order)}] (the number of sparse "
                     f"layers), got {num_blocks!r}")
  return tuple(tuple(str(p) for p in chunk) for chunk in np.array_split(np.array(order), num_blocks))


def _block_ids(params: Params, prunable: Any, progressive: Progressive) -> list[int]:
  """Block index of each leaf (-1: not prunable; 0 for every prunable leaf with AllLayers)."""
  flags = _sparse.leaf_flags(params, prunable)
  paths = _sparse.leaf_paths(params)
  if isinstance(progressive, AllLayers):
    return [0 if f else -1 for f in flags]
  if not isinstance(progressive, Blockwise):
    raise ValueError(f"progressive must be AllLayers() or Blockwise(blocks), got {progressive!r}")
  where = {}
  for b, block in enumerate(progressive.blocks):
    for p in block:
      if p in where:
        raise ValueError(f"layer {p!r} appears in blocks {where[p]} and {b}")
      where[p] = b
  ids = []
  for p, f in zip(paths, flags):
    if f and p not in where:
      raise ValueError(f"sparse layer {p!r} is in no block; blocks must cover every prunable leaf")
    if not f and p in where:
      raise ValueError(f"block layer {p!r} is not prunable")
    ids.append(where[p] if f else -1)
  return ids


# The paper's schedule (METHODS.md §2.5): ΔT 10 and T_end 300 for T = 500 rounds.
PAPER_ROUNDS, PAPER_ADJUST_EVERY, PAPER_ADJUST_END = 500, 10, 300


def adjustment_round(round_idx: Any, adjust_every: int, adjust_end: int) -> bool | jax.Array:
  """Whether round t adjusts the mask: t % ΔT == 0 and 0 < t < T_end.

  The port also "adjusts" at t = T_end, where f(T_end) = 0 prunes and grows nothing but
  the clients still compute (and are charged) a dense gradient; that no-op is skipped.
  Python bool for an int round, a bool scalar for a traced one.
  """
  # (T_end < 2: no round has 0 < t < T_end; `& False` keeps a Python bool a Python bool.)
  return (masks_lib.should_update(round_idx, adjust_every, begin=1, end=max(adjust_end - 1, 1))
          & (adjust_end >= 2))


def num_adjustments(adjust_every: int, adjust_end: int) -> int:
  """Number of adjustment rounds (`adjustment_round`) of a schedule: (T_end - 1) // ΔT."""
  return max(0, (adjust_end - 1) // adjust_every)


def scaled_schedule(rounds: int, *, num_blocks: int = 1, min_adjustments: int = 3
                    ) -> tuple[int, int]:
  """The paper's adjustment schedule scaled to a run of `rounds` rounds: (ΔT, T_end).

  ΔT = max(1, floor(T * 10 / 500)) and T_end = floor(T * 300 / 500) keep the paper's
  ratios (ΔT 10, T_end 300 at T = 500; exact whenever T is a multiple of 50). A
  `Blockwise` schedule with `num_blocks` blocks adjusts block r mod num_blocks at the
  r-th of the `num_adjustments(ΔT, T_end)` adjustment rounds, so every block is adjusted
  at least num_adjustments // num_blocks times (29 // 4 = 7 in the paper's setting).

  Args:
    rounds: T, the run's rounds (>= 1).
    num_blocks: blocks of the progressive schedule (1 for `AllLayers`).
    min_adjustments: adjustments every block must get (>= 1).

  Returns:
    (adjust_every, adjust_end), Python ints.

  Raises:
    ValueError: when T is too small for every block to be adjusted `min_adjustments`
      times (the message gives the smallest T that is enough).
  """
  _sparse.check_int("rounds", rounds, 1)
  _sparse.check_int("num_blocks", num_blocks, 1)
  _sparse.check_int("min_adjustments", min_adjustments, 1)

  def schedule(t):
    return (max(1, t * PAPER_ADJUST_EVERY // PAPER_ROUNDS), t * PAPER_ADJUST_END // PAPER_ROUNDS)

  every, end = schedule(rounds)
  per_block = num_adjustments(every, end) // num_blocks
  if per_block < min_adjustments:
    enough = rounds + 1
    while num_adjustments(*schedule(enough)) // num_blocks < min_adjustments:
      enough += 1
    raise ValueError(
        f"rounds={rounds} is too few to adjust each of {num_blocks} block(s) {min_adjustments} "
        f"times: the scaled schedule (adjust_every={every}, adjust_end={end}) has "
        f"{num_adjustments(every, end)} adjustment rounds, {per_block} per block; use rounds >= "
        f"{enough} or fewer blocks")
  return every, end


def adjust_counts(masks: Masks, fraction: jax.Array, in_block: list) -> list:
  """K_l = floor(f * a_l) for adjusted layers, 0 for the others (a_l = active entries).

  Args:
    masks: current masks.
    fraction: [] f(t).
    in_block: per leaf, a bool (traced or static) saying whether it is adjusted now.

  Returns:
    Per leaf an int32 [] count.
  """
  out = []
  for m, flag in zip(jax.tree.leaves(masks), in_block):
    active = jnp.sum(m, dtype=jnp.int32)
    k = jnp.floor(fraction * active.astype(jnp.float32)).astype(jnp.int32)
    out.append(jnp.where(flag, k, 0))
  return out


def topk_inactive(grads: Params, masks: Masks, counts: list, prunable_flags: list[bool]) -> Params:
  """Client upload: per prunable leaf keep the counts_l largest |g| among INACTIVE positions.

  Active positions and non-prunable leaves are zeroed (never uploaded). Ties need no
  random break here: tied zero gradients upload as zeros whichever are chosen; the
  server breaks the growth ties (`prune_and_grow`).
  """
  leaves, treedef = jax.tree.flatten(grads)
  out = []
  for g, m, k, f in zip(leaves, jax.tree.leaves(masks), counts, prunable_flags):
    if not f:
      out.append(jnp.zeros_like(g))
      continue
    score = jnp.where(m, -1.0, jnp.abs(g))
    chosen = rank_select(score, k) & ~m
    out.append(jnp.where(chosen, g, jnp.zeros((), g.dtype)))
  return jax.tree.unflatten(treedef, out)


def prune_and_grow(params: Params, grads: Params, masks: Masks, counts: list,
                   prunable_flags: list[bool], key: PRNGKey | None = None) -> Masks:
  """Server rule: per layer prune counts_l smallest-|w| active, grow counts_l largest-|g| inactive.

  The number of active entries of every layer is unchanged. Positions pruned in
  this step are regrown only if too few inactive positions exist (score -1). With
  `key`, ties in the growth scores are broken at random: when fewer than counts_l
  inactive positions have a nonzero averaged gradient (dead ReLUs at density 0.01),
  the rest are drawn uniformly among the zero-gradient ones, not the lowest indices.
  """
  leaves = jax.tree.leaves(params)
  keys = [None] * len(leaves) if key is None else list(jax.random.split(key, len(leaves)))
  out = []
  for w, g, m, k, f, leaf_key in zip(leaves, jax.tree.leaves(grads), jax.tree.leaves(masks),
                                     counts, prunable_flags, keys):
    if not f:
      out.append(m)
      continue
    active = jnp.sum(m, dtype=jnp.int32)
    neg_inf = jnp.array(-jnp.inf, w.dtype)
    keep = rank_select(jnp.where(m, jnp.abs(w), neg_inf), active - k) & m
    grow_score = jnp.where(keep, neg_inf, jnp.where(m, -1.0, jnp.abs(g)))
    grow = rank_select(grow_score, k, leaf_key) & ~keep
    out.append(keep | grow)
  return jax.tree.unflatten(jax.tree.structure(masks), out)


def progressive_prune_and_grow(apply_fn: Callable, *, prunable: Any, adjust_every: int = 10,
                               adjust_end: int = 300, adjust_alpha: float = 0.2,
                               progressive: Progressive = AllLayers(), growth_batch_size: int,
                               loss_fn: Callable = softmax_cross_entropy) -> base.MaskRule:
  """FedTiny's mask rule: every ΔT rounds up to T_end, prune K_l smallest |w|, grow K_l
  largest aggregated top-K |g| (module docstring, 3.).

  Client: after local training, on adjustment rounds, the dense gradient of one random
  mini-batch, kept at the top-K_l inactive positions of each adjusted layer (uploaded,
  example-weighted). Server: `prune_and_grow` on the aggregate with the mean top-K gradients.

  Args: as `fedtiny` (`growth_batch_size` required). Metrics: `density`, `adjusted`,
  `adjust_fraction`, `adjusted_block` (-1 when none), `mask_changes` (grown entries).
  """
  _sparse.check_int("adjust_every", adjust_every, 1)
  _sparse.check_int("adjust_end", adjust_end, 1)
  if not 0.0 <= adjust_alpha <= 1.0:
    raise ValueError(f"adjust_alpha must be in [0, 1], got {adjust_alpha!r}")
  flags = _sparse.leaf_flags(prunable, prunable)
  block_ids = _block_ids(prunable, prunable, progressive)
  num_blocks = max(block_ids) + 1 if any(f for f in flags) else 1
  reverse = isinstance(progressive, Blockwise) and progressive.reverse

  def is_adjustment(round_idx):
    return adjustment_round(round_idx, adjust_every, adjust_end)

  def counts_for(masks, round_idx):
    frac = masks_lib.cosine_fraction(round_idx, adjust_alpha, adjust_end)
    r = jnp.maximum(round_idx // adjust_every - 1, 0)
    b = r % num_blocks
    b = num_blocks - 1 - b if reverse else b
    in_block = [jnp.asarray(i == b) if i >= 0 else False for i in block_ids]
    return adjust_counts(masks, frac, in_block), frac, b

  def init(params: Params, key: PRNGKey, batch_stats: BatchStats | None = None) -> base.MaskState:
    del key, batch_stats  # density 1 unless `masked_fedavg.init` is given masks
    return base.MaskState(_sparse.full_masks(params, prunable))

  def client(state: base.MaskState, local: base.Model, metrics, data, keys, round_idx):
    def topk_grads():
      g = _sparse.random_batch_gradient(apply_fn, loss_fn, local.params, local.batch_stats, data,
                                        keys[0], growth_batch_size)
      counts, _, _ = counts_for(state.masks, round_idx)
      return topk_inactive(g, state.masks, counts, flags)

    grads = _sparse.only_when(is_adjustment(round_idx), topk_grads, local.params)
    return base.ClientResult(local, metrics, grads)

  def update(state: base.MaskState, model: base.Model, sums: base.CohortSums, round_idx, key):
    adjust = is_adjustment(round_idx) & (sums.weight > 0)
    counts, frac, block = counts_for(state.masks, round_idx)

    def adjusted(_):
      zeros = jax.tree.map(jnp.zeros_like, model.params)
      gbar = federated.finish_weighted_mean(sums.stats, sums.weight, zeros)
      return prune_and_grow(model.params, gbar, state.masks, counts, flags, key)

    masks = jax.lax.cond(adjust, adjusted, lambda _: state.masks, None)
    changed = sum((jnp.sum(m != o, dtype=jnp.int32) for m, o, f in
                   zip(jax.tree.leaves(masks), jax.tree.leaves(state.masks), flags) if f),
                  jnp.zeros((), jnp.int32))
    metrics = {"density": masks_lib.density(masks, model.params),
               "adjusted": adjust.astype(jnp.float32),
               "adjust_fraction": jnp.where(adjust, frac, 0.0),
               "adjusted_block": jnp.where(adjust, block, -1).astype(jnp.float32),
               "mask_changes": (changed // 2).astype(jnp.float32)}
    return base.MaskState(masks), model, metrics

  return base.MaskRule(init, update, client, client_keys=1)


def fedtiny(apply_fn: Callable, client_optimizer, schedule: LocalSchedule, *, prunable: Any,
            adjust_every: int = 10, adjust_end: int = 300, adjust_alpha: float = 0.2,
            progressive: Progressive = AllLayers(), growth_batch_size: int | None = None,
            loss_fn: Callable = softmax_cross_entropy, train_transform: Callable | None = None,
            aggregator: federated.Aggregator | None = None) -> FedAlgorithm:
  """FedTiny's federated training: `masked_fedavg` with `progressive_prune_and_grow`.

  Args:
    apply_fn: model apply function.
    client_optimizer: optax optimizer of the clients (fresh state each round).
    schedule: LocalSchedule.
    prunable: static bool filter with the params' structure (e.g.
      `masks.by_ndim(params)`); only its structure and flags are used.
    adjust_every: ΔT, rounds between adjustments (adjust at t % ΔT == 0, 0 < t < T_end;
      `scaled_schedule(T)` gives the paper's ΔT and T_end scaled to a run of T rounds).
    adjust_end: T_end.
    adjust_alpha: α, initial prune/grow fraction.
    progressive: `AllLayers()` (port) or `Blockwise(blocks, reverse)`; with
      Blockwise the r-th adjustment (r = t // ΔT - 1) adjusts block r mod #blocks.
    growth_batch_size: batch of the growth gradient (default: schedule.batch_size).
    loss_fn: per-example loss.
    train_transform: per-batch augmentation.
    aggregator: None: the example-weighted mean. A `federated.Aggregator` (robust, DP,
      compressed) aggregates the updates over the server's masks, its state (the
      adaptive clip norm, error-feedback memory) in `MaskedFedAvgState.aggregator`
      (`base.masked_fedavg`'s `aggregator`).

  Returns:
    FedAlgorithm over `base.MaskedFedAvgState`; `init(params, key, batch_stats=None,
    masks=None)` (masks None = density 1, e.g. for timing).

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, masks, testing
    >>> from fedjax_prune.pruning import fedtiny as ft
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> prunable = masks.by_ndim(params)
    >>> params, masks = ft.sparse_setup(params, 0.5, prunable=prunable)
    >>> alg = ft.fedtiny(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                  prunable=prunable, adjust_every=1, adjust_end=4)
    >>> state = alg.init(params, jax.random.key(1), masks=masks)
    >>> round_fn = federated.make_round(alg)
    >>> state, metrics = round_fn(state, data, federated.make_cohort([0, 1, 2]), jax.random.key(2))
    >>> int(state.round_idx)
    1
  """
  rule = progressive_prune_and_grow(
      apply_fn, prunable=prunable, adjust_every=adjust_every, adjust_end=adjust_end,
      adjust_alpha=adjust_alpha, progressive=progressive,
      growth_batch_size=growth_batch_size or schedule.batch_size, loss_fn=loss_fn)
  return base.masked_fedavg(apply_fn, client_optimizer, schedule, rule, loss_fn=loss_fn,
                            train_transform=train_transform, aggregator=aggregator)


# ----------------------------------------------------------------------------
# End to end.


def fedtiny_method(run: base.SparseRun, *, density: float, distribution: str = "uniform",
                   num_candidates: int = 1, candidate_mode: str = "seeds",
                   bn_aggregation: str = "statistics", abns_cohort: federated.Cohort,
                   abns_batch_size: int, execution: federated.Execution = federated.Sequential(),
                   mesh=None, progressive: Progressive = AllLayers(), adjust_every: int = 10,
                   adjust_end: int = 300, adjust_alpha: float = 0.2,
                   growth_batch_size: int | None = None,
                   aggregator: federated.Aggregator | None = None) -> federated.Method:
  """FedTiny end to end: adaptive BN selection on one cohort, then `fedtiny` rounds.

  Args:
    run: the `base.SparseRun` (model, clients' training, data, accounting).
    density, distribution: the candidates' global density and layer allocation.
    num_candidates, candidate_mode: C and how candidates differ (`make_candidates`).
    bn_aggregation: `adaptive_bn_selection`'s option.
    abns_cohort: the cohort that runs the selection (round 0's).
    abns_batch_size: the selection's forward batch size.
    execution, mesh: how the selection runs its clients (`federated.run_clients`).
    progressive, adjust_every, adjust_end, adjust_alpha, growth_batch_size, aggregator:
      `fedtiny`'s (the aggregator's state is part of the server state: checkpointed).

  Returns:
    The `Method` (`base.masked_method`'s records and summary, plus the summary's
    `abns_index`, `abns_losses`, `abns_forward_examples_per_client`). Client costs:
    sparse local training every round; adjustment rounds add one dense-gradient
    mini-batch for the adjusted layers and the top-K buffer/upload (K = sum_l
    floor(f(t) a_l) over those layers); round 1 adds the selection (C statistics
    sweeps + C evaluation sweeps over the client's data, forward only).
  """
  prunable = _sparse.prunable_filter(run.params)
  apply_fn = run.model.apply_for(run.spec)
  alg = fedtiny(apply_fn, run.optimizer, run.schedule, prunable=prunable,
                adjust_every=adjust_every, adjust_end=adjust_end, adjust_alpha=adjust_alpha,
                progressive=progressive, growth_batch_size=growth_batch_size,
                aggregator=aggregator)
  ids = np.asarray(abns_cohort.client_ids)[np.asarray(abns_cohort.active)]
  abns_examples = float(np.mean(np.asarray(run.train.num_examples)[ids]))
  sweeps = 2 if bn_aggregation == "statistics" else 1
  abns_forward = int(round(sweeps * num_candidates * abns_examples))

  def init_fn():
    """Adaptive BN selection on `abns_cohort` (forward passes only)."""
    candidates = make_candidates(lambda key: models.init_params(run.spec, key), run.key,
                                 num_candidates=num_candidates, density=density,
                                 distribution=distribution, mode=candidate_mode, prunable=prunable)
    select = jax.jit(adaptive_bn_selection(apply_fn, batch_size=abns_batch_size,
                                           bn_aggregation=bn_aggregation, execution=execution,
                                           mesh=mesh))
    result = select(candidates, run.train, abns_cohort, jax.random.fold_in(run.key, 1))
    index = int(result.index)
    losses = [float(v) for v in np.asarray(result.losses)]
    run.log(f"adaptive BN selection: candidate {index} of {num_candidates}, losses {losses}")
    params, batch_stats, masks = take_candidate(candidates, index, result.batch_stats)
    state = alg.init(params, run.key, batch_stats=batch_stats, masks=masks)
    return state, {"sparse_method": "fedtiny", "target_density": float(density),
                   "abns_index": index, "abns_losses": losses,
                   "abns_forward_examples_per_client": abns_forward}

  flags = _sparse.leaf_flags(run.params, prunable)
  paths = _sparse.leaf_paths(run.params)
  blocks = progressive.blocks if isinstance(progressive, Blockwise) else None

  def extra_cost(round_idx, masks, record):
    kwargs: dict = {}
    if record.get("adjusted", 0.0):
      frac = masks_lib.cosine_fraction(round_idx, adjust_alpha, adjust_end)
      block = int(record["adjusted_block"])
      layers = [p for p, f in zip(paths, flags) if f and (blocks is None or p in blocks[block])]
      leaves = dict(zip(paths, jax.tree.leaves(masks)))
      topk = sum(int(np.floor(np.float32(frac) * np.float32(leaves[p].sum()))) for p in layers)
      kwargs = dict(dense_grad_batches=1, dense_grad_layers=base.layer_names(layers),
                    topk_entries=topk)
    if round_idx == 0:
      kwargs["forward_examples"] = abns_forward
    return kwargs

  return base.masked_method(run, alg, init_fn, apply_fn=apply_fn, prunable=prunable,
                            extra_cost=extra_cost)

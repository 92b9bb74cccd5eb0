"""The aggregation hook, and mask-aware robust aggregators built on it.

An `Aggregator` is to aggregation what an optax `GradientTransformation` is to an
update: a NamedTuple of pure functions, built by a factory, composed by wrapping::

  init(params) -> state                                  server-side state (() for every
                                                         aggregator here)
  contribute(state, update, weight, present, client, key) -> Contribution
                                                         on ONE client, after local training
  finish(state, summed, fallback, key) -> (mean, state, metrics)
                                                         on the server, once per round

`update` is the client's model update (w_server - w_client, a params pytree),
`weight` its aggregation weight ([] float32: n_k, 1, or 0 for a client that takes no
part: padding clients and clients without examples), `present` None (the client holds
every coordinate) or a bool pytree broadcastable to `update` (the coordinates it holds:
its own sparse masks, its submodel), `client` its `ClientInfo`, `key` a key of its own.
A `Contribution` has `sums`, which the engine adds up over the cohort in-graph (the
in-graph path: no extra memory), and `per_client`, which comes back stacked [C, ...]
(only the robust statistics that need every client's update fill it). `finish` gets
both (`summed`), the value to keep where no client contributed (`fallback`, e.g. zeros
for a delta), and the server key.

`mean()` is today's weighted (or per-coordinate counted) mean, op for op. The robust
aggregators take each coordinate's statistic over the clients that HOLD it (participating
and `present`); padding clients never count:
  * `coordinate_median()`: the median of the holders' values (mean of the two middle
    values for an even count).
  * `trimmed_mean(beta)`: per coordinate, sort the h holders' values, drop
    floor(beta h) from each end, weighted mean of the rest (beta = 0: the weighted mean).
  * `norm_bound(max_norm)`: clip each client's update (over the coordinates it holds) to
    L2 norm `max_norm`, then the inner aggregator (default `mean()`); in-graph, no stack.
  * `krum(f, m)`: Krum (m = 1) / multi-Krum: score each participant by the summed
    distances to its n - f - 2 nearest other participants, keep the m best, weighted
    mean of those (per coordinate over the selected holders). With masks the squared
    distance of two clients is taken over the coordinates BOTH hold and rescaled by
    (all coordinates / common coordinates), i.e. the mean squared difference per common
    coordinate times the model size: it equals the plain squared distance without
    masks, is not shrunk merely because a client holds few coordinates (an unnormalised
    sum would make a tiny submodel everyone's nearest neighbour), and a pair with no
    common coordinate is infinitely far apart.

Composition: `norm_bound(M, median())`; attacks wrap `contribute` (`with_attack` in
`_attacks`); DP and compression plug in the same way (see the module docstring of
`_attacks` and the report of issue 28).

Algorithms whose factories do not take an aggregator are run with one through
`with_aggregator(alg, aggregator, view)`: a `SumsView` says where a client's update sits
in its `ClientOutput.sums` and how to hand the aggregate back to the algorithm's own
server step (`weighted_view` for sums pre-weighted by n_k: FedAvg, masked FedAvg, CAVP;
`pruning._hetero.counted_view` for the submodel methods). A stateful aggregator (adaptive
DP clipping, error-feedback memory) needs a slot in the server state: an `aggregator`
field (`federated.ServerState`, `pruning.base.MaskedFedAvgState`), filled by the wrapped
algorithm's `init`.

References:
  Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates,
  ICML 2018 (median, trimmed mean). Blanchard et al., Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent, NeurIPS 2017 (Krum, multi-Krum). Sun et al., Can
  You Really Backdoor Federated Learning?, 2019 (norm bounding).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_prune import tree as tree_lib
from fedjax_prune.federated import _keys
from fedjax_prune.federated._aggregate import finish_weighted_mean, weighted_contribution
from fedjax_prune.federated._engine import ClientInfo, ClientOutput, FedAlgorithm
from fedjax_prune.types import Params, PRNGKey, PyTree

# Streams folded into a client's / the server's key for the aggregator (the training key
# itself is left untouched, so a mean round trains exactly as before).
AGGREGATOR_STREAM = 0xA66


class Contribution(NamedTuple):
  """One client's contribution (`contribute`), or the cohort's (`finish`'s `summed`).

  Attributes:
    sums: pytree the engine sums over the cohort in-graph.
    per_client: pytree returned stacked [C, ...] (() for in-graph aggregators).
  """
  sums: PyTree = ()
  per_client: PyTree = ()


class Aggregator(NamedTuple):
  """An aggregation rule as three pure functions (module docstring).

  Attributes:
    init: `init(params) -> state`.
    contribute: `contribute(state, update, weight, present, client, key) -> Contribution`.
    finish: `finish(state, summed, fallback, key) -> (mean, state, metrics)`; `fallback`
      None means zeros.
    stacked: whether `finish` reads `per_client` (each client's update, [C, ...]).
  """
  init: Callable[[Params], Any]
  contribute: Callable[..., Contribution]
  finish: Callable[..., tuple[PyTree, Any, dict]]
  stacked: bool = False


class MeanSums(NamedTuple):
  """The in-graph sums of `mean()`.

  Attributes:
    total: sum_k w_k u_k (where held).
    weight: [] sum_k w_k.
    count: () without `present`, else per leaf sum_k w_k present_k (the mask's shape).
  """
  total: PyTree
  weight: jax.Array
  count: PyTree = ()


class Stacked(NamedTuple):
  """Each client's update, stacked by the engine ([C, ...] leaves in `finish`).

  Attributes:
    update: the update pytree.
    present: () (every coordinate held) or a bool pytree broadcastable to `update`.
    weight: [] aggregation weight.
    participating: [] bool, active and weight > 0.
  """
  update: PyTree
  present: PyTree
  weight: jax.Array
  participating: jax.Array


def _stateless_init(params: Params) -> tuple:
  del params
  return ()


def _fallback_leaves(fallback: PyTree | None, like: PyTree) -> PyTree:
  return tree_lib.zeros_like(like) if fallback is None else fallback


# ----------------------------------------------------------------------------- the mean


def mean() -> Aggregator:
  """The weighted mean (the default of every path): sum_k w_k u_k / sum_k w_k.

  Without `present` the denominator is the cohort's total weight (FedAvg), computed as
  `finish_weighted_mean` does; with `present`, per coordinate over the clients holding
  it (sum_k w_k present_k; a leaf whose `present` is a scalar uses the total weight
  of its holders). Where nobody contributed: `fallback`.
  """

  def contribute(state, update, weight, present, client, key) -> Contribution:
    del state, client, key
    if present is None:
      return Contribution(MeanSums(weighted_contribution(update, weight), weight))
    total = jax.tree.map(lambda x, p: jnp.where(p, x * jnp.asarray(weight, x.dtype),
                                                jnp.zeros((), x.dtype)), update, present)
    count = jax.tree.map(lambda p: weight * jnp.asarray(p, jnp.float32), present)
    return Contribution(MeanSums(total, weight, count))

  def finish(state, summed: Contribution, fallback, key):
    del key
    sums: MeanSums = summed.sums
    if isinstance(sums.count, tuple) and not sums.count:
      return finish_weighted_mean(sums.total, sums.weight, fallback), state, {}
    fallback = _fallback_leaves(fallback, sums.total)

    def one(total, count, old):
      held = count > 0
      return jnp.where(held, total / jnp.where(held, count, 1.0).astype(total.dtype), old)

    return jax.tree.map(one, sums.total, sums.count, fallback), state, {}

  return Aggregator(_stateless_init, contribute, finish)


# ----------------------------------------------------------------------------- stacked statistics
# Pure functions over stacked leaves: values_C [C, ...], held_C bool [C, ...] (the holders of
# each coordinate: participating and present), weights_C [C]. Tested against numpy.


def _expand(v_C: jax.Array, like: jax.Array) -> jax.Array:
  """[C] -> [C, 1, ..., 1] broadcastable to `like` [C, ...]."""
  return v_C.reshape(v_C.shape + (1,) * (like.ndim - 1))


def pick_clients(x_C: jax.Array, index: jax.Array) -> jax.Array:
  """x_C[index[...], ...] per coordinate (`index` [...] int in [0, C)): a chain of selects
  for C <= tree.MAX_CHAINED_ROWS (a gather along the major axis strides like the reduce
  `tree.sum_leading` avoids), else `take_along_axis`."""
  c = x_C.shape[0]
  if c > tree_lib.MAX_CHAINED_ROWS:
    return jnp.take_along_axis(x_C, index[None], axis=0)[0]
  out = x_C[0]
  for i in range(1, c):
    out = jnp.where(index == i, x_C[i], out)
  return out


def holders(stacked: Stacked) -> PyTree:
  """bool [C, ...] per update leaf: client k holds the coordinate and takes part."""

  def one(u, p):
    part = _expand(stacked.participating, u)
    if p is None:
      return part
    # A client's mask is () or of the leaf's rank: stacked [C] or [C, ...] -> rank of [C, ...].
    p = p.reshape(p.shape[:1] + (1,) * (u.ndim - p.ndim) + p.shape[1:])
    return part & jnp.broadcast_to(p, u.shape)

  present = stacked.present
  if isinstance(present, tuple) and not present:
    return jax.tree.map(lambda u: jnp.broadcast_to(one(u, None), u.shape), stacked.update)
  return jax.tree.map(one, stacked.update, present)


# Up to this many clients the client axis is sorted by a compare-exchange network of
# elementwise min / max (`sort_clients`); above it by XLA's sort (the network grows as
# C log^2 C compare-exchanges).
NETWORK_MAX_CLIENTS = 32


@functools.lru_cache(maxsize=None)
def merge_network(n: int) -> tuple[tuple[int, int], ...]:
  """Batcher's odd-even merge sort for n inputs: compare-exchange pairs (i, j), i < j,
  applied in order (Knuth, TAOCP vol. 3, 5.3.4; any n, not only powers of two)."""
  pairs, p = [], 1
  while p < n:
    k = p
    while k >= 1:
      for j in range(k % p, n - k, 2 * k):
        for i in range(min(k, n - j - k)):
          if (i + j) // (2 * p) == (i + j + k) // (2 * p):
            pairs.append((i + j, i + j + k))
      k //= 2
    p *= 2
  return tuple(pairs)


def sort_clients(x_C: jax.Array) -> jax.Array:
  """`x_C` sorted along its leading (client) axis, NaN as +inf.

  For C <= NETWORK_MAX_CLIENTS a sorting network of elementwise min / max over the C rows:
  one fused elementwise pass instead of XLA's comparator sort, whose CPU lowering was
  ~7x slower on the 10 x 6.6 M-coordinate LEAF CNN updates of a FEMNIST round (the
  median's cost; benchmarks/robust_aggregators.py). Exact: the values of `jnp.sort`.
  """
  x_C = jnp.where(jnp.isnan(x_C), jnp.inf, x_C)
  c = x_C.shape[0]
  if c > NETWORK_MAX_CLIENTS:
    return jnp.sort(x_C, axis=0)
  rows = [x_C[i] for i in range(c)]
  for a, b in merge_network(c):
    rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
  return jnp.stack(rows)


def stable_ranks(x_C: jax.Array) -> jax.Array:
  """[C, ...] int32: each entry's position in the stable ascending sort of its column
  along the client axis (ties keep client order; NaN as +inf), i.e. the inverse of
  `jnp.argsort(x_C, axis=0, stable=True)`.

  For C <= NETWORK_MAX_CLIENTS counted without sorting, rank_i = #{j: x_j < x_i} +
  #{j < i: x_j = x_i}: C^2 elementwise comparisons in one fused pass, where a sort that
  carries the order (network or XLA's) moves every value and index C log^2 C times.
  """
  x_C = jnp.where(jnp.isnan(x_C), jnp.inf, x_C)
  c = x_C.shape[0]
  if c > NETWORK_MAX_CLIENTS:
    order = jnp.argsort(x_C, axis=0, stable=True)
    return jnp.argsort(order, axis=0).astype(jnp.int32)  # the inverse permutation
  rows = [x_C[i] for i in range(c)]
  ranks = []
  for i in range(c):
    r = jnp.zeros(x_C.shape[1:], jnp.int32)
    for j in range(c):
      if j != i:
        before = (rows[j] < rows[i]) | ((rows[j] == rows[i]) if j < i else False)
        r = r + before.astype(jnp.int32)
    ranks.append(r)
  return jnp.stack(ranks)


def median_leaf(values_C: jax.Array, held_C: jax.Array, fallback: jax.Array) -> jax.Array:
  """Per coordinate: the median of the values of its holders (`fallback` where none)."""
  x = jnp.where(held_C, values_C, jnp.inf)
  s = sort_clients(x)  # holders first, in order; the others (+inf) last
  h = tree_lib.sum_leading(held_C.astype(jnp.int32))
  lo = jnp.maximum((h - 1) // 2, 0)
  hi = jnp.maximum(h // 2, 0)
  a = pick_clients(s, lo)
  b = pick_clients(s, hi)
  return jnp.where(h > 0, 0.5 * (a + b), fallback)


def trim_count(beta: float, h: jax.Array) -> jax.Array:
  """floor(beta h): the values trimmed from each end among h holders (a 1e-4 tolerance
  keeps e.g. 0.1 * 10 from rounding down to 0)."""
  return jnp.floor(beta * h.astype(jnp.float32) + 1e-4).astype(jnp.int32)


def trimmed_mean_leaf(values_C: jax.Array, held_C: jax.Array, weights_C: jax.Array, beta: float,
                      fallback: jax.Array) -> jax.Array:
  """Per coordinate: sort the h holders' values, drop floor(beta h) from each end, and
  take the weighted mean of the rest (`fallback` where no weight is left)."""
  x = jnp.where(held_C, values_C, jnp.inf)
  rank = stable_ranks(x)  # each client's place among the holders (the others rank last)
  ws = jnp.broadcast_to(_expand(jnp.asarray(weights_C), x), x.shape)
  h = tree_lib.sum_leading(held_C.astype(jnp.int32))
  k = trim_count(beta, h)
  keep = (rank >= k[None]) & (rank < (h - k)[None])
  num = tree_lib.sum_leading(jnp.where(keep, ws.astype(x.dtype) * x, 0.0))
  den = tree_lib.sum_leading(jnp.where(keep, ws, 0.0))
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0).astype(x.dtype), fallback)


def weighted_holder_mean(update_C: PyTree, held_C: PyTree, weights_C: jax.Array,
                         fallback: PyTree) -> PyTree:
  """Per coordinate: sum_k w_k u_k / sum_k w_k over the holders (`fallback` where none)."""

  def one(u, held, old):
    w = _expand(weights_C, u).astype(u.dtype)
    num = tree_lib.sum_leading(jnp.where(held, w * u, 0.0))
    den = tree_lib.sum_leading(jnp.where(held, w, 0.0))
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), old)

  return jax.tree.map(one, update_C, held_C, fallback)


def krum_distances(update_C: PyTree, held_C: PyTree, participating_C: jax.Array) -> jax.Array:
  """[C, C] squared distances over commonly held coordinates, rescaled by
  (all coordinates / common ones); +inf on the diagonal, for pairs without a common
  coordinate, and to or from a client that takes no part."""
  hp = jax.lax.Precision.HIGHEST
  num_c = participating_C.shape[0]
  cross = jnp.zeros((num_c, num_c), jnp.float32)
  sq_common = jnp.zeros((num_c, num_c), jnp.float32)
  common = jnp.zeros((num_c, num_c), jnp.float32)
  size = 0
  for u, held in zip(jax.tree.leaves(update_C), jax.tree.leaves(held_C)):
    p = held.reshape(num_c, -1).astype(jnp.float32)
    x = jnp.where(held, u, 0.0).reshape(num_c, -1).astype(jnp.float32)
    cross = cross + jnp.dot(x, x.T, precision=hp)
    sq_common = sq_common + jnp.dot(x * x, p.T, precision=hp)  # [i, j]: sum_common u_i^2
    common = common + jnp.dot(p, p.T, precision=hp)
    size += math.prod(u.shape[1:])
  d = jnp.maximum(sq_common + sq_common.T - 2.0 * cross, 0.0)
  pair = participating_C[:, None] & participating_C[None, :] & ~jnp.eye(num_c, dtype=bool)
  ok = pair & (common > 0)
  return jnp.where(ok, d * (size / jnp.where(ok, common, 1.0)), jnp.inf)


def krum_select(distances: jax.Array, participating_C: jax.Array, f: int, m: int) -> jax.Array:
  """bool [C]: the m participants of smallest Krum score (sum of the distances to their
  n - f - 2 nearest other participants, n the participants; at least 1 neighbour).
  Ties go to the lower slot."""
  n = jnp.sum(participating_C)
  k = jnp.maximum(n - f - 2, 1)
  ds = jnp.sort(distances, axis=1)
  rank = jnp.arange(distances.shape[0])[None, :]
  score = jnp.sum(jnp.where(rank < k, ds, 0.0), axis=1)
  order = jnp.lexsort((score, ~participating_C))  # participants first, then by score
  position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  return (position < m) & participating_C


# ----------------------------------------------------------------------------- robust aggregators


def _stacked_contribute(state, update, weight, present, client: ClientInfo, key) -> Contribution:
  del state, key
  participating = jnp.asarray(client.active, bool) & (weight > 0)
  return Contribution((), Stacked(update, () if present is None else present,
                                  jnp.asarray(weight, jnp.float32), participating))


def _stacked(statistic: Callable[[Stacked, PyTree], PyTree]) -> Aggregator:
  """A stacked aggregator from `statistic(stacked, fallback) -> mean`; round metric
  `robust_participants`: the clients that took part (padding and empty clients excluded)."""
  def finish(state, summed: Contribution, fallback, key):
    del key
    stacked: Stacked = summed.per_client
    like = jax.tree.map(lambda u: u[0], stacked.update)
    metrics = {"robust_participants": jnp.sum(stacked.participating).astype(jnp.float32)}
    return statistic(stacked, _fallback_leaves(fallback, like)), state, metrics

  return Aggregator(_stateless_init, _stacked_contribute, finish, stacked=True)


def coordinate_median() -> Aggregator:
  """The coordinate-wise median over each coordinate's holders (unweighted, Yin et al.)."""

  def statistic(stacked: Stacked, fallback):
    return jax.tree.map(median_leaf, stacked.update, holders(stacked), fallback)

  return _stacked(statistic)


def check_trim_fraction(beta: float) -> float:
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 0.5:
    raise ValueError(f"trim fraction beta must be a number in [0, 0.5) (trimmed from each "
                     f"end), got {beta!r}")
  return float(beta)


def trimmed_mean(beta: float) -> Aggregator:
  """Coordinate-wise trimmed mean: floor(beta h) of the h holders trimmed at each end,
  the rest averaged with their weights (beta = 0: the weighted mean).

  Raises:
    ValueError: beta outside [0, 0.5).

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                        aggregator=federated.trimmed_mean(0.25))
    >>> state = alg.init(params, jax.random.key(1))
    >>> state, metrics = federated.make_round(alg)(state, data, federated.make_cohort([0, 1, 2]),
    ...                                           jax.random.key(2))
    >>> int(state.round_idx)
    1
  """
  beta = check_trim_fraction(beta)

  def statistic(stacked: Stacked, fallback):
    return jax.tree.map(lambda u, h, old: trimmed_mean_leaf(u, h, stacked.weight, beta, old),
                        stacked.update, holders(stacked), fallback)

  return _stacked(statistic)


def check_krum(f: int, m: int) -> tuple[int, int]:
  if isinstance(f, bool) or not isinstance(f, int) or f < 0:
    raise ValueError(f"krum f (clients assumed Byzantine) must be an int >= 0, got {f!r}")
  if isinstance(m, bool) or not isinstance(m, int) or m < 1:
    raise ValueError(f"krum m (clients selected) must be an int >= 1, got {m!r}")
  return f, m


def krum(f: int, m: int = 1) -> Aggregator:
  """Krum (m = 1) / multi-Krum (m > 1) with mask-aware distances (module docstring).

  Blanchard et al. need n >= 2 f + 3 participants for the guarantee; the experiments
  check that against the clients per round. With fewer participants every client scores
  over at least one neighbour. m >= n selects every participant (the weighted mean).

  Raises:
    ValueError: f < 0 or m < 1.
  """
  f, m = check_krum(f, m)

  def statistic(stacked: Stacked, fallback):
    held = holders(stacked)
    d = krum_distances(stacked.update, held, stacked.participating)
    selected = krum_select(d, stacked.participating, f, m)
    held = jax.tree.map(lambda h: h & _expand(selected, h), held)
    return weighted_holder_mean(stacked.update, held, stacked.weight, fallback)

  return _stacked(statistic)


def clip_to_norm(update: PyTree, present: PyTree | None, max_norm: float) -> tuple[PyTree, jax.Array]:
  """(update scaled to L2 norm <= max_norm over the coordinates held, whether it was clipped)."""
  held = update if present is None else jax.tree.map(
      lambda x, p: jnp.where(p, x, jnp.zeros((), x.dtype)), update, present)
  norm = jnp.sqrt(tree_lib.squared_norm(held))
  factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return tree_lib.scale(held, factor), norm > max_norm


def norm_bound(max_norm: float, inner: Aggregator | None = None) -> Aggregator:
  """Clips each client's update to L2 norm `max_norm` (over the coordinates it holds),
  then aggregates with `inner` (default `mean()`). Metric `robust_clipped`: the fraction
  of participating clients that were clipped.

  Raises:
    ValueError: max_norm not a positive finite number.
  """
  if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (
      math.isfinite(max_norm) and max_norm > 0):
    raise ValueError(f"norm bound max_norm must be a finite number > 0, got {max_norm!r}")
  inner = mean() if inner is None else inner

  def contribute(state, update, weight, present, client, key) -> Contribution:
    clipped_update, clipped = clip_to_norm(update, present, max_norm)
    out = inner.contribute(state, clipped_update, weight, present, client, key)
    part = (jnp.asarray(client.active, bool) & (weight > 0)).astype(jnp.float32)
    return Contribution((out.sums, clipped.astype(jnp.float32) * part, part), out.per_client)

  def finish(state, summed: Contribution, fallback, key):
    inner_sums, clipped, part = summed.sums
    result, state, metrics = inner.finish(state, Contribution(inner_sums, summed.per_client),
                                          fallback, key)
    return result, state, {**metrics, "robust_clipped": clipped / jnp.maximum(part, 1.0)}

  return Aggregator(inner.init, contribute, finish, inner.stacked)


# ----------------------------------------------------------------------------- views


class SumsView(NamedTuple):
  """Where an algorithm keeps a client's update in its `ClientOutput.sums`.

  Attributes:
    read: `read(server_state, sums) -> (update, weight, present, rest)` for ONE client:
      its update (w_server - w_client), weight, present (None or bool pytree) and its
      sums without the update (`rest`, summed by the engine as before).
    write: `write(server_state, rest, mean) -> sums`: summed sums from which the
      algorithm's own server step computes `mean` as its aggregated update.
  """
  read: Callable[[Any, Any], tuple[PyTree, jax.Array, PyTree | None, Any]]
  write: Callable[[Any, Any, PyTree], Any]


def weighted_view(field: str = "params", *, votes_field: str | None = None,
                  delta: bool | Callable[[Any], bool] = False,
                  masks_field: str | None = None) -> SumsView:
  """The view of sums holding w_k * (client params) in `field` with the weight in `weight`
  (CAVP's, masked FedAvg's), or w_k * (server - client) when `delta` (FedAvg's
  `FedAvgSums.delta`; a callable decides from the server state).

  With `votes_field` (masked FedAvg's client masks, w_k * mask_k) a client holds the
  coordinates its votes cover; the server's per-entry mean divides by the votes there.
  Without votes, `masks_field` names the server state's masks: every client holds the
  coordinates of the server's mask (what it trained under; public, which DP's noise
  placement relies on). Neither: every coordinate is held.
  """

  def is_delta(state) -> bool:
    return delta(state) if callable(delta) else delta

  def read(state, sums):
    w = sums.weight
    inv = jnp.where(w > 0, 1.0 / jnp.where(w > 0, w, 1.0), 0.0)
    values = tree_lib.scale(getattr(sums, field), inv)
    update = values if is_delta(state) else jax.tree.map(
        lambda s, c: jnp.where(w > 0, s - c, jnp.zeros((), s.dtype)), state.params, values)
    votes = getattr(sums, votes_field) if votes_field else None
    if votes is not None:
      present = jax.tree.map(lambda v: v > 0, votes)
    else:
      present = getattr(state, masks_field) if masks_field else None
    return update, w, present, sums._replace(**{field: ()})

  def write(state, rest, mean_update):
    target = mean_update if is_delta(state) else tree_lib.sub(state.params, mean_update)
    votes = getattr(rest, votes_field) if votes_field else None
    if votes is None:
      total = tree_lib.scale(target, rest.weight)
    else:  # masked FedAvg divides per-entry-masked leaves by their votes, others by the weight
      total = jax.tree.map(lambda t, v: t * (rest.weight if jnp.ndim(v) == 0 else v).astype(t.dtype),
                           target, votes)
    return rest._replace(**{field: total})

  return SumsView(read, write)


def with_aggregator(alg: FedAlgorithm, aggregator: Aggregator, view: SumsView) -> FedAlgorithm:
  """`alg` with its update aggregated by `aggregator`.

  For algorithms whose factory takes no aggregator (masked FedAvg's rules, the submodel
  methods, CAVP): each client's update is read out of its sums (`view.read`) and handed
  to `aggregator.contribute`; the server hands `aggregator.finish`'s result back through
  `view.write` to the algorithm's own server step (where nobody contributed: no change).
  `mean()` reproduces the algorithm's own mean up to float rounding.

  A stateful aggregator (`init(params)` has leaves: adaptive DP clipping, error-feedback
  memory) keeps its state in the server state's `aggregator` field, which the wrapped
  `init` fills; an algorithm whose state has no such field takes stateless aggregators
  only (ValueError), and so does a state built by the unwrapped algorithm's `init`.

  Round metrics: the algorithm's and the aggregator's.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> from fedjax_prune.pruning import base
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> alg = base.masked_fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                          base.no_prune())
    >>> robust = federated.with_aggregator(alg, federated.coordinate_median(),
    ...                                    base.aggregation_view())
    >>> state = robust.init(params, jax.random.key(1))
    >>> state, metrics = federated.make_round(robust)(state, data, federated.make_cohort([0, 1, 2]),
    ...                                              jax.random.key(2))
    >>> int(state.round_idx)
    1
  """

  def stateful(params) -> bool:
    return bool(jax.tree.leaves(jax.eval_shape(aggregator.init, params)))

  def init(params, key, *args, **kwargs):
    state = alg.init(params, key, *args, **kwargs)
    if stateful(state.params):
      if "aggregator" not in getattr(type(state), "_fields", ()):
        raise ValueError(
            f"with_aggregator takes stateless aggregators (init(params) -> ()) for an algorithm "
            f"whose server state ({type(state).__name__}) has no `aggregator` field; give a "
            "stateful one to an algorithm with an aggregator slot (federated.fedavg(..., "
            "aggregator=...), pruning.base.masked_fedavg(..., aggregator=...))")
      state = state._replace(aggregator=aggregator.init(state.params))
    return state

  def agg_state(state):
    """The aggregator's state held by `state` (checked against `aggregator.init`)."""
    if not stateful(state.params):
      return aggregator.init(state.params)  # no leaves: only its structure
    held = getattr(state, "aggregator", ())
    want = jax.eval_shape(aggregator.init, state.params)
    if jax.tree.structure(held) != jax.tree.structure(want):
      raise ValueError("the server state holds no state of this (stateful) aggregator: build it "
                       "with the wrapped algorithm's init (with_aggregator(...).init)")
    return held

  def client_update(state, data, info: ClientInfo, key: PRNGKey) -> ClientOutput:
    out = alg.client_update(state, data, info, key)
    update, weight, present, rest = view.read(state, out.sums)
    contribution = aggregator.contribute(agg_state(state), update, weight, present, info,
                                         _keys.fold_in(key, AGGREGATOR_STREAM))
    return ClientOutput((rest, contribution.sums), (out.per_client, contribution.per_client))

  def server_update(state, outputs: ClientOutput, key: PRNGKey):
    (rest, agg_sums), (inner_per_client, agg_per_client) = outputs.sums, outputs.per_client
    old = agg_state(state)
    result, new, agg_metrics = aggregator.finish(old, Contribution(agg_sums, agg_per_client),
                                                 tree_lib.zeros_like(state.params),
                                                 _keys.fold_in(key, AGGREGATOR_STREAM))
    sums = view.write(state, rest, result)
    new_state, metrics = alg.server_update(state, ClientOutput(sums, inner_per_client), key)
    if jax.tree.leaves(old):
      new_state = new_state._replace(aggregator=new)
    return new_state, {**metrics, **agg_metrics}

  return FedAlgorithm(init, client_update, server_update)

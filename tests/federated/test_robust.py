"""Robust aggregation (issue 28): each aggregator against a numpy reference on random stacks
with masks and padding clients; robust rounds that must equal FedAvg; resistance to an
attacker; every execution strategy and the sharded round agree; config validation."""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import build
from experiments.configs import robust_tiny
from fedjax_prune import federated, testing
from fedjax_prune import tree as tree_lib
from fedjax_prune.federated import _robust
from fedjax_prune.pruning import _hetero, base, fiarse

SCHEDULE = federated.LocalSchedule(batch_size=4, num_epochs=1)
SHAPES = {"a": (3, 4), "b": (5,)}


def aggregate(agg, updates, weights, present, active, fallback=None, key=None):
  """What the engine and a server step do with an aggregator: contribute per client
  (vmapped), sum the sums over the real clients, stack per_client, finish."""
  num = len(weights)
  key = jax.random.key(3) if key is None else key
  info = federated.ClientInfo(jnp.arange(num, dtype=jnp.int32), jnp.ones(num, jnp.int32),
                              jnp.asarray(active), jnp.ones(num, jnp.float32))
  keys = jax.random.split(key, num)
  if present is None:
    out = jax.vmap(lambda u, w, i, k: agg.contribute((), u, w, None, i, k))(
        updates, jnp.asarray(weights, jnp.float32), info, keys)
  else:
    out = jax.vmap(lambda u, w, p, i, k: agg.contribute((), u, w, p, i, k))(
        updates, jnp.asarray(weights, jnp.float32), present, info, keys)
  act = jnp.asarray(active)
  sums = jax.tree.map(lambda x: jnp.sum(jnp.where(act.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0),
                                        axis=0), out.sums)
  result, _, metrics = agg.finish((), federated.Contribution(sums, out.per_client), fallback, key)
  return result, metrics


def random_stack(seed, num=6, masked=True):
  rng = np.random.default_rng(seed)
  updates = {k: rng.normal(size=(num,) + s).astype(np.float32) for k, s in SHAPES.items()}
  weights = rng.integers(1, 9, size=num).astype(np.float32)
  weights[-1] = 0.0  # a real client without examples takes no part
  active = np.ones(num, bool)
  active[-2] = False  # a padding client (its update is garbage: must never count)
  updates["a"][-2] = 1e6
  present = None
  if masked:
    # 'a' per-entry masks (some coordinates held by nobody or by one client), 'b' a `()` mask.
    pa = rng.random((num,) + SHAPES["a"]) < 0.6
    pa[:, 0, 0] = False
    pa[:, 0, 1] = False
    pa[1, 0, 1] = True
    pb = rng.random(num) < 0.7
    pb[0] = True
    present = {"a": pa, "b": pb}
  return updates, weights, present, active


def holders_np(updates, present, weights, active):
  """{leaf: bool [C, ...]}: the client holds the coordinate and takes part."""
  part = active & (weights > 0)
  out = {}
  for k, u in updates.items():
    p = np.ones(u.shape, bool) if present is None else np.broadcast_to(
        present[k].reshape(present[k].shape[:1] + (1,) * (u.ndim - present[k].ndim)
                           + present[k].shape[1:]), u.shape)
    out[k] = p & part.reshape((-1,) + (1,) * (u.ndim - 1))
  return out


def coordinatewise(fn, updates, held, weights, fallback):
  out = {}
  for k, u in updates.items():
    res = np.array(fallback[k], np.float64)
    for idx in np.ndindex(u.shape[1:]):
      sel = held[k][(slice(None),) + idx]
      if sel.any():
        value = fn(u[(slice(None),) + idx][sel].astype(np.float64), weights[sel])
        if value is not None:
          res[idx] = value
    out[k] = res
  return out


def median_np(v, w):
  return np.median(v)


def trimmed_np(beta):
  def fn(v, w):
    order = np.argsort(v, kind="stable")
    k = math.floor(beta * len(v) + 1e-4)
    keep = order[k:len(v) - k]
    return None if w[keep].sum() == 0 else np.sum(w[keep] * v[keep]) / np.sum(w[keep])
  return fn


def krum_np(updates, held, weights, active, f, m):
  part = active & (weights > 0)
  num = len(weights)
  size = sum(np.prod(u.shape[1:]) for u in updates.values())
  d = np.full((num, num), np.inf)
  for i in range(num):
    for j in range(num):
      if i == j or not (part[i] and part[j]):
        continue
      sq, common = 0.0, 0
      for k, u in updates.items():
        both = held[k][i] & held[k][j]
        sq += np.sum((u[i][both].astype(np.float64) - u[j][both]) ** 2)
        common += both.sum()
      if common:
        d[i, j] = sq * size / common
  n = part.sum()
  nb = max(n - f - 2, 1)
  scores = np.array([np.sort(d[i])[:nb].sum() if part[i] else np.inf for i in range(num)])
  order = sorted(range(num), key=lambda i: (not part[i], scores[i], i))
  selected = np.zeros(num, bool)
  selected[[i for i in order[:m] if part[i]]] = True
  sel_held = {k: h & selected.reshape((-1,) + (1,) * (h.ndim - 1)) for k, h in held.items()}
  mean = coordinatewise(lambda v, w: np.sum(w * v) / np.sum(w) if w.sum() > 0 else None,
                        updates, sel_held, weights, {k: np.zeros(u.shape[1:]) for k, u in updates.items()})
  return mean, selected


def _assert_close(got, want, rtol=1e-5, atol=1e-5):
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("masked", [True, False])
def test_median_matches_numpy(masked):
  updates, weights, present, active = random_stack(0, masked=masked)
  fallback = {k: np.full(s, 7.0, np.float32) for k, s in SHAPES.items()}
  got, _ = aggregate(federated.coordinate_median(), updates, weights, present, active, fallback)
  held = holders_np(updates, present, weights, active)
  _assert_close(got, coordinatewise(median_np, updates, held, weights, fallback))
  if masked:  # a coordinate nobody holds keeps the fallback, one held by one client its value
    assert float(got["a"][0, 0]) == 7.0
    assert float(got["a"][0, 1]) == pytest.approx(updates["a"][1, 0, 1])


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.34])
@pytest.mark.parametrize("masked", [True, False])
def test_trimmed_mean_matches_numpy(beta, masked):
  updates, weights, present, active = random_stack(1, num=8, masked=masked)
  zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
  got, _ = aggregate(federated.trimmed_mean(beta), updates, weights, present, active)
  held = holders_np(updates, present, weights, active)
  _assert_close(got, coordinatewise(trimmed_np(beta), updates, held, weights, zeros))


@pytest.mark.parametrize("f,m", [(1, 1), (1, 3), (0, 2)])
@pytest.mark.parametrize("masked", [True, False])
def test_krum_matches_numpy(f, m, masked):
  updates, weights, present, active = random_stack(2, num=7, masked=masked)
  updates["b"][0] += 5.0  # one outlier: never among Krum's choices
  got, _ = aggregate(federated.krum(f, m), updates, weights, present, active)
  held = holders_np(updates, present, weights, active)
  want, selected = krum_np(updates, held, weights, active, f, m)
  if not masked:  # (with masks few clients may share client 0's 'b')
    assert not selected[0]
  _assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_krum_masked_distance_is_per_common_coordinate():
  """A client holding one coordinate is not everyone's nearest neighbour (an unnormalised
  sum over common coordinates would make it so): Krum picks the honest cluster."""
  rng = np.random.default_rng(0)
  honest = 1.0 + 0.01 * rng.normal(size=(5, 8)).astype(np.float32)
  bad = np.full((1, 8), 50.0, np.float32)
  updates = {"w": np.concatenate([bad, honest])}
  present = {"w": np.concatenate([np.eye(1, 8, dtype=bool), np.ones((5, 8), bool)])}
  got, _ = aggregate(federated.krum(1, 1), updates, np.ones(6, np.float32), present,
                     np.ones(6, bool))
  assert np.all(np.abs(np.asarray(got["w"]) - 1.0) < 0.1)


@pytest.mark.parametrize("masked", [True, False])
def test_norm_bound_matches_numpy(masked):
  updates, weights, present, active = random_stack(3, masked=masked)
  num = len(weights)
  part = active & (weights > 0)
  own = holders_np(updates, present, np.ones(num), np.ones(num, bool))  # what each client holds
  clipped = {}
  norms = np.sqrt(sum(np.sum(np.where(own[k], u, 0.0).astype(np.float64).reshape(num, -1) ** 2,
                             axis=1) for k, u in updates.items()))
  max_norm = float(np.median(norms[part]))  # some clients clipped, some not
  got, metrics = aggregate(federated.norm_bound(max_norm), updates, weights, present, active)
  factors = np.minimum(1.0, max_norm / norms)
  for k, u in updates.items():
    clipped[k] = np.where(own[k], u, 0.0) * factors.reshape((-1,) + (1,) * (u.ndim - 1))
  num_clipped = np.sum(part & (norms > max_norm))
  if masked:  # per coordinate over its holders
    zeros = {k: np.zeros(s) for k, s in SHAPES.items()}
    held = holders_np(updates, present, weights, active)
    want = coordinatewise(lambda v, w: np.sum(w * v) / np.sum(w), clipped, held, weights, zeros)
  else:  # the mean's denominator is the cohort's weight
    w = weights * part
    want = {k: np.tensordot(w, clipped[k], 1) / np.sum(w) for k in updates}
  _assert_close(got, want)
  assert 0 < num_clipped < part.sum()
  assert float(metrics["robust_clipped"]) == pytest.approx(num_clipped / part.sum())


def test_mean_is_the_weighted_and_counted_mean():
  updates, weights, present, active = random_stack(4)
  held = holders_np(updates, present, weights, active)
  zeros = {k: np.zeros(s) for k, s in SHAPES.items()}
  got, _ = aggregate(federated.mean(), updates, weights, present, active)
  _assert_close(got, coordinatewise(lambda v, w: np.sum(w * v) / np.sum(w), updates, held, weights, zeros))


def test_robust_statistics_resist_an_attacker_that_pulls_the_mean_away():
  rng = np.random.default_rng(5)
  honest = 1.0 + 0.1 * rng.normal(size=(5, 6)).astype(np.float32)
  attacker = -100.0 * np.ones((1, 6), np.float32)  # sign-flipped and scaled by 100
  updates = {"w": np.concatenate([honest, attacker])}
  weights, active = np.ones(6, np.float32), np.ones(6, bool)
  mean, _ = aggregate(federated.mean(), updates, weights, None, active)
  assert np.all(np.asarray(mean["w"]) < -10)  # the mean is pulled far away
  for agg in (federated.coordinate_median(), federated.trimmed_mean(0.2), federated.krum(1, 2),
              federated.norm_bound(3.0, federated.coordinate_median())):
    got, _ = aggregate(agg, updates, weights, None, active)
    assert np.all(np.abs(np.asarray(got["w"]) - 1.0) < 0.35), agg


# ----------------------------------------------------------------------------- rounds


def _rounds(alg, params, data, ids, *, execution=None, mesh=None, rounds=2, capacity=None):
  state = alg.init(params, jax.random.key(1))
  round_fn = federated.make_round(alg, execution=execution, mesh=mesh)
  cohort = federated.make_cohort(ids, capacity=capacity)
  for r in range(rounds):
    state, metrics = round_fn(state, data, cohort, federated.round_key(jax.random.key(7), r))
  return state, metrics


def test_fedavg_robust_round_equals_fedavg_with_nothing_trimmed():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  plain, _ = _rounds(federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE), params, data, [0, 1, 2])
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=federated.trimmed_mean(0.0))
  state, metrics = _rounds(alg, params, data, [0, 1, 2])
  testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)
  assert float(metrics["robust_participants"]) == 3.0
  # The view-based wrapper (how the experiments run every method) gives the same rounds.
  wrapped = federated.with_aggregator(federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE),
                                      federated.trimmed_mean(0.0), federated.fedavg_view())
  state, _ = _rounds(wrapped, params, data, [0, 1, 2])
  testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_more_fedavg_robust_rounds_equal_fedavg_where_they_should():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  plain, _ = _rounds(federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE), params, data, [0, 1, 2])
  for agg in (federated.mean(), federated.krum(0, 3), federated.norm_bound(1e6)):
    alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=agg)
    state, _ = _rounds(alg, params, data, [0, 1, 2])
    testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)
  # ... and a median round differs (3 clients of unequal weight).
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=federated.coordinate_median())
  state, _ = _rounds(alg, params, data, [0, 1, 2])
  assert not np.allclose(state.params["dense_0"]["kernel"], plain.params["dense_0"]["kernel"])


def test_masked_and_submodel_robust_rounds_equal_their_means():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  masked = base.masked_fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, base.no_prune())
  plain, _ = _rounds(masked, params, data, [0, 1, 2], rounds=1)
  robust = federated.with_aggregator(masked, federated.trimmed_mean(0.0), base.aggregation_view())
  state, _ = _rounds(robust, params, data, [0, 1, 2], rounds=1)
  testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)

  hetero = fiarse.fiarse(apply_fn, optax.sgd(0.1), SCHEDULE, capacities=(1.0, 0.25)).algorithm
  caps = [1.0, 0.25, 0.25]
  plain, plain_metrics = _rounds(hetero, params, data, [0, 1, 2], capacity=caps, rounds=1)
  robust = federated.with_aggregator(hetero, federated.krum(0, 3), _hetero.counted_view())
  state, metrics = _rounds(robust, params, data, [0, 1, 2], capacity=caps, rounds=1)
  testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)
  assert float(metrics["coverage"]) == float(plain_metrics["coverage"])


def test_the_sharded_round_equals_the_unsharded_one():
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=federated.coordinate_median())
  ref, _ = _rounds(alg, params, data, [2, 0, 1], execution=federated.Vmap(), rounds=1)
  mesh = federated.client_mesh(jax.devices()[:4])  # 3 clients padded to 4, one per device
  state, metrics = _rounds(alg, params, data, [2, 0, 1], execution=federated.Sequential(),
                           mesh=mesh, rounds=1)
  testing.assert_trees_close(jax.device_get(state.params), ref.params, rtol=1e-5, atol=1e-6)
  assert float(metrics["robust_participants"]) == 3.0  # the padding client never counts


@pytest.mark.slow
@pytest.mark.parametrize("agg", [federated.coordinate_median(), federated.krum(0, 2),
                                 federated.trimmed_mean(0.25)], ids=["median", "krum", "trimmed"])
def test_every_strategy_and_the_sharded_round_agree(agg):
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=agg)
  ref, _ = _rounds(alg, params, data, [2, 0, 1], execution=federated.Vmap())
  for execution in (federated.Sequential(), federated.Chunked(2)):
    state, _ = _rounds(alg, params, data, [2, 0, 1], execution=execution)
    testing.assert_trees_close(state.params, ref.params, rtol=1e-5, atol=1e-6)
  mesh = federated.client_mesh(jax.devices()[:4])
  state, _ = _rounds(alg, params, data, [2, 0, 1], execution=federated.Sequential(), mesh=mesh)
  testing.assert_trees_close(jax.device_get(state.params), ref.params, rtol=1e-5, atol=1e-6)
  # The submodel path's wrapper, sharded.
  hetero = fiarse.fiarse(apply_fn, optax.sgd(0.1), SCHEDULE, capacities=(1.0, 0.25)).algorithm
  robust = federated.with_aggregator(hetero, agg, _hetero.counted_view())
  caps = [1.0, 0.25, 0.25]
  ref, _ = _rounds(robust, params, data, [2, 0, 1], execution=federated.Vmap(), capacity=caps)
  state, _ = _rounds(robust, params, data, [2, 0, 1], execution=federated.Sequential(), mesh=mesh,
                     capacity=caps)
  testing.assert_trees_close(jax.device_get(state.params), ref.params, rtol=1e-5, atol=1e-6)


def test_library_arguments_are_checked():
  with pytest.raises(ValueError, match="trim fraction"):
    federated.trimmed_mean(0.5)
  with pytest.raises(ValueError, match="krum f"):
    federated.krum(-1)
  with pytest.raises(ValueError, match="krum m"):
    federated.krum(1, 0)
  with pytest.raises(ValueError, match="max_norm"):
    federated.norm_bound(0.0)
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  stateful = federated.mean()._replace(init=lambda p: jnp.zeros(()))
  fed = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  alg = federated.with_aggregator(fed, stateful, federated.fedavg_view())
  # A state the unwrapped algorithm built holds no state of the aggregator ...
  with pytest.raises(ValueError, match="wrapped algorithm's init"):
    federated.make_round(alg)(fed.init(params, jax.random.key(1)), data,
                              federated.make_cohort([0, 1]), jax.random.key(2))
  # ... and a server state without an `aggregator` slot takes stateless aggregators only
  # (every library state has one now: a server state of FedAvg's params alone).
  no_slot = fed._replace(init=lambda params, key: collections.namedtuple("NoSlot", "params")(params))
  with pytest.raises(ValueError, match="stateless"):
    federated.with_aggregator(no_slot, stateful, federated.fedavg_view()).init(params,
                                                                              jax.random.key(1))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("field,value,match", [
    ("robust.aggregator", "mode", "robust.aggregator"),
    ("robust.trim_fraction", 0.5, "robust.trim_fraction"),
    ("robust.trim_fraction", -0.1, "robust.trim_fraction"),
    ("robust.max_norm", 0.0, "robust.max_norm"),
    ("robust.krum_f", 2, "robust.krum_f"),  # 5 clients per round need n >= 2 f + 3
    ("robust.krum_m", 9, "robust.krum_m"),
])
def test_bad_robust_configs_name_the_field(field, value, match):
  aggregator = {"krum_f": "krum", "krum_m": "krum", "max_norm": "norm_bound"}.get(
      field.split(".")[1], "trimmed_mean")
  config = robust_tiny.get_config(f"fedavg,{aggregator}")
  parent, leaf = field.split(".")
  config[parent][leaf] = value
  with pytest.raises(build.ConfigError, match=match):
    build.validate(config)


def test_merge_network_sorts_every_binary_sequence():
  """The 0-1 principle: a comparator network sorts every input iff it sorts every 0/1
  sequence; checked exhaustively for 1..12 inputs (not only powers of two)."""
  import itertools
  for n in range(1, 13):
    pairs = _robust.merge_network(n)
    assert all(0 <= i < j < n for i, j in pairs)
    for bits in itertools.product((0, 1), repeat=n):
      v = list(bits)
      for i, j in pairs:
        if v[i] > v[j]:
          v[i], v[j] = v[j], v[i]
      assert v == sorted(bits), (n, bits)


@pytest.mark.parametrize("clients", [1, 2, 7, 10, 33])
def test_client_axis_sum_and_pick_equal_numpy_exactly(clients):
  """`tree.sum_leading` (a chain of row adds for C <= 32, jnp.sum above) is
  bit-identical to numpy's row-by-row sum over axis 0 (not merely close: values spread over
  12 decades so a different order would round differently), and `pick_clients` to
  take_along_axis."""
  rng = np.random.default_rng(clients)
  x = (rng.standard_normal((clients, 6, 9)) * 10.0 ** rng.integers(-6, 6, (clients, 6, 9))
       ).astype(np.float32)
  got = np.asarray(tree_lib.sum_leading(jnp.asarray(x)))
  if clients <= tree_lib.MAX_CHAINED_ROWS:
    want = x[0].copy()
    for row in x[1:]:
      want = want + row
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.sum(x, axis=0))
  else:
    np.testing.assert_allclose(got, np.sum(x.astype(np.float64), axis=0), rtol=1e-5, atol=1e-3)
  held = rng.random((clients, 6, 9)) < 0.5
  np.testing.assert_array_equal(np.asarray(tree_lib.sum_leading(jnp.asarray(held, jnp.int32))),
                                held.sum(0))
  index = rng.integers(0, clients, (6, 9))
  np.testing.assert_array_equal(np.asarray(_robust.pick_clients(jnp.asarray(x), jnp.asarray(index))),
                                np.take_along_axis(x, index[None], axis=0)[0])


@pytest.mark.parametrize("clients", [1, 2, 3, 7, 10, 16, 33])
def test_client_axis_sort_and_ranks_equal_xla_sort_and_stable_argsort(clients):
  """The network (C <= 32) and the fallback (33) give jnp.sort's values, and the counted
  ranks the inverse of the stable argsort, exactly, with ties, infinities and NaN (sorted
  as +inf)."""
  rng = np.random.default_rng(clients)
  x = rng.integers(-3, 4, size=(clients, 5, 7)).astype(np.float32)  # many ties
  x[rng.random(x.shape) < 0.1] = np.inf
  x[rng.random(x.shape) < 0.05] = -np.inf
  x[rng.random(x.shape) < 0.05] = np.nan
  want_x = np.where(np.isnan(x), np.inf, x)
  got = _robust.sort_clients(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got), np.sort(want_x, axis=0))
  order = np.argsort(want_x, axis=0, kind="stable")
  ranks = np.asarray(_robust.stable_ranks(jnp.asarray(x)))
  np.testing.assert_array_equal(np.take_along_axis(ranks, order, axis=0),
                                np.broadcast_to(np.arange(clients)[:, None, None], x.shape))

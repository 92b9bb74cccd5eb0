"""Stateful aggregation in the submodel (HeteroFL, FedRolex, ScaleFL, FIARSE) and gated
(CAVP) families (issue 28): error-feedback memory and the adaptive DP clip norm carried by
`HeteroState.aggregator` / `CavpState.aggregator`, against direct computations;
equivalence with the plain rounds; CAVP's rebuild slicing each client's residual like the
weights; DP's expected-count denominator for the width methods (`privacy.denominator`);
FIARSE under DP releasing every coordinate (its submodels depend on client data);
config validation and resumed runs."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import build, train
from experiments.configs import compress_tiny, dp_tiny
from fedjax_prune import accounting, checkpoint, federated, models, testing
from fedjax_prune import data as data_lib
from fedjax_prune.pruning import _hetero, cavp, fedrolex, heterofl
from tests import _checks
from tests._checks import topk_half

SCHEDULE = federated.LocalSchedule(batch_size=4, num_epochs=1)
IDS = [0, 1, 2]
ROOT = jax.random.key(7)
SLOW = pytest.mark.slow  # compiles rounds (seconds each): the default suite keeps one case per test
MLP_KEYS = dict(input_keys=r"^dense_0$", output_keys=r"^dense_1$")  # tiny_mlp: hidden width sliced


def _width(name, apply_fn, aggregator=None, level_clients=None, capacities=(1.0, 0.25)):
  """HeteroFL or FedRolex on `testing.tiny_mlp` (width 1/2 keeps 4 of its 8 hidden units)."""
  factory = heterofl.heterofl if name == "heterofl" else fedrolex.fedrolex
  return factory(apply_fn, optax.sgd(0.1), SCHEDULE, capacities=capacities,
                 aggregator=aggregator, level_clients=level_clients, **MLP_KEYS).algorithm


def _rounds(alg, params, data, rounds, capacity=(1.0, 0.25, 0.25)):
  """[state before round 0, after round 0, ...] and the rounds' metrics."""
  state = alg.init(params, jax.random.key(1))
  round_fn = federated.make_round(alg)
  cohort = federated.make_cohort(IDS, capacity=capacity)
  states, metrics = [state], []
  for r in range(rounds):
    state, out = round_fn(state, data, cohort, federated.round_key(ROOT, r))
    states.append(state)
    metrics.append(out)
  return states, metrics


def _client_updates(plain, data, capacity=(1.0, 0.25, 0.25)):
  """`fn(state, round_idx, capacity=capacity)`: each cohort client's (update, held) as the
  aggregator sees them in round `round_idx` from `state`: `plain`'s client step (the
  engine's client keys) read through `_hetero.counted_view`; leaves stacked [3, ...] (held:
  full-shape bools). One compile serves every cohort capacity."""
  view = _hetero.counted_view()

  def probe(state, d, info, key):
    update, _, present, _ = view.read(state, plain.client_update(state, d, info, key).sums)
    return federated.ClientOutput((), (update, present))

  run = jax.jit(lambda s, cohort, root: federated.run_clients(probe, s, data, cohort,
                                                              root).per_client)
  default = capacity

  def fn(state, round_idx, capacity=default):
    client_root, _ = federated.split_round_key(federated.round_key(ROOT, round_idx))
    cohort = federated.make_cohort(IDS, capacity=capacity)
    return jax.tree.map(np.asarray, run(state, cohort, client_root))

  return fn


def _norms(update, held):
  return np.sqrt(sum(np.sum(np.where(h, u, 0.0).reshape(3, -1) ** 2, axis=1)
                     for u, h in zip(jax.tree.leaves(update), jax.tree.leaves(held))))


# ----------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", ["heterofl", pytest.param("fedrolex", marks=SLOW)])
def test_error_feedback_memory_is_the_unsent_part_on_held_coordinates(name):
  """e' = u + e - C(u + e) where the client's submodel holds, e' = e elsewhere (0 where it
  never held), over two rounds (FedRolex: the window rolls, so round 1 holds new units)."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  agg = federated.compressed(federated.mean(), federated.Compression(topk_fraction=0.5),
                             num_clients=3)
  states, _ = _rounds(_width(name, apply_fn, agg), params, data, 2)
  client_updates = _client_updates(_width(name, apply_fn), data)
  ever_held = jax.tree.map(lambda p: np.zeros((3,) + p.shape, bool), params)
  for r in range(2):
    before, after = states[r], states[r + 1]
    update, held = client_updates(before, r)
    ever_held = jax.tree.map(np.logical_or, ever_held, held)
    e = jax.tree.map(np.asarray, before.aggregator.residual)
    got = jax.tree.map(np.asarray, after.aggregator.residual)
    for u, h, old, new, ever in zip(*map(jax.tree.leaves, (update, held, e, got, ever_held))):
      for i in range(3):
        c = u[i] + old[i]
        np.testing.assert_allclose(new[i][h[i]], (c - topk_half(c, h[i]))[h[i]], atol=1e-6)
        assert np.array_equal(new[i][~h[i]], old[i][~h[i]])  # kept as it was
        assert np.all(new[i][~ever[i]] == 0.0)  # never held: nothing to remember
    small = update["dense_0"]["kernel"][1]
    assert not held["dense_0"]["kernel"][1].all() and np.all(small[~held["dense_0"]["kernel"][1]] == 0)
    assert any(np.any(x != 0) for x in jax.tree.leaves(got))  # top half: something unsent


# ----------------------------------------------------------------------------- adaptive clipping


def test_adaptive_clip_norm_moves_by_the_quantile_rule_through_a_heterofl_round():
  """No noise (z = 0, sigma_b = 0): C' = C exp(-eta (b - gamma)), b the unclipped fraction
  of the clients' norms over their submodels; w' = w - sum_k clip(u_k) / m (client 0 holds
  every coordinate, so the partial averaging applies the mean everywhere)."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  plain = _width("heterofl", apply_fn)
  client_updates = _client_updates(plain, data)
  update, held = client_updates(plain.init(params, jax.random.key(1)), 0)
  norms = _norms(update, held)
  lo, mid, _ = np.sort(norms)
  clip0 = float(0.5 * (lo + mid))  # one client unclipped, two clipped: b = 1/3
  eta, gamma = 0.3, 0.5
  agg = federated.dp_mean(0.0, clip0, expected_clients=3, target_quantile=gamma,
                          clip_learning_rate=eta, count_stddev=0.0)
  states, metrics = _rounds(_width("heterofl", apply_fn, agg), params, data, 2)
  assert float(metrics[0]["dp_clip_norm"]) == np.float32(clip0)
  assert float(metrics[0]["dp_clipped_fraction"]) == pytest.approx(2 / 3)
  assert float(states[1].aggregator.clip_norm) == pytest.approx(
      clip0 * np.exp(-eta * (1 / 3 - gamma)), rel=1e-6)
  factor = np.minimum(1.0, clip0 / norms)
  for w, u, h, new in zip(jax.tree.leaves(params), jax.tree.leaves(update),
                          jax.tree.leaves(held), jax.tree.leaves(states[1].params)):
    want = np.asarray(w) - np.tensordot(factor, np.where(h, u, 0.0), axes=1) / 3
    np.testing.assert_allclose(np.asarray(new), want, atol=1e-6)
  # Round 1 clips with the carried C' and moves it again by the same rule.
  update, held = client_updates(states[1], 1)
  b = np.mean(_norms(update, held) <= float(states[1].aggregator.clip_norm))
  assert float(metrics[1]["dp_clip_norm"]) == float(states[1].aggregator.clip_norm)
  assert float(states[2].aggregator.clip_norm) == pytest.approx(
      float(states[1].aggregator.clip_norm) * np.exp(-eta * (b - gamma)), rel=1e-6)


# ----------------------------------------------------------------------------- FIARSE under DP


FIARSE_LEVELS = (1.0, 0.5, 0.25)
SMALL = (0.25, 0.25, 0.25)   # two cohorts whose clients touch different coordinates,
LARGER = (0.5, 0.25, 0.25)   # neither all of them


def _fiarse(apply_fn, params, noise_multiplier=None, clip_norm=1.0):
  """FIARSE on `testing.tiny_mlp` as the experiment driver builds it (`hetero._method`;
  levels `FIARSE_LEVELS`), with config.privacy (fixed clipping, m = 3; through
  `build.full_aggregator`) unless `noise_multiplier` is None."""
  from experiments.methods import hetero as driver
  config = _contract().hetero_config("fiarse")
  config.hetero.capacities = FIARSE_LEVELS
  config.clients_per_round = 3
  agg = None
  if noise_multiplier is not None:
    dp_tiny.add_privacy(config, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                        adaptive=False)
    agg = build.full_aggregator(config, None)
  return driver._method(config, apply_fn, params, SCHEDULE, None, aggregator=agg).algorithm


def _touched(held):
  """[coordinates] bool: touched by some cohort client (leaves flattened in tree order)."""
  return _stack_leaves(held).any(0)


def _stack_leaves(held):
  """[3, coordinates] the clients' held sets, leaves flattened in tree order."""
  return np.concatenate([h.reshape(3, -1) for h in jax.tree.leaves(held)], axis=1)


def test_fiarse_under_dp_moves_every_coordinate_by_the_noised_fixed_denominator_mean():
  """FIARSE's submodels are the coordinates each client's update touched, which depend on its
  data: under DP the released set is the whole (public) server model. Every coordinate
  moves by (sum_k clip(u_k) + noise) / m, an untouched one by exactly noise / m (drawn as
  the round draws it), so two cohorts with different touch patterns change the same set:
  every coordinate."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  z, clip = 0.5, 0.1
  private = _fiarse(apply_fn, params, z, clip)
  client_updates = _client_updates(_fiarse(apply_fn, params), data)
  round_fn = federated.make_round(private)
  state = private.init(params, jax.random.key(1))
  _, server_key = federated.split_round_key(federated.round_key(ROOT, 0))
  aggregator_key = jax.random.fold_in(server_key, federated._robust.AGGREGATOR_STREAM)
  noise = federated.add_gaussian_noise(jax.tree.map(jnp.zeros_like, params),
                                       jax.random.split(aggregator_key)[0], z * clip)
  touched = []
  for capacity in (SMALL, LARGER):
    new, metrics = round_fn(state, data, federated.make_cohort(IDS, capacity=capacity),
                            federated.round_key(ROOT, 0))
    update, held = client_updates(state, 0, capacity)
    factor = np.minimum(1.0, clip / _norms(update, held))
    assert np.any(factor < 1.0)  # clipping acts
    for w, u, h, n, got in zip(*map(jax.tree.leaves, (params, update, held, noise, new.params))):
      w, n, got = np.asarray(w), np.asarray(n), np.asarray(got)
      off = ~h.any(0)
      want = w - (np.tensordot(factor, np.where(h, u, 0.0), axes=1) + n) / 3
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got[off], (w - n / 3)[off], rtol=1e-5, atol=1e-6)
      assert np.all(got != w)  # the changed set: every coordinate
    assert float(metrics["coverage"]) == pytest.approx(1.0)  # x / n as x * (1 / n) in float32
    touched.append(_touched(held))
  # The two cohorts' touch patterns differ and leave coordinates untouched.
  assert not touched[0].all() and not touched[1].all()
  assert not np.array_equal(touched[0], touched[1])


def test_fiarse_under_dp_without_noise_is_the_clipped_fixed_denominator_mean_where_touched():
  """z = 0: w' = w - sum_k clip(u_k) / m on the touched coordinates (m = 3 wherever few
  clients touched), untouched coordinates unchanged bit for bit."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  plain = _fiarse(apply_fn, params)
  update, held = _client_updates(plain, data)(plain.init(params, jax.random.key(1)), 0, LARGER)
  norms = _norms(update, held)
  lo, mid, _ = np.sort(norms)
  clip = float(0.5 * (lo + mid))  # one client unclipped, two clipped
  private = _fiarse(apply_fn, params, 0.0, clip)
  new, _ = federated.make_round(private)(private.init(params, jax.random.key(1)), data,
                                         federated.make_cohort(IDS, capacity=LARGER),
                                         federated.round_key(ROOT, 0))
  factor = np.minimum(1.0, clip / norms)
  assert np.sum(factor < 1.0) == 2
  for w, u, h, got in zip(*map(jax.tree.leaves, (params, update, held, new.params))):
    w, got, on = np.asarray(w), np.asarray(got), h.any(0)
    want = w - np.tensordot(factor, np.where(h, u, 0.0), axes=1) / 3
    np.testing.assert_allclose(got[on], want[on], rtol=1e-5, atol=1e-6)
    assert np.array_equal(got[~on], w[~on])
  # Coordinates no client touched, and some only one touched (still divided by m = 3).
  assert not _touched(held).all() and np.any(np.sum(_stack_leaves(held), 0) == 1)


def test_only_data_dependent_holders_release_every_coordinate():
  """Noise (and FIARSE's server step) go everywhere for FIARSE and FedDST under privacy;
  the width methods keep their public masks (the noise on the coordinates some client's
  level holds); no privacy block: nothing changes."""
  contract = _contract()
  cases = {"fiarse": (contract.hetero_config("fiarse"), True),
           "feddst": (contract.sparse_config("sparse", "feddst"), True),
           "fedtiny": (contract.sparse_config("fedtiny"), False),
           **{m: (contract.hetero_config(m), False) for m in ("heterofl", "fedrolex", "scalefl")}}
  update = {"w": jnp.ones((2, 3))}
  present = {"w": jnp.array([[True, False, True], [False, False, True]])}
  info = federated.ClientInfo(jnp.int32(0), jnp.int32(5), jnp.bool_(True), jnp.float32(1.0))
  for name, (config, everywhere) in cases.items():
    assert not build.dp_release_all(config), name
    dp_tiny.add_privacy(config, noise_multiplier=1.0, clip_norm=1.0, adaptive=False)
    assert build.dp_release_all(config) == everywhere, name
    sums = build.full_aggregator(config, None).contribute((), update, jnp.float32(1.0), present,
                                                         info, jax.random.key(0)).sums
    if everywhere:
      assert sums.released == ()
    else:
      np.testing.assert_array_equal(np.asarray(sums.released["w"]), np.asarray(present["w"]))


# ----------------------------------------------------------------------------- expected counts


def _no_noise_dp():
  return federated.dp_mean(0.0, 1e6, expected_clients=3)


def test_expected_counts_with_every_client_at_full_capacity_equal_the_fixed_denominator():
  """All clients at capacity 1 (the small level has none): every coordinate's expected
  count is m, so the round equals the fixed-denominator one bit for bit."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  full = (1.0, 1.0, 1.0)
  fixed, _ = _rounds(_width("heterofl", apply_fn, _no_noise_dp()), params, data, 1, full)
  counted, _ = _rounds(_width("heterofl", apply_fn, _no_noise_dp(), level_clients=(5, 0)),
                       params, data, 1, full)
  for a, b in zip(jax.tree.leaves(fixed[1].params), jax.tree.leaves(counted[1].params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_expected_count_of_a_coordinate_only_the_large_level_holds_is_m_times_its_share():
  """Two levels, 1 client of capacity 1 and 3 of capacity 1/4 in the population: a hidden
  unit only width 1 holds has share 1/4, so its expected count among m = 3 sampled clients
  is 3/4 and the round divides its (unclipped, noiseless) sum by 0.75; a unit both levels
  hold has share 1 and denominator 3."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  share = _hetero.holder_share(params, [heterofl.width_masks(params, w, **MLP_KEYS)
                                        for w in (1.0, 0.5)], (1, 3))
  np.testing.assert_array_equal(share["dense_0"]["bias"], [1.0] * 4 + [0.25] * 4)
  np.testing.assert_array_equal(share["dense_1"]["kernel"][:, 0], [1.0] * 4 + [0.25] * 4)
  assert np.all(np.asarray(share["dense_1"]["bias"]) == 1.0)  # classes: every level
  plain = _width("heterofl", apply_fn)
  update, held = _client_updates(plain, data)(plain.init(params, jax.random.key(1)), 0)
  states, _ = _rounds(_width("heterofl", apply_fn, _no_noise_dp(), level_clients=(1, 3)),
                      params, data, 1)
  for w, u, h, s, new in zip(*map(jax.tree.leaves, (params, update, held, share,
                                                   states[1].params))):
    total = np.where(h, u, 0.0).sum(axis=0)
    np.testing.assert_allclose(np.asarray(new), np.asarray(w) - total / (3 * np.asarray(s)),
                               rtol=1e-5, atol=1e-6)
  large_only = np.asarray(share["dense_0"]["bias"]) == 0.25
  np.testing.assert_allclose(  # client 0 alone holds them: w - u_0 / 0.75
      np.asarray(states[1].params["dense_0"]["bias"])[large_only],
      (np.asarray(params["dense_0"]["bias"]) - update["dense_0"]["bias"][0] / 0.75)[large_only],
      rtol=1e-5, atol=1e-6)


@SLOW
def test_fedrolex_expected_counts_follow_the_rolled_window():
  """FedRolex's share is of this round's windows: after one round (offset 1) the half-width
  window holds hidden units 1..4, so units 0, 5, 6, 7 are width-1 only."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  states, _ = _rounds(_width("fedrolex", apply_fn, _no_noise_dp(), level_clients=(1, 3)),
                      params, data, 2)
  plain = _width("fedrolex", apply_fn)
  update, held = _client_updates(plain, data)(states[1], 1)
  want = np.where(np.isin(np.arange(8), [1, 2, 3, 4]), 1.0, 0.25)
  total = np.where(held["dense_0"]["bias"], update["dense_0"]["bias"], 0.0).sum(axis=0)
  np.testing.assert_allclose(np.asarray(states[2].params["dense_0"]["bias"]),
                             np.asarray(states[1].params["dense_0"]["bias"]) - total / (3 * want),
                             rtol=1e-5, atol=1e-6)


def test_holder_share_and_level_counts_check_their_inputs():
  assert _hetero.level_counts(np.asarray([1.0, 0.25, 0.25, 0.26], np.float32), (1.0, 0.25)) == (1, 3)
  params = {"w": jnp.zeros((2,))}
  with pytest.raises(ValueError, match="level_clients"):
    _hetero.holder_share(params, [{"w": jnp.ones((2,), bool)}], (0,))
  with pytest.raises(ValueError, match="needs an aggregator"):
    _width("heterofl", testing.tiny_mlp(jax.random.key(0))[0], level_clients=(1, 1))


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("inner,capacity", [
    ("mean", (1.0, 0.25, 0.25)),  # the counted mean behind compression, mixed levels
    pytest.param("dp", (0.25, 0.25, 0.25), marks=SLOW),  # one level: counts = m where held
])
def test_heterofl_with_stateful_aggregation_that_changes_nothing_equals_the_plain_rounds(
    inner, capacity):
  """Compression that sends everything (with error feedback), and DP without noise under an
  adaptive clip norm far above every update: two rounds equal plain HeteroFL's."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  data = testing.tiny_client_data()
  agg = federated.compressed(
      federated.mean() if inner == "mean" else federated.dp_mean(
          0.0, 1e6, expected_clients=3, target_quantile=0.5, count_stddev=0.0),
      federated.Compression(), num_clients=3)
  want, _ = _rounds(_width("heterofl", apply_fn), params, data, 2, capacity)
  got, _ = _rounds(_width("heterofl", apply_fn, agg), params, data, 2, capacity)
  testing.assert_trees_close(got[-1].params, want[-1].params, rtol=1e-5, atol=1e-6)
  assert all(np.all(np.asarray(r) == 0) for r in jax.tree.leaves(got[-1].aggregator.residual))
  if inner == "dp":  # every client unclipped (b = 1): C shrinks by exp(-eta / 2) a round
    assert float(got[-1].aggregator.inner.clip_norm) == pytest.approx(1e6 * np.exp(-0.2), rel=1e-6)


def _small_convnet():
  return models.ConvNetSpec(
      input_shape=(6, 6, 2), num_classes=3, head="flatten", norm="batch_running",
      convs=(models.ConvSpec(features=3, pool=2, norm=True, bias=False),))


def _cavp_alg(spec, apply_fn, aggregator=None):
  return cavp.cavp(apply_fn, optax.sgd(0.1), optax.sgd(0.2), SCHEDULE,
                   cavp.Options(theta_init=0.5), spec=spec, weights=cavp.CostWeights(gamma=0.1),
                   aggregator=aggregator)


def test_cavp_with_stateful_aggregation_that_changes_nothing_equals_the_plain_rounds():
  """Equal client sizes (DP weighs clients uniformly, CAVP by examples): compression that
  sends everything with error feedback, behind DP without noise and an adaptive clip norm
  far above every update, gives plain CAVP's weights, θ and statistics after two rounds."""
  spec = _small_convnet()
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  rng = np.random.default_rng(0)
  data = data_lib.ClientData(jnp.asarray(rng.normal(size=(3, 4, 6, 6, 2)), jnp.float32),
                             jnp.asarray(rng.integers(0, 3, (3, 4)), jnp.int32),
                             jnp.full((3,), 4, jnp.int32))
  agg = federated.compressed(federated.dp_mean(0.0, 1e6, expected_clients=3, target_quantile=0.5,
                                               count_stddev=0.0),
                             federated.Compression(), num_clients=3)
  out = {}
  for name, alg in (("plain", _cavp_alg(spec, apply_fn)), ("agg", _cavp_alg(spec, apply_fn, agg))):
    state = alg.init(params, jax.random.key(1), stats)
    round_fn = jax.jit(federated.make_round(alg))
    for r in range(2):
      state, _ = round_fn(state, data, federated.make_cohort(IDS), federated.round_key(ROOT, r))
    out[name] = state
  for field in ("params", "theta", "batch_stats"):
    testing.assert_trees_close(getattr(out["agg"], field), getattr(out["plain"], field),
                               rtol=1e-5, atol=1e-6)
  assert all(np.all(np.asarray(r) == 0) for r in jax.tree.leaves(out["agg"].aggregator.residual))
  assert float(out["agg"].aggregator.inner.clip_norm) == pytest.approx(1e6 * np.exp(-0.2), rel=1e-6)


# ----------------------------------------------------------------------------- CAVP rebuild


def _small_resnet():
  # stage1: 2 identity blocks (layer-gated); stage2: projection block + identity block.
  return models.ResNetSpec(input_shape=(6, 6, 1), num_classes=3, stem_width=2,
                           stage_widths=(2, 3), stage_strides=(1, 2),
                           inner_widths=((3, 2), (4, 3)), norm="none")


TRANSFORMER = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8,
                                     blocks=((2, 3, 10), (3, 2, 6), (1, 4, 4)))


def _pruned(spec, theta):
  """(params with every leaf distinct and nonzero, θ, alive) after `cavp.prune`."""
  params, _ = models.init_params(spec, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  params = jax.tree.unflatten(treedef, [1.0 + i + jnp.arange(l.size, dtype=jnp.float32).reshape(
      l.shape) / 1000 for i, l in enumerate(leaves)])
  theta, alive = cavp.prune(theta, jax.tree.map(lambda t: jnp.ones(jnp.shape(t), bool), theta))
  return params, theta, alive


@pytest.mark.parametrize("model", ["resnet", "transformer"])
def test_rebuild_slices_every_clients_residual_like_the_weights(model):
  """Row i of the error-feedback memory set to (i + 1) x params: after the rebuild (units
  removed, a block dropped and the later ones renamed) it is (i + 1) x the rebuilt params,
  for every client; the clip norm is kept."""
  spec = _small_resnet() if model == "resnet" else TRANSFORMER
  theta = cavp.init_theta(spec)
  if model == "resnet":
    theta["stage1_block0"]["layer"] = jnp.array(0.0)  # dropped: stage1_block1 -> stage1_block0
    theta["stage2_block1"]["unit"] = jnp.array([0.7, 0.0, 0.8])
  else:
    theta["block_1"]["layer"] = jnp.array(0.0)
    theta["block_2"]["ffn"] = jnp.array([0.8, 0.0, 0.9, 0.7])
  params, theta, alive = _pruned(spec, theta)
  weights = cavp.CostWeights(gamma=1.0)
  reference = (accounting.flops(spec), accounting.param_count(spec))
  agg = federated.compressed(federated.dp_mean(1.0, 0.5, expected_clients=3, target_quantile=0.5,
                                               count_stddev=1.0),
                             federated.Compression(bits=8), num_clients=4)
  agg_state = agg.init(params)
  agg_state = agg_state._replace(
      inner=agg_state.inner._replace(clip_norm=jnp.float32(0.25)),
      residual=jax.tree.map(lambda p: jnp.stack([(i + 1.0) * p for i in range(4)]), params))
  state = cavp.CavpState(params, {}, theta, alive,
                         cavp.penalty_weights(spec, weights, reference=reference),
                         jnp.float32(jnp.nan), jnp.int32(0), (), agg_state)
  new_spec, new_state, report = cavp.rebuild(spec, state, weights, reference=reference)
  assert report.units_removed == 1 and len(report.blocks_removed) == 1
  residual = new_state.aggregator.residual
  assert jax.tree.structure(residual) == jax.tree.structure(new_state.params)
  for path, r in jax.tree_util.tree_leaves_with_path(residual):
    p = np.asarray(dict(jax.tree_util.tree_leaves_with_path(new_state.params))[path])
    assert r.shape == (4,) + p.shape, jax.tree_util.keystr(path)
    for i in range(4):
      np.testing.assert_array_equal(np.asarray(r[i]), (i + 1.0) * p)
  assert jax.tree.structure(new_state.params) == jax.tree.structure(
      models.param_shapes(new_spec)[0])
  assert float(new_state.aggregator.inner.clip_norm) == 0.25


# ----------------------------------------------------------------------------- experiments


def _contract():
  from tests import test_method_contract as contract
  return contract


def _stateful(config, denominator=None):
  dp_tiny.add_privacy(config, noise_multiplier=1.0, clip_norm=1.0, adaptive=True)
  config.privacy.count_stddev = 1.0
  if denominator is not None:
    config.privacy.denominator = denominator
  compress_tiny.add_compression(config, bits=8, topk_fraction=0.5, error_feedback=True)
  return config


@pytest.mark.parametrize("make", [
    lambda c: c.hetero_config("fiarse"), lambda c: c.hetero_config("heterofl"),
    lambda c: c.hetero_config("fedrolex"), lambda c: c.hetero_config("scalefl"),
    lambda c: c.cavp_config("federated"), lambda c: c.cavp_config("centralised")])
def test_submodel_and_gated_methods_accept_adaptive_clipping_and_error_feedback(make):
  config = _stateful(make(_contract()))
  build.validate(config)
  assert build.dp_denominator(config) == "fixed"  # a privacy block without the field


@pytest.mark.parametrize("method", ["heterofl", "fedrolex", "scalefl"])
def test_width_methods_accept_the_expected_count_denominator(method):
  config = _stateful(_contract().hetero_config(method), "expected_counts")
  _checks.assert_builds_stateful_aggregator(config, adaptive=True, error_feedback=True)
  assert build.dp_denominator(config) == "expected_counts"


@pytest.mark.parametrize("make,value,match", [
    (lambda c: c.hetero_config("heterofl"), "counted", r"privacy\.denominator='counted' is invalid"),
    (lambda c: c.hetero_config("fiarse"), "expected_counts",
     r"privacy\.denominator='expected_counts' is invalid with method 'fiarse'.*client's data"),
    (lambda c: c.sparse_config("fedtiny"), "expected_counts",
     r"privacy\.denominator='expected_counts' is invalid with method 'fedtiny'"),
    (lambda c: c.cavp_config("federated"), "expected_counts",
     r"privacy\.denominator='expected_counts' is invalid with method 'cavp'"),
])
def test_a_bad_denominator_names_the_field(make, value, match):
  with pytest.raises(build.ConfigError, match=match):
    build.validate(_stateful(make(_contract()), value))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in f]


def _resume_is_bit_exact(config, tmp_path, drop_steps):
  full = str(tmp_path / "full")
  summary = train.train_and_evaluate(config, full)
  records = _records(full)
  workdir = str(tmp_path / "resumed")
  shutil.copytree(full, workdir)
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  for step in drop_steps:
    shutil.rmtree(os.path.join(ckpt_dir, f"step_{step:08d}"))
  os.remove(os.path.join(workdir, "summary.json"))
  train.train_and_evaluate(config, workdir, resume=True)
  assert _records(workdir) == records
  _, arrays, _ = checkpoint.read_arrays(ckpt_dir)
  _, ref_arrays, _ = checkpoint.read_arrays(os.path.join(full, train.CHECKPOINT_DIR))
  assert arrays.keys() == ref_arrays.keys()
  residual = [k for k in arrays if "aggregator" in k and "residual" in k]
  assert residual and any(np.any(arrays[k] != 0) for k in residual)  # EF memory checkpointed
  assert any("clip_norm" in k for k in arrays)
  for k in arrays:
    assert arrays[k].tobytes() == ref_arrays[k].tobytes(), f"{k} differs after resume"
  return records, summary


@pytest.mark.slow
def test_resume_of_a_heterofl_run_with_stateful_dp_compression_and_expected_counts(tmp_path):
  config = _stateful(_contract().hetero_config("heterofl"), "expected_counts")
  config.rounds, config.checkpoint_every, config.checkpoint_keep, config.eval_every = 3, 1, 3, 3
  records, _ = _resume_is_bit_exact(config, tmp_path, (3,))
  assert len({r["dp_clip_norm"] for r in records}) > 1  # the clip norm moved


@pytest.mark.slow
def test_resume_of_a_cavp_run_with_error_feedback_across_rebuilds(tmp_path):
  """CAVP rebuilds after every round here: the resumed run restores a residual of the
  rebuilt shapes (the checkpoint template) and continues bit for bit."""
  config = _stateful(_contract().cavp_config("federated"))
  config.rounds, config.checkpoint_every, config.checkpoint_keep, config.eval_every = 3, 1, 3, 3
  _, summary = _resume_is_bit_exact(config, tmp_path, (3,))
  assert summary["rebuilds"]  # a rebuild removed something before the restored round

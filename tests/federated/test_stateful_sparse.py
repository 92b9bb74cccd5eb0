"""Stateful aggregation in the sparse family (issue 28): error-feedback memory and the
adaptive DP clip norm carried by `MaskedFedAvgState.aggregator` through FedTiny, FedDST,
PruneFL, LotteryFL and masked FedAvg rounds, against direct computations; equivalence
with the plain rounds; config validation (the submodel and gated families take the options
too: tests/federated/test_stateful_submodel.py) and a resumed run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import compress_tiny, dp_tiny
from fedjax_prune import federated, masks, testing
from fedjax_prune.pruning import _sparse, base, feddst, fedtiny, lotteryfl, prunefl
from tests import _checks
from tests._checks import topk_half
from tests.federated.test_stateful_submodel import _resume_is_bit_exact

SCHEDULE = federated.LocalSchedule(batch_size=4, num_epochs=1)
IDS = [0, 1, 2]
ROOT = jax.random.key(7)
SLOW = pytest.mark.slow  # compiles rounds (seconds each): the default suite keeps one case per test


def _problem(sizes=(5, 9, 3)):
  """(apply_fn, params at density 0.5, masks, prunable, data of 3 clients)."""
  apply_fn, params = testing.tiny_mlp(jax.random.key(0))
  prunable = masks.by_ndim(params)
  params, m = fedtiny.sparse_setup(params, 0.5, prunable=prunable)
  return apply_fn, params, m, prunable, testing.tiny_client_data(sizes=sizes)


def _algorithm(name, apply_fn, params, prunable, aggregator=None):
  """The sparse method `name`; round 1 (the second) adjusts / prunes its masks."""
  opt = optax.sgd(0.1)
  kw = dict(prunable=prunable, aggregator=aggregator)
  if name == "fedtiny":
    return fedtiny.fedtiny(apply_fn, opt, SCHEDULE, adjust_every=1, adjust_end=4, **kw)
  if name == "feddst":
    return feddst.feddst(apply_fn, opt, SCHEDULE, adjust_every=1, adjust_end=4, **kw)
  if name == "prunefl":
    return prunefl.prunefl(apply_fn, opt, SCHEDULE, adjust_every=1, adjust_end=4, **kw)
  if name == "lotteryfl":
    return lotteryfl.lotteryfl(apply_fn, opt, SCHEDULE, prune_every=1, num_prune_steps=2,
                               densities=_sparse.layer_densities(params, 0.3, "uniform", prunable),
                               **kw)
  # SNIP / SynFlow / dense: fixed masks, FedAvg's server step on the pseudo-gradient.
  return base.masked_fedavg(apply_fn, opt, SCHEDULE, base.no_prune(),
                            server_optimizer=optax.sgd(1.0), aggregator=aggregator)


def _rounds(alg, params, m, data, rounds):
  """[state before round 0, after round 0, ...] and the rounds' metrics."""
  state = alg.init(params, jax.random.key(1), masks=m)
  round_fn = federated.make_round(alg)
  states, metrics = [state], []
  for r in range(rounds):
    state, out = round_fn(state, data, federated.make_cohort(IDS), federated.round_key(ROOT, r))
    states.append(state)
    metrics.append(out)
  return states, metrics


def _client_updates(plain, data):
  """`fn(state, round_idx)`: each cohort client's (update, present) as the aggregator sees
  them in round `round_idx` from `state`: `plain`'s client step (the engine's client keys)
  read through `base.aggregation_view`; leaves stacked [3, ...]. Compiled once."""
  view = base.aggregation_view()

  def probe(state, d, info, key):
    update, _, present, _ = view.read(state, plain.client_update(state, d, info, key).sums)
    return federated.ClientOutput((), (update, present))

  run = jax.jit(lambda s, root: federated.run_clients(probe, s, data, federated.make_cohort(IDS),
                                                      root).per_client)

  def fn(state, round_idx):
    client_root, _ = federated.split_round_key(federated.round_key(ROOT, round_idx))
    return jax.tree.map(np.asarray, run(state, client_root))

  return fn


def _held(present, update):
  """{path: bool [3, ...]} the coordinates each client holds (a `()` mask: all or none)."""
  return jax.tree.map(lambda p, u: np.broadcast_to(p.reshape(p.shape + (1,) * (u.ndim - p.ndim)),
                                                   u.shape), present, update)


# ----------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", [pytest.param("fedtiny", marks=SLOW), "feddst"])
def test_error_feedback_memory_is_the_unsent_part_on_held_coordinates(name):
  """e' = u + e - C(u + e) where the client holds, e' = e elsewhere (0 where never held),
  over a plain round and an adjustment round (FedDST: the clients' own masks)."""
  apply_fn, params, m, prunable, data = _problem()
  agg = federated.compressed(federated.mean(), federated.Compression(topk_fraction=0.5),
                             num_clients=3)
  states, _ = _rounds(_algorithm(name, apply_fn, params, prunable, agg), params, m, data, 2)
  client_updates = _client_updates(_algorithm(name, apply_fn, params, prunable), data)
  own_pruned = 0
  for r in range(2):
    before, after = states[r], states[r + 1]
    update, present = client_updates(before, r)
    held = _held(present, update)
    e = jax.tree.map(np.asarray, before.aggregator.residual)
    got = jax.tree.map(np.asarray, after.aggregator.residual)
    for path in ("dense_0", "dense_1"):
      for leaf in ("kernel", "bias"):
        u, h, old, new = (t[path][leaf] for t in (update, held, e, got))
        for i in range(3):
          c = u[i] + old[i]
          np.testing.assert_allclose(new[i][h[i]], (c - topk_half(c, h[i]))[h[i]], atol=1e-6)
          assert np.array_equal(new[i][~h[i]], old[i][~h[i]])  # kept as it was
        server = np.broadcast_to(np.asarray(before.masks[path][leaf]), u.shape[1:])
        assert np.all(new[:, ~server][~h[:, ~server]] == 0.0)  # pruned and never held: 0
        # FedDST: coordinates the server holds and a client pruned itself (its update
        # reads w_server there): the memory must not take it.
        own = server[None] & ~h & (np.asarray(before.params[path][leaf]) != 0)[None]
        own_pruned += int(own.sum())
    assert any(np.any(x != 0) for x in jax.tree.leaves(got))  # top half: something unsent
  assert (own_pruned > 0) == (name == "feddst")


# ----------------------------------------------------------------------------- adaptive clipping


@pytest.mark.parametrize("name", ["prunefl", pytest.param("lotteryfl", marks=SLOW)])
def test_adaptive_clip_norm_moves_by_the_quantile_rule_through_sparse_rounds(name):
  """No noise (z = 0, sigma_b = 0): C' = C exp(-eta (b - gamma)), b the unclipped fraction
  of the clients' norms over the server's mask; the mean is the clipped sum / m."""
  apply_fn, params, m, prunable, data = _problem()
  plain = _algorithm(name, apply_fn, params, prunable)
  client_updates = _client_updates(plain, data)
  update, present = client_updates(plain.init(params, jax.random.key(1), masks=m), 0)
  held = _held(present, update)
  norms = np.sqrt(sum(np.sum(np.where(h, u, 0.0).reshape(3, -1) ** 2, axis=1)
                      for u, h in zip(jax.tree.leaves(update), jax.tree.leaves(held))))
  lo, mid, _ = np.sort(norms)
  clip0 = float(0.5 * (lo + mid))  # one client unclipped, two clipped: b = 1/3
  eta, gamma = 0.3, 0.5
  agg = federated.dp_mean(0.0, clip0, expected_clients=3, target_quantile=gamma,
                          clip_learning_rate=eta, count_stddev=0.0)
  states, metrics = _rounds(_algorithm(name, apply_fn, params, prunable, agg), params, m, data, 2)
  clip1 = clip0 * np.exp(-eta * (1 / 3 - gamma))
  assert float(metrics[0]["dp_clip_norm"]) == np.float32(clip0)
  assert float(metrics[0]["dp_clipped_fraction"]) == pytest.approx(2 / 3)
  assert float(states[1].aggregator.clip_norm) == pytest.approx(clip1, rel=1e-6)
  if name == "prunefl":  # masks unchanged after round 0: w' = w - sum_k clip(u_k) / 3
    factor = np.minimum(1.0, clip0 / norms)
    for w, u, h, new in zip(jax.tree.leaves(params), jax.tree.leaves(update),
                            jax.tree.leaves(held), jax.tree.leaves(states[1].params)):
      want = np.asarray(w) - np.tensordot(factor, np.where(h, u, 0.0), axes=1) / 3
      np.testing.assert_allclose(np.asarray(new), want, atol=1e-6)
  # Round 1 clips with the carried C' and moves it again by the same rule.
  update, present = client_updates(states[1], 1)
  held = _held(present, update)
  norms = np.sqrt(sum(np.sum(np.where(h, u, 0.0).reshape(3, -1) ** 2, axis=1)
                      for u, h in zip(jax.tree.leaves(update), jax.tree.leaves(held))))
  b = np.mean(norms <= float(states[1].aggregator.clip_norm))
  assert float(metrics[1]["dp_clip_norm"]) == float(states[1].aggregator.clip_norm)
  assert float(states[2].aggregator.clip_norm) == pytest.approx(
      float(states[1].aggregator.clip_norm) * np.exp(-eta * (b - gamma)), rel=1e-6)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", ["fedtiny"] + [pytest.param(n, marks=SLOW) for n in (
    "feddst", "prunefl", "lotteryfl", "masked_fedavg")])
def test_stateful_aggregation_that_changes_nothing_equals_the_plain_rounds(name):
  """Compression that sends everything (with error feedback), and DP without noise under
  an adaptive clip norm far above every update (equal client sizes: DP weighs clients
  uniformly): two rounds (the second adjusts the masks) equal the plain method's.
  FedDST averages each coordinate over its holders: it takes the mean behind compression."""
  apply_fn, params, m, prunable, data = _problem(sizes=(4, 4, 4))
  inner = (federated.mean() if name == "feddst" else
           federated.dp_mean(0.0, 1e6, expected_clients=3, target_quantile=0.5, count_stddev=0.0))
  agg = federated.compressed(inner, federated.Compression(), num_clients=3)
  want, _ = _rounds(_algorithm(name, apply_fn, params, prunable), params, m, data, 2)
  got, _ = _rounds(_algorithm(name, apply_fn, params, prunable, agg), params, m, data, 2)
  testing.assert_trees_close(got[-1].params, want[-1].params, rtol=1e-5, atol=1e-6)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got[-1].masks,
                                   want[-1].masks))
  assert all(np.all(np.asarray(r) == 0) for r in jax.tree.leaves(got[-1].aggregator.residual))
  if name != "feddst":  # every client unclipped (b = 1): C shrinks by exp(-eta / 2) a round
    assert float(got[-1].aggregator.inner.clip_norm) == pytest.approx(1e6 * np.exp(-0.2), rel=1e-6)


# ----------------------------------------------------------------------------- experiments


def _contract():
  from tests import test_method_contract as contract
  return contract


def _stateful(config):
  dp_tiny.add_privacy(config, noise_multiplier=1.0, clip_norm=1.0, adaptive=True)
  config.privacy.count_stddev = 1.0
  compress_tiny.add_compression(config, bits=8, topk_fraction=0.5, error_feedback=True)
  return config


@pytest.mark.parametrize("method,sparse_method", [
    ("fedtiny", ""), ("sparse", "feddst"), ("sparse", "prunefl"), ("sparse", "lotteryfl"),
    ("sparse", "snip"), ("sparse", "synflow"), ("sparse", "dense")])
def test_sparse_methods_accept_adaptive_clipping_and_error_feedback(method, sparse_method):
  config = _stateful(_contract().sparse_config(method, sparse_method))
  _checks.assert_builds_stateful_aggregator(config, adaptive=True, error_feedback=True)


@pytest.mark.parametrize("make,field", [
    (lambda c: c.hetero_config("fiarse"), "privacy.adaptive"),
    (lambda c: c.hetero_config("heterofl"), "compression.error_feedback"),
    (lambda c: c.cavp_config("federated"), "compression.error_feedback"),
    (lambda c: c.cavp_config("federated"), "privacy.adaptive"),
])
def test_submodel_and_gated_methods_take_each_stateful_option_alone(make, field):
  """Refused until their server states held the aggregator's state; accepted now."""
  config = _stateful(make(_contract()))
  other = "compression.error_feedback" if field == "privacy.adaptive" else "privacy.adaptive"
  block, name = other.split(".")
  config[block][name] = False  # only `field` is stateful
  _checks.assert_builds_stateful_aggregator(config, adaptive=field == "privacy.adaptive",
                                            error_feedback=field == "compression.error_feedback")


@pytest.mark.slow
def test_resume_of_a_feddst_run_with_error_feedback_and_adaptive_clipping_is_bit_exact(tmp_path):
  config = _stateful(_contract().sparse_config("sparse", "feddst"))
  config.rounds, config.checkpoint_every, config.checkpoint_keep, config.eval_every = 4, 1, 4, 2
  records, _ = _resume_is_bit_exact(config, tmp_path, (3, 4))
  assert len({r["dp_clip_norm"] for r in records}) > 1  # the clip norm moved

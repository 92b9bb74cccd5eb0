"""Client-side pruning decisions (issue 28, item 5): votes by ASP's rule, tallies, keep sets."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import federated, models, structured, testing
from fedjax_prune.pruning import auto_structured, client_votes


@pytest.mark.parametrize("tails", ["both", "lower"])
def test_a_clients_vote_is_asps_server_rule(tails):
  rng = np.random.default_rng(0)
  for trial in range(20):
    scores = rng.gamma(2.0, size=int(rng.integers(2, 40)))
    if trial == 0:
      scores[:] = 1.0  # sigma = 0: every filter is on the mean
    want = auto_structured.boundary_keep(scores, 1.0, tails)
    got = jax.jit(lambda s: client_votes.boundary_vote(s, 1.0, tails))(jnp.asarray(scores))
    np.testing.assert_array_equal(np.asarray(got), want)
  # Nothing inside a k = 0 two-sided boundary: the filter nearest the mean is kept.
  got = client_votes.boundary_vote(jnp.array([0.0, 1.0, 2.5, 10.0]), 0.0, "both")
  np.testing.assert_array_equal(np.asarray(got), [False, False, True, False])


def test_scores():
  kernel = jnp.arange(24.0).reshape(2, 3, 4) - 10.0
  np.testing.assert_allclose(client_votes.filter_l1(kernel),
                             np.abs(np.asarray(kernel)).reshape(6, 4).sum(0))
  grad = jnp.ones_like(kernel) * jnp.array([[[1.0, -1.0, 0.0, 2.0]]])
  np.testing.assert_allclose(client_votes.filter_taylor(kernel, grad),
                             np.abs((np.asarray(kernel) * np.asarray(grad)).reshape(6, 4).sum(0)))


def test_tally_counts_participants_only_and_the_server_keeps_the_majority():
  votes = {"conv_0": jnp.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], bool)}
  part = jnp.array([True, True, True, False])  # slot 3 pads: its vote for filter 3 never counts
  counts = client_votes.tally(votes, part)
  np.testing.assert_array_equal(np.asarray(counts["conv_0"]), [3, 2, 1, 0])
  keep = client_votes.keep_from_votes(counts, 3)
  np.testing.assert_array_equal(keep["conv_0"], [0, 1])          # > 1.5 of 3 voters
  np.testing.assert_array_equal(client_votes.keep_from_votes(counts, 3, threshold=0.7)["conv_0"], [0])
  # No filter reaches the threshold: the most voted one is kept (ASP keeps >= 1).
  none = {"conv_0": jnp.array([1.0, 2.0, 2.0, 0.0])}
  np.testing.assert_array_equal(client_votes.keep_from_votes(none, 5)["conv_0"], [1])


def test_noised_tally_is_the_gaussian_mechanism_on_the_counts():
  votes = {"a": jnp.ones((3, 5), bool), "b": jnp.zeros((3, 2), bool)}
  part = jnp.ones(3, bool)
  key = jax.random.key(4)
  got = client_votes.tally(votes, part, key=key, noise_stddev=0.5)
  exact = client_votes.tally(votes, part)
  want = federated.add_gaussian_noise(exact, key, 0.5)
  for name in votes:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
    assert np.all(np.asarray(got[name]) != np.asarray(exact[name]))
  with pytest.raises(ValueError, match="key"):
    client_votes.tally(votes, part, noise_stddev=1.0)


def test_keep_sets_go_to_shrink():
  spec = models.asp_femnist_cnn(widths=(4, 8))
  _, params, _ = models.build(spec, jax.random.key(0))
  votes = {"conv_0": jnp.array([[1, 0, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]], bool)}
  keep = client_votes.keep_from_votes(client_votes.tally(votes, jnp.ones(3, bool)), 3)
  out = structured.shrink(spec, params, keep)
  assert out.spec.convs[0].features == 3
  np.testing.assert_array_equal(out.params["conv_0"]["kernel"],
                                np.asarray(params["conv_0"]["kernel"])[..., [0, 2, 3]])


@pytest.mark.parametrize("spec", [
    models.asp_femnist_cnn(widths=(3, 5), num_classes=4, input_shape=(16, 16, 1)),
    models.LSTMSpec(vocab_size=7, seq_len=5, embed_dim=3, hidden=(6, 5)),
    models.TransformerSpec(vocab_size=7, seq_len=5, d_model=8, blocks=((2, 4, 6),))],
    ids=["cnn", "lstm", "transformer"])
def test_jittable_group_scores_are_the_hosts(spec):
  """The clients' in-round scores (jnp, float32) are the server's `structured.group_l1`
  (numpy, float64) group by group, for conv filters and for text units and heads."""
  params, _ = models.init_params(spec, jax.random.key(0))
  got = jax.jit(lambda p: client_votes.filter_group_l1(spec, p))(params)
  want = structured.group_l1(spec, params)
  assert set(got) == set(want) and len(want) >= 2
  for group in want:
    assert got[group].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[group]), want[group], rtol=1e-5, err_msg=group)


def test_bad_arguments():
  with pytest.raises(ValueError, match="tails"):
    client_votes.boundary_vote(jnp.ones(3), 1.0, "upper")
  with pytest.raises(ValueError, match="k must"):
    client_votes.boundary_vote(jnp.ones(3), -1.0)
  with pytest.raises(ValueError, match="threshold"):
    client_votes.keep_from_votes({"a": np.ones(2)}, 3, threshold=1.0)


def test_with_client_votes_leaves_the_round_alone_and_tallies_each_clients_vote():
  """The wrapped round's state and metrics are FedAvg's bit for bit; its tallies are each
  client's vote on its own trained model, summed over the real clients (padding excluded)."""
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  alg = federated.fedavg(apply_fn, optax.sgd(0.5), federated.LocalSchedule(batch_size=4))
  vote_fn = lambda p: {name: client_votes.boundary_vote(client_votes.filter_l1(p[name]["kernel"]), 0.5)
                       for name in p}
  voting = client_votes.with_client_votes(alg, vote_fn, federated.fedavg_view())
  cohort, key = federated.make_cohort([0, 1, 2], multiple=4), jax.random.key(3)
  round_fn = federated.make_round(alg)
  state, metrics = federated.make_round(voting)(voting.init(params, key), data, cohort, key)
  want_state, want_metrics = round_fn(alg.init(params, key), data, cohort, key)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(a, b)
  for name, value in want_metrics.items():
    np.testing.assert_array_equal(metrics[name], value)
  assert float(metrics["voters"]) == 3.0
  want = {"dense_0": np.zeros(8), "dense_1": np.zeros(3)}
  for i in range(3):  # FedAvg of one client is its trained model
    alone, _ = round_fn(alg.init(params, key), data, federated.make_cohort([i], multiple=4), key)
    for name, v in vote_fn(alone.params).items():
      want[name] += np.asarray(v)
  got = client_votes.tallies_from_metrics(metrics)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(np.asarray(got[name]), want[name])
  assert any(0 < c < 3 for c in want["dense_0"])  # the clients disagree somewhere

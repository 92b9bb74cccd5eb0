"""ASP with client votes (issue 28, item 5): the clients vote in the compiled round, the
server decides the next architecture from the tallies, then rebuilds as ASP does."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import build as build_lib
from experiments.configs import asp_tiny
from experiments.methods import asp as asp_driver
from fedjax_prune import data, federated, models
from fedjax_prune.pruning import auto_structured as asp_lib
from fedjax_prune.pruning import client_votes
from tests.pruning.test_asp_outcomes import DENSE, _model_fns, _run

SHAPE, CLASSES = (16, 16, 1), 4
SPEC = models.asp_femnist_cnn(widths=(4, 8), num_classes=CLASSES, input_shape=SHAPE)


def _clients(num_clients, *, identical=False):
  """Synthetic glyph clients on device; `identical`: every client holds client 0's data."""
  train, test = data.synthetic_images(1 if identical else num_clients, seed=0, image_shape=SHAPE,
                                      num_classes=CLASSES, examples_per_client=8,
                                      test_examples_per_client=4, label_skew_alpha=None)
  if identical:
    train = jax.tree.map(lambda a: np.repeat(np.asarray(a), num_clients, axis=0), train)
  test_x, test_y = data.pool(test)
  return data.to_device(train), jnp.asarray(test_x), jnp.asarray(test_y)


def _method(policy, train, test_x, test_y, num_clients):
  params, stats = models.init_params(SPEC, jax.random.key(0))
  schedule = federated.LocalSchedule(batch_size=8)  # one full-batch step per client
  return asp_lib.asp(policy, spec=SPEC, params=params, batch_stats=stats, key=jax.random.key(1),
                     fedavg_for=lambda a: federated.fedavg(a, optax.sgd(0.5), schedule),
                     model=_model_fns(test_x, test_y), clients_per_round=num_clients)


def _rounds(method, train, num_clients, rounds):
  cohort = federated.make_cohort(np.arange(num_clients))
  return list(federated.run_rounds(
      method, method.init(), train=train, cohort_fn=lambda r: cohort,
      train_root=jax.random.key(2), init_key=jax.random.key(1), rounds=range(rounds),
      compile_round=lambda a: federated.make_round(a, execution=federated.Sequential())))


def test_identical_clients_vote_the_servers_decision():
  """Every client trains the same model on the same data: the votes are unanimous, and the
  architecture ASP's search step takes from them before round 2 keeps exactly the filters
  the server's rule keeps on the aggregated model."""
  train, test_x, test_y = _clients(3, identical=True)
  policy = asp_lib.auto_structured(k=0.5, max_pruned_round=1, client_votes=asp_lib.ClientVotes())
  method = _method(policy, train, test_x, test_y, 3)
  [(_, after, record)] = _rounds(method, train, 3, 1)
  for group in ("conv_0", "conv_1"):
    assert set(record[f"votes/{group}"]) <= {0.0, 3.0}, record  # unanimous
  assert record["voters"] == 3.0 and after.host["votes"]["voters"] == 3.0
  # One bit per filter per client travels up with the update: 12 filters, 2 bytes each.
  assert record["bytes_up"] == asp_lib.round_sizes(SPEC, 3)["bytes_up"] + 3 * 2
  server_keep = policy.propose(SPEC, jax.device_get(after.server.params))  # the paper's decision
  decided = method.before_round(after, 1, jax.random.fold_in(jax.random.key(1), 1))
  assert decided.cache["accepted"] and decided.spec != SPEC  # it pruned
  for group, keep in server_keep.items():
    np.testing.assert_array_equal(decided.cache["keep"][group], keep, err_msg=group)
  assert [c.features for c in decided.spec.convs] == [int(server_keep[g].sum())
                                                       for g in ("conv_0", "conv_1")]


@pytest.mark.parametrize("spec", [
    SPEC, models.asp_resnet(widths=(4, 8, 8), num_classes=CLASSES, input_shape=SHAPE,
                            norm="batch_running"),
    models.LSTMSpec(vocab_size=7, seq_len=5, embed_dim=3, hidden=(6, 5)),
    models.TransformerSpec(vocab_size=7, seq_len=5, d_model=8, blocks=((2, 4, 6), (2, 4, 6)))],
    ids=["cnn", "resnet", "lstm", "transformer"])
def test_one_voter_on_the_server_model_is_the_server_rule(spec):
  """`vote` (jnp, in the round) on the aggregated model, tallied and kept, is `propose`,
  including the ResNet stream groups that follow the stem's count, and a text model's
  LSTM units, heads and FFN units."""
  policy = asp_lib.auto_structured(k=0.5, client_votes=asp_lib.ClientVotes())
  vote_fn = jax.jit(policy.vote(spec))
  for seed in range(3):
    params, _ = models.init_params(spec, jax.random.key(seed))
    want = policy.propose(spec, params)
    votes = vote_fn(params)
    assert set(votes) == set(want)
    tally = asp_lib.Tally({g: 5 * np.asarray(v, np.float64) for g, v in votes.items()}, 5)
    got = policy.keep_from_votes(spec, tally)
    for group in want:
      np.testing.assert_array_equal(got[group], want[group], err_msg=group)
    assert any(not k.all() for k in want.values())  # the rule prunes: not a vacuous check


def test_the_threshold_decides_a_minority_filter():
  """conv_0's filter 1 is kept by 1 voter of 4: a majority removes it, threshold 0.2 keeps
  it; the step prunes to exactly the kept filters."""
  counts = {"conv_0": [4.0, 1.0, 3.0, 2.0], "conv_1": [4.0] * 4 + [0.0] * 4}
  tally = asp_lib.Tally(counts, 4)
  params, stats = models.init_params(SPEC, jax.random.key(0))
  for threshold, kept in ((0.5, [0, 2]), (0.2, [0, 1, 2, 3]), (0.7, [0, 2]), (0.8, [0])):
    policy = asp_lib.auto_structured(k=0.5, client_votes=asp_lib.ClientVotes(threshold=threshold))
    keep = policy.keep_from_votes(SPEC, tally)
    np.testing.assert_array_equal(np.flatnonzero(keep["conv_0"]), kept)
    np.testing.assert_array_equal(np.flatnonzero(keep["conv_1"]), [0, 1, 2, 3])
    state, decision = policy.step(policy.init(), SPEC, params, stats, 1, jax.random.key(3),
                                  votes=tally)
    assert decision.accepted  # conv_1 halves in every case
    assert [c.features for c in decision.spec.convs] == [len(kept), 4]
    assert state.num_accepted == 1
  with pytest.raises(ValueError, match="votes=None"):
    policy.step(policy.init(), SPEC, params, stats, 1, jax.random.key(3))
  with pytest.raises(ValueError, match="conv_1"):  # tallies of another architecture
    policy.keep_from_votes(SPEC, asp_lib.Tally({**counts, "conv_1": [1.0] * 4}, 4))


def test_round_tallies_the_clients_votes_with_the_stated_noise():
  """ASP's compiled round with noise multiplier z: every count is the clients' votes on their
  trained models, summed (a padding slot never counts), plus z * sqrt(12 filters) times the
  standard normal of the server's vote key. The noise depends on the key only, so each
  client run alone gets the same draw: what is left is its 0/1 vote on the model it trained
  (= the one-client aggregate)."""
  z = 0.7
  train, test_x, test_y = _clients(3)
  policy = asp_lib.auto_structured(k=0.5, client_votes=asp_lib.ClientVotes(noise_multiplier=z))
  voting = _method(policy, train, test_x, test_y, 3).algorithm(SPEC)
  round_fn = federated.make_round(voting, execution=federated.Sequential())
  params, stats = models.init_params(SPEC, jax.random.key(0))
  round_key = jax.random.key(7)
  run = lambda ids: round_fn(voting.init(params, jax.random.key(1), batch_stats=stats), train,
                             federated.make_cohort(ids, multiple=4), round_key)  # 4 slots
  _, server_key = federated.split_round_key(round_key)
  unit = federated.add_gaussian_noise({"conv_0": jnp.zeros(4), "conv_1": jnp.zeros(8)},
                                      jax.random.fold_in(server_key, client_votes.VOTES_STREAM), 1.0)
  noise = {g: z * np.sqrt(12.0) * np.asarray(u) for g, u in unit.items()}
  assert all(np.all(np.abs(n) > 1e-3) for n in noise.values())
  exact = {g: np.zeros(n.shape) for g, n in noise.items()}
  for i in range(3):
    alone, metrics = run([i])
    assert float(metrics["voters"]) == 1.0
    want = policy.vote(SPEC)(alone.params)  # FedAvg of one client is its trained model
    for g, c in client_votes.tallies_from_metrics(metrics).items():
      np.testing.assert_allclose(np.asarray(c) - noise[g], np.asarray(want[g], np.float64),
                                 atol=1e-5, err_msg=g)
      exact[g] += np.asarray(want[g])
  assert any(0 < c < 3 for c in exact["conv_1"])  # the clients disagree somewhere
  _, metrics = run([0, 1, 2])
  assert float(metrics["voters"]) == 3.0
  for g, c in client_votes.tallies_from_metrics(metrics).items():
    np.testing.assert_allclose(np.asarray(c) - noise[g], exact[g], atol=1e-5, err_msg=g)


def test_zero_noise_tallies_are_exact_counts():
  votes = {"a": jnp.array([[1, 0, 1], [1, 1, 0]], bool)}
  part = jnp.ones(2, bool)
  exact = client_votes.tally(votes, part)
  np.testing.assert_array_equal(np.asarray(exact["a"]), [2.0, 1.0, 1.0])
  zero = client_votes.tally(votes, part, key=jax.random.key(0), noise_stddev=0.0)
  np.testing.assert_array_equal(np.asarray(zero["a"]), np.asarray(exact["a"]))


def _votes_config(**fields):
  c = asp_tiny.get_config("votes")
  for path, value in fields.items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("fields, named", [
    ({"asp.decision": "clients"}, "asp.decision"),
    ({"asp.vote_threshold": 1.0}, "asp.vote_threshold"),
    ({"asp.vote_threshold": -0.1}, "asp.vote_threshold"),
    ({"asp.vote_threshold": True}, "asp.vote_threshold"),
    ({"asp.vote_noise_multiplier": -1.0}, "asp.vote_noise_multiplier"),
    ({"asp.vote_noise_multiplier": float("nan")}, "asp.vote_noise_multiplier"),
    ({"asp.vote_delta": 0.0}, "asp.vote_delta"),
    ({"asp.vote_delta": 1.0}, "asp.vote_delta"),
    ({"robust": ml_collections.ConfigDict({"aggregator": "median"})}, "asp.decision"),
    ({"privacy": ml_collections.ConfigDict({"noise_multiplier": 1.0})}, "asp.decision"),
])
def test_bad_vote_configs_name_the_field(fields, named):
  asp_driver.validate(_votes_config())  # the votes config itself is valid
  with pytest.raises(build_lib.ConfigError, match=f"config.{named}="):
    asp_driver.validate(_votes_config(**fields))


def test_votes_epsilon_is_the_accountants_curve_for_noised_tallies_only():
  """`build.vote_epsilons`: the RDP curve of one Gaussian release per round at
  q = clients_per_round / num_clients and asp.vote_delta; None for exact tallies, for the
  server's decision and for other methods."""
  config = _votes_config(**{"asp.vote_noise_multiplier": 1.5, "asp.vote_delta": 1e-5,
                            "rounds": 4})
  got = build_lib.vote_epsilons(config, 40)
  want = federated.epsilon_per_round(1.5, config.clients_per_round / 40, 4, 1e-5)
  assert got == [float(e) for e in want] and 0 < got[0] < got[-1] < np.inf
  assert build_lib.vote_epsilons(_votes_config(), 40) is None  # z = 0: exact tallies
  assert build_lib.vote_epsilons(_votes_config(**{"asp.decision": "server"}), 40) is None
  assert build_lib.vote_epsilons(_votes_config(**{"method": "fedavg"}), 40) is None


@pytest.mark.slow  # ~6 s: a 3-round asp_tiny run
def test_records_carry_the_votes_epsilon_from_the_accountant(tmp_path):
  """With noised tallies every record carries the votes' epsilon so far: the accountant's
  curve for noise multiplier z at q = clients_per_round / num_clients, one release per
  round (the tallies of every round are in the records); exact tallies carry none."""
  import json
  from experiments import train
  config = _votes_config(**{"asp.vote_noise_multiplier": 2.0, "asp.vote_delta": 1e-4,
                            "rounds": 3, "asp.max_pruned_round": 0})  # one architecture: one compile
  train.train_and_evaluate(config, str(tmp_path / "noised"))
  with open(tmp_path / "noised" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  q = config.clients_per_round / config.data.num_clients
  want = federated.epsilon_per_round(2.0, q, 3, 1e-4)
  assert [r["vote_epsilon"] for r in records] == [float(e) for e in want]
  assert 0 < want[0] < want[1] < want[2] < np.inf
  assert "dp_epsilon" not in records[0]
  assert build_lib.vote_epsilons(_votes_config(), config.data.num_clients) is None  # z = 0


def test_bad_library_arguments():
  for votes, named in ((asp_lib.ClientVotes(threshold=1.0), "client_votes.threshold"),
                       (asp_lib.ClientVotes(noise_multiplier=-0.5), "client_votes.noise_multiplier"),
                       ((0.5, 0.0), "client_votes must")):
    with pytest.raises(ValueError, match=named):
      asp_lib.auto_structured(client_votes=votes)
  with pytest.raises(ValueError, match="noise_stddev"):
    client_votes.with_client_votes(None, None, federated.fedavg_view(), noise_stddev=-1.0)


@pytest.mark.slow  # ~20 s: a dense and a voted run of 12 rounds
def test_voted_asp_keeps_90_percent_of_dense_accuracy():
  """The outcome criterion of test_asp_outcomes with the clients deciding (k = 1, prune
  before round 2, re-initialised): a smaller model at >= 90 % of dense accuracy."""
  dense, dense_records, _ = _run(asp_lib.auto_structured(**DENSE))
  assert dense >= 0.9, dense
  acc, records, _ = _run(asp_lib.auto_structured(k=1.0, max_pruned_round=1,
                                                 client_votes=asp_lib.ClientVotes()))
  assert records[1]["accepted"] == 1 and records[0]["voters"] == 6.0
  assert records[-1]["params"] < dense_records[-1]["params"], "nothing was pruned"
  assert acc >= 0.9 * dense, (acc, dense)
  assert records[-1]["active_channels_min"] > 0.5, records[-1]


@pytest.mark.slow  # the tiny LSTM compiled twice (before and after the prune)
def test_text_clients_vote_the_next_lstm_width(tmp_path):
  """The tiny Shakespeare LSTM through the experiment loop with client votes: round 1's
  records carry one count per LSTM unit from the 3 voters, and the architecture before
  round 2 (the search's last round) keeps exactly the units more than half of them kept."""
  import json
  from experiments import train
  from experiments.configs import fedavg_shakespeare
  c = fedavg_shakespeare.get_config("tiny,asp")
  c.asp.decision, c.asp.vote_threshold, c.asp.vote_noise_multiplier = "client_votes", 0.5, 0.0
  c.rounds, c.eval_every, c.checkpoint_every = 2, 2, 2
  train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    first, second = [json.loads(line) for line in f]
  counts = np.asarray(first["votes/lstm_0"])
  assert first["voters"] == 3.0 and counts.shape == (16,) and set(counts) <= {0.0, 1.0, 2.0, 3.0}
  kept = max(1, int(np.sum(counts > 1.5)))
  assert kept < 16, counts  # the votes prune: not a vacuous check
  assert second["accepted"] == 1 and second["params"] < first["params"]
  assert len(second["votes/lstm_0"]) == kept  # round 2 runs (and votes on) the kept units

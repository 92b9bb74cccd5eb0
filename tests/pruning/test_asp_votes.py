"""ASP with client votes (issue 28, item 5): the clients vote in the compiled round, the
server decides the next architecture from the tallies, then rebuilds as ASP does."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import build as build_lib
from experiments.configs import asp_tiny
from experiments.methods import asp as asp_driver
from fedjax_prune import data, federated, models
from fedjax_prune.pruning import auto_structured as asp_lib
from fedjax_prune.pruning import client_votes
from tests._checks import overridden
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


@pytest.mark.slow  # ~8 s quiet: three rounds compiled
def test_votes_under_an_aggregator_are_on_the_trained_models():
  """ASP's voting round with an update aggregator (DP clipping, 4-bit top-half compression,
  error feedback: `update_aggregator`) over 2 rounds: the model, and the aggregator's
  state (the clients' residuals), are those of FedAvg with the aggregator in its path
  (up to float rounding: the same client keys), and round 1's tallies are the plain
  voting round's (the clients vote on the models they trained, not on their clipped and
  compressed updates)."""
  train, test_x, test_y = _clients(3)
  agg = federated.compressed(federated.dp_mean(0.0, 0.05, expected_clients=3),
                             federated.Compression(bits=4, topk_fraction=0.5),
                             error_feedback=True, num_clients=3)
  policy = asp_lib.auto_structured(k=0.5, client_votes=asp_lib.ClientVotes())
  params, stats = models.init_params(SPEC, jax.random.key(0))
  schedule = federated.LocalSchedule(batch_size=8)
  method = lambda **kw: asp_lib.asp(
      policy, spec=SPEC, params=params, batch_stats=stats, key=jax.random.key(1),
      model=_model_fns(test_x, test_y), clients_per_round=3, **kw)
  plain_for = lambda a: federated.fedavg(a, optax.sgd(0.5), schedule)
  voting_wrapped = method(fedavg_for=plain_for, update_aggregator=agg).algorithm(SPEC)
  voting_plain = method(fedavg_for=plain_for).algorithm(SPEC)
  apply_fn = _model_fns(test_x, test_y).apply_for(SPEC)
  in_path = federated.fedavg(apply_fn, optax.sgd(0.5), schedule, aggregator=agg)
  cohort = federated.make_cohort([0, 1, 2], multiple=4)  # a padding slot too
  states, tallies = {}, {}
  for name, alg in (("wrapped", voting_wrapped), ("plain", voting_plain), ("in_path", in_path)):
    round_fn = federated.make_round(alg, execution=federated.Sequential())
    state = alg.init(params, jax.random.key(1), batch_stats=stats)
    for r in range(2):
      state, metrics = round_fn(state, train, cohort, jax.random.key(10 + r))
      if r == 0:
        tallies[name] = client_votes.tallies_from_metrics(metrics)
    states[name] = state
  chex.assert_trees_all_close(states["wrapped"].params, states["in_path"].params, atol=1e-6)
  chex.assert_trees_all_close(states["wrapped"].aggregator, states["in_path"].aggregator,
                              atol=1e-6)
  assert jax.tree.leaves(states["wrapped"].aggregator)  # the residuals are in the state
  # the aggregator changed the model: compression and clipping were applied
  assert not np.allclose(np.asarray(states["wrapped"].params["conv_1"]["kernel"]),
                         np.asarray(states["plain"].params["conv_1"]["kernel"]), atol=1e-4)
  assert tallies["wrapped"].keys() == tallies["plain"].keys() == {"conv_0", "conv_1"}
  for g in tallies["plain"]:
    np.testing.assert_array_equal(np.asarray(tallies["wrapped"][g]),
                                  np.asarray(tallies["plain"][g]), err_msg=g)
  with pytest.raises(ValueError, match="update_aggregator is for voting clients"):
    asp_lib.asp(asp_lib.auto_structured(k=0.5), spec=SPEC, params=params, batch_stats=stats,
                key=jax.random.key(1), fedavg_for=plain_for, model=_model_fns(test_x, test_y),
                clients_per_round=3, update_aggregator=agg)


def test_zero_noise_tallies_are_exact_counts():
  votes = {"a": jnp.array([[1, 0, 1], [1, 1, 0]], bool)}
  part = jnp.ones(2, bool)
  exact = client_votes.tally(votes, part)
  np.testing.assert_array_equal(np.asarray(exact["a"]), [2.0, 1.0, 1.0])
  zero = client_votes.tally(votes, part, key=jax.random.key(0), noise_stddev=0.0)
  np.testing.assert_array_equal(np.asarray(zero["a"]), np.asarray(exact["a"]))


def _votes_config(**fields):
  return overridden(asp_tiny.get_config("votes"), **fields)


@pytest.mark.parametrize("fields, named", [
    ({"asp.decision": "clients"}, "asp.decision"),
    ({"asp.vote_threshold": 1.0}, "asp.vote_threshold"),
    ({"asp.vote_threshold": -0.1}, "asp.vote_threshold"),
    ({"asp.vote_threshold": True}, "asp.vote_threshold"),
    ({"asp.vote_noise_multiplier": -1.0}, "asp.vote_noise_multiplier"),
    ({"asp.vote_noise_multiplier": float("nan")}, "asp.vote_noise_multiplier"),
    ({"asp.vote_delta": 0.0}, "asp.vote_delta"),
    ({"asp.vote_delta": 1.0}, "asp.vote_delta"),
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
  fixed = build_lib.vote_epsilons(config, 40, fixed_cohort=True)  # replace-one, ratio 1
  assert fixed == [float(e) for e in federated.fixed_cohort_epsilon_per_round(
      1.5, 40, config.clients_per_round, 4, 1e-5, sensitivity_ratio=1.0)]
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


@pytest.mark.slow  # ~15 s: asp_tiny for 2 rounds, two architectures
def test_votes_run_under_dp_compression_and_attackers(tmp_path):
  """The driver composes client votes with config.privacy, config.compression and a
  data-side attack (asp.decision='client_votes' is no longer refused): every record
  carries the voters' tallies and DP's epsilon, the votes decide the rebuild before
  round 2, and `bytes_up` is the measured compressed upload plus the votes' bits
  (one bit per filter voted on, per client)."""
  import json
  from experiments import train
  from experiments.configs import compress_tiny, dp_tiny, robust_tiny
  c = _votes_config(**{"rounds": 2, "asp.max_pruned_round": 1, "eval_every": 2})
  dp_tiny.add_privacy(c, noise_multiplier=0.5, clip_norm=1.0)
  compress_tiny.add_compression(c, bits=4, topk_fraction=0.5, error_feedback=True)
  robust_tiny.add_robust(c, "mean", "label_flip", 0.25)
  asp_driver.validate(c)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["accepted"] for r in records] == [0, 1]
  for r in records:
    filters = sum(len(v) for k, v in r.items() if k.startswith("votes/"))
    assert r["voters"] == c.clients_per_round and filters > 0
    assert r["vote_bytes_up"] == -(-filters // 8) * c.clients_per_round
    # 4-bit values of half the coordinates: well under the float32 upload
    assert r["vote_bytes_up"] < r["bytes_up"] < 0.2 * r["bytes_up_uncompressed"]
    assert 0 < r["dp_epsilon"] < np.inf
  assert records[1]["params"] < records[0]["params"]
  assert records[1]["bytes_up_uncompressed"] < records[0]["bytes_up_uncompressed"]


@pytest.mark.slow  # ~8 s: 2 asp_tiny rounds
def test_the_l1_filter_keeps_its_private_aggregator_beside_a_votes_block(tmp_path):
  """config.asp.decision='client_votes' only concerns ASP: the L1-filter baseline run from
  the same config keeps DP in its algorithm's path (its records carry DP's clip metrics)
  and has no votes."""
  import json
  from experiments import train
  from experiments.configs import dp_tiny
  c = _votes_config(**{"method": "l1_filter", "rounds": 2, "eval_every": 2,
                       "l1_filter.prune_round": 1})
  dp_tiny.add_privacy(c, noise_multiplier=0.5, clip_norm=1.0)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert all("dp_clip_norm" in r and "voters" not in r for r in records), records[0].keys()

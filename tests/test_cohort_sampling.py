"""Poisson cohort sampling (config.cohort_sampling='poisson'): each client joins independently
with probability q, into a fixed number of slots, so DP-FedAvg's Poisson accountant
(`dp_epsilon`) describes what runs."""
import json
import math

import jax
import numpy as np
import optax
import pytest
import scipy.stats

from experiments import build as build_lib
from experiments.configs import dp_tiny, fedavg_tiny
from fedjax_prune import data, federated, testing
from tests._checks import overridden


def test_poisson_draws_each_client_with_probability_q():
  """Over 4,000 rounds: mean cohort size n q and every client's inclusion frequency q
  (binomial tolerances, 5 sigma), rounds reproducible on their own, ids distinct."""
  n, q, rounds = 60, 0.1, 4000
  counts, sizes = np.zeros(n), []
  for r in range(rounds):
    ids, dropped = data.sample_poisson(n, q, n, seed=3, round_idx=r)
    assert dropped == 0 and len(set(ids.tolist())) == ids.size
    counts[ids] += 1
    sizes.append(ids.size)
  assert abs(np.mean(sizes) - n * q) < 5 * math.sqrt(n * q * (1 - q) / rounds)
  assert np.all(np.abs(counts / rounds - q) < 5 * math.sqrt(q * (1 - q) / rounds))
  assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.15)  # not a fixed size
  again, _ = data.sample_poisson(n, q, n, seed=3, round_idx=17)
  np.testing.assert_array_equal(again, data.sample_poisson(n, q, n, seed=3, round_idx=17)[0])


def test_poisson_caps_the_cohort_and_counts_the_dropped():
  ids, dropped = data.sample_poisson(12, 1.0, 5, seed=0, round_idx=0)  # all 12 drawn
  assert ids.size == 5 and dropped == 7 and np.all(np.diff(ids) > 0) and ids.max() < 12
  for bad, named in (((12, 0.0, 5), "sampling_probability"), ((12, 1.5, 5), "sampling_probability"),
                     ((12, 0.5, 0), "max_cohort"), ((0, 0.5, 5), "num_clients")):
    with pytest.raises(ValueError, match=named):
      data.sample_poisson(*bad, seed=0, round_idx=0)


def test_fixed_size_cohorts_pad_to_the_slots_and_may_be_empty():
  c = federated.make_cohort([4, 1], size=5, multiple=2)
  assert c.client_ids.shape == (6,) and c.active.tolist() == [True, True] + [False] * 4
  empty = federated.make_cohort(np.zeros(0, np.int32), size=3)
  assert empty.client_ids.shape == (3,) and not empty.active.any()
  with pytest.raises(ValueError, match="size must be an integer"):
    federated.make_cohort([1, 2, 3], size=2)
  with pytest.raises(ValueError, match="empty cohort"):
    federated.make_cohort([])


def test_an_empty_round_changes_nothing_but_dp_still_adds_its_noise():
  """A Poisson round that drew nobody: FedAvg's model stays as it was; DP-FedAvg still
  releases noise / m (the release must not depend on whether anyone took part)."""
  apply_fn, params, clients = testing.tiny_problem(jax.random.key(0))
  schedule = federated.LocalSchedule(batch_size=4)
  empty = federated.make_cohort(np.zeros(0, np.int32), size=3)
  for aggregator, moves in ((None, False),
                            (federated.dp_mean(1.0, 1.0, expected_clients=2), True)):
    alg = federated.fedavg(apply_fn, optax.sgd(0.1), schedule, aggregator=aggregator)
    state = alg.init(params, jax.random.key(1))
    new, metrics = federated.make_round(alg)(state, clients, empty, jax.random.key(2))
    changed = any(not np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)))
    assert changed == moves and int(new.round_idx) == 1
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(new.params))


def test_default_slots_leave_a_rare_drop():
  """`build.poisson_slots`: the smallest k with P(Binomial(n, q) > k) < 1e-4 (scipy's
  binomial survival function as the reference), or config.max_cohort."""
  config = fedavg_tiny.get_config()
  config.clients_per_round = 10
  k = build_lib.poisson_slots(config, 300)
  assert scipy.stats.binom.sf(k, 300, 10 / 300) < build_lib.POISSON_TAIL
  assert scipy.stats.binom.sf(k - 1, 300, 10 / 300) >= build_lib.POISSON_TAIL
  config.max_cohort = 25
  assert build_lib.poisson_slots(config, 300) == 25


def _poisson_config(**fields):
  return overridden(fedavg_tiny.get_config(), **{"cohort_sampling": "poisson", **fields})


@pytest.mark.parametrize("fields, named", [
    ({"cohort_sampling": "bernoulli"}, "cohort_sampling"),
    ({"method": "fedtiny"}, "cohort_sampling"),
    ({"max_cohort": 2}, "max_cohort"),  # fewer slots than clients_per_round = 3
])
def test_bad_cohort_sampling_configs_name_the_field(fields, named):
  build_lib.validate(_poisson_config())
  with pytest.raises(build_lib.ConfigError, match=f"config.{named}="):
    build_lib.validate(_poisson_config(**fields))


@pytest.mark.slow  # ~10 s: 12 tiny rounds with DP
def test_poisson_runs_record_the_poisson_accountant_and_the_drops(tmp_path):
  """fedavg_tiny under DP with Poisson cohorts: the cohorts vary in size (records'
  `num_clients`), every record carries the Poisson accountant's epsilon and the drops
  (none: 6 slots for 6 clients), and no fixed-cohort epsilon (it does not apply)."""
  from experiments import train
  config = _poisson_config(**{"max_cohort": 6})
  dp_tiny.add_privacy(config, noise_multiplier=1.0, clip_norm=1.0)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  want = federated.epsilon_per_round(1.0, 3 / 6, config.rounds, config.privacy.delta)
  assert [r["dp_epsilon"] for r in records] == [float(e) for e in want]
  assert all(r["cohort_dropped"] == 0 and "dp_epsilon_fixed_cohort" not in r for r in records)
  env_draws = [data.sample_poisson(6, 0.5, 6, seed=config.seeds.sampling, round_idx=r)[0].size
               for r in range(config.rounds)]
  assert [r["num_clients"] for r in records] == env_draws
  assert len(set(env_draws)) > 1

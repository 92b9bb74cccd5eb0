"""DP-FedAvg and compressed updates as aggregators (issue 28): `federated.dp_mean` and
`federated.compressed` inside the round (FedAvg's and masked FedAvg's paths), against direct
computations; the experiment records (`dp_epsilon`, `bytes_up`), resume, config validation."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import build, train
from experiments.configs import compress_tiny, dp_tiny, fedavg_tiny, robust_tiny
from fedjax_prune import checkpoint, federated, testing
from fedjax_prune.pruning import base
from tests import _checks
from tests._checks import topk_half
from tests.federated.test_attacks import _family_configs  # one method of each family
from tests.federated.test_robust import random_stack

SCHEDULE = federated.LocalSchedule(batch_size=4, num_epochs=1)


def _rounds(alg, params, data, ids, *, rounds=2, masks=None, multiple=1):
  state = alg.init(params, jax.random.key(1)) if masks is None else alg.init(
      params, jax.random.key(1), masks=masks)
  round_fn = federated.make_round(alg)
  cohort = federated.make_cohort(ids, multiple=multiple)
  for r in range(rounds):
    state, metrics = round_fn(state, data, cohort, federated.round_key(jax.random.key(7), r))
  return state, metrics


def _run(agg, state, updates, weights, present, active, ids, key):
  """One round of an aggregator as the engine runs it: contribute per client (vmapped), sum
  the real clients' sums, stack per_client, finish. Returns (mean, state, metrics)."""
  num = len(weights)
  info = federated.ClientInfo(jnp.asarray(ids, jnp.int32), jnp.ones(num, jnp.int32),
                              jnp.asarray(active), jnp.ones(num, jnp.float32))
  keys = jax.random.split(key, num)
  w = jnp.asarray(weights, jnp.float32)
  if present is None:
    out = jax.vmap(lambda u, w, i, k: agg.contribute(state, u, w, None, i, k))(updates, w, info, keys)
  else:
    out = jax.vmap(lambda u, w, p, i, k: agg.contribute(state, u, w, p, i, k))(
        updates, w, present, info, keys)
  act = jnp.asarray(active)
  sums = jax.tree.map(lambda x: jnp.sum(jnp.where(act.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0),
                                        axis=0), out.sums)
  return agg.finish(state, federated.Contribution(sums, out.per_client), None, key)


def _participants(weights, active):
  return np.asarray(active) & (np.asarray(weights) > 0)


def _clipped_numpy(updates, present, clip, part):
  """Each client's update over its held coordinates, clipped to L2 norm `clip` (numpy)."""
  out, norms = {}, []
  held = {k: (np.ones_like(v, bool) if present is None else
              np.broadcast_to(np.asarray(present[k]).reshape(
                  present[k].shape + (1,) * (v.ndim - present[k].ndim)), v.shape))
          for k, v in updates.items()}
  for i in range(len(part)):
    norms.append(np.sqrt(sum(np.sum(np.where(held[k][i], v[i], 0.0) ** 2)
                             for k, v in updates.items())))
  norms = np.asarray(norms)
  factor = np.minimum(1.0, clip / np.maximum(norms, 1e-30)) * part
  for k, v in updates.items():
    out[k] = np.where(held[k], v, 0.0) * factor.reshape((-1,) + (1,) * (v.ndim - 1))
  return out, norms, held


# ----------------------------------------------------------------------------- DP


def test_dp_round_without_noise_and_clipping_equals_uniform_fedavg():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  plain, _ = _rounds(federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, uniform_weights=True),
                     params, data, [0, 1, 2])
  # m = 3 real clients; a padding client (4th slot) must contribute exactly nothing.
  dp = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE,
                        aggregator=federated.dp_mean(0.0, 1e9, expected_clients=3))
  state, metrics = _rounds(dp, params, data, [0, 1, 2], multiple=4)
  testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)
  assert float(metrics["dp_clipped_fraction"]) == 0.0 and float(metrics["dp_clip_norm"]) == 1e9


def test_dp_mean_equals_the_direct_computation_with_a_fixed_key():
  updates, weights, present, active = random_stack(0)
  z, clip, m = 0.7, 1.5, 4.0
  agg = federated.dp_mean(z, clip, expected_clients=m)
  key = jax.random.key(5)
  got, _, metrics = _run(agg, (), updates, weights, present, active, np.arange(6), key)
  part = _participants(weights, active)
  clipped, norms, held = _clipped_numpy(updates, present, clip, part)
  # Noise goes where some real client holds the coordinate (the server's mask in the
  # algorithms), drawn as finish_dp_mean draws it: the first half of the split key.
  released = {k: np.any(h & np.asarray(active).reshape((-1,) + (1,) * (h.ndim - 1)), axis=0)
              for k, h in held.items()}
  noise = federated.add_gaussian_noise(jax.tree.map(jnp.zeros_like, {k: v[0] for k, v in
                                                                     updates.items()}),
                                       jax.random.split(key)[0], z * clip, released)
  for k in updates:
    want = (clipped[k].sum(0) + np.asarray(noise[k])) / m
    np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got[k])[~released[k]] == 0.0)  # no noise off the released set
    assert np.all(np.asarray(noise[k])[released[k]] != 0.0)
  assert float(metrics["dp_clipped_fraction"]) == pytest.approx(np.mean(norms[part] > clip))


@pytest.mark.slow  # the fixed-key test above checks the same noise against a direct computation
def test_dp_noise_has_the_configured_std():
  updates, weights, _, active = random_stack(1, masked=False)
  z, clip, m = 0.5, 2.0, 4.0
  agg = federated.dp_mean(z, clip, expected_clients=m)
  exact, _, _ = _run(agg._replace(finish=federated.dp_mean(0.0, clip, m).finish), (), updates,
                     weights, None, active, np.arange(6), jax.random.key(0))
  draws = jax.vmap(lambda k: _run(agg, (), updates, weights, None, active, np.arange(6), k)[0])(
      jax.random.split(jax.random.key(1), 400))
  noise = np.concatenate([np.asarray((draws[k] - exact[k][None]) * m).reshape(-1)
                          for k in updates])  # 400 x 17 draws of N(0, (z C)^2)
  assert abs(noise.mean()) < 0.05 and np.std(noise) == pytest.approx(z * clip, rel=0.03)


def test_with_masks_no_noise_lands_outside_the_servers_mask():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  kernel = params["dense_0"]["kernel"]
  masks = federated.dense_masks(params)
  masks["dense_0"]["kernel"] = jnp.arange(kernel.size).reshape(kernel.shape) % 3 == 0
  # Server momentum: noise off the mask would show in the optimizer's trace.
  alg = federated.fedavgm(apply_fn, optax.sgd(0.1), SCHEDULE,
                          aggregator=federated.dp_mean(5.0, 1.0, expected_clients=3))
  state, _ = _rounds(alg, params, data, [0, 1, 2], masks=masks, multiple=4)
  trace = state.opt_state[0].trace["dense_0"]["kernel"]
  off = ~np.asarray(masks["dense_0"]["kernel"])
  assert np.all(np.asarray(trace)[off] == 0.0) and np.all(np.asarray(trace)[~off] != 0.0)
  # noise_on_present=False: noise everywhere (for private masks), the mask still applied.
  alg = federated.fedavgm(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=federated.dp_mean(
      5.0, 1.0, expected_clients=3, noise_on_present=False))
  state, _ = _rounds(alg, params, data, [0, 1, 2], masks=masks)
  assert np.all(np.asarray(state.opt_state[0].trace["dense_0"]["kernel"])[off] != 0.0)
  assert np.all(np.asarray(state.params["dense_0"]["kernel"])[off] == 0.0)


def test_adaptive_clip_norm_follows_update_clip_norm():
  updates, weights, present, active = random_stack(2)
  kwargs = dict(target_quantile=0.3, clip_learning_rate=0.5, count_stddev=0.8)
  agg = federated.dp_mean(1.0, 2.0, expected_clients=4, **kwargs)
  state = agg.init(updates)
  key = jax.random.key(9)
  for _ in range(2):
    _, new, metrics = _run(agg, state, updates, weights, present, active, np.arange(6), key)
    part = _participants(weights, active)
    _, norms, _ = _clipped_numpy(updates, present, float(state.clip_norm), part)
    below = np.sum(np.where(part, 0.5 - (norms > float(state.clip_norm)), 0.0))
    want = federated.update_clip_norm(state, below, jax.random.split(key)[1],
                                      expected_clients=4, **kwargs)
    assert float(new.clip_norm) == float(want.clip_norm) != float(state.clip_norm)
    assert float(metrics["dp_clip_norm"]) == float(state.clip_norm)
    state, key = new, jax.random.fold_in(key, 1)


def test_adaptive_dp_state_lives_in_the_server_state_of_fedavg_and_masked_fedavg():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  agg = federated.dp_mean(0.5, 0.05, expected_clients=3, target_quantile=0.9, count_stddev=0.5)
  for alg in (federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=agg),
              base.masked_fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, base.no_prune(),
                                 aggregator=agg)):
    state, metrics = _rounds(alg, params, data, [0, 1, 2], rounds=1)
    assert isinstance(state.aggregator, federated.ClipState)
    # Every update is clipped at 0.05 (b = 0 up to count noise): C grows towards the quantile.
    assert float(metrics["dp_clipped_fraction"]) == 1.0
    assert float(state.aggregator.clip_norm) > 0.05


def test_masked_fedavg_with_the_mean_as_aggregator_equals_its_own_mean():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  plain, _ = _rounds(base.masked_fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, base.no_prune()),
                     params, data, [0, 1, 2])
  alg = base.masked_fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, base.no_prune(),
                           aggregator=federated.mean())
  state, _ = _rounds(alg, params, data, [0, 1, 2])
  testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- compression


def test_compression_at_32_bits_sending_everything_equals_the_plain_round():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  plain, _ = _rounds(federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE), params, data, [0, 1, 2])
  agg = federated.compressed(federated.mean(), federated.Compression(bits=32, topk_fraction=1.0),
                             num_clients=3)
  state, metrics = _rounds(federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, aggregator=agg),
                           params, data, [0, 1, 2], multiple=4)
  testing.assert_trees_close(state.params, plain.params, rtol=1e-5, atol=1e-6)
  assert max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(state.aggregator.residual)) < 1e-6
  per_client = federated.bytes_up(params, True, federated.Compression(bits=32, topk_fraction=1.0))
  assert float(metrics["bytes_up"]) == 3 * int(per_client)  # the padding client sent nothing


def test_error_feedback_memory_after_two_rounds_equals_the_hand_computed_residual():
  updates, weights, present, active = random_stack(3)
  weights[-1] = 4.0  # every real client sends (slot 4 stays padding)
  config = federated.Compression(topk_fraction=0.5)  # deterministic: top half by |x|
  agg = federated.compressed(federated.mean(), config, num_clients=8)
  state = agg.init({k: v[0] for k, v in updates.items()})
  ids1 = np.array([0, 1, 2, 3, 0, 5])       # slot 4 pads with a real client's id (0)
  ids2 = np.array([5, 7, 2, 6, 5, 0])       # round 2: clients 1 and 3 sit out
  want = {k: np.zeros((8,) + v.shape[1:], np.float32) for k, v in updates.items()}

  for ids, key in ((ids1, jax.random.key(1)), (ids2, jax.random.key(2))):
    _, state, metrics = _run(agg, state, updates, weights, present, active, ids, key)
    expected_bytes = 0
    for i, cid in enumerate(ids):
      if not active[i]:
        continue
      held = {k: np.broadcast_to(np.asarray(present[k][i]), v.shape[1:]) for k, v in updates.items()}
      for k, v in updates.items():
        corrected = v[i] + want[k][cid]
        want[k][cid] = corrected - topk_half(corrected, held[k])
      expected_bytes += int(federated.bytes_up({k: v[i] for k, v in updates.items()},
                                               {k: p[i] for k, p in present.items()}, config))
    for k in updates:
      np.testing.assert_allclose(np.asarray(state.residual[k]), want[k], rtol=1e-6, atol=1e-6)
    assert float(metrics["bytes_up"]) == expected_bytes
  assert np.all(want["a"][4] == 0) and np.any(want["a"][1] != 0)  # never sampled / sat out


def test_quantised_feedback_keeps_what_was_sent_plus_memory_equal_to_the_updates():
  updates, weights, present, active = random_stack(4, masked=False)
  agg = federated.compressed(federated.mean(), federated.Compression(bits=2), num_clients=6)
  state = agg.init({k: v[0] for k, v in updates.items()})
  mean, state, _ = _run(agg, state, updates, weights, None, active, np.arange(6), jax.random.key(0))
  part = _participants(weights, active)
  w = np.where(part, weights, 0.0)
  for k, v in updates.items():
    # sum_k w_k sent_k = sum_k w_k (u_k - e_k'): error feedback loses nothing.
    sent_total = np.asarray(mean[k]) * w.sum()
    want = np.tensordot(w, v - np.asarray(state.residual[k]), axes=1)
    np.testing.assert_allclose(sent_total, want, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(state.residual[k])[~part] == 0.0)  # non-senders never write


def test_compression_composes_with_dp_and_with_robust_aggregators():
  updates, weights, present, active = random_stack(5)
  # Sending every held value unquantised: the robust statistic is unchanged.
  median = federated.coordinate_median()
  want, _, _ = _run(median, (), updates, weights, present, active, np.arange(6), jax.random.key(0))
  wrapped = federated.compressed(median, federated.Compression(), error_feedback=False)
  got, _, _ = _run(wrapped, wrapped.init(updates), updates, weights, present, active, np.arange(6),
                   jax.random.key(0))
  testing.assert_trees_close(got, want, rtol=0, atol=0)
  # Compress, then clip: each client's clipped compressed update is what DP sums.
  dp = federated.dp_mean(0.0, 0.5, expected_clients=4)
  both = federated.compressed(dp, federated.Compression(topk_fraction=0.5), error_feedback=False)
  got, _, _ = _run(both, both.init(updates), updates, weights, present, active, np.arange(6),
                   jax.random.key(0))
  sent = jax.vmap(lambda u, p: federated.compress(u, p, jax.random.key(0),
                                                  federated.Compression(topk_fraction=0.5)))(
      updates, present)
  part = _participants(weights, active)
  clipped, _, _ = _clipped_numpy(jax.tree.map(np.asarray, sent), present, 0.5, part)
  for k in updates:
    np.testing.assert_allclose(np.asarray(got[k]), clipped[k].sum(0) / 4, rtol=1e-5, atol=1e-7)


def test_library_arguments_are_checked():
  with pytest.raises(ValueError, match="noise_multiplier"):
    federated.dp_mean(-1.0, 1.0, expected_clients=3)
  with pytest.raises(ValueError, match="count_stddev"):
    federated.dp_mean(1.0, 1.0, expected_clients=3, target_quantile=0.5, count_stddev=0.1)
  with pytest.raises(ValueError, match="num_clients"):
    federated.compressed(federated.mean(), federated.Compression(bits=4))
  with pytest.raises(ValueError, match="bits"):
    federated.compressed(federated.mean(), federated.Compression(bits=0), error_feedback=False)


# ----------------------------------------------------------------------------- experiments

ROUNDS = 4


def _dp_config():
  c = dp_tiny.get_config("adaptive,compressed")
  c.rounds, c.checkpoint_every, c.checkpoint_keep, c.eval_every = ROUNDS, 1, ROUNDS, 2
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in f]


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dp_compress") / "run")
  train.train_and_evaluate(_dp_config(), workdir)
  return workdir


def test_records_carry_the_accountants_epsilon_and_the_bytes_sent(dp_run):
  config = _dp_config()
  records = _records(dp_run)
  num_clients = config.data.num_clients
  want = federated.epsilon_per_round(config.privacy.noise_multiplier,
                                     config.clients_per_round / num_clients, ROUNDS,
                                     config.privacy.delta)
  assert [r["dp_epsilon"] for r in records] == [float(e) for e in want]
  assert want[0] < want[-1] < np.inf
  # and for the fixed-size cohorts the loop draws: replace-one, sensitivity 2C
  fixed = federated.fixed_cohort_epsilon_per_round(
      config.privacy.noise_multiplier, num_clients, config.clients_per_round, ROUNDS,
      config.privacy.delta, sensitivity_ratio=2.0)
  assert [r["dp_epsilon_fixed_cohort"] for r in records] == [float(e) for e in fixed]
  # Dense model, every sampled client has examples: clients_per_round x one client's count.
  spec_params = checkpoint.read_arrays(os.path.join(dp_run, train.CHECKPOINT_DIR))[1]
  params = {k: v for k, v in spec_params.items() if k.startswith(".params")}
  per_client = int(federated.bytes_up(params, True, build.build_compression(config)))
  assert [r["bytes_up"] for r in records] == [3.0 * per_client] * ROUNDS
  assert all(r["bytes_up_uncompressed"] > r["bytes_up"] for r in records)
  clip = [r["dp_clip_norm"] for r in records]
  assert clip[0] == config.privacy.clip_norm and len(set(clip)) > 1  # adaptive


@pytest.mark.slow
def test_resume_of_a_dp_and_compression_run_is_bit_identical(tmp_path, dp_run):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(dp_run, workdir)
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  for step in range(3, ROUNDS + 1):
    shutil.rmtree(os.path.join(ckpt_dir, f"step_{step:08d}"))
  os.remove(os.path.join(workdir, "summary.json"))
  train.train_and_evaluate(_dp_config(), workdir, resume=True)
  assert _records(workdir) == _records(dp_run)
  _, arrays, _ = checkpoint.read_arrays(ckpt_dir)
  _, ref_arrays, _ = checkpoint.read_arrays(os.path.join(dp_run, train.CHECKPOINT_DIR))
  assert arrays.keys() == ref_arrays.keys()
  assert any("aggregator" in k and "residual" in k for k in arrays)  # EF memory checkpointed
  assert any("clip_norm" in k for k in arrays)
  for k in arrays:
    assert arrays[k].tobytes() == ref_arrays[k].tobytes(), f"{k} differs after resume"


def _hetero_config():
  from tests import test_method_contract as contract
  return contract.hetero_config("fiarse")


@pytest.mark.parametrize("make,field,value,match", [
    ("dp", "privacy.noise_multiplier", -0.5, "privacy.noise_multiplier"),
    ("dp", "privacy.clip_norm", 0.0, "privacy.clip_norm"),
    ("dp", "privacy.delta", 1.0, "privacy.delta"),
    ("dp", "privacy.adaptive", "yes", "privacy.adaptive"),
    ("dp_adaptive", "privacy.target_quantile", 1.5, "privacy.target_quantile"),
    ("dp_adaptive", "privacy.count_stddev", 0.1, "privacy.count_stddev"),  # < z / 2
    ("compress", "compression.bits", 0, "compression.bits"),
    ("compress", "compression.bits", 33, "compression.bits"),
    ("compress", "compression.topk_fraction", 0.0, "compression.topk_fraction"),
    ("compress", "compression.error_feedback", 1, "compression.error_feedback"),
    ("dp_median", "robust.aggregator", "median", "robust.aggregator"),
    # The expected-count denominator needs public submodels: not FIARSE's (the stateful
    # options run with every family: test_stateful_dp_and_compression_validate_for_every_family).
    ("hetero_denominator", "privacy.denominator", "expected_counts",
     "privacy.denominator='expected_counts' is invalid with method 'fiarse'"),
    ("dp", "privacy.denominator", "per_client", "privacy.denominator"),
])
def test_bad_configs_name_the_field(make, field, value, match):
  if make.startswith("hetero"):
    config = _hetero_config()
    dp_tiny.add_privacy(config, adaptive=False)
    compress_tiny.add_compression(config, error_feedback=False)
    config.privacy.count_stddev = 1.0
  elif make == "compress":
    config = compress_tiny.get_config()
  else:
    config = dp_tiny.get_config("adaptive" if make == "dp_adaptive" else "fixed")
    config.privacy.noise_multiplier = 1.0
    if make == "dp_median":
      robust_tiny.add_robust(config, "mean")
  block, name = field.split(".")
  config[block] = ml_collections.ConfigDict({**config[block].to_dict(), name: value})
  with pytest.raises(build.ConfigError, match=match):
    build.validate(config)


def test_stateless_dp_and_compression_validate_for_every_family():
  from tests import test_method_contract as contract
  for config in (contract.sparse_config("fedtiny"), contract.hetero_config("fiarse"),
                 contract.cavp_config("federated"), fedavg_tiny.get_config()):
    dp_tiny.add_privacy(config)
    compress_tiny.add_compression(config, error_feedback=False)
    build.validate(config)  # accepted
    assert build.aggregation_active(config), config.method


def test_stateful_dp_and_compression_validate_for_every_family():
  """Adaptive clipping and error feedback, together or alone, once refused outside the
  FedAvg and sparse families, validate with FIARSE, HeteroFL and CAVP (their runs:
  test_every_family_runs_with_dp_and_compression; tests/federated/test_stateful_submodel.py)."""
  from tests import test_method_contract as contract
  for make in (lambda: contract.hetero_config("fiarse"), lambda: contract.hetero_config("heterofl"),
               lambda: contract.cavp_config("federated")):
    for adaptive, error_feedback in ((True, True), (True, False), (False, True)):
      config = make()
      dp_tiny.add_privacy(config, adaptive=adaptive)
      config.privacy.count_stddev = 1.0
      compress_tiny.add_compression(config, error_feedback=error_feedback)
      _checks.assert_builds_stateful_aggregator(config, adaptive=adaptive,
                                                error_feedback=error_feedback)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(_family_configs()))
def test_every_family_runs_with_dp_and_compression(family, tmp_path):
  config = _family_configs()[family]()
  # Every family takes the stateful options (adaptive clipping, error feedback): the
  # aggregator's state lives in its server state (CAVP's residuals sliced at its rebuilds).
  stateful = True
  dp_tiny.add_privacy(config, noise_multiplier=1.0, clip_norm=1.0, adaptive=stateful)
  config.privacy.count_stddev = 1.0
  compress_tiny.add_compression(config, bits=8, topk_fraction=0.5, error_feedback=stateful)
  config.rounds, config.checkpoint_every = 2, 0
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(summary["test_accuracy"])
  records = _records(str(tmp_path / "run"))
  assert len(records) == 2 and all(r["bytes_up"] > 0 and r["dp_epsilon"] > 0 for r in records)
  clip = [r["dp_clip_norm"] for r in records]
  # Fixed clipping keeps C; adaptive clipping moves it, unless ASP rebuilt the model before
  # round 2 (a new FedAvg server state for the new shapes: C starts over, as the optimizer).
  moved = stateful and not records[1].get("accepted", 0)
  assert clip[0] == 1.0 and (clip[1] != 1.0 if moved else clip[1] == 1.0)

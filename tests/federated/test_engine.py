"""Engine contract: strategies agree, equal a per-client loop, padding and order are irrelevant."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import federated, performance, testing
from fedjax_prune.federated import _local
from fedjax_prune.data import ClientData, client_slice, from_client_lists, to_device

SCHEDULE = federated.LocalSchedule(batch_size=4, num_epochs=2)
EXECUTIONS = [federated.Sequential(), federated.Vmap(), federated.Chunked(2), federated.Chunked(3)]


def _problem():
  apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
  return apply_fn, params, data


def _run(alg, params, data, cohort_ids, execution, rounds=2, mesh=None, seed=7,
         compiler_options=None):
  state = alg.init(params, jax.random.key(1))
  round_fn = federated.make_round(alg, execution=execution, mesh=mesh,
                                  compiler_options=compiler_options)
  cohort = federated.make_cohort(cohort_ids)
  metrics = None
  for r in range(rounds):
    state, metrics = round_fn(state, data, cohort, federated.round_key(jax.random.key(seed), r))
  return state, metrics


def _sharded_sequential_round():
  """(alg, params, data, round_fn) of FedAvg sharded over 4 devices; skips with fewer."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  round_fn = federated.make_round(alg, execution=federated.Sequential(),
                                  mesh=federated.client_mesh(jax.devices()[:4]))
  return alg, params, data, round_fn


def _loop_reference(apply_fn, params, data, cohort_ids, rounds=2, seed=7, lr=0.1, uniform=False):
  """FedAvg as a plain Python loop over clients of the jitted local trainer (uniform: each
  client with examples weighs 1, as `fedavg(uniform_weights=True)`)."""
  local_train = jax.jit(federated.make_local_train(apply_fn, optax.sgd(lr), SCHEDULE))
  for r in range(rounds):
    client_root, _ = federated.split_round_key(federated.round_key(jax.random.key(seed), r))
    models, weights = [], []
    for cid in cohort_ids:
      local, _ = local_train(params, {}, client_slice(data, cid), jax.random.fold_in(client_root, cid))
      models.append(local.params)
      n = float(data.num_examples[cid])
      weights.append(float(n > 0) if uniform else n)
    w = np.asarray(weights) / np.sum(weights)
    params = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *models)
  return params


@pytest.mark.parametrize("execution", EXECUTIONS, ids=str)
def test_round_equals_python_loop_over_clients(execution):
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  state, _ = _run(alg, params, data, [0, 1, 2], execution)
  expected = _loop_reference(apply_fn, params, data, [0, 1, 2])
  testing.assert_trees_close(state.params, expected, rtol=1e-5, atol=1e-6)


def test_uniform_weights_average_the_clients_with_examples_equally():
  apply_fn, params, data = _problem()  # clients of 5, 9 and 3 examples
  empty = data._replace(num_examples=data.num_examples.at[1].set(0))
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, uniform_weights=True)
  state, _ = _run(alg, params, data, [0, 1, 2], federated.Sequential())
  testing.assert_trees_close(state.params, _loop_reference(apply_fn, params, data, [0, 1, 2],
                                                           uniform=True), rtol=1e-5, atol=1e-6)
  # Not the example-weighted mean (a wrong weighting fails here).
  weighted = _loop_reference(apply_fn, params, data, [0, 1, 2])
  assert not np.allclose(state.params["dense_0"]["kernel"], weighted["dense_0"]["kernel"], atol=1e-5)
  # A client without examples does not pull the mean toward the server model.
  with_empty, _ = _run(alg, params, empty, [0, 1, 2], federated.Sequential())
  without, _ = _run(alg, params, empty, [0, 2], federated.Sequential())
  testing.assert_trees_close(with_empty.params, without.params, rtol=1e-6, atol=1e-7)


def test_strategies_agree_on_metrics():
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  results = [_run(alg, params, data, [2, 0, 1], ex) for ex in EXECUTIONS]
  for state, metrics in results[1:]:
    testing.assert_trees_close(state.params, results[0][0].params)
    for k in metrics:
      np.testing.assert_allclose(metrics[k], results[0][1][k], rtol=1e-5)


def test_sharded_round_equals_unsharded():
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  mesh = federated.client_mesh(jax.devices()[:4])
  reference, ref_metrics = _run(alg, params, data, [0, 1, 2], federated.Sequential())
  for execution in [federated.Sequential(), federated.Vmap(), federated.Chunked(2)]:
    state, metrics = _run(alg, params, data, [0, 1, 2], execution, mesh=mesh)
    testing.assert_trees_close(state.params, reference.params)
    np.testing.assert_allclose(metrics["train_loss"], ref_metrics["train_loss"], rtol=1e-5)
    assert float(metrics["num_clients"]) == 3.0


def test_sharded_round_compiles_once_across_rounds():
  alg, params, data, round_fn = _sharded_sequential_round()
  state = alg.init(params, jax.random.key(1))  # single-device state, as after init
  for r in range(3):
    state, _ = round_fn(state, data, federated.make_cohort([0, 1, 2]), jax.random.key(r))
  assert round_fn._cache_size() == 1  # round 1's placement matches later rounds'


def test_padding_clients_and_padding_examples_change_nothing():
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  reference, ref_metrics = _run(alg, params, data, [0, 1, 2], federated.Sequential())
  # Pad the example axis from 9 to 23 (more padded steps per epoch) ...
  xs = [np.asarray(data.x[k, :n]) for k, n in enumerate(np.asarray(data.num_examples))]
  ys = [np.asarray(data.y[k, :n]) for k, n in enumerate(np.asarray(data.num_examples))]
  padded = to_device(from_client_lists(xs, ys, pad_to=23))
  # ... and the cohort with 3 inactive clients.
  state = alg.init(params, jax.random.key(1))
  round_fn = federated.make_round(alg, execution=federated.Vmap())
  cohort = federated.make_cohort([0, 1, 2], multiple=6)
  assert cohort.active.tolist() == [True] * 3 + [False] * 3
  for r in range(2):
    state, metrics = round_fn(state, padded, cohort, federated.round_key(jax.random.key(7), r))
  testing.assert_trees_close(state.params, reference.params)
  np.testing.assert_allclose(metrics["train_examples"], ref_metrics["train_examples"])
  assert float(metrics["num_clients"]) == 3.0


def test_same_key_identical_other_key_differs_order_irrelevant():
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  a, _ = _run(alg, params, data, [0, 1, 2], federated.Sequential())
  b, _ = _run(alg, params, data, [0, 1, 2], federated.Sequential())
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  c, _ = _run(alg, params, data, [2, 0, 1], federated.Sequential())
  testing.assert_trees_close(c.params, a.params, rtol=1e-6, atol=1e-7)
  d, _ = _run(alg, params, data, [0, 1, 2], federated.Sequential(), seed=8)
  assert not np.allclose(d.params["dense_0"]["kernel"], a.params["dense_0"]["kernel"])


def test_second_round_does_not_recompile():
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  round_fn = federated.make_round(alg, execution=federated.Vmap())
  state = alg.init(params, jax.random.key(1))
  cohort = federated.make_cohort([0, 1, 2])
  state, _ = round_fn(state, data, cohort, jax.random.key(0))
  assert round_fn._cache_size() == 1
  for r in range(1, 4):
    cohort = federated.make_cohort(np.random.default_rng(r).permutation(3))
    state, _ = round_fn(state, data, cohort, jax.random.key(r))
  assert round_fn._cache_size() == 1


def test_fedavg_one_step_golden():
  """Hand-computable: linear model, one full-batch SGD step per client, FedAvg."""
  def apply_fn(params, batch_stats, x, *, train, example_mask=None):
    return x @ params["w"], batch_stats

  def sq_loss(pred, y):
    return 0.5 * jnp.sum((pred - y) ** 2, axis=-1)

  x0 = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32); y0 = np.array([[1.0], [1.0]], np.float32)
  x1 = np.array([[1.0, 1.0]], np.float32); y1 = np.array([[3.0]], np.float32)
  data = to_device(from_client_lists([x0, x1], [y0, y1]))
  w = np.array([[0.5], [0.5]], np.float32)
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=2),
                         loss_fn=sq_loss, report_update_norm=True)
  state = alg.init({"w": jnp.asarray(w)}, jax.random.key(0))
  state, metrics = federated.make_round(alg)(state, data, federated.make_cohort([0, 1]),
                                             jax.random.key(1))
  # Client 0: grad = mean_i x_i (x_i.w - y_i) = [[-0.25], [0.0]]; client 1: [[-2.0], [-2.0]].
  w0 = w - 0.1 * np.array([[-0.25], [0.0]]); w1 = w - 0.1 * np.array([[-2.0], [-2.0]])
  expected = (2 * w0 + 1 * w1) / 3
  np.testing.assert_allclose(state.params["w"], expected, rtol=1e-6)
  # The reported update norm is |w - mean_k w_k| (FedAvg: the server step itself).
  np.testing.assert_allclose(metrics["update_norm"], np.linalg.norm(w - expected), rtol=1e-5)
  assert bool(metrics["finite"])
  # Off by default (one more read of the model per round); nothing else changes.
  plain = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=2),
                           loss_fn=sq_loss)
  plain_state, plain_metrics = federated.make_round(plain)(
      plain.init({"w": jnp.asarray(w)}, jax.random.key(0)), data, federated.make_cohort([0, 1]),
      jax.random.key(1))
  assert "update_norm" not in plain_metrics
  np.testing.assert_array_equal(plain_state.params["w"], state.params["w"])


def test_round_reports_a_diverged_model_as_not_finite():
  """A client update that overflows to inf (and then NaN) must show in `finite`."""
  apply_fn, params, data = _problem()
  for lr in (1e3, 1e30):
    alg = federated.fedavg(apply_fn, optax.sgd(lr), SCHEDULE)
    state, metrics = federated.make_round(alg)(alg.init(params, jax.random.key(0)), data,
                                               federated.make_cohort([0, 1, 2]), jax.random.key(1))
    leaves_finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
    assert bool(metrics["finite"]) == (leaves_finite and bool(np.isfinite(metrics["train_loss"])))
  assert not bool(metrics["finite"])  # lr 1e30 diverges


def test_server_optimizers_apply_optax_to_the_pseudo_gradient():
  apply_fn, params, data = _problem()
  base = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  adam = federated.fedadam(apply_fn, optax.sgd(0.1), SCHEDULE, server_learning_rate=0.05)
  s_base, _ = _run(base, params, data, [0, 1, 2], federated.Sequential(), rounds=1)
  s_adam, _ = _run(adam, params, data, [0, 1, 2], federated.Sequential(), rounds=1)
  pseudo_grad = jax.tree.map(jnp.subtract, params, s_base.params)  # FedAvg lr 1: w - mean
  opt = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
  updates, _ = opt.update(pseudo_grad, opt.init(params), params)
  testing.assert_trees_close(s_adam.params, optax.apply_updates(params, updates), rtol=1e-4, atol=1e-6)
  # FedAvgM's first round equals FedAvg with the server lr.
  avgm = federated.fedavgm(apply_fn, optax.sgd(0.1), SCHEDULE, server_learning_rate=0.5)
  s_m, _ = _run(avgm, params, data, [0, 1, 2], federated.Sequential(), rounds=1)
  testing.assert_trees_close(s_m.params, jax.tree.map(lambda p, g: p - 0.5 * g, params, pseudo_grad))


def test_fedprox_zero_mu_is_fedavg_and_positive_mu_pulls_towards_server():
  apply_fn, params, data = _problem()
  a, _ = _run(federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE), params, data, [0, 1, 2],
              federated.Sequential(), rounds=1)
  b, _ = _run(federated.fedprox(apply_fn, optax.sgd(0.1), SCHEDULE, mu=0.0), params, data, [0, 1, 2],
              federated.Sequential(), rounds=1)
  testing.assert_trees_close(a.params, b.params)
  c, _ = _run(federated.fedprox(apply_fn, optax.sgd(0.1), SCHEDULE, mu=5.0), params, data, [0, 1, 2],
              federated.Sequential(), rounds=1)
  dist = lambda s: float(jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in
                                      zip(jax.tree.leaves(s.params), jax.tree.leaves(params)))))
  assert dist(c) < 0.8 * dist(a)


def test_masked_training_keeps_pruned_weights_zero():
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.adam(0.05), SCHEDULE)
  rng = np.random.default_rng(0)
  masks = {"dense_0": {"kernel": jnp.asarray(rng.random((6, 8)) < 0.5), "bias": jnp.ones((), bool)},
           "dense_1": {"kernel": jnp.asarray(rng.random((1, 3)) < 0.7), "bias": jnp.ones((), bool)}}
  state = alg.init(params, jax.random.key(1), masks=masks)
  round_fn = federated.make_round(alg, execution=federated.Vmap())
  for r in range(3):
    state, _ = round_fn(state, data, federated.make_cohort([0, 1, 2]), jax.random.key(r))
  k0 = np.asarray(state.params["dense_0"]["kernel"])
  assert np.all(k0[~np.asarray(masks["dense_0"]["kernel"])] == 0.0)
  assert np.all(k0[np.asarray(masks["dense_0"]["kernel"])] != 0.0)
  k1 = np.asarray(state.params["dense_1"]["kernel"])
  assert np.all(k1[:, ~np.asarray(masks["dense_1"]["kernel"])[0]] == 0.0)


def test_dense_training_without_masks_equals_all_true_masks():
  # `init` without masks keeps none (no masking pass); all-True masks must give the same rounds.
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  unmasked = alg.init(params, jax.random.key(1))
  assert unmasked.masks is None
  all_true = alg.init(params, jax.random.key(1), masks=federated.dense_masks(params))
  round_fn = federated.make_round(alg, execution=federated.Sequential())
  cohort = federated.make_cohort([0, 1, 2])
  for r in range(2):
    unmasked, metrics_a = round_fn(unmasked, data, cohort, jax.random.key(r))
    all_true, metrics_b = round_fn(all_true, data, cohort, jax.random.key(r))
  testing.assert_trees_close(unmasked.params, all_true.params, rtol=0, atol=0)
  for k in metrics_a:
    np.testing.assert_array_equal(metrics_a[k], metrics_b[k])


@pytest.mark.parametrize("num_steps", [None, 5])
def test_batches_visit_each_real_example_once_per_epoch(num_steps):
  schedule = federated.LocalSchedule(batch_size=4, num_epochs=3, num_steps=num_steps)
  n, max_e = 7, 12
  key = jax.random.key(3)
  total = schedule.total_steps(max_e)
  seen = []
  for s in range(total):
    idx, mask = _local.batch_indices(key, jnp.asarray(s), jnp.asarray(n), max_e, schedule)
    perms = _local.epoch_permutations(key, jnp.asarray(n), max_e, schedule)
    idx2, mask2 = _local.batch_indices(key, jnp.asarray(s), jnp.asarray(n), max_e, schedule, perms)
    np.testing.assert_array_equal(idx, idx2); np.testing.assert_array_equal(mask, mask2)
    seen.extend(np.asarray(idx)[np.asarray(mask)].tolist())
  assert all(i < n for i in seen)
  if num_steps is None:
    assert len(seen) == 3 * n
    for e in range(3):
      assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
  else:
    assert len(seen) == 5 * 4
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == list(range(n))


@pytest.mark.parametrize("n", [0, 3, 4, 7, 12])
def test_planned_step_batches_are_the_per_step_batches(n):
  schedule = federated.LocalSchedule(batch_size=4, num_epochs=3)
  max_e, key = 12, jax.random.key(5)
  data = ClientData(jnp.arange(max_e, dtype=jnp.float32)[:, None], jnp.arange(max_e), jnp.int32(n))
  plan = _local.plan_step_batches(key, data.num_examples, max_e, schedule)
  assert plan.indices.shape == plan.mask.shape == (schedule.total_steps(max_e), 4)
  real = int(_local.num_real_steps(data.num_examples, max_e, schedule))
  for t in range(real):
    step = _local.static_step_index(jnp.int32(t), data.num_examples, max_e, schedule)
    idx, mask = _local.batch_indices(key, step, data.num_examples, max_e, schedule)
    np.testing.assert_array_equal(plan.indices[t], idx)
    np.testing.assert_array_equal(plan.mask[t], mask)
    # step_batch gives the same batch from the plan, the permutations or nothing
    outs = [_local.step_batch(data, jnp.int32(t), key, key, schedule, p)
            for p in (plan, _local.epoch_permutations(key, data.num_examples, max_e, schedule), None)]
    for out in outs[1:]:
      for a, b in zip(outs[0], out):
        np.testing.assert_array_equal(a, b)
  assert _local.plan_step_batches(key, data.num_examples, max_e,
                                  federated.LocalSchedule(batch_size=4, num_steps=5)) is None


def test_evaluate_matches_direct_computation():
  apply_fn, params, data = _problem()
  x = data.x.reshape((-1, data.x.shape[-1])); y = data.y.reshape(-1)
  mask = np.asarray(data.mask).reshape(-1)
  logits, _ = apply_fn(params, {}, x, train=False)
  acc = np.mean((np.argmax(logits, -1) == np.asarray(y))[mask])
  evaluate = jax.jit(federated.make_evaluate(apply_fn, batch_size=4))
  sums = evaluate(params, {}, x[mask], y[mask])
  np.testing.assert_allclose(sums.means()["accuracy"], acc, rtol=1e-6)
  per_client = jax.jit(federated.make_evaluate_clients(apply_fn, batch_size=2, clients_per_chunk=2))(
      params, {}, data)
  np.testing.assert_array_equal(per_client.num_examples, np.asarray(data.num_examples))
  np.testing.assert_allclose(per_client.correct_sum.sum() / per_client.num_examples.sum(), acc, rtol=1e-6)


def test_first_argmax_is_argmax_including_ties():
  from fedjax_prune.federated._local import count_correct, first_argmax
  # Small integer logits: many exact ties, where the first maximal index must win.
  logits = jax.random.randint(jax.random.key(0), (64, 7), 0, 3).astype(jnp.float32)
  logits = logits.at[0].set(0.0)  # all equal: class 0, as argmax says
  np.testing.assert_array_equal(first_argmax(logits), jnp.argmax(logits, -1))
  big = jax.random.normal(jax.random.key(1), (4, 5, 62))
  np.testing.assert_array_equal(first_argmax(big), jnp.argmax(big, -1))
  y = jax.random.randint(jax.random.key(2), (64,), 0, 7)
  w = jnp.arange(64) % 3 == 0
  assert float(count_correct(logits, y, w)) == float(jnp.sum((jnp.argmax(logits, -1) == y) * w))
  # A row holding a NaN is never counted correct.
  nan_row = jnp.asarray([[0.0, jnp.nan, 1.0]])
  assert int(first_argmax(nan_row)[0]) == 3
  assert float(count_correct(nan_row, jnp.asarray([1]), jnp.ones(1))) == 0


def test_select_strategy_compiles_every_candidate_then_times_them_in_turns(tmp_path):
  import os
  import time
  calls = []

  def run_round_for(strategy):
    seconds = 0.02 if strategy.execution == federated.Vmap() else 0.002

    def run():
      calls.append(strategy.name)
      time.sleep(seconds)
    return run

  candidates = [performance.Strategy.from_name(n) for n in ("vmap+lax", "sequential+lax", "chunked2+lax")]
  cache = str(tmp_path / "cache.json")
  best, timings = performance.select_strategy(run_round_for, candidates, cache_path=cache, repeats=3)
  names = [c.name for c in candidates]
  assert calls == names + names * 3  # compiled (first call) all, then 3 turns
  assert best.name != "vmap+lax" and timings["vmap+lax"] > 5 * timings[best.name]
  calls.clear()
  lines = []
  assert performance.select_strategy(run_round_for, candidates, cache_path=cache, log=lines.append)[0] == best
  assert calls == []  # a cache hit times nothing, and says it is one
  assert len(lines) == 1 and "cached choice" in lines[0] and best.name in lines[0]
  # Written atomically with open()'s mode (a shared cache must be readable), no temp files left.
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(cache).st_mode & 0o777 == 0o666 & ~umask
  assert os.listdir(tmp_path) == ["cache.json"]


def test_bad_inputs_give_clear_errors():
  with pytest.raises(ValueError, match="empty cohort"):
    federated.make_cohort([])
  # A float id was truncated to another client; a repeated id trained one client twice
  # with one key (issue 29).
  with pytest.raises(ValueError, match=r"must be integers.*float64"):
    federated.make_cohort(np.array([0.0, 1.7]))
  with pytest.raises(ValueError, match=r"ids \[2\] appear more than once"):
    federated.make_cohort([2, 0, 2])
  with pytest.raises(ValueError, match="must be integers"):
    federated.make_cohort(np.array([True, False]))
  assert federated.make_cohort(np.array([3, 1], np.int64), multiple=4).client_ids.tolist() == [3, 1, 3, 3]
  with pytest.raises(ValueError, match="batch_size"):
    federated.LocalSchedule(batch_size=0)
  with pytest.raises(ValueError, match="num_epochs"):
    federated.LocalSchedule(batch_size=2, num_epochs=0)
  with pytest.raises(ValueError, match="batch_size"):
    federated.LocalSchedule(batch_size=True)
  # numpy integers (from configs and arrays) are plain ints: the same static schedule.
  from_numpy = federated.LocalSchedule(batch_size=np.int64(4), num_epochs=np.int32(2), unroll=np.int64(2))
  assert from_numpy == federated.LocalSchedule(batch_size=4, num_epochs=2, unroll=2)
  assert type(from_numpy.batch_size) is int and hash(from_numpy) == hash(
      federated.LocalSchedule(batch_size=4, num_epochs=2, unroll=2))
  with pytest.raises(ValueError, match="Chunked.size"):
    federated.Chunked(0)
  apply_fn, params, _ = _problem()
  with pytest.raises(ValueError, match="prox_mu"):
    federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE, prox_mu=-1.0)
  with pytest.raises(ValueError, match="zero examples"):
    from_client_lists([np.zeros((0, 2))], [np.zeros((0,))])


@pytest.mark.parametrize("execution", [federated.Sequential(), federated.Vmap()])
def test_unrolled_local_steps_give_the_same_round(execution):
  # Clients hold 5, 9 and 3 examples (4, 6 and 2 steps of 4 over 2 epochs): with 3 steps
  # written out, the 2-step client computes a step it must discard, and the others
  # continue in the loop; with 8, every client discards some.
  apply_fn, params, data = _problem()
  rolled = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  a, metrics_a = _run(rolled, params, data, [0, 1, 2], execution)
  strategy = performance.Strategy.from_name("sequential+lax+unroll3")
  assert strategy.unroll == 3 and strategy.name == "sequential+lax+unroll3"
  for schedule in [strategy.schedule(SCHEDULE), dataclasses.replace(SCHEDULE, unroll=8)]:
    unrolled = federated.fedavg(apply_fn, optax.sgd(0.1), schedule)
    b, metrics_b = _run(unrolled, params, data, [0, 1, 2], execution)
    testing.assert_trees_close(b.params, a.params, rtol=1e-6, atol=1e-7)
    for k in metrics_a:
      np.testing.assert_allclose(metrics_b[k], metrics_a[k], rtol=1e-6)
  with pytest.raises(ValueError, match="unroll"):
    federated.LocalSchedule(batch_size=2, unroll=0)


def test_waste_free_unroll_is_the_fewest_real_steps_of_a_client_with_examples():
  epochs = federated.LocalSchedule(batch_size=4, num_epochs=2)
  # Clients with 5, 9 and 12 examples take 4, 6 and 6 steps; the empty client is ignored.
  assert federated.waste_free_unroll(np.array([5, 9, 0, 12]), epochs) == 4
  assert federated.waste_free_unroll(np.array([5, 9, 0, 12]), epochs, limit=3) == 3
  assert federated.waste_free_unroll(np.array([40, 90]), epochs) == 4  # the default limit
  assert federated.waste_free_unroll(np.array([40, 90]), epochs, limit=32) == 20  # 2 x ceil(40 / 4)
  assert federated.waste_free_unroll(np.array([1, 90]), epochs) == 2
  steps = federated.LocalSchedule(batch_size=4, num_steps=3)
  assert federated.waste_free_unroll(np.array([1, 90]), steps) == 3
  assert federated.waste_free_unroll(np.array([0, 0]), epochs) == 1
  with pytest.raises(ValueError, match="limit"):
    federated.waste_free_unroll(np.array([5]), epochs, limit=0)
  # On CPU, 'auto' also times the first sequential candidate with that many steps written out.
  plain = performance.candidate_strategies(cohort_size=8, has_conv=True, backend="cpu")
  with_unroll = performance.candidate_strategies(cohort_size=8, has_conv=True, backend="cpu", unroll=4)
  expected = [plain[0].name, plain[0].name + "+unroll4"] + [s.name for s in plain[1:]]
  assert [s.name for s in with_unroll] == expected
  assert with_unroll[1].schedule(epochs).unroll == 4 and plain[0].schedule(epochs).unroll == 1


def _record_device_puts(monkeypatch, kind) -> list:
  """The arguments of type `kind` of every later `jax.device_put` call, in order."""
  placed = []
  device_put = jax.device_put

  def counting_device_put(x, *args, **kwargs):
    if isinstance(x, kind):
      placed.append(x)
    return device_put(x, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", counting_device_put)
  return placed


def test_sharded_round_copies_the_dataset_to_the_devices_once(monkeypatch):
  alg, params, data, round_fn = _sharded_sequential_round()
  cohort = federated.make_cohort([0, 1, 2], multiple=4)  # the dataset's 3 clients + 1 padding
  placed = _record_device_puts(monkeypatch, ClientData)
  state = alg.init(params, jax.random.key(1))
  for r in range(3):
    state, _ = round_fn(state, data, cohort, jax.random.key(r))
  assert len(placed) == 1  # the same dataset is copied to the devices once, not every round
  other = jax.tree.map(lambda x: x + 0, data)  # new arrays: placed anew, same result
  reference, _ = round_fn(state, data, cohort, jax.random.key(5))
  again, _ = round_fn(state, other, cohort, jax.random.key(5))
  assert len(placed) == 2
  testing.assert_trees_close(again.params, reference.params, rtol=0, atol=0)


def test_sharded_round_places_the_server_state_only_when_not_yet_replicated(monkeypatch):
  alg, params, data, round_fn = _sharded_sequential_round()
  cohort = federated.make_cohort([0, 1, 2], multiple=4)  # the dataset's 3 clients + 1 padding
  placed_states = _record_device_puts(monkeypatch, federated.ServerState)
  state = alg.init(params, jax.random.key(1))  # single-device: placed on the mesh
  for r in range(3):
    state, _ = round_fn(state, data, cohort, jax.random.key(r))
  assert len(placed_states) == 1  # later rounds get the round's own replicated output
  assert round_fn._cache_size() == 1
  # A state partly moved off the mesh is placed again, with the same result.
  reference, _ = round_fn(state, data, cohort, jax.random.key(5))
  moved = state._replace(round_idx=jax.device_put(state.round_idx, jax.devices()[0]))
  again, _ = round_fn(moved, data, cohort, jax.random.key(5))
  assert len(placed_states) == 2
  testing.assert_trees_close(again.params, reference.params, rtol=0, atol=0)


@pytest.mark.parametrize("unroll", [1, 3, 8])
@pytest.mark.parametrize("num_steps", [0, 1, 3, 5, 8])
def test_loop_real_steps_runs_exactly_the_traced_number_of_steps(unroll, num_steps):
  # Each step writes its index into a log: the log must read 1..T in order, whatever k.
  def step(log, t):
    return log.at[t].set(t + 1)

  run = jax.jit(lambda n: _local.loop_real_steps(step, jnp.zeros(8, jnp.int32), n, unroll))
  expected = [t + 1 if t < num_steps else 0 for t in range(8)]
  np.testing.assert_array_equal(run(jnp.int32(num_steps)), expected)
  if num_steps <= unroll:  # a static bound within the written-out steps: no loop compiled
    bounded = jax.jit(lambda n: _local.loop_real_steps(step, jnp.zeros(8, jnp.int32), n, unroll,
                                                       max_steps=unroll))
    np.testing.assert_array_equal(bounded(jnp.int32(num_steps)), expected)
    assert ("while" in str(bounded.lower(jnp.int32(0)).as_text())) == (unroll == 1)


@pytest.mark.parametrize("num_examples", [0, 1, 4, 5, 9, 12])
def test_real_steps_are_exactly_the_padded_layout_steps_that_hold_an_example(num_examples):
  schedule = federated.LocalSchedule(batch_size=4, num_epochs=2)
  max_examples = 12  # padded layout: 3 steps per epoch, 6 in all
  n = jnp.int32(num_examples)
  key = jax.random.key(0)
  holds_example = [bool(jnp.any(_local.batch_indices(key, jnp.int32(s), n, max_examples, schedule)[1]))
                   for s in range(schedule.total_steps(max_examples))]
  real = int(_local.num_real_steps(n, max_examples, schedule))
  mapped = [int(_local.static_step_index(jnp.int32(t), n, max_examples, schedule))
            for t in range(real)]
  assert mapped == [s for s, holds in enumerate(holds_example) if holds]
  steps_mode = federated.LocalSchedule(batch_size=4, num_steps=5)
  assert int(_local.num_real_steps(n, max_examples, steps_mode)) == (5 if num_examples else 0)


def test_local_training_counts_only_real_steps():
  apply_fn, params, data = _problem()
  local_train = jax.jit(federated.make_local_train(apply_fn, optax.sgd(0.1), SCHEDULE))
  for cid in range(data.num_clients):
    n = int(data.num_examples[cid])
    _, metrics = local_train(params, {}, client_slice(data, cid), jax.random.key(cid))
    assert float(metrics.num_steps) == SCHEDULE.num_epochs * -(-n // SCHEDULE.batch_size)
    assert float(metrics.num_examples) == SCHEDULE.num_epochs * n


def test_strategy_names_round_trip_including_sharding():
  for name in ["sequential+lax", "vmap+im2col", "chunked8+im2col", "sequential+tapgrad+unroll4",
               "sequential+tapgrad+unroll4+sharded", "vmap+lax+sharded"]:
    assert performance.Strategy.from_name(name).name == name
  assert performance.Strategy.from_name("vmap+lax+sharded").sharded
  assert not performance.Strategy.from_name("vmap+lax").sharded
  with pytest.raises(ValueError, match="must look like"):
    performance.Strategy.from_name("sharded")
  with pytest.raises(ValueError, match="sharded must be a bool"):
    performance.Strategy(federated.Vmap(), sharded=1)


def test_split_cpu_into_devices_in_a_fresh_process_and_not_after_jax_started():
  import os
  import subprocess
  import sys
  # This process already runs JAX: nothing changes, and it says so.
  assert performance.split_cpu_into_devices(3) is None
  with pytest.raises(ValueError, match="num_devices"):
    performance.split_cpu_into_devices(0)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("import jax\nfrom fedjax_prune import performance\n"
          "print(performance.split_cpu_into_devices(3), jax.device_count('cpu'))")
  out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.split() == ["3", "3"]


def test_differentiable_schedule_gives_the_same_training_and_a_gradient_through_it():
  apply_fn, params, data = _problem()
  fast = jax.jit(federated.make_local_train(apply_fn, optax.sgd(0.1), SCHEDULE))
  differentiable_schedule = federated.LocalSchedule(batch_size=4, num_epochs=2, differentiable=True)
  slow = federated.make_local_train(apply_fn, optax.sgd(0.1), differentiable_schedule)
  client = client_slice(data, 1)  # fewer examples than the padded maximum: skipped steps
  a, metrics_a = fast(params, {}, client, jax.random.key(3))
  b, metrics_b = jax.jit(slow)(params, {}, client, jax.random.key(3))
  testing.assert_trees_close(b.params, a.params, rtol=1e-6, atol=1e-7)
  assert float(metrics_a.num_steps) == float(metrics_b.num_steps)

  def distance_moved(p):  # differentiate through the whole local training
    local, _ = slow(p, {}, client, jax.random.key(3))
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(local.params), jax.tree.leaves(p)))

  grads = jax.grad(distance_moved)(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="differentiable"):
    federated.LocalSchedule(batch_size=2, differentiable=1)


def test_round_compiler_options_change_no_value():
  """The CPU copy-insertion option (`performance.round_compiler_options`, which
  `Strategy.make_round` passes to `make_round`) is a pure performance knob: the same
  round compiled without it gives bit-identical state and metrics."""
  assert performance.round_compiler_options("cpu") == {
      "xla_cpu_copy_insertion_use_region_analysis": True}
  assert performance.round_compiler_options("gpu") is None
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.adam(0.05), SCHEDULE)
  with_option, m1 = _run(alg, params, data, [0, 1, 2], federated.Sequential(),
                         compiler_options=performance.round_compiler_options("cpu"))
  without, m2 = _run(alg, params, data, [0, 1, 2], federated.Sequential())
  for a, b in zip(jax.tree.leaves((with_option, m1)), jax.tree.leaves((without, m2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Strategy.make_round is make_round with the strategy's execution and those options.
  strategy = performance.Strategy.from_name("sequential+lax")
  state = alg.init(params, jax.random.key(1))
  cohort = federated.make_cohort([0, 1, 2])
  for r in range(2):
    state, m3 = strategy.make_round(alg)(state, data, cohort,
                                         federated.round_key(jax.random.key(7), r))
  for a, b in zip(jax.tree.leaves((with_option, m1)), jax.tree.leaves((state, m3))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="is sharded: pass the device mesh"):
    performance.Strategy.from_name("sequential+lax+sharded").make_round(alg)


def test_round_nests_in_a_callers_scan_with_the_same_result():
  """A round with compiler options, which JAX allows on a top-level jit only: called
  inside a caller's jit/scan it must still work and give the same rounds."""
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  round_fn = federated.make_round(alg, compiler_options=performance.round_compiler_options("cpu"))
  cohort = federated.make_cohort([0, 2])
  root = jax.random.key(7)
  state = alg.init(params, jax.random.key(1))
  top = state
  for r in range(2):
    top, _ = round_fn(top, data, cohort, federated.round_key(root, r))

  @jax.jit
  def two_rounds(s):
    return jax.lax.scan(lambda s, r: (round_fn(s, data, cohort, federated.round_key(root, r))[0], None),
                        s, jnp.arange(2))[0]

  testing.assert_trees_close(two_rounds(state).params, top.params, rtol=1e-6, atol=1e-7)


def test_round_train_metrics_are_per_example_means_of_the_summed_client_metrics():
  summed = federated.LocalMetrics(loss_sum=jnp.float32(6.0), correct_sum=jnp.float32(3.0),
                                  num_examples=jnp.float32(4.0), num_steps=jnp.float32(2.0))
  m = federated.round_train_metrics(summed, jnp.float32(2.0))
  assert {k: float(v) for k, v in m.items()} == {
      "train_loss": 1.5, "train_accuracy": 0.75, "train_examples": 4.0, "local_steps": 2.0,
      "num_clients": 2.0}
  empty = federated.LocalMetrics(*(jnp.float32(0.0),) * 4)  # no examples: no division by zero
  assert float(federated.round_train_metrics(empty, 0.0)["train_loss"]) == 0.0


@pytest.mark.parametrize("round_idx", [0, 1, 41, np.int32(7), 2**31 - 1])
def test_round_key_is_fold_in_of_the_round_index(round_idx):
  # round_key is jitted (host dispatch per round); its keys must be fold_in's exactly.
  root = jax.random.key(3)
  got = jax.random.key_data(federated.round_key(root, round_idx))
  want = jax.random.key_data(jax.random.fold_in(root, round_idx))
  np.testing.assert_array_equal(got, want)
  other = jax.random.key_data(federated.round_key(root, int(round_idx) + 1 if round_idx < 2**31 - 1 else 0))
  assert not np.array_equal(got, other)


def test_default_execution_is_sequential_on_cpu_and_chunked_vmap_on_accelerators():
  assert federated.default_execution("cpu") == federated.Sequential()
  assert federated.default_execution("gpu") == federated.Chunked(128)
  assert federated.default_execution("tpu") == federated.Chunked(128)
  # make_round without an execution uses it: here, the same result as the explicit one.
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  state = alg.init(params, jax.random.key(1))
  cohort = federated.make_cohort([0, 1, 2])
  default, _ = federated.make_round(alg)(state, data, cohort, jax.random.key(2))
  explicit, _ = federated.make_round(alg, execution=federated.default_execution())(
      state, data, cohort, jax.random.key(2))
  testing.assert_trees_close(default.params, explicit.params, rtol=0, atol=0)


@pytest.mark.parametrize("bad_id", [-1, 3, 99])
def test_a_client_id_outside_the_dataset_is_an_error(bad_id):
  # Inside jit the gather would clamp the id and silently train another client.
  apply_fn, params, data = _problem()  # 3 clients
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  round_fn = federated.make_round(alg)
  state = alg.init(params, jax.random.key(1))
  with pytest.raises(IndexError, match=rf"cohort client ids \[{bad_id}\] are outside the "
                                       r"dataset's 3 clients: allowed \[0, 2\]"):
    round_fn(state, data, federated.make_cohort([0, bad_id]), jax.random.key(0))
  round_fn(state, data, federated.make_cohort([0, 2]), jax.random.key(0))  # in range: runs


def test_example_counts_above_the_padded_axis_are_an_error():
  apply_fn, params, data = _problem()
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), SCHEDULE)
  round_fn = federated.make_round(alg)
  state = alg.init(params, jax.random.key(1))
  padded = data.x.shape[1]
  too_many = data._replace(num_examples=data.num_examples.at[1].set(padded + 1))
  with pytest.raises(ValueError, match=rf"num_examples of clients \[1\] \(\[{padded + 1}\]\) are "
                                       rf"outside \[0, {padded}\]"):
    round_fn(state, too_many, federated.make_cohort([0, 1]), jax.random.key(0))
  negative = data._replace(num_examples=data.num_examples.at[0].set(-1))
  with pytest.raises(ValueError, match=r"num_examples of clients \[0\]"):
    round_fn(state, negative, federated.make_cohort([0, 1]), jax.random.key(0))
  # Checked once per dataset: the valid one runs, and repeated rounds do not re-read it.
  round_fn(state, data, federated.make_cohort([0, 1]), jax.random.key(0))


def test_per_client_stacks_are_spread_over_coordinates_on_a_mesh():
  """Robust statistics work per coordinate: the [C, ...] stacks leave the client split for
  the largest dimension the device count divides (each device then holds every client of
  its share); values are unchanged, leaves with no such dimension keep their layout."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
  from jax.sharding import PartitionSpec as P
  from fedjax_prune.federated import _engine
  mesh = federated.client_mesh(jax.devices()[:4])
  stacks = {"kernel": jnp.arange(4 * 6 * 8, dtype=jnp.float32).reshape(4, 6, 8),
            "bias": jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3),
            "weight": jnp.arange(4, dtype=jnp.float32)}
  spread = jax.jit(lambda t: _engine.spread_over_coordinates(t, mesh))(stacks)
  assert spread["kernel"].sharding.spec == P(None, None, "clients")  # 8 (not 6) splits over 4
  assert spread["kernel"].sharding.shard_shape(spread["kernel"].shape) == (4, 6, 2)
  assert spread["bias"].sharding.is_fully_replicated  # 3 does not split over 4 devices
  for name in stacks:
    np.testing.assert_array_equal(np.asarray(spread[name]), np.asarray(stacks[name]))

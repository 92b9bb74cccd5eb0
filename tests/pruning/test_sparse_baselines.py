"""Sparse-FL baselines (FedDST, PruneFL, LotteryFL, SNIP, SynFlow) and the experiment drivers."""
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import build, train
from experiments.configs import fedavg_synthetic, fedtiny_cifar10
from fedjax_prune import data as data_lib
from fedjax_prune import federated, masks, models, testing
from fedjax_prune.pruning import _sparse, base, feddst, init_pruning, lotteryfl, prunefl
from fedjax_prune.pruning import fedtiny as ft
from tests._checks import assert_counted_accuracy

SCHED = federated.LocalSchedule(batch_size=4)
DENSITY = 0.3


def _problem():
  apply_fn, params = testing.tiny_mlp(jax.random.key(0), in_features=6, hidden=16, num_classes=3)
  data = testing.tiny_client_data(num_clients=4, sizes=(8, 12, 6, 9))
  prunable = masks.by_ndim(params)
  return apply_fn, params, data, prunable


def _target_counts(params, prunable):
  """Per-layer kept counts of uniform densities at DENSITY (dense entries counted)."""
  dens = _sparse.layer_densities(params, DENSITY, "uniform", prunable)
  m = _sparse.magnitude_masks(params, dens, prunable)
  return _sparse.keep_counts(m, _sparse.leaf_flags(params, prunable))


def _rounds(alg, state, data, num):
  round_fn = federated.make_round(alg, execution=federated.Vmap())
  history = [state]
  for t in range(num):
    state, metrics = round_fn(state, data, federated.make_cohort(range(data.num_clients)), jax.random.key(t))
    history.append(state)
  return history, metrics


def _moved(a, b):
  return sum(int(np.sum(np.asarray(x) != np.asarray(y)))
             for x, y in zip(jax.tree.leaves(a.masks), jax.tree.leaves(b.masks)))


def test_feddst_keeps_layer_densities_and_moves_masks():
  apply_fn, params, data, prunable = _problem()
  params, m = ft.sparse_setup(params, DENSITY, prunable=prunable)
  flags = _sparse.leaf_flags(params, prunable)
  alg = feddst.feddst(apply_fn, optax.sgd(0.2), SCHED, prunable=prunable, adjust_every=1,
                      adjust_end=6, adjust_alpha=0.5,
                      post_adjust=federated.LocalSchedule(batch_size=4, num_steps=2))
  history, metrics = _rounds(alg, alg.init(params, jax.random.key(0), masks=m), data, 3)
  for s in history:
    assert _sparse.keep_counts(s.masks, flags) == _target_counts(params, prunable)
    np.testing.assert_array_equal(
        [float(jnp.sum(jnp.where(mm, 0.0, jnp.abs(p)))) for p, mm in
         zip(jax.tree.leaves(s.params), jax.tree.leaves(s.masks))], 0.0)
  assert _moved(history[0], history[-1]) > 0
  assert float(metrics["density"]) == pytest.approx(float(masks.density(m, params)))


def test_sparse_methods_train_equal_local_steps_per_round():
  """Issue 25's budget confound: by default FedDST's adjustment rounds train no more local
  steps than FedTiny's or than its own other rounds (it reused the whole schedule after the
  prune/regrow: ~20 % more SGD over a table); an explicit post_adjust adds its steps."""
  apply_fn, params, data, prunable = _problem()
  params, m = ft.sparse_setup(params, DENSITY, prunable=prunable)
  kw = dict(prunable=prunable, adjust_every=2, adjust_end=6, adjust_alpha=0.5)
  run = lambda alg: _round_metrics(alg, params, m, data, 4)
  dst_metrics = run(feddst.feddst(apply_fn, optax.sgd(0.2), SCHED, **kw))
  adjusted = [float(mt["adjusted"]) for mt in dst_metrics]
  assert adjusted == [0.0, 0.0, 1.0, 0.0]  # should_update(begin=1, every=2): round index 2
  dst = [float(mt["local_steps"]) for mt in dst_metrics]
  tiny = [float(mt["local_steps"]) for mt in run(ft.fedtiny(apply_fn, optax.sgd(0.2), SCHED, **kw))]
  assert dst == tiny and len(set(dst)) == 1, (dst, tiny)
  extra = [float(mt["local_steps"]) for mt in run(feddst.feddst(
      apply_fn, optax.sgd(0.2), SCHED, **kw,
      post_adjust=federated.LocalSchedule(batch_size=4, num_steps=2)))]
  assert [e - d for e, d in zip(extra, dst)] == [2.0 * data.num_clients * a for a in adjusted]


def _round_metrics(alg, params, m, data, num):
  state = alg.init(params, jax.random.key(0), masks=m)
  round_fn = federated.make_round(alg, execution=federated.Vmap())
  out = []
  for t in range(num):
    state, metrics = round_fn(state, data, federated.make_cohort(range(data.num_clients)),
                              jax.random.key(t))
    out.append(metrics)
  return out


def test_fedtiny_candidate_zero_starts_from_the_baselines_weights():
  """Issue 25's init confound: FedTiny's candidate 0 has the weights `init_fn(key)` every
  baseline starts from (it was init_fn(fold_in(key, 0))); candidate c those of
  init_fn(candidate_key(key, c)), which the sparse configs' init_candidate offers baselines."""
  spec = models.mlp(input_shape=(6,), hidden=(16,), num_classes=3)
  init_fn = lambda k: models.init_params(spec, k)
  key = jax.random.key(3)
  cands = ft.make_candidates(init_fn, key, num_candidates=3, density=0.5)
  for c in range(3):
    want, _ = init_fn(ft.candidate_key(key, c))
    got = jax.tree.map(lambda x: np.asarray(x)[c], cands.params)
    kept = jax.tree.map(lambda x: np.asarray(x)[c], cands.masks)
    for g, w, k in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(kept)):
      np.testing.assert_array_equal(g, np.where(k, np.asarray(w), 0.0))
  assert ft.candidate_key(key, 0) is key


def test_prunefl_initial_pruning_and_adaptive_rounds_reach_target():
  apply_fn, params, data, prunable = _problem()
  flags = _sparse.leaf_flags(params, prunable)
  keep, _ = _sparse.sparse_budget(params, DENSITY, prunable)
  p, s, m = prunefl.initial_masks(apply_fn, optax.sgd(0.2), SCHED, params, {},
                                  data_lib.client_slice(data, 1), jax.random.key(1),
                                  density=DENSITY, prunable=prunable, num_iterations=3)
  assert sum(_sparse.keep_counts(m, flags)) == keep
  alg = prunefl.prunefl(apply_fn, optax.sgd(0.2), SCHED, prunable=prunable, adjust_every=1,
                        adjust_end=6, importance_batches=2)
  history, _ = _rounds(alg, alg.init(p, jax.random.key(0), batch_stats=s, masks=m), data, 3)
  for state in history:
    assert sum(_sparse.keep_counts(state.masks, flags)) == keep  # global budget exact
  assert _moved(history[0], history[-1]) > 0
  # Newly selected positions start from 0.
  for a, b, x in zip(jax.tree.leaves(history[1].masks), jax.tree.leaves(history[2].masks),
                     jax.tree.leaves(history[1].params)):
    grown = np.broadcast_to(np.asarray(b) & ~np.asarray(a), np.shape(x))
    np.testing.assert_array_equal(np.asarray(x)[grown], 0.0)


def test_lotteryfl_reaches_target_and_rewinds():
  apply_fn, params, data, prunable = _problem()
  flags = _sparse.leaf_flags(params, prunable)
  dens = _sparse.layer_densities(params, DENSITY, "uniform", prunable)
  alg = lotteryfl.lotteryfl(apply_fn, optax.sgd(0.2), SCHED, prunable=prunable, densities=dens,
                            prune_every=2, num_prune_steps=2)
  history, metrics = _rounds(alg, alg.init(params, jax.random.key(0)), data, 5)
  counts = [_sparse.keep_counts(s.masks, flags) for s in history]
  assert counts[1] == [96, 48]  # round 1: no pruning yet (dense)
  assert counts[2][0] < 96      # after round 2: first step
  assert counts[4] == _target_counts(params, prunable) == counts[5]  # target reached and kept
  # Right after a pruning step the survivors are rewound to the initial weights.
  for p0, p, mm in zip(jax.tree.leaves(params), jax.tree.leaves(history[4].params),
                       jax.tree.leaves(history[4].masks)):
    np.testing.assert_array_equal(np.asarray(p), np.where(np.asarray(mm), np.asarray(p0), 0.0))
  assert float(metrics["density"]) < 0.35


def test_snip_and_synflow_reach_target_density():
  apply_fn, params, data, prunable = _problem()
  flags = _sparse.leaf_flags(params, prunable)
  keep, _ = _sparse.sparse_budget(params, DENSITY, prunable)
  snip = init_pruning.snip_masks(apply_fn, params, {}, data.x[1, :8], data.y[1, :8],
                                 density=DENSITY, prunable=prunable)
  syn = init_pruning.synflow_masks(apply_fn, params, {}, (6,), density=DENSITY, prunable=prunable,
                                   num_iterations=5)
  for m in (snip, syn):
    masks.check(params, m)
    assert sum(_sparse.keep_counts(m, flags)) == keep
    assert float(masks.density(m, params)) == pytest.approx(DENSITY, abs=2e-3)
  # SNIP keeps the largest |g * w|: its choice differs from plain magnitude.
  mag = masks.global_topk(masks.magnitude(params), keep / 144, prunable)
  assert any(bool(np.any(np.asarray(a) != np.asarray(b)))
             for a, b in zip(jax.tree.leaves(snip), jax.tree.leaves(mag)))
  with pytest.raises(ValueError, match="num_iterations must be an int >= 1"):
    init_pruning.synflow_masks(apply_fn, params, {}, (6,), density=DENSITY, prunable=prunable,
                               num_iterations=0)


# ----------------------------------------------------------------------------
# The MaskRule vocabulary and the one masked FedAvg.


def test_masked_fedavg_with_fedavgs_server_step_is_fedavg_bit_for_bit():
  apply_fn, params, data, _ = _problem()
  ours = base.masked_fedavg(apply_fn, optax.sgd(0.2), SCHED, base.no_prune(),
                            server_optimizer=optax.sgd(1.0))
  ref = federated.fedavg(apply_fn, optax.sgd(0.2), SCHED)
  a, _ = _rounds(ours, ours.init(params, jax.random.key(0)), data, 2)
  b, _ = _rounds(ref, ref.init(params, jax.random.key(0), masks=federated.dense_masks(params)),
                 data, 2)
  for x, y in zip(jax.tree.leaves(a[-1].params), jax.tree.leaves(b[-1].params)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


class _CountState(NamedTuple):
  masks: object
  seen: jax.Array  # sum over rounds of the cohort's summed client statistic


def _counting_rule(prunable):
  """A toy rule: every client sends 1 (uploaded as n_k); the server keeps the running total of
  the cohort's sums and prunes nothing."""

  def init(params, key, batch_stats=None):
    del key, batch_stats
    return _CountState(_sparse.full_masks(params, prunable), jnp.zeros((), jnp.float32))

  def client(state, local, metrics, data, keys, round_idx):
    assert keys.shape == (1,)  # client_keys=1: one key for the hook, besides training's
    return base.ClientResult(local, metrics, jnp.ones((), jnp.float32))

  def update(state, model, sums, round_idx, key):
    del key
    return state._replace(seen=state.seen + sums.stats), model, {"stat_sum": sums.stats}

  return base.MaskRule(init, update, client, client_keys=1)


def test_rule_hooks_see_example_weighted_client_statistics():
  apply_fn, params, data, prunable = _problem()
  alg = base.masked_fedavg(apply_fn, optax.sgd(0.2), SCHED, _counting_rule(prunable))
  state = alg.init(params, jax.random.key(0))
  assert state.rule.masks is None and state.rule_state().masks is state.masks
  history, metrics = _rounds(alg, state, data, 2)
  total = float(np.sum(np.asarray(data.num_examples)))  # each client sends n_k * 1
  assert float(metrics["stat_sum"]) == total
  assert float(history[-1].rule.seen) == 2 * total
  masks.check(history[-1].params, history[-1].masks)
  bad = base.MaskRule(lambda p, k, b=None: base.MaskState(_sparse.full_masks(p, prunable)),
                      client_keys=-1)
  with pytest.raises(ValueError, match="client_keys must be an int >= 0"):
    base.masked_fedavg(apply_fn, optax.sgd(0.2), SCHED, bad)


def test_library_method_runs_without_the_experiments_package():
  spec = models.mlp(input_shape=(6,), hidden=(16,), num_classes=3)
  params, batch_stats = models.init_params(spec, jax.random.key(0))
  data = testing.tiny_client_data(num_clients=4, sizes=(8, 12, 6, 9))
  model = federated.ModelFns(apply_for=models.make_apply,
                             evaluate_with=lambda apply_fn: lambda p, s: {"test_accuracy": 0.0})
  run = base.SparseRun(spec=spec, params=params, batch_stats=batch_stats, key=jax.random.key(1),
                       optimizer=optax.sgd(0.2), schedule=SCHED, model=model, train=data,
                       clients_per_round=4, rounds=3, optimizer_slots=0)
  method = feddst.feddst_method(run, density=DENSITY, adjust_every=1, adjust_end=3)
  state = method.init()
  round_fn = federated.make_round(method.algorithm(spec), execution=federated.Vmap())
  cohort = federated.make_cohort(range(4))
  for r in range(3):
    before = state
    server, metrics = round_fn(state.server, data, cohort, jax.random.key(10 + r))
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    state = method.after_round(state._replace(server=server), r, record)
    record.update(method.record(before, state, r, record))
    assert record["adjusted"] == float(r >= 1)
    assert record["client_training_flops"] > 0 and record["bytes_up"] > 0
    assert record["density"] == pytest.approx(DENSITY, abs=0.02)
  summary = method.summary(state, {})
  assert summary["sparse_method"] == "feddst" and summary["params"] < summary["dense_params"]
  assert summary["density"] == pytest.approx(record["density"])


# ----------------------------------------------------------------------------
# Drivers.


def tiny_config(method: str, sparse_method: str = "feddst"):
  c = fedtiny_cifar10.base_config("vgg11")
  base = fedavg_synthetic.get_config()
  c.data = base.data
  c.data.num_clients = 6
  c.data.examples_per_client = (6, 10)
  c.data.test_examples_per_client = 4
  c.model.name = "mlp"
  c.model.hidden = (16,)
  c.model.norm = "none"
  c.client.batch_size = 4
  c.client.num_epochs = 1
  c.rounds = 4
  c.clients_per_round = 3
  c.eval_every = 2
  c.strategy = "vmap+lax"
  c.progress = False
  c.method = method
  s = c.sparse
  s.method, s.density, s.adjust_every, s.adjust_end = sparse_method, 0.1, 2, 3
  s.num_candidates, s.num_blocks = 2, 2
  s.prunefl_init_iterations, s.prunefl_adjust_every = 2, 2
  s.lottery_prune_every, s.lottery_steps, s.synflow_iterations = 1, 2, 3
  return c


@pytest.mark.parametrize("method,sparse_method", [
    ("fedtiny", ""), pytest.param("sparse", "snip", marks=pytest.mark.slow),
    pytest.param("sparse", "feddst", marks=pytest.mark.slow),
    pytest.param("sparse", "prunefl", marks=pytest.mark.slow),
    pytest.param("sparse", "lotteryfl", marks=pytest.mark.slow),
    pytest.param("sparse", "synflow", marks=pytest.mark.slow),
    pytest.param("sparse", "dense", marks=pytest.mark.slow),
])
def test_driver_smoke(tmp_path, method, sparse_method):
  config = tiny_config(method, sparse_method or "feddst")
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  assert [r["round"] for r in records] == [1, 2, 3, 4]
  target = 1.0 if sparse_method == "dense" else 0.1
  assert summary["density"] == pytest.approx(target, abs=2e-3)
  for r in records:
    assert r["client_training_flops"] > 0 and r["client_peak_memory_bytes"] > 0
    assert r["client_upload_bytes"] > 0 and r["client_download_bytes"] > 0
    assert r["density"] == pytest.approx(summary["density"], abs=2e-3) or sparse_method == "lotteryfl"
  assert_counted_accuracy(summary["test_accuracy"], config)
  assert os.path.exists(tmp_path / "run" / "summary.json")


def test_driver_rejects_bad_sparse_config(tmp_path):
  config = tiny_config("sparse", "rigl")
  with pytest.raises(build.ConfigError, match="sparse.method='rigl' is invalid"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny_config("sparse", "lotteryfl")
  config.sparse.lottery_steps = 10
  with pytest.raises(build.ConfigError, match="lottery_steps=10 .* exceeds config.rounds=4"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  config = tiny_config("fedtiny")
  config.sparse.bn_aggregation = "gamma"
  with pytest.raises(build.ConfigError, match="bn_aggregation='gamma' is invalid"):
    train.train_and_evaluate(config, str(tmp_path / "c"))


def test_client_round_cost_hand_computed():
  from fedjax_prune import accounting, models
  spec = models.mlp(input_shape=(6,), hidden=(8,), num_classes=3)
  forward = 2 * (6 * 8 + 8 * 3)  # 2 FLOPs per MAC, batch 1
  base = accounting.client_round_cost(spec, batch_size=4, local_steps=5)
  assert base.training_flops == 5 * 3 * forward * 4
  assert base.download == base.upload == 4 * (6 * 8 + 8 + 8 * 3 + 3)  # dense: every value
  assert base.peak_memory == accounting.training_memory(spec, 4).total
  grow = accounting.client_round_cost(spec, batch_size=4, local_steps=5, dense_grad_batches=1,
                                      dense_grad_layers=["dense_1"], forward_examples=10,
                                      topk_entries=7)
  # + one batch: sparse forward and input gradient, dense weight gradient of dense_1 only;
  # + 10 forward-only examples.
  assert grow.training_flops == base.training_flops + 4 * (2 * forward + 2 * 8 * 3) + 10 * forward
  # Top-K: 7 x (4-byte value + 1-byte index: the largest leaf has 48 < 256 entries).
  assert grow.upload == base.upload + 7 * 5 and grow.download == base.download
  assert grow.peak_memory == base.peak_memory + 4 * (8 * 3 + 3) + 7 * 5
  half = {"dense_0": {"kernel": np.arange(48).reshape(6, 8) < 24, "bias": np.ones((), bool)},
          "dense_1": {"kernel": np.ones((), bool), "bias": np.ones((), bool)}}
  sparse = accounting.client_round_cost(spec, half, batch_size=4, local_steps=5)
  # dense_0 at density 1/2 (rows 0-2: every output unit stays alive, so dense_1 stays dense).
  assert sparse.training_flops == 5 * 3 * 2 * (24 + 8 * 3) * 4
  # Bitmap coding: 24 kept + 8 bias + 27 values, plus the 48-entry bitmap (6 bytes).
  assert sparse.download == 4 * (24 + 8 + 27) + 6
  with pytest.raises(ValueError, match="dense_grad_layers \\['conv_9'\\] are not conv/dense layers"):
    accounting.client_round_cost(spec, batch_size=4, local_steps=1, dense_grad_batches=1,
                                 dense_grad_layers=["conv_9"])
  with pytest.raises(ValueError, match="local_steps must be an int >= 0"):
    accounting.client_round_cost(spec, batch_size=4, local_steps=-1)


def _wide_problem():
  """An MLP whose global magnitude top-k at density 0.01 empties the first layer.

  dense_0 [400, 16] is scaled to 1/200 (|w| < 0.03), dense_1 [16, 4] is at 1/4: the
  45 prunable entries kept at density 0.01 all go to dense_1 (64 entries) by magnitude.
  """
  apply_fn, params = testing.tiny_mlp(jax.random.key(0), in_features=400, hidden=16, num_classes=4)
  params["dense_0"]["kernel"] = params["dense_0"]["kernel"] * 0.1
  data = testing.tiny_client_data(num_clients=3, in_features=400, num_classes=4, sizes=(8, 12, 6))
  return apply_fn, params, data, masks.by_ndim(params)


def _columns_kept(m):
  m = np.asarray(m)
  return m.reshape(-1, m.shape[-1]).sum(axis=0)


@pytest.mark.parametrize("min_per_output", [1, 2])
def test_prunefl_floor_keeps_every_output_unit_and_exact_budget(min_per_output):
  apply_fn, params, data, prunable = _wide_problem()
  flags = _sparse.leaf_flags(params, prunable)
  keep, _ = _sparse.sparse_budget(params, 0.01, prunable)
  assert keep == 45  # 0.01 * 6484 - 20 dense entries
  p, s, m = prunefl.initial_masks(apply_fn, optax.sgd(0.1), SCHED, params, {},
                                  data_lib.client_slice(data, 1), jax.random.key(1), density=0.01,
                                  prunable=prunable, num_iterations=3, min_per_output=min_per_output)
  alg = prunefl.prunefl(apply_fn, optax.sgd(0.1), SCHED, prunable=prunable, adjust_every=1,
                        adjust_end=6, min_per_output=min_per_output)
  history, metrics = _rounds(alg, alg.init(p, jax.random.key(0), batch_stats=s, masks=m), data, 2)
  assert float(metrics["adjusted"]) == 1.0
  for state in history:
    kernels = [mm for mm, f in zip(jax.tree.leaves(state.masks), flags) if f]
    assert sum(_sparse.keep_counts(state.masks, flags)) == keep  # the global budget, exactly
    for mm in kernels:  # every output unit keeps at least its floor
      assert _columns_kept(mm).min() >= min_per_output
    assert float(masks.density(state.masks, params)) == pytest.approx((keep + 20) / 6484, abs=1e-7)
  # The floor takes only what it needs: the rest still goes to the global top-k,
  # which prefers the large-scale head (more than its 4 * min_per_output floor).
  assert _sparse.keep_counts(history[0].masks, flags)[1] > 4 * min_per_output


def test_prunefl_floor_keeps_the_output_input_dependent():
  apply_fn, params, data, prunable = _wide_problem()
  x = data.x[0, :8]

  def logits_spread(min_per_output):  # lr 0: the selection alone, by initial magnitude
    p, s, m = prunefl.initial_masks(apply_fn, optax.sgd(0.0), SCHED, params, {},
                                    data_lib.client_slice(data, 1), jax.random.key(1),
                                    density=0.01, prunable=prunable, num_iterations=3,
                                    min_per_output=min_per_output)
    logits, _ = apply_fn(p, s, x, train=False)
    return float(jnp.max(jnp.std(logits, axis=0))), _sparse.keep_counts(m, _sparse.leaf_flags(params, prunable))

  spread, counts = logits_spread(1)
  assert counts[0] >= 16 and spread > 1e-6  # connected: the logits vary with the input
  # The paper's plain global top-k (min_per_output=0) empties dense_0: constant logits.
  spread, counts = logits_spread(0)
  assert counts[0] == 0 and spread == 0.0


def test_prunefl_floor_rejects_a_budget_below_the_floors():
  apply_fn, params, data, prunable = _wide_problem()
  with pytest.raises(ValueError, match="fewer than the 40 of min_per_output=2"):
    prunefl.initial_masks(apply_fn, optax.sgd(0.1), SCHED, params, {}, data_lib.client_slice(data, 1),
                          jax.random.key(1), density=0.005, prunable=prunable, min_per_output=2)
  with pytest.raises(ValueError, match="min_per_output must be an int >= 0"):
    prunefl.prunefl(apply_fn, optax.sgd(0.1), SCHED, prunable=prunable, min_per_output=-1)


def test_column_floor_hand_computed():
  scores = jnp.array([[3.0, 0.0, 1.0], [5.0, 0.0, 2.0], [4.0, 0.0, 9.0]])
  np.testing.assert_array_equal(_sparse.column_floor(scores, 1),
                                [[False, True, False], [True, False, False], [False, False, True]])
  np.testing.assert_array_equal(_sparse.column_floor(scores, 2),
                                [[False, True, False], [True, True, True], [True, False, True]])
  chosen = _sparse.floored_global_select([scores, jnp.zeros(3)], [True, False], 4, 1)
  # Floors (5, 0 at index 0, 9) plus the best other entry (4).
  np.testing.assert_array_equal(chosen[0], [[False, True, False], [True, False, False],
                                            [True, False, True]])
  assert chosen[1] is None
  assert _sparse.floor_count((3, 3, 2, 5), 2) == 10 and _sparse.floor_count((2, 5), 0) == 0


# ----------------------------------------------------------------------------
# Client cost, term by term (issue 25: FedTiny's compute / memory claims).


def test_client_cost_terms_hand_count():
  """MLP 4 -> 3 -> 2 (kernels 4x3 and 3x2 with biases), kernel masks keeping 6 of 12 and 3
  of 6 with every hidden unit reached: F(m) = 2 x (6 + 3) = 18 FLOPs per example, the dense
  F = 2 x (12 + 6) = 36. B = 5, 2 local steps, momentum (1 slot), float32."""
  from fedjax_prune import accounting
  spec = models.mlp(input_shape=(4,), hidden=(3,), num_classes=2)
  m = {"dense_0": {"kernel": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], bool),
                   "bias": np.ones((), bool)},
       "dense_1": {"kernel": np.array([[1, 0], [0, 1], [1, 0]], bool), "bias": np.ones((), bool)}}
  kept = 6 + 3 + 3 + 2  # kept kernel entries + the (dense) biases
  activations = 4 + 3 + 3 + 2  # per example: input, dense_0 out, its ReLU, logits
  common = dict(batch_size=5, local_steps=2, optimizer_slots=1)
  # FedTiny's adjustment round: the dense gradient of the adjusted block (dense_1: 6 + 2
  # entries) on one batch, a top-K buffer of 2 (value + a 1-byte index into <= 12 positions),
  # and 7 forward-only examples (as ABNS adds in round 0).
  fedtiny_like = dict(dense_grad_batches=1, dense_grad_layers=["dense_1"], topk_entries=2,
                      forward_examples=7)
  terms = accounting.client_cost_terms(spec, m, **common, **fedtiny_like)
  assert terms.compute == {"local_training": 2 * 3 * 18 * 5,
                           "dense_gradient": 1 * 5 * (2 * 18 + 2 * 6),
                           "forward_only": 7 * 18}
  assert terms.memory == {"weights": 4 * kept, "gradients": 4 * kept, "optimizer": 4 * kept,
                          "masks": 2 + 1,  # ceil(12 / 8) + ceil(6 / 8) bitmap bytes
                          "activations": 4 * 5 * activations,
                          "dense_gradient": 4 * (6 + 2), "topk_buffer": 2 * (4 + 1)}
  total = accounting.client_round_cost(spec, m, **common, **fedtiny_like)
  assert (terms.total_compute, terms.total_memory) == (total.training_flops, total.peak_memory)
  # FedDST's adjustment round: every layer's dense gradient, no top-K buffer.
  dst = accounting.client_cost_terms(spec, m, **common, dense_grad_batches=1)
  assert dst.compute["dense_gradient"] == 5 * (2 * 18 + 36)
  assert dst.memory["dense_gradient"] == 4 * (12 + 3 + 6 + 2) and dst.memory["topk_buffer"] == 0
  # Dense FedAvg: everything at density 1, no mask bits.
  dense = accounting.client_cost_terms(spec, None, **common)
  assert dense.compute == {"local_training": 2 * 3 * 36 * 5, "dense_gradient": 0,
                           "forward_only": 0}
  assert dense.memory["weights"] == 4 * (12 + 3 + 6 + 2) and dense.memory["masks"] == 0
  assert dense.memory["activations"] == terms.memory["activations"]  # sparsity does not shrink them
  with pytest.raises(ValueError, match="dense_grad_layers .* are not conv/dense layers"):
    accounting.client_cost_terms(spec, m, **common, dense_grad_batches=1,
                                 dense_grad_layers=["conv_9"])


def test_converged_sweep_is_the_grid_on_equal_terms(shared_data_dir):
  """experiments/configs/fedtiny_cifar10_converged.py (issue 25): dense x 3 seeds first, then
  6 methods x 3 densities x 3 seeds, every run validated by its driver, all with the same
  rounds, cohort, local schedule, optimizer and starting weights, no extra FedDST steps, and
  FedTiny's adjustment rounds shared by FedDST. Validation checks the real CIFAR-10 data_dir:
  skipped without ../shared/data."""
  del shared_data_dir
  from experiments import sweep
  from experiments.configs import fedtiny_cifar10_converged as converged
  from experiments.methods import fedtiny as fedtiny_driver
  from experiments.methods import sparse as sparse_driver
  path = os.path.join("experiments", "configs", "fedtiny_cifar10_converged.py")
  runs = sweep.expand(converged.get_config(), sweep.load_sweep_fn(path))
  assert len(runs) == 3 + 6 * 3 * 3 == len({r.name for r in runs})
  name = lambda c: c.method if c.method == "fedtiny" else c.sparse.method
  assert [name(r.config) for r in runs[:3]] == ["dense"] * 3
  cells = {(name(r.config), r.config.sparse.density, r.config.seeds.init) for r in runs[3:]}
  assert cells == {(m, d, s) for m in converged.METHODS for d in (0.1, 0.05, 0.01)
                   for s in (0, 1, 2)}
  for r in runs:
    c = r.config
    assert c.seeds.init == c.seeds.sampling == c.seeds.training
    assert (c.rounds, c.clients_per_round, c.client.to_dict(), c.model.to_dict(),
            c.data.to_dict()) == (runs[0].config.rounds, runs[0].config.clients_per_round,
                                  runs[0].config.client.to_dict(), runs[0].config.model.to_dict(),
                                  runs[0].config.data.to_dict())
    assert c.sparse.init_candidate == 0 and c.sparse.post_adjust_steps == 0
  tiny = next(r.config for r in runs if r.config.method == "fedtiny")
  dst = next(r.config for r in runs if name(r.config) == "feddst")
  assert fedtiny_driver.adjust_schedule(tiny) == sparse_driver.adjust_schedule(dst) == (3, 90)

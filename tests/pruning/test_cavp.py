"""Tests of complexity-aware variational unit/layer pruning (fedjax_prune.pruning.cavp)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import accounting, federated, models
from fedjax_prune import data as data_lib
from fedjax_prune.pruning import cavp
from fedjax_prune.structured import _drop_blocks
from tests._checks import assert_counted_accuracy


def small_resnet(norm="batch_running"):
  # stage1: 2 identity blocks (layer-gated); stage2: projection block + identity block.
  return models.ResNetSpec(input_shape=(6, 6, 1), num_classes=3, stem_width=2,
                           stage_widths=(2, 3), stage_strides=(1, 2),
                           inner_widths=((3, 2), (4, 3)), norm=norm)


def small_convnet(head="flatten"):
  return models.ConvNetSpec(
      input_shape=(6, 6, 2), num_classes=5, head=head, norm="batch_running",
      convs=(models.ConvSpec(features=4, norm=True, bias=False),
             models.ConvSpec(features=3, pool=2, norm=True, bias=False)))


def randomized(spec, key):
  """Params with random BN scale/bias and running stats (so removal bugs show)."""
  params, stats = models.init_params(spec, key)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  params = jax.tree.unflatten(treedef, [l + 0.3 * jax.random.normal(k, l.shape)
                                        for l, k in zip(leaves, keys)])
  stats = jax.tree.map(lambda s: jnp.abs(s + 0.2 * jax.random.normal(key, s.shape)) + 0.1, stats)
  return params, stats


# ----------------------------------------------------------------------------
# Gates.


def test_gate_sampling_is_unbiased(key):
  theta = {"a": jnp.array([0.0, 0.1, 0.5, 0.9, 1.0]), "b": {"layer": jnp.array(0.3)}}
  alive = {"a": jnp.array([True, True, True, True, False]), "b": {"layer": jnp.array(True)}}
  n = 4000
  samples = jax.vmap(lambda k: cavp.sample_gates(theta, alive, k))(jax.random.split(key, n))
  mean_a, mean_b = np.mean(samples["a"], 0), float(np.mean(samples["b"]["layer"]))
  expected = np.array([0.0, 0.1, 0.5, 0.9, 0.0])  # the pruned gate is always off
  tol = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-6
  np.testing.assert_array_less(np.abs(mean_a - expected), tol)
  assert abs(mean_b - 0.3) < 4 * np.sqrt(0.21 / n)
  assert set(np.unique(samples["a"])) <= {0.0, 1.0}
  # Per-example samples: [B, *shape], also unbiased.
  per_ex = cavp.sample_gates(theta, alive, key, batch_size=n)
  assert per_ex["a"].shape == (n, 5) and per_ex["b"]["layer"].shape == (n,)
  np.testing.assert_array_less(np.abs(np.mean(per_ex["a"], 0) - expected), tol)


def test_gate_samples_are_jax_random_bernoulli_draws(key):
  # sample_gates splits with the engine's key functions and draws with jax.random (its hash
  # is a loop XLA does not fuse into the gates' consumers: docs/results/cavp_step_cost.md);
  # the draws are exactly jax.random's: split(key, leaves), then bernoulli(leaf, theta)
  theta = {"a": jnp.array([0.0, 0.1, 0.5, 0.9, 1.0]), "b": {"layer": jnp.array(0.3)}}
  alive = {"a": jnp.ones(5, bool), "b": {"layer": jnp.array(True)}}
  for batch_size in (None, 7):
    got = cavp.sample_gates(theta, alive, key, batch_size=batch_size)
    leaves, treedef = jax.tree.flatten(theta)
    lead = () if batch_size is None else (batch_size,)
    want = jax.tree.unflatten(treedef, [
        jax.random.bernoulli(k, jnp.broadcast_to(t, lead + t.shape)).astype(jnp.float32)
        for k, t in zip(jax.random.split(key, len(leaves)), leaves)])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))


def test_projection_keeps_theta_in_unit_interval(key):
  options = cavp.Options(one_epsilon=0.05)
  theta = {"a": jax.random.uniform(key, (200,), minval=-2.0, maxval=3.0)}
  alive = {"a": jnp.arange(200) % 7 != 0}
  out = np.asarray(cavp.project(theta, alive, options)["a"])
  assert out.min() >= 0.0 and out.max() <= 1.0
  raw = np.asarray(theta["a"])
  a = np.asarray(alive["a"])
  np.testing.assert_array_equal(out[~a], 0.0)
  np.testing.assert_array_equal(out[a & (raw >= 0.95)], 1.0)
  inside = a & (raw > 0) & (raw < 0.95)
  np.testing.assert_allclose(out[inside], raw[inside])


def test_projection_after_training_steps(key):
  spec = small_convnet("gap")
  apply_fn, params, stats = models.build(spec, key)
  # Huge θ learning rate: the unprojected θ would leave [0, 1] at once.
  local = cavp.make_local_train(apply_fn, optax.sgd(0.01), optax.sgd(1e3),
                                federated.LocalSchedule(batch_size=4, num_steps=3))
  theta = cavp.init_theta(spec)
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  lam = cavp.penalty_weights(spec, cavp.CostWeights(gamma=5.0))
  x = jax.random.normal(key, (8, 6, 6, 2))
  y = jnp.arange(8) % 5
  out, _ = jax.jit(local)(params, stats, theta, alive, lam, jnp.float32(jnp.nan),
                          data_lib.ClientData(x, y, jnp.int32(8)), key)
  for leaf in jax.tree.leaves(out.theta):
    assert float(leaf.min()) >= 0.0 and float(leaf.max()) <= 1.0


def test_prune_is_permanent_and_keeps_one_unit():
  theta = {"u": jnp.array([0.01, 0.02, 0.03]), "v": jnp.array([0.9, 0.04]),
           "blk": {"layer": jnp.array(0.0)}}
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  theta, alive = cavp.prune(theta, alive, cavp.Options(prune_threshold=0.05))
  np.testing.assert_array_equal(alive["u"], [False, False, True])  # last unit kept
  np.testing.assert_array_equal(alive["v"], [True, False])
  assert not bool(alive["blk"]["layer"])
  np.testing.assert_allclose(theta["v"], [0.9, 0.0])
  # A pruned gate stays pruned even when θ is raised again.
  theta2, alive2 = cavp.prune({**theta, "v": jnp.array([0.9, 0.8])}, alive, cavp.Options())
  assert not bool(alive2["v"][1]) and float(theta2["v"][1]) == 0.0


# ----------------------------------------------------------------------------
# Removal = gate at 0.


def _gated_equals_rebuilt(spec, theta, alive, key, *, train):
  apply_fn, _, _ = models.build(spec, key)
  params, stats = randomized(spec, key)
  x = jax.random.normal(jax.random.fold_in(key, 7), (5,) + spec.input_shape)
  gates = cavp.deterministic_gates(theta, alive)
  gated, _ = jax.jit(lambda p, s, x, g: apply_fn(p, s, x, train=train, gates=g))(
      params, stats, x, gates)
  new_spec, new_params, new_stats, new_theta, new_alive, report = cavp.remove_pruned(
      spec, params, stats, theta, alive)
  new_apply, _, _ = models.build(new_spec, key)
  rebuilt, _ = jax.jit(lambda p, s, x, g: new_apply(p, s, x, train=train, gates=g))(
      new_params, new_stats, x, cavp.deterministic_gates(new_theta, new_alive))
  np.testing.assert_allclose(rebuilt, gated, rtol=1e-5, atol=1e-5)
  return new_spec, report


@pytest.mark.parametrize("train", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_resnet_removed_structures_compute_the_gated_function(key, train):
  spec = small_resnet()
  theta = cavp.init_theta(spec)
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  assert set(theta) == {"stage1_block0", "stage1_block1", "stage2_block0", "stage2_block1"}
  assert "layer" not in theta["stage2_block0"]  # projection shortcut: no layer gate
  # θ hits 0 for: unit 1 of stage1_block0, block stage1_block1, units 0 and 2 of stage2_block0.
  theta["stage1_block0"]["unit"] = jnp.array([0.9, 0.0, 0.7])
  theta["stage1_block1"]["layer"] = jnp.array(0.0)
  theta["stage2_block0"]["unit"] = jnp.array([0.0, 0.8, 0.0, 1.0])
  theta, alive = cavp.prune(theta, alive, cavp.Options())
  new_spec, report = _gated_equals_rebuilt(spec, theta, alive, key, train=train)
  assert new_spec.inner_widths == ((2,), (2, 3))
  assert report == cavp.Rebuilt(3, ("stage1_block1",))
  assert accounting.param_count(new_spec) < accounting.param_count(spec)


@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_convnet_removed_units_compute_the_gated_function(key, head):
  spec = small_convnet(head)
  theta = {"conv_0": jnp.array([0.9, 0.0, 0.6, 0.0]), "conv_1": jnp.array([0.0, 0.7, 0.8])}
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  theta, alive = cavp.prune(theta, alive, cavp.Options())
  new_spec, report = _gated_equals_rebuilt(spec, theta, alive, key, train=False)
  assert [c.features for c in new_spec.convs] == [2, 2] and report.units_removed == 3


def test_drop_blocks_renames_and_removes_empty_stages():
  spec = models.ResNetSpec(input_shape=(8, 8, 1), num_classes=2, stem_width=2,
                           stage_widths=(2, 4), stage_strides=(1, 2), inner_widths=((2, 2), (3,)))
  new_spec, renames = _drop_blocks.drop_blocks_spec(spec, ["stage1_block0", "stage1_block1"])
  assert new_spec.stage_widths == (4,) and new_spec.inner_widths == ((3,),)
  assert renames == {"stage2_block0": "stage1_block0"}
  with pytest.raises(ValueError, match="projection shortcut"):
    _drop_blocks.drop_blocks_spec(spec, ["stage2_block0"])
  with pytest.raises(ValueError, match="unknown blocks"):
    _drop_blocks.drop_blocks_spec(spec, ["stage9_block0"])


def test_server_prunes_and_rebuild_shrinks(key):
  """A θ driven to 0 by the server's average is pruned, then physically removed."""
  spec = small_resnet("none")
  apply_fn, params, stats = models.build(spec, key)
  options = cavp.Options(prune_threshold=0.05)
  weights = cavp.CostWeights(gamma=1.0)
  reference = (accounting.flops(spec), accounting.param_count(spec))
  lam = cavp.penalty_weights(spec, weights, reference=reference)
  alg = cavp.cavp(apply_fn, optax.sgd(0.0), optax.sgd(0.0),
                  federated.LocalSchedule(batch_size=4, num_steps=1), options)
  theta = cavp.init_theta(spec)
  theta["stage1_block1"]["layer"] = jnp.array(0.01)
  theta["stage2_block1"]["unit"] = jnp.array([0.9, 0.02, 0.9])
  state = alg.init(params, key, stats, theta=theta, lam=lam)
  x = jax.random.normal(key, (2, 4, 6, 6, 1))
  data = data_lib.ClientData(x, jnp.zeros((2, 4), jnp.int32), jnp.array([4, 4], jnp.int32))
  state, metrics = jax.jit(federated.make_round(alg))(state, data, federated.make_cohort([0, 1]),
                                                      key)
  assert not bool(state.alive["stage1_block1"]["layer"])
  np.testing.assert_array_equal(state.alive["stage2_block1"]["unit"], [True, False, True])
  assert float(metrics["layers_alive"]) == 2.0 and float(metrics["units_alive"]) == 11.0
  new_spec, new_state, report = cavp.rebuild(spec, state, weights, options, reference=reference)
  assert new_spec.inner_widths == ((3,), (4, 2)) and report.blocks_removed == ("stage1_block1",)
  assert jax.tree.structure(new_state.theta) == jax.tree.structure(new_state.lam)
  assert new_state.theta["stage2_block1"]["unit"].shape == (2,)


def _lr_task(key):
  spec = models.ConvNetSpec(input_shape=(4, 4, 1), num_classes=3, head="gap", norm="none",
                            convs=(models.ConvSpec(features=3),))
  apply_fn, params, stats = models.build(spec, key)
  x = jax.random.normal(key, (2, 8, 4, 4, 1))
  y = jax.random.randint(jax.random.fold_in(key, 1), (2, 8), 0, 3)
  return spec, apply_fn, params, stats, data_lib.ClientData(x, y, jnp.array([8, 8], jnp.int32))


def test_weight_lr_scale_is_the_round_learning_rate(key):
  """`weight_lr_scale(round_idx)` multiplies the weights' learning rate of that round only.
  With a schedule of 1 in round 1 and 0.25 in round 2: round 1 is bit-identical to no
  schedule, and round 2 equals a round of SGD at a quarter of the rate from the same state
  (a schedule read at the wrong round, or not applied, fails one of the two)."""
  spec, apply_fn, params, stats, data = _lr_task(key)
  cohort = federated.make_cohort([0, 1])

  def round_fn(lr, schedule):
    alg = cavp.cavp(apply_fn, optax.sgd(lr), optax.sgd(0.1),
                    federated.LocalSchedule(batch_size=4, num_steps=2), spec=spec,
                    weights=cavp.CostWeights(gamma=0.1), weight_lr_scale=schedule)
    return alg, jax.jit(federated.make_round(alg))

  plain_alg, plain = round_fn(0.2, None)
  _, scheduled = round_fn(0.2, lambda r: jnp.where(r == 0, 1.0, 0.25))
  _, quarter_rate = round_fn(0.05, None)
  keys = jax.random.fold_in(key, 2), jax.random.fold_in(key, 3)
  state = plain_alg.init(params, key, stats)
  first, _ = scheduled(state, data, cohort, keys[0])
  jax.tree.map(np.testing.assert_array_equal, first.params,
               plain(state, data, cohort, keys[0])[0].params)
  second, _ = scheduled(first, data, cohort, keys[1])
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
               second.params, quarter_rate(first, data, cohort, keys[1])[0].params)
  full_rate = plain(first, data, cohort, keys[1])[0]
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(second.params), jax.tree.leaves(full_rate.params))) > 1e-4


def test_driver_cosine_weight_lr_decay_is_optax_cosine_over_the_rounds():
  """`cavp.weight_lr_decay='cosine'`: round r's multiplier is (1 + cos(pi r / rounds)) / 2."""
  from experiments.methods import cavp as driver
  c = tiny_driver_config("centralised")
  assert driver.weight_lr_scale(c) is None  # the default: constant
  c.cavp.weight_lr_decay = "cosine"
  c.rounds = 8
  schedule = driver.weight_lr_scale(c)
  got = [float(schedule(jnp.int32(r))) for r in range(8)]
  np.testing.assert_allclose(got, [(1 + np.cos(np.pi * r / 8)) / 2 for r in range(8)],
                             atol=1e-6)  # float32


def test_rebuild_slices_a_persistent_theta_optimizer_state(key):
  """The θ optimizer's θ-shaped moments follow θ through a rebuild (units sliced, a dropped
  block's entries removed and the later blocks renamed); its step count is kept."""
  spec = small_resnet("none")
  apply_fn, params, stats = models.build(spec, key)
  options = cavp.Options(persist_theta_optimizer=True)
  weights = cavp.CostWeights(gamma=1.0)
  reference = (accounting.flops(spec), accounting.param_count(spec))
  theta = cavp.init_theta(spec)
  theta["stage1_block0"]["layer"] = jnp.array(0.0)  # dropped: stage1_block1 -> stage1_block0
  theta["stage2_block1"]["unit"] = jnp.array([0.7, 0.0, 0.8])
  theta, alive = cavp.prune(theta, jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta))
  adam_state, rest = optax.adam(0.1).init(theta)
  leaves, treedef = jax.tree.flatten(theta)
  coded = jax.tree.unflatten(treedef, [100.0 * i + jnp.arange(l.size, dtype=jnp.float32)
                                       .reshape(l.shape) for i, l in enumerate(leaves)])
  opt_state = (adam_state._replace(count=jnp.int32(7), mu=coded,
                                   nu=jax.tree.map(lambda c: 2 * c, coded)), rest)
  lam = cavp.penalty_weights(spec, weights, reference=reference)
  state = cavp.CavpState(params, stats, theta, alive, lam, jnp.float32(jnp.nan), jnp.int32(0),
                         opt_state)
  new_spec, new_state, report = cavp.rebuild(spec, state, weights, options, reference=reference)
  assert report == cavp.Rebuilt(1, ("stage1_block0",))
  new_adam, _ = new_state.theta_opt
  assert int(new_adam.count) == 7
  assert jax.tree.structure(new_adam.mu) == jax.tree.structure(new_state.theta)
  for name_new, name_old in (("stage1_block0", "stage1_block1"), ("stage2_block0", "stage2_block0")):
    for kind in coded[name_old]:
      np.testing.assert_array_equal(new_adam.mu[name_new][kind], coded[name_old][kind])
  np.testing.assert_array_equal(new_adam.mu["stage2_block1"]["unit"],
                                np.asarray(coded["stage2_block1"]["unit"])[[0, 2]])
  np.testing.assert_array_equal(new_adam.mu["stage2_block1"]["layer"],
                                coded["stage2_block1"]["layer"])
  for m, v in zip(jax.tree.leaves(new_adam.mu), jax.tree.leaves(new_adam.nu)):
    np.testing.assert_array_equal(v, 2 * np.asarray(m))
  assert new_spec.inner_widths == ((2,), (4, 2))


def _no_eval_model():
  return federated.ModelFns(apply_for=lambda spec: models.make_apply(spec),
                            evaluate_with=lambda apply_fn: lambda p, s: {"test_accuracy": 0.0})


def test_rebuild_recalibrates_bn_for_the_deterministic_network():
  """With `recalibrate_after_rebuild`, the statistics recorded after a rebuild are those
  of the rebuilt deterministic network on the recalibration batch (hand-computed):
  conv_0 = identity 1x1 -> BN -> ReLU -> gates; conv_1 sums the gated units -> BN. Unit 1
  of conv_0 is pruned (removed), unit 2 has θ = 0.3 < final_threshold (gate 0 in the
  deterministic network), so conv_1's BN sees relu(bn_0(x_0)) alone."""
  spec = models.ConvNetSpec(
      input_shape=(1, 1, 3), num_classes=2, head="gap", norm="batch_running",
      convs=(models.ConvSpec(features=3, kernel=(1, 1), norm=True, bias=False),
             models.ConvSpec(features=1, kernel=(1, 1), norm=True, bias=False)))
  _, params, stats = models.build(spec, jax.random.key(0))
  params["conv_0"]["kernel"] = jnp.eye(3).reshape(1, 1, 3, 3)
  params["conv_1"]["kernel"] = jnp.ones((1, 1, 3, 1))
  x = 1.0 + 2.0 * jax.random.normal(jax.random.key(1), (256, 1, 1, 3))  # one batch of 256
  options = cavp.Options(structures="units", final_threshold=0.5)

  def after_rebuild(recalibrate):
    method = cavp.cavp_method(
        spec=spec, params=params, batch_stats=stats, key=jax.random.key(2),
        model=_no_eval_model(), weight_optimizer=optax.sgd(0.0), theta_optimizer=optax.sgd(0.0),
        schedule=federated.LocalSchedule(batch_size=4, num_steps=1), options=options,
        weights=cavp.CostWeights(gamma=0.1), rebuild_every=1, num_rounds=3, recalibration_x=x,
        recalibrate_after_rebuild=recalibrate, recalibration_steps=150)
    state = method.init()
    theta = {"conv_0": jnp.array([0.9, 0.0, 0.3]), "conv_1": jnp.array([1.0])}
    theta, alive = cavp.prune(theta, state.server.alive, options)
    state = state._replace(server=state.server._replace(theta=theta, alive=alive))
    return method.after_round(state, 0, {})

  state = after_rebuild(True)
  assert [c.features for c in state.spec.convs] == [2, 1]
  flat = np.asarray(x, np.float64).reshape(-1, 3)
  mean, var = flat.mean(0), flat.var(0)
  z0 = np.maximum((flat[:, 0] - mean[0]) / np.sqrt(var[0] + models.BN_EPSILON), 0.0)
  got = jax.device_get(state.server.batch_stats)
  # 150 passes over one batch: the initial statistics keep a weight 0.9 ** 150 ~ 1e-7.
  np.testing.assert_allclose(got["bn_0"]["mean"], mean[[0, 2]], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["bn_0"]["var"], var[[0, 2]], rtol=1e-4)
  np.testing.assert_allclose(got["bn_1"]["mean"], [z0.mean()], rtol=1e-4)
  np.testing.assert_allclose(got["bn_1"]["var"], [z0.var()], rtol=1e-4)
  # Off (the default): the rebuilt model keeps the initial statistics, sliced.
  kept = jax.device_get(after_rebuild(False).server.batch_stats)
  np.testing.assert_array_equal(kept["bn_0"]["mean"], np.asarray(stats["bn_0"]["mean"])[[0, 2]])
  np.testing.assert_array_equal(kept["bn_1"]["var"], stats["bn_1"]["var"])


def _finetune_task():
  spec = models.ConvNetSpec(input_shape=(4, 4, 2), num_classes=3, head="gap",
                            norm="batch_running",
                            convs=(models.ConvSpec(features=6, norm=True, bias=False),))
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (64, 4, 4, 2))
  y = (jnp.sum(x[..., 0], axis=(1, 2)) > 0).astype(jnp.int32) + (
      jnp.sum(x[..., 1], axis=(1, 2)) > 2).astype(jnp.int32)
  return apply_fn, params, stats, x, y


def test_finetune_with_zero_steps_is_the_identity():
  apply_fn, params, stats, x, y = _finetune_task()
  out = cavp.finetune(apply_fn, params, stats, x, y, jax.random.key(0),
                      cavp.FineTune(num_steps=0, learning_rate=0.5))
  assert out[0] is params and out[1] is stats
  with pytest.raises(ValueError, match="FineTune.learning_rate must be > 0"):
    cavp.finetune(apply_fn, params, stats, x, y, jax.random.key(0),
                  cavp.FineTune(num_steps=1, learning_rate=0.0))
  with pytest.raises(ValueError, match="as many labels as inputs"):
    cavp.finetune(apply_fn, params, stats, x, y[:3], jax.random.key(0), cavp.FineTune(1))


def test_finetune_lowers_the_training_loss():
  apply_fn, params, stats, x, y = _finetune_task()

  def loss(p, s):
    logits, _ = apply_fn(p, s, x, train=False)
    return float(jnp.mean(federated.softmax_cross_entropy(logits, y)))

  before = loss(params, stats)
  new_params, new_stats = cavp.finetune(
      apply_fn, params, stats, x, y, jax.random.key(3),
      cavp.FineTune(num_steps=60, learning_rate=0.1, momentum=0.9, batch_size=16))
  after = loss(new_params, new_stats)
  assert after < 0.5 * before, (before, after)  # measured 1.08 -> 0.36
  assert not np.allclose(new_stats["bn_0"]["mean"], stats["bn_0"]["mean"])  # train mode


def test_gate_stats_count_hand_made_gates():
  """Converged = pruned, θ <= prune_threshold or θ >= 1 - one_epsilon (hand count)."""
  options = cavp.Options(prune_threshold=0.05, one_epsilon=0.02)
  theta = {"a": {"unit": jnp.array([0.0, 0.04, 0.05, 0.5, 0.98, 1.0]), "layer": jnp.array(0.3)},
           "b": {"unit": jnp.array([0.7, 0.99]), "layer": jnp.array(1.0)},
           "c": {"unit": jnp.array([0.6, 0.2])}}
  alive = {"a": {"unit": jnp.array([False, True, True, True, True, True]),
                 "layer": jnp.array(True)},
           "b": {"unit": jnp.array([True, True]), "layer": jnp.array(True)},
           "c": {"unit": jnp.array([False, True])}}
  got = jax.device_get(cavp.gate_stats(theta, alive, options))
  # Units: a: pruned, 0.04, 0.05 (<= 0.05), 0.98 (>= 0.98), 1.0 (not 0.5); b: 0.99 (not 0.7);
  # c: pruned (not 0.2): 7 of 10.
  assert got["units_binary_frac"] == pytest.approx(7 / 10)
  assert got["units_alive"] == 8.0 and got["units_total"] == 10.0
  assert got["units_theta_mean"] == pytest.approx((0.04 + 0.05 + 0.5 + 0.98 + 1.0 + 0.7 + 0.99
                                                   + 0.2) / 8, rel=1e-6)
  assert got["layers_binary_frac"] == pytest.approx(1 / 2)  # 0.3 no, 1.0 yes
  assert got["layers_alive"] == 2.0


def test_template_of_a_rebuilt_persistent_adam_state(key):
  """Resume restores a checkpoint into `method.template(initial, spec, host)`: after a
  rebuild with a persistent Adam θ state, the template of the new spec has exactly the
  state's structure, shapes and dtypes (Adam's moments sliced like θ)."""
  spec = small_resnet()
  _, params, stats = models.build(spec, key)
  options = cavp.Options(persist_theta_optimizer=True)
  method = cavp.cavp_method(
      spec=spec, params=params, batch_stats=stats, key=key, model=_no_eval_model(),
      weight_optimizer=optax.sgd(0.1), theta_optimizer=optax.adam(0.1),
      schedule=federated.LocalSchedule(batch_size=4, num_steps=1), options=options,
      weights=cavp.CostWeights(gamma=1.0), rebuild_every=1, num_rounds=3)
  initial = method.init()
  theta = jax.tree.map(np.asarray, initial.server.theta)
  theta["stage1_block0"]["layer"] = np.float32(0.0)
  theta["stage2_block1"]["unit"] = np.array([0.9, 0.0, 0.9], np.float32)
  theta, alive = cavp.prune(theta, initial.server.alive, options)
  state = method.after_round(
      initial._replace(server=initial.server._replace(theta=theta, alive=alive)), 0, {})
  assert state.spec.inner_widths == ((2,), (4, 2))
  adam = state.server.theta_opt[0]
  assert adam.mu["stage2_block1"]["unit"].shape == (2,) and "stage1_block1" not in adam.mu
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  want = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.server)
  got = method.template(initial, state.spec, state.host)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert shapes(got) == shapes(want)


# ----------------------------------------------------------------------------
# Penalties = hand-computed FLOP / parameter deltas.


def test_penalties_match_hand_computed_convnet_deltas():
  # 6x6x2 -> conv3x3 SAME 4 (bias) -> ReLU -> conv3x3 SAME 3 (bias) -> ReLU -> GAP -> dense 5.
  spec = models.ConvNetSpec(input_shape=(6, 6, 2), num_classes=5, head="gap",
                            convs=(models.ConvSpec(features=4), models.ConvSpec(features=3)))
  dflops, dparams = cavp.structure_costs(spec)
  # A conv_0 filter: its kernel 3*3*2 + bias, and conv_1's input slice 3*3*3.
  assert dparams["conv_0"].tolist() == [18 + 1 + 27] * 4
  # 36 positions: 2*18 MACs + 1 bias add for the filter, 2*27 MACs of conv_1.
  assert dflops["conv_0"].tolist() == [36 * (2 * 18 + 1) + 36 * 2 * 27] * 4
  # A conv_1 filter: kernel 3*3*4 + bias, one dense row of 5; FLOPs also its GAP (36 adds).
  assert dparams["conv_1"].tolist() == [36 + 1 + 5] * 3
  assert dflops["conv_1"].tolist() == [36 * (2 * 36 + 1) + 36 + 2 * 5] * 3
  total_params = (72 + 4) + (108 + 3) + (15 + 5)
  total_flops = 36 * (2 * 72 + 4) + 36 * (2 * 108 + 3) + 3 * 36 + (2 * 15 + 5) + 5 * 5
  assert (accounting.param_count(spec), accounting.flops(spec)) == (total_params, total_flops)
  lam = cavp.penalty_weights(spec, cavp.CostWeights(gamma=2.0, alpha=7.0, beta=0.25))
  want = 2.0 * (0.25 * 3276 / total_flops + 0.75 * 46 / total_params)
  np.testing.assert_allclose(lam["conv_0"], [want] * 4, rtol=1e-6)


def test_penalties_match_hand_computed_resnet_deltas():
  # One identity block 2 -> 3 -> 2 on a 4x4 map (BN, no conv bias).
  spec = models.ResNetSpec(input_shape=(4, 4, 1), num_classes=2, stem_width=2,
                           stage_widths=(2,), stage_strides=(1,), inner_widths=((3,),))
  dflops, dparams = cavp.structure_costs(spec)
  block = dflops["stage1_block0"], dparams["stage1_block0"]
  # Unit: conv1 filter 3*3*2 + BN1 scale/bias 2 + conv2 input slice 3*3*2; 16 positions.
  assert block[1]["unit"].tolist() == [18 + 2 + 18] * 3
  assert block[0]["unit"].tolist() == [16 * 2 * 18 + 16 * 2 * 18] * 3
  # Layer: the branch (conv1 54 + bn1 6 + conv2 54 + bn2 4) and the residual add (16*2).
  assert float(block[1]["layer"]) == 54 + 6 + 54 + 4
  assert float(block[0]["layer"]) == 16 * 2 * 54 + 16 * 2 * 54 + 16 * 2
  ref = (1000.0, 500.0)
  lam = cavp.penalty_weights(spec, cavp.CostWeights(gamma=2.0, alpha=3.0, beta=0.25),
                             reference=ref)
  np.testing.assert_allclose(lam["stage1_block0"]["layer"],
                             3.0 * 2.0 * (0.25 * 3488 / 1000 + 0.75 * 118 / 500), rtol=1e-6)
  np.testing.assert_allclose(lam["stage1_block0"]["unit"],
                             [2.0 * (0.25 * 1152 / 1000 + 0.75 * 38 / 500)] * 3, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"bn_flops_per_element": 4, "include_softmax": False}])
def test_resnet_unit_costs_are_one_wider_spec_per_block(kwargs):
  """The ResNet unit costs (one accounting of all inner widths + 1) equal the definition:
  cost(spec with one more unit in that block) - cost(spec), block by block."""
  spec = small_resnet()
  dflops, dparams = cavp.structure_costs(spec, **kwargs)
  count_flops = lambda s: accounting.flops(s, **kwargs)
  for s, widths in enumerate(spec.inner_widths, start=1):
    for b in range(len(widths)):
      name = f"stage{s}_block{b}"
      inner = [list(w) for w in spec.inner_widths]
      inner[s - 1][b] += 1
      wider = dataclasses.replace(spec, inner_widths=tuple(tuple(w) for w in inner))
      assert dflops[name]["unit"].tolist() == [count_flops(wider) - count_flops(spec)] * widths[b]
      assert dparams[name]["unit"].tolist() == [
          accounting.param_count(wider) - accounting.param_count(spec)] * widths[b]


def test_penalty_is_lambda_dot_theta_over_alive_gates():
  theta = {"u": jnp.array([0.5, 1.0]), "b": {"layer": jnp.array(0.25)}}
  alive = {"u": jnp.array([True, False]), "b": {"layer": jnp.array(True)}}
  lam = {"u": jnp.array([2.0, 3.0]), "b": {"layer": jnp.array(4.0)}}
  assert float(cavp.penalty(theta, alive, lam, {})) == pytest.approx(0.5 * 2.0 + 0.25 * 4.0)


# ----------------------------------------------------------------------------
# Estimators and errors.


@pytest.mark.parametrize("unit,layer,per_example", [
    ("straight_through", "straight_through", False),
    pytest.param("reinforce", "two_point", False, marks=pytest.mark.slow),
    pytest.param("reinforce", "reinforce", True, marks=pytest.mark.slow),
])
def test_estimators_run_and_penalty_lowers_theta(key, unit, layer, per_example):
  spec = small_resnet("none")
  apply_fn, params, stats = models.build(spec, key)
  options = cavp.Options(unit_estimator=unit, layer_estimator=layer, per_example=per_example)
  local = cavp.make_local_train(apply_fn, optax.sgd(0.0), optax.sgd(0.5),
                                federated.LocalSchedule(batch_size=4, num_steps=2), options)
  theta = cavp.init_theta(spec, options)
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  # An overwhelming penalty: every θ must go down whatever the estimator's noise.
  lam = jax.tree.map(lambda t: jnp.full(t.shape, 50.0), theta)
  x = jax.random.normal(key, (8, 6, 6, 1))
  out, metrics = jax.jit(local)(params, stats, theta, alive, lam, jnp.float32(jnp.nan),
                                data_lib.ClientData(x, jnp.arange(8) % 3, jnp.int32(8)), key)
  assert float(metrics.num_steps) == 2.0 and np.isfinite(float(out.baseline))
  for before, after in zip(jax.tree.leaves(theta), jax.tree.leaves(out.theta)):
    assert np.all(np.asarray(after) < np.asarray(before))


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="structures must be one of"):
    cavp.Options(structures="filters")
  with pytest.raises(ValueError, match="unit_estimator"):
    cavp.Options(unit_estimator="two_point")
  with pytest.raises(ValueError, match="theta_init"):
    cavp.Options(theta_init=0.0)
  with pytest.raises(ValueError, match="beta must be in"):
    cavp.penalty_weights(small_convnet(), cavp.CostWeights(beta=2.0))
  with pytest.raises(ValueError, match="layer gates need a ResNetSpec"):
    cavp.gate_template(small_convnet(), "layers")
  with pytest.raises(ValueError, match="gates are supported"):
    spec = models.mlp((4,), (3,), 2)
    apply_fn, params, stats = models.build(spec, jax.random.key(0))
    apply_fn(params, stats, jnp.ones((1, 4)), train=False, gates={})


def test_gates_none_is_the_ungated_model(key):
  spec = small_resnet()
  apply_fn, params, stats = models.build(spec, key)
  x = jax.random.normal(key, (2, 6, 6, 1))
  ones = jax.tree.map(lambda t: jnp.ones_like(t), cavp.init_theta(spec))
  plain, _ = apply_fn(params, stats, x, train=False)
  gated, _ = apply_fn(params, stats, x, train=False, gates=ones)
  np.testing.assert_array_equal(plain, gated)


# ----------------------------------------------------------------------------
# Driver.


def tiny_driver_config(mode):
  from experiments.configs import cavp_cifar10
  c = cavp_cifar10.get_config(f"cpu,{mode},both")
  c.data = type(c.data)(dict(name="synthetic", num_clients=3, num_classes=3,
                             examples_per_client=(6, 8), test_examples_per_client=4,
                             label_skew_alpha=1.0, data_dir=""))
  c.rounds = 2
  c.clients_per_round = 2
  c.client.batch_size = 4
  c.client.num_steps = 1
  c.eval_every = 1
  c.eval_batch_size = 16
  c.cavp.rebuild_every = 1
  c.cavp.theta_init = 0.5
  c.cavp.prune_threshold = 0.45  # some gates fall below it in one step: exercises the rebuild
  c.cavp.theta_learning_rate = 0.2
  return c


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralised", "federated"])
def test_driver_smoke(tmp_path, mode):
  from experiments import train
  config = tiny_driver_config(mode)
  from fedjax_prune import checkpoint
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["method"] == "cavp" and summary["rounds"] == 2
  assert_counted_accuracy(summary["test_accuracy"], config)
  assert summary["params"] <= summary["params_initial"]
  # The summary's converged-unit fraction, counted by hand from the final checkpoint's θ.
  step, arrays, _ = checkpoint.read_arrays(os.path.join(workdir, train.CHECKPOINT_DIR))
  assert step == 2
  units = sorted(k for k in arrays if k.startswith(".theta[") and k.endswith("['unit']"))
  theta = np.concatenate([arrays[k] for k in units])
  alive = np.concatenate([arrays[".alive" + k[len(".theta"):]] for k in units])
  c = config.cavp
  binary = ~alive | (theta <= c.prune_threshold) | (theta >= 1.0 - c.one_epsilon)
  assert units and summary["gates_units_binary_frac"] == pytest.approx(binary.mean(), abs=1e-6)
  assert summary["gates_units_alive"] == alive.sum()


def test_driver_rejects_bad_config():
  from experiments import build
  from experiments.methods import cavp as driver
  c = tiny_driver_config("federated")
  c.cavp.beta = 1.5
  with pytest.raises(build.ConfigError, match="cavp.beta=1.5 is invalid"):
    driver.validate(c)
  for field, value in (("finetune_steps", -1), ("recalibration_steps", 0),
                       ("theta_learning_rate", -0.1), ("finetune_learning_rate", 0.0),
                       ("weight_lr_decay", "step")):
    c = tiny_driver_config("federated")
    c.cavp[field] = value
    with pytest.raises(build.ConfigError, match=f"cavp.{field}={value!r} is invalid"):
      driver.validate(c)
  c = tiny_driver_config("federated")
  c.model.name = "vgg11"
  with pytest.raises(build.ConfigError, match="layer gates need a ResNet"):
    driver.validate(c)
  c = tiny_driver_config("federated")
  c.cavp.augment, c.cavp.recalibration_augment = False, True
  with pytest.raises(build.ConfigError, match="recalibration_augment=True is invalid with "
                     "cavp.augment=False"):
    driver.validate(c)


def test_rebuild_that_removes_every_gate_leaves_a_trainable_model(key):
  """Layer-only pruning can remove every gated block: training goes on with no gate."""
  spec = small_resnet("none")
  apply_fn, params, stats = models.build(spec, key)
  options = cavp.Options(structures="layers")
  weights = cavp.CostWeights(gamma=1.0)
  reference = (accounting.flops(spec), accounting.param_count(spec))
  theta = jax.tree.map(lambda t: jnp.zeros_like(t), cavp.init_theta(spec, options))
  alive = jax.tree.map(lambda t: jnp.zeros(t.shape, bool), theta)
  lam = cavp.penalty_weights(spec, weights, structures="layers", reference=reference)
  state = cavp.CavpState(params, stats, theta, alive, lam, jnp.float32(jnp.nan), jnp.int32(0))
  new_spec, state, report = cavp.rebuild(spec, state, weights, options, reference=reference)
  assert new_spec.inner_widths == ((4,),) and len(report.blocks_removed) == 3
  assert state.theta == {} and state.lam == {}
  new_apply, _, _ = models.build(new_spec, key)
  local = cavp.make_local_train(new_apply, optax.sgd(0.1), optax.sgd(0.1),
                                federated.LocalSchedule(batch_size=4, num_steps=1), options)
  x = jax.random.normal(key, (4, 6, 6, 1))
  out, metrics = jax.jit(local)(state.params, state.batch_stats, state.theta, state.alive,
                                state.lam, state.baseline,
                                data_lib.ClientData(x, jnp.arange(4) % 3, jnp.int32(4)), key)
  assert float(metrics.num_steps) == 1.0 and out.theta == {}


def test_cifar_resnet_presets_and_their_accounting():
  spec = models.resnet20()
  assert spec.inner_widths == ((16,) * 3, (32,) * 3, (64,) * 3) and spec.stage_strides == (1, 2, 2)
  # Hand count: stem 432 + 32; stage1 3 x (2 x 2304 + 64); stage2 block0 (4608 + 9216 + 512
  # + 3 x 64), blocks 1-2 2 x (2 x 9216 + 128); stage3 likewise; head 650.
  stage1 = 3 * (2 * 9 * 16 * 16 + 64)
  stage2 = (9 * 16 * 32 + 9 * 32 * 32 + 16 * 32 + 3 * 64) + 2 * (2 * 9 * 32 * 32 + 128)
  stage3 = (9 * 32 * 64 + 9 * 64 * 64 + 32 * 64 + 3 * 128) + 2 * (2 * 9 * 64 * 64 + 256)
  assert accounting.param_count(spec) == 464 + stage1 + stage2 + stage3 + 650 == 272_474
  assert len(models.resnet56().inner_widths[0]) == 9
  assert accounting.param_count(models.resnet56()) == 855_770
  # Every identity block of ResNet-20 carries a layer gate (7 of 9).
  assert len(_drop_blocks.droppable_blocks(spec)) == 7
  with pytest.raises(ValueError, match="6n \\+ 2"):
    models.cifar_resnet(depth=21)

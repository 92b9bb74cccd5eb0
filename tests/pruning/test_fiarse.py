"""FIARSE: thresholds, nested masks, TCB-GD gradient, partial averaging, the round."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import data as data_lib
from fedjax_prune import federated, models, testing
from fedjax_prune.pruning import _hetero, fiarse


def _params():
  # 12 maskable values with distinct magnitudes; BN leaves are never ranked.
  return {
      "conv": {"kernel": jnp.asarray([[0.1, -0.9, 0.3], [0.5, -0.2, 0.7]])},
      "head": {"kernel": jnp.asarray([[-1.1, 0.05], [0.6, -0.4]]),
               "bias": jnp.asarray([0.8, -0.15])},
      "bn": {"scale": jnp.asarray([0.01, 5.0]), "bias": jnp.asarray([0.0, 0.0])},
  }


def test_default_maskable_excludes_batchnorm_only():
  m = _hetero.default_maskable(_params())
  assert m["conv"]["kernel"] and m["head"]["kernel"] and m["head"]["bias"]
  assert not m["bn"]["scale"] and not m["bn"]["bias"]
  nested = {"stage1_block0": {"shortcut_bn": {"scale": 1.0}, "bn1": {"bias": 1.0},
                              "conv1": {"kernel": 1.0}}}
  nm = _hetero.default_maskable(nested)["stage1_block0"]
  assert nm == {"shortcut_bn": {"scale": False}, "bn1": {"bias": False}, "conv1": {"kernel": True}}


def test_capacity_one_keeps_everything():
  params = _params()
  tau = fiarse.thresholds(params, (1.0,))
  assert tau.shape == (1, 1)
  np.testing.assert_allclose(tau[0, 0], 0.05)  # the smallest maskable |x|
  masks = fiarse.submodel_masks(params, tau[0])
  assert all(bool(jnp.all(m)) for m in jax.tree.leaves(masks))
  sub = fiarse.submodel_params(params, tau[0])
  testing.assert_trees_close(sub, params)


def test_thresholds_hand_computed():
  # |x| sorted descending: 1.1 .9 .8 .7 .6 .5 .4 .3 .2 .15 .1 .05 (n = 12)
  tau = fiarse.thresholds(_params(), (1.0, 0.25, 0.5, 0.01))
  np.testing.assert_allclose(np.asarray(tau[:, 0]), [0.05, 0.8, 0.5, np.inf])  # k = 12, 3, 6, 0
  masks = fiarse.submodel_masks(_params(), tau[1])
  assert int(sum(jnp.sum(m) for m in (masks["conv"]["kernel"], masks["head"]["kernel"],
                                      masks["head"]["bias"]))) == 3
  np.testing.assert_array_equal(masks["conv"]["kernel"], [[False, True, False], [False, False, False]])
  assert masks["bn"]["scale"].shape == () and bool(masks["bn"]["scale"])


def test_masks_are_nested(key):
  params = {"a": {"kernel": jax.random.normal(key, (40, 30))},
            "b": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (30, 7))}}
  levels = fiarse.FIVE_LEVELS + (1 / 64,)
  tau = fiarse.thresholds(params, levels)
  masks = [fiarse.submodel_masks(params, tau[i]) for i in range(len(levels))]
  n = 40 * 30 + 30 * 7
  for i, cap in enumerate(levels):
    kept = sum(int(jnp.sum(m)) for m in jax.tree.leaves(masks[i]))
    assert kept == int(np.floor(cap * n + 1e-9))  # continuous values: no ties
  order = np.argsort(levels)  # small to large
  for small, large in zip(order[:-1], order[1:]):
    for ms, ml in zip(jax.tree.leaves(masks[small]), jax.tree.leaves(masks[large])):
      assert not bool(jnp.any(ms & ~ml)), (levels[small], levels[large])


def test_layerwise_thresholds_per_stage_group(key):
  params = {"stem": {"conv": {"kernel": jax.random.normal(key, (10,))}},
            "stage1_block0": {"conv1": {"kernel": 10 * jax.random.normal(jax.random.fold_in(key, 1), (20,))}},
            "stage1_block1": {"conv1": {"kernel": 10 * jax.random.normal(jax.random.fold_in(key, 2), (20,))}},
            "head": {"kernel": 0.01 * jax.random.normal(jax.random.fold_in(key, 3), (8,))}}
  groups = fiarse.stage_groups(params)
  assert groups["stage1_block0"]["conv1"]["kernel"] == groups["stage1_block1"]["conv1"]["kernel"]
  assert len({groups["stem"]["conv"]["kernel"], groups["head"]["kernel"],
              groups["stage1_block0"]["conv1"]["kernel"]}) == 3
  tau = fiarse.thresholds(params, (0.5,), layerwise=True)
  assert tau.shape == (1, 3)
  m = fiarse.submodel_masks(params, tau[0], layerwise=True)
  assert int(jnp.sum(m["stem"]["conv"]["kernel"])) == 5
  assert int(jnp.sum(m["head"]["kernel"])) == 4  # the tiny head keeps its own half
  assert int(jnp.sum(m["stage1_block0"]["conv1"]["kernel"]) + jnp.sum(m["stage1_block1"]["conv1"]["kernel"])) == 20
  # The global variant would drop the whole small-magnitude head.
  g = fiarse.submodel_masks(params, fiarse.thresholds(params, (0.5,))[0])
  assert int(jnp.sum(g["head"]["kernel"])) == 0


def test_tcb_gradient_closed_form(key):
  x = jax.random.normal(key, (50,))
  w = jax.random.normal(jax.random.fold_in(key, 1), (50,))
  tau = jnp.float32(0.6)
  g_tcb = jax.jit(jax.grad(lambda v: jnp.sum(w * fiarse.tcb_mask(v, tau))))(x)
  g_masked = jax.jit(jax.grad(lambda v: jnp.sum(w * fiarse.hard_mask(v, tau))))(x)
  s = np.abs(np.asarray(x))
  m = s >= 0.6
  expected = np.asarray(w) * m * (1 + 2 * 0.6 * s / (s + 0.6) ** 2)
  np.testing.assert_allclose(np.asarray(g_tcb), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_masked), np.asarray(w) * m, rtol=1e-6)
  assert m.any() and (~m).any()
  assert float(jnp.max(g_tcb / jnp.where(m, w, 1.0))) <= 1.5 + 1e-6  # factor in [1, 1.5]
  # Forward values are the same hard mask.
  np.testing.assert_array_equal(fiarse.tcb_mask(x, tau), fiarse.hard_mask(x, tau))


def test_tcb_gradient_edge_thresholds():
  x = jnp.asarray([0.0, 0.5, -2.0])
  for tau, want in ((jnp.inf, [0.0, 0.0, 0.0]), (0.0, [1.0, 1.0, 1.0])):
    g = jax.grad(lambda v: jnp.sum(fiarse.tcb_mask(v, jnp.float32(tau))))(x)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(np.asarray(g), want)


def test_partial_averaging_hand_computed():
  server = _hetero.HeteroState({"w": jnp.asarray([10.0, 10.0, 10.0, 10.0])}, {}, jnp.zeros((), jnp.int32))
  deltas = [jnp.asarray([1.0, 0.0, 2.0, 0.0]), jnp.asarray([3.0, 4.0, 0.0, 0.0]),
            jnp.asarray([5.0, 0.0, 0.0, 0.0])]
  contribs = [federated.counted_contribution({"w": d}, {"w": d != 0}) for d in deltas]
  total = jax.tree.map(lambda *xs: sum(xs), *contribs)
  zero = jnp.zeros((), jnp.float32)
  sums = _hetero.HeteroSums(total, {}, jnp.float32(3), federated.LocalMetrics(zero, zero, zero, zero))
  new, metrics = _hetero.server_step(server, federated.ClientOutput(sums), 0.5, lambda p: ())
  # counts [3, 1, 1, 0]; means [3, 4, 2, -]; x - 0.5 * mean; untouched coordinate kept.
  np.testing.assert_allclose(np.asarray(new.params["w"]), [8.5, 8.0, 9.0, 10.0])
  np.testing.assert_allclose(float(metrics["coverage"]), 0.75)
  assert int(new.round_idx) == 1


def test_round_equals_python_loop_with_partial_averaging(key):
  apply_fn, params, data = testing.tiny_problem(key)
  caps = (1.0, 0.25)
  method = fiarse.fiarse(apply_fn, optax.sgd(0.5), federated.LocalSchedule(batch_size=4, num_steps=3),
                         capacities=caps, server_learning_rate=0.7)
  state = method.algorithm.init(params, jax.random.key(1))
  cohort = federated.make_cohort([0, 1, 2], capacity=[0.25, 1.0, 0.25])
  round_key = jax.random.key(5)
  new_state, _ = federated.make_round(method.algorithm, execution=federated.Vmap())(
      state, data, cohort, round_key)

  client_root, _ = federated.split_round_key(round_key)
  update = jax.jit(method.algorithm.client_update)
  deltas, touched = [], []
  for cid, cap in zip([0, 1, 2], [0.25, 1.0, 0.25]):
    info = federated.ClientInfo(jnp.int32(cid), data.num_examples[cid], jnp.bool_(True), jnp.float32(cap))
    out = update(state, data_lib.client_slice(data, cid), info, jax.random.fold_in(client_root, cid))
    deltas.append(out.sums.update.total)
    touched.append(out.sums.update.count)
  for path_leaf in jax.tree.leaves(jax.tree.map(
      lambda p, new, d0, d1, d2, c0, c1, c2: (p, new, (d0, d1, d2), (c0, c1, c2)),
      state.params, new_state.params, *deltas, *touched), is_leaf=lambda t: isinstance(t, tuple)):
    p, new, ds, cs = path_leaf
    count = sum(np.asarray(c) for c in cs)
    mean = np.where(count > 0, sum(np.asarray(d) for d in ds) / np.maximum(count, 1), 0.0)
    np.testing.assert_allclose(np.asarray(new), np.asarray(p) - 0.7 * mean, rtol=1e-5, atol=1e-6)
  # A small client (capacity 1/4) never touches a weight below its threshold.
  tau_small = state.aux[1, 0]
  small = np.abs(np.asarray(state.params["dense_0"]["kernel"])) < float(tau_small)
  assert small.any()
  assert not np.asarray(touched[0]["dense_0"]["kernel"])[small].any()
  assert np.asarray(touched[1]["dense_0"]["kernel"]).any()
  # The new thresholds belong to the new params.
  np.testing.assert_allclose(np.asarray(new_state.aux), np.asarray(fiarse.thresholds(new_state.params, caps)))


def test_submodel_matches_level_thresholds(key):
  _, params, _ = testing.tiny_problem(key)
  method = fiarse.fiarse(lambda *a, **k: None, optax.sgd(0.1), federated.LocalSchedule(batch_size=2),
                         capacities=fiarse.FOUR_LEVELS)
  state = method.algorithm.init(params, key)
  for i, cap in enumerate(fiarse.FOUR_LEVELS):
    sub, exit_idx = jax.jit(method.submodel)(state, cap)
    want = fiarse.submodel_params(params, state.aux[i])
    testing.assert_trees_close(sub, want)
    assert int(exit_idx) == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(capacities=(1.0, 0.0)), "capacities must lie in \\(0, 1\\]"),
    (dict(capacities=(1.0, 1.0)), "capacities must be distinct"),
    (dict(capacities=()), "capacities must not be empty"),
    (dict(grad="straight_through"), "grad must be one of"),
    (dict(server_learning_rate=0.0), "server_learning_rate must be > 0"),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    fiarse.fiarse(lambda *a, **k: None, optax.sgd(0.1), federated.LocalSchedule(batch_size=2), **kwargs)


def test_capacity_levels_of_the_paper():
  assert fiarse.FOUR_LEVELS == (1.0, 0.25, 0.0625, 0.015625)
  assert fiarse.FIVE_LEVELS == (1.0, 0.64, 0.36, 0.16, 0.04)
  assert fiarse.SWEEP_LEVELS[0] == 1.0 and fiarse.SWEEP_LEVELS[-1] == 1 / 256


@pytest.mark.parametrize("grad", ["masked", "tcb"])
def test_a_weight_pushed_below_tau_during_local_training_stops_updating(grad):
  """The client's mask is |w| >= tau on its *current* weights at every step (issue 24): a
  weight that local SGD pushes below its level's threshold drops out of the submodel and
  gets no further update, while the weights above tau keep training. (An implementation
  that fixed the mask at the start of the round would keep moving it.)"""
  spec = models.mlp(input_shape=(4,), hidden=(), num_classes=2)
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  params = {"dense_0": {"kernel": jnp.array([[1.0, 0.9], [0.8, 0.1], [0.05, 0.04], [0.03, 0.02]]),
                        "bias": jnp.array([0.7, 0.01])}}
  # Capacity 1/2 of 10 entries: the 5 largest |x| (1.0, 0.9, 0.8, 0.7, 0.1) -> tau = 0.1, so
  # kernel[1, 1] sits on the threshold. Every example is x = e_1 with label 0: SGD lowers
  # kernel[1, 1] (feature 1 -> class 1) below tau in the first step and raises kernel[1, 0].
  x = jnp.tile(jnp.array([[0.0, 1.0, 0.0, 0.0]]), (8, 1))
  data = data_lib.ClientData(x[None], jnp.zeros((1, 8), jnp.int32), jnp.array([8], jnp.int32))
  info = federated.ClientInfo(jnp.int32(0), jnp.int32(8), jnp.bool_(True), jnp.float32(0.5))

  def local_kernel(steps):
    method = fiarse.fiarse(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=8, num_steps=steps),
                           capacities=(1.0, 0.5), grad=grad)
    state = method.algorithm.init(params, jax.random.key(1), stats)
    out = method.algorithm.client_update(state, data_lib.client_slice(data, 0), info,
                                         jax.random.key(2))
    delta = out.sums.update.total["dense_0"]["kernel"]
    return np.asarray(params["dense_0"]["kernel"] - delta)  # the client's trained kernel

  one, five = local_kernel(1), local_kernel(5)
  assert 0.0 < one[1, 1] < 0.1  # pushed below tau by the first step
  assert five[1, 1] == one[1, 1]  # ... and not updated after it
  assert five[1, 0] > one[1, 0] > 0.8  # the weights above tau keep training

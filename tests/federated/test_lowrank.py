"""Factored dense client kernels (`performance.LowRankDense`): same rounds as dense SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import federated, models, performance, testing
from fedjax_prune.data import from_client_lists, to_device

LR = 0.05


def _problem(spec, sizes=(7, 13, 0, 4, 9), seed=0):
  """Random data for `spec` with unequal (one empty) clients."""
  rng = np.random.default_rng(seed)
  shape = tuple(spec.input_shape)
  xs = [rng.normal(size=(n,) + shape).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, spec.num_classes, n).astype(np.int32) for n in sizes]
  apply_fn, params, stats = models.build(spec, jax.random.key(seed), conv_impl='im2col')
  return apply_fn, params, stats, to_device(from_client_lists(xs, ys, allow_empty=True))


def _round(apply_fn, params, stats, data, schedule, execution, lowrank, rounds=2):
  alg = federated.fedavg(apply_fn, optax.sgd(LR), schedule, lowrank=lowrank)
  state = alg.init(params, jax.random.key(1), batch_stats=stats)
  round_fn = federated.make_round(alg, execution=execution)
  cohort = federated.make_cohort(np.arange(data.num_examples.shape[0]))
  for r in range(rounds):
    state, metrics = round_fn(state, data, cohort, jax.random.key(10 + r))
  return state, metrics


CONVNET = models.ConvNetSpec(input_shape=(8, 8, 1), convs=(models.ConvSpec(features=3, pool=2),),
                             hidden=(24,), num_classes=5)
MLP = models.mlp(input_shape=(10,), hidden=(16, 12), num_classes=4)


_EPOCHS = federated.LocalSchedule(batch_size=4, num_epochs=2)
_STEPS_UNROLL2 = federated.LocalSchedule(batch_size=3, num_steps=3, unroll=2)
_SLOW = pytest.mark.slow  # the default suite covers each execution and each schedule once


@pytest.mark.parametrize("execution,schedule", [
    pytest.param(federated.Sequential(), _EPOCHS, id="epochs-sequential"),
    pytest.param(federated.Vmap(), _STEPS_UNROLL2, id="steps-unroll2-vmap"),
    pytest.param(federated.Chunked(2), _EPOCHS, id="epochs-chunked2"),
    pytest.param(federated.Vmap(), _EPOCHS, id="epochs-vmap", marks=_SLOW),
    pytest.param(federated.Sequential(), _STEPS_UNROLL2, id="steps-unroll2-sequential", marks=_SLOW),
    pytest.param(federated.Chunked(2), _STEPS_UNROLL2, id="steps-unroll2-chunked2", marks=_SLOW)])
def test_factored_dense_kernels_give_the_dense_rounds(execution, schedule):
  apply_fn, params, stats, data = _problem(CONVNET)
  dense_state, dense_metrics = _round(apply_fn, params, stats, data, schedule, execution, None)
  lowrank = performance.LowRankDense(("dense_0", "dense_1"), LR)
  state, metrics = _round(apply_fn, params, stats, data, schedule, execution, lowrank)
  testing.assert_trees_close(state.params, dense_state.params, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(metrics["train_loss"], dense_metrics["train_loss"], rtol=1e-5)
  # The round trained something: the kernels moved.
  assert float(jnp.max(jnp.abs(state.params["dense_0"]["kernel"] - params["dense_0"]["kernel"]))) > 1e-3


def test_mlp_and_one_factored_layer_with_sharded_cohort():
  apply_fn, params, stats, data = _problem(MLP, sizes=(6, 2, 11))
  schedule = federated.LocalSchedule(batch_size=4, num_epochs=1)
  lowrank = performance.LowRankDense(("dense_1",), LR)
  mesh = federated.client_mesh(jax.devices()[:2]) if jax.device_count() >= 2 else None
  alg = federated.fedavg(apply_fn, optax.sgd(LR), schedule, lowrank=lowrank)
  dense_alg = federated.fedavg(apply_fn, optax.sgd(LR), schedule)
  cohort = federated.make_cohort([2, 0, 1])
  out = federated.make_round(alg, execution=federated.Vmap(), mesh=mesh)(
      alg.init(params, None), data, cohort, jax.random.key(3))[0]
  ref = federated.make_round(dense_alg, execution=federated.Sequential())(
      dense_alg.init(params, None), data, cohort, jax.random.key(3))[0]
  testing.assert_trees_close(out.params, ref.params, rtol=2e-5, atol=2e-6)


def test_client_kernel_is_base_plus_factors_and_matches_dense_local_training():
  apply_fn, params, stats, data = _problem(CONVNET)
  schedule = federated.LocalSchedule(batch_size=4, num_epochs=1)
  one = jax.tree.map(lambda a: a[1], data)  # 13 examples: 4 steps, the last partial
  dense = federated.make_local_train(apply_fn, optax.sgd(LR), schedule)
  factored = federated.make_local_train(apply_fn, optax.sgd(LR), schedule,
                                        lowrank=performance.LowRankDense(("dense_0",), LR))
  ref, ref_metrics = jax.jit(dense)(params, stats, one, jax.random.key(4))
  got, metrics = jax.jit(factored)(params, stats, one, jax.random.key(4))
  kernel = got.params["dense_0"]["kernel"]
  assert isinstance(kernel, performance.FactoredKernel)
  assert kernel.left.shape == (16, params["dense_0"]["kernel"].shape[0])  # 4 steps x batch 4 rows
  np.testing.assert_array_equal(kernel.base, params["dense_0"]["kernel"])  # the server kernel
  got_params = jax.tree.map(lambda x: x.dense() if isinstance(x, performance.FactoredKernel) else x,
                            got.params, is_leaf=lambda x: isinstance(x, performance.FactoredKernel))
  testing.assert_trees_close(got_params, ref.params, rtol=2e-5, atol=2e-6)
  assert float(metrics.num_steps) == float(ref_metrics.num_steps) == 4.0
  # The partial last batch's padding rows contribute nothing (zero output gradients).
  np.testing.assert_array_equal(kernel.right[13:], 0.0)
  # More rows than the schedule fills (a calibration round priced at a longer run's size):
  # zero rows, the same kernel.
  padded = federated.make_local_train(apply_fn, optax.sgd(LR), schedule,
                                      lowrank=performance.LowRankDense(("dense_0",), LR, rows=40))
  got40, _ = jax.jit(padded)(params, stats, one, jax.random.key(4))
  kernel40 = got40.params["dense_0"]["kernel"]
  assert kernel40.left.shape[0] == 40
  np.testing.assert_array_equal(kernel40.right[16:], 0.0)
  np.testing.assert_allclose(kernel40.dense(), kernel.dense(), rtol=1e-6, atol=1e-7)


def test_lowrank_sum_reduction_is_one_gemm_of_the_stacked_factors():
  left = jax.random.normal(jax.random.key(0), (3, 5, 4))
  right = jax.random.normal(jax.random.key(1), (3, 5, 2))
  from fedjax_prune.federated import _engine
  summed = _engine._sum_stacked({"w": performance.LowRankSum(left, right), "b": jnp.ones((3, 2))})
  expected = sum(left[c].T @ right[c] for c in range(3))
  np.testing.assert_allclose(summed["w"], expected, rtol=1e-5)
  np.testing.assert_allclose(summed["b"], 3.0 * np.ones(2))


def test_worthwhile_layers_follow_the_memory_rule():
  shapes, _ = models.param_shapes(models.leaf_femnist_cnn())
  # 4 steps x 32 rows: the 3136x2048 kernel pays off, the 2048x62 logits layer does not.
  assert performance.worthwhile_lowrank_layers(shapes, 128) == ("dense_0",)
  # 50 epochs of many steps: nothing is cheaper as factors.
  assert performance.worthwhile_lowrank_layers(shapes, 20000) == ()
  with pytest.raises(ValueError, match="rows"):
    performance.worthwhile_lowrank_layers(shapes, 0)


def test_lowrank_rejects_what_it_cannot_do_exactly():
  apply_fn, params, stats, data = _problem(CONVNET)
  schedule = federated.LocalSchedule(batch_size=4)
  lowrank = performance.LowRankDense(("dense_0",), LR)
  with pytest.raises(ValueError, match="FedProx"):
    federated.fedavg(apply_fn, optax.sgd(LR), schedule, lowrank=lowrank, prox_mu=0.1)
  with pytest.raises(ValueError, match="masks"):
    federated.fedavg(apply_fn, optax.sgd(LR), schedule, lowrank=lowrank).init(
        params, None, masks=federated.dense_masks(params))
  with pytest.raises(ValueError, match="not a dense layer"):
    local = federated.make_local_train(apply_fn, optax.sgd(LR), schedule,
                                       lowrank=performance.LowRankDense(("conv_0",), LR))
    local(params, stats, jax.tree.map(lambda a: a[0], data), jax.random.key(0))
  with pytest.raises(ValueError, match="learning_rate"):
    performance.LowRankDense(("dense_0",), 0.0)
  with pytest.raises(ValueError, match="tuple of layer names"):
    performance.LowRankDense("dense_0", LR)
  with pytest.raises(ValueError, match="rows"):
    performance.LowRankDense(("dense_0",), LR, rows=0)
  with pytest.raises(ValueError, match="momentum"):
    performance.LowRankDense(("dense_0",), LR, momentum=1.0)
  resnet_apply, resnet_params, resnet_stats = models.build(
      models.cifar_resnet(depth=8, num_classes=3, width_multiplier=0.25), jax.random.key(0))
  with pytest.raises(ValueError, match="MLPSpec and ConvNetSpec"):
    resnet_apply(resnet_params, resnet_stats, jnp.zeros((2, 32, 32, 3)), train=True,
                 dense_lowrank={"head": (jnp.zeros((1, 4)), jnp.zeros((1, 3)), jnp.zeros((2, 3)))})


@pytest.mark.parametrize("optimizer, accepted", [
    (optax.sgd(LR), True),
    (optax.sgd(LR, momentum=0.9), False),        # momentum the factors do not apply
    (optax.sgd(2 * LR), False),                  # another learning rate
    (optax.adam(LR), False),
    (optax.adamw(LR, weight_decay=0.0), False),
    (optax.sgd(optax.linear_schedule(LR, 0.0, 10)), False),  # lr changes from step 2
    (optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(LR)), False),
    (optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR)), False),
])
def test_fedavg_lowrank_refuses_a_client_optimizer_that_is_not_its_sgd(optimizer, accepted):
  """The factored kernels are trained by LowRankDense's SGD whatever the client optimizer:
  another optimizer would silently make the run differ from the dense one it stands for."""
  apply_fn, *_ = _problem(MLP)
  schedule = federated.LocalSchedule(batch_size=4)
  lowrank = performance.LowRankDense(("dense_0",), LR)
  if accepted:
    federated.fedavg(apply_fn, optimizer, schedule, lowrank=lowrank)
  else:
    with pytest.raises(ValueError, match=r"lowrank trains its dense kernels by SGD.*client optimizer"):
      federated.fedavg(apply_fn, optimizer, schedule, lowrank=lowrank)


def test_fedavg_lowrank_with_momentum_accepts_the_matching_momentum_sgd():
  apply_fn, *_ = _problem(MLP)
  schedule = federated.LocalSchedule(batch_size=4)
  lowrank = performance.LowRankDense(("dense_0",), LR, momentum=0.9)
  federated.fedavg(apply_fn, optax.sgd(LR, momentum=0.9), schedule, lowrank=lowrank)
  for other in (optax.sgd(LR), optax.sgd(LR, momentum=0.5), optax.sgd(LR, momentum=0.9, nesterov=True)):
    with pytest.raises(ValueError, match="momentum=0.9"):
      federated.fedavg(apply_fn, other, schedule, lowrank=lowrank)


def test_strategy_names_and_candidates_with_lowrank():
  s = performance.Strategy.from_name("sequential+tapgrad+unroll4+lowrank+sharded")
  assert (s.unroll, s.lowrank, s.sharded, s.conv_impl) == (4, True, True, "tapgrad")
  assert s.name == "sequential+tapgrad+unroll4+lowrank+sharded"
  assert performance.Strategy.from_name("vmap+lax+lowrank").name == "vmap+lax+lowrank"
  cpu = [c.name for c in performance.candidate_strategies(cohort_size=8, has_conv=True, backend="cpu",
                                                         unroll=4, lowrank=True)]
  assert cpu[:4] == ["sequential+tapgrad", "sequential+tapgrad+unroll4",
                     "sequential+tapgrad+lowrank", "sequential+tapgrad+unroll4+lowrank"]
  assert not any(c.lowrank for c in performance.candidate_strategies(
      cohort_size=8, has_conv=True, backend="cpu", unroll=4))
  gpu = [c.name for c in performance.candidate_strategies(cohort_size=512, has_conv=True, backend="gpu",
                                                         lowrank=True)]
  assert "vmap+im2col+lowrank" in gpu and "chunked128+lax+lowrank" in gpu
  shapes, _ = models.param_shapes(models.leaf_femnist_cnn())
  assert s.lowrank_dense(shapes, 128, 0.1) == performance.LowRankDense(("dense_0",), 0.1)
  assert performance.Strategy.from_name("vmap+lax").lowrank_dense(shapes, 128, 0.1) is None
  with pytest.raises(ValueError, match="no dense kernel"):
    s.lowrank_dense(shapes, 20000, 0.1)  # so many rows that no kernel is worth factoring


def test_row_weights_known_values():
  w = performance._lowrank.row_weights(6, 2, jnp.asarray(2), 0.1, 0.5)
  # step 0 entered 2 updates (1 + 0.5), step 1 one, step 2 none yet
  np.testing.assert_allclose(w, [-0.15, -0.15, -0.1, -0.1, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(performance._lowrank.row_weights(6, 2, jnp.asarray(3), 0.1, 0.0),
                             [-0.1] * 6, rtol=1e-6)


@pytest.mark.parametrize("execution", [federated.Sequential(), pytest.param(federated.Vmap(), marks=_SLOW)],
                         ids=["sequential", "vmap"])
def test_momentum_sgd_factors_give_the_dense_momentum_rounds(execution):
  apply_fn, params, stats, data = _problem(CONVNET)
  schedule = federated.LocalSchedule(batch_size=4, num_epochs=2)  # up to 8 steps, unequal clients

  def run(lowrank, momentum=0.9):
    alg = federated.fedavg(apply_fn, optax.sgd(LR, momentum=momentum or None), schedule,
                           lowrank=lowrank)
    state = alg.init(params, None, batch_stats=stats)
    round_fn = federated.make_round(alg, execution=execution)
    cohort = federated.make_cohort(np.arange(data.num_examples.shape[0]))
    for r in range(2):
      state, _ = round_fn(state, data, cohort, jax.random.key(20 + r))
    return state.params

  dense = run(None)
  factored = run(performance.LowRankDense(("dense_0",), LR, momentum=0.9))
  testing.assert_trees_close(factored, dense, rtol=2e-5, atol=2e-6)
  # Momentum mattered: plain SGD (dense, or factors with plain SGD) gives another model.
  plain = run(performance.LowRankDense(("dense_0",), LR), momentum=0.0)
  testing.assert_trees_close(plain, run(None, momentum=0.0), rtol=2e-5, atol=2e-6)
  assert float(jnp.max(jnp.abs(plain["dense_0"]["kernel"] - dense["dense_0"]["kernel"]))) > 1e-4

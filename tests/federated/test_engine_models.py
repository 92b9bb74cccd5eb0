"""The engine with real model code: conv lowerings and BatchNorm through a round."""
import jax
import numpy as np
import optax
import pytest

from fedjax_prune import federated, models, performance, testing
from fedjax_prune.data import from_client_lists, to_device


def _conv_problem(norm):
  spec = models.ConvNetSpec(input_shape=(8, 8, 1),
                            convs=(models.ConvSpec(features=4, kernel=3, pool=2, norm=norm != "none"),
                                   models.ConvSpec(features=6, kernel=3, stride=2)),
                            num_classes=3, head="gap", hidden=(), norm=norm)
  rng = np.random.default_rng(0)
  sizes = (7, 12, 4)
  xs = [rng.normal(size=(n, 8, 8, 1)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 3, n).astype(np.int32) for n in sizes]
  return spec, to_device(from_client_lists(xs, ys))


def _round(spec, data, strategy, rounds=1, epochs=1):
  apply_fn, params, batch_stats = models.build(spec, jax.random.key(0), conv_impl=strategy.conv_impl)
  alg = federated.fedavg(apply_fn, optax.sgd(0.1),
                         federated.LocalSchedule(batch_size=5, num_epochs=epochs))
  state = alg.init(params, jax.random.key(1), batch_stats=batch_stats)
  round_fn = federated.make_round(alg, execution=strategy.execution)
  for r in range(rounds):
    state, metrics = round_fn(state, data, federated.make_cohort([0, 1, 2]), jax.random.key(r))
  return state, metrics


STRATEGIES = [performance.Strategy.from_name(n) for n in
              ("sequential+tapgrad", "sequential+lax", "sequential+im2col", "vmap+im2col",
               "chunked2+tapgrad")]


# The default suite runs each lowering against the reference under one or two norms (a
# compile each); the full cross product runs with -m slow.
FAST_STRATEGIES = {"none": ("sequential+lax", "vmap+im2col"),
                   "batch_running": ("sequential+im2col", "chunked2+tapgrad"),
                   "batch_static": ("vmap+im2col", "sequential+lax")}


@pytest.mark.parametrize("every_strategy", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["some", "all"])
@pytest.mark.parametrize("norm", ["none", "batch_running", "batch_static"])
def test_every_strategy_and_conv_lowering_gives_the_same_round(norm, every_strategy):
  """All lowerings agree to float rounding (~1e-7 per step). Rounding differences
  grow along a trajectory (BatchNorm amplifies them: vmapped lax convolutions are
  grouped convolutions that sum in another order), so compare one round."""
  spec, data = _conv_problem(norm)
  reference, ref_metrics = _round(spec, data, STRATEGIES[0])
  fast = [performance.Strategy.from_name(n) for n in FAST_STRATEGIES[norm]]
  for strategy in STRATEGIES[1:] if every_strategy else fast:
    state, metrics = _round(spec, data, strategy)
    testing.assert_trees_close(state.params, reference.params, rtol=1e-5, atol=1e-6)
    testing.assert_trees_close(state.batch_stats, reference.batch_stats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["train_loss"], ref_metrics["train_loss"], rtol=1e-5)
  if norm == "batch_running":
    # FedAvg averages the running statistics: they moved away from their init.
    assert not np.allclose(reference.batch_stats["bn_0"]["mean"], 0.0)


def test_running_stats_are_the_example_weighted_mean_of_client_stats():
  spec, data = _conv_problem("batch_running")
  apply_fn, params, batch_stats = models.build(spec, jax.random.key(0), conv_impl="tapgrad")
  schedule = federated.LocalSchedule(batch_size=5)
  alg = federated.fedavg(apply_fn, optax.sgd(0.1), schedule)
  state = alg.init(params, jax.random.key(1), batch_stats=batch_stats)
  state, _ = federated.make_round(alg)(state, data, federated.make_cohort([0, 1, 2]), jax.random.key(0))
  local_train = jax.jit(federated.make_local_train(apply_fn, optax.sgd(0.1), schedule))
  client_root, _ = federated.split_round_key(jax.random.key(0))
  stats, weights = [], []
  for k in range(3):
    local, _ = local_train(params, batch_stats, jax.tree.map(lambda a: a[k], data),
                           jax.random.fold_in(client_root, k))
    stats.append(local.batch_stats); weights.append(float(data.num_examples[k]))
  w = np.asarray(weights) / sum(weights)
  expected = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *stats)
  testing.assert_trees_close(state.batch_stats, expected, rtol=1e-5, atol=1e-6)


def test_vmapped_lax_convolutions_agree_without_batchnorm():
  """vmap+lax (grouped convolutions) matches the others on a BN-free model.

  Known finding (XLA:CPU, jax 0.10.2): with BatchNorm after the first conv,
  vmap+lax drifts from every other lowering by ~1e-3 in conv_0's kernel after a
  few steps, far above rounding; the CPU strategy list never offers vmap+lax
  (it is also 4-9x slower there), and this needs checking on GPU.
  """
  spec, data = _conv_problem("none")
  reference, _ = _round(spec, data, STRATEGIES[0])
  state, _ = _round(spec, data, performance.Strategy.from_name("vmap+lax"))
  testing.assert_trees_close(state.params, reference.params, rtol=1e-5, atol=1e-6)


def test_cpu_candidates_never_include_vmapped_lax_convolutions():
  names = [s.name for s in performance.candidate_strategies(cohort_size=8, has_conv=True, backend="cpu")]
  assert "vmap+lax" not in names and "sequential+lax" not in names and "sequential+tapgrad" in names

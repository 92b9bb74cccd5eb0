"""CAVP's θ updates on outcome (issue 26): with frozen weights on a task built so that one
unit carries the label and the other nothing, projected SGD on θ raises the useful unit's
keep-probability with λ = 0 (and with a small λ), sends the useless one to 0 under a moderate
λ, and the gates end in {0, 1}. A sign error in the loss part of an estimator fails these.
Also: Adam on θ with its state kept across rounds is one Adam run (not a restart per round),
and θ frozen at 1 (the sweeps' dense baseline) stays exactly 1."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import data as data_lib
from fedjax_prune import federated, models
from fedjax_prune.pruning import cavp

EXAMPLES = 256


def _task():
  """x in R^2 (one 1x1 'pixel', two channels), y = [x0 > 0]; a 1x1 conv copies x0 to unit 0
  and x1 (noise) to unit 1; the head reads unit 0 only: gating unit 0 off loses the label,
  unit 1 is useless (no outgoing weight)."""
  spec = models.ConvNetSpec(input_shape=(1, 1, 2), num_classes=2, head="gap",
                            convs=(models.ConvSpec(features=2, kernel=(1, 1)),))
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  params["conv_0"]["kernel"] = jnp.eye(2).reshape(1, 1, 2, 2)
  params["conv_0"]["bias"] = jnp.zeros(2)
  params["dense_0"]["kernel"] = jnp.array([[-4.0, 4.0], [0.0, 0.0]])  # unit 1 reaches nothing
  params["dense_0"]["bias"] = jnp.array([1.0, 0.0])
  x = jax.random.normal(jax.random.key(1), (EXAMPLES, 1, 1, 2))
  y = (x[:, 0, 0, 0] > 0).astype(jnp.int32)
  data = data_lib.ClientData(x, y, jnp.int32(EXAMPLES))
  return spec, apply_fn, params, stats, data


def _train_theta(estimator, lam_value, steps, theta_init=0.5, lr=0.5):
  """θ after `steps` local steps of projected SGD with frozen weights (one client)."""
  spec, apply_fn, params, stats, data = _task()
  options = cavp.Options(structures="units", theta_init=theta_init, unit_estimator=estimator,
                         prune_threshold=0.0)
  local = cavp.make_local_train(apply_fn, optax.sgd(0.0), optax.sgd(lr),
                                federated.LocalSchedule(batch_size=32, num_steps=steps), options)
  theta = cavp.init_theta(spec, options)
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  lam = jax.tree.map(lambda t: jnp.full(t.shape, lam_value, jnp.float32), theta)
  out, _ = jax.jit(local)(params, stats, theta, alive, lam, jnp.float32(jnp.nan), data,
                          jax.random.key(2))
  return np.asarray(out.theta["conv_0"]), (apply_fn, params, stats, data)


@pytest.mark.parametrize("estimator", ["straight_through", "reinforce"])
def test_useful_unit_theta_rises_without_and_with_a_small_penalty(estimator):
  for lam in (0.0, 0.02):
    theta, _ = _train_theta(estimator, lam, steps=40)
    assert theta[0] > 0.75, (estimator, lam, theta)  # the loss part's sign: keep what helps
    if lam > 0:
      assert theta[1] < 0.5, (estimator, lam, theta)  # nothing but the penalty acts on unit 1


@pytest.mark.parametrize("estimator", ["straight_through", "reinforce"])
def test_theta_converges_to_zero_or_one_and_keeps_the_ungated_accuracy(estimator):
  theta, (apply_fn, params, stats, data) = _train_theta(estimator, 0.02, steps=150)
  np.testing.assert_allclose(theta, [1.0, 0.0], atol=0.02)
  gates = {"conv_0": jnp.asarray(cavp.deterministic_gates(
      {"conv_0": jnp.asarray(theta)}, {"conv_0": jnp.ones(2, bool)})["conv_0"], jnp.float32)}
  gated = apply_fn(params, stats, data.x, train=False, gates=gates)[0]
  ungated = apply_fn(params, stats, data.x, train=False)[0]
  accuracy = lambda logits: float(jnp.mean(jnp.argmax(logits, -1) == data.y))
  assert accuracy(ungated) > 0.9 and accuracy(gated) == accuracy(ungated)


def test_bn_recalibration_gives_the_statistics_of_the_network_it_runs():
  """After training with stochastic gates, the deterministic network's BatchNorm statistics
  are re-estimated (issue 26): on a conv(identity) -> BN model the running mean and variance
  become the data's."""
  spec = models.ConvNetSpec(input_shape=(1, 1, 3), num_classes=2, head="gap", norm="batch_running",
                            convs=(models.ConvSpec(features=3, kernel=(1, 1), norm=True, bias=False),))
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  params["conv_0"]["kernel"] = jnp.eye(3).reshape(1, 1, 3, 3)
  x = 2.0 + 3.0 * jax.random.normal(jax.random.key(1), (512, 1, 1, 3))
  new = cavp.recalibrate_batch_stats(apply_fn, params, stats, x, batch_size=512, num_steps=150)
  flat = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(new["bn_0"]["mean"], flat.mean(0), rtol=1e-3)
  np.testing.assert_allclose(new["bn_0"]["var"], flat.var(0), rtol=1e-2)
  assert not np.allclose(np.asarray(stats["bn_0"]["mean"]), flat.mean(0))  # it did change them
  assert cavp.recalibrate_batch_stats(apply_fn, params, {}, x) == {}


def test_bn_recalibration_on_transformed_inputs_gives_their_statistics():
  """`recalibrate_batch_stats(transform=...)` re-estimates the statistics of the transformed
  inputs (what the network was trained on): with x -> 3 x - 1 + noise(key) the running mean
  becomes 3 mean(x) - 1, and the transform sees a different key in each pass."""
  spec = models.ConvNetSpec(input_shape=(1, 1, 3), num_classes=2, head="gap", norm="batch_running",
                            convs=(models.ConvSpec(features=3, kernel=(1, 1), norm=True, bias=False),))
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  params["conv_0"]["kernel"] = jnp.eye(3).reshape(1, 1, 3, 3)
  x = 2.0 + jax.random.normal(jax.random.key(1), (512, 1, 1, 3))
  transform = lambda xb, k: 3.0 * xb - 1.0 + 0.01 * jax.random.normal(k, xb.shape)
  new = cavp.recalibrate_batch_stats(apply_fn, params, stats, x, batch_size=512, num_steps=150,
                                     transform=transform, key=jax.random.key(2))
  flat = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(new["bn_0"]["mean"], 3 * flat.mean(0) - 1, rtol=2e-3)
  np.testing.assert_allclose(new["bn_0"]["var"], 9 * flat.var(0), rtol=1e-2)
  same_key = lambda xb, k: xb + jax.random.normal(k, xb.shape)
  one = cavp.recalibrate_batch_stats(apply_fn, params, stats, x, batch_size=512, num_steps=2,
                                     transform=same_key, key=jax.random.key(3))
  # Pass 2 with pass 1's key would give the same batch: its EMA would differ from this.
  fixed = lambda xb, k: same_key(xb, jax.random.fold_in(jax.random.key(3), 0))
  two = cavp.recalibrate_batch_stats(apply_fn, params, stats, x, batch_size=512, num_steps=2,
                                     transform=fixed, key=jax.random.key(3))
  assert not np.allclose(one["bn_0"]["var"], two["bn_0"]["var"])
  with pytest.raises(ValueError, match="needs key="):
    cavp.recalibrate_batch_stats(apply_fn, params, stats, x, transform=transform)


def _recording(inner, capacity):
  """`inner` whose state also records each step's θ-gradient and the θ it was taken at
  (buffers [capacity, *gate shape]), so that a test can replay the steps."""

  def init(theta):
    zeros = lambda t: jnp.zeros((capacity,) + t.shape, t.dtype)
    return (inner.init(theta), jax.tree.map(zeros, theta), jax.tree.map(zeros, theta),
            jnp.zeros((), jnp.int32))

  def update(grads, state, params):
    inner_state, grads_buf, theta_buf, i = state
    grads_buf = jax.tree.map(lambda b, g: b.at[i].set(g), grads_buf, grads)
    theta_buf = jax.tree.map(lambda b, t: b.at[i].set(t), theta_buf, params)
    updates, inner_state = inner.update(grads, inner_state, params)
    return updates, (inner_state, grads_buf, theta_buf, i + 1)

  return optax.GradientTransformation(init, update)


def test_persistent_adam_on_theta_continues_across_rounds():
  """Issue 26: with `persist_theta_optimizer` the θ optimizer's state lives in the server
  state, so two rounds of S steps are S * 2 steps of ONE optax.adam run (replayed here from
  the recorded gradients), and round 2's first step is not Adam's restart step lr * sign(g);
  without it, round 2 restarts: its first step is exactly that sign step."""
  spec, apply_fn, params, stats, data = _task()
  lr, steps, rounds = 0.05, 3, 2
  schedule = federated.LocalSchedule(batch_size=32, num_steps=steps)
  adam = optax.adam(lr)
  options = cavp.Options(structures="units", theta_init=0.5, prune_threshold=0.0,
                         persist_theta_optimizer=True)
  lam = {"conv_0": jnp.full(2, 0.02, jnp.float32)}
  alg = cavp.cavp(apply_fn, optax.sgd(0.0), _recording(adam, steps * rounds), schedule, options,
                  uniform_weights=True, spec=spec)
  state = alg.init(params, jax.random.key(0), stats, lam=lam)
  clients = data_lib.ClientData(data.x[None], data.y[None], data.num_examples[None])
  round_fn = jax.jit(federated.make_round(alg))
  for r in range(rounds):
    state, _ = round_fn(state, clients, federated.make_cohort([0]), jax.random.key(10 + r))
  inner_state, grads_buf, theta_buf, count = state.theta_opt
  assert int(count) == steps * rounds  # one optimizer over both rounds
  g, seen = np.asarray(grads_buf["conv_0"]), np.asarray(theta_buf["conv_0"])

  # Reference: one optax.adam over the recorded gradients, projected after every step.
  alive = {"conv_0": jnp.ones(2, bool)}
  theta = {"conv_0": jnp.full(2, 0.5, jnp.float32)}
  ref_state = adam.init(theta)
  for k in range(steps * rounds):
    np.testing.assert_allclose(seen[k], theta["conv_0"], rtol=1e-6, atol=1e-7)
    updates, ref_state = adam.update({"conv_0": jnp.asarray(g[k])}, ref_state, theta)
    theta = cavp.project(optax.apply_updates(theta, updates), alive, options)
  np.testing.assert_allclose(state.theta["conv_0"], theta["conv_0"], rtol=1e-6, atol=1e-7)
  for got, want in zip(jax.tree.leaves(inner_state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)

  # Unit 0 (the useful one) sees a varying gradient: round 2's first step is Adam's
  # m/sqrt(v) step, far from the restarted optimizer's sign step.
  sign_step = np.clip(seen[steps] - lr * np.sign(g[steps]), 0.0, 1.0)
  assert np.ptp(g[:steps + 1, 0]) > 0.1 * np.abs(g[:steps + 1, 0]).max(), g  # it varies
  assert abs(seen[steps + 1][0] - sign_step[0]) > 0.1 * lr, (seen, g)

  # Without persistence: round 2 (from round 1's θ) restarts Adam, and its first step is
  # lr * sign(g) up to Adam's eps.
  local = cavp.make_local_train(apply_fn, optax.sgd(0.0), _recording(adam, steps), schedule,
                                options)
  out, _ = jax.jit(local)(params, stats, {"conv_0": jnp.asarray(seen[steps])}, alive, lam,
                          jnp.float32(jnp.nan), data, jax.random.key(3))
  _, g2, t2, _ = out.theta_opt
  g2, t2 = np.asarray(g2["conv_0"]), np.asarray(t2["conv_0"])
  np.testing.assert_allclose(t2[1], np.clip(t2[0] - lr * np.sign(g2[0]), 0.0, 1.0), atol=1e-6)


def test_theta_frozen_at_one_stays_one():
  """The sweeps' dense baseline (theta_init=1, θ learning rate 0): every gate stays exactly 1,
  so every sampled gate is 1 and the finalised network is the whole model."""
  spec, apply_fn, params, stats, data = _task()
  options = cavp.Options(structures="units", theta_init=1.0)
  local = cavp.make_local_train(apply_fn, optax.sgd(0.1), optax.sgd(0.0),
                                federated.LocalSchedule(batch_size=32, num_steps=5), options)
  theta = cavp.init_theta(spec, options)
  alive = jax.tree.map(lambda t: jnp.ones(t.shape, bool), theta)
  lam = jax.tree.map(lambda t: jnp.full(t.shape, 5.0, jnp.float32), theta)  # no effect at lr 0
  out, _ = jax.jit(local)(params, stats, theta, alive, lam, jnp.float32(jnp.nan), data,
                          jax.random.key(0))
  np.testing.assert_array_equal(out.theta["conv_0"], [1.0, 1.0])
  assert not np.array_equal(out.params["conv_0"]["kernel"], params["conv_0"]["kernel"])

"""FedTiny outcomes on tasks dense FedAvg learns in seconds (issue 25, REPRODUCE.md §4):
adaptive BN selection picks the candidate whose pooled-statistics loss is lowest, FedTiny
at density 0.1 keeps >= 90 % of the dense accuracy at equal training without collapsing to
one class, and prune-and-grow keeps the density exact with grown weights starting at 0.

The default task is 4 Gaussian blobs in 64 dimensions over 6 clients
(`testing.tiny_client_data`), read by a one-hidden-layer network with BatchNorm (a 1x1 conv
on a 1x1 "image", so ABNS has BN statistics to pool); the slow variant is glyph images and
a two-conv CNN.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import data as data_lib
from fedjax_prune import federated, models, testing
from fedjax_prune import masks as masks_lib
from fedjax_prune.pruning import _sparse, base
from fedjax_prune.pruning import fedtiny as ft

CLIENTS, CLASSES, FEATURES, HIDDEN = 6, 4, 64, 32
TRAIN, TEST = 32, 16  # examples per client
ROUNDS = 8
DENSITY = 0.1
SCHED = federated.LocalSchedule(batch_size=8, num_steps=4)


@functools.lru_cache(maxsize=None)
def _task():
  """(train ClientData, test x [96, 64], test y [96]): the blobs, 32 + 16 examples per client."""
  both = testing.tiny_client_data(seed=0, num_clients=CLIENTS, in_features=FEATURES,
                                  num_classes=CLASSES, sizes=(TRAIN + TEST,) * CLIENTS)
  train = data_lib.ClientData(both.x[:, :TRAIN], both.y[:, :TRAIN],
                              jnp.full((CLIENTS,), TRAIN, jnp.int32))
  return train, both.x[:, TRAIN:].reshape(-1, FEATURES), both.y[:, TRAIN:].reshape(-1)


def _spec():
  """64 -> 32 (1x1 conv, BN, ReLU) -> 4: 2,244 parameters, 68 of them dense (BN, bias)."""
  return models.ConvNetSpec(input_shape=(1, 1, FEATURES), num_classes=CLASSES,
                            norm="batch_running", head="flatten",
                            convs=(models.ConvSpec(features=HIDDEN, kernel=1, norm=True,
                                                   bias=False),))


def _apply_for(spec):
  apply_fn = models.make_apply(spec)
  return lambda p, s, x, **kw: apply_fn(p, s, x.reshape((x.shape[0],) + spec.input_shape), **kw)


def _predict(apply_fn, params, batch_stats, x):
  logits, _ = apply_fn(params, batch_stats, x, train=False)
  return np.asarray(jnp.argmax(logits, -1))


@functools.lru_cache(maxsize=None)
def _trained(kind: str):
  """Server states after each of ROUNDS rounds of every client: 'dense' FedAvg or 'fedtiny'
  at DENSITY (3 ABNS candidates, 2 blocks adjusted alternately every round before T_end =
  ROUNDS), from the same init key with the same local schedule and round keys."""
  train, _, _ = _task()
  spec = _spec()
  params, stats = models.init_params(spec, jax.random.key(0))
  run = base.SparseRun(spec=spec, params=params, batch_stats=stats, key=jax.random.key(0),
                       optimizer=optax.sgd(0.05), schedule=SCHED,
                       model=federated.ModelFns(_apply_for, lambda apply_fn: None), train=train,
                       clients_per_round=CLIENTS, rounds=ROUNDS)
  cohort = federated.make_cohort(range(CLIENTS))
  if kind == "dense":
    method = base.dense_method(run)
  else:
    blocks = ft.network_blocks(params, _sparse.prunable_filter(params), 2)
    method = ft.fedtiny_method(run, density=DENSITY, num_candidates=3, abns_cohort=cohort,
                               abns_batch_size=16, progressive=ft.Blockwise(blocks),
                               adjust_every=1, adjust_end=ROUNDS)
  state = method.init().server
  round_fn = federated.make_round(method.algorithm(spec), execution=federated.Vmap())
  history = [state]
  for t in range(ROUNDS):
    state, _ = round_fn(state, train, cohort, jax.random.key(100 + t))
    history.append(state)
  return tuple(history)


# ----------------------------------------------------------------------------
# (a) Adaptive BN selection picks the candidate of lowest pooled-statistics loss.


def _pooled_statistics_loss(apply_fn, params, train):
  """Independent reference: the hidden layer's BN statistics over ALL clients' training
  examples (a 1x1 conv is a matmul), then the mean over clients of each client's mean loss
  in eval mode with them. Returns (loss, batch_stats)."""
  kernel = params["conv_0"]["kernel"].reshape(FEATURES, HIDDEN)
  hidden = train.x.reshape(-1, FEATURES) @ kernel
  stats = {"bn_0": {"mean": hidden.mean(0), "var": hidden.var(0)}}

  def client_loss(x, y):
    logits, _ = apply_fn(params, stats, x, train=False)
    return jnp.mean(federated.softmax_cross_entropy(logits, y))

  return jnp.mean(jax.vmap(client_loss)(train.x, train.y)), stats


def _masks_by_score(params, score_fn, density):
  """Host-side per-kernel top-k of score_fn(|w|) at `density` (biases and BN kept)."""
  def one(w):
    if w.ndim < 2:
      return np.ones((), bool)
    score = score_fn(np.abs(np.asarray(w))).reshape(-1)
    keep = np.zeros(score.size, bool)
    keep[np.argsort(-score, kind="stable")[:round(density * score.size)]] = True
    return keep.reshape(w.shape)
  return jax.tree.map(one, params)


def test_abns_picks_the_candidate_with_the_lowest_pooled_statistics_loss():
  """Three candidates share the dense FedAvg model's trained weights with 30 % of every
  kernel kept and initial BN statistics: a random mask, the magnitude mask (keeps the
  informative weights) and the anti-magnitude mask (keeps the smallest). The good one sits
  in the middle, so a selector by index (first or last) or by the highest loss fails."""
  train, _, _ = _task()
  spec = _spec()
  apply_fn = _apply_for(spec)
  trained = _trained("dense")[-1].params
  _, init_stats = models.init_params(spec, jax.random.key(0))
  rng = np.random.default_rng(5)
  cand_masks = [_masks_by_score(trained, fn, 0.3) for fn in
                (lambda a: rng.random(a.shape), lambda a: a, lambda a: -a)]
  cand_params = [masks_lib.apply(trained, m) for m in cand_masks]
  stack = lambda *xs: jnp.stack([jnp.asarray(x) for x in xs])
  cands = ft.Candidates(jax.tree.map(stack, *cand_params),
                        jax.tree.map(stack, *[init_stats] * 3), jax.tree.map(stack, *cand_masks))
  select = jax.jit(ft.adaptive_bn_selection(apply_fn, batch_size=16, execution=federated.Vmap()))
  result = select(cands, train, federated.make_cohort(range(CLIENTS)), jax.random.key(1))

  reference_fn = jax.jit(functools.partial(_pooled_statistics_loss, apply_fn))
  reference = [reference_fn(p, train) for p in cand_params]
  np.testing.assert_allclose(result.losses, [loss for loss, _ in reference], rtol=1e-4)
  for c, (_, stats) in enumerate(reference):  # the pooled statistics are those of all the data
    np.testing.assert_allclose(result.batch_stats["bn_0"]["mean"][c], stats["bn_0"]["mean"],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.batch_stats["bn_0"]["var"][c], stats["bn_0"]["var"],
                               rtol=1e-4, atol=1e-4)
  losses = np.asarray(result.losses)
  assert int(result.index) == 1 == int(np.argmin(losses)), losses
  assert losses[1] < 0.5 * min(losses[0], losses[2]), losses  # clearly the better candidate
  # It is also the more accurate model with its pooled statistics.
  _, test_x, test_y = _task()
  params, stats, _ = ft.take_candidate(cands, 1, result.batch_stats)
  accuracy = np.mean(_predict(apply_fn, params, stats, test_x) == np.asarray(test_y))
  assert accuracy >= 0.9, accuracy


# ----------------------------------------------------------------------------
# (b) FedTiny at density 0.1 keeps most of the dense accuracy, on every class.


def test_fedtiny_at_density_0_1_keeps_90_percent_of_dense_accuracy():
  _, test_x, test_y = _task()
  apply_fn = _apply_for(_spec())
  dense = _trained("dense")[-1]
  dense_accuracy = np.mean(_predict(apply_fn, dense.params, dense.batch_stats, test_x) == test_y)
  assert dense_accuracy >= 0.9, "the task must be learnable for the check to mean anything"
  tiny = _trained("fedtiny")[-1]
  assert float(masks_lib.density(tiny.masks, tiny.params)) == pytest.approx(DENSITY, abs=2e-3)
  predictions = _predict(apply_fn, tiny.params, tiny.batch_stats, test_x)
  accuracy = np.mean(predictions == np.asarray(test_y))
  assert accuracy >= 0.9 * dense_accuracy, (accuracy, dense_accuracy)
  assert set(np.unique(predictions)) == set(range(CLASSES)), np.bincount(predictions)  # no collapse


# ----------------------------------------------------------------------------
# (c) Prune-and-grow keeps the density exact; grown weights start at zero.


def test_prune_and_grow_keeps_density_exact_and_grows_zeros():
  """METHODS.md §2.4: prune count = grow count per layer, grown weights start at exactly 0
  (the engine masks after every local step). Over 7 adjustment rounds of the FedTiny run:
  every layer keeps its count, so the total does too, and the masks really move."""
  history = _trained("fedtiny")
  flags = _sparse.leaf_flags(history[0].params, _sparse.prunable_filter(history[0].params))
  counts = _sparse.keep_counts(history[0].masks, flags)
  keep, _ = _sparse.sparse_budget(history[0].params, DENSITY, _sparse.prunable_filter(
      history[0].params))
  assert abs(sum(counts) - keep) <= len(counts)  # the budget, up to per-layer rounding
  rounds_moved = 0
  for before, after in zip(history[:-1], history[1:]):
    assert _sparse.keep_counts(after.masks, flags) == counts  # per layer, hence in total
    grown_any = False
    for mb, ma, p, f in zip(jax.tree.leaves(before.masks), jax.tree.leaves(after.masks),
                            jax.tree.leaves(after.params), flags):
      if not f:
        continue
      grown = np.asarray(ma) & ~np.asarray(mb)
      grown_any |= bool(grown.any())
      np.testing.assert_array_equal(np.asarray(p)[grown], 0.0)  # grown entries start at 0
      np.testing.assert_array_equal(np.asarray(p)[~np.asarray(ma)], 0.0)  # pruned ones are 0
    rounds_moved += grown_any
  assert rounds_moved >= 5, rounds_moved  # 7 adjustment rounds (t = 1..7)


# ----------------------------------------------------------------------------
# Slow: glyph images and a CNN, the end-to-end method with its records.


@pytest.mark.slow  # ~20-40 s: a CNN round and ABNS compiled twice
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_fedtiny_cnn_on_glyphs_keeps_90_percent_of_dense_accuracy(distribution):
  train, test = data_lib.synthetic_images(CLIENTS, seed=0, image_shape=(16, 16, 1),
                                          num_classes=CLASSES, examples_per_client=32,
                                          test_examples_per_client=16, label_skew_alpha=None,
                                          writer_distortion=0.3, example_jitter=0.5, noise=0.05)
  train = data_lib.to_device(train)
  test_x, test_y = data_lib.pool(test)
  conv = lambda width: models.ConvSpec(features=width, kernel=3, norm=True, bias=False, pool=2)
  spec = models.ConvNetSpec(input_shape=(16, 16, 1), num_classes=CLASSES, norm="batch_running",
                            head="flatten", convs=(conv(8), conv(16)))

  def apply_for(s):
    apply_fn = models.make_apply(s)
    return lambda p, st, x, **kw: apply_fn(p, st, x / 255.0, **kw)

  def evaluate_with(apply_fn):
    predict = jax.jit(lambda p, s: jnp.argmax(apply_fn(p, s, test_x, train=False)[0], -1))
    return lambda p, s: {"predictions": np.asarray(predict(p, s))}

  params, stats = models.init_params(spec, jax.random.key(0))
  run = base.SparseRun(spec=spec, params=params, batch_stats=stats, key=jax.random.key(0),
                       optimizer=optax.sgd(0.05), schedule=SCHED,
                       model=federated.ModelFns(apply_for, evaluate_with), train=train,
                       clients_per_round=CLIENTS, rounds=ROUNDS)
  cohort = federated.make_cohort(range(CLIENTS))
  blocks = ft.network_blocks(params, _sparse.prunable_filter(params), 3)
  methods = {"dense": base.dense_method(run),
             "fedtiny": ft.fedtiny_method(run, density=DENSITY, distribution=distribution,
                                          num_candidates=3, abns_cohort=cohort,
                                          abns_batch_size=32, progressive=ft.Blockwise(blocks),
                                          adjust_every=1, adjust_end=ROUNDS)}
  out = {}
  for name, method in methods.items():
    for round_idx, state, record in federated.run_rounds(
        method, method.init(), train=train, cohort_fn=lambda r: cohort,
        train_root=jax.random.key(2), init_key=jax.random.key(1), rounds=range(ROUNDS),
        compile_round=lambda a: federated.make_round(a, execution=federated.Vmap())):
      pass
    out[name] = (method.evaluator(spec)(state, round_idx)["predictions"], record)
  dense_accuracy = np.mean(out["dense"][0] == test_y)
  assert dense_accuracy >= 0.9
  predictions, record = out["fedtiny"]
  assert record["density"] == pytest.approx(DENSITY, abs=2e-3)
  assert np.mean(predictions == test_y) >= 0.9 * dense_accuracy
  assert set(np.unique(predictions)) == set(range(CLASSES))

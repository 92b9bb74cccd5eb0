"""Complexity-aware training (CAT, `pruning.cavp`) on the text models (issue 27, item 4).

Gates: LSTM hidden units ('lstm_{l}': [H]), a transformer block's attention heads and FFN
units and the whole block ('block_{l}': {'heads', 'ffn', 'layer'}); an LSTM layer has no
layer gate (no residual path). Default suite (tiny shapes, seconds): gate templates, the
per-structure FLOP / parameter costs against hand counts, pruned gates at 0 == the rebuilt
(`structured.text_shrink`) model, the rebuild's gate trees and λ, the weight prior's
structure norms, one local training step, the Shakespeare config's validation.

Slow (outcomes): on the copy task of tests/pruning/test_text_methods.py (y = x[T - 2]),
CAT through `cavp_method` keeps the dense accuracy (its criterion, and >= 0.9 of dense)
at equal training (the same driver with θ frozen at 1: same init, keys, rounds, steps)
and really removes structures (the finalised network has fewer parameters):
  * LSTM 64 units, 40 rounds, gamma 0.5, θ SGD 0.5 (measured: 64 -> 32 units, 1.0 vs 1.0;
    gamma 0.3 keeps 35 units, gamma 2 prunes every unit but one and collapses);
  * a 2-block transformer (d 32, 4 heads, FFN 64), 20 rounds, gamma 0.75, θ SGD 0.1, heads,
    FFN units and blocks gated (measured: block_1 removed at round 10, -48 % params, 1.0 vs
    1.0; gamma 0.5 removes it at round 15, gamma 1.5 removes both blocks and collapses).
Plus the Shakespeare config's tiny run end to end
(experiments/configs/fedavg_shakespeare.py:cavp,tiny).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import accounting, federated, models
from fedjax_prune import data as data_lib
from fedjax_prune.pruning import cavp
from tests.pruning import test_text_methods as text_methods

LSTM = models.LSTMSpec(vocab_size=7, seq_len=6, embed_dim=3, hidden=(5, 4))
TRANSFORMER = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8,
                                     blocks=((2, 3, 10), (3, 2, 6), (1, 4, 4)))
NO_HEADS = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8, blocks=((0, 3, 4), (3, 2, 0)))


_random_params = text_methods._random_params  # every leaf random, so that no term hides
_ids = text_methods._ids


def _all_alive(theta):
  return jax.tree.map(lambda t: jnp.ones(jnp.shape(t), bool), theta)


# ----------------------------------------------------------------------------
# Gate layout.


def test_gate_templates_of_the_text_models():
  assert cavp.gate_template(LSTM) == {"lstm_0": (5,), "lstm_1": (4,)}
  assert cavp.gate_template(LSTM, "units") == cavp.gate_template(LSTM)
  with pytest.raises(ValueError, match="LSTM layer has no residual path"):
    cavp.gate_template(LSTM, "layers")
  both = {"heads": (2,), "ffn": (10,), "layer": ()}
  assert cavp.gate_template(TRANSFORMER) == {
      "block_0": both, "block_1": {"heads": (3,), "ffn": (6,), "layer": ()},
      "block_2": {"heads": (1,), "ffn": (4,), "layer": ()}}
  assert cavp.gate_template(TRANSFORMER, "units")["block_0"] == {"heads": (2,), "ffn": (10,)}
  assert cavp.gate_template(TRANSFORMER, "layers") == {f"block_{l}": {"layer": ()}
                                                       for l in range(3)}
  # A branch already without heads / FFN units has no gate.
  assert cavp.gate_template(NO_HEADS) == {"block_0": {"ffn": (4,), "layer": ()},
                                          "block_1": {"heads": (3,), "layer": ()}}
  empty = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8, blocks=())
  assert cavp.gate_template(empty, allow_empty=True) == {}
  with pytest.raises(ValueError, match="no block to gate"):
    cavp.gate_template(empty)


# ----------------------------------------------------------------------------
# Costs: hand counts (V 7, T 6; 2 FLOPs per MAC, 1 per bias / residual / cell-update add).


def test_lstm_unit_costs_equal_hand_counts():
  spec = models.LSTMSpec(vocab_size=7, seq_len=6, embed_dim=3, hidden=(5, 1))
  dflops, dparams = cavp.structure_costs(spec)
  # lstm_0 (in 3, H 5 -> 4): its kernel 3*4H, recurrent 4H^2 and bias 4H drop from 180 to
  # 128 entries, lstm_1's input rows (1 unit: 4 columns) from 20 to 16.
  assert dparams["lstm_0"].tolist() == [(180 - 128) + (20 - 16)] * 5
  # Per step a layer costs 2*4H(in + H) MACs + 4H (input + recurrent) + 4H bias + 4H cell
  # update: lstm_0 380 -> 272, lstm_1 (in 5 -> 4, H 1) 60 -> 52; times 6 steps.
  step = lambda i, h: 8 * h * (i + h) + 12 * h
  assert (step(3, 5), step(3, 4), step(5, 1), step(4, 1)) == (380, 272, 60, 52)
  assert dflops["lstm_0"].tolist() == [6 * (380 - 272) + 6 * (60 - 52)] * 5
  # The one unit of lstm_1 (never pruned: a layer keeps a unit): its whole layer
  # (kernel 5*4, recurrent 4, bias 4) and the head's input row (7), 6 steps of 60 and
  # the head's 2*7 MACs at the last position.
  assert dparams["lstm_1"].tolist() == [20 + 4 + 4 + 7]
  assert dflops["lstm_1"].tolist() == [6 * 60 + 2 * 7]
  # The same as the accounting of the spec with one unit fewer (H >= 2).
  narrower = models.LSTMSpec(vocab_size=7, seq_len=6, embed_dim=3, hidden=(4, 1))
  assert dparams["lstm_0"][0] == accounting.param_count(spec) - accounting.param_count(narrower)
  assert dflops["lstm_0"][0] == accounting.flops(spec) - accounting.flops(narrower)


def test_transformer_head_ffn_and_block_costs_equal_hand_counts():
  # d 8; block_0: 2 heads of 3, FFN 10; block_1: 1 head of 4, no FFN; context 6.
  spec = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8,
                                blocks=((2, 3, 10), (1, 4, 0)))
  dflops, dparams = cavp.structure_costs(spec)
  # A head: its q/k/v columns 3 x (8*3 + 3) and out rows 3*8.
  assert dparams["block_0"]["heads"].tolist() == [3 * 27 + 24] * 2
  # q/k/v over 6 positions 3 x 6 x (2*8*3 + 3), out 6 x 2*3*8, scores 2*36*3 (q k^T) +
  # 2*36*3 (weights v) + 6*36 (scaling and softmax).
  head_flops = 3 * 6 * 51 + 6 * 48 + 2 * 36 * 3 * 2 + 6 * 36
  assert head_flops == 1854 and dflops["block_0"]["heads"].tolist() == [head_flops] * 2
  # An FFN unit: dense_0 column 8 + bias, dense_1 row 8; 6 x (2*8 + 1) + 6 x 2*8 FLOPs.
  assert dparams["block_0"]["ffn"].tolist() == [17] * 10
  assert dflops["block_0"]["ffn"].tolist() == [6 * 17 + 6 * 16] * 10
  # block_1: LayerNorms 2 x 16, q/k/v 3 x (8*4 + 4), out 4*8 + 8, dense_1 bias 8 (FFN of
  # width 0); FLOPs: q/k/v 3 x 6 x (64 + 4), out 6 x (64 + 8), scores 2*36*4*2 + 6*36,
  # the FFN branch's bias 6*8 and the two residual adds 2 x 6*8.
  assert float(dparams["block_1"]["layer"]) == 32 + 3 * 36 + 40 + 8
  block_flops = 3 * 6 * 68 + 6 * 72 + 2 * 36 * 4 * 2 + 6 * 36 + 6 * 8 + 2 * 48
  assert float(dflops["block_1"]["layer"]) == block_flops
  assert "ffn" not in dflops["block_1"]
  # Costs are exactly the accounting of the smaller spec (linear in heads and FFN width).
  one_head = dataclasses.replace(spec, blocks=((1, 3, 10), (1, 4, 0)))
  assert dflops["block_0"]["heads"][0] == accounting.flops(spec) - accounting.flops(one_head)
  # λ: gamma x (beta FLOPs + (1 - beta) params fractions of the reference), x alpha for blocks.
  ref = (10_000.0, 1_000.0)
  lam = cavp.penalty_weights(spec, cavp.CostWeights(gamma=2.0, alpha=3.0, beta=0.25), reference=ref)
  np.testing.assert_allclose(lam["block_1"]["layer"],
                             3.0 * 2.0 * (0.25 * block_flops / 1e4 + 0.75 * 188 / 1e3), rtol=1e-6)
  np.testing.assert_allclose(lam["block_0"]["ffn"],
                             [2.0 * (0.25 * 198 / 1e4 + 0.75 * 17 / 1e3)] * 10, rtol=1e-6)


def test_weight_prior_norms_of_text_structures():
  """ρ/2 Σ θ_g ||W_g||²: an LSTM unit's four gate columns (kernel, recurrent kernel, bias),
  a head's q/k/v columns and biases, an FFN unit's dense_0 column and bias, a block's
  every parameter (hand-sliced)."""
  options = cavp.Options(rho=0.6)
  sq = lambda a: float(np.sum(np.square(np.asarray(a, np.float64))))
  params = _random_params(LSTM, 2)
  theta = {"lstm_0": jnp.array([0.0, 0.0, 1.0, 0.0, 0.0]), "lstm_1": jnp.zeros(4)}
  lam = jax.tree.map(jnp.zeros_like, theta)
  p = jax.tree.map(np.asarray, params["lstm_0"])
  cols = [g * 5 + 2 for g in range(4)]
  want = sq(p["kernel"][:, cols]) + sq(p["recurrent_kernel"][:, cols]) + sq(p["bias"][cols])
  penalty = jax.jit(lambda t, lam, p: cavp.penalty(t, _all_alive(t), lam, p, options))
  assert float(penalty(theta, lam, params)) == pytest.approx(0.3 * want, rel=1e-5)
  params = _random_params(TRANSFORMER, 3)
  theta = jax.tree.map(jnp.zeros_like, cavp.init_theta(TRANSFORMER))
  theta["block_1"] = {"heads": jnp.array([0.0, 1.0, 0.0]), "ffn": jnp.array([0.0] * 5 + [0.5]),
                      "layer": jnp.array(0.0)}
  theta["block_2"]["layer"] = jnp.array(0.25)
  lam = jax.tree.map(jnp.zeros_like, theta)
  b = jax.tree.map(np.asarray, params["block_1"])
  head = sum(sq(b["attn"][n]["kernel"][:, 2:4]) + sq(b["attn"][n]["bias"][2:4])
             for n in ("query", "key", "value"))
  ffn = sq(b["ffn"]["dense_0"]["kernel"][:, 5]) + sq(b["ffn"]["dense_0"]["bias"][5])
  block = sum(sq(leaf) for leaf in jax.tree.leaves(params["block_2"]))
  want = 0.3 * (head + 0.5 * ffn + 0.25 * block)
  assert float(penalty(theta, lam, params)) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------
# Removal = gate at 0.


def _check_removal_is_the_gated_model(spec, theta, key_seed=0):
  """Prunes θ's zeros, removes them physically and checks: the rebuilt model with the
  surviving θ as gates == the gated dense model (every position)."""
  params, x = _random_params(spec, key_seed), _ids(spec, 4, key_seed + 1)
  theta, alive = cavp.prune(theta, _all_alive(theta))
  gates = jax.tree.map(lambda t, a: jnp.where(a, t, 0.0), theta, alive)
  logits = lambda spec: jax.jit(lambda p, g: models.make_apply(spec)(
      p, {}, x, train=False, all_positions=True, gates=g)[0])
  want = logits(spec)(params, gates)
  new_spec, new_params, stats, new_theta, new_alive, report = cavp.remove_pruned(
      spec, params, {}, theta, alive)
  assert stats == {}
  assert jax.tree.map(jnp.shape, new_theta) == cavp.gate_template(new_spec, allow_empty=True)
  assert all(bool(np.all(a)) for a in jax.tree.leaves(new_alive))
  got = logits(new_spec)(new_params, new_theta)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert accounting.param_count(new_spec) < accounting.param_count(spec)
  return new_spec, new_theta, report


def test_lstm_units_at_zero_equal_the_rebuilt_model():
  theta = {"lstm_0": jnp.array([0.9, 0.0, 0.4, 0.0, 0.7]),
           "lstm_1": jnp.array([0.0, 0.6, 1.0, 0.3])}
  new_spec, new_theta, report = _check_removal_is_the_gated_model(LSTM, theta)
  assert new_spec.hidden == (3, 3) and report == cavp.Rebuilt(3, ())
  np.testing.assert_allclose(new_theta["lstm_0"], [0.9, 0.4, 0.7])
  # A layer keeps its best unit: all-zero θ but 0.01 leaves one unit.
  theta = {"lstm_0": jnp.array([0.0, 0.0, 0.0, 0.01, 0.0]), "lstm_1": jnp.ones(4)}
  theta, alive = cavp.prune(theta, _all_alive(theta))
  new_spec, params, _, new_theta, _, _ = cavp.remove_pruned(LSTM, _random_params(LSTM, 0), {},
                                                            theta, alive)
  assert new_spec.hidden == (1, 4) and new_theta["lstm_0"].tolist() == [pytest.approx(0.01)]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda a: a.shape,
                                                        models.param_shapes(new_spec)[0])


def test_transformer_heads_ffn_units_and_blocks_at_zero_equal_the_rebuilt_model():
  theta = cavp.init_theta(TRANSFORMER)
  theta["block_0"] = {"heads": jnp.array([0.8, 0.3]), "ffn": jnp.array([0.9, 0.0] * 5),
                      "layer": jnp.array(0.0)}   # the whole block goes (its units with it)
  theta["block_1"] = {"heads": jnp.array([0.0, 0.7, 0.5]),
                      "ffn": jnp.array([0.0, 0.6, 0.0, 1.0, 0.2, 0.0]),
                      "layer": jnp.array(0.9)}
  new_spec, new_theta, report = _check_removal_is_the_gated_model(TRANSFORMER, theta)
  assert new_spec.blocks == ((2, 2, 3), (1, 4, 4))
  assert report == cavp.Rebuilt(4, ("block_0",))
  # Survivors renamed as the surgery renames them: block_1 -> block_0, block_2 -> block_1.
  np.testing.assert_allclose(new_theta["block_0"]["heads"], [0.7, 0.5])
  np.testing.assert_allclose(new_theta["block_0"]["ffn"], [0.6, 1.0, 0.2])
  np.testing.assert_allclose(new_theta["block_1"]["ffn"], [0.9] * 4)


def test_rebuild_recomputes_lambda_and_slices_a_persistent_theta_optimizer():
  spec, options = TRANSFORMER, cavp.Options(persist_theta_optimizer=True)
  weights = cavp.CostWeights(gamma=1.0)
  reference = (accounting.flops(spec), accounting.param_count(spec))
  theta = cavp.init_theta(spec)
  theta["block_1"]["layer"] = jnp.array(0.0)
  theta["block_2"]["ffn"] = jnp.array([0.8, 0.0, 0.9, 0.7])
  theta, alive = cavp.prune(theta, _all_alive(theta))
  opt = optax.adam(0.1).init(theta)
  leaves, treedef = jax.tree.flatten(theta)
  coded = jax.tree.unflatten(treedef, [100.0 * i + jnp.arange(l.size, dtype=jnp.float32).reshape(
      l.shape) for i, l in enumerate(leaves)])
  opt = (opt[0]._replace(count=jnp.int32(3), mu=coded, nu=coded), opt[1])
  state = cavp.CavpState(_random_params(spec, 4), {}, theta, alive,
                         cavp.penalty_weights(spec, weights, reference=reference),
                         jnp.float32(jnp.nan), jnp.int32(0), opt)
  new_spec, new_state, report = cavp.rebuild(spec, state, weights, options, reference=reference)
  assert new_spec.blocks == ((2, 3, 10), (1, 4, 3)) and report == cavp.Rebuilt(1, ("block_1",))
  want_lam = cavp.penalty_weights(new_spec, weights, reference=reference)
  for a, b in zip(jax.tree.leaves(new_state.lam), jax.tree.leaves(want_lam), strict=True):
    np.testing.assert_array_equal(a, b)
  mu = new_state.theta_opt[0].mu
  assert int(new_state.theta_opt[0].count) == 3
  np.testing.assert_array_equal(mu["block_1"]["ffn"],
                                np.asarray(coded["block_2"]["ffn"])[[0, 2, 3]])
  np.testing.assert_array_equal(mu["block_0"]["heads"], coded["block_0"]["heads"])


# ----------------------------------------------------------------------------
# Training and the driver's config.


@pytest.mark.parametrize("spec", [
    LSTM, pytest.param(models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8,
                                              blocks=((2, 3, 4),)), marks=pytest.mark.slow)],
    ids=["lstm", "transformer"])
def test_a_penalty_lowers_every_text_gate_in_local_training(spec):
  """Two steps of the joint (W, θ) training at a huge gamma: every θ falls (the penalty's
  gradient dominates), stays in [0, 1], and the loss is finite."""
  params = models.init_params(spec, jax.random.key(0))[0]
  local = cavp.make_local_train(models.make_apply(spec), optax.sgd(0.1), optax.sgd(0.01),
                                federated.LocalSchedule(batch_size=4, num_steps=2))
  theta = cavp.init_theta(spec)
  lam = cavp.penalty_weights(spec, cavp.CostWeights(gamma=50.0))
  x = _ids(spec, 8, 5)
  out, metrics = jax.jit(local)(params, {}, theta, _all_alive(theta), lam, jnp.float32(jnp.nan),
                                data_lib.ClientData(x, x[:, 0], jnp.int32(8)), jax.random.key(1))
  assert float(metrics.num_steps) == 2.0 and np.isfinite(float(out.baseline))
  for before, after in zip(jax.tree.leaves(theta), jax.tree.leaves(out.theta), strict=True):
    assert np.all(np.asarray(after) < np.asarray(before)) and float(np.min(after)) >= 0.0


def test_shakespeare_cavp_config_is_valid_and_refuses_bad_fields():
  from experiments import build
  from experiments.configs import fedavg_shakespeare
  from experiments.methods import cavp as driver
  c = fedavg_shakespeare.get_config("cavp,tiny")
  assert (c.method, c.model.name, c.cavp.structures) == ("cavp", "shakespeare_transformer", "both")
  build.validate(c)
  driver.validate(c)
  lstm = fedavg_shakespeare.get_config("cavp,lstm")
  assert (lstm.model.name, lstm.cavp.structures, lstm.strategy) == (
      "shakespeare_lstm", "units", "sequential+lax+sharded")  # named: cavp refuses 'auto'
  lstm.cavp.structures = "both"
  with pytest.raises(build.ConfigError, match="an LSTM layer has no residual path"):
    driver.validate(lstm)
  c.cavp.augment = True
  with pytest.raises(build.ConfigError, match="cavp.augment=True is invalid for the text model"):
    driver.validate(c)


@pytest.mark.slow
def test_shakespeare_cavp_tiny_runs_end_to_end(tmp_path):
  """experiments/configs/fedavg_shakespeare.py:cavp,tiny through train_and_evaluate (~10 s):
  the summary is the finalised (ungated, rebuilt) transformer, smaller than the start."""
  from experiments import train
  from experiments.configs import fedavg_shakespeare
  config = fedavg_shakespeare.get_config("cavp,tiny")
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["method"] == "cavp" and summary["rounds"] == config.rounds
  # The tiny transformer: LEAF's 81 tokens, context 16, d 16, one block of 2 heads x 8, FFN 64.
  spec = models.TransformerSpec(vocab_size=81, seq_len=16, d_model=16, blocks=((2, 8, 64),))
  assert summary["original_blocks"] == [[2, 8, 64]]
  assert summary["params_initial"] == accounting.param_count(spec)
  final = dataclasses.replace(spec, blocks=tuple(tuple(b) for b in summary["final_blocks"]))
  assert summary["params"] == accounting.param_count(final) <= summary["params_initial"]
  assert not summary["bn_recalibrated"]


# ----------------------------------------------------------------------------
# Slow: outcomes on the copy task of test_text_methods.

OUTCOME_TRANSFORMER = models.TransformerSpec(vocab_size=text_methods.V,
                                             seq_len=text_methods.CONTEXT, d_model=32,
                                             blocks=((4, 8, 64),) * 2)
OUTCOMES = {  # model: (spec, rounds, structures, gamma, θ learning rate); module docstring
    "lstm": (text_methods.OUTCOME_LSTM, text_methods.LSTM_ROUNDS, "units", 0.5, 0.5),
    "transformer": (OUTCOME_TRANSFORMER, text_methods.TRANSFORMER_ROUNDS, "both", 0.75, 0.1)}


@functools.lru_cache(maxsize=None)
def _cat_run(name: str, dense: bool):
  """(finalised network's predictions, summary) of CAT on model `name`; `dense`: θ frozen
  at 1 (gamma 0, θ learning rate 0), i.e. the dense model trained by the same driver."""
  spec, rounds, structures, gamma, theta_lr = OUTCOMES[name]
  train, test_x, _, _ = text_methods._copy_task()
  params, stats = models.init_params(spec, jax.random.key(0))

  def evaluate_with(apply_fn):
    predict = jax.jit(lambda p, s: jnp.argmax(apply_fn(p, s, jnp.asarray(test_x),
                                                       train=False)[0], -1))
    return lambda p, s: {"predictions": np.asarray(predict(p, s))}

  method = cavp.cavp_method(
      spec=spec, params=params, batch_stats=stats, key=jax.random.key(0),
      model=federated.ModelFns(models.make_apply, evaluate_with),
      weight_optimizer=text_methods.OPTIMIZER,
      theta_optimizer=optax.sgd(0.0 if dense else theta_lr), schedule=text_methods.SCHEDULE,
      options=cavp.Options(structures=structures, theta_init=1.0 if dense else 0.9),
      weights=cavp.CostWeights(gamma=0.0 if dense else gamma), rebuild_every=5,
      num_rounds=rounds)
  cohort = federated.make_cohort(range(text_methods.CLIENTS))
  state, _, _ = text_methods._run(method, spec, rounds, cohort, train)
  summary = method.summary(state, method.evaluator(state.spec)(state, rounds - 1))
  return summary["predictions"], summary


@pytest.mark.slow  # ~20 s (LSTM) / ~70 s (transformer) on a loaded 2-core CPU: two runs each
@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_cat_keeps_the_dense_accuracy_and_removes_structures(name):
  _, _, test_y, _ = text_methods._copy_task()
  dense_pred, dense = _cat_run(name, True)
  dense_accuracy = float(np.mean(dense_pred == test_y))
  assert dense_accuracy >= 0.95, f"the dense reference must learn the task, got {dense_accuracy}"
  assert dense["params"] == dense["params_initial"] and dense["rebuilds"] == []
  pred, summary = _cat_run(name, False)
  accuracy = text_methods._check_keeps_accuracy(pred, test_y, dense_accuracy, f"CAT on {name}")
  assert accuracy >= 0.9 * dense_accuracy, (accuracy, dense_accuracy)
  # Really removed: the finalised network is a smaller spec, accounted as such.
  spec = OUTCOMES[name][0]
  assert summary["params"] < summary["params_initial"] == accounting.param_count(spec)
  assert summary["flops"] < summary["flops_initial"]
  if name == "lstm":
    assert summary["final_hidden"][0] < spec.hidden[0]
  else:  # the layer gate removed a whole block during training
    assert len(summary["final_blocks"]) < len(spec.blocks)
    assert any(r["blocks_removed"] for r in summary["rebuilds"])
  # The Method evaluated the gated network it rebuilt from: the same predictions.
  np.testing.assert_array_equal(summary["gated_eval_before_finalize"]["predictions"], pred)

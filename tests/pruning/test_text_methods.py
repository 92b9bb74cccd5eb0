"""The pruning methods on the text models (issue 27, item 4).

FIARSE and the width baselines (HeteroFL, FedRolex) on the transformer; FedTiny and fixed
magnitude masks (masked FedAvg) on the LSTM. Each runs through its `federated.Method`
factory and `federated.run_rounds`.

Default suite (no round is compiled): the width submodel of a text model is
`structured.text_shrink`'s smaller model (masks over the full model == the sliced model,
so its accounting is the smaller spec's), the evaluated submodel is the trained forward
pass (Scaler included), FedRolex's window rolls over heads and FFN units, FIARSE ranks
every parameter but the LayerNorms, and the sparse setup handles LSTM kernels (uniform
and ERK budgets exact, embeddings dense, FedTiny's cost names).

Slow (outcomes, ~15-30 s per method on 2 busy CPU cores, most of it compiling): on a copy
task that dense FedAvg learns to 100 % in 20 rounds -- the next token is the one before
the last, y = x[T - 2], so the model must move information across positions (attention,
recurrence); 8 IID clients of 64 windows, vocabulary 8, context 4 -- each method, trained
for the same rounds, clients, local steps and keys as the dense model, keeps >= 85 % of
the dense accuracy, beats the majority rate by 30 points and predicts >= 6 of the 8
tokens (`_check_keeps_accuracy`; a collapsed model fails it):
  * transformer (d 32, 4 heads x 8, FFN 64; 9,256 params), capacities {1, 1/4, 1/16,
    1/64}, client i at level i mod 4: HeteroFL and FedRolex at their smallest level,
    1/64 (1 head, 1 FFN unit; the embeddings and d_model full, `_width_submodels`), and
    FIARSE at 1/4. FIARSE's 1/16 and 1/64 submodels fall to chance here (a measured
    finding, not asserted): its global magnitude ranking keeps 7 of the 256 token
    embedding entries at 1/16 (0 at 1/64) and spends the budget on the head kernel,
    so the model cannot read its input; at 1/4 it keeps 58 and learns the task.
  * LSTM (embedding 8, 64 units; 19,272 params) at density 0.2 (uniform layer
    densities; ERK slow too), 40 rounds: FedTiny (2 ABNS candidates, prune-and-grow
    every round) and fixed magnitude masks of the initial weights; prune-and-grow keeps
    every layer's count exact over its 39 adjustments.
Plus the contract items of tests/test_method_library_contract.py that build.py-free
text runs can check (padding clients, cohort order, another key, masks consistent).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import accounting, federated, models, structured
from fedjax_prune import data as data_lib
from fedjax_prune import masks as masks_lib
from fedjax_prune.pruning import (_hetero, _sparse, _width_submodels, base, fedrolex, fiarse,
                                   heterofl)
from fedjax_prune.pruning import fedtiny as ft

# The tiny specs of tests/models/test_text_models.py (and one with a block of 0 heads).
LSTM = models.LSTMSpec(vocab_size=7, seq_len=6, embed_dim=3, hidden=(5, 4))
TRANSFORMER = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8,
                                     blocks=((2, 3, 10), (1, 4, 6)))
NO_HEADS = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8, blocks=((0, 3, 4), (3, 2, 0)))
SPECS = {"lstm": LSTM, "transformer": TRANSFORMER, "no_heads": NO_HEADS}


def _random_params(spec, seed):
  """Every leaf random (biases, LayerNorm too), so no term of the forward pass hides."""
  params, _ = models.init_params(spec, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32) * 0.5),
                      params)


def _ids(spec, batch, seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, spec.vocab_size, (batch, spec.seq_len)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _jitted_apply(spec):
  apply_fn = models.make_apply(spec)
  return jax.jit(lambda p, x: apply_fn(p, {}, x, train=False)[0])


def _logits(spec, params, x):
  return np.asarray(_jitted_apply(spec)(params, x))


def _host_keep(spec, ratio, offset):
  """{group: bool [W]} of `channel_keep`, on the host."""
  return {g.name: np.asarray(_width_submodels.channel_keep(g.width, ratio, offset))
          for g in structured.text_groups(spec)}


# ----------------------------------------------------------------------------
# Width submodels of text models: masks over the full model == the shrunk model.


@pytest.mark.parametrize("name", sorted(SPECS))
def test_text_group_masks_broadcast_to_text_keep_masks(name):
  """The traceable masks the width methods train with are `text_keep_masks` (the surgery's
  own masks), for random keeps; so the masked model is `text_shrink`'s model."""
  spec = SPECS[name]
  shapes = jax.tree.leaves(models.param_shapes(spec)[0])
  rng = np.random.default_rng(0)
  for _ in range(3):
    keep = {g.name: rng.random(g.width) < 0.5 for g in structured.text_groups(spec)}
    for g in structured.text_groups(spec):
      if g.kind == "lstm_unit" and not keep[g.name].any():
        keep[g.name][rng.integers(g.width)] = True  # an LSTM layer keeps a unit
    got = jax.jit(lambda k: _width_submodels.text_group_masks(spec, k))(
        {k: jnp.asarray(v) for k, v in keep.items()})
    want = structured.text_keep_masks(spec, keep)
    for g, w, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), shapes):
      np.testing.assert_array_equal(np.broadcast_to(g, s.shape), np.broadcast_to(w, s.shape))
    masks_lib.check(models.init_params(spec, jax.random.key(0))[0], got)
  with pytest.raises(ValueError, match="keep must name every group"):
    _width_submodels.text_group_masks(spec, {})


@pytest.mark.parametrize("name", ["lstm", "transformer"])
@pytest.mark.parametrize("ratio,offset", [(0.5, 0), (0.2, 7)])
def test_masked_width_submodel_equals_the_shrunk_model(name, ratio, offset):
  """A width-r text submodel (prefix or rolled window) computes exactly what the smaller
  model `text_shrink` builds from the same units computes, and is accounted as it."""
  spec = SPECS[name]
  params = _random_params(spec, 1)
  x = _ids(spec, 4, 2)
  masks = _width_submodels.text_width_masks(spec, ratio, offset)
  keep = _host_keep(spec, ratio, offset)
  shrunk = structured.text_shrink(spec, params, keep)
  np.testing.assert_allclose(_logits(spec, masks_lib.apply(params, masks), x),
                             _logits(shrunk.spec, shrunk.params, x), rtol=1e-5, atol=1e-5)
  full = jax.tree.map(lambda m, s: np.broadcast_to(m, s.shape), masks, models.param_shapes(spec)[0])
  assert accounting.param_count(spec, full) == accounting.param_count(shrunk.spec)
  assert accounting.flops(spec, full) == accounting.flops(shrunk.spec)
  # The number of kept units is ceil(r W) (>= 1) per group.
  for g in structured.text_groups(spec):
    assert keep[g.name].sum() == max(1, int(np.ceil(ratio * g.width - 1e-4))), g.name


def test_fedrolex_window_rolls_over_heads_and_ffn_units():
  """Round t keeps units {(t + j) mod W : j < ceil(r W)} of every group: heads of each
  block, FFN units, LSTM units (hand-listed)."""
  def kept(masks, path, axis):
    m = np.asarray(functools.reduce(lambda d, k: d[k], path, masks))
    return np.flatnonzero(m.any(axis=axis)).tolist()

  m = _width_submodels.text_width_masks(TRANSFORMER, 0.5, 3)
  # block_0: 2 heads x 3 dims -> head (3 mod 2) = 1, columns 3..5; 10 FFN units -> 3..7.
  assert kept(m, ("block_0", "attn", "query", "kernel"), 0) == [3, 4, 5]
  assert kept(m, ("block_0", "attn", "out", "kernel"), 1) == [3, 4, 5]
  assert kept(m, ("block_0", "ffn", "dense_0", "kernel"), 0) == [3, 4, 5, 6, 7]
  assert kept(m, ("block_0", "ffn", "dense_1", "kernel"), 1) == [3, 4, 5, 6, 7]
  # block_1: its only head; 6 FFN units -> {3, 4, 5}.
  assert kept(m, ("block_1", "attn", "value", "kernel"), 0) == [0, 1, 2, 3]
  assert np.flatnonzero(np.asarray(m["block_1"]["ffn"]["dense_0"]["bias"])).tolist() == [3, 4, 5]
  # d_model, embeddings, LayerNorms and the head stay full.
  for path in (("embed", "embedding"), ("pos_embed", "embedding"), ("head", "kernel"),
               ("block_0", "ln_1", "scale"), ("block_0", "attn", "out", "bias")):
    assert np.asarray(functools.reduce(lambda d, k: d[k], path, m)).all(), path
  # LSTM: 5 units, r = 0.4 -> 2 units {4, 0} at offset 4: gate columns g * 5 + {0, 4}.
  lm = _width_submodels.text_width_masks(LSTM, 0.4, 4)
  cols = np.flatnonzero(np.asarray(lm["lstm_0"]["bias"])).tolist()
  assert cols == [0, 4, 5, 9, 10, 14, 15, 19]
  assert kept(lm, ("lstm_0", "recurrent_kernel"), 1) == [0, 4]
  assert kept(lm, ("lstm_1", "kernel"), 1) == [0, 4]               # the next layer's inputs
  assert kept(lm, ("lstm_1", "kernel"), 0) == [0, 1, 4, 5, 8, 9, 12, 13]  # 4 units, r .4 -> 2


def test_text_widths_and_what_the_scaler_scales():
  """A transformer's width is its capacity (d_model full: the sliced parameters scale like
  r), an LSTM's sqrt(capacity); the Scaler scales the kernels that read a sliced width into
  a full one."""
  assert _width_submodels.text_widths(TRANSFORMER, (1.0, 0.25, 1 / 64)) == (1.0, 0.25, 1 / 64)
  assert _width_submodels.text_widths(LSTM, (1.0, 0.25)) == (1.0, 0.5)
  assert _width_submodels._text_scaled_leaves(TRANSFORMER) == {
      (f"block_{l}", *p) for l in (0, 1) for p in (("attn", "out", "kernel"),
                                                   ("ffn", "dense_1", "kernel"))}
  assert _width_submodels._text_scaled_leaves(LSTM) == {("head", "kernel")}
  # The sliced parameters of the preset transformer are linear in r: at r = 1/4 (1 of 4
  # heads, 128 of 512 FFN units) a quarter of the block matmul weights.
  spec = models.shakespeare_transformer()
  shapes = models.param_shapes(spec)[0]
  masks = _width_submodels.text_width_masks(spec, 0.25)
  kernel_count = lambda m: sum(int(np.broadcast_to(m[f"block_{l}"][a][n]["kernel"], shapes[
      f"block_{l}"][a][n]["kernel"].shape).sum()) for l in range(4)
      for a, names in (("attn", ("query", "key", "value", "out")), ("ffn", ("dense_0", "dense_1")))
      for n in names)
  assert kernel_count(masks) * 4 == kernel_count(jax.tree.map(lambda s: True, shapes))


FACTORIES = {"heterofl": (heterofl.heterofl, 0),
             "fedrolex": (fedrolex.fedrolex, 2),                              # 'extraction'
             "fedrolex_last_round": (functools.partial(fedrolex.fedrolex,
                                                       eval_window="last_round"), 1)}


@pytest.mark.parametrize("name,method_name", [
    ("transformer", "heterofl"), ("transformer", "fedrolex"), ("lstm", "fedrolex_last_round"),
    pytest.param("transformer", "fedrolex_last_round", marks=pytest.mark.slow),
    pytest.param("lstm", "heterofl", marks=pytest.mark.slow),
    pytest.param("lstm", "fedrolex", marks=pytest.mark.slow)])
def test_evaluated_submodel_is_the_trained_forward_pass(name, method_name):
  """A width-r text submodel evaluates as its clients trained it (Scaler included, as
  `test_hetero` checks for the CNNs), and both are the shrunk model with the scaled
  kernels / r."""
  spec = SPECS[name]
  factory, offset = FACTORIES[method_name]
  apply_fn = models.make_apply(spec)
  params = _random_params(spec, 3)
  caps = (1.0, 1 / 4, 1 / 16)
  method = factory(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
                   capacities=caps, spec=spec)
  state = method.algorithm.init(params, jax.random.key(0))._replace(
      round_idx=jnp.asarray(2, jnp.int32))
  x = _ids(spec, 5, 4)
  scaled = _width_submodels._text_scaled_leaves(spec)

  @jax.jit
  def trained_logits(params, ratio):  # the forward pass `client_update` trains
    masks = _width_submodels.text_width_masks(spec, ratio, offset)
    trained = _width_submodels._submodel_apply(
        apply_fn, masks, ratio, True, heterofl.OUTPUT_KEYS,
        lambda p, f: _width_submodels._scale_text(p, f, scaled))
    return trained(params, {}, x, train=True)[0]

  submodel = jax.jit(method.submodel)
  for cap, ratio in zip(caps, _width_submodels.text_widths(spec, caps)):
    want = np.asarray(trained_logits(state.params, ratio))
    sub, exit_idx = submodel(state, cap)
    np.testing.assert_allclose(_logits(spec, sub, x), want,
                               rtol=1e-5, atol=1e-5, err_msg=f"capacity {cap}")
    assert int(exit_idx) == 0
    if cap != min(caps):  # the shrunk model at the smallest level (other ratios: above)
      continue
    shrunk = structured.text_shrink(spec, params, _host_keep(spec, ratio, offset))
    small = jax.tree_util.tree_map_with_path(
        lambda path, p: p / ratio if tuple(k.key for k in path) in scaled else p, shrunk.params)
    np.testing.assert_allclose(_logits(shrunk.spec, small, x), want, rtol=1e-4, atol=1e-4)
    assert accounting.param_count(shrunk.spec) < accounting.param_count(spec)


def test_bad_text_width_arguments_are_named():
  apply_fn = models.make_apply(TRANSFORMER)
  opt, sched = optax.sgd(0.1), federated.LocalSchedule(batch_size=4)
  with pytest.raises(ValueError, match="with a text spec the widths are its groups"):
    heterofl.heterofl(apply_fn, opt, sched, capacities=(1.0,), spec=TRANSFORMER,
                      output_keys=r"^head$")
  with pytest.raises(ValueError, match="spec must be an LSTMSpec or TransformerSpec"):
    heterofl.heterofl(apply_fn, opt, sched, capacities=(1.0,), spec=models.mlp(
        input_shape=(4,), hidden=(3,), num_classes=2))
  params = models.init_params(TRANSFORMER, jax.random.key(0))[0]
  without_spec = heterofl.heterofl(apply_fn, opt, sched, capacities=(1.0,))
  with pytest.raises(ValueError, match="an embedding table .* pass spec="):
    without_spec.algorithm.init(params, jax.random.key(0))
  method = fedrolex.fedrolex(apply_fn, opt, sched, capacities=(1.0,), spec=TRANSFORMER)
  with pytest.raises(ValueError,
                     match=r"block_0/attn/key/bias has shape \(0,\), the spec says \(6,\)"):
    method.algorithm.init(models.init_params(NO_HEADS, jax.random.key(0))[0], jax.random.key(0))


# ----------------------------------------------------------------------------
# FIARSE: unstructured, every parameter but the LayerNorms ranked.


def test_fiarse_ranks_every_text_parameter_but_layer_norm():
  params = _random_params(TRANSFORMER, 4)
  maskable = fiarse.default_maskable(params)
  for path, flag in jax.tree_util.tree_flatten_with_path(maskable)[0]:
    keys = [k.key for k in path]
    assert flag == (keys[-2] not in ("ln_1", "ln_2", "ln_f")), keys
  assert all(jax.tree.leaves(fiarse.default_maskable(_random_params(LSTM, 4))))
  # The level's threshold keeps floor(c n) of the ranked entries, LayerNorms untouched.
  n = sum(p.size for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(maskable)) if m)
  tau = fiarse.thresholds(params, (1.0, 0.25))
  sub = fiarse.submodel_params(params, tau[1])
  kept = sum(int(np.sum(np.asarray(s) != 0)) for s, m in zip(jax.tree.leaves(sub),
                                                              jax.tree.leaves(maskable)) if m)
  assert kept == n // 4
  np.testing.assert_array_equal(sub["ln_f"]["scale"], params["ln_f"]["scale"])


# ----------------------------------------------------------------------------
# Sparse setup on the LSTM: prunable kernels, uniform / ERK budgets, cost names.


def test_lstm_prunable_leaves_and_layer_densities():
  """Prunable: every LSTM input and recurrent kernel and the head kernel; the embedding,
  biases (and a transformer's LayerNorms and position table) stay dense and count against
  the budget. Both distributions hit the budget; ERK reads each stored kernel shape."""
  shapes = models.param_shapes(models.leaf_shakespeare_lstm())[0]
  flags = dict(zip(_sparse.leaf_paths(shapes),
                   _sparse.leaf_flags(shapes, _sparse.prunable_filter(shapes))))
  assert {p for p, f in flags.items() if f} == {
      "lstm_0/kernel", "lstm_0/recurrent_kernel", "lstm_1/kernel", "lstm_1/recurrent_kernel",
      "head/kernel"}
  tshapes = models.param_shapes(TRANSFORMER)[0]
  tflags = dict(zip(_sparse.leaf_paths(tshapes),
                    _sparse.leaf_flags(tshapes, _sparse.prunable_filter(tshapes))))
  assert not tflags["embed/embedding"] and not tflags["pos_embed/embedding"]
  assert tflags["block_1/attn/out/kernel"] and not tflags["block_1/ln_2/scale"]
  sizes = {p: int(np.prod(s.shape))
           for p, s in zip(_sparse.leaf_paths(shapes), jax.tree.leaves(shapes))}
  total = sum(sizes.values())
  for distribution in ("uniform", "erk"):
    d = dict(zip(_sparse.leaf_paths(shapes), jax.tree.leaves(
        _sparse.layer_densities(shapes, 0.2, distribution))))
    assert sum(d[p] * sizes[p] for p in sizes) == pytest.approx(0.2 * total, rel=1e-9)
    assert all(d[p] == 1.0 for p, f in flags.items() if not f)
  erk = dict(zip(_sparse.leaf_paths(shapes),
                 jax.tree.leaves(_sparse.layer_densities(shapes, 0.2, "erk"))))
  # ERK: d_l proportional to (fan_in + fan_out) / (fan_in fan_out) of the stored [in, 4H] kernels.
  raw = lambda i, o: (i + o) / (i * o)
  # lstm_1's input and recurrent kernels are both [256, 1024]: the same density.
  assert erk["lstm_1/recurrent_kernel"] / erk["lstm_1/kernel"] == pytest.approx(1.0)
  assert erk["lstm_0/recurrent_kernel"] / erk["head/kernel"] == pytest.approx(
      raw(256, 1024) / raw(256, 81))
  assert erk["lstm_0/kernel"] == 1.0  # [8, 1024]: a thin layer, dense under ERK at 0.2


def test_sparse_setup_on_lstm_keeps_the_largest_weights_per_kernel():
  """Magnitude masks of the LSTM keep round(d_l n_l) largest |w| of every kernel and leave
  the rest dense (prune-and-grow's exact counts: the slow FedTiny outcome test)."""
  params, _ = models.init_params(LSTM, jax.random.key(0))
  prunable = _sparse.prunable_filter(params)
  _, masks = ft.sparse_setup(params, 0.3, prunable=prunable)
  masks_lib.check(params, masks)
  flags = _sparse.leaf_flags(params, prunable)
  densities = jax.tree.leaves(_sparse.layer_densities(params, 0.3, "uniform", prunable))
  for w, m, d, f in zip(jax.tree.leaves(params), jax.tree.leaves(masks), densities, flags):
    m = np.broadcast_to(np.asarray(m), w.shape)
    if not f:
      assert m.all()
      continue
    assert m.sum() == round(d * w.size)
    assert np.abs(np.asarray(w))[m].min() >= np.abs(np.asarray(w))[~m].max()  # the largest |w|


def test_fedtiny_cost_terms_name_lstm_layers():
  """FedTiny's dense growth gradient is charged per `accounting.layer_costs` row: an LSTM
  layer is one row for its input and recurrent kernels (and the order is input->output)."""
  params, _ = models.init_params(LSTM, jax.random.key(0))
  prunable = _sparse.prunable_filter(params)
  order = ft.network_order(params, prunable)
  assert order == ["lstm_0/kernel", "lstm_0/recurrent_kernel", "lstm_1/kernel",
                   "lstm_1/recurrent_kernel", "head/kernel"]
  names = base.layer_names(order)
  assert names == ["lstm_0", "lstm_1", "head"]
  _, masks = ft.sparse_setup(params, 0.5, prunable=prunable)
  masks = jax.tree.map(np.asarray, masks)
  one = accounting.client_round_cost(LSTM, masks, batch_size=4, local_steps=2, dense_grad_batches=1,
                                     dense_grad_layers=["lstm_1"])
  none = accounting.client_round_cost(LSTM, masks, batch_size=4, local_steps=2)
  rows = {r.name: r for r in accounting.layer_costs(LSTM)}
  masked = sum(r.mac_flops for r in accounting.layer_costs(LSTM, masks))
  assert one.training_flops - none.training_flops == 4 * (2 * masked + rows["lstm_1"].mac_flops)


# ----------------------------------------------------------------------------
# Slow: outcomes on the copy task.

V, CONTEXT, CLIENTS, PER_CLIENT, TEST_PER_CLIENT = 8, 4, 8, 64, 32
CAPACITIES = (1.0, 1 / 4, 1 / 16, 1 / 64)
KEEP_FRACTION, MAJORITY_MARGIN, MIN_CLASSES = 0.85, 0.3, 6
SCHEDULE = federated.LocalSchedule(batch_size=16, num_steps=5)
OPTIMIZER = optax.adam(0.01)
OUTCOME_TRANSFORMER = models.TransformerSpec(vocab_size=V, seq_len=CONTEXT, d_model=32,
                                             blocks=((4, 8, 64),))
OUTCOME_LSTM = models.LSTMSpec(vocab_size=V, seq_len=CONTEXT, embed_dim=8, hidden=(64,))
TRANSFORMER_ROUNDS, LSTM_ROUNDS, DENSITY = 20, 40, 0.2


@functools.lru_cache(maxsize=None)
def _copy_task(seed=0):
  """(train ClientData, test x [T, 4], test y [T], local test ClientData): y = x[:, -2]."""
  rng = np.random.default_rng(seed)

  def draw(n):
    x = rng.integers(0, V, (n, CONTEXT)).astype(np.int32)
    return x, x[:, -2].copy()

  train = [draw(PER_CLIENT) for _ in range(CLIENTS)]
  test = [draw(TEST_PER_CLIENT) for _ in range(CLIENTS)]
  pack = lambda parts: data_lib.to_device(data_lib.from_client_lists([x for x, _ in parts],
                                                                     [y for _, y in parts]))
  return (pack(train), np.concatenate([x for x, _ in test]), np.concatenate([y for _, y in test]),
          pack(test))


def _check_keeps_accuracy(pred, test_y, dense_accuracy, what):
  """The outcome criterion: fraction of dense, above the majority rate, several classes."""
  accuracy = float(np.mean(pred == test_y))
  majority = float(np.max(np.bincount(test_y, minlength=V)) / test_y.size)
  classes = len(np.unique(pred))
  assert accuracy >= KEEP_FRACTION * dense_accuracy, (
      f"{what}: accuracy {accuracy:.3f} < {KEEP_FRACTION} x dense {dense_accuracy:.3f}")
  assert accuracy >= majority + MAJORITY_MARGIN, (
      f"{what}: accuracy {accuracy:.3f} does not beat the majority rate {majority:.3f} by "
      f"{MAJORITY_MARGIN}")
  assert classes >= MIN_CLASSES, f"{what}: predicts {classes} classes (collapse)"
  return accuracy


def test_a_collapsed_text_model_fails_the_criterion():
  _, _, test_y, _ = _copy_task()
  with pytest.raises(AssertionError, match="accuracy"):
    _check_keeps_accuracy(np.full_like(test_y, 3), test_y, 1.0, "constant")
  with pytest.raises(AssertionError, match="collapse"):  # right on 5 of the 8 tokens only
    _check_keeps_accuracy(np.where(test_y < 5, test_y, 0), test_y, 0.7, "five tokens")


def _run(method, spec, rounds, cohort, train):
  """All rounds through `federated.run_rounds`; returns (final state, last record, states)."""
  states = []
  for round_idx, state, record in federated.run_rounds(
      method, method.init(), train=train, cohort_fn=lambda r: cohort,
      train_root=jax.random.key(2), init_key=jax.random.key(1), rounds=range(rounds),
      compile_round=lambda a: federated.make_round(a, execution=federated.Vmap())):
    states.append(jax.device_get(state.server))
  return state, record, states


def _predict(spec, params, x):
  return np.argmax(_logits(spec, params, jnp.asarray(x)), -1)


def _hetero_method(name, capacities, client_caps):
  spec = OUTCOME_TRANSFORMER
  apply_fn, params, _ = models.build(spec, jax.random.key(0))
  train, test_x, test_y, test_clients = _copy_task()
  if name == "fiarse":
    hetero = fiarse.fiarse(apply_fn, OPTIMIZER, SCHEDULE, capacities=capacities)
    factory = fiarse.fiarse_method
  else:
    module = {"heterofl": heterofl, "fedrolex": fedrolex}[name]
    hetero = getattr(module, name)(apply_fn, OPTIMIZER, SCHEDULE, capacities=capacities, spec=spec)
    factory = getattr(module, f"{name}_method")
  test = _hetero.LevelTest(jnp.asarray(test_x), jnp.asarray(test_y), test_clients, 64)
  method = factory(hetero, spec=spec, params=params, batch_stats={}, key=jax.random.key(0),
                   eval_apply=apply_fn, test=test, client_caps=np.asarray(client_caps, np.float32),
                   capacities=capacities)
  cohort = federated.make_cohort(range(CLIENTS), capacity=list(client_caps))
  return hetero, method, cohort, train


@functools.lru_cache(maxsize=None)
def _dense_transformer_accuracy() -> float:
  """Dense FedAvg at equal training: every client at capacity 1 (no submodel anywhere)."""
  hetero, method, cohort, train = _hetero_method("heterofl", (1.0,), [1.0] * CLIENTS)
  state, _, _ = _run(method, OUTCOME_TRANSFORMER, TRANSFORMER_ROUNDS, cohort, train)
  accuracy = method.evaluator(OUTCOME_TRANSFORMER)(state, TRANSFORMER_ROUNDS - 1)["global_1"]
  assert accuracy >= 0.95, f"the dense reference must learn the task, got {accuracy:.3f}"
  return accuracy


@pytest.mark.slow
@pytest.mark.parametrize("name,smallest", [("heterofl", 1 / 64), ("fedrolex", 1 / 64),
                                           ("fiarse", 1 / 4)])
def test_transformer_submodel_keeps_the_dense_accuracy(name, smallest):
  """Module docstring: the width methods at 1/64, FIARSE at 1/4, through their Methods."""
  dense_accuracy = _dense_transformer_accuracy()
  client_caps = np.asarray(CAPACITIES)[np.arange(CLIENTS) % len(CAPACITIES)]
  hetero, method, cohort, train = _hetero_method(name, CAPACITIES, client_caps)
  state, _, _ = _run(method, OUTCOME_TRANSFORMER, TRANSFORMER_ROUNDS, cohort, train)
  _, test_x, test_y, _ = _copy_task()
  evaluation = method.evaluator(OUTCOME_TRANSFORMER)(state, TRANSFORMER_ROUNDS - 1)
  label = _hetero.level_label(smallest)
  sub, _ = hetero.submodel(state.server, smallest)
  pred = _predict(OUTCOME_TRANSFORMER, sub, test_x)
  accuracy = _check_keeps_accuracy(pred, test_y, dense_accuracy, f"{name} at {label}")
  assert evaluation[f"global_{label}"] == pytest.approx(accuracy)  # the Method evaluates it
  assert evaluation["global_1"] >= 0.95 * dense_accuracy
  summary = method.summary(state, evaluation)
  level = dict(zip(summary["capacities"], summary["level_params"]))
  assert level[1.0] == summary["params"] == 9256 and level[smallest] < level[1.0]


@functools.lru_cache(maxsize=None)
def _sparse_run(kind: str, distribution: str = "uniform"):
  """(final state, last record, per-round server states, evaluator) of a 'dense', 'fedtiny'
  or 'magnitude' LSTM run of LSTM_ROUNDS rounds from the same init, keys and schedule."""
  spec = OUTCOME_LSTM
  train, test_x, _, _ = _copy_task()
  params, stats = models.init_params(spec, jax.random.key(0))

  def evaluate_with(apply_fn):
    predict = jax.jit(lambda p, s: jnp.argmax(
        apply_fn(p, s, jnp.asarray(test_x), train=False)[0], -1))
    return lambda p, s: {"predictions": np.asarray(predict(p, s))}

  run = base.SparseRun(spec=spec, params=params, batch_stats=stats, key=jax.random.key(0),
                       optimizer=OPTIMIZER, schedule=SCHEDULE,
                       model=federated.ModelFns(models.make_apply, evaluate_with), train=train,
                       clients_per_round=CLIENTS, rounds=LSTM_ROUNDS)
  cohort = federated.make_cohort(range(CLIENTS))
  prunable = _sparse.prunable_filter(params)
  if kind == "dense":
    method = base.dense_method(run)
  elif kind == "fedtiny":
    method = ft.fedtiny_method(run, density=DENSITY, distribution=distribution, num_candidates=2,
                               abns_cohort=cohort, abns_batch_size=32, adjust_every=1,
                               adjust_end=LSTM_ROUNDS)
  else:  # fixed magnitude masks of the initial weights, trained by masked FedAvg
    apply_fn = models.make_apply(spec)
    rule = base.fixed_masks(lambda p, s: ft.sparse_setup(p, DENSITY, distribution=distribution,
                                                          prunable=prunable)[1])
    alg = base.masked_fedavg(apply_fn, OPTIMIZER, SCHEDULE, rule)
    method = base.masked_method(
        run, alg, lambda: (alg.init(params, run.key, batch_stats=stats), {}), apply_fn=apply_fn,
        prunable=prunable)
  state, record, states = _run(method, spec, LSTM_ROUNDS, cohort, train)
  return state, record, states, method.evaluator(spec)


@pytest.mark.slow
@pytest.mark.parametrize("kind,distribution", [("fedtiny", "uniform"), ("magnitude", "uniform"),
                                               ("fedtiny", "erk")])
def test_lstm_at_density_0_2_keeps_the_dense_accuracy(kind, distribution):
  _, _, test_y, _ = _copy_task()
  state, _, _, evaluate = _sparse_run("dense")
  dense_accuracy = float(np.mean(evaluate(state, LSTM_ROUNDS - 1)["predictions"] == test_y))
  assert dense_accuracy >= 0.95, dense_accuracy
  state, record, states, evaluate = _sparse_run(kind, distribution)
  assert record["density"] == pytest.approx(DENSITY, abs=2e-3)
  final = states[-1]
  assert float(masks_lib.density(final.masks, final.params)) == pytest.approx(DENSITY, abs=2e-3)
  assert record["params"] < 0.25 * accounting.param_count(OUTCOME_LSTM)
  _check_keeps_accuracy(evaluate(state, LSTM_ROUNDS - 1)["predictions"], test_y, dense_accuracy,
                        f"{kind} ({distribution}) at density {DENSITY}")
  embedding = states[-1].masks["embed"]["embedding"]
  assert np.asarray(embedding).all()  # the embedding table stays dense
  if kind != "fedtiny":
    return
  # Prune-and-grow keeps every layer's count over all its adjustments, and the masks move.
  flags = _sparse.leaf_flags(states[0].params, _sparse.prunable_filter(states[0].params))
  counts = _sparse.keep_counts(states[0].masks, flags)
  moved = 0
  for before, after in zip(states[:-1], states[1:]):
    assert _sparse.keep_counts(after.masks, flags) == counts
    moved += any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(before.masks), jax.tree.leaves(after.masks)))
  assert moved >= LSTM_ROUNDS // 2, moved


# ----------------------------------------------------------------------------
# Slow: the library contract's invariants for the text runs (tests/test_method_library_contract.py
# builds its cases through experiments/build.py, which has no text configs yet).


# SGD: Adam turns float-rounding noise on zero-gradient coordinates (an attention key bias:
# softmax ignores a constant shift) into lr-sized steps, so cohort order would show.
CONTRACT_OPTIMIZER = optax.sgd(0.3)


def _contract_run(name, cohort, key_seed=2, rounds=2):
  """The server state after `rounds` rounds of method `name` on its text model."""
  train, _, _, _ = _copy_task()
  round_fn, state = _contract_setup(name)
  for t in range(rounds):
    state, _ = round_fn(state, train, cohort, federated.round_key(jax.random.key(key_seed), t))
  return jax.device_get(state)


@functools.lru_cache(maxsize=None)
def _contract_setup(name):
  """(round function, initial server state) of method `name` (one jitted round each)."""
  if name in ("fiarse", "heterofl", "fedrolex"):
    spec = OUTCOME_TRANSFORMER
    apply_fn, params, _ = models.build(spec, jax.random.key(0))
    if name == "fiarse":
      alg = fiarse.fiarse(apply_fn, CONTRACT_OPTIMIZER, SCHEDULE, capacities=CAPACITIES).algorithm
    else:
      alg = getattr({"heterofl": heterofl, "fedrolex": fedrolex}[name], name)(
          apply_fn, CONTRACT_OPTIMIZER, SCHEDULE, capacities=CAPACITIES, spec=spec).algorithm
    state = alg.init(params, jax.random.key(1))
  else:
    spec = OUTCOME_LSTM
    apply_fn, params, _ = models.build(spec, jax.random.key(0))
    prunable = _sparse.prunable_filter(params)
    params, masks = ft.sparse_setup(params, DENSITY, prunable=prunable)
    if name == "fedtiny":
      alg = ft.fedtiny(apply_fn, CONTRACT_OPTIMIZER, SCHEDULE, prunable=prunable,
                       adjust_every=1, adjust_end=4)
    else:
      alg = base.masked_fedavg(apply_fn, CONTRACT_OPTIMIZER, SCHEDULE,
                               base.fixed_masks(lambda p, s: masks))
    state = alg.init(params, jax.random.key(1), masks=masks) if name == "fedtiny" else alg.init(
        params, jax.random.key(1))
  return federated.make_round(alg, execution=federated.Sequential()), state


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fiarse", "heterofl", "fedrolex", "fedtiny", "magnitude"])
def test_text_method_contract(name):
  caps = list(np.asarray(CAPACITIES)[np.arange(4) % 4])
  cohort = federated.make_cohort([0, 3, 5, 6], capacity=caps)
  base_state = _contract_run(name, cohort)
  leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(s.params)]
  # Padding clients change nothing (bit for bit, sequential execution).
  padded = federated.make_cohort([0, 3, 5, 6], capacity=caps, multiple=6)
  assert len(padded.client_ids) == 6
  for a, b in zip(leaves(_contract_run(name, padded)), leaves(base_state)):
    np.testing.assert_array_equal(a, b)
  # The order of the cohort does not matter (up to float summation order).
  order = [3, 1, 0, 2]
  permuted = federated.make_cohort([[0, 3, 5, 6][i] for i in order],
                                   capacity=[caps[i] for i in order])
  for a, b in zip(leaves(_contract_run(name, permuted)), leaves(base_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Another training key gives another model.
  other = leaves(_contract_run(name, cohort, key_seed=3))
  assert any(not np.array_equal(a, b) for a, b in zip(other, leaves(base_state)))
  # Masks consistent: a masked-out parameter is exactly zero.
  masks = getattr(base_state, "masks", None)
  if masks is not None:
    masks_lib.check(base_state.params, masks)
    for p, m in zip(jax.tree.leaves(base_state.params), jax.tree.leaves(masks)):
      assert not np.any(np.asarray(p)[~np.broadcast_to(np.asarray(m), np.shape(p))])

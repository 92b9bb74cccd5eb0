"""Text surgery contract: shrunk model == masked dense model == gated model; accounting agrees."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import accounting, models, structured

LSTM = models.LSTMSpec(vocab_size=7, seq_len=5, embed_dim=3, hidden=(6, 5))
TRANSFORMER = models.TransformerSpec(vocab_size=7, seq_len=5, d_model=8,
                                     blocks=((3, 2, 10), (2, 3, 6), (2, 2, 4)))

# name -> (spec, keep, drop_blocks)
CASES = {
    "lstm_units": (LSTM, {"lstm_0": np.array([0, 2, 5]), "lstm_1": np.array([1, 4])}, ()),
    "heads": (TRANSFORMER, {"block_0": {"attn": np.array([True, False, True])},
                            "block_1/attn": np.array([], np.int64)}, ()),  # all heads of block 1
    "ffn_units": (TRANSFORMER, {"block_0/ffn": np.array([1, 3, 4, 8]),
                                "block_2/ffn": np.array([], np.int64)}, ()),
    "blocks": (TRANSFORMER, {}, ("block_1",)),
    "all": (TRANSFORMER, {"block_0/attn": np.array([2]), "block_0/ffn": np.array([0, 9]),
                          "block_2/attn": np.array([0]), "block_1/ffn": np.array([5])},
            ("block_1",)),
}


def _random_params(spec, seed):
  params, _ = models.init_params(spec, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32) * 0.5),
                      params)


def _masked(params, masks):
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)


def _apply(spec):
  return jax.jit(models.make_apply(spec), static_argnames=("train", "all_positions"))


def _ids(spec, seed=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, spec.vocab_size, (3, spec.seq_len)), jnp.int32)


SLOW_CASES = ("ffn_units", "blocks", "heads")  # also inside "all"; each case compiles 2 transformers


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                  for n in sorted(CASES)])
def test_shrunk_equals_masked_dense(name):
  spec, keep, drop = CASES[name]
  params = _random_params(spec, 1)
  out = structured.text_shrink(spec, params, keep, drop_blocks=drop)
  masks = structured.text_keep_masks(spec, keep, drop_blocks=drop)
  ids = _ids(spec)
  want, _ = _apply(spec)(_masked(params, masks), {}, ids, train=False, all_positions=True)
  got, _ = _apply(out.spec)(out.params, {}, ids, train=False, all_positions=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The removal matters: the unmasked dense model computes something else.
  full, _ = _apply(spec)(params, {}, ids, train=False, all_positions=True)
  assert np.abs(np.asarray(full - want)).max() > 1e-3
  # The accounting of the shrunk spec equals that of the masked dense one.
  assert accounting.param_count(out.spec) == accounting.param_count(spec, masks)
  assert accounting.param_count(out.spec) < accounting.param_count(spec)
  for positions in (False, True):
    assert (accounting.text_flops(out.spec, all_positions=positions)
            == accounting.text_flops(spec, masks, all_positions=positions))
  assert accounting.flops(out.spec) < accounting.flops(spec)


def test_expected_spec_and_shapes():
  spec, keep, drop = CASES["all"]
  out = structured.text_shrink(spec, _random_params(spec, 0), keep, drop_blocks=drop)
  assert out.spec.blocks == ((1, 2, 2), (1, 2, 4))  # block_2 renamed block_1
  assert sorted(k for k in out.params if k.startswith("block_")) == ["block_0", "block_1"]
  assert out.params["block_1"]["attn"]["query"]["kernel"].shape == (8, 2)
  lstm = structured.text_shrink(LSTM, _random_params(LSTM, 0), CASES["lstm_units"][1])
  assert lstm.spec.hidden == (3, 2)
  assert lstm.params["lstm_1"]["kernel"].shape == (3, 8)
  assert lstm.params["lstm_1"]["recurrent_kernel"].shape == (2, 8)
  assert lstm.params["head"]["kernel"].shape == (2, 7)


def test_sliced_gate_columns_are_the_kept_units_of_every_gate():
  params = _random_params(LSTM, 2)
  out = structured.text_shrink(LSTM, params, {"lstm_0": np.array([1, 4])})
  kernel = np.asarray(params["lstm_0"]["kernel"])
  cols = [g * 6 + j for g in range(4) for j in (1, 4)]
  np.testing.assert_array_equal(out.params["lstm_0"]["kernel"], kernel[:, cols])
  np.testing.assert_array_equal(out.params["lstm_1"]["kernel"],
                                np.asarray(params["lstm_1"]["kernel"])[[1, 4]])


@pytest.mark.parametrize("name", ["all", pytest.param("lstm_units", marks=pytest.mark.slow)])
def test_zero_gates_equal_the_shrunk_model(name):
  """`gates` (structure gates for CAT-style methods) at 0 remove exactly what surgery removes."""
  spec, keep, drop = CASES[name]
  params = _random_params(spec, 4)
  idx = structured.text_keep_indices(spec, keep)
  gates = {}
  for group, kept in idx.items():
    width = next(g.width for g in structured.text_groups(spec) if g.name == group)
    vector = jnp.zeros((width,)).at[kept].set(1.0)
    if isinstance(spec, models.LSTMSpec):
      gates[group] = vector
    else:
      block, kind = group.split("/")
      gates.setdefault(block, {})["heads" if kind == "attn" else "ffn"] = vector
  for block in drop:
    gates[block]["layer"] = jnp.zeros(())
  ids = _ids(spec)
  gated, _ = _apply(spec)(params, {}, ids, train=False, all_positions=True, gates=gates)
  out = structured.text_shrink(spec, params, keep, drop_blocks=drop)
  got, _ = _apply(out.spec)(out.params, {}, ids, train=False, all_positions=True)
  np.testing.assert_allclose(got, gated, rtol=1e-5, atol=1e-5)


def test_optimizer_state_is_sliced_like_the_params():
  spec, keep, drop = CASES["all"]
  params = _random_params(spec, 5)
  opt = optax.adam(0.1)
  state = opt.init(params)
  state = jax.tree.map(lambda x: x, state)
  state[0].mu.update(params)  # mu = params, so the sliced mu must equal the sliced params
  out = structured.text_shrink(spec, params, keep, drop_blocks=drop, opt_state=state)
  jax.tree.map(np.testing.assert_array_equal, out.opt_state[0].mu, out.params)
  assert int(out.opt_state[0].count) == int(state[0].count)


def test_group_l1_of_unit_weights():
  ones = jax.tree.map(jnp.ones_like, _random_params(LSTM, 0))
  l1 = structured.text_group_l1(LSTM, ones)
  np.testing.assert_array_equal(l1["lstm_0"], np.full(6, 4 * (3 + 6)))
  np.testing.assert_array_equal(l1["lstm_1"], np.full(5, 4 * (6 + 5)))
  params = jax.tree.map(jnp.ones_like, _random_params(TRANSFORMER, 0))
  params["block_0"]["attn"]["key"]["kernel"] = params["block_0"]["attn"]["key"]["kernel"].at[:, 2:4].set(0.0)
  l1 = structured.text_group_l1(TRANSFORMER, params)
  np.testing.assert_array_equal(l1["block_0/attn"], [3 * 8 * 2, 2 * 8 * 2, 3 * 8 * 2])
  np.testing.assert_array_equal(l1["block_0/ffn"], np.full(10, 8))


def test_bad_keep_gives_clear_errors():
  params = _random_params(TRANSFORMER, 0)
  with pytest.raises(ValueError, match="names no prunable group"):
    structured.text_shrink(TRANSFORMER, params, {"block_0/query": np.array([0])})
  with pytest.raises(ValueError, match=r"expected \(3,\)"):
    structured.text_shrink(TRANSFORMER, params, {"block_0/attn": np.array([True, False])})
  with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
    structured.text_shrink(TRANSFORMER, params, {"block_0/attn": np.array([3])})
  with pytest.raises(ValueError, match="unknown blocks"):
    structured.text_shrink(TRANSFORMER, params, {}, drop_blocks=["block_9"])
  lstm_params = _random_params(LSTM, 0)
  with pytest.raises(ValueError, match="keeps no unit of LSTM layer"):
    structured.text_shrink(LSTM, lstm_params, {"lstm_0": np.zeros(6, bool)})
  with pytest.raises(ValueError, match="needs a TransformerSpec"):
    structured.text_shrink(LSTM, lstm_params, {}, drop_blocks=["block_0"])
  with pytest.raises(ValueError, match="LSTMSpec or TransformerSpec"):
    structured.text_groups(models.mlp())

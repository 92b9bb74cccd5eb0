"""The generic structured entry points hand text specs to the text surgery, unchanged.

Methods written against `structured.shrink` / `keep_masks` / `group_l1` (ASP, the
library contract's shrunk == masked check) must prune LSTM units and attention heads
exactly as `text_shrink` / `text_keep_masks` / `text_group_l1` do. Host-side numpy only:
nothing here compiles.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import models, structured

LSTM = models.LSTMSpec(vocab_size=7, seq_len=5, embed_dim=3, hidden=(6, 5))
TRANSFORMER = models.TransformerSpec(vocab_size=7, seq_len=5, d_model=8,
                                     blocks=((3, 2, 10), (2, 3, 6)))
CASES = {
    "lstm": (LSTM, {"lstm_0": np.array([0, 2, 5]), "lstm_1": np.array([True, False, True,
                                                                        False, True])}),
    "transformer": (TRANSFORMER, {"block_0/attn": np.array([0, 2]),
                                  "block_1": {"ffn": np.array([1, 4])},
                                  "block_1/attn": np.array([], np.int64)}),
}


def _params(spec, seed=1):
  params, _ = models.init_params(spec, jax.random.key(0))
  rng = np.random.default_rng(seed)  # distinct values everywhere: a wrong slice shows
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(CASES))
def test_generic_calls_equal_text_calls(name):
  spec, keep = CASES[name]
  params = _params(spec)
  opt_state = optax.adam(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + 1 if jnp.ndim(x) else x, opt_state)  # not all zeros
  generic = structured.shrink(spec, params, keep, opt_state=opt_state)
  text = structured.text_shrink(spec, params, keep, opt_state=opt_state)
  assert generic.spec == text.spec
  _assert_same_tree(generic.params, text.params)
  _assert_same_tree(generic.opt_state, text.opt_state)
  assert generic.batch_stats is None  # none passed in, none returned (as for the CNNs)
  assert structured.shrink(spec, params, keep, batch_stats={}).batch_stats == {}
  _assert_same_tree(structured.keep_masks(spec, keep), structured.text_keep_masks(spec, keep))
  _assert_same_tree(structured.slice_like(opt_state, spec, keep),
                    structured.text_slice_like(opt_state, spec, keep))
  assert structured.groups(spec) == structured.text_groups(spec)
  for got, want in ((structured.keep_indices(spec, keep), structured.text_keep_indices(spec, keep)),
                    (structured.group_l1(spec, params), structured.text_group_l1(spec, params))):
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_generic_shrink_really_slices_the_text_model():
  # Independent of the text functions: LSTM unit j of layer 0 owns the 4 gate columns
  # g * H + j of its kernels and row j of its recurrent kernel and of layer 1's kernel.
  spec, keep = CASES["lstm"]
  params = _params(spec)
  out = structured.shrink(spec, params, keep)
  assert out.spec.hidden == (3, 3)
  cols = np.concatenate([g * 6 + np.array([0, 2, 5]) for g in range(4)])
  np.testing.assert_array_equal(out.params["lstm_0"]["kernel"],
                                np.asarray(params["lstm_0"]["kernel"])[:, cols])
  np.testing.assert_array_equal(out.params["lstm_0"]["recurrent_kernel"],
                                np.asarray(params["lstm_0"]["recurrent_kernel"])[[0, 2, 5]][:, cols])
  np.testing.assert_array_equal(out.params["head"]["kernel"],
                                np.asarray(params["head"]["kernel"])[[0, 2, 4]])
  # group_l1 of unit j: |kernel| + |recurrent_kernel| over its 4 gate columns.
  p = params["lstm_0"]
  l1 = (np.abs(np.asarray(p["kernel"])).sum(0) + np.abs(np.asarray(p["recurrent_kernel"])).sum(0))
  np.testing.assert_allclose(structured.group_l1(spec, params)["lstm_0"],
                             l1.reshape(4, 6).sum(0), rtol=1e-6)


def test_text_batch_stats_and_bad_keep_are_refused():
  spec, keep = CASES["lstm"]
  params = _params(spec)
  with pytest.raises(ValueError, match="no batch_stats"):
    structured.shrink(spec, params, keep, batch_stats={"x": jnp.zeros(3)})
  with pytest.raises(ValueError, match="keeps no unit of LSTM layer"):
    structured.keep_masks(spec, {"lstm_0": np.array([], np.int64)})
  with pytest.raises(ValueError, match="names no prunable group"):
    structured.shrink(spec, params, {"conv_0": np.array([0])})

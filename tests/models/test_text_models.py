"""Text models: shapes, causality, numpy references, bad input, and the engine round contract."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import data as data_lib
from fedjax_prune import federated, models, testing
from fedjax_prune.data import client_slice, from_client_lists, to_device

LSTM = models.LSTMSpec(vocab_size=7, seq_len=6, embed_dim=3, hidden=(5, 4))
TRANSFORMER = models.TransformerSpec(vocab_size=7, seq_len=6, d_model=8,
                                     blocks=((2, 3, 10), (1, 4, 6)))
SPECS = {"lstm": LSTM, "transformer": TRANSFORMER}


def _random_params(spec, seed):
  """Every leaf random (biases, LayerNorm too), so no term of the forward pass hides."""
  params, _ = models.init_params(spec, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32) * 0.5),
                      params)


def _ids(spec, batch, seed, length=None):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, spec.vocab_size, (batch, length or spec.seq_len)), jnp.int32)


# ---------------------------------------------------------------------------- numpy references


def _np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _np_lstm(spec, params, ids):
  """The LSTM written out step by step in float64, gate blocks (i, f, g, o)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h_seq = p["embed"]["embedding"][np.asarray(ids)]  # [B, T, E]
  for l, width in enumerate(spec.hidden):
    w, u, b = (p[f"lstm_{l}"][k] for k in ("kernel", "recurrent_kernel", "bias"))
    h = np.zeros((ids.shape[0], width))
    c = np.zeros((ids.shape[0], width))
    outs = []
    for t in range(ids.shape[1]):
      z = h_seq[:, t] @ w + h @ u + b
      i, f, g, o = (z[:, k * width:(k + 1) * width] for k in range(4))
      c = _np_sigmoid(f) * c + _np_sigmoid(i) * np.tanh(g)
      h = _np_sigmoid(o) * np.tanh(c)
      outs.append(h)
    h_seq = np.stack(outs, axis=1)
  return h_seq @ p["head"]["kernel"] + p["head"]["bias"]  # [B, T, V]


def _np_layer_norm(p, h):
  mean = h.mean(-1, keepdims=True)
  var = ((h - mean) ** 2).mean(-1, keepdims=True)
  return (h - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_transformer(spec, params, ids):
  """Pre-norm causal transformer with an explicit loop over heads and query positions."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  t = ids.shape[1]
  h = p["embed"]["embedding"][np.asarray(ids)] + p["pos_embed"]["embedding"][:t]
  dense = lambda q, x: x @ q["kernel"] + q["bias"]
  gelu = np.vectorize(lambda z: 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0))))
  for l, (heads, dh, _) in enumerate(spec.blocks):
    blk = p[f"block_{l}"]
    a = _np_layer_norm(blk["ln_1"], h)
    q, k, v = (dense(blk["attn"][n], a) for n in ("query", "key", "value"))
    out = np.zeros(h.shape[:2] + (heads * dh,))
    for n in range(heads):
      cols = slice(n * dh, (n + 1) * dh)
      for i in range(t):
        s = np.einsum("be,bje->bj", q[:, i, cols], k[:, :i + 1, cols]) / math.sqrt(dh)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, i, cols] = np.einsum("bj,bje->be", w, v[:, :i + 1, cols])
    h = h + dense(blk["attn"]["out"], out)
    h = h + dense(blk["ffn"]["dense_1"], gelu(dense(blk["ffn"]["dense_0"],
                                                    _np_layer_norm(blk["ln_2"], h))))
  return dense(p["head"], _np_layer_norm(p["ln_f"], h))


REFERENCES = {"lstm": _np_lstm, "transformer": _np_transformer}


# ---------------------------------------------------------------------------- forward pass


@pytest.mark.parametrize("name", sorted(SPECS))
def test_outputs_match_numpy_reference_at_every_position(name):
  spec = SPECS[name]
  params = _random_params(spec, 1)
  ids = _ids(spec, 3, 2)
  apply_fn = jax.jit(models.make_apply(spec), static_argnames=("train", "all_positions"))
  every, stats = apply_fn(params, {}, ids, train=True, all_positions=True)
  last, _ = apply_fn(params, {}, ids, train=False)
  assert every.shape == (3, spec.seq_len, spec.vocab_size) and every.dtype == jnp.float32
  assert last.shape == (3, spec.vocab_size) and stats == {}
  want = REFERENCES[name](spec, params, ids)
  np.testing.assert_allclose(every, want, rtol=2e-4, atol=2e-4)
  # The default output is the next token after the window: the last position's logits.
  np.testing.assert_allclose(last, want[:, -1], rtol=2e-4, atol=2e-4)
  # Shorter windows than the context run too (the transformer uses the first T positions).
  short, _ = apply_fn(params, {}, ids[:, :3], train=False, all_positions=True)
  np.testing.assert_allclose(short, REFERENCES[name](spec, params, ids[:, :3]), rtol=2e-4,
                             atol=2e-4)



def test_residual_stream_is_the_identity_with_an_identity_backward(monkeypatch):
  """`residual_stream` only changes where XLA materialises the transformer's cotangents:
  its value and its VJP are exact identities, and the transformer's gradients equal those
  of the same forward pass without it (to float rounding: XLA fuses the sums differently)."""
  from fedjax_prune.models import _text
  h = jax.random.normal(jax.random.key(0), (2, 3, 4))
  g = jax.random.normal(jax.random.key(1), (2, 3, 4))
  value, vjp = jax.vjp(_text.residual_stream, h)
  np.testing.assert_array_equal(value, h)
  np.testing.assert_array_equal(vjp(g)[0], g)
  params = _random_params(TRANSFORMER, 0)
  ids, labels = _ids(TRANSFORMER, 3, 1), jnp.array([0, 3, 6])

  def grads():
    apply = models.make_apply(TRANSFORMER)
    def loss(p):
      logits, _ = apply(p, {}, ids, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return jax.jit(jax.grad(loss))(params)

  with_stream = grads()
  monkeypatch.setattr(_text, "residual_stream", lambda x: x)
  for a, b in zip(jax.tree.leaves(with_stream), jax.tree.leaves(grads())):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate_kind", ["none", "per_unit", "per_example"])
def test_lstm_recurrence_custom_vjp_equals_autodiff_of_the_scan(gate_kind):
  """The hand-written backward pass (dU as one matmul after the scan) gives the gradients
  that reverse-mode autodiff of the plain `lax.scan` gives, for z, U and the unit gate (a
  zero gate included, as a pruned unit), under vmap over clients too; the forward values
  are the scan's bit for bit."""
  from fedjax_prune.models import _text
  t, b, h = 7, 3, 5
  keys = jax.random.split(jax.random.key(0), 5)
  z_x = jax.random.normal(keys[0], (2, t, b, 4 * h))  # two "clients"
  u = 0.5 * jax.random.normal(keys[1], (2, h, 4 * h))
  weights = jax.random.normal(keys[2], (t, b, h))
  gate = {"none": None,
          "per_unit": jax.random.uniform(keys[3], (2, h)).at[:, 1].set(0.0),
          "per_example": jax.random.uniform(keys[4], (2, b, h))}[gate_kind]

  def objective(recurrence):
    def loss(z, u, g):  # a nonlinear readout of every step, so every dh_t is distinct
      return jnp.sum(weights * jnp.sin(recurrence(z, u, g)))
    grad = jax.grad(loss, argnums=(0, 1) if gate is None else (0, 1, 2))
    return jax.vmap(grad, in_axes=(0, 0, None if gate is None else 0))

  got = objective(_text.lstm_recurrence)(z_x, u, gate)
  want = objective(lambda z, u, g: _text._lstm_scan(z, u, g, keep=False))(z_x, u, gate)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert bool(jnp.any(got[1] != 0))
  if gate is not None:
    assert float(jnp.max(jnp.abs(got[2]))) > 1e-3  # the gate's gradient is not dropped
  for c in range(2):
    g_c = None if gate is None else gate[c]
    np.testing.assert_array_equal(_text.lstm_recurrence(z_x[c], u[c], g_c),
                                  _text._lstm_scan(z_x[c], u[c], g_c, keep=False))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_causal_a_future_token_changes_no_earlier_logits(name):
  spec = SPECS[name]
  params = _random_params(spec, 3)
  ids = _ids(spec, 2, 4)
  apply_fn = jax.jit(models.make_apply(spec), static_argnames=("train", "all_positions"))
  base, _ = apply_fn(params, {}, ids, train=False, all_positions=True)
  for t in (1, spec.seq_len - 1):
    changed = ids.at[:, t].set((ids[:, t] + 1) % spec.vocab_size)
    out, _ = apply_fn(params, {}, changed, train=False, all_positions=True)
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(np.asarray(out[:, t:] - base[:, t:])).max() > 1e-4  # it does read token t


def test_lstm_init_follows_leaf_and_keys():
  spec = models.leaf_shakespeare_lstm(hidden=(6,), embed_dim=2)
  assert spec.vocab_size == data_lib.VOCAB_SIZE == 81 and spec.seq_len == 80
  params, stats = models.init_params(spec, jax.random.key(0))
  bias = np.asarray(params["lstm_0"]["bias"])
  np.testing.assert_array_equal(bias, np.r_[np.zeros(6), np.ones(6), np.zeros(12)])
  limit = math.sqrt(6 / (2 + 6 + 24))  # glorot over the [in + H, 4H] matrix, as TF stores it
  kernels = np.concatenate([np.ravel(params["lstm_0"]["kernel"]),
                            np.ravel(params["lstm_0"]["recurrent_kernel"])])
  assert np.abs(kernels).max() <= limit and np.abs(kernels).max() > 0.8 * limit
  # A traced key (vmap over clients) gives the same initialisation as the concrete one.
  vmapped = jax.vmap(lambda k: models.init_params(spec, k)[0])(jax.random.split(jax.random.key(0), 1)[:1])
  first = models.init_params(spec, jax.random.split(jax.random.key(0), 1)[0])[0]
  testing.assert_trees_close(jax.tree.map(lambda a: a[0], vmapped), first)
  other, _ = models.init_params(spec, jax.random.key(1))
  assert not np.allclose(other["head"]["kernel"], params["head"]["kernel"])


def test_presets_have_the_documented_sizes():
  count = lambda spec: sum(math.prod(l.shape) for l in jax.tree.leaves(models.param_shapes(spec)[0]))
  # 81*8 + [4*256*(8+256) + 1024] + [4*256*512 + 1024] + 256*81 + 81
  assert count(models.leaf_shakespeare_lstm()) == 648 + 271360 + 525312 + 20817 == 818137
  block = 2 * 256 + 4 * (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128)
  assert count(models.shakespeare_transformer()) == 81 * 128 + 80 * 128 + 4 * block + 256 + 128 * 81 + 81
  assert models.shakespeare_transformer().blocks == ((4, 32, 512),) * 4


def test_bf16_compute_stays_close_to_float32():
  params = _random_params(TRANSFORMER, 5)
  ids = _ids(TRANSFORMER, 2, 6)
  run = lambda dtype: jax.jit(lambda p, x: models.make_apply(TRANSFORMER, compute_dtype=dtype)(
      p, {}, x, train=False)[0])(params, ids)
  f32, bf16 = run(None), run(jnp.bfloat16)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.1 * float(np.abs(f32).max()))


# ---------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors():
  apply_fn, params, _ = models.build(TRANSFORMER, jax.random.key(0))
  with pytest.raises(ValueError, match="longer than the model context seq_len=6"):
    apply_fn(params, {}, jnp.zeros((1, 7), jnp.int32), train=False)
  with pytest.raises(ValueError, match="longer than the model context"):  # also under jit
    jax.jit(lambda x: apply_fn(params, {}, x, train=False))(jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match=r"token id 7 at index \(0, 2\) is outside the vocabulary \[0, 7\)"):
    apply_fn(params, {}, jnp.array([[1, 2, 7]]), train=False)
  with pytest.raises(ValueError, match="token id -1"):
    models.check_text_inputs(LSTM, np.array([[0, -1]]))
  with pytest.raises(ValueError, match="integer token ids"):
    apply_fn(params, {}, jnp.zeros((1, 3), jnp.float32), train=False)
  with pytest.raises(ValueError, match="shape \\[B, T\\]"):
    apply_fn(params, {}, jnp.zeros((3,), jnp.int32), train=False)
  bad = dict(params, head={"kernel": params["head"]["kernel"][:, :3], "bias": params["head"]["bias"]})
  with pytest.raises(ValueError, match="head/kernel has shape"):
    apply_fn(bad, {}, jnp.zeros((1, 3), jnp.int32), train=False)
  with pytest.raises(ValueError, match="block_5"):
    apply_fn(params, {}, jnp.zeros((1, 3), jnp.int32), train=False, gates={"block_5": {}})
  # Inside jit an out-of-vocabulary id cannot raise: it reads no other row, the logits are NaN.
  out = jax.jit(lambda x: apply_fn(params, {}, x, train=False)[0])(jnp.array([[1, 9], [1, 2]]))
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
  with pytest.raises(ValueError, match="num_heads"):
    models.TransformerSpec(vocab_size=5, seq_len=4, d_model=4, blocks=((-1, 2, 4),))
  with pytest.raises(ValueError, match="LSTMSpec.hidden"):
    models.LSTMSpec(vocab_size=5, seq_len=4, embed_dim=2, hidden=())


def test_shakespeare_client_shorter_than_one_window_is_named():
  train = {"long": ["to be or not to be"], "short": ["ay"]}
  with pytest.raises(ValueError, match=r"client 'short' \(train\) has 2 characters, fewer than one "
                                       r"window needs \(seq_len \+ 1 = 9\)"):
    data_lib.shakespeare_from_snippets(train, None, seq_len=8, empty_clients="error")


def test_the_models_read_the_shakespeare_loader_output():
  """Loader windows [N, E, seq_len] uint8 and next-character labels [N, E] fit both models."""
  ds = data_lib.shakespeare_from_snippets({"a": ["To be, or not to be: that is the question."]},
                                          None, seq_len=6)
  x, y = ds.train.x[0, :4], ds.train.y[0, :4]
  for spec in (models.leaf_shakespeare_lstm(hidden=(4,), seq_len=6),
               models.shakespeare_transformer(num_layers=1, d_model=8, num_heads=2, seq_len=6)):
    models.check_text_inputs(spec, x)
    apply_fn, params, stats = models.build(spec, jax.random.key(0))
    logits, _ = apply_fn(params, stats, x, train=False)
    assert logits.shape == (4, data_lib.VOCAB_SIZE)
    loss = federated.softmax_cross_entropy(logits, jnp.asarray(y))
    assert loss.shape == (4,) and np.isfinite(np.asarray(loss)).all()


# ---------------------------------------------------------------------------- engine contract


def _text_clients(spec, sizes=(5, 9, 3), seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.integers(0, spec.vocab_size, (n, spec.seq_len)).astype(np.uint8) for n in sizes]
  ys = [rng.integers(0, spec.vocab_size, n).astype(np.int32) for n in sizes]
  return to_device(from_client_lists(xs, ys))


SCHEDULE = federated.LocalSchedule(batch_size=4, num_epochs=2)
# (model, strategy): one case in the default suite (each compiles a round,
# ~5-10 s on 2 busy cores); the rest under -m slow.
STRATEGIES = {"sequential": lambda: (federated.Sequential(), None),
              "vmap": lambda: (federated.Vmap(), None),
              "chunked2": lambda: (federated.Chunked(2), None),
              "sharded4": lambda: (federated.Sequential(), federated.client_mesh(jax.devices()[:4]))}
DEFAULT_CASES = {("transformer", "vmap")}


@functools.lru_cache(maxsize=None)
def _loop_reference(name, seed=7):
  """(apply_fn, params, data, expected): one FedAvg round as a Python loop over clients of
  the jitted local trainer."""
  spec = SPECS[name]
  apply_fn, params, _ = models.build(spec, jax.random.key(0))
  data = _text_clients(spec)
  local_train = jax.jit(federated.make_local_train(apply_fn, optax.sgd(0.5), SCHEDULE))
  client_root, _ = federated.split_round_key(federated.round_key(jax.random.key(seed), 0))
  models_, weights = [], []
  for cid in range(3):
    local, _ = local_train(params, {}, client_slice(data, cid), jax.random.fold_in(client_root, cid))
    models_.append(local.params)
    weights.append(float(data.num_examples[cid]))
  w = np.asarray(weights) / np.sum(weights)
  expected = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *models_)
  return apply_fn, params, data, expected


@pytest.mark.parametrize("name,strategy", [
    pytest.param(n, s, marks=() if (n, s) in DEFAULT_CASES else pytest.mark.slow)
    for n in sorted(SPECS) for s in STRATEGIES])
def test_round_equals_python_loop_over_clients_under_every_strategy(name, strategy):
  """vmap / sequential / chunked, and sharded over 4 fake devices, equal the per-client loop."""
  if strategy == "sharded4" and jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
  apply_fn, params, data, expected = _loop_reference(name)
  assert not np.allclose(expected["head"]["kernel"], params["head"]["kernel"], atol=1e-4)  # it trained
  alg = federated.fedavg(apply_fn, optax.sgd(0.5), SCHEDULE)
  execution, mesh = STRATEGIES[strategy]()
  state = alg.init(params, jax.random.key(1))
  round_fn = federated.make_round(alg, execution=execution, mesh=mesh)
  state, metrics = round_fn(state, data, federated.make_cohort([0, 1, 2]),
                            federated.round_key(jax.random.key(7), 0))
  testing.assert_trees_close(state.params, expected, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics["train_loss"]))

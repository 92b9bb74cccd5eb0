"""Sequence models for next-token prediction: LEAF's char-LSTM and a small causal transformer.

Both read a window of token ids x [B, T] (T <= `seq_len`, the model's context)
and, like the Shakespeare loader's labels (the character after an 80-character
window, LEAF), return next-token logits for the LAST position only, [B, V]:
the engine's `softmax_cross_entropy(logits [B, V], y [B])` trains them
unchanged. `all_positions=True` returns the logits of every position,
[B, T, V] (position t predicts token t + 1; used for the causality test and
for per-position losses).

They are written as pure functions over the plain-dict params (no NNX): there
is no state besides the parameters (no BatchNorm, `batch_stats == {}`), and the
recurrence (`lax.scan`) and per-head attention read more plainly this way.
`models.build` / `make_apply` / `init_params` / `param_shapes` dispatch here.

Parameter names (kernels [in, out]; gate- and head-blocked columns):

LSTMSpec (gate order i, f, g, o as Keras/PyTorch; column `gate * H + unit`):
    embed:     {embedding [V, E]}
    lstm_{l}:  {kernel [in, 4H], recurrent_kernel [H, 4H], bias [4H]}
               in = E for l = 0, else the previous layer's H
    head:      {kernel [H_last, V], bias [V]}
TransformerSpec (pre-norm; column `head * head_dim + e` in query/key/value):
    embed:     {embedding [V, d]}
    pos_embed: {embedding [seq_len, d]}
    block_{l}: {ln_1: {scale [d], bias [d]},
                attn: {query: {kernel [d, n*dh], bias [n*dh]}, key: {...}, value: {...},
                       out: {kernel [n*dh, d], bias [d]}},
                ln_2: {scale [d], bias [d]},
                ffn:  {dense_0: {kernel [d, F], bias [F]}, dense_1: {kernel [F, d], bias [d]}}}
    ln_f:      {scale [d], bias [d]}
    head:      {kernel [d, V], bias [V]}
    A block may have 0 heads (attention branch = its out bias) or FFN width 0
    (FFN branch = its dense_1 bias): what structured pruning of all heads/units leaves.

LSTM step (h_0 = c_0 = 0): z = x_t W + h_{t-1} U + b; i, f, g, o = split(z);
c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g); h_t = sigmoid(o) tanh(c_t).
Transformer block: h = h + attn(LN_1(h)); h = h + FFN(LN_2(h)), attention causal
multi-head softmax(q k^T / sqrt(dh)) v, FFN dense -> GELU (exact erf) -> dense,
LayerNorm eps 1e-5 (PyTorch), computed in float32 under any compute dtype.

Initialisation:
  * LSTM as LEAF's TensorFlow model (`tf.get_variable` default glorot-uniform
    everywhere): embedding U(+-sqrt(6 / (V + E))); the [in + H, 4H] LSTM
    matrix (kernel over recurrent_kernel, as TF's BasicLSTMCell stores it)
    U(+-sqrt(6 / (in + 5H))); head U(+-sqrt(6 / (H + V))); biases 0 except the
    forget gate's 1 (BasicLSTMCell's `forget_bias=1.0`).
  * Transformer as GPT-2: embeddings and kernels N(0, 0.02), the residual
    projections (attn/out, ffn/dense_1) N(0, 0.02 / sqrt(2 L)); biases 0;
    LayerNorm scale 1, bias 0.
  All draws come from one flat uniform and one flat normal draw (one small
  program to compile per model size, as `_build._default_init`).

Bad input: a sequence longer than `seq_len` or non-integer ids raise in
`apply_fn` (shapes and dtypes are static). Out-of-vocabulary ids raise when
`x` is concrete (`check_text_inputs`, also for data-loading code); inside jit
they cannot raise and give NaN logits instead of silently reading another row.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_prune.data._shakespeare import SEQ_LEN as SHAKESPEARE_SEQ_LEN
from fedjax_prune.data._shakespeare import VOCAB_SIZE as SHAKESPEARE_VOCAB_SIZE
from fedjax_prune.models import _specs
from fedjax_prune.types import ApplyFn, BatchStats, Params, PRNGKey

LN_EPSILON = 1e-5
GATES = ('i', 'f', 'g', 'o')  # LSTM gate blocks, in column order
TRANSFORMER_INIT_STD = 0.02


def _nonneg_int(value, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{field} must be an int >= 0, got {value!r}')
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class LSTMSpec:
  """Char-LSTM: embedding -> stacked LSTM layers -> dense head on the last position.

  Attributes:
    vocab_size: V, number of token ids (and of output logits).
    seq_len: the longest input window (the Shakespeare loader's 80).
    embed_dim: E, embedding width.
    hidden: H per LSTM layer, in order (prunable; at least one layer).
  """
  vocab_size: int
  seq_len: int
  embed_dim: int
  hidden: tuple[int, ...]

  def __post_init__(self):
    _specs._positive_int(self.vocab_size, 'LSTMSpec.vocab_size')
    _specs._positive_int(self.seq_len, 'LSTMSpec.seq_len')
    _specs._positive_int(self.embed_dim, 'LSTMSpec.embed_dim')
    object.__setattr__(self, 'hidden',
                       _specs._int_tuple(self.hidden, 'LSTMSpec.hidden', allow_empty=False))

  @property
  def input_shape(self) -> tuple[int]:
    return (self.seq_len,)

  @property
  def num_classes(self) -> int:
    return self.vocab_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerSpec:
  """Causal pre-norm transformer: token + position embedding -> blocks -> LN -> head.

  Attributes:
    vocab_size: V, number of token ids (and of output logits).
    seq_len: the context length (learned position embeddings; longer inputs raise).
    d_model: d, width of the residual stream.
    blocks: per block (num_heads, head_dim, ffn_width); the number of blocks is
      `len(blocks)`. num_heads and ffn_width may be 0 (a pruned-away branch),
      head_dim >= 1.
  """
  vocab_size: int
  seq_len: int
  d_model: int
  blocks: tuple[tuple[int, int, int], ...]

  def __post_init__(self):
    _specs._positive_int(self.vocab_size, 'TransformerSpec.vocab_size')
    _specs._positive_int(self.seq_len, 'TransformerSpec.seq_len')
    _specs._positive_int(self.d_model, 'TransformerSpec.d_model')
    try:
      blocks = tuple(tuple(b) for b in self.blocks)
    except TypeError:
      raise ValueError('TransformerSpec.blocks must be a tuple of (num_heads, head_dim, '
                       f'ffn_width) triples, got {self.blocks!r}') from None
    for l, block in enumerate(blocks):
      if len(block) != 3:
        raise ValueError(f'TransformerSpec.blocks[{l}] must be (num_heads, head_dim, ffn_width), '
                         f'got {block!r}')
      _nonneg_int(block[0], f'TransformerSpec.blocks[{l}] num_heads')
      _specs._positive_int(block[1], f'TransformerSpec.blocks[{l}] head_dim')
      _nonneg_int(block[2], f'TransformerSpec.blocks[{l}] ffn_width')
    object.__setattr__(self, 'blocks', blocks)

  @property
  def input_shape(self) -> tuple[int]:
    return (self.seq_len,)

  @property
  def num_classes(self) -> int:
    return self.vocab_size


TextSpec = Union[LSTMSpec, TransformerSpec]
TEXT_SPECS = (LSTMSpec, TransformerSpec)


def leaf_shakespeare_lstm(hidden: tuple[int, ...] = (256, 256), embed_dim: int = 8,
                          vocab_size: int = SHAKESPEARE_VOCAB_SIZE,
                          seq_len: int = SHAKESPEARE_SEQ_LEN) -> LSTMSpec:
  """LEAF's Shakespeare char-LSTM (Caldas et al., 2018): 8-dim embedding, 2 x 256 LSTM.

  Vocabulary: the loader's (`data.VOCAB_SIZE` = 81: LEAF's 80 letters + OOV).
  818,137 parameters at the defaults.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fedjax_prune import models
    >>> spec = models.leaf_shakespeare_lstm(hidden=(16,))
    >>> apply_fn, params, batch_stats = models.build(spec, jax.random.key(0))
    >>> logits, _ = apply_fn(params, batch_stats, jnp.zeros((2, 80), jnp.int32), train=False)
    >>> logits.shape  # the next character after each 80-character window
    (2, 81)
  """
  return LSTMSpec(vocab_size=vocab_size, seq_len=seq_len, embed_dim=embed_dim,
                  hidden=tuple(hidden))


def shakespeare_transformer(num_layers: int = 4, d_model: int = 128, num_heads: int = 4,
                            head_dim: Optional[int] = None, ffn_width: Optional[int] = None,
                            vocab_size: int = SHAKESPEARE_VOCAB_SIZE,
                            seq_len: int = SHAKESPEARE_SEQ_LEN) -> TransformerSpec:
  """A small causal transformer for next-character prediction (default 4 x d 128, 4 heads).

  head_dim defaults to d_model // num_heads, ffn_width to 4 d_model. 824,401
  parameters at the defaults (V = 81, context 80).
  """
  _specs._positive_int(num_layers, 'shakespeare_transformer num_layers')
  _specs._positive_int(num_heads, 'shakespeare_transformer num_heads')
  if head_dim is None:
    if d_model % num_heads:
      raise ValueError(f'shakespeare_transformer: d_model={d_model} is not divisible by '
                       f'num_heads={num_heads}; pass head_dim')
    head_dim = d_model // num_heads
  ffn_width = 4 * d_model if ffn_width is None else ffn_width
  return TransformerSpec(vocab_size=vocab_size, seq_len=seq_len, d_model=d_model,
                         blocks=((num_heads, head_dim, ffn_width),) * num_layers)


# ----------------------------------------------------------------------------
# Parameter layout and initialisation.


def _layout(spec: TextSpec) -> list[tuple[tuple[str, ...], tuple[int, ...], str, float]]:
  """Every param leaf as (path, shape, init kind, scale); kinds 'uniform' (U(+-scale)),
  'normal' (N(0, scale^2)), 'zeros', 'ones', 'forget' (0 but 1 in the forget-gate block)."""
  rows = []
  if isinstance(spec, LSTMSpec):
    v, e = spec.vocab_size, spec.embed_dim
    rows.append((('embed', 'embedding'), (v, e), 'uniform', math.sqrt(6 / (v + e))))
    width_in = e
    for l, h in enumerate(spec.hidden):
      limit = math.sqrt(6 / (width_in + h + 4 * h))
      rows += [((f'lstm_{l}', 'kernel'), (width_in, 4 * h), 'uniform', limit),
               ((f'lstm_{l}', 'recurrent_kernel'), (h, 4 * h), 'uniform', limit),
               ((f'lstm_{l}', 'bias'), (4 * h,), 'forget', 0.0)]
      width_in = h
    rows += [(('head', 'kernel'), (width_in, v), 'uniform', math.sqrt(6 / (width_in + v))),
             (('head', 'bias'), (v,), 'zeros', 0.0)]
    return rows
  if not isinstance(spec, TransformerSpec):
    raise ValueError(f'spec must be an LSTMSpec or TransformerSpec, got {type(spec)}')
  v, d, std = spec.vocab_size, spec.d_model, TRANSFORMER_INIT_STD
  residual_std = std / math.sqrt(2 * max(len(spec.blocks), 1))
  rows += [(('embed', 'embedding'), (v, d), 'normal', std),
           (('pos_embed', 'embedding'), (spec.seq_len, d), 'normal', std)]

  def norm(path):
    return [(path + ('scale',), (d,), 'ones', 0.0), (path + ('bias',), (d,), 'zeros', 0.0)]

  def dense(path, n_in, n_out, scale):
    return [(path + ('kernel',), (n_in, n_out), 'normal', scale),
            (path + ('bias',), (n_out,), 'zeros', 0.0)]

  for l, (heads, head_dim, ffn) in enumerate(spec.blocks):
    b, inner = f'block_{l}', heads * head_dim
    rows += norm((b, 'ln_1'))
    for name in ('query', 'key', 'value'):
      rows += dense((b, 'attn', name), d, inner, std)
    rows += dense((b, 'attn', 'out'), inner, d, residual_std)
    rows += norm((b, 'ln_2'))
    rows += dense((b, 'ffn', 'dense_0'), d, ffn, std)
    rows += dense((b, 'ffn', 'dense_1'), ffn, d, residual_std)
  rows += norm(('ln_f',)) + dense(('head',), d, v, std)
  return rows


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
  out: dict = {}
  for path, value in items:
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def param_shapes(spec: TextSpec) -> tuple[Params, BatchStats]:
  """Abstract `(params, {})`: nested dicts of `jax.ShapeDtypeStruct` (no arrays)."""
  return _nest([(path, jax.ShapeDtypeStruct(shape, jnp.float32))
                for path, shape, _, _ in _layout(spec)]), {}


def init_params(spec: TextSpec, key: PRNGKey) -> tuple[Params, BatchStats]:
  """Initial `(params, {})` (module docstring: LEAF/TF init for the LSTM, GPT-2 for the
  transformer). `key` may be traced (vmap over keys gives per-client initialisations)."""
  rows = _layout(spec)
  size = lambda kind: sum(math.prod(shape) for _, shape, k, _ in rows if k == kind)
  key_u, key_n = jax.random.split(key)
  uniform = jax.random.uniform(key_u, (size('uniform'),), jnp.float32, -1.0, 1.0)
  normal = jax.random.normal(key_n, (size('normal'),), jnp.float32)
  xp = jnp if isinstance(uniform, jax.core.Tracer) else np
  if xp is np:
    uniform, normal = np.asarray(uniform), np.asarray(normal)
  offsets = {'uniform': 0, 'normal': 0}
  leaves = []
  for path, shape, kind, scale in rows:
    n = math.prod(shape)
    if kind in offsets:
      flat = uniform if kind == 'uniform' else normal
      leaf = flat[offsets[kind]:offsets[kind] + n].reshape(shape) * np.float32(scale)
      offsets[kind] += n
    elif kind == 'forget':
      h = shape[0] // 4
      leaf = xp.concatenate([xp.zeros((h,), np.float32), xp.ones((h,), np.float32),
                             xp.zeros((2 * h,), np.float32)])
    else:
      leaf = (xp.ones if kind == 'ones' else xp.zeros)(shape, np.float32)
    leaves.append((path, leaf if xp is jnp else jnp.asarray(leaf)))
  return _nest(leaves), {}


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def check_params(spec: TextSpec, params: Params) -> None:
  """Raises ValueError naming the leaf when `params` does not have the spec's names and shapes."""
  want = {_path_str(p): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(spec)[0])[0]}
  got = {_path_str(p): tuple(jnp.shape(leaf))
         for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(got) != set(want):
    raise ValueError(f'params do not match the spec: missing {sorted(set(want) - set(got))}, '
                     f'unexpected {sorted(set(got) - set(want))}')
  for name, shape in want.items():
    if got[name] != shape:
      raise ValueError(f'params {name} has shape {got[name]}, the spec says {shape}')


def check_text_inputs(spec: TextSpec, x: Any) -> None:
  """Validates token windows on the host, where data enters (loaders, experiments, eager apply).

  Args:
    spec: the model's spec.
    x: [..., T] integer token ids (concrete: numpy or a non-traced jax array).

  Raises:
    ValueError: naming the problem: non-integer ids, T longer than the model's
      context `spec.seq_len`, or an id outside [0, vocab_size) (with its value
      and position).
  """
  shape = tuple(np.shape(x))
  if len(shape) < 1:
    raise ValueError('token ids must have shape [..., T], got a scalar')
  if shape[-1] > spec.seq_len:
    raise ValueError(f'sequence length {shape[-1]} is longer than the model context '
                     f'seq_len={spec.seq_len}')
  if isinstance(x, jax.core.Tracer):
    raise ValueError('check_text_inputs needs concrete ids (call it outside jit)')
  arr = np.asarray(x)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'token ids must be integers, got dtype {arr.dtype}')
  bad = (arr < 0) | (arr >= spec.vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f'token id {int(arr[where])} at index {where} is outside the vocabulary '
                     f'[0, {spec.vocab_size})')


# ----------------------------------------------------------------------------
# Forward pass (pure functions over the plain-dict params).


def _embed(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows of table [V, D] for ids [B, T]; ids outside [0, V) give NaN rows (see module docs)."""
  v = table.shape[0]
  ids = jnp.where((ids >= 0) & (ids < v), ids, v)  # negatives would wrap around otherwise
  return jnp.take(table, ids, axis=0, mode='fill', fill_value=jnp.nan)


def _dense(p: Params, h: jax.Array) -> jax.Array:
  return h @ p['kernel'] + p['bias'].reshape((1,) * (h.ndim - 1) + p['bias'].shape)


def _unit_gate(h: jax.Array, gate: Optional[jax.Array]) -> jax.Array:
  """Scales the last axis of h [B, ..., C] by a gate [C] or per-example [B, C]."""
  if gate is None:
    return h
  gate = jnp.asarray(gate, h.dtype)
  lead = (gate.shape[0],) if gate.ndim == 2 else (1,)
  return h * gate.reshape(lead + (1,) * (h.ndim - 2) + (gate.shape[-1],))


def _layer_gate(h: jax.Array, gate: Optional[jax.Array]) -> jax.Array:
  """Scales a residual branch h [B, ...] by a gate [] or per-example [B]."""
  if gate is None:
    return h
  gate = jnp.asarray(gate, h.dtype)
  return h * gate.reshape(gate.shape + (1,) * (h.ndim - gate.ndim))


def lstm_layer(p: Params, x_BxTxI: jax.Array, gate: Optional[jax.Array] = None) -> jax.Array:
  """One LSTM layer over a sequence (module docstring), h_0 = c_0 = 0.

  Args:
    p: {kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H]}, gate blocks (i, f, g, o).
    x_BxTxI: inputs.
    gate: optional [H] or [B, H] multiplying every h_t (fed to the recurrence and
      the next layer); 0 switches a unit off exactly as removing it.

  Returns:
    h [B, T, H].
  """
  z_x = _dense(p, x_BxTxI)  # one matmul for every step's input projection
  if gate is not None:
    gate = jnp.asarray(gate, z_x.dtype)
  h_TxBxH = lstm_recurrence(jnp.swapaxes(z_x, 0, 1), p['recurrent_kernel'], gate)
  return jnp.swapaxes(h_TxBxH, 0, 1)


def _lstm_gates(z: jax.Array, h_size: int):
  """sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) of pre-activations z [B, 4H]."""
  i, f, g, o = (z[:, k * h_size:(k + 1) * h_size] for k in range(4))
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _lstm_scan(z_x_TxBx4H: jax.Array, u: jax.Array, gate: Optional[jax.Array],
               keep: bool):
  """The recurrence; with `keep`, also every step's pre-activations z and cell c (the
  backward pass's residuals). Returns h [T, B, H] (and z [T, B, 4H], c [T, B, H])."""
  h_size = u.shape[0]
  zeros = jnp.zeros((z_x_TxBx4H.shape[1], h_size), z_x_TxBx4H.dtype)

  def step(carry, z_t):
    h, c = carry
    z = z_t + h @ u
    i, f, g, o = _lstm_gates(z, h_size)
    c = f * c + i * g
    h = _unit_gate(o * jnp.tanh(c), gate)
    return (h, c), ((h, z, c) if keep else h)

  return lax.scan(step, (zeros, zeros), z_x_TxBx4H)[1]


@jax.custom_vjp
def lstm_recurrence(z_x_TxBx4H: jax.Array, u: jax.Array,
                    gate: Optional[jax.Array] = None) -> jax.Array:
  """h [T, B, H] of z_t = z_x[t] + h_{t-1} U (gates i, f, g, o), h_t scaled by `gate`
  ([H] or [B, H], in z_x's dtype, or None), h_0 = c_0 = 0.

  A custom VJP: reverse-mode autodiff of the `lax.scan` accumulates U's cotangent in the
  loop, a read-modify-write of the whole [H, 4H] matrix at every step of every backward
  pass; here the backward scan carries only dh, dc (and the gate's cotangent, [B, H]) and
  emits every dz_t, and U's cotangent is ONE matmul over all steps afterwards,
  dU = sum_t h_{t-1}^T dz_t (a LEAF LSTM step fwd+bwd 1.6x faster on CPU,
  docs/results/text.md). The forward values are the scan's exactly.
  """
  return _lstm_scan(z_x_TxBx4H, u, gate, keep=False)


def _lstm_recurrence_fwd(z_x_TxBx4H, u, gate):
  h_all, z_all, c_all = _lstm_scan(z_x_TxBx4H, u, gate, keep=True)
  return h_all, (h_all, z_all, c_all, u, gate)


def _lstm_recurrence_bwd(residuals, dh_TxBxH):
  h_all, z_all, c_all, u, gate = residuals
  h_size = u.shape[0]
  c_prev_all = jnp.concatenate([jnp.zeros_like(c_all[:1]), c_all[:-1]])
  u_t = u.T

  def step(carry, xs):
    dh_rec, dc_next, dgate = carry
    dh_out, z, c, c_prev = xs
    i, f, g, o = _lstm_gates(z, h_size)
    tanh_c = jnp.tanh(c)
    dh = dh_out + dh_rec  # the output's and the next step's cotangent of gated h_t
    if gate is None:
      draw = dh
    else:
      dgate = dgate + dh * o * tanh_c
      draw = _unit_gate(dh, gate)
    do = draw * tanh_c * o * (1 - o)
    dc = dc_next + draw * o * (1 - tanh_c * tanh_c)
    di = dc * g * i * (1 - i)
    dg = dc * i * (1 - g * g)
    df = dc * c_prev * f * (1 - f)
    dz = jnp.concatenate([di, df, dg, do], axis=-1)
    return (dz @ u_t, dc * f, dgate), dz

  zeros = jnp.zeros_like(h_all[0])
  (_, _, dgate), dz_all = lax.scan(step, (zeros, zeros, zeros),
                                   (dh_TxBxH, z_all, c_all, c_prev_all), reverse=True)
  h_prev_all = jnp.concatenate([jnp.zeros_like(h_all[:1]), h_all[:-1]])
  du = jnp.einsum('tbh,tbk->hk', h_prev_all, dz_all).astype(u.dtype)
  if gate is not None:
    dgate = (dgate if gate.ndim == 2 else jnp.sum(dgate, axis=0)).astype(gate.dtype)
  return dz_all, du, (None if gate is None else dgate)


lstm_recurrence.defvjp(_lstm_recurrence_fwd, _lstm_recurrence_bwd)


def layer_norm(p: Params, h: jax.Array) -> jax.Array:
  """LayerNorm over the last axis in float32 (eps 1e-5); output in h's dtype."""
  dtype = h.dtype
  h = h.astype(jnp.float32)
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  shape = (1,) * (h.ndim - 1) + (h.shape[-1],)
  y = ((h - mean) * lax.rsqrt(var + LN_EPSILON) * p['scale'].astype(jnp.float32).reshape(shape)
       + p['bias'].astype(jnp.float32).reshape(shape))
  return y.astype(dtype)


def causal_attention(p: Params, h_BxTxD: jax.Array, num_heads: int, head_dim: int,
                     head_gate: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head causal self-attention: [B, T, d] -> [B, T, d].

  Scores and softmax in float32; position t attends to positions <= t. A
  `head_gate` [n] or [B, n] scales each head's output before the out projection.
  """
  b, t, _ = h_BxTxD.shape
  split = lambda a: a.reshape(b, t, num_heads, head_dim)
  q, k, v = (split(_dense(p[name], h_BxTxD)) for name in ('query', 'key', 'value'))
  scores = jnp.einsum('bqhe,bkhe->bhqk', q, k).astype(jnp.float32) / np.float32(
      math.sqrt(head_dim))
  causal = jnp.tril(jnp.ones((t, t), bool)).reshape(1, 1, t, t)
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  heads_BxTxNxE = jnp.einsum('bhqk,bkhe->bqhe', weights, v)
  if head_gate is not None:
    gate = jnp.asarray(head_gate, v.dtype)
    gate = gate.reshape((gate.shape[0] if gate.ndim == 2 else 1, 1, num_heads, 1))
    heads_BxTxNxE = heads_BxTxNxE * gate
  return _dense(p['out'], heads_BxTxNxE.reshape(b, t, num_heads * head_dim))


def _lstm_forward(spec: LSTMSpec, params: Params, ids: jax.Array, dtype, all_positions: bool,
                  gates: dict) -> jax.Array:
  h = _embed(params['embed']['embedding'], ids).astype(dtype)
  for l in range(len(spec.hidden)):
    h = lstm_layer(params[f'lstm_{l}'], h, gates.get(f'lstm_{l}'))
  return _dense(params['head'], h if all_positions else h[:, -1])


@jax.custom_vjp
def residual_stream(h: jax.Array) -> jax.Array:
  """The identity on the transformer's residual stream h [B, T, d]; its backward pass writes
  the stream's cotangent out once, as a product with the identity matrix (exact).

  Why (measured on XLA:CPU, jax 0.10, the Shakespeare transformer, batch 10 x 80 tokens):
  without it XLA never materialises the residual stream's cotangent. It fuses the chain of
  every later block's LayerNorm-backward terms and residual adds into each consumer (the
  transposed copies feeding the weight-gradient matmuls) and recomputes it there, so the
  backward pass grows quadratically with depth: 11 / 24 / 74 ms a training step for 1 / 2 /
  4 blocks, 16 ms of the 74 in those copies. `lax.optimization_barrier` is dropped before
  fusion on CPU; a dot is a fusion boundary. With it after each residual add: 60 ms (1.27x).
  """
  return h


def _residual_stream_fwd(h):
  return h, None


def _residual_stream_bwd(_, g):
  return (g @ jnp.eye(g.shape[-1], dtype=g.dtype),)


residual_stream.defvjp(_residual_stream_fwd, _residual_stream_bwd)


def _transformer_forward(spec: TransformerSpec, params: Params, ids: jax.Array, dtype,
                         all_positions: bool, gates: dict) -> jax.Array:
  t = ids.shape[1]
  h = (_embed(params['embed']['embedding'], ids)
       + params['pos_embed']['embedding'][:t].reshape(1, t, spec.d_model)).astype(dtype)
  for l, (heads, head_dim, _) in enumerate(spec.blocks):
    p, g = params[f'block_{l}'], gates.get(f'block_{l}', {})
    attn = causal_attention(p['attn'], layer_norm(p['ln_1'], h), heads, head_dim, g.get('heads'))
    h = residual_stream(h + _layer_gate(attn, g.get('layer')))
    ffn = _unit_gate(jax.nn.gelu(_dense(p['ffn']['dense_0'], layer_norm(p['ln_2'], h)),
                                 approximate=False), g.get('ffn'))
    h = residual_stream(h + _layer_gate(_dense(p['ffn']['dense_1'], ffn), g.get('layer')))
  if not all_positions:
    h = h[:, -1]  # the final LayerNorm and head only where logits are wanted
  return _dense(params['head'], layer_norm(params['ln_f'], h))


def _check_gates(spec: TextSpec, gates: Optional[dict]) -> None:
  """Raises ValueError naming a gate entry that names nothing of the model."""
  if gates is None:
    return
  if isinstance(spec, LSTMSpec):
    known = {f'lstm_{l}' for l in range(len(spec.hidden))}
  else:
    known = {f'block_{l}' for l in range(len(spec.blocks))}
  unknown = sorted(set(gates) - known)
  if unknown:
    raise ValueError(f'gates name layers this model does not have: {unknown} (known: '
                     f'{sorted(known)})')
  if isinstance(spec, TransformerSpec):
    for name, entry in gates.items():
      bad = sorted(set(entry) - {'heads', 'ffn', 'layer'})
      if bad:
        raise ValueError(f"gates[{name!r}] has unknown entries {bad}; allowed 'heads', 'ffn', "
                         "'layer'")


def make_apply(spec: TextSpec, *, compute_dtype: Any = None) -> ApplyFn:
  """The pure apply function of a text model (`models.make_apply` dispatches here).

  Args:
    spec: an LSTMSpec or TransformerSpec.
    compute_dtype: None (float32) or a floating dtype such as `jnp.bfloat16`:
      params are cast to it inside apply (matmuls in it); LayerNorm and the
      attention softmax stay float32, logits are float32.

  Returns:
    `apply_fn(params, batch_stats, x, *, train, example_mask=None,
    all_positions=False, gates=None) -> (logits, batch_stats)` where
      * x: [B, T] integer token ids, 1 <= T <= spec.seq_len;
      * train, example_mask: accepted for the engine's signature; no effect
        (no dropout, no BatchNorm); batch_stats must be {} and is returned;
      * logits: [B, V] float32 for the next token after the window, or
        [B, T, V] with all_positions=True (position t predicts token t + 1);
      * gates: optional multiplicative structure gates (any subset):
        LSTMSpec {'lstm_{l}': [H] or [B, H]} scaling each unit's h_t;
        TransformerSpec {'block_{l}': {'heads': [n] or [B, n], 'ffn': [F] or
        [B, F], 'layer': [] or [B]}} scaling each head's output, each FFN unit
        after the GELU, and both residual branches of the block. A gate of 0
        equals removing that unit / head / block.
  """
  from fedjax_prune.models._build import mixed_precision  # _build imports this module
  if not isinstance(spec, TEXT_SPECS):
    raise ValueError(f'spec must be an LSTMSpec or TransformerSpec, got {type(spec)}')
  dtype, to_compute = mixed_precision(compute_dtype)
  forward = _lstm_forward if isinstance(spec, LSTMSpec) else _transformer_forward

  def apply_fn(params: Params, batch_stats: BatchStats, x: jax.Array, *, train: bool,
               example_mask: Optional[jax.Array] = None, all_positions: bool = False,
               gates: Optional[dict] = None) -> tuple[jax.Array, BatchStats]:
    del train  # no dropout, no BatchNorm
    check_params(spec, params)
    if jax.tree.leaves(batch_stats):
      raise ValueError('text models have no batch_stats; pass {}')
    if jnp.ndim(x) != 2:
      raise ValueError(f'x must be token ids of shape [B, T], got shape {jnp.shape(x)}')
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise ValueError(f'x must hold integer token ids, got dtype {jnp.result_type(x)}')
    if jnp.shape(x)[1] < 1:
      raise ValueError('x must have at least one position (T >= 1)')
    if isinstance(x, jax.core.Tracer):  # values unknown: only the (static) length is checked
      if jnp.shape(x)[1] > spec.seq_len:
        raise ValueError(f'sequence length {jnp.shape(x)[1]} is longer than the model context '
                         f'seq_len={spec.seq_len}')
    else:
      check_text_inputs(spec, x)
    _check_gates(spec, gates)
    if example_mask is not None and jnp.shape(example_mask) != (jnp.shape(x)[0],):
      raise ValueError(f'example_mask must have shape ({jnp.shape(x)[0]},), got '
                       f'{jnp.shape(example_mask)}')
    params, gates = to_compute((params, gates))
    logits = forward(spec, params, jnp.asarray(x).astype(jnp.int32), dtype, bool(all_positions),
                     {} if gates is None else gates)
    return logits.astype(jnp.float32), batch_stats

  return apply_fn

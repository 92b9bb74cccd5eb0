"""Compressed client updates under pruning masks: top-k, k-bit quantisation, error feedback.

A client sends only the coordinates it holds (`present`: its pruning mask or
submodel, known to the server, which broadcast or derived it). On those, one
compression step is

  1. top-k sparsification (optional): per tensor, keep the k present
     coordinates of largest |x|, k = round-half-up(fraction * m) with m the
     tensor's present count, at least 1 when m > 0 (so small tensors such as
     biases are never starved), ties to the lower flat index (the rounding and
     tie rule of `masks.topk`, with m instead of the tensor size);
  2. stochastic k-bit quantisation (optional) of the kept values: uniform
     stochastic rounding on the grid of 2^bits levels spanning the kept values'
     per-tensor [min, max]; a value between two levels rounds up with
     probability equal to its distance from the lower one over the spacing, so
     E[Q(x)] = x (unbiased), and grid points (including min and max) are
     exact. Min/max rather than +-max|x| because updates are often skewed;
     the price is two float32 scales per tensor instead of one.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019) keeps a per-client
residual e: the client sends C(u + e) and keeps e' = u + e - C(u + e), so the
sum of what was sent plus the final residual is exactly the sum of the raw
updates. The residual keeps its values on coordinates a client does not hold
(they are never sent, and wait there until the coordinate is present again).

`bytes_up` counts what one client's upload really costs, per tensor:
  * values: the k sent values at `bits` bits each, bit-packed per tensor,
    ceil(k * bits / 8) bytes, or k * itemsize when not quantised;
  * scales: 8 bytes (float32 min and max) per tensor with k > 0 when quantised;
  * positions (top-k only): none when k = m (every present coordinate is sent),
    else the cheaper of k indices into the m present coordinates, each
    ceil(ceil(log2 m) / 8) bytes (the smallest whole-byte width, as the
    'index' encoding of `accounting.communication_bytes`), and a bitmap over
    the m present coordinates, ceil(m / 8) bytes. The receiver knows m and k
    (from the mask and the fraction), so it knows which encoding was used.
Pruned coordinates cost nothing; the mask itself is not counted (the server
knows it; when a mask is client-private, add its cost from
`accounting.communication_bytes`). Counts are int32: exact below 2^31 bytes
per client (and m * bits < 2^31 per tensor).

To compose with DP-FedAvg, clip after compressing (quantisation may raise the
norm): the sensitivity argument needs the clipped vector to be what is summed
(the clip factor is one scalar per client and folds into the per-tensor scales).

References:
  Seide et al., 1-Bit Stochastic Gradient Descent and its Application to
  Data-Parallel Distributed Training of Speech DNNs, Interspeech 2014.
  Alistarh et al., QSGD: Communication-Efficient SGD via Gradient Quantization
  and Encoding, NeurIPS 2017. Stich et al., Sparsified SGD with Memory,
  NeurIPS 2018. Karimireddy et al., Error Feedback Fixes SignSGD and other
  Gradient Compression Schemes, ICML 2019.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.masks._filters import tree_like
from fedjax_prune.masks._select import _flat_topk
from fedjax_prune.types import PRNGKey, PyTree

SCALE_BYTES = 8  # float32 min and max of a quantised tensor


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=['bits', 'topk_fraction'])
@dataclasses.dataclass(frozen=True)
class Compression:
  """How a client compresses its update (check with `check_compression`).

  A frozen dataclass whose fields are static pytree metadata: it passes
  through `jax.jit` / `vmap` as an ordinary argument and stays Python there.

  Attributes:
    bits: bits per sent value, 1 <= bits <= 32 (stochastic quantisation), or
      None to send the values as they are.
    topk_fraction: fraction in (0, 1] of each tensor's present coordinates to
      send (top-k by |x|), or None to send them all.
  """
  bits: Optional[int] = None
  topk_fraction: Optional[float] = None


def check_compression(config: Compression) -> None:
  """Raises ValueError naming `bits` or `topk_fraction` when out of range."""
  bits, fraction = config.bits, config.topk_fraction
  if bits is not None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
      raise ValueError(f'bits must be an int in [1, 32] (or None: no quantisation), got {bits!r}')
  if fraction is not None:
    ok = (not isinstance(fraction, bool) and isinstance(fraction, (int, float, np.floating))
          and 0.0 < float(fraction) <= 1.0)
    if not ok:
      raise ValueError(
          f'topk_fraction must be in (0, 1] (or None: send every present coordinate), '
          f'got {fraction!r}')


def _present_count(x: jax.Array, p: Any) -> jax.Array:
  return jnp.sum(jnp.broadcast_to(jnp.asarray(p, bool), x.shape).astype(jnp.int32))


def _keep_count(fraction: Optional[float], m: jax.Array) -> jax.Array:
  """[] int32 k: round-half-up(fraction * m), at least 1 when m > 0, at most m."""
  if fraction is None:
    return m
  k = jnp.floor(jnp.float32(fraction) * m.astype(jnp.float32) + 0.5).astype(jnp.int32)
  return jnp.minimum(jnp.where(m > 0, jnp.maximum(k, 1), 0), m)


def topk_present(x: jax.Array, present: Any, fraction: Optional[float]) -> jax.Array:
  """Bool mask of the k largest-|x| present coordinates of one tensor (see module docstring).

  Args:
    x: one tensor.
    present: bool broadcastable to `x`.
    fraction: in (0, 1], or None (all present coordinates).

  Returns:
    Bool, shaped like `x`; exactly k = `_keep_count(fraction, m)` entries True.
  """
  x = jnp.asarray(x)
  p = jnp.broadcast_to(jnp.asarray(present, bool), x.shape)
  if fraction is None:
    return p
  k = _keep_count(fraction, _present_count(x, p))
  # Absent coordinates score -inf; the k <= m largest are then present ones, ties to lower index.
  scores = jnp.where(p, jnp.abs(x).astype(jnp.float32), -jnp.inf).reshape(-1)
  return _flat_topk(scores, k).reshape(x.shape)


def quantize(x: jax.Array, key: PRNGKey, bits: int, sent: Any = True) -> jax.Array:
  """Unbiased stochastic `bits`-bit quantisation of the `sent` entries of one tensor.

  Levels: lo + j (hi - lo) / (2^bits - 1), j = 0 .. 2^bits - 1, with lo and hi
  the min and max of the sent entries; a value rounds to one of its two
  neighbouring levels with probabilities making E[Q(x)] = x. Unsent entries
  come back as 0. A tensor whose sent entries are all equal is returned exactly.

  Args:
    x: one float tensor.
    key: PRNG key (used once).
    bits: 1 <= bits <= 32.
    sent: bool broadcastable to `x`.

  Returns:
    Q(x), shaped and typed like `x`.
  """
  check_compression(Compression(bits=bits))
  x = jnp.asarray(x)
  s = jnp.broadcast_to(jnp.asarray(sent, bool), x.shape)
  xf = x.astype(jnp.float32)
  any_sent = jnp.any(s)
  lo = jnp.where(any_sent, jnp.min(jnp.where(s, xf, jnp.inf)), 0.0)
  hi = jnp.where(any_sent, jnp.max(jnp.where(s, xf, -jnp.inf)), 0.0)
  levels = jnp.float32(2.0 ** bits - 1.0)
  step = (hi - lo) / levels
  flat = step > 0
  # t in level units; a value on the grid gives an integer t and is returned unchanged.
  t = jnp.clip((xf - lo) / jnp.where(flat, step, 1.0), 0.0, levels)
  low = jnp.floor(t)
  up = jax.random.uniform(key, x.shape, jnp.float32) < (t - low)
  q = lo + (low + up.astype(jnp.float32)) * step
  q = jnp.where(flat, q, xf)  # constant tensor (or one sent value): exact
  return jnp.where(s, q, 0.0).astype(x.dtype)


def compress(update: PyTree, present: Any, key: PRNGKey, config: Compression) -> PyTree:
  """What one client sends: top-k of its present coordinates, then k-bit quantisation.

  Args:
    update: the client's update (float leaves).
    present: bool tree (or one bool) broadcastable to `update`: the coordinates
      the client holds.
    key: PRNG key (used once; one subkey per leaf; unused without quantisation).
    config: `Compression`.

  Returns:
    A tree like `update`: the decoded values the server receives, exactly 0 on
    coordinates not sent.
  """
  check_compression(config)
  present = tree_like(present, update, 'present')
  leaves, treedef = jax.tree.flatten(update)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(key, max(len(leaves), 1))[:len(leaves)]))

  def leaf(x, p, k):
    sent = topk_present(x, p, config.topk_fraction)
    if config.bits is None:
      return jnp.where(sent, x, jnp.zeros((), x.dtype))
    return quantize(x, k, config.bits, sent)

  return jax.tree.map(leaf, update, present, keys)


def init_residual(params: PyTree) -> PyTree:
  """Zero error-feedback memory for one client (stack it [num_clients, ...] in the engine)."""
  return jax.tree.map(jnp.zeros_like, params)


def compress_with_feedback(residual: PyTree, update: PyTree, present: Any, key: PRNGKey,
                           config: Compression) -> tuple[PyTree, PyTree]:
  """Error-feedback compression: send C(u + e), keep e' = u + e - C(u + e).

  Args:
    residual: e, the client's memory (a tree like `update`).
    update: u, this round's raw update.
    present: bool tree broadcastable to `update` (see `compress`).
    key: PRNG key (used once).
    config: `Compression`.

  Returns:
    (new residual e', sent C(u + e)), state first.
  """
  corrected = jax.tree.map(jnp.add, update, residual)
  sent = compress(corrected, present, key, config)
  return jax.tree.map(jnp.subtract, corrected, sent), sent


def _bit_length(n: jax.Array) -> jax.Array:
  """[] int32: bits needed to write n >= 0 (0 for 0), as int.bit_length."""
  return (32 - jax.lax.clz(n.astype(jnp.int32))).astype(jnp.int32)


def _ceil_div(a: jax.Array, b: int) -> jax.Array:
  return (a + (b - 1)) // b


def bytes_up(update: PyTree, present: Any, config: Compression) -> jax.Array:
  """[] int32: bytes one client uploads for `update` under `present` and `config`.

  Only shapes and dtypes of `update` matter (arrays or ShapeDtypeStructs);
  `present` may be traced. The count is described in the module docstring.

  Example:
    >>> import jax.numpy as jnp
    >>> u = {'w': jnp.zeros((4, 4)), 'b': jnp.zeros((4,))}
    >>> present = {'w': jnp.arange(16).reshape(4, 4) < 10, 'b': True}
    >>> int(bytes_up(u, present, Compression()))       # (10 + 4) float32 values
    56
    >>> # w: 5 of 10 at 2 bits (2) + scales (8) + bitmap (2); b: 2 of 4 (1) + 8 + bitmap (1)
    >>> int(bytes_up(u, present, Compression(bits=2, topk_fraction=0.5)))
    22
  """
  check_compression(config)
  present = tree_like(present, update, 'present')
  total = jnp.zeros((), jnp.int32)
  for x, p in zip(jax.tree.leaves(update), jax.tree.leaves(present)):
    m = _present_count(x, p)
    k = _keep_count(config.topk_fraction, m)
    if config.bits is None:
      total += k * jnp.dtype(x.dtype).itemsize
    else:
      total += _ceil_div(k * config.bits, 8) + jnp.where(k > 0, SCALE_BYTES, 0)
    if config.topk_fraction is not None:
      index_bytes = _ceil_div(_bit_length(jnp.maximum(m, 1) - 1), 8)
      positions = jnp.minimum(k * index_bytes, _ceil_div(m, 8))
      total += jnp.where(k < m, positions, 0)
  return total


# ----------------------------------------------------------------------------
# The aggregator wrapper (the engine's aggregation hook, `federated.Aggregator`).


class CompressedState(NamedTuple):
  """State of `compressed`.

  Attributes:
    inner: the inner aggregator's state.
    residual: error-feedback memory, each leaf [num_clients, *param shape] (row i is
      client i's), or () without error feedback.
  """
  inner: Any
  residual: PyTree = ()


class CompressedSums(NamedTuple):
  """In-graph sums of `compressed`: the inner aggregator's, and [] float32 bytes sent."""
  inner: Any
  bytes_up: jax.Array


class CompressedPerClient(NamedTuple):
  """Stacked [C, ...] outputs of `compressed`.

  Attributes:
    inner: the inner aggregator's `per_client`.
    residual: each client's new memory (() without error feedback).
    client_id: [] int32 row of the memory.
    writes: [] bool, the client sent (active and weight > 0): only these rows change.
  """
  inner: Any
  residual: PyTree
  client_id: jax.Array
  writes: jax.Array


def compressed(inner, config: Compression, *, error_feedback: bool = True,
               num_clients: Optional[int] = None):
  """`inner` (a `federated.Aggregator`) fed each client's compressed update.

  On the client: the update u (over the coordinates it holds, `present`) is compressed
  as `compress` does (top-k, then stochastic quantisation), with error feedback
  C(u + e_i) and e_i' = u + e_i - C(u + e_i) when `error_feedback`, and what the server
  decodes goes to `inner.contribute`. Compose with DP as `compressed(dp_mean(...))`:
  compress first, then clip and noise (the clipped vector is what is summed). Robust
  inner aggregators see the decoded updates.

  The memory e is stacked [num_clients, ...] in the state: client i reads row i
  (`ClientInfo.client_id`) inside the round, and `finish` scatters the new rows back;
  padding and empty clients never write (their rows stay as they were). It costs
  num_clients times the model in server memory and checkpoints.

  Round metric `bytes_up`: the sum over the participating clients of `bytes_up(u,
  present, config)` (values, positions and scales actually sent; pruned coordinates
  cost nothing), as float32 (exact below 2^24 bytes per client).

  Args:
    inner: the aggregator the decoded updates go to (`federated.mean()`, `dp_mean`,
      a robust one).
    config: `Compression`.
    error_feedback: keep each client's residual.
    num_clients: number of clients in the dataset (the memory's rows); required with
      `error_feedback`.

  Returns:
    A `federated.Aggregator` whose state is `CompressedState` (stateless when `inner` is
    and without error feedback).

  Raises:
    ValueError: a bad `config`, or `error_feedback` without an int num_clients >= 1.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> agg = federated.compressed(federated.mean(), federated.Compression(bits=4),
    ...                            num_clients=3)
    >>> alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                        aggregator=agg)
    >>> state = alg.init(params, jax.random.key(1))
    >>> state, metrics = federated.make_round(alg)(state, data, federated.make_cohort([0, 1, 2]),
    ...                                           jax.random.key(2))
    >>> float(metrics['bytes_up']) > 0
    True
  """
  from fedjax_prune.federated._robust import Aggregator, Contribution  # no import cycle
  check_compression(config)
  if error_feedback and (isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer))
                         or num_clients < 1):
    raise ValueError(f'num_clients must be an int >= 1 with error_feedback (the rows of the '
                     f'memory), got {num_clients!r}')

  def init(params) -> CompressedState:
    residual = (jax.tree.map(lambda x: jnp.zeros((num_clients,) + jnp.shape(x), jnp.result_type(x)),
                             params) if error_feedback else ())
    return CompressedState(inner.init(params), residual)

  def contribute(state: CompressedState, update, weight, present, client, key):
    compress_key, inner_key = jax.random.split(key)
    held = True if present is None else present
    writes = jnp.asarray(client.active, bool) & (jnp.asarray(weight) > 0)
    residual = ()
    if error_feedback:
      mine = jax.tree.map(lambda r: r[client.client_id], state.residual)
      residual, sent = compress_with_feedback(mine, update, held, compress_key, config)
    else:
      sent = compress(update, held, compress_key, config)
    out = inner.contribute(state.inner, sent, weight, present, client, inner_key)
    sent_bytes = bytes_up(update, held, config).astype(jnp.float32) * writes.astype(jnp.float32)
    return Contribution(CompressedSums(out.sums, sent_bytes),
                        CompressedPerClient(out.per_client, residual,
                                            jnp.asarray(client.client_id, jnp.int32), writes))

  def finish(state: CompressedState, summed, fallback, key):
    sums: CompressedSums = summed.sums
    per: CompressedPerClient = summed.per_client
    mean, inner_state, metrics = inner.finish(state.inner, Contribution(sums.inner, per.inner),
                                              fallback, key)
    residual = state.residual
    if error_feedback:
      # Non-writers get an out-of-range row, which the scatter drops (padding clients
      # repeat a real client's id: they must not overwrite its row).
      rows = jnp.where(per.writes, per.client_id, num_clients)
      residual = jax.tree.map(lambda r, new: r.at[rows].set(new.astype(r.dtype), mode='drop'),
                              residual, per.residual)
    return mean, CompressedState(inner_state, residual), {**metrics, 'bytes_up': sums.bytes_up}

  return Aggregator(init, contribute, finish, inner.stacked)

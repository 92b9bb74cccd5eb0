"""Vectorised evaluation: on a central test set and per client.

Both scan over fixed-size, masked batches, so any number of examples compiles
to one program; padded rows never count and never enter BatchNorm statistics.
Zero examples (an empty array, or `num_examples == 0`) give zero sums, and
`EvalSums.means()` then reports loss and accuracy 0.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.data import ClientData
from fedjax_prune.federated._local import count_correct, softmax_cross_entropy
from fedjax_prune.federated._method import ApplyFn


class EvalSums(NamedTuple):
  loss_sum: jax.Array
  correct_sum: jax.Array
  num_examples: jax.Array

  def means(self) -> dict:
    n = jnp.maximum(self.num_examples, 1.0)
    return {"loss": self.loss_sum / n, "accuracy": self.correct_sum / n,
            "num_examples": self.num_examples}


def _positive_int(value, name: str) -> int:
  """Returns `value` as an int if it is an integer >= 1 (Python or numpy, not bool)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"eval {name} must be a positive integer, got {value!r} "
                     f"({type(value).__name__})")
  if value < 1:
    raise ValueError(f"eval {name} must be >= 1, got {value}")
  return int(value)


def _zero_sums(shape=()) -> EvalSums:
  zero = jnp.zeros(shape, jnp.float32)
  return EvalSums(zero, zero, zero)


def _eval_padded(apply_fn, loss_fn, params, batch_stats, x, y, num_examples, batch_size,
                 eval_transform, segment_ids=None, num_segments: int = 0):
  """Sums over the first `num_examples` rows of x [M, ...], y [M] in batches.

  With `segment_ids` [M] (ints in [0, num_segments)), also returns the sums per
  segment ([num_segments] leaves) from the same forward passes.
  """
  total = x.shape[0]
  segmented = segment_ids is not None
  if total == 0:  # static: nothing to evaluate, and a 0-row batch cannot be formed
    return (_zero_sums(), _zero_sums((num_segments,))) if segmented else _zero_sums()
  batch = min(batch_size, total)
  num_batches = -(-total // batch)
  pad = num_batches * batch - total
  if not segmented:
    segment_ids = jnp.zeros((total,), jnp.int32)  # unused: keeps one scan body
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    y = jnp.concatenate([y, jnp.zeros((pad,) + y.shape[1:], y.dtype)])
    segment_ids = jnp.concatenate([segment_ids, jnp.zeros((pad,), segment_ids.dtype)])
  xb = x.reshape((num_batches, batch) + x.shape[1:])
  yb = y.reshape((num_batches, batch) + y.shape[1:])
  sb = segment_ids.reshape((num_batches, batch))

  def body(carry, inputs):
    sums, per_segment = carry
    i, xs, ys, ids = inputs
    mask = i * batch + jnp.arange(batch) < num_examples
    if eval_transform is not None:
      xs = eval_transform(xs)
    logits, _ = apply_fn(params, batch_stats, xs, train=False, example_mask=mask)
    w = mask.astype(jnp.float32)
    loss = jnp.sum(loss_fn(logits, ys) * w)
    correct = count_correct(logits, ys, w)
    sums = EvalSums(sums.loss_sum + loss, sums.correct_sum + correct, sums.num_examples + jnp.sum(w))
    if segmented:
      # The same logits, behind a barrier so that XLA cannot fuse the per-row terms with
      # the sums above: those stay bit-identical to the unsegmented evaluation. Padded
      # rows add zeros (to segment 0).
      seg_logits = jax.lax.optimization_barrier(logits)
      hits = jax.vmap(count_correct)(seg_logits[:, None], ys[:, None], w[:, None])
      per_segment = EvalSums(per_segment.loss_sum.at[ids].add(loss_fn(seg_logits, ys) * w),
                             per_segment.correct_sum.at[ids].add(hits),
                             per_segment.num_examples.at[ids].add(w))
    return (sums, per_segment), None

  seg0 = _zero_sums((num_segments,)) if segmented else None
  (sums, per_segment), _ = jax.lax.scan(body, (_zero_sums(), seg0),
                                        (jnp.arange(num_batches), xb, yb, sb))
  return (sums, per_segment) if segmented else sums


def make_evaluate(apply_fn: ApplyFn, *, batch_size: int = 512, loss_fn: Callable = softmax_cross_entropy,
                  eval_transform: Callable | None = None) -> Callable:
  """Evaluation of one model on a central test set.

  Args:
    apply_fn: the model's apply function.
    batch_size: positive integer (Python or numpy int): examples per scanned batch.
    loss_fn: per-example loss `(logits, labels) -> [B]`.
    eval_transform: optional function applied to each input batch.

  Returns:
    `evaluate(params, batch_stats, x [M, ...], y [M], num_examples=None) -> EvalSums`
    (call `.means()` for loss/accuracy). Not jitted: jit it, or call it inside a
    jitted function. An empty test set (M == 0) gives zero sums.

  Raises:
    ValueError: `batch_size` is not a positive integer.
  """
  batch_size = _positive_int(batch_size, "batch_size")

  def evaluate(params, batch_stats, x, y, num_examples=None) -> EvalSums:
    n = x.shape[0] if num_examples is None else num_examples
    return _eval_padded(apply_fn, loss_fn, params, batch_stats, x, y, n, batch_size, eval_transform)

  return evaluate


def make_evaluate_pooled_clients(apply_fn: ApplyFn, *, batch_size: int = 512,
                                 loss_fn: Callable = softmax_cross_entropy,
                                 eval_transform: Callable | None = None) -> Callable:
  """Central and per-client evaluation in one pass over the pooled test set.

  The same sums as `make_evaluate` on the pooled set and as `make_evaluate_clients`
  on the clients' own sets (identical counts; per-client loss sums may differ in the
  last bits, being added in another order), but each example is evaluated once, in
  full batches: no per-client padding to the largest client (FEMNIST's 300 writers
  pad 4,759 test images to 10,800 rows).

  Args:
    apply_fn: the model's apply function (one shared model).
    batch_size: positive integer (Python or numpy int): examples per scanned batch.
    loss_fn: per-example loss `(logits, labels) -> [B]`.
    eval_transform: optional function applied to each input batch.

  Returns:
    `evaluate(params, batch_stats, x [M, ...], y [M], client_ids [M] int, num_clients)
    -> (EvalSums, EvalSums [num_clients])`: the pooled sums and each client's sums
    (rows of client k are those with `client_ids == k`, ids in [0, num_clients)).
    `num_clients` is static: jit with `static_argnames="num_clients"`.

  Raises:
    ValueError: `batch_size` is not a positive integer, or `client_ids` is not [M].
  """
  batch_size = _positive_int(batch_size, "batch_size")

  def evaluate(params, batch_stats, x, y, client_ids, num_clients: int):
    if client_ids.shape != (x.shape[0],):
      raise ValueError(f"client_ids must have shape [M] = ({x.shape[0]},) like the test rows, "
                       f"got {client_ids.shape}")
    return _eval_padded(apply_fn, loss_fn, params, batch_stats, x, y, x.shape[0], batch_size,
                        eval_transform, segment_ids=client_ids.astype(jnp.int32),
                        num_segments=int(num_clients))

  return evaluate


def make_evaluate_clients(apply_fn: ApplyFn, *, batch_size: int = 128,
                          loss_fn: Callable = softmax_cross_entropy,
                          eval_transform: Callable | None = None,
                          clients_per_chunk: int = 16, per_client_params: bool = False) -> Callable:
  """Per-client evaluation on each client's own (local test) data.

  Clients are processed `clients_per_chunk` at a time (`lax.map` with a vmapped
  chunk); with shared params the vmapped forward pass is one larger batch.

  Args:
    apply_fn: the model's apply function.
    batch_size: positive integer: examples per scanned batch within a client.
    loss_fn: per-example loss `(logits, labels) -> [B]`.
    eval_transform: optional function applied to each input batch.
    clients_per_chunk: positive integer: clients vmapped together.
    per_client_params: whether params and batch_stats carry a leading [N] axis.

  Returns:
    `evaluate_clients(params, batch_stats, data: ClientData) -> EvalSums` with
    [N] leaves (one entry per client). With `per_client_params=True`, params and
    batch_stats carry a leading [N] axis (personalised or heterogeneous models).
    No clients (N == 0) gives [0] leaves; clients without examples give zeros.

  Raises:
    ValueError: `batch_size` or `clients_per_chunk` is not a positive integer.
  """
  batch_size = _positive_int(batch_size, "batch_size")
  clients_per_chunk = _positive_int(clients_per_chunk, "clients_per_chunk")

  def one(params, batch_stats, x, y, n):
    return _eval_padded(apply_fn, loss_fn, params, batch_stats, x, y, n, batch_size, eval_transform)

  def evaluate_clients(params, batch_stats, data: ClientData) -> EvalSums:
    if data.x.shape[0] == 0:
      return _zero_sums((0,))
    if per_client_params:
      fn = lambda args: one(*args)
      xs = (params, batch_stats, data.x, data.y, data.num_examples)
    else:
      fn = lambda args: one(params, batch_stats, *args)
      xs = (data.x, data.y, data.num_examples)
    return jax.lax.map(fn, xs, batch_size=min(clients_per_chunk, data.x.shape[0]))

  return evaluate_clients

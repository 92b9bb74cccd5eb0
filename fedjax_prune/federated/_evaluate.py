"""Vectorised evaluation: on a central test set and per client.

Both scan over fixed-size, masked batches, so any number of examples compiles
to one program; padded rows never count and never enter BatchNorm statistics.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_prune.data import ClientData
from fedjax_prune.federated._local import count_correct, softmax_cross_entropy


class EvalSums(NamedTuple):
  loss_sum: jax.Array
  correct_sum: jax.Array
  num_examples: jax.Array

  def means(self) -> dict:
    n = jnp.maximum(self.num_examples, 1.0)
    return {"loss": self.loss_sum / n, "accuracy": self.correct_sum / n,
            "num_examples": self.num_examples}


def _eval_padded(apply_fn, loss_fn, params, batch_stats, x, y, num_examples, batch_size,
                 eval_transform) -> EvalSums:
  """Sums over the first `num_examples` rows of x [M, ...], y [M] in batches."""
  total = x.shape[0]
  batch = min(batch_size, total)
  num_batches = -(-total // batch)
  pad = num_batches * batch - total
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    y = jnp.concatenate([y, jnp.zeros((pad,) + y.shape[1:], y.dtype)])
  xb = x.reshape((num_batches, batch) + x.shape[1:])
  yb = y.reshape((num_batches, batch) + y.shape[1:])

  def body(sums, inputs):
    i, xs, ys = inputs
    mask = i * batch + jnp.arange(batch) < num_examples
    if eval_transform is not None:
      xs = eval_transform(xs)
    logits, _ = apply_fn(params, batch_stats, xs, train=False, example_mask=mask)
    w = mask.astype(jnp.float32)
    loss = jnp.sum(loss_fn(logits, ys) * w)
    correct = count_correct(logits, ys, w)
    return EvalSums(sums.loss_sum + loss, sums.correct_sum + correct, sums.num_examples + jnp.sum(w)), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, EvalSums(zero, zero, zero), (jnp.arange(num_batches), xb, yb))
  return sums


def make_evaluate(apply_fn: Callable, *, batch_size: int = 512, loss_fn: Callable = softmax_cross_entropy,
                  eval_transform: Callable | None = None) -> Callable:
  """Evaluation of one model on a central test set.

  Returns:
    `evaluate(params, batch_stats, x [M, ...], y [M], num_examples=None) -> EvalSums`
    (call `.means()` for loss/accuracy). Not jitted: jit it, or call it inside a
    jitted function.
  """
  if batch_size < 1:
    raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")

  def evaluate(params, batch_stats, x, y, num_examples=None) -> EvalSums:
    n = x.shape[0] if num_examples is None else num_examples
    return _eval_padded(apply_fn, loss_fn, params, batch_stats, x, y, n, batch_size, eval_transform)

  return evaluate


def make_evaluate_clients(apply_fn: Callable, *, batch_size: int = 128,
                          loss_fn: Callable = softmax_cross_entropy,
                          eval_transform: Callable | None = None,
                          clients_per_chunk: int = 16, per_client_params: bool = False) -> Callable:
  """Per-client evaluation on each client's own (local test) data.

  Clients are processed `clients_per_chunk` at a time (`lax.map` with a vmapped
  chunk); with shared params the vmapped forward pass is one larger batch.

  Returns:
    `evaluate_clients(params, batch_stats, data: ClientData) -> EvalSums` with
    [N] leaves (one entry per client). With `per_client_params=True`, params and
    batch_stats carry a leading [N] axis (personalised or heterogeneous models).
  """

  def one(params, batch_stats, x, y, n):
    return _eval_padded(apply_fn, loss_fn, params, batch_stats, x, y, n, batch_size, eval_transform)

  def evaluate_clients(params, batch_stats, data: ClientData) -> EvalSums:
    if per_client_params:
      fn = lambda args: one(*args)
      xs = (params, batch_stats, data.x, data.y, data.num_examples)
    else:
      fn = lambda args: one(params, batch_stats, *args)
      xs = (data.x, data.y, data.num_examples)
    return jax.lax.map(fn, xs, batch_size=min(clients_per_chunk, data.x.shape[0]))

  return evaluate_clients

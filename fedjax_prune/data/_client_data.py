"""Stacked, padded, device-resident client datasets: the engine's data format.

Every client's examples live in one array with a leading client axis N and a
padded example axis E. Padding examples exist only to make the arrays
rectangular; `num_examples_N` says how many leading rows of each client are real.
The engine builds batches by index arithmetic inside jit, so no host loop ever
touches client data during a round.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class DataError(ValueError):
  """The data is unusable: a corrupt or truncated file, inconsistent fields, labels out of
  range (the message names the file or the client and the problem)."""


class ClientData(NamedTuple):
  """A federated dataset as stacked arrays.

  Attributes:
    x: [N, E, ...] inputs (images NHWC per example, token ids, features...),
      any dtype (uint8 images are normalised by the model's preprocess step).
    y: [N, E] integer labels (or [N, E, ...] targets).
    num_examples: [N] int32, real examples per client (the rest is padding).
  """
  x: jax.Array
  y: jax.Array
  num_examples: jax.Array

  @property
  def num_clients(self) -> int:
    return int(self.x.shape[0])

  @property
  def max_examples(self) -> int:
    return int(self.x.shape[1])

  @property
  def mask(self) -> jax.Array:
    """[N, E] bool: True for real examples."""
    return jnp.arange(self.x.shape[1])[None, :] < jnp.asarray(self.num_examples)[:, None]


def check_labels(y, num_classes: int | None, *, where: str) -> None:
  """Raises DataError (the message starts with `where`, e.g. "client 3") unless the integer
  labels `y` are class indices in [0, num_classes) ([0, inf) when num_classes is None):
  the loss takes them as indices, so -1 trains with a finite loss and is never right and
  >= num_classes gives NaN. Float `y` are targets of a custom loss, checked only against
  a num_classes (then refused)."""
  y = np.asarray(y)
  if y.size == 0:
    return
  if y.dtype.kind not in "iu":
    if num_classes is None and y.dtype.kind == "f":
      return
    raise DataError(f"{where}: labels must be integers (class indices), got dtype {y.dtype}")
  lo, hi = int(y.min()), int(y.max())
  if lo < 0 or (num_classes is not None and hi >= num_classes):
    bad = lo if lo < 0 else hi
    allowed = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
    raise DataError(f"{where} has label {bad} outside {allowed}"
                    + (f" (num_classes={num_classes})" if num_classes is not None else ""))


def from_client_lists(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], *,
                      pad_to: int | None = None, allow_empty: bool = False,
                      num_classes: int | None = None) -> ClientData:
  """Stacks per-client numpy arrays into a padded `ClientData` (host arrays).

  Args:
    xs: per-client inputs, each [n_k, ...] with identical trailing shapes and dtype.
    ys: per-client labels, each [n_k, ...]: integer class indices in [0, num_classes)
      (or float targets of a custom loss, when num_classes is None).
    pad_to: pad the example axis to this length (default: the largest n_k).
    allow_empty: if False, a client with zero examples raises DataError.
    num_classes: the labels' upper bound (None: integer labels only checked to be >= 0).

  Returns:
    ClientData of numpy arrays (call `to_device` to place it).

  Raises:
    DataError naming the client when the lists disagree, a label is not an integer in
    range, or (unless allow_empty) a client has no examples.
  """
  if len(xs) != len(ys):
    raise DataError(f"got {len(xs)} client inputs but {len(ys)} client label arrays")
  if not xs:
    raise DataError("no clients: need at least one client")
  counts = np.asarray([len(x) for x in xs], np.int32)
  for k, (x, y) in enumerate(zip(xs, ys)):
    if len(x) != len(y):
      raise DataError(f"client {k}: {len(x)} inputs but {len(y)} labels")
    if x.shape[1:] != xs[0].shape[1:]:
      raise DataError(f"client {k}: example shape {x.shape[1:]} differs from client 0's {xs[0].shape[1:]}")
  if not allow_empty and np.any(counts == 0):
    raise DataError(f"clients {np.flatnonzero(counts == 0).tolist()} have zero examples "
                    "(drop them or pass allow_empty=True)")
  for k, y in enumerate(ys):
    check_labels(y, num_classes, where=f"client {k}")
  max_n = int(counts.max()) if pad_to is None else int(pad_to)
  if max_n < counts.max():
    raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({counts.max()} examples)")
  max_n = max(max_n, 1)
  x_out = np.zeros((len(xs), max_n) + xs[0].shape[1:], xs[0].dtype)
  y_out = np.zeros((len(ys), max_n) + np.shape(ys[0])[1:], np.asarray(ys[0]).dtype)
  for k, (x, y) in enumerate(zip(xs, ys)):
    x_out[k, :len(x)] = x
    y_out[k, :len(y)] = y
  return ClientData(x_out, y_out, counts)


def to_device(data: ClientData, sharding=None) -> ClientData:
  """Places a ClientData on device (replicated unless a sharding is given)."""
  return ClientData(*(jax.device_put(np.asarray(a), sharding) for a in data))


def client_slice(data: ClientData, index) -> ClientData:
  """The data of one client (leading axis removed); traceable."""
  return ClientData(*(a[index] for a in data))

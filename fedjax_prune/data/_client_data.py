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


def from_client_lists(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], *,
                      pad_to: int | None = None, allow_empty: bool = False) -> ClientData:
  """Stacks per-client numpy arrays into a padded `ClientData` (host arrays).

  Args:
    xs: per-client inputs, each [n_k, ...] with identical trailing shapes and dtype.
    ys: per-client labels, each [n_k, ...].
    pad_to: pad the example axis to this length (default: the largest n_k).
    allow_empty: if False, a client with zero examples raises ValueError.

  Returns:
    ClientData of numpy arrays (call `to_device` to place it).
  """
  if len(xs) != len(ys):
    raise ValueError(f"got {len(xs)} client inputs but {len(ys)} client label arrays")
  if not xs:
    raise ValueError("no clients: need at least one client")
  counts = np.asarray([len(x) for x in xs], np.int32)
  for k, (x, y) in enumerate(zip(xs, ys)):
    if len(x) != len(y):
      raise ValueError(f"client {k}: {len(x)} inputs but {len(y)} labels")
    if x.shape[1:] != xs[0].shape[1:]:
      raise ValueError(f"client {k}: example shape {x.shape[1:]} differs from client 0's {xs[0].shape[1:]}")
  if not allow_empty and np.any(counts == 0):
    raise ValueError(f"clients {np.flatnonzero(counts == 0).tolist()} have zero examples "
                     "(drop them or pass allow_empty=True)")
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

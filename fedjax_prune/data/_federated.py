"""Loaded federated datasets: the container, pooled views and per-dataset normalisation.

A loader returns a `FederatedDataset`: the train and test splits as stacked,
padded `ClientData` (host numpy arrays, see `_client_data.py`) plus the facts a
model needs (number of classes, per-example input shape, how to normalise the
stored pixels). Images are stored compactly as `uint8` wherever the source is
exactly `k/255`; the model applies `normalize_fn` inside its jitted step.

Row convention: row `k` of `train` and row `k` of `test` are the same client,
`client_ids[k]`. `test` may hold extra rows after the last train client
(clients with test data only, e.g. FEMNIST's test-only writers); their ids are
`test_client_ids[len(client_ids):]`. A train client without test data has an
empty test row (`test.num_examples[k] == 0`).
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.data import _client_data
from fedjax_prune.data._client_data import ClientData, DataError, from_client_lists

EMPTY_CLIENT_POLICIES = ("drop", "error", "keep")

# Channel statistics on the [0, 1] pixel scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


# ----------------------------------------------------------------------------- normalisers


def normalize_unit(x: jax.typing.ArrayLike) -> jax.Array:
  """Pixels to float32 in [0, 1]: `uint8 / 255`; float input is passed through.

  For FEMNIST (LEAF) and TFF EMNIST this reproduces the source floats exactly,
  with 1.0 = white background and dark ink (LEAF's convention). For tfds
  `emnist`/`mnist` 0.0 is the background. CelebA (LEAF and tfds) also uses it.

  Args:
    x: [..., H, W, C] uint8 (or float already in [0, 1]).

  Returns:
    [..., H, W, C] float32.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def _channel_standardize(x, mean, std) -> jax.Array:
  x = normalize_unit(x)
  # Explicit reshape: the test config sets jax_numpy_rank_promotion='raise'.
  shape = (1,) * (x.ndim - 1) + (len(mean),)
  return (x - jnp.asarray(mean, jnp.float32).reshape(shape)) / jnp.asarray(std, jnp.float32).reshape(shape)


def normalize_cifar10(x: jax.typing.ArrayLike) -> jax.Array:
  """CIFAR-10 standardisation: `(x/255 - mean) / std` per channel.

  mean = (0.4914, 0.4822, 0.4465), std = (0.2023, 0.1994, 0.2010), the values
  of the common PyTorch CIFAR recipes.

  Args:
    x: [..., H, W, 3] uint8 pixels.

  Returns:
    [..., H, W, 3] float32.
  """
  return _channel_standardize(x, CIFAR10_MEAN, CIFAR10_STD)


def normalize_cifar100(x: jax.typing.ArrayLike) -> jax.Array:
  """CIFAR-100 standardisation: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762).

  Args:
    x: [..., H, W, 3] uint8 pixels.

  Returns:
    [..., H, W, 3] float32.
  """
  return _channel_standardize(x, CIFAR100_MEAN, CIFAR100_STD)


def normalize_tokens(x: jax.typing.ArrayLike) -> jax.Array:
  """Token ids (stored as uint8) to int32 for an embedding lookup.

  Args:
    x: [..., T] integer token ids.

  Returns:
    [..., T] int32.
  """
  return jnp.asarray(x).astype(jnp.int32)


# ----------------------------------------------------------------------------- containers


class FederatedDataset(NamedTuple):
  """A loaded federated dataset (host numpy arrays).

  Attributes:
    train: ClientData with x [N, E, *input_shape], y [N, E] int32, num_examples [N].
    test: ClientData with x [N_test, E_test, *input_shape] (N_test >= N; the
      first N rows are the train clients, in the same order), or None.
    client_ids: N client ids of the train rows.
    num_classes: labels lie in [0, num_classes).
    input_shape: shape of one example, e.g. (28, 28, 1).
    description: one line saying where the data came from and how it was processed.
    normalize_fn: pure jnp function mapping stored x [..., *input_shape] to the
      model's float input (apply it inside the jitted step).
    test_client_ids: N_test ids of the test rows; starts with `client_ids`.
  """
  train: ClientData
  test: ClientData | None
  client_ids: tuple[str, ...]
  num_classes: int
  input_shape: tuple[int, ...]
  description: str
  normalize_fn: Callable[[jax.Array], jax.Array] = normalize_unit
  test_client_ids: tuple[str, ...] = ()


class PooledData(NamedTuple):
  """Centralised examples, to be partitioned into clients (e.g. by Dirichlet).

  Attributes:
    x: [M, *input_shape] inputs (uint8 images where lossless).
    y: [M] int32 labels in [0, num_classes).
    num_classes: number of classes.
    input_shape: shape of one example.
    description: where the data came from and how it was processed.
    normalize_fn: as in `FederatedDataset`.
    groups: [M] int natural grouping (e.g. CelebA celebrity id), or None.
  """
  x: np.ndarray
  y: np.ndarray
  num_classes: int
  input_shape: tuple[int, ...]
  description: str
  normalize_fn: Callable[[jax.Array], jax.Array] = normalize_unit
  groups: np.ndarray | None = None


# ----------------------------------------------------------------------------- pooled views


def pool(data: ClientData) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates the real (unpadded) examples of all clients, in client order.

  Args:
    data: ClientData with x [N, E, ...], y [N, E, ...].

  Returns:
    (x [M, ...], y [M, ...]) numpy arrays, M = sum(num_examples).
  """
  x, y, n = (np.asarray(a) for a in data)
  mask = np.arange(x.shape[1])[None, :] < n[:, None]
  return x[mask], y[mask]


def central_test_set(dataset: FederatedDataset) -> tuple[np.ndarray, np.ndarray]:
  """All test clients' real examples as one centralised test set.

  Args:
    dataset: a FederatedDataset with a test split.

  Returns:
    (x [M, *input_shape], y [M]).
  """
  if dataset.test is None:
    raise ValueError("dataset.test is None: this dataset has no test split to pool")
  return pool(dataset.test)


def pooled(dataset: FederatedDataset, splits: Sequence[str] = ("train", "test")) -> PooledData:
  """Pools the given splits of a federated dataset, e.g. to re-partition it.

  PFLlib's CIFAR-10 split is per-client 75/25, not the official train/test
  split; pooling both splits and re-partitioning (IID, Dirichlet) is the
  intended way to build other federations from it.

  Args:
    dataset: the federated dataset.
    splits: which of "train", "test" to concatenate, in this order.

  Returns:
    PooledData with x [M, *input_shape], y [M].
  """
  xs, ys = [], []
  for split in splits:
    if split not in ("train", "test"):
      raise ValueError(f"splits: unknown split {split!r}; allowed 'train', 'test'")
    data = getattr(dataset, split)
    if data is None:
      raise ValueError(f"splits: dataset has no {split!r} split")
    x, y = pool(data)
    xs.append(x)
    ys.append(y)
  if not xs:
    raise ValueError("splits: need at least one split")
  return PooledData(np.concatenate(xs), np.concatenate(ys), dataset.num_classes,
                    dataset.input_shape, f"{dataset.description} [pooled {'+'.join(splits)}]",
                    dataset.normalize_fn)


def _check_num_clients(num_clients: int, num_examples: int) -> None:
  if num_clients < 1:
    raise ValueError(f"parts: got {num_clients} clients, need at least one")
  if num_clients > num_examples:
    raise ValueError(f"parts: {num_clients} clients requested but only {num_examples} examples; "
                     "every client needs at least one example")


def from_partition(data: PooledData, parts: Sequence[jax.typing.ArrayLike], *,
                   test: PooledData | None = None,
                   test_parts: Sequence[jax.typing.ArrayLike] | None = None,
                   client_ids: Sequence[str] | None = None,
                   empty_clients: str = "drop") -> FederatedDataset:
  """Builds a FederatedDataset from pooled arrays and a partition of their indices.

  The re-partitioning hook: `pooled(...)`, `load_tfds(...)` or a loader gives
  the pooled arrays, a partitioner (`iid`, `dirichlet`, `natural`, ...) gives
  `parts`, one int index array per client.

  Args:
    data: pooled train examples.
    parts: per client, int indices into `data.x` (its train examples).
    test: pooled test examples that `test_parts` index (default: `data` itself).
    test_parts: optional per-client test indices (same number of clients as `parts`).
    client_ids: names of the clients (default "0", "1", ...).
    empty_clients: what to do with a client without train examples: "drop"
      (warn and remove it), "error" (raise) or "keep" (keep an empty row).

  Returns:
    FederatedDataset; row k is client k of `parts`.
  """
  _check_num_clients(len(parts), len(data.x))
  if client_ids is None:
    client_ids = [str(k) for k in range(len(parts))]
  client_ids = [str(c) for c in client_ids]
  if len(client_ids) != len(parts):
    raise ValueError(f"client_ids: got {len(client_ids)} ids for {len(parts)} clients")
  if len(set(client_ids)) != len(client_ids):
    raise ValueError("client_ids: ids must be unique")
  if test_parts is not None and len(test_parts) != len(parts):
    raise ValueError(f"test_parts: got {len(test_parts)} clients, parts has {len(parts)}")
  if test is not None and test_parts is None:
    raise ValueError("test: pooled test data given without test_parts")
  test_src = data if test is None else test
  if test is not None and tuple(test.input_shape) != tuple(data.input_shape):
    raise ValueError(f"test: input_shape {tuple(test.input_shape)} differs from data's {tuple(data.input_shape)}")

  def gather(src, idx, what, k):
    m = len(src.x)
    idx = np.asarray(idx).reshape(-1)
    if idx.size and idx.dtype.kind not in "iu":
      raise ValueError(f"{what}[{k}]: indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= m):
      raise ValueError(f"{what}[{k}]: index {idx.min() if idx.min() < 0 else idx.max()} out of range [0, {m})")
    y = np.asarray(src.y[idx])
    _client_data.check_labels(y, src.num_classes, where=f"{what}[{k}] (client {client_ids[k]!r})")
    return src.x[idx], y.astype(np.int32)

  train = {cid: gather(data, ix, "parts", k) for k, (cid, ix) in enumerate(zip(client_ids, parts))}
  test_table = None
  if test_parts is not None:
    test_table = {cid: gather(test_src, ix, "test_parts", k)
                  for k, (cid, ix) in enumerate(zip(client_ids, test_parts))}
  return assemble(train, test_table, num_classes=data.num_classes, input_shape=data.input_shape,
                  description=f"{data.description} [{len(parts)} clients from a partition]",
                  normalize_fn=data.normalize_fn, empty_clients=empty_clients, source="from_partition")


# ----------------------------------------------------------------------------- shared builder


def check_empty_policy(empty_clients: str) -> None:
  if empty_clients not in EMPTY_CLIENT_POLICIES:
    raise ValueError(f"empty_clients={empty_clients!r}; allowed {EMPTY_CLIENT_POLICIES}")


def check_labels(y: np.ndarray, num_classes: int, *, source: str, client: str, split: str) -> None:
  """Raises DataError naming the client unless its labels are integers in [0, num_classes)."""
  _client_data.check_labels(y, num_classes, where=f"{source}: client {client!r} ({split})")


def assemble(train: Mapping[str, tuple[np.ndarray, np.ndarray]],
             test: Mapping[str, tuple[np.ndarray, np.ndarray]] | None, *,
             num_classes: int, input_shape: tuple[int, ...], description: str,
             normalize_fn: Callable[[jax.Array], jax.Array], empty_clients: str,
             source: str, test_only: Sequence[str] = ()) -> FederatedDataset:
  """Validates per-client arrays and stacks them into a FederatedDataset.

  Args:
    train: client id -> (x [n, *input_shape], y [n]) in the row order wanted.
    test: client id -> (x, y) for the test split (ids absent from it get an
      empty test row), or None.
    num_classes: labels must lie in [0, num_classes).
    input_shape: shape every example must have.
    description: stored in the result.
    normalize_fn: stored in the result.
    empty_clients: policy for train clients with zero examples (see `from_partition`).
    source: names the data in error messages (a path or loader name).
    test_only: ids in `test` but not in `train` to append as test-only rows.

  Returns:
    FederatedDataset of host numpy arrays.
  """
  check_empty_policy(empty_clients)
  input_shape = tuple(int(d) for d in input_shape)
  for split, table in (("train", train), ("test", test or {})):
    for cid, (x, y) in table.items():
      if tuple(x.shape[1:]) != input_shape:
        raise DataError(f"{source}: client {cid!r} ({split}) has example shape {tuple(x.shape[1:])}, "
                        f"expected {input_shape}")
      if len(x) != len(y):
        raise DataError(f"{source}: client {cid!r} ({split}) has {len(x)} inputs but {len(y)} labels")
      check_labels(np.asarray(y), num_classes, source=source, client=cid, split=split)

  ids = list(train)
  empty = [cid for cid in ids if len(train[cid][1]) == 0]
  if empty:
    shown = ", ".join(repr(c) for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
    if empty_clients == "error":
      raise DataError(f"{source}: {len(empty)} client(s) have zero train examples ({shown}); "
                      "pass empty_clients='drop' or 'keep'")
    if empty_clients == "drop":
      warnings.warn(f"{source}: dropping {len(empty)} client(s) with zero train examples ({shown})",
                    stacklevel=3)
      dropped = set(empty)
      ids = [cid for cid in ids if cid not in dropped]
  if not ids:
    raise DataError(f"{source}: no clients with train examples")

  train_cd = from_client_lists([train[c][0] for c in ids],
                               [np.asarray(train[c][1], np.int32) for c in ids],
                               allow_empty=(empty_clients == "keep"))
  test_cd = None
  test_ids = tuple(ids)
  if test is not None:
    test_ids = tuple(ids) + tuple(test_only)
    dtype = train_cd.x.dtype
    xs, ys = [], []
    for cid in test_ids:
      if cid in test:
        x, y = test[cid]
      else:
        x, y = np.zeros((0,) + input_shape, dtype), np.zeros((0,), np.int32)
      xs.append(np.asarray(x, dtype))
      ys.append(np.asarray(y, np.int32))
    test_cd = from_client_lists(xs, ys, allow_empty=True)
  return FederatedDataset(train_cd, test_cd, tuple(ids), int(num_classes), input_shape,
                          description, normalize_fn, test_ids)


def quantize_unit(x: np.ndarray, *, source: str, tolerance: float = 1e-4) -> np.ndarray:
  """float pixels in [0, 1] -> uint8 via round(x*255) when lossless, else float32.

  Args:
    x: float array of pixels in [0, 1].
    source: names the data in the error message.
    tolerance: largest allowed |x - round(x*255)/255| for the uint8 path.

  Returns:
    uint8 array if every value is k/255 (within tolerance), else float32 array.
  """
  x = np.asarray(x, np.float32)
  if x.size and (x.min() < -tolerance or x.max() > 1 + tolerance):
    raise DataError(f"{source}: pixel values in [{x.min()}, {x.max()}], expected [0, 1]")
  q = np.clip(np.round(x * 255.0), 0, 255)
  if x.size == 0 or np.abs(q / 255.0 - x).max() <= tolerance:
    return q.astype(np.uint8)
  return x


def quantize_tables(tables: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]], *,
                    source: str) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Applies `quantize_unit` to every client's x, with one dtype for all clients.

  Args:
    tables: client id -> (x float in [0, 1], y) mappings (e.g. train and test).
    source: names the data in error messages.

  Returns:
    The same mappings with x uint8 if every client is lossless, else float32.
  """
  out = [{cid: (quantize_unit(x, source=f"{source}: client {cid!r}"), y) for cid, (x, y) in t.items()}
         for t in tables]
  if all(x.dtype == np.uint8 for t in out for x, _ in t.values()):
    return out
  return [{cid: (np.asarray(x, np.float32), y) for cid, (x, y) in t.items()} for t in tables]

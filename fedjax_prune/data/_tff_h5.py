"""TensorFlow Federated HDF5 client files: `examples/<client_id>/<field>`.

TFF's simulation datasets ship as one HDF5 file per split with a group
`examples` holding one sub-group per client; each sub-group holds one dataset
per feature, its first axis the client's examples. Two layouts are handled:

* EMNIST (`fed_emnist*.h5`): `pixels` float32 [n, 28, 28] in [0, 1] and
  `label` int [n]. TFF documents that in Federated EMNIST **1.0 is the
  background and 0.0 the ink**, the inverse of tfds/MNIST (0 = background) and
  the same convention as LEAF's FEMNIST JSON. Pixels that are exactly k/255 are
  stored as uint8 `round(x*255)`; `normalize_unit` gives the floats back.
* Shakespeare (`shakespeare_*.h5`): `snippets`, byte strings; handled by
  `load_shakespeare` (next-character windows).

Only `h5py` is needed (no TensorFlow).
"""
from __future__ import annotations

import os

import numpy as np

from fedjax_prune.data._client_data import DataError, check_labels
from fedjax_prune.data._federated import FederatedDataset, assemble, normalize_unit, quantize_tables

EMNIST_FIELDS = ("label", "pixels")


def read_tff_h5(path: str | os.PathLike, fields: tuple[str, ...] | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Reads every client of a TFF HDF5 file into memory.

  Args:
    path: the .h5 file.
    fields: fields every client must have (None: read whatever each client has).

  Returns:
    client id -> field name -> numpy array, clients in the file's (sorted) order.

  Raises:
    FileNotFoundError: the file does not exist.
    DataError (a ValueError): the file is not readable HDF5, has no `examples` group,
      or a client lacks a field (the message names the file, client and field).
  """
  import h5py  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TFF HDF5 file not found: {path}")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise DataError(f"{path}: not a readable HDF5 file (corrupt or truncated?): {e}") from e
  out: dict[str, dict[str, np.ndarray]] = {}
  with f:
    if "examples" not in f:
      raise DataError(f"{path}: no 'examples' group; expected the TFF layout examples/<client>/<field> "
                       f"(top-level keys: {list(f.keys())[:10]})")
    group = f["examples"]
    try:
      client_ids = list(group.keys())
    except (OSError, RuntimeError) as e:
      raise DataError(f"{path}: cannot list clients of 'examples' (corrupt file?): {e}") from e
    for cid in client_ids:
      try:
        cgroup = group[cid]
        names = tuple(cgroup.keys()) if fields is None else fields
        row = {}
        for name in names:
          if name not in cgroup:
            raise DataError(f"{path}: client {cid!r} has no field {name!r} (has {sorted(cgroup.keys())})")
          row[name] = np.asarray(cgroup[name][()])
      except (OSError, RuntimeError, KeyError) as e:
        raise DataError(f"{path}: cannot read client {cid!r} (corrupt or truncated file?): {e}") from e
      out[cid] = row
  return out


def _emnist_table(path: str, raw: dict[str, dict[str, np.ndarray]], num_classes: int):
  table = {}
  for cid, row in raw.items():
    pixels, label = row["pixels"], np.asarray(row["label"]).reshape(-1)
    if pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
      raise DataError(f"{path}: client {cid!r} field 'pixels' has shape {pixels.shape}, expected [n, 28, 28]")
    if len(pixels) != len(label):
      raise DataError(f"{path}: client {cid!r} has {len(pixels)} 'pixels' rows but {len(label)} labels")
    check_labels(label, num_classes, where=f"{path}: client {cid!r} field 'label'")
    table[cid] = (np.asarray(pixels, np.float32)[..., None], label.astype(np.int32))
  return table


def load_tff_h5(train_path: str | os.PathLike, test_path: str | os.PathLike | None = None, *,
                num_classes: int | None = None, empty_clients: str = "drop",
                include_test_only_clients: bool = False) -> FederatedDataset:
  """Loads a TFF HDF5 federated dataset (EMNIST layout, or Shakespeare snippets).

  EMNIST layout: x [N, E, 28, 28, 1] uint8 (lossless `round(pixels*255)`,
  1.0/255 = background as in TFF and LEAF; float32 if the pixels are not k/255),
  y [N, E] int32; `normalize_fn` is `normalize_unit`. A `snippets` file is
  passed to `load_shakespeare`'s windowing with its defaults (use
  `shakespeare_from_snippets` for other settings).

  Args:
    train_path: the train split's .h5 file.
    test_path: the test split's .h5 file (clients matched by id), or None.
    num_classes: label range; default 62 (EMNIST ByClass: digits, upper, lower),
      or 10 when the file name contains "digitsonly" (TFF's fed_emnist_digitsonly_*.h5).
    empty_clients: "drop" (warn), "error" or "keep" train clients with zero examples.
    include_test_only_clients: append clients that only have test data as extra test rows.

  Returns:
    FederatedDataset.
  """
  train_path = os.fspath(train_path)
  raw_train = read_tff_h5(train_path)
  raw_test = read_tff_h5(test_path) if test_path is not None else None
  if not raw_train:
    raise DataError(f"{train_path}: 'examples' holds no clients")
  fields = set(next(iter(raw_train.values())))
  if "snippets" in fields:
    from fedjax_prune.data import _shakespeare  # pylint: disable=g-import-not-at-top
    return _shakespeare.shakespeare_from_snippets(
        _shakespeare.decode_snippets(train_path, raw_train),
        _shakespeare.decode_snippets(os.fspath(test_path), raw_test) if raw_test is not None else None,
        empty_clients=empty_clients, source=train_path)
  if not set(EMNIST_FIELDS) <= fields:
    raise DataError(f"{train_path}: unknown TFF layout with fields {sorted(fields)}; expected "
                     f"{list(EMNIST_FIELDS)} (EMNIST) or ['snippets'] (Shakespeare)")
  if num_classes is None:
    num_classes = 10 if "digitsonly" in os.path.basename(train_path) else 62
  for path, raw in ((train_path, raw_train), (test_path, raw_test or {})):
    for cid, row in raw.items():
      missing = [k for k in EMNIST_FIELDS if k not in row]
      if missing:
        raise DataError(f"{path}: client {cid!r} has no field {missing[0]!r}")
  train = _emnist_table(train_path, raw_train, num_classes)
  test = _emnist_table(os.fspath(test_path), raw_test, num_classes) if raw_test is not None else None
  if test is None:
    (train,) = quantize_tables([train], source=train_path)
  else:
    train, test = quantize_tables([train, test], source=train_path)
  test_only = [c for c in test if c not in train] if (test is not None and include_test_only_clients) else []
  desc = (f"TFF EMNIST HDF5 {os.path.basename(train_path)}: {len(train)} clients, "
          f"{num_classes} classes, 1.0 = background")
  return assemble(train, test, num_classes=num_classes, input_shape=(28, 28, 1), description=desc,
                  normalize_fn=normalize_unit, empty_clients=empty_clients, source=train_path,
                  test_only=test_only)

"""PFLlib client files (`train/K.npz`, `test/K.npz`), e.g. its Dirichlet CIFAR-10 split.

PFLlib's generators save each client K as `train/K.npz` and `test/K.npz`,
each holding one key `data`: a pickled 0-d object array with a dict
`{"x": float32 [n, C, H, W], "y": int [n]}`. Pixels are normalised as
`(p/255 - 0.5)/0.5` in [-1, 1]; `round((x*0.5 + 0.5)*255)` recovers the uint8
pixels exactly, so they are stored as uint8 NHWC (4x smaller). CIFAR-10 models
then apply `normalize_cifar10` (the usual per-channel mean/std).

PFLlib splits *each client's* examples 75/25 into train/test after pooling
the official CIFAR-10 train and test sets, so these are not the official
splits; pool them (`pooled(ds)`) to re-partition or evaluate centrally.

Pickle can execute code: these files are loaded with `allow_pickle=True`
only because they are the trusted PFLlib outputs this loader is for, and only
inside this module.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile

import numpy as np

from fedjax_prune.data._client_data import DataError
from fedjax_prune.data._federated import FederatedDataset, assemble, normalize_cifar10, normalize_unit

_CLIENT_FILE = re.compile(r"^(\d+)\.npz$")


def read_pfllib_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads one PFLlib client file.

  Args:
    path: a `K.npz` file.

  Returns:
    (x [n, H, W, C] uint8, y [n] int32).

  Raises:
    FileNotFoundError: no such file.
    DataError (a ValueError): not a readable npz, no `data` dict with `x`/`y`, x
      not [n, C, H, W] in [-1, 1] on the k/255 grid, or x/y lengths differ.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PFLlib client file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":  # Refuse anything but a zip (npz) archive before unpickling.
    raise DataError(f"{path}: not an npz (zip) archive (corrupt file?)")
  try:
    # Own the file handle: np.load leaks it when the zip directory is truncated.
    with open(path, "rb") as f, np.load(f, allow_pickle=True) as npz:  # Trusted PFLlib output (module doc).
      keys = list(npz.files)
      data = npz["data"] if "data" in keys else None
  except (OSError, EOFError, zipfile.BadZipFile, ValueError, pickle.UnpicklingError) as e:
    raise DataError(f"{path}: cannot read npz (corrupt or truncated file?): {type(e).__name__}: {e}") from e
  if data is None:
    raise DataError(f"{path}: no key 'data' (keys: {keys})")
  data = data.item() if data.dtype == object and data.shape == () else data
  if not isinstance(data, dict) or "x" not in data or "y" not in data:
    raise DataError(f"{path}: 'data' must be a dict with keys 'x' and 'y'")
  x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"])
  if x.ndim != 4 or x.shape[1] not in (1, 3):
    raise DataError(f"{path}: image shape mismatch: 'x' has shape {x.shape}, expected [n, C, H, W] with C in (1, 3)")
  if y.ndim != 1 or len(y) != len(x):
    raise DataError(f"{path}: 'y' has shape {y.shape}, expected [{len(x)}]")
  if y.size and y.dtype.kind not in "iu":
    raise DataError(f"{path}: labels 'y' must be integers, got {y.dtype}")
  q = np.round((x * 0.5 + 0.5) * 255.0)
  if x.size and (np.abs(x).max() > 1 + 1e-4 or np.abs((q / 255.0 - 0.5) / 0.5 - x).max() > 1e-3):
    raise DataError(f"{path}: 'x' is not PFLlib-normalised pixels ((p/255 - 0.5)/0.5 in [-1, 1])")
  return np.clip(q, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1), y.astype(np.int32)


def _client_files(split_dir: str) -> dict[str, str]:
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"PFLlib directory has no {os.path.basename(split_dir)}/ subdirectory: {split_dir}")
  out = {}
  for name in os.listdir(split_dir):
    m = _CLIENT_FILE.match(name)
    if m:
      out[m.group(1)] = os.path.join(split_dir, name)
  return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def load_pfllib_npz(directory: str | os.PathLike, *, num_classes: int | None = None,
                    empty_clients: str = "drop", include_test_only_clients: bool = False) -> FederatedDataset:
  """Loads a PFLlib dataset folder: one client per `train/K.npz` (+ `test/K.npz`).

  Args:
    directory: folder with `train/` and `test/` (and optionally PFLlib's `config.json`).
    num_classes: label range; default `config.json`'s "num_classes", else 10.
    empty_clients: "drop" (warn), "error" or "keep" clients with zero train examples.
    include_test_only_clients: append clients that only have a test file as test rows.

  Returns:
    FederatedDataset with x [N, E, H, W, C] uint8, y [N, E] int32, client ids
    "0", "1", ... in numeric order; normalize_fn = normalize_cifar10 for
    32x32x3 images with 10 classes, else normalize_unit.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"PFLlib directory not found: {directory}")
  if num_classes is None:
    num_classes = 10
    config = os.path.join(directory, "config.json")
    if os.path.isfile(config):
      try:
        with open(config, encoding="utf-8") as f:
          num_classes = int(json.load(f).get("num_classes", 10))
      except (ValueError, OSError, TypeError) as e:
        raise DataError(f"{config}: cannot read 'num_classes': {e}") from e
  train_files = _client_files(os.path.join(directory, "train"))
  test_files = _client_files(os.path.join(directory, "test"))
  if not train_files:
    raise FileNotFoundError(f"no K.npz client files in {os.path.join(directory, 'train')}")
  train = {k: read_pfllib_npz(p) for k, p in train_files.items()}
  keep_test = [k for k in test_files if k in train or include_test_only_clients]
  test = {k: read_pfllib_npz(test_files[k]) for k in keep_test}
  input_shape = next(iter(train.values()))[0].shape[1:]
  test_only = [k for k in test if k not in train]
  normalize_fn = normalize_cifar10 if (input_shape == (32, 32, 3) and num_classes == 10) else normalize_unit
  desc = (f"PFLlib npz {os.path.basename(os.path.normpath(directory))}: {len(train)} clients, "
          f"{num_classes} classes, uint8 NHWC from (p/255-0.5)/0.5; per-client 75/25 split, not the official one")
  return assemble(train, test, num_classes=num_classes, input_shape=input_shape, description=desc,
                  normalize_fn=normalize_fn, empty_clients=empty_clients, source=directory, test_only=test_only)

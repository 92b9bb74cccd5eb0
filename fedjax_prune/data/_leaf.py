"""LEAF JSON datasets (FEMNIST, CelebA, Shakespeare), with a multi-source merge.

LEAF writes each split as shards `<dir>/train/*.json` and `<dir>/test/*.json`
(here also `*.json.gz`), each a JSON object::

    {"users": [id, ...], "num_samples": [n, ...],
     "user_data": {id: {"x": [...], "y": [...]}, ...}}

A user's train and test examples share the user id. The kind of data is read
from the examples themselves:

* **FEMNIST**: x rows of 784 floats, a 28x28 image flattened row-major, values
  k/255 with **1.0 = white background**, dark ink (LEAF's convention; TFF's
  EMNIST uses the same, tfds' the inverse). Stored losslessly as uint8
  `round(x*255)` with shape (28, 28, 1); `normalize_unit` gives LEAF's floats
  back. Labels 0-9 digits, 10-35 `A`-`Z`, 36-61 `a`-`z` (62 classes).
* **CelebA**: x are image file names (`000123.jpg`) in LEAF's
  `img_align_celeba` folder, y binary (LEAF: `Smiling`), one client per
  celebrity. Images are loaded from `image_dir` and resized, as in LEAF's
  model code, to `image_size` x `image_size` RGB with PIL bicubic resampling
  (no crop; `center_crop=True` first crops the central square).
* **Shakespeare**: x 80-character strings, y the next character; encoded with
  LEAF's 80-letter vocabulary (see `_shakespeare.py`).

Merging several LEAF directories (e.g. three independent 5 % FEMNIST samples):
clients are combined by id and **each client is taken from one source only**,
the first directory in the given order that has train data for it (its test
data then comes from that same directory, never another, so that train and test
do not leak). Clients that appear only in test files are optional test-only
rows (`include_test_only_writers`), again from the first directory holding them.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from typing import Any, Sequence

import numpy as np

from fedjax_prune.data import _shakespeare
from fedjax_prune.data._client_data import DataError
from fedjax_prune.data._federated import (FederatedDataset, assemble, normalize_tokens, normalize_unit,
                                          quantize_tables)

FEMNIST_NUM_CLASSES = 62
FEMNIST_IMAGE_SHAPE = (28, 28, 1)
CELEBA_IMAGE_SIZE = 84  # LEAF's CelebA model resizes to 84x84.

_Record = dict[str, Any]  # {"x": list, "y": list, "file": str}


def _natural_key(path: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def read_leaf_json(path: str | os.PathLike) -> dict[str, Any]:
  """Reads and checks one LEAF JSON shard (`.json` or gzipped `.json.gz`).

  Args:
    path: the file.

  Returns:
    The parsed object, with `users`, `user_data` (and `num_samples`) checked.

  Raises:
    FileNotFoundError: no such file.
    DataError (a ValueError): corrupt/truncated JSON or gzip, or a missing/inconsistent
      field (the message names the file and the field or user).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LEAF JSON file not found: {path}")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      obj = json.load(f)
  except (ValueError, EOFError, OSError, zlib.error) as e:
    # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; a truncated
    # gzip stream raises EOFError, a bad header gzip.BadGzipFile (an OSError).
    raise DataError(f"{path}: cannot parse LEAF JSON (corrupt or truncated file?): "
                     f"{type(e).__name__}: {e}") from e
  if not isinstance(obj, dict):
    raise DataError(f"{path}: expected a JSON object with 'users' and 'user_data', got {type(obj).__name__}")
  for field, kind in (("users", list), ("user_data", dict)):
    if field not in obj:
      raise DataError(f"{path}: missing field {field!r}")
    if not isinstance(obj[field], kind):
      raise DataError(f"{path}: field {field!r} must be a {kind.__name__}, got {type(obj[field]).__name__}")
  users, user_data = obj["users"], obj["user_data"]
  num_samples = obj.get("num_samples")
  if num_samples is not None and len(num_samples) != len(users):
    raise DataError(f"{path}: 'num_samples' has {len(num_samples)} entries but 'users' has {len(users)}")
  for k, user in enumerate(users):
    if user not in user_data:
      raise DataError(f"{path}: user {user!r} is listed in 'users' but missing from 'user_data'")
    rec = user_data[user]
    if not isinstance(rec, dict) or "x" not in rec or "y" not in rec:
      raise DataError(f"{path}: user_data[{user!r}] must have fields 'x' and 'y'")
    if len(rec["x"]) != len(rec["y"]):
      raise DataError(f"{path}: user {user!r} has {len(rec['x'])} inputs 'x' but {len(rec['y'])} labels 'y'")
    if num_samples is not None and num_samples[k] != len(rec["y"]):
      raise DataError(f"{path}: user {user!r}: num_samples says {num_samples[k]} but 'y' has {len(rec['y'])}")
  return obj


def _read_split(directory: str, split: str) -> dict[str, _Record]:
  split_dir = os.path.join(directory, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"LEAF directory {directory} has no {split}/ subdirectory "
                            f"(expected {split}/*.json or {split}/*.json.gz)")
  files = sorted(glob.glob(os.path.join(split_dir, "*.json")) + glob.glob(os.path.join(split_dir, "*.json.gz")),
                 key=_natural_key)
  if not files:
    raise FileNotFoundError(f"no *.json or *.json.gz files in {split_dir}")
  out: dict[str, _Record] = {}
  for path in files:
    obj = read_leaf_json(path)
    for user in obj["users"]:
      rec = obj["user_data"][user]
      if user in out:  # A user split over shards: concatenate.
        out[user] = {"x": out[user]["x"] + list(rec["x"]), "y": out[user]["y"] + list(rec["y"]),
                     "file": out[user]["file"]}
      else:
        out[user] = {"x": list(rec["x"]), "y": list(rec["y"]), "file": path}
  return out


def _kind(rec: _Record, user: str) -> str | None:
  if not rec["x"]:
    return None
  x0, y0 = rec["x"][0], rec["y"][0]
  if isinstance(x0, list):
    return "features"
  if isinstance(x0, str):
    return "text" if isinstance(y0, str) else "image_files"
  raise DataError(f"{rec['file']}: user {user!r}: unsupported LEAF example type {type(x0).__name__} "
                   "(supported: lists of numbers, image file names, text)")


def _labels(rec: _Record, user: str) -> np.ndarray:
  y = np.asarray(rec["y"])
  if y.size == 0:
    return np.zeros((0,), np.int32)
  if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
    y = y.astype(np.int64)
  if y.dtype.kind not in "iu" or y.ndim != 1:
    raise DataError(f"{rec['file']}: user {user!r}: labels 'y' must be integers, got {y.dtype} shape {y.shape}")
  return y.astype(np.int32)


def resize_image(image: np.ndarray, size: int, *, center_crop: bool = False) -> np.ndarray:
  """LEAF's CelebA image preparation: RGB, optional central square crop, bicubic resize.

  Args:
    image: [H, W, 3] (or [H, W]) uint8.
    size: output height = width.
    center_crop: crop the central min(H, W) square first (else the aspect ratio
      is changed, as LEAF does).

  Returns:
    [size, size, 3] uint8.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  return _resize_pil(Image.fromarray(np.asarray(image, np.uint8)), size, center_crop)


def _resize_pil(img, size: int, center_crop: bool) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  img = img.convert("RGB")
  if center_crop:
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), np.uint8)


def _load_image(image_dir: str, name: str, size: int, center_crop: bool, where: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  path = os.path.join(image_dir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: image file {name!r} not found in image_dir {image_dir}")
  try:
    with Image.open(path) as img:
      return _resize_pil(img, size, center_crop)
  except OSError as e:
    raise DataError(f"{where}: cannot decode image {path}: {e}") from e


def _convert(kind: str, rec: _Record, user: str, *, image_shape, image_dir, image_size, center_crop,
             seq_len) -> tuple[np.ndarray, np.ndarray]:
  where = f"{rec['file']}: user {user!r}"
  y = None if kind == "text" else _labels(rec, user)
  if kind == "features":
    size = int(np.prod(image_shape))
    try:
      x = np.asarray(rec["x"], np.float32)
    except (ValueError, TypeError) as e:
      raise DataError(f"{where}: 'x' rows are not equal-length lists of numbers ({e})") from e
    if len(rec["x"]) == 0:
      x = np.zeros((0, size), np.float32)
    if x.ndim != 2 or x.shape[1] != size:
      raise DataError(f"{where}: image shape mismatch: 'x' has {x.shape[1:] if x.ndim > 1 else '?'} values "
                       f"per example, expected {size} for shape {tuple(image_shape)}")
    return x.reshape((-1,) + tuple(image_shape)), y
  if kind == "image_files":
    if image_dir is None:
      raise DataError(f"{where}: LEAF examples are image file names (CelebA); pass image_dir")
    shape = (0, image_size, image_size, 3)
    imgs = [_load_image(image_dir, name, image_size, center_crop, where) for name in rec["x"]]
    return (np.stack(imgs) if imgs else np.zeros(shape, np.uint8)), y
  # text
  if any(len(s) != seq_len for s in rec["x"]):
    bad = next(len(s) for s in rec["x"] if len(s) != seq_len)
    raise DataError(f"{where}: text input of length {bad}, expected {seq_len} (like the first example)")
  if any(not isinstance(c, str) or len(c) != 1 for c in rec["y"]):
    raise DataError(f"{where}: text targets 'y' must be single characters")
  x = _shakespeare.encode_text("".join(rec["x"])).reshape(-1, seq_len)
  y = _shakespeare.encode_text("".join(rec["y"])).astype(np.int32)
  return x, y


def load_leaf(directory_or_dirs: str | os.PathLike | Sequence[str | os.PathLike], *,
              image_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
              image_dir: str | os.PathLike | None = None, image_size: int = CELEBA_IMAGE_SIZE,
              center_crop: bool = False, include_test_only_writers: bool = False,
              empty_clients: str = "drop") -> FederatedDataset:
  """Loads a LEAF dataset from one or several `train/` + `test/` directories.

  Args:
    directory_or_dirs: a LEAF directory with `train/` and `test/` subfolders of
      `*.json` / `*.json.gz` shards, or a sequence of them to merge (each client
      from the first directory that has train data for it).
    image_shape: shape of one numeric example; default (28, 28, 1) for rows of
      784 values (FEMNIST), else (D,) (plain feature vectors, kept float32).
    num_classes: label range; default 62 (FEMNIST), 2 (CelebA), 81 (Shakespeare).
      Required for other numeric LEAF data.
    image_dir: folder of the image files named by CelebA-style JSON.
    image_size: CelebA output height = width (LEAF: 84).
    center_crop: crop the central square before resizing (CelebA only).
    include_test_only_writers: append clients that have test data but no train
      data in any directory as extra test rows (FEMNIST shared data: 240 writers).
    empty_clients: "drop" (warn), "error" or "keep" a client whose train entry is empty.

  Returns:
    FederatedDataset; clients sorted by id. FEMNIST: x uint8 [N, E, 28, 28, 1],
    normalize_fn = normalize_unit (float [0, 1], 1.0 = background, as LEAF).
  """
  if isinstance(directory_or_dirs, (str, os.PathLike)):
    dirs = [os.fspath(directory_or_dirs)]
  else:
    dirs = [os.fspath(d) for d in directory_or_dirs]
  if not dirs:
    raise ValueError("directory_or_dirs: no directory given")
  if len(set(dirs)) != len(dirs):
    raise ValueError(f"directory_or_dirs: a directory is listed twice: {dirs}")
  for d in dirs:
    if not os.path.isdir(d):
      raise FileNotFoundError(f"LEAF directory not found: {d}")
  image_dir = os.fspath(image_dir) if image_dir is not None else None
  if image_dir is not None and not os.path.isdir(image_dir):
    raise FileNotFoundError(f"image_dir not found: {image_dir}")
  for d in dirs:  # Check the layout of every directory before parsing anything.
    for split in ("train", "test"):
      if not os.path.isdir(os.path.join(d, split)):
        raise FileNotFoundError(f"LEAF directory {d} has no {split}/ subdirectory "
                                f"(expected {split}/*.json or {split}/*.json.gz)")
  raw = [(_read_split(d, "train"), _read_split(d, "test")) for d in dirs]

  # Each client from a single source: the first with (non-empty) train data.
  owner: dict[str, int] = {}
  for s, (tr, _) in enumerate(raw):
    for user, rec in tr.items():
      if user not in owner and rec["y"]:
        owner[user] = s
  for s, (tr, _) in enumerate(raw):  # Users listed with an empty train entry only.
    for user in tr:
      owner.setdefault(user, s)
  test_only: dict[str, int] = {}
  for s, (_, te) in enumerate(raw):
    for user in te:
      if user not in owner and user not in test_only:
        test_only[user] = s

  train_recs = {u: raw[owner[u]][0][u] for u in sorted(owner)}
  test_recs = {u: raw[owner[u]][1][u] for u in sorted(owner) if u in raw[owner[u]][1]}
  if include_test_only_writers:
    test_recs.update({u: raw[test_only[u]][1][u] for u in sorted(test_only)})

  kinds = {}
  for recs in (train_recs, test_recs):
    for user, rec in recs.items():
      k = _kind(rec, user)
      if k is not None:
        kinds.setdefault(k, (rec["file"], user))
  if len(kinds) > 1:
    detail = "; ".join(f"{k} in {f} (user {u!r})" for k, (f, u) in kinds.items())
    raise DataError(f"LEAF data mixes example kinds: {detail}")
  if not kinds:
    raise DataError(f"LEAF data in {dirs} has no examples")
  (kind, (first_file, first_user)), = kinds.items()

  seq_len = 0
  if kind == "features":
    if image_shape is None:  # The most common row length decides; other rows then mismatch.
      lengths = [len(r["x"][0]) for recs in (train_recs, test_recs) for r in recs.values() if r["x"]]
      dim = int(np.bincount(lengths).argmax())
      image_shape = FEMNIST_IMAGE_SHAPE if dim == 784 else (dim,)
    image_shape = tuple(int(d) for d in image_shape)
    is_image = len(image_shape) == 3
    if num_classes is None:
      if image_shape != FEMNIST_IMAGE_SHAPE:
        raise ValueError(f"{first_file}: num_classes is required for LEAF features of shape {image_shape}")
      num_classes = FEMNIST_NUM_CLASSES
    input_shape, normalize_fn = image_shape, normalize_unit
  elif kind == "image_files":
    num_classes = 2 if num_classes is None else num_classes
    input_shape, normalize_fn, is_image = (image_size, image_size, 3), normalize_unit, False
  else:
    seq_len = len((train_recs.get(first_user) or test_recs[first_user])["x"][0])
    num_classes = _shakespeare.VOCAB_SIZE if num_classes is None else num_classes
    input_shape, normalize_fn, is_image = (seq_len,), normalize_tokens, False

  convert = lambda user, rec: _convert(kind, rec, user, image_shape=image_shape, image_dir=image_dir,
                                       image_size=image_size, center_crop=center_crop, seq_len=seq_len)
  train = {u: convert(u, r) for u, r in train_recs.items()}
  test = {u: convert(u, r) for u, r in test_recs.items()}
  if kind == "features" and is_image:
    train, test = quantize_tables([train, test], source=dirs[0])
  names = ", ".join(os.path.basename(os.path.normpath(d)) for d in dirs)
  label = {"features": "FEMNIST-style images" if is_image else "features",
           "image_files": "CelebA-style images", "text": "Shakespeare-style text"}[kind]
  desc = (f"LEAF {label} from {len(dirs)} source(s) [{names}]: {len(train)} train clients"
          + (f", {len(test_only)} test-only" if include_test_only_writers else "")
          + ", each client from the first source with its train data")
  return assemble(train, test, num_classes=num_classes, input_shape=input_shape, description=desc,
                  normalize_fn=normalize_fn, empty_clients=empty_clients, source=dirs[0] if len(dirs) == 1 else names,
                  test_only=sorted(test_only) if include_test_only_writers else ())

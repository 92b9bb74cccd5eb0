"""Shakespeare next-character prediction (LEAF task) from TFF's snippet files.

Each client is a speaking role. Its snippets (lines or passages) are joined
into one text, and every window of `seq_len` = 80 characters becomes one
example whose target is the character after the window (LEAF: stride 1).

Vocabulary: LEAF's 80 symbols `LEAF_LETTERS` get ids 0..79 in that order; any
other character maps to the dedicated out-of-vocabulary id `OOV_ID` = 80
(LEAF's `letter_to_index` returns -1 there, which is not a valid id). So the
model's vocabulary and number of classes are `VOCAB_SIZE` = 81. Ids are stored
as uint8 (x) and int32 (y); `normalize_tokens` casts x to int32.

Memory: stride-1 windows copy each character 80 times. The complete TFF train
file has 2.37 M characters (about 2.32 M windows, the largest client 69 k), so
the padded [N, E, 80] array would be about 4 GB; pass `max_windows_per_client`
and/or `stride` (a guard raises before allocating more than `max_padded_bytes`).
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np

from fedjax_prune.data._client_data import DataError
from fedjax_prune.data._federated import FederatedDataset, assemble, normalize_tokens
from fedjax_prune.data._tff_h5 import read_tff_h5

LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
OOV_ID = len(LEAF_LETTERS)          # 80
VOCAB_SIZE = len(LEAF_LETTERS) + 1  # 81: 80 LEAF symbols + out-of-vocabulary
SEQ_LEN = 80

_ASCII_TO_ID = np.full(128, OOV_ID, np.uint8)
for _i, _c in enumerate(LEAF_LETTERS):
  _ASCII_TO_ID[ord(_c)] = _i
del _i, _c

_MULTI_SPACE = re.compile(" {2,}")


def encode_text(text: str) -> np.ndarray:
  """Maps characters to LEAF ids (unknown characters -> `OOV_ID`).

  Args:
    text: a string of length T.

  Returns:
    [T] uint8 ids.
  """
  codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
  ids = np.full(codes.shape, OOV_ID, np.uint8)
  ascii_ = codes < 128
  ids[ascii_] = _ASCII_TO_ID[codes[ascii_]]
  return ids


def decode_ids(ids) -> str:
  """Inverse of `encode_text`; `OOV_ID` becomes U+FFFD."""
  return "".join(LEAF_LETTERS[i] if i < OOV_ID else "\ufffd" for i in np.asarray(ids).reshape(-1).tolist())


def _window_positions(num: int, stride: int, max_windows: int | None) -> np.ndarray:
  pos = np.arange(0, max(num, 0), stride)
  if max_windows is not None and len(pos) > max_windows:
    # Evenly spaced over the whole text (deterministic, not just its beginning).
    pos = pos[np.round(np.linspace(0, len(pos) - 1, max_windows)).astype(np.int64)]
  return pos


def char_windows(ids: np.ndarray, *, seq_len: int = SEQ_LEN, stride: int = 1,
                 max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Next-character examples from one client's text.

  Window i is `ids[p_i : p_i + seq_len]` with target `ids[p_i + seq_len]`,
  p_i = 0, stride, 2*stride, ... < T - seq_len. A text of T <= seq_len
  characters gives no example.

  Args:
    ids: [T] token ids.
    seq_len: window length.
    stride: step between window starts (LEAF: 1).
    max_windows: keep at most this many windows, evenly spaced over the text.

  Returns:
    (x [W, seq_len] same dtype as ids, y [W] int32).
  """
  ids = np.asarray(ids)
  pos = _window_positions(len(ids) - seq_len, stride, max_windows)
  if len(pos) == 0:
    return np.zeros((0, seq_len), ids.dtype), np.zeros((0,), np.int32)
  view = np.lib.stride_tricks.sliding_window_view(ids, seq_len)
  return view[pos].copy(), ids[pos + seq_len].astype(np.int32)


def _leaf_line_windows(text: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """LEAF `__txt_to_data`: each line, left-padded by seq_len spaces, gives one window per character."""
  xs, ys = [], []
  for line in text.splitlines(keepends=True):
    x, y = char_windows(encode_text(" " * seq_len + line), seq_len=seq_len)
    xs.append(x)
    ys.append(y)
  if not xs:
    return np.zeros((0, seq_len), np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(xs), np.concatenate(ys)


def client_text(snippets: Sequence[str], *, separator: str = "\n", collapse_spaces: bool = True) -> str:
  """Joins one client's snippets; LEAF collapses runs of 2+ spaces into one."""
  text = separator.join(snippets)
  return _MULTI_SPACE.sub(" ", text) if collapse_spaces else text


def decode_snippets(path: str, raw: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, list[str]]:
  """client -> {'snippets': byte strings} (as read from HDF5) -> client -> list of str."""
  out = {}
  for cid, row in raw.items():
    try:
      out[cid] = [s.decode("utf-8") for s in np.asarray(row["snippets"]).reshape(-1)]
    except (UnicodeDecodeError, AttributeError) as e:
      raise DataError(f"{path}: client {cid!r} field 'snippets' must hold UTF-8 byte strings: {e}") from e
  return out


def shakespeare_from_snippets(train: Mapping[str, Sequence[str]],
                              test: Mapping[str, Sequence[str]] | None = None, *,
                              seq_len: int = SEQ_LEN, stride: int = 1,
                              max_windows_per_client: int | None = None,
                              separator: str = "\n", collapse_spaces: bool = True,
                              pad_lines: bool = False, empty_clients: str = "drop",
                              include_test_only_clients: bool = False,
                              max_padded_bytes: int | None = 2**31,
                              source: str = "shakespeare") -> FederatedDataset:
  """Builds the next-character task from per-client snippets.

  Args:
    train: client id -> list of snippet strings (train split).
    test: the same for the test split (clients matched by id), or None.
    seq_len: input window length (LEAF: 80).
    stride: step between window starts (LEAF: 1).
    max_windows_per_client: cap per client and split; keeps evenly spaced windows.
    separator: string placed between a client's snippets.
    collapse_spaces: replace runs of 2+ spaces by one (LEAF does).
    pad_lines: LEAF's own `__txt_to_data` recipe instead of windows over the
      joined text: every line is left-padded with `seq_len` spaces, so each of
      its characters (including the final newline) is one target and windows
      never cross lines; no client is then empty.
    empty_clients: "drop" (warn), "error" or "keep" for clients whose train
      text is too short for one window (72 of 715 TFF clients at seq_len=80).
    include_test_only_clients: append clients with test but no train snippets as test rows.
    max_padded_bytes: raise instead of allocating padded x larger than this (None: no limit).
    source: names the data in messages.

  Returns:
    FederatedDataset with x [N, E, seq_len] uint8 ids, y [N, E] int32 in
    [0, VOCAB_SIZE), num_classes = VOCAB_SIZE, normalize_fn = normalize_tokens.
  """
  if seq_len < 1 or stride < 1:
    raise ValueError(f"seq_len={seq_len}, stride={stride}: both must be >= 1")
  if max_windows_per_client is not None and max_windows_per_client < 1:
    raise ValueError(f"max_windows_per_client={max_windows_per_client}: must be >= 1 or None")

  def windows(snippets):
    text = client_text(snippets, separator=separator, collapse_spaces=collapse_spaces)
    if pad_lines:
      x, y = _leaf_line_windows(text, seq_len)
      pos = _window_positions(len(y), stride, max_windows_per_client)
      return x[pos], y[pos]
    return char_windows(encode_text(text), seq_len=seq_len, stride=stride, max_windows=max_windows_per_client)

  def table(split, raw):
    out = {}
    for cid in sorted(raw):
      snippets = raw[cid]
      if isinstance(snippets, str):
        raise ValueError(f"{source}: client {cid!r} ({split}) snippets must be a list of strings, got one str")
      out[cid] = windows(snippets)
      if split == "train" and empty_clients == "error" and len(out[cid][1]) == 0:
        # Name the cause: one window needs seq_len characters plus the target after them.
        chars = len(client_text(snippets, separator=separator, collapse_spaces=collapse_spaces))
        raise DataError(f"{source}: client {cid!r} (train) has {chars} characters, fewer than one "
                        f"window needs (seq_len + 1 = {seq_len + 1}), so zero train examples; pass "
                        "empty_clients='drop' or 'keep', a smaller seq_len, or pad_lines=True")
    return out

  train_t = table("train", train)
  test_t = table("test", test) if test is not None else None
  if max_padded_bytes is not None:
    for split, t in (("train", train_t), ("test", test_t or {})):
      if t:
        need = len(t) * max(len(y) for _, y in t.values()) * seq_len
        if need > max_padded_bytes:
          raise ValueError(f"{source}: padded {split} inputs would take {need / 2**30:.1f} GiB "
                           f"(> max_padded_bytes={max_padded_bytes}); pass max_windows_per_client "
                           "or a larger stride (or max_padded_bytes=None)")
  test_only = ([c for c in test_t if c not in train_t]
               if (test_t is not None and include_test_only_clients) else [])
  recipe = "LEAF line padding" if pad_lines else f"windows over snippets joined by {separator!r}"
  cap = f", at most {max_windows_per_client} per client" if max_windows_per_client else ""
  desc = (f"Shakespeare next-character ({source}): {len(train_t)} roles in the source, seq_len {seq_len}, "
          f"stride {stride}{cap}, {recipe}; LEAF 80-letter vocabulary + OOV id {OOV_ID}")
  return assemble(train_t, test_t, num_classes=VOCAB_SIZE, input_shape=(seq_len,), description=desc,
                  normalize_fn=normalize_tokens, empty_clients=empty_clients, source=source,
                  test_only=test_only)


def load_shakespeare(directory: str | os.PathLike, *, seq_len: int = SEQ_LEN, stride: int = 1,
                     max_windows_per_client: int | None = None, separator: str = "\n",
                     collapse_spaces: bool = True, pad_lines: bool = False,
                     empty_clients: str = "drop", max_padded_bytes: int | None = 2**31) -> FederatedDataset:
  """Loads TFF's Shakespeare files (`shakespeare_train.h5`, `shakespeare_test.h5`).

  Args:
    directory: folder holding both files (e.g. `../shared/data/shakespeare`).
    seq_len, stride, max_windows_per_client, separator, collapse_spaces,
    pad_lines, empty_clients, max_padded_bytes: see `shakespeare_from_snippets`.

  Returns:
    FederatedDataset (see `shakespeare_from_snippets`).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Shakespeare directory not found: {directory}")
  splits = {}
  for split in ("train", "test"):
    path = os.path.join(directory, f"shakespeare_{split}.h5")
    splits[split] = decode_snippets(path, read_tff_h5(path, fields=("snippets",)))
  return shakespeare_from_snippets(splits["train"], splits["test"], seq_len=seq_len, stride=stride,
                                   max_windows_per_client=max_windows_per_client, separator=separator,
                                   collapse_spaces=collapse_spaces, pad_lines=pad_lines,
                                   empty_clients=empty_clients, max_padded_bytes=max_padded_bytes,
                                   source=directory)

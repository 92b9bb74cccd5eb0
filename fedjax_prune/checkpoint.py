"""Checkpoints: an orbax-saved state pytree plus JSON meta, written atomically.

`Checkpointer(directory, keep=3)` implements the experiments' checkpoint protocol
(`experiments/runtime.py`):

  save(step, state, meta)             state: any pytree of arrays (server state with
                                      optimizer state and masks, round index, typed
                                      PRNG keys); meta: JSON (spec, config, host state)
  restore(template_fn) -> (step, state, meta) | None

On disk, one directory per checkpoint::

  <directory>/step_00000010/state/      orbax PyTree checkpoint of the leaves
  <directory>/step_00000010/meta.json   {"step", "meta", "manifest"}

`manifest` lists every leaf: its pytree path, shape, dtype, CRC32 and, for typed
PRNG keys, the key implementation (keys are stored as `jax.random.key_data` and
re-wrapped with `jax.random.wrap_key_data`).

Preemption safety: a checkpoint is written into a hidden temporary directory
(`.tmp-step_...`) and made visible with one `os.rename`, which is atomic on POSIX
file systems, so a kill at any moment leaves either the previous checkpoint or the
new one; leftover temporaries are ignored and removed by the next save (a save that
fails, disk full included, removes its own). Old checkpoints are first renamed away
(`.del-...`) and then deleted, so a kill while pruning never leaves a half-deleted
`step_*` directory.

Restore reads `meta.json` first and calls `template_fn(meta)` for the state's
structure (shapes may depend on meta, e.g. a structured-pruning width spec), then
checks the template against the manifest and only then reads the arrays; every
leaf's CRC32 is verified. Any mismatch or unreadable file raises `CheckpointError`
naming the file, the leaf by its pytree path (`params/dense_0/kernel`) and the problem.

This module does host-side I/O only; nothing here is jitted.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import zlib
from typing import Any, Callable

import jax
import numpy as np

_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"
_DEL_PREFIX = ".del-"
_META = "meta.json"
_STATE = "state"
_FORMAT = 1


class CheckpointError(RuntimeError):
  """A checkpoint is corrupt, unreadable or does not match the run (names the file)."""


# What to do about it (appended to the messages).
_FIX_CORRUPT = ("; delete that checkpoint directory to resume from the one before, or start over "
                "(--overwrite)")
_FIX_MISMATCH = ("; resume with the config the checkpoint was saved with, or start over "
                 "(--overwrite)")


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _jsonable(x):
  """JSON for numpy/jax values in meta (drivers often hand in np.float32 scalars)."""
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"checkpoint meta is not JSON serialisable: {type(x).__name__}")


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, f"{_PREFIX}{step:08d}")


def _leaf_name(keystr_path: str) -> str:
  """A leaf's pytree path as messages show it: "['params']['dense_0']['kernel']" (or
  ".params['dense_0']['kernel']", "[0]") -> 'params/dense_0/kernel'."""
  parts = re.findall(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]", keystr_path)
  return "/".join(a or b or c for a, b, c in parts) or keystr_path


# tensorstore (under orbax) reports OS failures as ValueError('RESOURCE_EXHAUSTED: ...
# [os_error_code=28]'), not OSError.
_STATUS_ERRNO = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "PERMISSION_DENIED": errno.EACCES}


def _os_errno(e: BaseException) -> int | None:
  """The errno behind an OS failure, whether raised as OSError or by tensorstore."""
  if isinstance(e, OSError):
    return e.errno
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return int(code.group(1))
  return next((n for status, n in _STATUS_ERRNO.items() if text.startswith(status)), None)


def _remove_settled(path: str, *, settle_s: float = 0.2, timeout_s: float = 2.0) -> None:
  """Removes the directory `path`, and again while writes still in flight recreate it.

  When one array write of an orbax save fails (disk full), orbax raises at once while
  tensorstore's other writes go on in its threads and recreate their directories.
  """
  shutil.rmtree(path, ignore_errors=True)
  deadline = quiet_since = time.monotonic()
  deadline += timeout_s
  while time.monotonic() < deadline and time.monotonic() - quiet_since < settle_s:
    time.sleep(0.02)
    if os.path.exists(path):
      shutil.rmtree(path, ignore_errors=True)
      quiet_since = time.monotonic()


def _fsync_dir(path: str) -> None:
  """Makes a rename inside `path` durable (best effort: not every FS supports it)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _leaf_entries(state: Any) -> tuple[list[dict], dict[str, np.ndarray]]:
  """(manifest, {name: host array}) for the leaves of `state`, keys as key data."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  manifest, arrays = [], {}
  for i, (path, leaf) in enumerate(leaves):
    entry = {"path": jax.tree_util.keystr(path)}
    if _is_key(leaf):
      entry["key_impl"] = str(jax.random.key_impl(leaf))
      leaf = jax.random.key_data(leaf)
    host = np.asarray(jax.device_get(leaf))
    name = f"leaf_{i:05d}"
    entry.update(name=name, shape=list(host.shape), dtype=host.dtype.name,
                 crc32=zlib.crc32(np.ascontiguousarray(host).tobytes()))
    manifest.append(entry)
    arrays[name] = host
  return manifest, arrays


def _template_entries(template: Any) -> tuple[list[dict], Any]:
  """Expected manifest (paths, shapes, dtypes, key impls) of a template pytree, and its treedef."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  expected = []
  for path, leaf in leaves:
    entry = {"path": jax.tree_util.keystr(path)}
    if _is_key(leaf):
      # A ShapeDtypeStruct has no key_impl(); its dtype names the implementation.
      entry["key_impl"] = (str(jax.random.key_impl(leaf)) if isinstance(leaf, jax.Array)
                           else leaf.dtype._impl.name)
      shape = jax.eval_shape(jax.random.key_data, leaf)
      entry.update(shape=list(shape.shape), dtype=np.dtype(shape.dtype).name)
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      entry.update(shape=list(leaf.shape), dtype=np.dtype(leaf.dtype).name)
    else:
      host = np.asarray(leaf)
      entry.update(shape=list(host.shape), dtype=host.dtype.name)
    expected.append(entry)
  return expected, treedef


class Checkpointer:
  """Orbax checkpointer of a state pytree + JSON meta, atomic, keeping the last `keep`.

  Args:
    directory: where checkpoints live (created on the first save).
    keep: number of most recent checkpoints to keep (>= 1).
    pause_mid_save_s: sleep this long after the arrays are written and before the
      checkpoint is published (a test hook to kill a run during a save).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2)
    >>> ckpt.save(3, {"w": jnp.ones(2)}, {"note": "x"})
    >>> step, state, meta = ckpt.restore(lambda meta: {"w": jnp.zeros(2)})
    >>> step, state["w"].tolist(), meta
    (3, [1.0, 1.0], {'note': 'x'})
  """

  def __init__(self, directory: str, keep: int = 3, *, pause_mid_save_s: float = 0.0):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    self.directory = os.fspath(directory)
    self.keep = keep
    self.pause_mid_save_s = pause_mid_save_s

  # -- listing ---------------------------------------------------------------

  def steps(self) -> list[int]:
    """Steps of the published checkpoints, ascending (temporaries are ignored)."""
    if not os.path.isdir(self.directory):
      return []
    out = []
    for name in os.listdir(self.directory):
      if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit():
        out.append(int(name[len(_PREFIX):]))
    return sorted(out)

  def latest_path(self) -> str | None:
    steps = self.steps()
    return _step_dir(self.directory, steps[-1]) if steps else None

  def _remove_leftovers(self) -> None:
    """Deletes temporaries of interrupted saves and prunes (both never visible as step_*)."""
    for name in os.listdir(self.directory):
      if name.startswith((_TMP_PREFIX, _DEL_PREFIX)):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  # -- save ------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves `state` and `meta` as checkpoint `step`, atomically; prunes to the last `keep`.

    Raises:
      OSError naming the directory when it cannot be written (disk full, permissions;
      also when orbax reports it as another error); the previous checkpoints are left
      untouched and the temporary directory removed, whatever the failure.
    """
    import orbax.checkpoint as ocp  # heavy import, only when checkpointing

    step = int(step)
    manifest, arrays = _leaf_entries(state)
    record = {"format": _FORMAT, "step": step, "meta": meta, "manifest": manifest}
    # Fails early (TypeError) if meta is not JSON; numpy/jax scalars and arrays are converted.
    meta_text = json.dumps(record, indent=1, sort_keys=True, default=_jsonable)
    tmp = os.path.join(self.directory, f"{_TMP_PREFIX}{_PREFIX}{step:08d}-{os.getpid()}")
    try:
      os.makedirs(self.directory, exist_ok=True)
      self._remove_leftovers()
      if os.path.exists(tmp):
        shutil.rmtree(tmp)
      os.makedirs(tmp)
      if arrays:
        ocp.PyTreeCheckpointer().save(os.path.abspath(os.path.join(tmp, _STATE)), arrays)
      if self.pause_mid_save_s:
        time.sleep(self.pause_mid_save_s)  # test hook: a kill now must leave the old checkpoint
      with open(os.path.join(tmp, _META), "w") as f:
        f.write(meta_text)
        f.flush()
        os.fsync(f.fileno())
      final = _step_dir(self.directory, step)
      if os.path.exists(final):  # re-saving a step (a resumed run): move the old one away first
        os.rename(final, os.path.join(self.directory, f"{_DEL_PREFIX}{os.path.basename(final)}"))
      os.rename(tmp, final)  # the commit point
      _fsync_dir(self.directory)
      for old in self.steps()[:-self.keep]:
        doomed = os.path.join(self.directory, f"{_DEL_PREFIX}{_PREFIX}{old:08d}")
        os.rename(_step_dir(self.directory, old), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
      self._remove_leftovers()
    except BaseException as e:  # also orbax's errors and KeyboardInterrupt: no temporary left
      _remove_settled(tmp)
      code = _os_errno(e)
      if code is None:
        raise
      reason = e.strerror if isinstance(e, OSError) and e.strerror else os.strerror(code)
      raise OSError(code, f"cannot save checkpoint {step} in {self.directory!r}: {reason}") from e

  # -- restore ---------------------------------------------------------------

  def read_meta(self, path: str) -> dict:
    """The `meta.json` record of the checkpoint directory `path` (raises CheckpointError)."""
    meta_path = os.path.join(path, _META)
    try:
      with open(meta_path) as f:
        record = json.load(f)
    except FileNotFoundError:
      raise CheckpointError(f"checkpoint {path!r} is corrupt: {_META} is missing"
                            f"{_FIX_CORRUPT}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"checkpoint file {meta_path!r} is corrupt or unreadable: {e}"
                            f"{_FIX_CORRUPT}") from None
    if not isinstance(record, dict) or not {"step", "meta", "manifest"} <= set(record):
      raise CheckpointError(f"checkpoint file {meta_path!r} is corrupt: expected the keys "
                            f"'step', 'meta' and 'manifest'{_FIX_CORRUPT}")
    if record.get("format") != _FORMAT:
      raise CheckpointError(f"checkpoint file {meta_path!r} has format {record.get('format')!r}, "
                            f"this version reads format {_FORMAT}")
    return record

  def latest_meta(self) -> dict | None:
    """The JSON meta saved with the latest checkpoint (no arrays read), or None."""
    path = self.latest_path()
    return None if path is None else self.read_meta(path)["meta"]

  def restore(self, template_fn: Callable[[dict], Any]) -> tuple[int, Any, dict] | None:
    """The latest checkpoint as (step, state, meta), or None when there is none.

    Args:
      template_fn: `template_fn(meta) -> pytree` with the state's structure, shapes
        and dtypes (arrays or `jax.ShapeDtypeStruct`s; typed key leaves for keys).

    Raises:
      CheckpointError naming the file and the mismatch when the checkpoint is
      corrupt or does not fit the template.
    """
    path = self.latest_path()
    if path is None:
      return None
    record = self.read_meta(path)
    meta_path = os.path.join(path, _META)
    try:
      template = template_fn(record["meta"])
    except CheckpointError as e:  # the driver found meta incompatible (e.g. another spec)
      raise CheckpointError(f"checkpoint {meta_path!r} does not match this run: {e}"
                            f"{_FIX_MISMATCH}") from None
    expected, treedef = _template_entries(template)
    manifest = record["manifest"]
    self._check_manifest(meta_path, manifest, expected)
    arrays = self._read_arrays(path, manifest)
    leaves = []
    for entry, like in zip(manifest, jax.tree_util.tree_leaves(template)):
      host = arrays[entry["name"]]
      if zlib.crc32(np.ascontiguousarray(host).tobytes()) != entry["crc32"]:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: leaf {_leaf_name(entry['path'])} "
                              f"fails its CRC32 check{_FIX_CORRUPT}")
      # Device arrays where the template has them; host (numpy) leaves keep their dtype
      # (jnp.asarray would turn a float64 into float32 without x64).
      is_host = isinstance(like, (np.ndarray, np.generic, int, float, bool))
      leaf = host if is_host else jax.numpy.asarray(host)
      if "key_impl" in entry:
        leaf = jax.random.wrap_key_data(leaf, impl=entry["key_impl"])
      leaves.append(leaf)
    return int(record["step"]), jax.tree_util.tree_unflatten(treedef, leaves), record["meta"]

  @staticmethod
  def _check_manifest(meta_path: str, manifest: list, expected: list) -> None:
    if len(manifest) != len(expected):
      saved = {e["path"] for e in manifest}
      wanted = {e["path"] for e in expected}
      detail = (f"missing {sorted(map(_leaf_name, wanted - saved))[:3]}, "
                f"unexpected {sorted(map(_leaf_name, saved - wanted))[:3]}"
                if saved != wanted else "")
      raise CheckpointError(f"checkpoint {meta_path!r} does not match this run: it has "
                            f"{len(manifest)} arrays, the run's state has {len(expected)} {detail}"
                            f"{_FIX_MISMATCH}")
    for saved, want in zip(manifest, expected):
      for field in ("path", "shape", "dtype", "key_impl"):
        if saved.get(field) != want.get(field):
          raise CheckpointError(
              f"checkpoint {meta_path!r} does not match this run: leaf {_leaf_name(want['path'])} "
              f"has {field} {saved.get(field)!r} in the checkpoint but {want.get(field)!r} in the "
              f"run (a different model/spec or config?){_FIX_MISMATCH}")

  @staticmethod
  def _read_arrays(path: str, manifest: list) -> dict[str, np.ndarray]:
    if not manifest:
      return {}
    import orbax.checkpoint as ocp

    state_path = os.path.abspath(os.path.join(path, _STATE))
    if not os.path.isdir(state_path):
      raise CheckpointError(f"checkpoint {path!r} is corrupt: the array directory {_STATE}/ "
                            f"is missing{_FIX_CORRUPT}")
    restore_args = {e["name"]: ocp.RestoreArgs(restore_type=np.ndarray) for e in manifest}
    try:
      arrays = ocp.PyTreeCheckpointer().restore(
          state_path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      # Their messages name the stored leaf_00001: say which pytree leaf that is.
      names = {m["name"]: _leaf_name(m["path"]) for m in manifest}
      text = re.sub(r"leaf_\d{5}", lambda m: names.get(m.group(0), m.group(0)), str(e))
      damaged = [names[n] for n in dict.fromkeys(re.findall(r"leaf_\d{5}", str(e))) if n in names]
      which = f" (leaf {', '.join(damaged)})" if damaged else ""
      text = text if len(text) <= 300 else text[:300] + "..."
      raise CheckpointError(f"checkpoint arrays in {state_path!r} are corrupt or unreadable"
                            f"{which}: {type(e).__name__}: {text}{_FIX_CORRUPT}") from e
    for e in manifest:
      host = arrays.get(e["name"]) if isinstance(arrays, dict) else None
      if host is None or list(np.shape(host)) != e["shape"] or np.asarray(host).dtype.name != e["dtype"]:
        raise CheckpointError(f"checkpoint {state_path!r} is corrupt: leaf {_leaf_name(e['path'])} "
                              f"is missing or has the wrong shape/dtype{_FIX_CORRUPT}")
    return {k: np.asarray(v) for k, v in arrays.items()}


def read_arrays(directory: str) -> tuple[int, dict[str, np.ndarray], dict] | None:
  """The latest checkpoint in `directory` without a template, for inspection and tests.

  Returns:
    (step, {leaf path: host array (PRNG keys as key data)}, meta), or None when
    there is no checkpoint. Raises CheckpointError like `Checkpointer.restore`.
  """
  ckpt = Checkpointer(directory)
  path = ckpt.latest_path()
  if path is None:
    return None
  record = ckpt.read_meta(path)
  arrays = ckpt._read_arrays(path, record["manifest"])
  return (int(record["step"]), {e["path"]: arrays[e["name"]] for e in record["manifest"]},
          record["meta"])

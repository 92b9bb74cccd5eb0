"""A run's workdir: its lock, what a resume may change, which metrics records survive a resume.

A resume may also extend a run to a larger `config.rounds` (`train.check_workdir`): the
records of its rounds are kept, the last one without the evaluation that ran only
because it was the last round (`without_evaluation`).

Everything here reads, except `lock`, which `train.train_and_evaluate` takes only
after every check that can refuse the run has passed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Any, Callable, Iterator

LOCK_FILE = "run.lock"

# Config fields that do not change a run's results (logging, evaluation and checkpoint
# cadence, where calibrations are cached): a resume may change them.
RESULT_NEUTRAL_FIELDS = ("progress", "tensorboard", "eval_every", "checkpoint_every",
                         "checkpoint_keep", "strategy_cache")


class WorkdirError(RuntimeError):
  """The workdir cannot take this run (the message names the workdir, the problem and the fix)."""


class WorkdirInUseError(WorkdirError):
  """Another live run holds the workdir's lock."""


# -- the lock --------------------------------------------------------------------------
#
# fcntl.flock rather than an O_EXCL-created file plus a pid check: the kernel drops a
# flock when its holder dies, kill -9 included, so a lock left by a dead run is never
# mistaken for a live one (pid checks cannot see a pid reused by another process, nor
# one on another host). Linux NFS clients map flock onto NFS byte-range locks, which
# the server arbitrates between hosts. The file's JSON (pid, host) only names the
# holder in the refusal; where a file system refuses flock (ENOLCK, EOPNOTSUPP), that
# pid is the lock: alive on this host, or on another host, means in use.

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_RETRIES, _RETRY_S = 20, 0.05  # rides out another run's read-only probe (`check_not_locked`)


def _holder(fd: int) -> dict:
  """The JSON {pid, host} in the lock file (empty if none or unreadable)."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    holder = json.loads(os.read(fd, 4096).decode() or "{}")
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _alive_elsewhere(holder: dict) -> bool:
  """Without flock: whether the holder named in the file may still run."""
  if not holder.get("pid"):
    return False
  if holder.get("host") != socket.gethostname():
    return True  # cannot be checked from here
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, OverflowError):
    return True  # another user's process (or a garbled pid: be safe)
  return True


def _in_use(workdir: str, holder: dict) -> WorkdirInUseError:
  who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
  return WorkdirInUseError(
      f"workdir {workdir!r} is in use by another run ({who}, lock file "
      f"{os.path.join(workdir, LOCK_FILE)!r}); wait for it to end or choose another --workdir")


def check_not_locked(workdir: str) -> None:
  """Raises WorkdirInUseError if a live run holds `workdir`'s lock; writes nothing."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDONLY)
  except (FileNotFoundError, NotADirectoryError):
    return
  try:
    try:
      # A shared lock conflicts only with the holder's exclusive one; released at once.
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      raise _in_use(workdir, _holder(fd)) from None
    except OSError as e:
      if e.errno not in _UNSUPPORTED:
        raise
      holder = _holder(fd)
      if _alive_elsewhere(holder) and holder.get("pid") != os.getpid():
        raise _in_use(workdir, holder) from None
  finally:
    os.close(fd)


@contextlib.contextmanager
def lock(workdir: str, log: Callable[[str], None] = print) -> Iterator[None]:
  """Holds `workdir`'s lock (creating the workdir) while the block runs; removes it after.

  Raises:
    WorkdirInUseError naming the holder when a live run holds it. A lock left by a
    run that died (kill -9, a crash) is taken over, and `log` says so.
  """
  path = os.path.join(workdir, LOCK_FILE)
  created = not os.path.isdir(workdir)
  fd = None
  try:
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = _acquire(workdir, path, log)
    except OSError as e:
      raise OSError(e.errno, f"cannot write to workdir {workdir!r}: {e.strerror or e}") from e
    yield
  finally:
    if fd is not None:
      # Unlink while still holding the lock: a run that opened the old file meanwhile
      # finds it unlinked after its flock and starts over (`_acquire`).
      with contextlib.suppress(OSError):
        os.remove(path)
      os.close(fd)
    if created:  # a run that failed before writing anything leaves no empty workdir
      with contextlib.suppress(OSError):
        os.rmdir(workdir)


def _acquire(workdir: str, path: str, log) -> int:
  for attempt in range(_RETRIES):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      flocked = True
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      if attempt + 1 == _RETRIES:
        raise _in_use(workdir, holder) from None
      time.sleep(_RETRY_S)
      continue
    except OSError as e:
      if e.errno not in _UNSUPPORTED:
        os.close(fd)
        raise
      flocked = False
    try:
      same_file = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same_file = False
    if not same_file:  # its holder released (unlinked) it between our open and flock
      os.close(fd)
      continue
    previous = _holder(fd)
    if not flocked and _alive_elsewhere(previous) and previous.get("pid") != os.getpid():
      os.close(fd)
      raise _in_use(workdir, previous)
    if previous.get("pid"):
      log(f"took over the lock of a run that is no longer running (pid {previous['pid']} on "
          f"host {previous.get('host', '?')})")
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, me, 0)
    except OSError:
      os.close(fd)
      with contextlib.suppress(OSError):
        os.remove(path)
      raise
    return fd
  raise _in_use(workdir, {})


# -- what a resume may change ------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "config") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}"))
  return out


def config_differences(saved: dict, now: dict, defaults: dict[str, Any]) -> list[str]:
  """The fields that differ between two config JSONs, as 'config.a.b: X in the workdir, Y now'.

  Fields absent from one side count as their `defaults` (top-level names); the
  RESULT_NEUTRAL_FIELDS are ignored.
  """
  a = _flatten({**defaults, **saved})
  b = _flatten({**defaults, **now})
  neutral = {f"config.{name}" for name in RESULT_NEUTRAL_FIELDS}
  missing = "absent"
  out = []
  for path in sorted(set(a) | set(b)):
    if path in neutral or a.get(path, missing) == b.get(path, missing):
      continue
    out.append(f"{path}: {json.dumps(a[path]) if path in a else missing} in the workdir, "
               f"{json.dumps(b[path]) if path in b else missing} now")
  return out


# -- metrics records on resume -------------------------------------------------------------


def rounds_only_difference(saved: dict, now: dict, defaults: dict[str, Any]) -> int | None:
  """The saved config's `rounds` when it is the one result-changing field in which `now`
  differs from `saved` (see `config_differences`), else None."""
  rounds = saved.get("rounds")
  if (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds == now.get("rounds")
      or config_differences({**saved, "rounds": now.get("rounds")}, now, defaults)):
    return None
  return rounds


# `train.run_method` writes a record's fields in this order: the round's own (training
# metrics, the method's record), then `round`, `wall_time`, (config.privacy) `dp_epsilon`
# and `dp_epsilon_fixed_cohort`, (ASP's noised client votes) `vote_epsilon` and
# `vote_epsilon_fixed_cohort`, (Poisson cohorts) `cohort_dropped`, then, on evaluation
# rounds, the evaluation's. So everything after the last of these is evaluation.
_BEFORE_EVALUATION = ("wall_time", "dp_epsilon", "dp_epsilon_fixed_cohort", "vote_epsilon",
                      "vote_epsilon_fixed_cohort", "cohort_dropped")


def without_evaluation(record: dict) -> dict:
  """`record` (a metrics record, fields in the order written) without its evaluation's
  fields. Raises ValueError for a record without `wall_time`."""
  keys = list(record)
  if "wall_time" not in record:
    raise ValueError(f"metrics record of round {record.get('round')!r} has no 'wall_time'")
  end = max(keys.index(k) for k in _BEFORE_EVALUATION if k in record) + 1
  return {k: record[k] for k in keys[:end]}


def metrics_up_to(path: str, num_rounds: int, *, drop_last_evaluation: bool = False
                  ) -> tuple[list[str], int | None]:
  """The lines of a metrics.jsonl to keep when a run resumes after round `num_rounds`.

  Keeps every record of rounds 1..num_rounds; drops what follows (records the resumed
  run writes again, and a last line cut short by a kill). With `drop_last_evaluation`,
  the record of round `num_rounds` loses its evaluation's fields (`without_evaluation`):
  a run extended past its last round, which it evaluated only for being the last.

  Returns:
    (kept lines, each ending in a newline; the 1-based number of the first line that is
    not a JSON record while rounds up to `num_rounds` may still follow it, or None).
    Such a line may hide a record the checkpoint covers, so a resume must not drop it.
  """
  if not os.path.exists(path):
    return [], None
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.readlines()
  kept, last_round = [], 0
  for number, line in enumerate(lines, start=1):
    try:
      record = json.loads(line)
      round_idx = int(record["round"])
    except (ValueError, TypeError, KeyError):
      if last_round >= num_rounds:
        break  # after the checkpoint's records: the resumed run writes these again
      return kept, number
    if round_idx > num_rounds:
      break
    if drop_last_evaluation and round_idx == num_rounds:
      line = json.dumps(without_evaluation(record))
    kept.append(line if line.endswith("\n") else line + "\n")
    last_round = round_idx
  return kept, None

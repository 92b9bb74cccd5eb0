"""Atomic file writes shared by the library (strategy cache) and the experiments (workdirs)."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, TextIO


def write_atomic(path: str, write: Callable[[TextIO], None]) -> None:
  """Writes a text file through a temporary file in its directory and a rename.

  Readers see the old file or the new one, never half of one; a `write` that raises
  leaves no temporary file behind. The file gets the mode `open(path, 'w')` would
  give (0666 minus the umask), not mkstemp's 0600, so others sharing the directory
  can read it.

  Args:
    path: the file to (re)place; its directory must exist.
    write: `write(f)` writes the contents to the open text file `f`.
  """
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    with os.fdopen(fd, "w") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

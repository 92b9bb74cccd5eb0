"""Runs one experiment from an ml_collections config.

  python -m experiments.main --config experiments/configs/fedavg_synthetic.py \
      --workdir /tmp/run --config.rounds=5
  python -m experiments.main --config ... --workdir /tmp/run --resume   # after a kill (or always)
  python -m experiments.main --config ... --workdir /tmp/run --resume --config.rounds=600  # extend

Every anticipated failure (a flag or config value, a data file, the workdir, a
checkpoint, the disk, a diverged run) prints one line naming the problem and the fix
and exits with status 2, having written nothing where the run was refused;
`--traceback` shows where it was raised.
"""
import errno
import logging as std_logging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import build, train, workdir
from fedjax_prune import checkpoint, data

EXIT_REFUSED = 2
# What a user fixes (a config value, a data file, the workdir, a checkpoint, the disk, the
# learning rates): the message names the problem, so it is printed without a traceback.
USER_ERRORS = (build.ConfigError, data.DataError, checkpoint.CheckpointError, workdir.WorkdirError,
               OSError, FloatingPointError)
_DISK_FULL = "free some space (or choose a --workdir on another disk), then rerun with --resume"
_NOT_WRITABLE = "choose a --workdir you may write to, or fix its permissions"
_FIXES = {errno.ENOSPC: _DISK_FULL, errno.EDQUOT: _DISK_FULL, errno.EACCES: _NOT_WRITABLE,
          errno.EPERM: _NOT_WRITABLE, errno.EROFS: "choose a --workdir on a writable file system"}


def define_flags(flag_values: flags.FlagValues, sys_argv: list[str] | None = None) -> None:
  """Defines this tool's flags on `flag_values` (`sys_argv`: where --config.* overrides are
  read, default sys.argv; tests pass a fresh FlagValues and their argv)."""
  config_flags.DEFINE_config_file("config", "experiments/configs/fedavg_synthetic.py",
                                  "Experiment config file.", flag_values=flag_values,
                                  lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", "workdir/fedavg_synthetic", "Where metrics and results go.",
                      flag_values=flag_values)
  flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds another run.",
                    flag_values=flag_values)
  flags.DEFINE_bool("resume", False, "Continue the run in workdir from its latest checkpoint "
                    "(from round 0 when it has none); with a larger --config.rounds, extend a "
                    "finished run where its method allows it.", flag_values=flag_values)
  flags.DEFINE_bool("traceback", False, "Show the Python traceback of a refused run.",
                    flag_values=flag_values)



def describe(err: BaseException) -> str:
  """One line: the error's type, its message and, for a disk or permission error, the fix."""
  text = " ".join(str(err).split())
  fix = _FIXES.get(getattr(err, "errno", None)) if isinstance(err, OSError) else None
  return f"error: {type(err).__name__}: {text}" + (f"; {fix}" if fix else "")


def _refuse(line: str) -> None:
  print(f"{line} (--traceback shows where it was raised)", file=sys.stderr)
  sys.exit(EXIT_REFUSED)


def _unknown_field(err: Exception, argv) -> str:
  """Names the `--config.<field>` override that the config does not have."""
  inner = err  # AttributeError(KeyError("'name'\nDid you mean ...")): the innermost message
  while inner.args and isinstance(inner.args[0], BaseException):
    inner = inner.args[0]
  message = str(inner.args[0]) if inner.args else str(inner)
  names = re.findall(r"'([^']+)'", message)
  name = names[0] if names else "?"
  overrides = [a.lstrip("-").split("=", 1)[0] for a in argv if a.startswith("--config.")]
  field = next((o for o in overrides if name in o.split(".")[1:]), f"config.{name}")
  hint = re.search(r"Did you mean \"([^\"]+)\"", message)
  return (f"error: unknown config field: --{field}: the config has no field {name!r}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
          + "; fix the spelling, or add the field to the config file")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, with its errors (an unknown flag or config field, a value of the
  wrong type) as one line and exit status 2 instead of a traceback."""
  wants_traceback = any(a in ("--traceback", "--traceback=true", "--traceback=True") for a in argv)
  try:
    return flag_values(argv)
  except flags.Error as err:
    if wants_traceback:
      raise
    _refuse(f"error: {' '.join(str(err).split())}")
  except (AttributeError, KeyError) as err:  # ml_collections: an override of a missing field
    if wants_traceback:
      raise
    _refuse(_unknown_field(err, argv))


def run(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs the experiment the parsed flags describe; refuses (exit 2) with one line."""
  if flag_values.resume and flag_values.overwrite:
    _refuse("error: --resume and --overwrite exclude each other: --resume continues the run in "
            "the workdir, --overwrite deletes it; pass one of them")
  config = flag_values.config
  try:
    config.keys()  # ml_collections defers the error of a config file that failed to load
  except OSError as err:
    if flag_values.traceback:
      raise
    reason = str(err.__cause__ or err).strip().splitlines()[-1].strip()
    _refuse(f"error: cannot load the config file "
            f"{config_flags.get_config_filename(flag_values['config'])!r}: {reason}")
  try:
    return train.train_and_evaluate(config, flag_values.workdir, overwrite=flag_values.overwrite,
                                    resume=flag_values.resume)
  except USER_ERRORS as err:
    if flag_values.traceback:
      raise
    _refuse(describe(err))


def _report_save_failures_once() -> None:
  """A failed orbax save (disk full) is reported once, by `run`: orbax first logs it with
  its traceback, and its other concurrent writes fail after it into an asyncio loop
  that has finished (logged by asyncio, or raised where Python can only print them)."""
  logging.get_absl_logger().addFilter(
      lambda r: not (r.levelno >= std_logging.ERROR and "/orbax/" in r.pathname))
  std_logging.getLogger("asyncio").addFilter(
      lambda r: not r.getMessage().startswith("Future exception was never retrieved"))
  default_hook = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      default_hook(unraisable)

  sys.unraisablehook = hook


def main(argv):
  if len(argv) > 1:
    _refuse(f"error: unexpected arguments {argv[1:]}: flags take the form --name=value")
  logging.set_verbosity(logging.WARNING)  # hide backend-probing INFO lines (e.g. no TPU)
  if not flags.FLAGS.traceback:
    _report_save_failures_once()
  run(flags.FLAGS)


if __name__ == "__main__":
  define_flags(flags.FLAGS)  # here, not on import: the config flag loads its file when defined
  app.run(main, flags_parser=parse_flags)

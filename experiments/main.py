"""Runs one experiment from an ml_collections config.

  python -m experiments.main --config experiments/configs/fedavg_synthetic.py \
      --workdir /tmp/run --config.rounds=5
  python -m experiments.main --config ... --workdir /tmp/run --resume   # after a kill
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import build, train

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/fedavg_synthetic.py",
                                          "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/fedavg_synthetic", "Where metrics and results go.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds another run.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in workdir from its latest checkpoint.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the Python traceback of a refused config or workdir.")

# What a user fixes in the command line (a config value, the workdir, a data path): the
# message names the problem, so it is printed without a traceback (exit status 2).
USER_ERRORS = (build.ConfigError, FileExistsError, FileNotFoundError, NotADirectoryError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # hide backend-probing INFO lines (e.g. no TPU)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                             resume=_RESUME.value)
  except USER_ERRORS as err:
    if _TRACEBACK.value:
      raise
    print(f"error: {type(err).__name__}: {err}\n(--traceback shows where it was raised)",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)

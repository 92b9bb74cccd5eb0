"""Runs one experiment from an ml_collections config.

  python -m experiments.main --config experiments/configs/fedavg_synthetic.py \
      --workdir /tmp/run --config.rounds=5
  python -m experiments.main --config ... --workdir /tmp/run --resume   # after a kill
"""
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import train

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/fedavg_synthetic.py",
                                          "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/fedavg_synthetic", "Where metrics and results go.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds another run.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in workdir from its latest checkpoint.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # hide backend-probing INFO lines (e.g. no TPU)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                           resume=_RESUME.value)


if __name__ == "__main__":
  app.run(main)

"""A resumed run continues the wall clock and the strategy of the run it resumes.

Each driver's tiny run is cut back to a middle checkpoint (later checkpoints and
summary.json removed), the checkpoint's recorded `wall_time_s` is set to 1000 s,
and the run is resumed: the records after the checkpoint and the summary must
count from 1000 s (a clock restarted at 0 fails), and a run that calibrated its
strategy ('auto') must reuse the checkpoint's choice and report its timings
instead of calibrating again.
"""
import json
import os
import shutil

import pytest

from experiments import train
from experiments.configs import fedavg_tiny
from fedjax_prune import checkpoint
from tests import test_cavp_resume
from tests.test_method_contract import _records
from tests.pruning import test_hetero, test_sparse_baselines

EARLIER_TIME_S = 1000.0
RESUME_BUDGET_S = 600.0  # far above a tiny run's seconds: only a clock offset can fail it


def _fedavg():
  c = fedavg_tiny.get_config()
  c.rounds, c.eval_every, c.checkpoint_every, c.checkpoint_keep = 4, 2, 2, 4
  c.strategy = "auto"  # the resumed run must reuse the calibration's choice and timings
  return c


def _hetero():
  c = test_hetero._tiny_driver_config("fiarse")
  c.hetero.sweep = ()
  c.rounds, c.checkpoint_every, c.checkpoint_keep = 4, 2, 4
  c.strategy = "auto"
  return c


def _sparse():
  c = test_sparse_baselines.tiny_config("sparse", "feddst")
  c.checkpoint_every, c.checkpoint_keep = 2, 4
  c.strategy = "auto"
  return c


def _cavp():
  return test_cavp_resume.tiny_config()


def _cut_back(workdir, keep_step):
  """Drops checkpoints after `keep_step` and the summary; sets the kept one's clock to 1000 s."""
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  steps = checkpoint.Checkpointer(ckpt_dir).steps()
  assert keep_step in steps and max(steps) > keep_step, steps
  for step in steps:
    if step > keep_step:
      shutil.rmtree(os.path.join(ckpt_dir, f"step_{step:08d}"))
  os.remove(os.path.join(workdir, "summary.json"))
  meta_path = os.path.join(ckpt_dir, f"step_{keep_step:08d}", "meta.json")
  with open(meta_path) as f:
    record = json.load(f)
  assert record["meta"]["wall_time_s"] > 0  # the driver saved its clock
  record["meta"]["wall_time_s"] = EARLIER_TIME_S
  with open(meta_path, "w") as f:
    json.dump(record, f)
  return record["meta"]


# Every driver runs through the one experiment loop (experiments/train.py), which keeps the
# clock: the default suite checks it on FedAvg; each method's own resume (bit-exact, in
# test_method_contract.py and test_cavp_resume.py) stays in the default suite too.
@pytest.mark.parametrize("make_config", [
    _fedavg, pytest.param(_hetero, marks=pytest.mark.slow), pytest.param(_sparse, marks=pytest.mark.slow),
    pytest.param(_cavp, marks=pytest.mark.slow)], ids=["fedavg", "fiarse", "sparse", "cavp"])
def test_resumed_run_continues_the_clock(tmp_path, make_config):
  config = make_config()
  cache = tmp_path / "strategy.json"
  config.strategy_cache = str(cache)
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(config, workdir)
  assert first["wall_time_s"] < EARLIER_TIME_S
  calibrated = cache.exists()
  if calibrated:
    cache.unlink()  # a calibration on resume would write it again
  keep = 2
  meta = _cut_back(workdir, keep)
  resumed = train.train_and_evaluate(config, workdir, resume=True)
  assert not cache.exists(), "the resumed run calibrated its strategy again"

  records = _records(workdir)
  assert [r["round"] for r in records] == list(range(1, config.rounds + 1))
  assert all(r["wall_time"] < EARLIER_TIME_S for r in records[:keep])  # kept from the first run
  for r in records[keep:]:
    assert EARLIER_TIME_S <= r["wall_time"] < EARLIER_TIME_S + RESUME_BUDGET_S, r
  assert EARLIER_TIME_S <= resumed["wall_time_s"] < EARLIER_TIME_S + RESUME_BUDGET_S
  if "eval_time_s" in resumed:  # hetero: evaluation time also sums over the parts
    assert resumed["eval_time_s"] >= meta["eval_time_s"]
  if config.get("strategy") == "auto":
    assert calibrated
    assert meta["strategy"] == first["strategy"]
    assert first["strategy_timings_s"]  # the first run calibrated ...
    assert resumed["strategy"] == first["strategy"]  # ... the resumed one reuses its choice
    assert resumed["strategy_timings_s"] == first["strategy_timings_s"]

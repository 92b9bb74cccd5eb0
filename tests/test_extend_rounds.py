"""Extending a run to a larger `config.rounds` (`--resume`, `experiments.sweep`).

A run of R rounds extended to R' must equal a run that had R' rounds from the start:
the metrics records (wall times aside; the shorter run's last-round evaluation dropped
unless R' evaluates round R too), the summary (timings and this-process counters aside)
and the final checkpoint's arrays, bit for bit. Refusals (a smaller config.rounds,
another changed field, a driver whose rounds depend on config.rounds, a finished run
without its final checkpoint) name the problem and leave the workdir byte-identical.
"""
import json
import os
import shutil

import pytest

from experiments import methods, sweep, train, workdir as workdir_lib
from experiments.configs import asp_tiny, fedavg_tiny
from fedjax_prune import checkpoint
from tests.pruning.test_sparse_baselines import tiny_config as sparse_tiny
from tests.test_reliability import snapshot

OLD, NEW = 4, 6
TIMING_KEYS = ("wall_time", "wall_time_s", "setup_time_s", "eval_time_s", "strategy_timings_s")


def fedavg(rounds, **fields):
  """fedavg_tiny (evaluation and checkpoint every 3 rounds) with a one-shot prune before round 2."""
  c = fedavg_tiny.get_config()
  c.rounds = rounds
  c.prune_density, c.prune_round = 0.5, 1
  for name, value in fields.items():
    c[name] = value
  return c


def fedtiny(rounds, every=2, end=5):
  """FedTiny on the tiny MLP; its adjustment rounds (2 and 4 with every=2, end=5) straddle
  round OLD. every = end = 0 scales the schedule to config.rounds."""
  c = sparse_tiny("fedtiny")
  c.sparse.progressive = "all_layers"
  c.sparse.adjust_every, c.sparse.adjust_end = every, end
  c.rounds, c.checkpoint_every = rounds, 2
  return c


def feddst(rounds):
  c = fedtiny(rounds)
  c.method, c.sparse.method = "sparse", "feddst"
  return c


def asp(rounds, method="asp"):
  """asp_tiny (the search may prune before rounds 1-3); l1_filter prunes before round 3."""
  c = asp_tiny.get_config()
  c.method, c.l1_filter.prune_round = method, 2
  c.rounds, c.eval_every, c.checkpoint_every = rounds, 3, 2
  return c


def fiarse(rounds):
  """FIARSE on the tiny MLP, without the extra-size sweep (which is tied to the last round)."""
  from tests.test_method_contract import hetero_config
  c = hetero_config("fiarse")
  c.hetero.sweep = ()
  c.rounds, c.eval_every, c.checkpoint_every = rounds, 3, 2
  return c


def _strip(d: dict) -> str:
  return json.dumps({k: v for k, v in d.items()
                     if k not in TIMING_KEYS and not k.endswith("_this_run")}, sort_keys=True)


def _records(workdir) -> list[str]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [_strip(json.loads(line)) for line in f]


def _json(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def assert_same_run(workdir, reference, rounds=NEW):
  got, want = _records(workdir), _records(reference)
  assert len(got) == len(want) == rounds
  for r, (a, b) in enumerate(zip(got, want), start=1):
    assert a == b, f"round {r} differs"
  assert _strip(_json(workdir, "summary.json")) == _strip(_json(reference, "summary.json"))
  assert _json(workdir, "config.json") == _json(reference, "config.json")
  step, arrays, meta = checkpoint.read_arrays(os.path.join(workdir, train.CHECKPOINT_DIR))
  ref_step, ref_arrays, ref_meta = checkpoint.read_arrays(os.path.join(reference,
                                                                       train.CHECKPOINT_DIR))
  assert step == ref_step == rounds
  assert _strip(meta) == _strip(ref_meta)
  assert arrays.keys() == ref_arrays.keys() and any("params" in k for k in arrays)
  for k in arrays:
    assert arrays[k].dtype == ref_arrays[k].dtype and arrays[k].shape == ref_arrays[k].shape, k
    assert arrays[k].tobytes() == ref_arrays[k].tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Finished runs made on first use: runs(name, config_fn, rounds) -> workdir (do not write)."""
  cache = {}

  def get(name, config_fn, rounds):
    if (name, rounds) not in cache:
      workdir = str(tmp_path_factory.mktemp(name) / "run")
      train.train_and_evaluate(config_fn(rounds), workdir)
      cache[name, rounds] = workdir
    return cache[name, rounds]

  return get


def copy(src, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


# -- extended == longer from the start ---------------------------------------------------------


# A tiny run takes 2-5 s (mostly compilation): one case in the default selection.
@pytest.mark.parametrize("name,config_fn,old", [
    ("fedavg", fedavg, OLD),  # round 4 is not an evaluation round of the 6-round run: dropped
    pytest.param("fedavg", fedavg, 3, marks=pytest.mark.slow),  # round 3 is one: kept
    pytest.param("fedtiny", fedtiny, OLD, marks=pytest.mark.slow),
    pytest.param("feddst", feddst, OLD, marks=pytest.mark.slow),
    pytest.param("asp", asp, OLD, marks=pytest.mark.slow),
    pytest.param("l1_filter", lambda r: asp(r, "l1_filter"), OLD, marks=pytest.mark.slow),
    pytest.param("fiarse", fiarse, OLD, marks=pytest.mark.slow),
])
def test_extending_a_finished_run_equals_the_longer_run(runs, tmp_path, name, config_fn, old):
  workdir = copy(runs(name, config_fn, old), tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = json.loads(f.readlines()[-1])
  assert "test_accuracy" in last  # the shorter run evaluated its last round
  summary = train.train_and_evaluate(config_fn(NEW), workdir, resume=True)
  assert summary["rounds"] == NEW
  assert_same_run(workdir, runs(name, config_fn, NEW))


def test_extending_an_interrupted_run_equals_the_longer_run(runs, tmp_path):
  """Killed during round 4 of 4 (checkpoint after round 3, no summary), extended to 6."""
  workdir = copy(runs("fedavg", fedavg, OLD), tmp_path)
  shutil.rmtree(os.path.join(workdir, train.CHECKPOINT_DIR, f"step_{OLD:08d}"))
  os.remove(os.path.join(workdir, "summary.json"))
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(lines[:3] + ['{"round": 4, "train_lo'])
  train.train_and_evaluate(fedavg(NEW), workdir, resume=True)
  assert_same_run(workdir, runs("fedavg", fedavg, NEW))


def test_a_sweep_with_more_rounds_extends_its_finished_runs(runs, tmp_path):
  one_run = lambda add: add(**{"client.learning_rate": 0.1})  # fedavg's own value
  root = tmp_path / "sweep"
  root.mkdir()
  copy(runs("fedavg", fedavg, OLD), root, "client.learning_rate=0.1")  # the sweep's OLD-round run
  (row,) = sweep.run_sweep(fedavg(OLD), one_run, str(root), log=lambda *a: None)
  assert row["status"] == "skipped (done)" and row["rounds"] == OLD
  (row,) = sweep.run_sweep(fedavg(NEW), one_run, str(root), log=lambda *a: None)
  assert row["status"] == "resumed" and row["rounds"] == NEW
  assert_same_run(str(root / "client.learning_rate=0.1"), runs("fedavg", fedavg, NEW))
  (row,) = sweep.run_sweep(fedavg(NEW), one_run, str(root), log=lambda *a: None)
  assert row["status"] == "skipped (done)"


def test_sweep_status_of_a_run_with_fewer_rounds(tmp_path):
  """'resume' where train extends the run; 'new' (train refuses, naming why) otherwise."""
  cases = [(fedavg(OLD), fedavg(NEW), "resume"), (fedavg(NEW), fedavg(OLD), "new"),
           (fedtiny(7, 0, 0), fedtiny(8, 0, 0), "new"), (fedtiny(7), fedtiny(8), "resume"),
           (fedavg(OLD), fedavg(NEW, checkpoint_every=0), "new")]
  for i, (saved, now, status) in enumerate(cases):
    workdir = tmp_path / str(i)
    workdir.mkdir()
    (workdir / "config.json").write_text(saved.to_json_best_effort())
    (workdir / "summary.json").write_text("{}")
    assert sweep.run_status(sweep.Run("r", {}, now), str(workdir)) == status, i


# -- refusals: named, nothing written ------------------------------------------------------------


def _assert_refused(workdir, config, error, match, **kw):
  before = snapshot(workdir)
  with pytest.raises(error, match=match):
    train.train_and_evaluate(config, workdir, **kw)
  assert snapshot(workdir) == before


def test_a_smaller_rounds_is_refused(runs):
  _assert_refused(runs("fedavg", fedavg, OLD), fedavg(3), workdir_lib.WorkdirError,
           r"with config.rounds=3: it is a run of config.rounds=4, and a resume may only extend "
           r"a run .*never shorten it", resume=True)


def test_another_changed_field_is_refused(runs):
  config = fedavg(NEW)
  config.client.learning_rate = 0.2
  _assert_refused(runs("fedavg", fedavg, OLD), config, FileExistsError,
           r"different config \(config.client.learning_rate: 0.1 in the workdir, 0.2 now; "
           r"config.rounds: 4 in the workdir, 6 now\)", resume=True)


def test_without_resume_a_larger_rounds_is_refused_as_before(runs):
  _assert_refused(runs("fedavg", fedavg, OLD), fedavg(NEW), FileExistsError,
           r"different config \(config.rounds: 4 in the workdir, 6 now\); pass --resume to "
           r"extend it to config.rounds=6, or choose another workdir")


def test_a_schedule_scaled_to_the_rounds_is_not_extendable(tmp_path):
  """FedTiny with adjust_every = adjust_end = 0: refused before anything is read but the
  config (the workdir needs no real run)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(fedtiny(7, 0, 0).to_json_best_effort())
  (workdir / "summary.json").write_text("{}")
  _assert_refused(str(workdir), fedtiny(8, 0, 0), workdir_lib.WorkdirError,
           r"cannot extend the run in workdir .* from config.rounds=7 to 8: "
           r"config.sparse.adjust_every = adjust_end = 0 scale the adjustment schedule to "
           r"config.rounds", resume=True)


def test_a_driver_without_extendable_is_not_extendable(monkeypatch, runs):
  finished = runs("fedavg", fedavg, OLD)  # made by the real driver, before it is replaced
  module = type(methods)("experiments.methods.nothing_said")
  module.validate = methods.DRIVERS["fedavg"].validate
  monkeypatch.setitem(methods.DRIVERS, "fedavg", module)
  _assert_refused(finished, fedavg(NEW), workdir_lib.WorkdirError,
           r"from config.rounds=4 to 6: the 'fedavg' driver \(experiments/methods/nothing_said.py\) "
           r"does not say that its rounds are independent of config.rounds", resume=True)


def test_a_finished_run_without_its_final_checkpoint_is_refused(runs, tmp_path):
  workdir = copy(runs("fedavg", fedavg, OLD), tmp_path)
  shutil.rmtree(os.path.join(workdir, train.CHECKPOINT_DIR, f"step_{OLD:08d}"))
  _assert_refused(workdir, fedavg(NEW), workdir_lib.WorkdirError,
           r"from config.rounds=4 to 6: the run finished, but its latest checkpoint is after "
           r"round 3, not after its final round 4", resume=True)


def test_without_evaluation_keeps_the_rounds_own_fields():
  record = {"train_loss": 1.0, "params": 3, "round": 4, "wall_time": 0.5, "dp_epsilon": 2.0,
            "test_accuracy": 0.5, "test_loss": 1.5}
  assert workdir_lib.without_evaluation(record) == {
      "train_loss": 1.0, "params": 3, "round": 4, "wall_time": 0.5, "dp_epsilon": 2.0}
  del record["dp_epsilon"]
  assert list(workdir_lib.without_evaluation(record)) == ["train_loss", "params", "round",
                                                          "wall_time"]

"""Bad input to the experiment tools: a clear error naming the problem, nothing lost.

(Bad config *values* of the FedAvg fields are in test_experiments.py, bad sweeps and
seed lists in test_sweep.py, checkpoint files in test_checkpoint.py; the command line's
one-line refusals, the workdir lock and resuming from anywhere in test_reliability.py.)
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments import build, plot, seeds, train
from experiments.configs import fedavg_tiny
from fedjax_prune import checkpoint

CONFIG_FILE = os.path.join("experiments", "configs", "fedavg_tiny.py")


def tiny(**overrides):
  c = fedavg_tiny.get_config()
  c.rounds = 2
  c.checkpoint_every = 1
  for k, v in overrides.items():
    with c.ignore_type():
      c[k] = v
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(tiny(), workdir)
  return workdir


def _snapshot(workdir):
  """{relative path: bytes} of every file under workdir."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


@pytest.fixture
def copy_of(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return workdir


# -- command-line overrides -----------------------------------------------------------


def _main(tmp_path, *overrides):
  """Runs experiments.main as the user would; returns (returncode, stderr)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={CONFIG_FILE}",
       f"--workdir={tmp_path / 'run'}", *overrides], cwd=root, capture_output=True, text=True,
      timeout=300)
  return result.returncode, result.stderr


def test_wrong_type_on_the_command_line(tmp_path):
  rc, err = _main(tmp_path, "--config.rounds=many")
  assert rc != 0 and "config.rounds" in err and "many" in err, err[-2000:]
  assert not (tmp_path / "run").exists()


# -- run-level fields ---------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("rounds", "10", r"config.rounds='10' is invalid: allowed an integer"),
    ("checkpoint_every", -1, r"config.checkpoint_every=-1 is invalid: allowed an integer in \[0, inf\]"),
    ("checkpoint_every", 2.5, r"config.checkpoint_every=2.5 is invalid"),
    ("checkpoint_keep", 0, r"config.checkpoint_keep=0 is invalid: allowed an integer in \[1, inf\]"),
    ("tensorboard", "yes", r"config.tensorboard='yes' is invalid: allowed True or False"),
    ("progress", 1, r"config.progress=1 is invalid: allowed True or False"),
    ("prune_density", 0.0, r"config.prune_density=0.0 is invalid: allowed a number in \(0, 1\]"),
    ("prune_round", 2, r"config.prune_round=2 is invalid: allowed an integer in \[0, 1\]"),
    ("method", "nope", r"config.method='nope' is invalid: allowed one of"),
])
def test_bad_run_fields_name_the_field(tmp_path, field, value, message):
  workdir = tmp_path / "run"
  with pytest.raises(build.ConfigError, match=message):
    train.train_and_evaluate(tiny(**{field: value}), str(workdir))
  assert not workdir.exists()


def test_tensorboard_without_tensorboardx_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
  with pytest.raises(build.ConfigError, match=r"tensorboard=True needs .*tensorboardX.*pip install"):
    train.train_and_evaluate(tiny(tensorboard=True), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_cohort_larger_than_the_loaded_dataset_writes_nothing(tmp_path, shared_data_dir):
  # The real CIFAR-10 subset's client count is known only once loaded: checked after the
  # config checks, before anything is written.
  from experiments.configs import fedtiny_cifar10_cpu
  config = fedtiny_cifar10_cpu.get_config()
  config.data.data_dir = config.data.data_dir.replace("../shared/data", shared_data_dir, 1)
  config.clients_per_round = 50
  workdir = tmp_path / "run"
  with pytest.raises(build.ConfigError, match=r"clients_per_round=50 exceeds the dataset's 20 "
                                               r"clients: allowed \[1, 20\]"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_data_dir_without_data_writes_nothing(tmp_path):
  from experiments.configs import fedavg_femnist
  empty = tmp_path / "empty"
  empty.mkdir()
  config = fedavg_femnist.get_config()
  config.data.data_dir = str(empty)
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match=r"no train/ subdirectory"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_command_line_prints_a_refusal_without_a_traceback(tmp_path):
  rc, err = _main(tmp_path, "--config.clients_per_round=50")
  assert rc == 2, err[-2000:]
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  assert "error: ConfigError: config.clients_per_round=50 exceeds data.num_clients=6" in err
  assert not (tmp_path / "run").exists()
  rc, err = _main(tmp_path, "--config.clients_per_round=50", "--traceback")
  assert rc != 0 and "Traceback" in err and "clients_per_round=50" in err


# -- workdirs -------------------------------------------------------------------------


def test_workdir_files_get_the_mode_open_would_give(finished):
  # Atomic writes go through mkstemp (mode 0600); others sharing the results must read them.
  umask = os.umask(0)
  os.umask(umask)
  for name in ("config.json", "summary.json", "metrics.jsonl"):
    assert os.stat(os.path.join(finished, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_workdir_with_another_config_is_refused_and_kept(copy_of):
  before = _snapshot(copy_of)
  other = tiny()
  other.client.learning_rate = 0.5
  with pytest.raises(FileExistsError, match=r"holds a run with a different config.*--overwrite"):
    train.train_and_evaluate(other, copy_of)
  assert _snapshot(copy_of) == before


def test_workdir_with_another_config_is_replaced_with_overwrite(copy_of):
  other = tiny()
  other.client.learning_rate = 0.5
  train.train_and_evaluate(other, copy_of, overwrite=True)
  with open(os.path.join(copy_of, "config.json")) as f:
    assert json.load(f)["client"]["learning_rate"] == 0.5


def test_fresh_run_over_an_unfinished_run_is_refused_and_kept(copy_of):
  os.remove(os.path.join(copy_of, "summary.json"))  # killed before the end
  before = _snapshot(copy_of)
  with pytest.raises(FileExistsError,
                     match=r"holds checkpoints of an unfinished run.*--resume.*--overwrite"):
    train.train_and_evaluate(tiny(), copy_of)
  assert _snapshot(copy_of) == before


def test_fresh_run_over_a_finished_run_of_the_same_config_restarts_it(copy_of):
  with open(os.path.join(copy_of, "metrics.jsonl")) as f:
    before = [json.loads(l)["train_loss"] for l in f]
  train.train_and_evaluate(tiny(), copy_of)
  with open(os.path.join(copy_of, "metrics.jsonl")) as f:
    assert [json.loads(l)["train_loss"] for l in f] == before  # rerun, not appended


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("precious")
  with pytest.raises(NotADirectoryError, match=r"workdir .*file.* is not a directory"):
    train.train_and_evaluate(tiny(), str(path))
  assert path.read_text() == "precious"


def test_unwritable_workdir_is_named(tmp_path, monkeypatch):
  def denied(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

  monkeypatch.setattr(os, "makedirs", denied)
  with pytest.raises(OSError, match=r"cannot write to workdir .*run.*Permission denied"):
    train.train_and_evaluate(tiny(), str(tmp_path / "run"))


def test_disk_full_writing_the_config_keeps_the_workdir(copy_of, monkeypatch):
  before = _snapshot(copy_of)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(train.runtime, "write_json_atomic", full)
  with pytest.raises(OSError, match=r"cannot write to workdir .*No space left on device"):
    train.train_and_evaluate(tiny(), copy_of, overwrite=True)
  monkeypatch.undo()
  assert _snapshot(copy_of) == before


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  real_save = checkpoint.Checkpointer.save

  def save(self, step, state, meta):
    if step == 2:
      monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
          OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    return real_save(self, step, state, meta)

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  with pytest.raises(OSError, match=r"cannot save checkpoint 2 in .*checkpoints.*No space left"):
    train.train_and_evaluate(tiny(), workdir)
  monkeypatch.undo()
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  assert os.listdir(ckpt_dir) == ["step_00000001"]
  # ... and the run resumes from it once there is space again.
  summary = train.train_and_evaluate(tiny(), workdir, resume=True)
  assert summary["rounds"] == 2


# -- resume ---------------------------------------------------------------------------


def test_resume_with_checkpoints_off(copy_of):
  before = _snapshot(copy_of)
  c = tiny()
  c.checkpoint_every = 0
  with pytest.raises((build.ConfigError, FileExistsError)):
    train.train_and_evaluate(c, copy_of, resume=True)
  with pytest.raises(build.ConfigError, match=r"cannot resume with config.checkpoint_every=0"):
    train.prepare_workdir(c, copy_of + "_x", overwrite=False, resume=True)
  assert _snapshot(copy_of) == before


def test_resume_and_overwrite_together(copy_of):
  with pytest.raises(ValueError, match=r"resume=True and overwrite=True exclude each other"):
    train.train_and_evaluate(tiny(), copy_of, resume=True, overwrite=True)


def test_resume_from_a_corrupt_checkpoint_names_the_file(copy_of):
  meta = os.path.join(copy_of, train.CHECKPOINT_DIR, "step_00000002", "meta.json")
  with open(meta, "w") as f:
    f.write("{not json")
  before = _snapshot(copy_of)
  with pytest.raises(checkpoint.CheckpointError, match=r"step_00000002/meta.json.*corrupt"):
    train.train_and_evaluate(tiny(), copy_of, resume=True)
  assert _snapshot(copy_of) == before


# -- other tools ----------------------------------------------------------------------


def test_plot_of_a_directory_without_metrics(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty.* holds no metrics.jsonl"):
    plot.plot_workdirs([str(tmp_path / "empty")], str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match=r"nope.* is not a directory"):
    plot.plot_workdirs([str(tmp_path / "nope")], str(tmp_path / "out"))


def test_seed_sweep_of_a_pruned_config():
  with pytest.raises(build.ConfigError, match=r"prune_density < 1: the vectorised seed sweep"):
    seeds.run_seeds(tiny(prune_density=0.5), [0, 1])

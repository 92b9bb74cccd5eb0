"""Refusals that write nothing, one line for every failure, the workdir lock, resume from anywhere.

Each case of issue 29: the command lines as given (run in-process through the same flag
parsing and error boundary as `python -m experiments.main`), and the API behind them. A
refused run must leave its workdir byte-identical (`snapshot`) or absent.
"""
import errno
import json
import re
import os
import shutil
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiments import build, main, train, workdir as workdir_lib
from experiments.configs import fedavg_tiny
from fedjax_prune import checkpoint, data
from tests._checks import overridden
from tests.data.test_sources import _femnist_user, _make_femnist_dir, _write_h5, _write_pfllib

ROUNDS = 12  # fedavg_tiny: checkpoints after rounds 3, 6, 9, 12; keeps the last 3

# config_flags loads config files with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings(
    "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")


def snapshot(path) -> dict | None:
  """{relative path: file bytes, or None for a directory} of everything under `path`;
  None when `path` does not exist."""
  if not os.path.lexists(path):
    return None
  out = {}
  for dirpath, dirs, files in os.walk(path):
    for name in dirs:
      out[os.path.relpath(os.path.join(dirpath, name), path)] = None
    for name in files:
      with open(os.path.join(dirpath, name), "rb") as f:
        out[os.path.relpath(os.path.join(dirpath, name), path)] = f.read()
  return out


def cli(*args) -> int:
  """`python -m experiments.main *args` in-process (flag parsing, error boundary): exit status."""
  argv = ["experiments.main", *args]
  flag_values = flags.FlagValues()
  main.define_flags(flag_values, sys_argv=argv)
  try:
    main.parse_flags(argv, flag_values)
    main.run(flag_values)
  except SystemExit as e:
    return e.code
  return 0


def one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert "Traceback" not in err and len(err.splitlines()) == 1, err
  assert err.startswith("error: ") and err.endswith("(--traceback shows where it was raised)")
  return err


def tiny(**fields):
  return overridden(fedavg_tiny.get_config(), **fields)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run of the tiny config (checkpoints after rounds 6, 9 and 12)."""
  path = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(fedavg_tiny.get_config(), path)
  return path


@pytest.fixture
def interrupted(finished, tmp_path):
  """A copy of `finished` as killed after round 10: checkpoints 6 and 9, records 1-10."""
  path = str(tmp_path / "run")
  shutil.copytree(finished, path)
  shutil.rmtree(os.path.join(path, train.CHECKPOINT_DIR, "step_00000012"))
  os.remove(os.path.join(path, "summary.json"))
  with open(os.path.join(path, "metrics.jsonl")) as f:
    lines = f.readlines()
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(lines[:10])
  return path


def rounds_in(path):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(line)["round"] for line in f]


# -- the issue's command lines: refused before anything is written -------------------------

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                       "configs")
ASP = os.path.join(CONFIGS, "asp_tiny.py")
FEDAVG = os.path.join(CONFIGS, "fedavg_tiny.py")


@pytest.mark.parametrize("config_file,overrides,message", [
    (ASP, ["--config.model.name=leaf_femnist_cnn"],
     "ConfigError: config.asp.widths is only supported for the asp_* models"),
    (ASP, ["--config.asp.widths=(8,16,32)"],
     r"ConfigError: config.asp.widths=(8, 16, 32) is invalid for asp_femnist_cnn"),
    (FEDAVG, ["--config.strategy=vmap+lax+lowrank"],
     "ConfigError: config.strategy='vmap+lax+lowrank': '+lowrank'"),
    (FEDAVG, ["--config.strategy=vmap+lax+sharded", "--config.shard_clients=False"],
     "ConfigError: config.strategy='vmap+lax+sharded' shards the cohort over devices, which "
     "needs config.shard_clients=True"),
    (FEDAVG, ["--config.nonexistent=1"],
     "unknown config field: --config.nonexistent: the config has no field 'nonexistent'"),
    (FEDAVG, ["--config.client.learning_rat=0.1"],
     "unknown config field: --config.client.learning_rat: the config has no field "
     "'learning_rat' (did you mean 'learning_rate'?)"),
    (FEDAVG, ["--config.method=bogus"],
     "ConfigError: config.method='bogus' is invalid: allowed one of"),
    (FEDAVG, ["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (FEDAVG, ["--config.rounds=many"], "flag --config.rounds=many: invalid literal for int()"),
    (os.path.join(CONFIGS, "nope.py"), [],
     f"cannot load the config file {os.path.join(CONFIGS, 'nope.py')!r}: [Errno 2] No such file"),
])
def test_refused_command_prints_one_line_and_writes_nothing(tmp_path, capsys, config_file,
                                                            overrides, message):
  run = tmp_path / "run"
  assert cli(f"--config={config_file}", f"--workdir={run}", *overrides) == main.EXIT_REFUSED
  assert message in one_error_line(capsys)
  assert not run.exists()


@pytest.mark.parametrize("config_fn,error", [
    (lambda: _asp_tiny(**{"model.name": "leaf_femnist_cnn"}), build.ConfigError),
    (lambda: _asp_tiny(**{"asp.widths": (8, 16, 32)}), build.ConfigError),
    (lambda: tiny(strategy="vmap+lax+lowrank"), build.ConfigError),
    (lambda: tiny(strategy="vmap+lax+sharded", shard_clients=False), build.ConfigError),
    (lambda: _fedtiny(**{"sparse.num_blocks": 100}), build.ConfigError),
])
def test_checks_after_the_data_run_before_the_workdir_is_touched(tmp_path, config_fn, error):
  """The checks a method's build runs (its spec, strategy, FedTiny's blocks) refuse the run
  before the workdir is created (the issue's commands and `sparse.num_blocks=100`)."""
  with pytest.raises(error):
    train.train_and_evaluate(config_fn(), str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


def _asp_tiny(**fields):
  from experiments.configs import asp_tiny
  return overridden(asp_tiny.get_config(), **fields)


def _fedtiny(**fields):
  from tests.pruning.test_sparse_baselines import tiny_config
  return overridden(tiny_config("fedtiny"), **fields)


def test_refusal_in_a_workdir_with_a_run_keeps_every_byte(interrupted):
  before = snapshot(interrupted)
  with pytest.raises(build.ConfigError, match="'\\+lowrank'"):
    train.train_and_evaluate(tiny(strategy="vmap+lax+lowrank"), interrupted, overwrite=True)
  assert snapshot(interrupted) == before


def test_command_line_refusal_exits_2_in_one_line():
  """The real command line (a subprocess): exit status 2, one line on stderr, no traceback."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={FEDAVG}", "--workdir=unused",
       "--config.nonexistent=1"], cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      "error: unknown config field: --config.nonexistent: the config has no field 'nonexistent'; "
      "fix the spelling, or add the field to the config file (--traceback shows where it was "
      "raised)"]
  assert not os.path.exists(os.path.join(root, "unused"))


# -- data files ---------------------------------------------------------------------------


def _leaf_dir(root):
  rng = np.random.default_rng(0)
  users = {f"u{k}": _femnist_user(rng, 5) for k in range(3)}
  return _make_femnist_dir(str(root), users, {u: _femnist_user(rng, 2) for u in users})


def _truncate(path):
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob[: len(blob) // 2])


def _femnist_config(data_dir):
  from experiments.configs import fedavg_femnist
  c = fedavg_femnist.get_config()
  c.data.data_dir = str(data_dir)
  return c


def _pfllib_config(data_dir):
  c = tiny()
  c.data.name, c.data.data_dir = "cifar10_pfllib", str(data_dir)
  return c


def _pfllib_dir(root):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for k in range(2):
      x = (rng.integers(0, 256, size=(4, 3, 32, 32)) / 255.0 - 0.5) / 0.5
      _write_pfllib(os.path.join(root, split, f"{k}.npz"), x.astype(np.float32),
                    rng.integers(0, 10, size=4))
  return str(root)


@pytest.mark.parametrize("kind", ["json.gz", "npz"])
def test_truncated_data_file_is_one_line_and_writes_nothing(tmp_path, capsys, kind):
  if kind == "json.gz":
    src = _leaf_dir(tmp_path / "leaf")
    bad = os.path.join(src, "train", "all_data_0_train.json.gz")
    config = _femnist_config(src)
    config_file = os.path.join(CONFIGS, "fedavg_femnist.py")
  else:
    src = _pfllib_dir(tmp_path / "pfllib")
    bad = os.path.join(src, "train", "1.npz")
    config = _pfllib_config(src)
    config_file = FEDAVG
  _truncate(bad)
  with pytest.raises(data.DataError, match=re.escape(bad) + r": cannot .*\(corrupt or truncated"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  extra = ["--config.data.name=cifar10_pfllib"] if kind == "npz" else []
  assert cli(f"--config={config_file}", f"--workdir={tmp_path / 'run'}", *extra,
             f"--config.data.data_dir={src}") == main.EXIT_REFUSED
  assert f"error: DataError: {bad}: cannot" in one_error_line(capsys)
  assert not (tmp_path / "run").exists()


def test_truncated_h5_is_a_data_error(tmp_path):
  path = _write_h5(str(tmp_path / "fed_emnist_train.h5"), {
      "a": {"pixels": np.ones((3, 28, 28), np.float32), "label": np.array([0, 1, 2])}})
  _truncate(path)
  with pytest.raises(data.DataError, match="not a readable HDF5 file"):
    data.load_tff_h5(path)


# -- labels, where the data is built --------------------------------------------------------


@pytest.mark.parametrize("labels,num_classes,message", [
    ([0, -1, 2], None, r"client 1 has label -1 outside \[0, inf\)"),
    ([0, 1, 3], 3, r"client 1 has label 3 outside \[0, 3\) \(num_classes=3\)"),
    ([0.0, 1.5, 2.0], 3, r"client 1: labels must be integers \(class indices\), got dtype float64"),
])
def test_from_client_lists_refuses_bad_labels_naming_the_client(labels, num_classes, message):
  xs = [np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)]
  ys = [np.array([0, 1]), np.array(labels)]
  with pytest.raises(data.DataError, match=message):
    data.from_client_lists(xs, ys, num_classes=num_classes)


@pytest.mark.parametrize("label,message", [
    (-1, r"client 'u1' \(train\) has label -1 outside \[0, 62\)"),
    (62, r"client 'u1' \(train\) has label 62 outside \[0, 62\)"),
])
def test_leaf_loader_refuses_labels_out_of_range(tmp_path, label, message):
  rng = np.random.default_rng(0)
  users = {f"u{k}": _femnist_user(rng, 3) for k in range(2)}
  users["u1"][1][1] = label
  src = _make_femnist_dir(str(tmp_path / "leaf"), users, {"u0": _femnist_user(rng, 2)})
  with pytest.raises(data.DataError, match=message):
    data.load_leaf(src)


def test_tff_h5_refuses_fractional_labels(tmp_path):
  path = _write_h5(str(tmp_path / "fed_emnist_train.h5"), {
      "a": {"pixels": np.ones((2, 28, 28), np.float32), "label": np.array([0.0, 2.5])}})
  with pytest.raises(data.DataError, match=r"client 'a' field 'label': labels must be integers"):
    data.load_tff_h5(path)


def test_from_partition_refuses_labels_out_of_range():
  pooled = data.PooledData(np.zeros((4, 2), np.float32), np.array([0, 1, 5, 1]), 3, (2,), "toy")
  with pytest.raises(data.DataError, match=r"parts\[1\] \(client '1'\) has label 5 outside"):
    data.from_partition(pooled, [np.array([0, 1]), np.array([2, 3])])


# -- checkpoints ------------------------------------------------------------------------------


def test_truncated_checkpoint_array_names_the_pytree_path(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = {"params": {"dense_0": {"kernel": jnp.arange(2000.0).reshape(20, 100)}}}
  ckpt.save(1, state, {})
  for name in os.listdir(tmp_path / "step_00000001" / "state" / "d"):
    _truncate(tmp_path / "step_00000001" / "state" / "d" / name)
  with pytest.raises(checkpoint.CheckpointError) as info:
    ckpt.restore(lambda meta: state)
  assert "(leaf params/dense_0/kernel)" in str(info.value)
  assert "leaf_0000" not in str(info.value)
  assert "delete that checkpoint directory to resume from the one before" in str(info.value)


def test_corrupt_checkpoint_is_one_line_on_the_command_line(interrupted, capsys):
  meta = os.path.join(interrupted, train.CHECKPOINT_DIR, "step_00000009", "meta.json")
  with open(meta, "w") as f:
    f.write("{not json")
  before = snapshot(interrupted)
  assert cli(f"--config={FEDAVG}", f"--workdir={interrupted}", "--resume") == main.EXIT_REFUSED
  assert "error: CheckpointError: checkpoint file" in one_error_line(capsys)
  assert snapshot(interrupted) == before


@pytest.mark.parametrize("status,code", [
    ("RESOURCE_EXHAUSTED: Error writing \"leaf_00000/0.0\": No space left on device "
     "[os_error_code='28']", errno.ENOSPC),
    ("PERMISSION_DENIED: Error opening file", errno.EACCES),
])
def test_failed_orbax_save_is_an_os_error_and_leaves_no_temporary(tmp_path, monkeypatch, status,
                                                                  code):
  import orbax.checkpoint as ocp
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(3, {"x": jnp.ones(3)}, {})

  def save(self, directory, *args, **kwargs):  # orbax writes part of it, then fails
    os.makedirs(os.path.join(directory, "ocdbt.process_0", "d"))
    raise ValueError(status)

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save)
  with pytest.raises(OSError, match=f"cannot save checkpoint 6 in .*{os.strerror(code)}") as info:
    ckpt.save(6, {"x": jnp.ones(3)}, {})
  assert info.value.errno == code
  assert os.listdir(tmp_path) == ["step_00000003"]


def test_disk_full_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
  import orbax.checkpoint as ocp

  def full(self, directory, *args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: No space left on device [os_error_code='28']")

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", full)
  run = tmp_path / "run"
  assert cli(f"--config={FEDAVG}", f"--workdir={run}", "--config.rounds=3") == main.EXIT_REFUSED
  line = one_error_line(capsys)
  assert "OSError: [Errno 28] cannot save checkpoint 3 in" in line
  assert line.endswith("No space left on device; free some space (or choose a --workdir on another "
                       "disk), then rerun with --resume (--traceback shows where it was raised)")
  assert os.listdir(run / train.CHECKPOINT_DIR) == []  # no temporary left
  assert not (run / workdir_lib.LOCK_FILE).exists()  # released on error


# -- the workdir lock ----------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_a_live_run_holds_the_workdir(interrupted, resume):
  before = snapshot(interrupted)
  with workdir_lib.lock(interrupted):  # flock: another open file, so "another run" here too
    with open(os.path.join(interrupted, workdir_lib.LOCK_FILE)) as f:
      holder = json.load(f)
    assert holder == {"pid": os.getpid(), "host": socket.gethostname()}
    held = snapshot(interrupted)
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=rf"workdir .* is in use by another run \(pid {os.getpid()} on host "):
      train.train_and_evaluate(fedavg_tiny.get_config(), interrupted, resume=resume)
    assert snapshot(interrupted) == held
  assert snapshot(interrupted) == before  # the lock file goes with the lock


def test_the_lock_of_a_dead_run_is_taken_over(interrupted, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # a pid that no longer runs
  with open(os.path.join(interrupted, workdir_lib.LOCK_FILE), "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)  # what kill -9 leaves
  train.train_and_evaluate(fedavg_tiny.get_config(), interrupted, resume=True)
  assert f"took over the lock of a run that is no longer running (pid {dead.pid}" in (
      capsys.readouterr().out)
  assert rounds_in(interrupted) == list(range(1, ROUNDS + 1))
  assert not os.path.exists(os.path.join(interrupted, workdir_lib.LOCK_FILE))


# -- resume from anywhere --------------------------------------------------------------------


def test_resume_without_a_workdir_starts_from_round_0(tmp_path, capsys):
  run = str(tmp_path / "run")
  summary = train.train_and_evaluate(tiny(rounds=3), run, resume=True)
  assert summary["rounds"] == 3 and rounds_in(run) == [1, 2, 3]
  out = capsys.readouterr().out
  assert f"no checkpoint in workdir {run!r}: starting the run from round 0" in out


def test_resume_of_a_run_killed_before_its_first_checkpoint(tmp_path, finished):
  """What a kill during the first save leaves: config, records 1-3 and half of 4, a
  half-written temporary. The resumed run starts over: the same records, once."""
  run = tmp_path / "run"
  (run / train.CHECKPOINT_DIR / ".tmp-step_00000003-999" / "state").mkdir(parents=True)
  shutil.copy(os.path.join(finished, "config.json"), run / "config.json")
  with open(os.path.join(finished, "metrics.jsonl")) as f:
    (run / "metrics.jsonl").write_text("".join(f.readlines()[:3]) + '{"round": 4, "trai')
  train.train_and_evaluate(fedavg_tiny.get_config(), str(run), resume=True)
  strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "wall_time"}
  with open(os.path.join(finished, "metrics.jsonl")) as f, open(run / "metrics.jsonl") as g:
    assert [strip(line) for line in g] == [strip(line) for line in f]
  assert sorted(os.listdir(run / train.CHECKPOINT_DIR)) == ["step_00000006", "step_00000009",
                                                             "step_00000012"]


def test_resume_that_cannot_run_here_refuses_before_touching_a_file(interrupted):
  """The checkpoint's strategy shards the cohort; this run has no mesh (3 clients < 4 devices)."""
  meta = os.path.join(interrupted, train.CHECKPOINT_DIR, "step_00000009", "meta.json")
  with open(meta) as f:
    record = json.load(f)
  record["meta"]["strategy"] = "vmap+lax+sharded"
  with open(meta, "w") as f:
    json.dump(record, f)
  before = snapshot(interrupted)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"cannot resume here: the checkpoint .* runs the clients as "
                           r"'vmap\+lax\+sharded', sharded over several devices, and this run has "
                           r"no device mesh"):
    train.train_and_evaluate(fedavg_tiny.get_config(), interrupted, resume=True)
  assert snapshot(interrupted) == before


@pytest.mark.parametrize("bad_line", [3, 10])
def test_unreadable_metrics_record(interrupted, bad_line):
  """Line 3 may be a record the checkpoint (round 9) covers: refused, naming the line.
  Line 10 comes after the checkpoint's records: dropped, and the run resumes."""
  path = os.path.join(interrupted, "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  lines[bad_line - 1] = '{"round": 3, "train_lo\n'
  with open(path, "w") as f:
    f.writelines(lines)
  before = snapshot(interrupted)
  if bad_line == 3:
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"cannot resume: line 3 of .*metrics.jsonl.* is not a metrics record, "
                             r"and the checkpoint covers rounds 1-9"):
      train.train_and_evaluate(fedavg_tiny.get_config(), interrupted, resume=True)
    assert snapshot(interrupted) == before
  else:
    train.train_and_evaluate(fedavg_tiny.get_config(), interrupted, resume=True)
    assert rounds_in(interrupted) == list(range(1, ROUNDS + 1))


def test_metrics_up_to_keeps_every_record_of_the_checkpoint(tmp_path):
  lines = [json.dumps({"round": r}) + "\n" for r in (1, 2, 3, 4)]
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.writelines(lines[:2] + ["garbage\n"] + lines[2:])
  assert workdir_lib.metrics_up_to(path, 2) == (lines[:2], None)
  assert workdir_lib.metrics_up_to(path, 3) == (lines[:2], 3)


# -- what a resume may change -------------------------------------------------------------------


def test_result_neutral_fields_do_not_block_resume(interrupted):
  config = tiny(progress=True, eval_every=2, checkpoint_keep=5, tensorboard=False)
  train.train_and_evaluate(config, interrupted, resume=True)
  assert rounds_in(interrupted) == list(range(1, ROUNDS + 1))


def test_a_blocking_difference_names_the_field(interrupted):
  before = snapshot(interrupted)
  with pytest.raises(FileExistsError,
                     match=r"different config \(config.client.learning_rate: 0.1 in the workdir, "
                           r"0.2 now\); choose another workdir, rerun with the workdir's values, "
                           r"or pass --overwrite"):
    train.train_and_evaluate(tiny(**{"client.learning_rate": 0.2}), interrupted, resume=True)
  assert snapshot(interrupted) == before


def test_config_without_the_method_field_matches_its_default():
  saved = json.loads(fedavg_tiny.get_config().to_json_best_effort())
  del saved["method"]  # a workdir written before fedavg configs declared `method`
  now = json.loads(fedavg_tiny.get_config().to_json_best_effort())
  assert workdir_lib.config_differences(saved, now, {"method": "fedavg"}) == []


# -- divergence advice ------------------------------------------------------------------------


@pytest.mark.parametrize("fields,advice", [
    ({"algorithm.name": "fedavg", "client.learning_rate": 1e30},
     "lower config.client.learning_rate (now 1e+30): the server step only averages the clients' "
     "models (fedavg, server_learning_rate=1.0)"),
    ({"algorithm.server_learning_rate": 1e30},
     "lower config.algorithm.server_learning_rate (now 1e+30, the fedavgm server step) or "
     "config.client.learning_rate (now 0.1)"),
])
def test_divergence_names_the_learning_rate_to_lower(tmp_path, fields, advice):
  with pytest.raises(FloatingPointError, match="training diverged at round") as info:
    train.train_and_evaluate(tiny(rounds=3, **fields), str(tmp_path / "run"))
  assert str(info.value).endswith(advice)
  assert not (tmp_path / "run" / workdir_lib.LOCK_FILE).exists()

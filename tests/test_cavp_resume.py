"""CAVP checkpoints and resume (experiments/methods/cavp.py, experiments/configs/cavp_cifar10.py).

A tiny CAVP run (the 'cpu' ResNet-20 at width x0.25 on embedded synthetic data,
4 rounds of one local step, a checkpoint every round, a physical rebuild after
round 2 that removes units and blocks) is cut back to one of its checkpoints
(later checkpoints and summary.json removed, a half-written metrics line
appended, as a kill leaves it) and resumed with `resume=True`: metrics.jsonl
(wall times aside), the summary (accuracy, params, FLOPs, rebuilds) and the
final checkpoint's arrays must equal the uninterrupted run's bit for bit. The
slow test kills a real `python -m experiments.main` run with SIGKILL instead.
A second reference switches on the issue-26 options: Adam on θ with its state
kept across rounds (checkpointed, sliced by the rebuild), BN recalibration at the
rebuild, a fine-tune of the finalised network, and augmentation.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import pytest

from experiments import build, train
from experiments.configs import cavp_cifar10
from fedjax_prune import checkpoint
from tests.test_resume import _metric_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join("experiments", "configs", "cavp_cifar10.py")
ROUNDS = 4
REBUILD_AFTER = 2  # cavp.rebuild_every: the architecture shrinks after round 2
# Keys holding wall-clock measurements (not part of the deterministic result).
TIMING_KEYS = ("wall_time", "wall_time_s", "setup_time_s", "eval_time_s")


def tiny_config(mode: str = "centralised", *, issue26_options: bool = False):
  """The 'cpu' CAVP config cut down to seconds; a checkpoint after every round."""
  c = cavp_cifar10.get_config(f"cpu,{mode},both")
  c.data = type(c.data)(dict(
      name="synthetic", num_clients=6, num_classes=3, examples_per_client=(6, 10),
      test_examples_per_client=4, label_skew_alpha=0.5, data_dir=""))
  c.client.batch_size = 4
  c.client.num_steps = 1
  c.eval_batch_size = 16
  c.rounds = ROUNDS
  c.clients_per_round = 3
  c.eval_every = 2
  c.checkpoint_every = 1
  c.checkpoint_keep = ROUNDS
  c.cavp.rebuild_every = REBUILD_AFTER
  c.cavp.theta_init = 0.5
  c.cavp.prune_threshold = 0.45  # gates fall below it within two steps: the rebuild removes them
  c.cavp.theta_learning_rate = 0.2
  if issue26_options:
    c.cavp.theta_optimizer = "adam"
    c.cavp.theta_learning_rate = 0.1
    c.cavp.persist_theta_optimizer = True
    c.cavp.recalibrate_after_rebuild = True
    c.cavp.recalibration_steps = 3
    c.cavp.finetune_steps = 2
    c.cavp.augment = True
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return {k: v for k, v in json.load(f).items() if k not in TIMING_KEYS}


def assert_same_run(workdir, reference):
  """Same metrics (wall times aside), same summary, bit-identical final checkpoint."""
  got, want = _records(workdir), _records(reference)
  assert [r["round"] for r in got] == list(range(1, ROUNDS + 1))
  assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)  # NaN-safe
  a, b = _summary(workdir), _summary(reference)
  assert (a["test_accuracy"], a["params"], a["flops"]) == (b["test_accuracy"], b["params"],
                                                          b["flops"])
  assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
  step, arrays, meta = checkpoint.read_arrays(os.path.join(workdir, train.CHECKPOINT_DIR))
  ref_step, ref_arrays, ref_meta = checkpoint.read_arrays(
      os.path.join(reference, train.CHECKPOINT_DIR))
  assert step == ref_step == ROUNDS
  without_clock = lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}
  assert without_clock(meta) == without_clock(ref_meta)  # meta carries the run's clock
  assert arrays.keys() == ref_arrays.keys()
  assert any(k.startswith(".theta") for k in arrays) and any(k.startswith(".lam") for k in arrays)
  for k in arrays:
    assert arrays[k].dtype == ref_arrays[k].dtype and arrays[k].shape == ref_arrays[k].shape, k
    assert arrays[k].tobytes() == ref_arrays[k].tobytes(), f"{k} differs after resume"


def _cut_back_to(workdir, kept: int) -> None:
  """The workdir as a kill after round `kept`'s checkpoint leaves it (plus a torn record)."""
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  for step in range(kept + 1, ROUNDS + 1):
    shutil.rmtree(os.path.join(ckpt_dir, f"step_{step:08d}"))
  os.remove(os.path.join(workdir, "summary.json"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"round": 9, "train_loss": 0.0, "torn": tru')


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted tiny centralised run (in-process)."""
  workdir = str(tmp_path_factory.mktemp("cavp_reference") / "run")
  summary = train.train_and_evaluate(tiny_config(), workdir)
  params = [r["params"] for r in _records(workdir)]
  # The run exercises a rebuild: checkpoints before and after it hold different shapes.
  assert summary["rebuilds"] and summary["rebuilds"][0]["round"] == REBUILD_AFTER, summary
  assert params[REBUILD_AFTER - 1] < params[0], params
  assert checkpoint.Checkpointer(os.path.join(workdir, train.CHECKPOINT_DIR)).steps() == [
      1, 2, 3, 4]
  return workdir


@pytest.fixture(scope="module")
def reference_issue26(tmp_path_factory):
  """The uninterrupted run with the issue-26 options on."""
  workdir = str(tmp_path_factory.mktemp("cavp_reference_issue26") / "run")
  summary = train.train_and_evaluate(tiny_config(issue26_options=True), workdir)
  assert summary["rebuilds"] and summary["rebuilds"][0]["round"] == REBUILD_AFTER, summary
  assert summary["finetune_steps"] == 2 and "eval_before_finetune" in summary
  _, arrays, _ = checkpoint.read_arrays(os.path.join(workdir, train.CHECKPOINT_DIR))
  counts = [v for k, v in arrays.items() if k.startswith(".theta_opt") and k.endswith(".count")]
  assert [int(c) for c in counts] == [ROUNDS], counts  # Adam's steps of all rounds
  return workdir


# Another reference run and its resumes (~50 s on a loaded 2-core CPU), hence slow; the
# default suite checks the template of the rebuilt persistent state in
# tests/pruning/test_cavp.py (test_template_of_a_rebuilt_persistent_adam_state).
@pytest.mark.slow
@pytest.mark.parametrize("kept", [
    1,  # the resumed run rebuilds (slices Adam's state)
    2,  # after the rebuild: the template gives Adam's state its sliced shapes
])
def test_resume_with_persistent_adam_recalibration_and_finetune_is_bit_identical(
    tmp_path, reference_issue26, kept):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(reference_issue26, workdir)
  _cut_back_to(workdir, kept)
  train.train_and_evaluate(tiny_config(issue26_options=True), workdir, resume=True)
  assert_same_run(workdir, reference_issue26)


@pytest.mark.parametrize("kept", [
    1,  # before the rebuild: the resumed run rebuilds itself after round 2
    2,  # right after it: the template takes the smaller shapes from the checkpoint's meta
    ROUNDS,  # a finished run: no round runs, the restored model is evaluated and finalized
])
def test_resume_is_bit_identical(tmp_path, reference, kept):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(reference, workdir)
  _cut_back_to(workdir, kept)
  train.train_and_evaluate(tiny_config(), workdir, resume=True)
  assert_same_run(workdir, reference)


def _locked_config(*overrides):
  """The cavp config as experiments/main.py loads it (locked), with command-line overrides."""
  argv = ["main", f"--config={os.path.join(ROOT, CONFIG_FILE)}:cpu,centralised,both", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "cavp config", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


# config_flags loads the config file with importlib's deprecated load_module().
@pytest.mark.filterwarnings("ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")
def test_run_level_fields_are_defined_and_overridable():
  """--config.checkpoint_every=2 (the audit's failing command) and the other run-level fields."""
  config = _locked_config("--config.checkpoint_every=2", "--config.checkpoint_keep=5",
                          "--config.tensorboard=False", "--config.cpu_devices=1")
  assert config.is_locked
  assert (config.checkpoint_every, config.checkpoint_keep) == (2, 5)
  assert (config.tensorboard, config.cpu_devices) == (False, 1)
  train.validate_run_fields(config)
  with pytest.raises(AttributeError):  # still locked: a misspelt field is refused
    _locked_config("--config.checkpoint_evry=2")


@pytest.mark.parametrize("arg", ["cpu,centralised,both", "cpu,federated,units",
                                 "resnet20,centralised,layers", "resnet56,federated,both"])
def test_every_variant_checkpoints_by_default(arg):
  config = cavp_cifar10.get_config(arg)
  assert set(train._RUN_FIELDS) <= set(config.keys())
  assert config.checkpoint_every >= 1  # long runs are resumable without an override
  train.validate_run_fields(config)
  assert train.checkpointer_for(config, "/nonexistent") is not None


def test_resume_without_checkpoints_is_refused_before_running(tmp_path):
  config = tiny_config()
  config.checkpoint_every = 0
  with pytest.raises(build.ConfigError, match="cannot resume with config.checkpoint_every=0"):
    train.train_and_evaluate(config, str(tmp_path / "run"), resume=True)


# ----------------------------------------------------------------------------- a real kill

_CONFIG_MODULE = """from tests import test_cavp_resume


def get_config(arg=None):
  return test_cavp_resume.tiny_config()
"""




# Two subprocess runs (jax import + compile + a re-jit per rebuild): 20-40 s on a loaded
# 2-core CPU, hence slow.
@pytest.mark.slow
def test_sigkill_after_the_rebuild_then_resume_is_bit_identical(tmp_path, reference):
  config_file = tmp_path / "tiny_cavp.py"
  config_file.write_text(_CONFIG_MODULE)
  workdir = str(tmp_path / "run")
  command = [sys.executable, "-m", "experiments.main", "--config", str(config_file),
             "--workdir", workdir]
  # A pause after each metrics record (before that round's checkpoint): the kill lands
  # after round 3's record, with round 2's (post-rebuild) checkpoint the newest.
  env = dict(os.environ, **{train.PAUSE_PER_ROUND_ENV: "2"})
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while _metric_lines(workdir) < 3:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline, "timed out waiting for round 3"
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert checkpoint.Checkpointer(os.path.join(workdir, train.CHECKPOINT_DIR)).steps() == [1, 2]
  result = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint after round 2" in result.stdout
  assert_same_run(workdir, reference)

"""Kill -9 a real run (subprocess) and resume it: the result must be bit-identical.

Each test runs `python -m experiments.main` on the tiny config (MLP, 6 clients,
12 rounds, a checkpoint every 3 rounds), kills it with SIGKILL, resumes it with
`--resume` and compares the final checkpoint's arrays (server params, optimizer
state, masks, round index) bit for bit, and metrics.jsonl except wall times,
with an uninterrupted run. The test hooks in experiments/train.py slow the run
down (a pause after each round, or in the middle of a save) so the kill lands
where the test wants it.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import train
from experiments.configs import fedavg_tiny
from fedjax_prune import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("experiments", "configs", "fedavg_tiny.py")
ROUNDS = 12  # fedavg_tiny: 12 rounds, checkpoint_every=3


def _command(workdir, *extra):
  return [sys.executable, "-m", "experiments.main", "--config", CONFIG, "--workdir", workdir, *extra]


def _run(workdir, *extra, env=None):
  result = subprocess.run(_command(workdir, *extra), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _start(workdir, **hooks):
  env = dict(os.environ, **{k: str(v) for k, v in hooks.items()})
  return subprocess.Popen(_command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, what, timeout=120):
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended before {what}: rc={proc.returncode}\n"
                           f"{proc.stderr.read()[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.01)


def _kill(proc):
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL


def _metric_lines(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.endswith("\n"))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop("wall_time")
  return records


def assert_bit_identical(workdir, reference):
  step, arrays, _ = checkpoint.read_arrays(os.path.join(workdir, train.CHECKPOINT_DIR))
  ref_step, ref_arrays, _ = checkpoint.read_arrays(os.path.join(reference, train.CHECKPOINT_DIR))
  assert step == ref_step == ROUNDS
  assert arrays.keys() == ref_arrays.keys()
  assert any("params" in k for k in arrays) and any("opt_state" in k for k in arrays)
  for k in arrays:
    assert arrays[k].dtype == ref_arrays[k].dtype and arrays[k].shape == ref_arrays[k].shape, k
    assert arrays[k].tobytes() == ref_arrays[k].tobytes(), f"{k} differs after resume"
  assert _metrics(workdir) == _metrics(reference)
  assert [r["round"] for r in _metrics(workdir)] == list(range(1, ROUNDS + 1))
  with open(os.path.join(workdir, "summary.json")) as f, \
      open(os.path.join(reference, "summary.json")) as g:
    a, b = json.load(f), json.load(g)
  assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == b["test_loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the tiny config (subprocess, like the killed runs)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  _run(workdir)
  return workdir


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """An uninterrupted run of the tiny config, in-process (fast)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(fedavg_tiny.get_config(), workdir)
  return workdir


# Three subprocess runs each (jax import + compile): ~10 s on an idle 2-core CPU, 30-40 s
# on a loaded one, hence slow.
@pytest.mark.slow
def test_kill_at_random_round_then_resume_is_bit_identical(tmp_path, reference):
  kill_after = random.Random().randint(4, ROUNDS - 2)  # >= 1 checkpoint (round 3) exists by then
  workdir = str(tmp_path / "run")
  proc = _start(workdir, **{train.PAUSE_PER_ROUND_ENV: 0.15})
  _wait_for(lambda: _metric_lines(workdir) >= kill_after, proc, f"round {kill_after}")
  _kill(proc)
  killed_at = _metric_lines(workdir)
  assert killed_at < ROUNDS, "the run finished before the kill"
  saved = checkpoint.Checkpointer(os.path.join(workdir, train.CHECKPOINT_DIR)).steps()
  assert saved and max(saved) <= killed_at, (saved, killed_at)
  _run(workdir, "--resume")
  assert_bit_identical(workdir, reference)


@pytest.mark.slow
def test_kill_during_a_save_then_resume_is_bit_identical(tmp_path, reference):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  # Every save pauses after writing its arrays and before publishing them; the first
  # save (round 3) is allowed to finish, the kill lands inside the second (round 6).
  proc = _start(workdir, **{train.PAUSE_MID_SAVE_ENV: 1.0})
  in_second_save = lambda: (os.path.isdir(ckpt_dir) and any(
      n.startswith(".tmp-step_00000006") and os.path.isdir(os.path.join(ckpt_dir, n, "state"))
      for n in os.listdir(ckpt_dir)))
  _wait_for(in_second_save, proc, "the second save")
  time.sleep(random.Random().uniform(0.0, 0.5))  # somewhere in the pause
  _kill(proc)
  assert checkpoint.Checkpointer(ckpt_dir).steps() == [3]  # the half-written one is invisible
  assert any(n.startswith(".tmp-") for n in os.listdir(ckpt_dir))
  _run(workdir, "--resume")
  assert not any(n.startswith(".tmp-") for n in os.listdir(ckpt_dir))  # leftovers cleaned
  assert checkpoint.Checkpointer(ckpt_dir).steps() == [6, 9, 12]  # checkpoint_keep=3
  assert_bit_identical(workdir, reference)


def test_resume_a_finished_run_gives_the_same_summary(tmp_path, finished):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  with open(os.path.join(finished, "summary.json")) as f:
    before = json.load(f)
  after = train.train_and_evaluate(fedavg_tiny.get_config(), workdir, resume=True)
  assert after["test_accuracy"] == before["test_accuracy"]
  assert _metrics(workdir) == _metrics(finished)


def test_in_process_resume_from_a_middle_checkpoint_is_bit_identical(tmp_path, finished):
  """Drop the newest checkpoints and the metrics after round 6, resume: same result."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  for name in ("step_00000009", "step_00000012"):
    shutil.rmtree(os.path.join(ckpt_dir, name))
  os.remove(os.path.join(workdir, "summary.json"))
  train.train_and_evaluate(fedavg_tiny.get_config(), workdir, resume=True)
  assert_bit_identical(workdir, finished)


def test_resume_with_another_spec_is_refused(tmp_path, finished):
  """A checkpoint of a 16-unit MLP in the workdir of an 8-unit run: clear error, nothing lost."""
  config = fedavg_tiny.get_config()
  config.model.hidden = (8,)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  shutil.copytree(os.path.join(finished, train.CHECKPOINT_DIR),
                  os.path.join(workdir, train.CHECKPOINT_DIR))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step_00000012.*meta.json.*does not match this run.*model spec"):
    train.train_and_evaluate(config, workdir, resume=True)
  assert checkpoint.Checkpointer(os.path.join(workdir, train.CHECKPOINT_DIR)).steps() == [6, 9, 12]


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_then_resume_starts_over(tmp_path, reference):
  """A restart loop that always passes --resume recovers a run killed before its first save."""
  workdir = str(tmp_path / "run")
  proc = _start(workdir, **{train.PAUSE_PER_ROUND_ENV: 5.0})
  _wait_for(lambda: _metric_lines(workdir) >= 1, proc, "round 1")
  _kill(proc)
  result = _run(workdir, "--resume")
  assert "starting the run from round 0" in result.stdout
  assert_bit_identical(workdir, reference)


def test_restored_arrays_are_numpy_equal_to_saved(finished):
  """read_arrays gives host arrays; the round index is the checkpoint's step."""
  step, arrays, meta = checkpoint.read_arrays(os.path.join(finished, train.CHECKPOINT_DIR))
  assert int(np.asarray(arrays[".round_idx"])) == step == ROUNDS
  assert meta["strategy"] == "vmap+lax" and meta["host"]["pruned"] is False
  assert meta["config"] == json.loads(fedavg_tiny.get_config().to_json_best_effort())
  assert meta["sampler"] == {"seed": fedavg_tiny.get_config().seeds.sampling, "next_round": ROUNDS}
  assert meta["spec"]["type"] == meta["initial_spec"]["type"] == "MLPSpec"


@pytest.mark.parametrize("kept", [
    "step_00000006",  # after pruning: the template's masks take their shape from meta
    pytest.param("step_00000003", marks=pytest.mark.slow),  # before: resume, then prune
])
def test_resume_across_one_shot_pruning_is_bit_identical(tmp_path, kept):
  """Checkpoints after (round 6) or before (round 3) the masks change shape (round 4)."""
  config = fedavg_tiny.get_config()
  config.prune_density, config.prune_round = 0.3, 4
  config.checkpoint_keep = 4  # keep rounds 3, 6, 9 and 12
  full = str(tmp_path / "full")
  train.train_and_evaluate(config, full)
  records = _metrics(full)
  assert [r["params"] < records[0]["params"] for r in records] == [False] * 4 + [True] * 8
  assert records[3]["density/dense_0/kernel"] == 1.0 > records[4]["density/dense_0/kernel"]
  assert records[4]["bytes_up"] < records[3]["bytes_up"]
  workdir = str(tmp_path / "resumed")
  shutil.copytree(full, workdir)
  ckpt_dir = os.path.join(workdir, train.CHECKPOINT_DIR)
  for name in os.listdir(ckpt_dir):
    if name != kept:
      shutil.rmtree(os.path.join(ckpt_dir, name))
  train.train_and_evaluate(config, workdir, resume=True)
  assert_bit_identical(workdir, full)

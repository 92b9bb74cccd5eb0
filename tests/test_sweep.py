"""experiments.sweep (expansion, resumable runs, summary) and experiments.seeds (vmapped seeds)."""
import json
import os
import shutil

import numpy as np
import pytest

from experiments import build, seeds, sweep, train
from experiments.configs import fedavg_tiny
from fedjax_prune import checkpoint


def tiny(rounds=2):
  c = fedavg_tiny.get_config()
  c.rounds = rounds
  c.eval_every = 1
  c.checkpoint_every = 1
  return c


def two_lrs(add):
  add(**{"client.learning_rate": 0.05})
  add(**{"client.learning_rate": 0.1, "client.batch_size": 2})


def test_expand_names_runs_after_their_overrides():
  runs = sweep.expand(tiny(), two_lrs)
  assert [r.name for r in runs] == ["client.learning_rate=0.05",
                                    "client.batch_size=2,client.learning_rate=0.1"]
  assert runs[1].config.client.batch_size == 2 and runs[1].config.client.learning_rate == 0.1
  assert runs[0].config.client.batch_size == 4  # the base config is not modified
  assert sweep.run_name({"model.hidden": (8, 4)}) == "model.hidden=(8,4)"


def test_config_files_sweeps_expand():
  for module in ("fedavg_synthetic", "fedavg_tiny", "fedavg_magnitude_synthetic"):
    path = os.path.join("experiments", "configs", f"{module}.py")
    fn = sweep.load_sweep_fn(path)
    config = __import__(f"experiments.configs.{module}", fromlist=["x"]).get_config()
    assert len(sweep.expand(config, fn)) >= 2


@pytest.mark.parametrize("module,rounds,clients", [
    ("asp_femnist_converged", 600, 20), ("asp_femnist_fullscale", 600, 50)])
def test_config_files_sweeps_expand_and_validate(shared_data_dir, module, rounds, clients):
  """Every run of the ASP converged and full-scale sweeps (issue 23) expands: 3 seeds of
  dense / re-init / inherit, seed 0 first, each seed's dense run first (skipped without
  ../shared/data)."""
  del shared_data_dir
  path = os.path.join("experiments", "configs", f"{module}.py")
  config = __import__(f"experiments.configs.{module}", fromlist=["x"]).get_config()
  runs = sweep.expand(config, sweep.load_sweep_fn(path))
  assert len(runs) == 9 and len({r.name for r in runs}) == 9
  assert [r.config.asp.max_pruned_round == 0 for r in runs] == [True, False, False] * 3
  assert [r.config.seeds.init for r in runs] == [0] * 3 + [1] * 3 + [2] * 3
  assert {(r.config.rounds, r.config.clients_per_round) for r in runs} == {(rounds, clients)}


def test_run_status_ignores_result_neutral_fields(tmp_path):
  """A finished run is 'done' for a sweep whose config differs only in fields that do not
  change results (progress, eval cadence), as `train` resumes it; any other field: 'new'."""
  run = sweep.Run("r", {}, tiny())
  workdir = tmp_path / "r"
  workdir.mkdir()
  (workdir / "config.json").write_text(run.config.to_json_best_effort())
  (workdir / "summary.json").write_text("{}")
  assert sweep.run_status(run, str(workdir)) == "done"
  neutral = tiny()
  neutral.progress, neutral.eval_every = not neutral.progress, 2
  assert sweep.run_status(run._replace(config=neutral), str(workdir)) == "done"
  other = tiny()
  other.client.learning_rate = 0.5
  assert sweep.run_status(run._replace(config=other), str(workdir)) == "new"


@pytest.mark.parametrize("sweep_fn,message", [
    (None, "defines no sweep\\(add\\) function"),
    (lambda add: None, "added no runs: the sweep is empty"),
    (lambda add: add(**{"client.learning_rat": 0.1}), "config has no field 'client.learning_rat'"),
    (lambda add: add(**{"clien.learning_rate": 0.1}), "config has no field 'clien'"),
    (lambda add: add(**{"client.learning_rate": "fast"}), "client.learning_rate='fast' has the wrong type"),
    (lambda add: add(**{"client.learning_rate": -1.0}),
     "sweep run 'client.learning_rate=-1.0': config.client.learning_rate=-1.0 is invalid"),
    (lambda add: [add(rounds=3), add(rounds=3)], "adds the run 'rounds=3' twice"),
    (lambda add: add(prune_density=1.5), "config.prune_density=1.5 is invalid"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, sweep_fn, message):
  with pytest.raises(build.ConfigError, match=message):
    sweep.run_sweep(tiny(), sweep_fn, str(tmp_path / "root"))
  assert not (tmp_path / "root").exists()


def test_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path):
  root = str(tmp_path / "root")
  calls = []

  def spy(config, workdir, resume=False):
    calls.append((os.path.basename(workdir), resume))
    return train.train_and_evaluate(config, workdir, resume=resume)

  rows = sweep.run_sweep(tiny(), two_lrs, root, train_fn=spy, log=lambda s: None)
  names = [r["run"] for r in rows]
  assert calls == [(names[0], False), (names[1], False)]
  assert [r["status"] for r in rows] == ["ran", "ran"]
  assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["rounds"] == 2 for r in rows)
  with open(os.path.join(root, "sweep_summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(rows))
  with open(os.path.join(root, "sweep_summary.md")) as f:
    table = f.read()
  assert "| run | status | client.learning_rate | client.batch_size |" in table
  assert names[1] in table

  # Interrupt the second run after round 1: its summary and last checkpoint are gone.
  second = os.path.join(root, names[1])
  os.remove(os.path.join(second, "summary.json"))
  shutil.rmtree(os.path.join(second, train.CHECKPOINT_DIR, "step_00000002"))
  accuracy = rows[1]["test_accuracy"]
  calls.clear()
  rows = sweep.run_sweep(tiny(), two_lrs, root, train_fn=spy, log=lambda s: None)
  assert calls == [(names[1], True)]  # the finished run is skipped, the other resumed
  assert [r["status"] for r in rows] == ["skipped (done)", "resumed"]
  assert rows[1]["test_accuracy"] == accuracy  # resumed = bit-identical on CPU


@pytest.mark.parametrize("spec,count,expected", [
    (None, 4, [0, 1, 2, 3]), ("2", 4, [1]), ("2:3", 4, [1, 2]), ("3:", 4, [2, 3]),
    ("4, 1:2", 4, [0, 1, 3]), ("1:2,2", 4, [0, 1])])
def test_runs_spec_selects_one_based_runs(spec, count, expected):
  assert sweep.parse_runs(spec, count) == expected


@pytest.mark.parametrize("spec,message", [
    ("0", "'0' is outside the sweep's runs 1..4"), ("3:2", "'3:2' is outside"),
    ("5:", "'5:' is outside"), ("a", "expected numbers and ranges"), ("1;2", "got '1;2'")])
def test_bad_runs_spec_is_refused_naming_it(spec, message):
  with pytest.raises(build.ConfigError, match=f"--runs={spec!r} is invalid: .*{message}"):
    sweep.parse_runs(spec, 4)


def test_archive_keeps_finished_runs_and_restores_them_into_a_new_workdir(tmp_path):
  """A sweep slice archives what its finished run wrote (no checkpoints); in a fresh
  workdir (another machine) the archived run counts as finished and is not run again,
  its summary and metrics identical; a run of another config is not restored."""
  archive, calls = str(tmp_path / "archive"), []

  def spy(config, workdir, resume=False):
    calls.append(os.path.basename(workdir))
    return train.train_and_evaluate(config, workdir, resume=resume)

  first = sweep.run_sweep(tiny(), two_lrs, str(tmp_path / "a"), train_fn=spy, log=lambda s: None,
                          runs_spec="2", archive=archive)
  name = first[0]["run"]
  assert calls == [name] and len(first) == 1 and first[0]["status"] == "ran"
  assert sorted(os.listdir(archive)) == [name]
  assert sorted(os.listdir(os.path.join(archive, name))) == sorted(sweep.ARCHIVED_FILES)

  calls.clear()
  rows = sweep.run_sweep(tiny(), two_lrs, str(tmp_path / "b"), train_fn=spy, log=lambda s: None,
                         archive=archive)
  assert calls == ["client.learning_rate=0.05"]  # the archived run is restored, not run
  assert [r["status"] for r in rows] == ["ran", "skipped (done)"]
  assert rows[1]["test_accuracy"] == first[0]["test_accuracy"]
  for file in ("metrics.jsonl", "summary.json"):
    with open(os.path.join(tmp_path, "a", name, file)) as f, \
         open(os.path.join(tmp_path, "b", name, file)) as g:
      assert f.read() == g.read()
  assert sorted(os.listdir(archive)) == sorted(r["run"] for r in rows)  # both archived now

  calls.clear()  # another init seed under the same run names: nothing is restored
  config = tiny()
  config.seeds.init += 1
  sweep.run_sweep(config, two_lrs, str(tmp_path / "c"), train_fn=spy, log=lambda s: None,
                  archive=archive)
  assert calls == [r["run"] for r in rows]


def test_a_failing_run_is_reported_and_the_rest_still_run(tmp_path):
  root = tmp_path / "root"
  blocked = root / "client.learning_rate=0.05"
  blocked.mkdir(parents=True)
  (blocked / "config.json").write_text('{"another": "config"}')
  rows = sweep.run_sweep(tiny(), two_lrs, str(root), log=lambda s: None)
  assert rows[0]["status"].startswith("failed: FileExistsError") and "different config" in rows[0]["status"]
  assert rows[1]["status"] == "ran"
  assert (blocked / "config.json").read_text() == '{"another": "config"}'  # untouched


def test_seed_config_shifts_training_seeds_only():
  c = tiny()
  s2 = seeds.seed_config(c, 2)
  assert (s2.seeds.init, s2.seeds.sampling, s2.seeds.training) == (
      c.seeds.init + 2000, c.seeds.sampling + 2000, c.seeds.training + 2000)
  assert s2.seeds.data == c.seeds.data
  assert seeds.seed_config(c, 0).to_dict() == c.to_dict()


@pytest.mark.parametrize("seed_list,message", [
    ([], "no seeds given"), ([0, 0], "repeats a seed"), ([-1], "non-negative integers")])
def test_bad_seed_lists_are_refused(seed_list, message):
  with pytest.raises(build.ConfigError, match=message):
    seeds.run_seeds(tiny(), seed_list)


@pytest.mark.parametrize("seed_list", [
    [0, 3],
    pytest.param([0, 1, 2, 3], marks=pytest.mark.slow),  # 5 runs: ~15 s of CPU
])
def test_vectorised_seeds_equal_separate_runs(tmp_path, seed_list):
  """K seeds as one vmapped program == K separate runs (float tolerance; see seeds.py)."""
  c = tiny(rounds=3)
  c.shard_clients = False  # a separate run sharded over 4 fake devices would sum in another order
  result = seeds.run_seeds(c, seed_list, str(tmp_path / "vec"), log=lambda s: None)
  finals = []
  for k, s in enumerate(seed_list):
    workdir = str(tmp_path / f"seed{s}")
    summary = train.train_and_evaluate(seeds.seed_config(c, s), workdir)
    _, arrays, _ = checkpoint.read_arrays(os.path.join(workdir, train.CHECKPOINT_DIR))
    for layer in ("dense_0", "dense_1"):
      for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(result["params_K"][layer][leaf][k],
                                   arrays[f".params['{layer}']['{leaf}']"], rtol=1e-5, atol=1e-6)
    row = result["per_seed"][k]
    assert row["seed"] == s
    for metric in seeds.REPORTED:
      np.testing.assert_allclose(row[metric], summary[metric], rtol=1e-5, atol=1e-6)
    with open(os.path.join(workdir, "metrics.jsonl")) as f, \
        open(tmp_path / "vec" / f"seed_{s}" / "metrics.jsonl") as g:
      sep = [json.loads(l) for l in f]
      vec = [json.loads(l) for l in g]
    assert [r["round"] for r in vec] == [1, 2, 3]
    np.testing.assert_allclose([r["train_loss"] for r in vec], [r["train_loss"] for r in sep],
                               rtol=1e-5)
    finals.append(result["params_K"]["dense_0"]["kernel"][k])
  assert not np.array_equal(finals[0], finals[1])  # the seeds really differ
  accs = [r["test_accuracy"] for r in result["per_seed"]]
  assert result["mean"]["test_accuracy"] == pytest.approx(np.mean(accs))
  assert result["std"]["test_accuracy"] == pytest.approx(np.std(accs, ddof=1))
  with open(tmp_path / "vec" / "seeds_summary.json") as f:
    assert json.load(f)["per_seed"] == result["per_seed"]


def test_converged_sweeps_script_lists_every_sweep_and_refuses_unknown_names():
  """experiments/converged_sweeps.sh: every sweep it names loads (config file and arg) and
  expands to distinct runs; the counts it lists are the sweeps' own; a typo is refused."""
  import subprocess
  import sys
  env = {**os.environ, "PYTHON": sys.executable}
  script = os.path.join("experiments", "converged_sweeps.sh")
  listing = subprocess.run(["bash", script, "--list"], capture_output=True, text=True, env=env,
                           check=True).stdout.splitlines()
  rows = {line.split()[0]: line.split()[1:] for line in listing[1:]}
  assert list(rows)[:3] == ["fedtiny_cifar10_converged", "cavp_cifar10_centralised",
                            "cavp_femnist_converged"]  # the brief's order: issues 24-26 first
  for name, (config_spec, counts, *skipped) in rows.items():
    path, _, arg = config_spec.partition(":")
    module = __import__(f"experiments.configs.{os.path.basename(path)[:-3]}", fromlist=["x"])
    archived, total = map(int, counts.split("/"))
    if total == 0:  # a text method sweep waiting for its dense seed 0 (fedavg_shakespeare)
      with pytest.raises(build.ConfigError, match="sweep is empty"):
        sweep.expand(module.get_config(arg or None), sweep.load_sweep_fn(config_spec))
      continue
    runs = sweep.expand(module.get_config(arg or None), sweep.load_sweep_fn(config_spec))
    assert total == len(runs) == len({r.name for r in runs}) and 0 <= archived <= total, name
  assert rows["robust_femnist"][2:] == ["(runs", "8:)"]
  for bad in (["no_such_sweep"], ["--config.rounds=3"]):
    result = subprocess.run(["bash", script, *bad], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and bad[0] in result.stderr


def _archive_cavp_run(archive, name, gamma, structures, accuracy, seed=0, dense=False):
  """One finished run as `experiments.sweep --archive` keeps it (the fields the rule reads)."""
  run = archive / name
  run.mkdir(parents=True)
  config = {"seeds": {"init": seed, "sampling": seed, "training": seed, "data": 3},
            "cavp": {"gamma": 0.0 if dense else gamma, "structures": structures,
                     "theta_learning_rate": 0.0 if dense else 0.1}}
  (run / "config.json").write_text(json.dumps(config))
  (run / "summary.json").write_text(json.dumps({"test_accuracy": accuracy}))


def _archive_cavp_grid(archive, dense, by_cell, structures=("both", "units", "layers")):
  _archive_cavp_run(archive, "dense", 0.0, structures[0], dense, dense=True)
  for (gamma, s), acc in by_cell.items():
    _archive_cavp_run(archive, f"{s}_{gamma}", gamma, s, acc)


def test_chosen_gamma_is_the_largest_gamma_within_3_points_of_dense_in_the_structure_mean(
    tmp_path):
  """The pre-registered rule of the CAVP sweeps (`cavp_cifar10.chosen_gamma`): the largest γ
  whose seed-0 accuracy, averaged over the structures, is within 3 points of dense seed 0;
  the smallest γ if none is; None while any seed-0 cell is missing."""
  from experiments.configs import cavp_cifar10
  gammas, structures = (0.5, 1.0, 2.0, 4.0), ("both", "units", "layers")
  rule = lambda archive: cavp_cifar10.chosen_gamma(str(archive), gammas, structures)
  acc = {0.5: (0.75, 0.75, 0.75),   # the best mean
         1.0: (0.72, 0.72, 0.72),   # 4 points under dense: fails
         2.0: (0.79, 0.70, 0.70),   # mean 0.73, exactly 3 points under: within
         4.0: (0.79, 0.66, 0.66)}   # 'both' alone is within, the mean is 5.3 under: fails
  cells = {(g, s): a for g, accs in acc.items() for s, a in zip(structures, accs)}
  _archive_cavp_grid(tmp_path / "a", 0.76, cells)
  # not the γ before the first that fails (0.5), not the largest by 'both' alone (4.0), not
  # the best mean (0.5), and 3 points counts as within
  assert rule(tmp_path / "a") == 2.0
  # a seed-1 run and an unfinished run are ignored; a missing seed-0 cell gives None
  _archive_cavp_run(tmp_path / "a", "both_4.0_seed1", 4.0, "both", 0.1, seed=1)
  (tmp_path / "a" / "unfinished").mkdir()
  assert rule(tmp_path / "a") == 2.0
  del cells[(4.0, "layers")]
  _archive_cavp_grid(tmp_path / "b", 0.76, cells)
  assert rule(tmp_path / "b") is None
  assert rule(tmp_path / "no_such_folder") is None
  # no γ within 3 points: the smallest
  _archive_cavp_grid(tmp_path / "c", 0.90, {(g, s): 0.5 for g in gammas for s in structures})
  assert rule(tmp_path / "c") == 0.5
  # 3 points exactly is within; a duplicate cell (mixed configs) is refused
  _archive_cavp_grid(tmp_path / "d", 0.80, {(g, "units"): 0.77 if g == 2.0 else 0.6
                                            for g in gammas}, structures=("units",))
  assert cavp_cifar10.chosen_gamma(str(tmp_path / "d"), gammas, ("units",)) == 2.0
  _archive_cavp_run(tmp_path / "d", "units_2.0_again", 2.0, "units", 0.5)
  with pytest.raises(ValueError, match="two finished seed-0 runs"):
    cavp_cifar10.chosen_gamma(str(tmp_path / "d"), gammas, ("units",))


@pytest.mark.parametrize("module,seed0_runs", [("cavp_cifar10_centralised", 13 + 6),
                                               ("cavp_femnist_converged", 5)])
def test_cavp_sweeps_run_seeds_1_2_gated_only_at_a_chosen_gamma(module, seed0_runs, monkeypatch,
                                                                 tmp_path):
  """Until every seed-0 run is archived, seeds 1 and 2 run dense only; then they add the
  gated cells at the rule's γ (and only there); CHOSEN_GAMMA overrides the rule."""
  config_module = __import__(f"experiments.configs.{module}", fromlist=["x"])
  assert config_module.CHOSEN_GAMMA is None
  assert os.path.samefile(os.path.dirname(config_module.ARCHIVE),
                          os.path.join("docs", "results", "runs"))
  monkeypatch.setattr(config_module, "ARCHIVE", str(tmp_path / "archive"))

  def later_seeds():
    runs = sweep.expand(config_module.get_config(), config_module.sweep)
    assert sum(r.config.seeds.init == 0 for r in runs) == seed0_runs
    return [r.config for r in runs if r.config.seeds.init > 0]

  assert [c.cavp.gamma for c in later_seeds()] == [0.0, 0.0]  # the dense cells
  structures = getattr(config_module, "STRUCTURES", ("units",))
  _archive_cavp_grid(tmp_path / "archive", 0.7,
                     {(g, s): 0.7 - 0.02 * g for g in config_module.GAMMAS for s in structures},
                     structures)  # within 3 points up to γ = 1
  gated = [c for c in later_seeds() if c.cavp.gamma > 0]
  assert {c.cavp.gamma for c in gated} == {1.0} and len(gated) == 2 * len(structures)
  assert {c.cavp.structures for c in gated} == set(structures)
  monkeypatch.setattr(config_module, "CHOSEN_GAMMA", 2.0)
  assert {c.cavp.gamma for c in later_seeds()} == {0.0, 2.0}
  extra = getattr(config_module, "EXTRA_GAMMAS", ())
  if extra:  # the post-hoc extension: seed 0, after every headline run, not read by the rule
    runs = sweep.expand(config_module.get_config(), config_module.sweep)
    tail = runs[-len(extra) * len(structures):]
    assert {(c.config.cavp.gamma, c.config.cavp.structures) for c in tail} == {
        (g, s) for g in extra for s in structures}
    assert {c.config.seeds.init for c in tail} == {0}
    assert not set(extra) & set(config_module.GAMMAS)


def test_converged_sweeps_script_reruns_a_sweep_whose_grid_grew(tmp_path):
  """experiments/converged_sweeps.sh runs a sweep again when its grid grew while it ran (the
  CAVP sweeps' headline γ), stops when it did not, and stops at a failing sweep with its
  status. Run on a copy of the script with a stand-in Python that counts and logs calls."""
  import subprocess
  (tmp_path / "experiments").mkdir()
  shutil.copy(os.path.join("experiments", "converged_sweeps.sh"), tmp_path / "experiments")
  fake = tmp_path / "python"
  fake.write_text("""#!/usr/bin/env bash
state="$(dirname "$0")/state"
if [ "$1" = -c ]; then cat "$state/count"; exit 0; fi
echo "$*" >> "$state/calls"
if [ ! -f "$state/grown" ]; then touch "$state/grown"; echo 21 > "$state/count"; fi
exit "$(cat "$state/status")"
""")
  fake.chmod(0o755)
  state = tmp_path / "state"
  state.mkdir()
  (state / "count").write_text("15\n")
  (state / "status").write_text("0\n")
  env = {**os.environ, "PYTHON": str(fake)}
  script = str(tmp_path / "experiments" / "converged_sweeps.sh")
  result = subprocess.run(["bash", script, "cavp_cifar10_centralised"], capture_output=True,
                          text=True, env=env)
  assert result.returncode == 0, result.stderr
  calls = (state / "calls").read_text().splitlines()
  assert len(calls) == 2 and all("experiments/configs/cavp_cifar10_centralised.py" in c and
                                 "--archive docs/results/runs/cavp_cifar10_centralised" in c
                                 for c in calls)
  assert "grew from 15 to 21 runs" in result.stdout
  (state / "calls").unlink()
  (state / "status").write_text("3\n")
  result = subprocess.run(["bash", script, "cavp_femnist_converged", "dp_femnist"],
                          capture_output=True, text=True, env=env)
  assert result.returncode == 3 and "sweep cavp_femnist_converged failed" in result.stderr
  assert len((state / "calls").read_text().splitlines()) == 1  # dp_femnist never started


_REFUSING_CONFIG = """
from experiments.configs.fedavg_tiny import get_config

def sweep(add):
  raise ValueError("the dense run did not converge: seed 1 gained 2.0 points")
"""


def test_a_refused_grid_is_one_line_from_the_sweep_and_the_queue(tmp_path):
  """A grid that refuses its finished runs (ValueError from the config's sweep) is a
  ConfigError naming the refusal: `python -m experiments.sweep` prints it as one line and
  creates nothing; converged_sweeps.sh's grid count prints it as one line and stops the
  queue before the sweep runs. Any other exception in a sweep is a bug and propagates."""
  import subprocess
  import sys
  configs = tmp_path / "experiments" / "configs"
  configs.mkdir(parents=True)
  path = configs / "cavp_cifar10_centralised.py"  # the queue's name, the refusing grid
  path.write_text(_REFUSING_CONFIG)
  refusal = "the config's sweep refused its grid: the dense run did not converge: seed 1"
  with pytest.raises(build.ConfigError, match=refusal):
    sweep.expand(tiny(), sweep.load_sweep_fn(str(path)))
  with pytest.raises(KeyError):  # not a refusal: a bug keeps its traceback
    sweep.grid(lambda add: {}["missing"])
  env = {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHON": sys.executable}
  result = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={path}",
                           f"--workdir={tmp_path / 'root'}"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
  assert result.returncode != 0 and refusal in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "root").exists()
  shutil.copy(os.path.join("experiments", "converged_sweeps.sh"), tmp_path / "experiments")
  result = subprocess.run(["bash", "experiments/converged_sweeps.sh", "cavp_cifar10_centralised"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
  assert result.returncode == 1 and refusal in result.stderr
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "workdir" / "cavp_cifar10_centralised.log").exists()  # never ran


def _archive_fiarse_dense(archive, seed, accuracy_at, rounds=800, method="heterofl",
                          capacities=(1.0,)):
  run = archive / f"{method},{len(capacities)},{seed}"
  run.mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(
      {"method": method, "hetero": {"capacities": list(capacities)}, "rounds": rounds,
       "seeds": {"init": seed, "sampling": seed, "training": seed}}))
  (run / "metrics.jsonl").write_text("".join(
      json.dumps({"round": r, "test_accuracy": accuracy_at(r)}) + "\n"
      for r in range(20, rounds + 1, 20)))
  (run / "summary.json").write_text(json.dumps({"test_accuracy": accuracy_at(rounds)}))


def test_fiarse_cifar_sweep_lists_method_rows_only_once_dense_converged(tmp_path, monkeypatch):
  """The 800-round CIFAR sweep runs its 3 dense rows first and its 15 method rows only once
  all three are archived and converged (REPRODUCE.md §1 on each curve); a dense run still
  climbing stops it with its gain; method runs in the archive are not dense runs."""
  from experiments.configs import fiarse_cifar10_converged as module
  monkeypatch.setattr(module, "ARCHIVE", str(tmp_path))
  flat = lambda r: 0.5 if r >= 300 else 0.3  # noqa: E731

  def grid():
    return sweep.expand(module.get_config(), module.sweep)

  dense_only = [("heterofl", (1.0,))] * 3
  assert [(r.config.method, r.config.hetero.capacities) for r in grid()] == dense_only
  _archive_fiarse_dense(tmp_path, 0, flat)
  _archive_fiarse_dense(tmp_path, 1, flat)
  _archive_fiarse_dense(tmp_path, 2, flat, method="fiarse", capacities=(1.0, 0.25))
  assert len(grid()) == 3 and module.dense_converged() is False  # seed 2's dense is missing
  _archive_fiarse_dense(tmp_path, 2, flat)
  runs = grid()
  assert len(runs) == 18 and [r.config.seeds.init for r in runs[:3]] == [0, 1, 2]
  assert {r.config.method for r in runs[3:]} == {"fiarse", "heterofl", "fedrolex", "scalefl"}
  _archive_fiarse_dense(tmp_path / "climbing", 0, flat)
  _archive_fiarse_dense(tmp_path / "climbing", 1, lambda r: r / 8000)  # +2 points at the end
  _archive_fiarse_dense(tmp_path / "climbing", 2, flat)
  with pytest.raises(ValueError, match=r"did not converge .* seed 1 gained 2\.0 points"):
    module.dense_converged(str(tmp_path / "climbing"))


def _archive_text_run(archive, name, seed, rounds, accuracy_at):
  """A finished dense text run as the sweep archives it: config, summary and its curve
  (an evaluation every 20 rounds)."""
  run = archive / name
  run.mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(
      {"seeds": {"init": seed, "sampling": seed, "training": seed}, "rounds": rounds}))
  (run / "metrics.jsonl").write_text("".join(
      json.dumps({"round": r, "test_accuracy": accuracy_at(r)}) + "\n"
      for r in range(20, rounds + 1, 20)))
  (run / "summary.json").write_text(json.dumps({"test_accuracy": accuracy_at(rounds)}))


def test_load_sweep_fn_passes_the_config_arg_to_a_sweep_that_takes_one(tmp_path):
  path = tmp_path / "two_sweeps.py"
  path.write_text("def sweep(add, arg=None):\n  add(**{'tag': arg})\n")
  for spec, want in ((f"{path}:a,b", "a,b"), (str(path), None)):
    got = []
    sweep.load_sweep_fn(spec)(lambda **kw: got.append(kw))
    assert got == [{"tag": want}]


def test_text_sweeps_run_the_other_seeds_and_methods_for_the_dense_plateau_round(
    tmp_path, monkeypatch):
  """fedavg_shakespeare's rule: the dense seed 0 alone until it is archived; then dense seeds
  1, 2 and every method's seeds at `curves.plateau_round` of its curve (560 for a step to the
  plateau at round 400), per model (the LSTM's archive does not set the transformer's R);
  a dense seed 0 that did not converge stops them with an error that says so."""
  from experiments import curves
  from experiments.configs import fedavg_shakespeare as text
  archives = {m: tmp_path / d for m, d in text.DENSE_SWEEPS.items()}
  monkeypatch.setattr(text, "dense_archive", lambda model: str(archives[model]))
  path = os.path.join("experiments", "configs", "fedavg_shakespeare.py")

  def grid(arg):
    runs = []
    text.sweep(lambda **kw: runs.append(kw), arg)
    return runs

  seed0 = {"seeds.init": 0, "seeds.sampling": 0, "seeds.training": 0}
  assert grid("transformer") == [seed0] and grid("transformer,asp") == grid("fedtiny") == []
  step = lambda r: 0.5 if r >= 400 else 0.2  # noqa: E731
  _archive_text_run(archives["transformer"], "seed0", 0, 1000, step)
  _archive_text_run(archives["transformer"], "seed1_running", 1, 1000, step)
  (archives["transformer"] / "seed1_running" / "summary.json").unlink()  # unfinished: ignored
  assert curves.plateau_round(curves.read_curve(str(archives["transformer"] / "seed0")),
                              1000) == 560
  dense = grid("transformer")
  assert dense[0] == seed0 and [r.get("rounds") for r in dense] == [None, 560, 560]
  for arg in ("transformer,asp", "fiarse", "cavp"):
    assert [(r["seeds.init"], r["rounds"]) for r in grid(arg)] == [(0, 560), (1, 560), (2, 560)]
  assert grid("fedtiny") == [] and grid("") == [seed0]  # the LSTM waits for its own dense run
  # the queue loads the sweep as "file.py:arg": the loader hands the arg on
  loaded = sweep.load_sweep_fn(path + ":transformer,asp")
  assert loaded.keywords == {"arg": "transformer,asp"}
  _archive_text_run(archives["lstm"], "seed0", 0, 1000, lambda r: r / 2000)  # still climbing
  with pytest.raises(ValueError, match="dense lstm run .* not converged at round 1000"):
    grid("fedtiny")
  _archive_text_run(archives["transformer"], "seed0_again", 0, 1000, step)
  with pytest.raises(ValueError, match="2 finished dense seed-0 runs"):
    grid("cavp")

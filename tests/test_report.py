"""experiments.report: groups runs that differ only in seeds, mean ± sample std, tails."""
import json
import math
import os
import statistics

import pytest

from experiments import report


def _run(root, name, *, k, seed, accs, params=100, finished=True, ratio=None):
  """A fake workdir: config.json, metrics.jsonl with test_accuracy every 5 rounds."""
  path = os.path.join(root, name)
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"asp": {"k": k}, "seeds": {"init": seed, "training": seed}, "rounds": 50}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for i, acc in enumerate(accs):
      f.write(json.dumps({"round": 5 * (i + 1), "test_accuracy": acc, "params": params}) + "\n")
  if finished:
    summary = {"test_accuracy": accs[-1], "rounds": 5 * len(accs), "params": params,
               "flops": 10 * params}
    if ratio is not None:
      summary["communication_ratio"] = ratio
    with open(os.path.join(path, "summary.json"), "w") as f:
      json.dump(summary, f)
  return path


def test_groups_ignore_seeds_and_give_mean_std_tail_and_curve(tmp_path):
  root = str(tmp_path)
  ramp = [0.1, 0.2, 0.3, 0.4] + [0.45] * 10  # rounds 5 ... 70
  _run(root, "a0", k=2.2, seed=0, accs=ramp + [0.45, 0.46, 0.45, 0.48, 0.47, 0.50], ratio=4.0)
  _run(root, "a1", k=2.2, seed=1, accs=ramp + [0.45, 0.45, 0.45, 0.50, 0.55, 0.60], ratio=6.0)
  _run(root, "a2", k=2.2, seed=2, accs=[0.1, 0.2], finished=False)
  _run(root, "b0", k=1.5, seed=0, accs=ramp + [0.45] * 6, params=40)
  groups = report.group_runs(report.plot.find_runs([root]))
  assert [(label, len(m)) for label, m in groups] == [("asp.k=2.2", 3), ("asp.k=1.5", 1)]
  row = report.summarise_group(groups[0][1], [10, 100])
  assert row["finished"] == 2 and row["running"] == [("a2", 10)]
  mean, std = row["test_accuracy"]
  assert mean == pytest.approx(0.55) and std == pytest.approx(math.sqrt(0.005))  # sample std
  # Tail of 100 rounds: the mean of the last 3 evaluations (rounds 90-100) minus that of
  # the 3 up to round 80 (70-80); a1: 0.55 - 0.45 = 0.1 (a0: 0.4833 - 0.4533 = 0.03).
  assert row["tail_gain_max"] == pytest.approx(0.1)
  assert report.tail_gain(report.accuracy_curve(report.plot.load_run(groups[0][1][0])), 100) == (
      pytest.approx(0.03))
  assert row["communication_ratio"][0] == pytest.approx(5.0)
  assert row["curve"][100][0] == pytest.approx(0.55) and row["curve"][10][0] == pytest.approx(0.2)
  single = report.summarise_group(groups[1][1], [])
  assert single["test_accuracy"][0] == pytest.approx(0.45) and math.isnan(single["test_accuracy"][1])
  assert single["tail_gain_max"] == pytest.approx(0.0)
  table = report.report([root], [100])
  assert "| asp.k=2.2 | 2 (+a2 at 10) | 0.550 ± 0.071 | +10.0 pt | 100 | 1,000 | 5.00 | 0.550 ± 0.071 |" in table
  assert "| asp.k=1.5 | 1 | 0.450 | +0.0 pt |" in table
  # Too short a curve for two disjoint 3-evaluation ends: no tail claimed.
  assert report.tail_gain({10: 0.1, 20: 0.2, 30: 0.3, 40: 0.4, 50: 0.5}, 50) is None


def test_plateau_column_averages_each_runs_evaluations_from_a_round(tmp_path):
  root = str(tmp_path)
  _run(root, "a0", k=2.2, seed=0, accs=[0.1, 0.2, 0.5, 0.7])  # rounds 5 ... 20
  _run(root, "a1", k=2.2, seed=1, accs=[0.1, 0.2, 0.3, 0.5])
  _run(root, "a2", k=2.2, seed=2, accs=[0.9, 0.9, 0.9], finished=False)  # not counted
  assert report.plateau_mean({5: 0.1, 10: 0.2, 15: 0.5, 20: 0.7}, 15) == pytest.approx(0.6)
  assert report.plateau_mean({5: 0.1}, 10) is None
  row = report.summarise_group(report.group_runs(report.plot.find_runs([root]))[0][1], [], 15)
  mean, std = row["plateau"]  # a0: (0.5 + 0.7) / 2 = 0.6, a1: (0.3 + 0.5) / 2 = 0.4
  assert mean == pytest.approx(0.5) and std == pytest.approx(math.sqrt(0.02))
  table = report.report([root], [20], plateau_from=15)
  assert "| comm. ratio | mean of evals ≥15 | @20 |" in table
  assert "| 0.500 ± 0.141 | 0.600 ± 0.141 |" in table
  assert "mean of evals" not in report.report([root], [20])


def test_main_refuses_a_directory_without_runs(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(tmp_path)])
  assert exit_info.value.code == 2
  assert "holds no metrics.jsonl" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    report.main([str(tmp_path), "--rounds", "1,x"])
  assert "--rounds must be comma-separated integers" in capsys.readouterr().err


def test_summary_columns_average_summary_fields_and_refuse_partial_or_non_numeric(tmp_path):
  root = str(tmp_path)
  a0 = _run(root, "a0", k=2.2, seed=0, accs=[0.5, 0.6])
  a1 = _run(root, "a1", k=2.2, seed=1, accs=[0.5, 0.7])
  _run(root, "b0", k=1.5, seed=0, accs=[0.5, 0.4])  # records no cost: "–"
  for path, cost in ((a0, 1e9), (a1, 3e9)):
    summary_path = os.path.join(path, "summary.json")
    with open(summary_path) as f:
      summary = json.load(f)
    summary["client_training_flops_per_round"] = cost
    with open(summary_path, "w") as f:
      json.dump(summary, f)
  groups = report.group_runs(report.plot.find_runs([root]))
  mean, std = report.summarise_group(groups[0][1], [], summary_fields=(
      "client_training_flops_per_round",))["summary"]["client_training_flops_per_round"]
  assert mean == pytest.approx(2e9) and std == pytest.approx(math.sqrt(2) * 1e9)
  table = report.report([root], [], summary_fields=("client_training_flops_per_round",))
  assert "| comm. ratio | client_training_flops_per_round |" in table
  assert "| 2e+09 ± 1.4e+09 |" in table and "| 0.400 | – | 100 | 1,000 | – | – |" in table
  with open(os.path.join(a1, "summary.json")) as f:
    summary = json.load(f)
  del summary["client_training_flops_per_round"]
  with open(os.path.join(a1, "summary.json"), "w") as f:
    json.dump(summary, f)
  with pytest.raises(ValueError, match=r"missing from runs \['a1'\]"):
    report.report([root], [], summary_fields=("client_training_flops_per_round",))
  summary["method"] = "x"
  for path in (a0, a1):
    with open(os.path.join(path, "summary.json"), "w") as f:
      json.dump(summary, f)
  with pytest.raises(ValueError, match="'method' is 'x', not a number"):
    report.report([root], [], summary_fields=("method",))


def _method_run(root, name, *, method, density, seed, accs):
  """A fake finished workdir of `method` at `density`, evaluations every 10 of 30 rounds."""
  path = os.path.join(root, name)
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"method": method, "sparse": {"density": density},
               "seeds": {"init": seed, "sampling": seed}, "rounds": 10 * len(accs)}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for i, acc in enumerate(accs):
      f.write(json.dumps({"round": 10 * (i + 1), "test_accuracy": acc}) + "\n")
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump({"test_accuracy": accs[-1], "rounds": 10 * len(accs)}, f)
  return path


def test_paired_differences_match_runs_by_seed_and_pair_on_fields(tmp_path):
  root = str(tmp_path)
  # The reference's seeds spread 10 points; "b" is +2, +1, -1 points from it seed by seed.
  for seed, final in ((0, 0.40), (1, 0.50), (2, 0.45)):
    _method_run(root, f"ref_d1_s{seed}", method="ref", density=0.1, seed=seed,
                accs=[0.3, final - 0.02, final])
  for seed, final in ((2, 0.44), (0, 0.42), (1, 0.51)):  # listed out of seed order
    _method_run(root, f"b_d1_s{seed}", method="b", density=0.1, seed=seed,
                accs=[0.3, final, final])
  _method_run(root, "b_d1_s3", method="b", density=0.1, seed=3, accs=[0.9, 0.9, 0.9])  # no partner
  _method_run(root, "ref_d2_s0", method="ref", density=0.2, seed=0, accs=[0.1, 0.2, 0.3])
  _method_run(root, "b_d2_s0", method="b", density=0.2, seed=0, accs=[0.1, 0.2, 0.25])
  workdirs = report.plot.find_runs([root])
  references = report.reference_runs(workdirs, {"method": "ref"}, ("sparse.density",))
  groups = dict(report.group_runs(workdirs))
  b1 = report.paired_differences(groups["method=b, sparse.density=0.1"], references,
                                 ("sparse.density",), plateau_from=20)
  mean, std = b1["final"]
  assert b1["pairs"] == 3 and b1["ahead"] == 2  # seed 3 has no reference run: left out
  assert mean == pytest.approx(0.02 / 3) and std == pytest.approx(
      statistics.stdev([0.02, 0.01, -0.01]))
  # Plateau from round 20: b's (final, final) against the reference's (final - 0.02, final):
  # +0.03, +0.02, 0.00 (a tie is not ahead).
  assert b1["plateau"][0] == pytest.approx(0.02 / 3 + 0.01) and b1["ahead_plateau"] == 2
  b2 = report.paired_differences(groups["method=b, sparse.density=0.2"], references,
                                 ("sparse.density",))
  assert b2["final"][0] == pytest.approx(-0.05) and b2["pairs"] == 1  # density 0.2's reference
  ref = report.paired_differences(groups["method=ref, sparse.density=0.1"], references,
                                  ("sparse.density",))
  assert ref["is_reference"] and not b1["is_reference"]
  table = report.report([root], [], paired_with={"method": "ref"}, pair_on=("sparse.density",))
  assert "| Δ vs reference (paired) |" in table
  assert "| method=b, sparse.density=0.1 | 4 |" in table and "+0.007 ± 0.015 (2/3) |" in table
  assert "| -0.050 (0/1) |" in table and "| reference |" in table
  # Without pairing on density each seed-0 reference is ambiguous; a wrong field is named.
  with pytest.raises(ValueError, match="both match"):
    report.report([root], [], paired_with={"method": "ref"})
  with pytest.raises(ValueError, match="no finished run matches"):
    report.report([root], [], paired_with={"method": "c"}, pair_on=("sparse.density",))
  with pytest.raises(ValueError, match=r"\['sparse.dens'\] are in no run"):
    report.report([root], [], paired_with={"method": "ref"}, pair_on=("sparse.dens",))
  assert report.parse_match("method=fedtiny, sparse.density=0.1") == {
      "method": "fedtiny", "sparse.density": 0.1}
  with pytest.raises(ValueError, match="KEY=VALUE"):
    report.parse_match("method")


def test_main_refuses_pair_on_without_paired_with(tmp_path, capsys):
  _method_run(str(tmp_path), "a", method="a", density=0.1, seed=0, accs=[0.1])
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(tmp_path), "--pair_on", "sparse.density"])
  assert exit_info.value.code == 2 and "--pair_on needs --paired_with" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    report.main([str(tmp_path), "--paired_with", "method"])
  assert exit_info.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err

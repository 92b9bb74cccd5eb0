"""experiments.plot: workdirs -> PNGs (hand-written metrics, no training)."""
import json
import os

import matplotlib.image
import numpy as np
import pytest

from experiments import plot


def _workdir(root, name, *, params, acc, density=None, cut_last_line=False):
  path = root / name
  path.mkdir(parents=True)
  lines = []
  for r in range(1, 5):
    record = {"round": r, "train_loss": 2.0 / r, "params": params, "flops": 2 * params}
    if r % 2 == 0:
      record.update(test_accuracy=acc * r / 4, local_accuracy_mean=acc * r / 5)
    if density is not None:
      record["density/dense_0/kernel"] = 1.0 if r < 3 else density
      record["density/dense_1/kernel"] = 1.0 if r < 3 else 2 * density
    lines.append(json.dumps(record))
  text = "\n".join(lines) + "\n"
  if cut_last_line:
    text += '{"round": 5, "train_lo'  # what a kill mid-write leaves
  (path / "metrics.jsonl").write_text(text)
  (path / "summary.json").write_text(json.dumps({"test_accuracy": acc, "params": params,
                                                 "flops": 2 * params}))
  return str(path)


def test_pareto_front_keeps_the_non_dominated_points():
  points = [(100, 0.9), (50, 0.8), (60, 0.7), (10, 0.5), (10, 0.6), (200, 0.85)]
  assert plot.pareto_front(points) == [(10, 0.6), (50, 0.8), (100, 0.9)]


def test_find_runs_expands_a_sweep_root(tmp_path):
  a = _workdir(tmp_path / "sweep", "a", params=100, acc=0.5)
  b = _workdir(tmp_path / "sweep", "b", params=50, acc=0.4)
  (tmp_path / "sweep" / "not_a_run").mkdir()
  single = _workdir(tmp_path, "single", params=10, acc=0.2)
  assert plot.find_runs([str(tmp_path / "sweep"), single]) == [a, b, single]


def test_plots_are_written_and_are_images(tmp_path):
  _workdir(tmp_path / "runs", "dense", params=1000, acc=0.8)
  _workdir(tmp_path / "runs", "sparse", params=100, acc=0.6, density=0.1, cut_last_line=True)
  written = plot.plot_workdirs([str(tmp_path / "runs")], str(tmp_path / "out"))
  names = sorted(os.path.basename(p) for p in written)
  # Only the run that logs densities gets a per-layer plot.
  assert names == ["accuracy_vs_round.png", "accuracy_vs_size.png", "layers_sparse.png"]
  for path in written:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert np.std(image) > 0.01  # not a blank canvas


def test_load_run_skips_a_line_cut_by_a_kill(tmp_path):
  run = plot.load_run(_workdir(tmp_path, "r", params=10, acc=0.5, cut_last_line=True))
  assert [r["round"] for r in run["records"]] == [1, 2, 3, 4]
  assert plot.final_value(run, "test_accuracy") == 0.5  # summary wins over records
  assert plot.final_value(run, "train_loss") == 0.5
  assert plot.final_value(run, "missing") is None


def test_runs_are_labelled_by_label_at_path_or_by_the_fields_that_differ(tmp_path):
  dense = _workdir(tmp_path / "other", "asp.max_pruned_round=0,seeds.init=0", params=100, acc=0.8)
  _workdir(tmp_path / "k", "asp.k=1.5,seeds.init=0", params=10, acc=0.6)
  _workdir(tmp_path / "k", "asp.k=2.5,seeds.init=0", params=50, acc=0.7)
  _workdir(tmp_path / "more", "x=1", params=5, acc=0.1)
  _workdir(tmp_path / "more", "x=2", params=6, acc=0.2)
  runs = plot.load_labelled([f"dense@{dense}", str(tmp_path / "k"), f"M@{tmp_path / 'more'}"])
  assert [r["label"] for r in runs] == ["dense", "asp.k=1.5", "asp.k=2.5", "M: x=1", "M: x=2"]
  assert plot.short_names(["a=1,s=0", "a=1,s=0"]) == ["(base)", "(base)"]
  assert plot.short_names(["a=1,s=0"]) == ["a=1,s=0"]  # one run: nothing is "shared"
  assert plot.split_label("no_label/path") == (None, "no_label/path")
  written = plot.plot_workdirs([f"dense@{dense}", str(tmp_path / "k")], str(tmp_path / "out"))
  assert len(written) == 2


def _config_run(root, name, config, accs, bytes_up, finished=True):
  """A workdir with config.json and test accuracies `accs` at rounds 1.. (bytes each round);
  a finished run has its summary.json."""
  path = root / name
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  (path / "metrics.jsonl").write_text("".join(
      json.dumps({"round": r + 1, "test_accuracy": a, "bytes_up": bytes_up}) + "\n"
      for r, a in enumerate(accs)))
  if finished:
    (path / "summary.json").write_text(json.dumps({"test_accuracy": accs[-1]}))
  return str(path)


def test_field_sweep_pools_seeds_per_series_and_x(tmp_path):
  """Final values against a config field, one series per aggregator, seeds pooled (mean,
  sample std), `--where` filtering on a config field, 'sum:' totalling a record key;
  unfinished runs (no summary.json) left out."""
  root = tmp_path / "sweep"
  final = {("mean", 0.0): (0.8, 0.82), ("mean", 0.2): (0.1, 0.3), ("median", 0.2): (0.7, 0.7)}
  for (agg, frac), accs in final.items():
    for seed, acc in enumerate(accs):
      config = {"robust": {"aggregator": agg}, "attack": {"fraction": frac, "kind": "sign_flip"},
                "seeds": {"init": seed}}
      _config_run(root, f"{agg},{frac},{seed}", config, [0.05, acc], bytes_up=10 * (seed + 1))
  _config_run(root, "backdoor", {"robust": {"aggregator": "mean"},
                                 "attack": {"fraction": 0.2, "kind": "backdoor"},
                                 "seeds": {"init": 0}}, [0.5, 0.6], bytes_up=1)
  _config_run(root, "running", {"robust": {"aggregator": "krum"},  # unfinished: left out
                                "attack": {"fraction": 0.2, "kind": "sign_flip"},
                                "seeds": {"init": 0}}, [0.1], bytes_up=1, finished=False)
  runs = plot.load_labelled([str(root)])
  got = plot.field_sweep(runs, "attack.fraction", ["robust.aggregator"], "test_accuracy",
                         where=["attack.kind=sign_flip"])
  assert set(got) == {"robust.aggregator=mean", "robust.aggregator=median"}
  (x0, m0, s0, n0), (x1, m1, s1, n1) = got["robust.aggregator=mean"]
  assert (x0, n0, x1, n1) == (0.0, 2, 0.2, 2)
  np.testing.assert_allclose([m0, s0, m1, s1], [0.81, np.std([0.8, 0.82], ddof=1), 0.2,
                                                np.std([0.1, 0.3], ddof=1)])
  assert got["robust.aggregator=median"] == [(0.2, 0.7, 0.0, 2)]
  # without the filter the backdoor run joins the mean at 0.2
  assert plot.field_sweep(runs, "attack.fraction", ["robust.aggregator"],
                          "test_accuracy")["robust.aggregator=mean"][1][3] == 3
  totals = plot.field_sweep(runs, "sum:bytes_up", [], "test_accuracy",
                            where=["robust.aggregator=median"])
  assert totals == {"test_accuracy": [(20.0, 0.7, 0.0, 1), (40.0, 0.7, 0.0, 1)]}
  out = tmp_path / "out"
  plot.main(["--out", str(out), "--x", "attack.fraction", "--series", "robust.aggregator",
             "--where", "attack.kind=sign_flip", str(root)])
  image = matplotlib.image.imread(out / "test_accuracy_vs_attack.fraction.png")
  assert image.ndim == 3 and np.std(image) > 0.01
  with pytest.raises(SystemExit, match="no run has both --x 'attack.fraction'"):
    plot.main(["--out", str(out), "--x", "attack.fraction", "--where", "attack.kind=none",
               str(root)])


def test_baseline_runs_are_one_level_not_a_series_point(tmp_path):
  """`--baseline sparse.method=dense`: the dense runs (whose config holds the default
  density 0.05) leave the series and become one level, mean ± sample std over seeds."""
  root = tmp_path / "sweep"
  for seed, acc in enumerate((0.50, 0.46)):
    _config_run(root, f"dense{seed}", {"sparse": {"method": "dense", "density": 0.05},
                                       "seeds": {"init": seed}}, [0.1, acc], bytes_up=1)
  for density, acc in ((0.05, 0.40), (0.1, 0.45)):
    _config_run(root, f"snip{density}", {"sparse": {"method": "snip", "density": density},
                                         "seeds": {"init": 0}}, [0.1, acc], bytes_up=1)
  runs = plot.load_labelled([str(root)])
  got = plot.field_sweep(runs, "sparse.density", ["sparse.method"], "test_accuracy",
                         exclude="sparse.method=dense")
  assert got == {"sparse.method=snip": [(0.05, 0.40, 0.0, 1), (0.1, 0.45, 0.0, 1)]}
  mean, std, count = plot.baseline_level(runs, "test_accuracy", "sparse.method=dense")
  assert count == 2 and mean == pytest.approx(0.48) and std == pytest.approx(
      np.std([0.50, 0.46], ddof=1))
  assert plot.baseline_level(runs, "test_accuracy", "sparse.method=lotteryfl") is None
  out = tmp_path / "out"
  plot.main(["--out", str(out), "--x", "sparse.density", "--series", "sparse.method",
             "--baseline", "sparse.method=dense", "--name", "d.png", str(root)])
  assert np.std(matplotlib.image.imread(out / "d.png")) > 0.01
  with pytest.raises(SystemExit):
    plot.main(["--out", str(out), "--x", "sparse.density", "--baseline", "dense", str(root)])
  plot.main(["--out", str(out), "--x", "sparse.density", "--series", "sparse.method",
             "--baseline", "sparse.method=dense", "--relabel", "sparse.method=snip->SNIP",
             "--name", "r.png", str(root)])
  for bad in ("sparse.method=snap->SNIP", "no arrow"):
    with pytest.raises(SystemExit) as exit_info:
      plot.main(["--out", str(out), "--x", "sparse.density", "--series", "sparse.method",
                 "--relabel", bad, "--name", "bad.png", str(root)])
    assert exit_info.value.code == 2 and not (out / "bad.png").exists()


def _gated_run(root, name, gamma, structures, seed, flops, acc, binary_fracs=()):
  """A finished run of a γ sweep whose result includes its kept FLOPs."""
  path = root / name
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(
      {"cavp": {"gamma": gamma, "structures": structures}, "seeds": {"init": seed}}))
  (path / "metrics.jsonl").write_text("".join(
      json.dumps({"round": r + 1, "units_binary_frac": f}) + "\n"
      for r, f in enumerate(binary_fracs)) or json.dumps({"round": 1}) + "\n")
  (path / "summary.json").write_text(json.dumps({"test_accuracy": acc, "flops": flops}))


def test_grouped_sweep_pools_x_and_y_per_group_and_the_front_is_drawn(tmp_path):
  """`--group`: a point is the runs sharing γ, with x (a result: each seed keeps other
  FLOPs) and y both pooled; `field_sweep` would split the seeds into separate x values."""
  root = tmp_path / "sweep"
  _gated_run(root, "u1s0", 1.0, "units", 0, 100.0, 0.70)
  _gated_run(root, "u1s1", 1.0, "units", 1, 140.0, 0.60)
  _gated_run(root, "u2s0", 2.0, "units", 0, 50.0, 0.50)
  _gated_run(root, "b1s0", 1.0, "both", 0, 30.0, 0.55)
  runs = plot.load_labelled([str(root)])
  got = plot.grouped_sweep(runs, "flops", ["cavp.structures"], "test_accuracy", "cavp.gamma")
  assert set(got) == {"cavp.structures=units", "cavp.structures=both"}
  (x2, sx2, y2, sy2, n2, g2), (x1, sx1, y1, sy1, n1, g1) = got["cavp.structures=units"]
  assert (x2, sx2, y2, sy2, n2, g2) == (50.0, 0.0, 0.5, 0.0, 1, 2.0)
  np.testing.assert_allclose([x1, sx1, y1, sy1], [120.0, np.std([100, 140], ddof=1), 0.65,
                                                  np.std([0.7, 0.6], ddof=1)])
  assert (n1, g1) == (2, 1.0)
  assert len(plot.field_sweep(runs, "flops", ["cavp.structures"], "test_accuracy")[
      "cavp.structures=units"]) == 3  # ungrouped: one point per seed's x
  out = tmp_path / "out"
  plot.main(["--out", str(out), "--x", "flops", "--series", "cavp.structures", "--group",
             "cavp.gamma", "--front", "--name", "p.png", str(root)])
  assert np.std(matplotlib.image.imread(out / "p.png")) > 0.01


def test_keys_vs_round_plots_logged_keys_and_refuses_unlogged_ones(tmp_path):
  root = tmp_path / "sweep"
  _gated_run(root, "a", 1.0, "units", 0, 1.0, 0.5, binary_fracs=(0.0, 0.4, 0.9))
  _gated_run(root, "b", 2.0, "units", 0, 1.0, 0.5, binary_fracs=(0.1, 1.0))
  out = tmp_path / "out"
  plot.main(["--out", str(out), "--vs_round", "units_binary_frac", str(root)])
  assert np.std(matplotlib.image.imread(out / "units_binary_frac_vs_round.png")) > 0.01
  with pytest.raises(SystemExit, match="no run logs any of --vs_round"):
    plot.main(["--out", str(out), "--vs_round", "layers_binary_frac", "--name", "n.png",
               str(root)])
  assert not (out / "n.png").exists()
  with pytest.raises(SystemExit):
    plot.main(["--out", str(out), "--vs_round", "x", "--x", "flops", str(root)])

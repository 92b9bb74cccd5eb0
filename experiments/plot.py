"""Plots from workdirs: accuracy vs round, accuracy vs params/FLOPs, per-layer density/width.

  python -m experiments.plot --out plots/ workdir/run_a workdir/run_b
  python -m experiments.plot --out plots/ /tmp/sweep          # a sweep/seed root: its runs
  python -m experiments.plot --out plots/ 'dense@workdir/a/asp.max_pruned_round=0,seeds.init=0' \
      workdir/k_sweep                                         # LABEL@PATH names a run

A workdir is a directory with `metrics.jsonl` (and usually `summary.json`); a
directory without one stands for its subdirectories that have one (a sweep or
seed-sweep root). Writes PNGs (matplotlib, Agg backend):

  accuracy_vs_round.png   test accuracy (solid) and local mean accuracy (dashed) per run
  accuracy_vs_size.png    final test accuracy vs kept params and vs FLOPs, one point per
                          run, with the Pareto front (higher accuracy, smaller model)
  layers_<run>.png        per-layer density (`density/<layer>`) or width (`width/<layer>`)
                          over rounds, for runs that log them

With --x, one PNG of final values against a config field or record key instead, one line
per value of the --series fields, seeds pooled (mean ± std):

  python -m experiments.plot --out docs/results/figures --x attack.fraction \
      --series robust.aggregator --where attack.kind=sign_flip workdir/robust_femnist
  python -m experiments.plot --out docs/results/figures --x sparse.density \
      --series method,sparse.method --baseline sparse.method=dense \
      --relabel 'method=fedtiny, sparse.method=feddst->FedTiny' workdir/fedtiny_sweep

`--baseline FIELD=VALUE` draws the matching runs (dense, say, whose config holds some
density it never uses) as one horizontal level, mean ± std, instead of a series point;
`--relabel 'LABEL->TEXT'` renames a series in the legend. When x is a result rather than
a setting (the FLOPs a penalty weight leaves, different for each seed), `--group FIELD`
makes a point of the runs sharing that field's value, x and y both pooled (error bars
both ways), and `--front` draws the Pareto front (smaller x, higher y):

  python -m experiments.plot --out docs/results/figures --x flops \
      --series cavp.structures --group cavp.gamma --front \
      --baseline cavp.theta_learning_rate=0.0 docs/results/runs/cavp_cifar10_centralised

With --vs_round KEYS, one PNG of record keys against the round, one line per run:

  python -m experiments.plot --out docs/results/figures --vs_round units_binary_frac \
      docs/results/runs/cavp_cifar10_centralised

Runs are labelled by LABEL@PATH when given so, else by their directory name without the
`key=value` fields every unlabelled run shares (a sweep's seeds, say); a labelled sweep
root labels its runs 'LABEL: <name>'.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines and in CI
import matplotlib.pyplot as plt  # noqa: E402

from experiments import curves  # noqa: E402

LAYER_PREFIXES = ("density/", "width/")


def find_runs(paths: list[str]) -> list[str]:
  """Workdirs holding metrics.jsonl: each path itself, or else its direct subdirectories."""
  runs = []
  for path in paths:
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path!r} is not a directory")
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
      runs.append(path)
      continue
    subs = sorted(os.path.join(path, d) for d in os.listdir(path)
                  if os.path.exists(os.path.join(path, d, "metrics.jsonl")))
    if not subs:
      raise FileNotFoundError(f"{path!r} holds no metrics.jsonl (neither it nor its "
                              "subdirectories is a workdir)")
    runs += subs
  if not runs:
    raise ValueError("no workdirs given")
  return runs


def load_run(workdir: str) -> dict:
  """{'name', 'path', 'records': [dict per round], 'summary': dict} of one workdir."""
  records = curves.read_records(workdir)
  summary = {}
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
  return {"name": os.path.basename(os.path.normpath(workdir)), "path": workdir,
          "records": records, "summary": summary}


def flatten(tree: dict, prefix: str = "") -> dict:
  """A nested dict as {'dotted.key': leaf value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def config_values(workdir: str) -> dict:
  """The run's config.json as {'dotted.key': value}."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} has no config.json (not an experiments workdir)")
  with open(path) as f:
    return flatten(json.load(f))


def split_label(arg: str) -> tuple[str | None, str]:
  """'LABEL@PATH' -> (LABEL, PATH); a plain path -> (None, path)."""
  if "@" in arg:
    label, path = arg.split("@", 1)
    if label and path:
      return label, path
  return None, arg


def short_names(names: list[str]) -> list[str]:
  """Run names without the comma-separated fields all of them share ('(base)' if nothing
  is left): 'asp.k=1.5,seeds.init=0' and 'asp.k=2.5,seeds.init=0' -> 'asp.k=1.5', 'asp.k=2.5'."""
  parts = [name.split(",") for name in names]
  common = set.intersection(*map(set, parts)) if len(parts) > 1 else set()
  return [",".join(p for p in ps if p not in common) or "(base)" for ps in parts]


def load_labelled(args: list[str]) -> list[dict]:
  """The runs under `args` (paths or LABEL@PATH), each with its display 'label'."""
  runs, labels = [], []
  for arg in args:
    label, path = split_label(arg)
    found = find_runs([path])
    for workdir in found:
      runs.append(load_run(workdir))
      if label is None:
        labels.append(None)
      else:
        labels.append(label if len(found) == 1 else f"{label}: {runs[-1]['name']}")
  unlabelled = [i for i, label in enumerate(labels) if label is None]
  for i, name in zip(unlabelled, short_names([runs[i]["name"] for i in unlabelled])):
    labels[i] = name
  for run, label in zip(runs, labels):
    run["label"] = label
  return runs


def _label(run: dict) -> str:
  return run.get("label", run["name"])


def _series(records: list[dict], key: str) -> tuple[list, list]:
  xs = [r["round"] for r in records if key in r]
  return xs, [r[key] for r in records if key in r]


def final_value(run: dict, key: str):
  """The last logged value of `key` (summary first, then the latest record having it)."""
  if key in run["summary"] and run["summary"][key] is not None:
    return run["summary"][key]
  for r in reversed(run["records"]):
    if key in r:
      return r[key]
  return None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """Points (size, accuracy) not dominated by a smaller-or-equal, at-least-as-accurate one."""
  front, best = [], -math.inf
  for size, acc in sorted(points, key=lambda p: (p[0], -p[1])):
    if acc > best:
      front.append((size, acc))
      best = acc
  return front


def plot_accuracy_vs_round(runs: list[dict], path: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, run in enumerate(runs):
    color = f"C{i % 10}"
    xs, ys = _series(run["records"], "test_accuracy")
    ax.plot(xs, ys, "-o", color=color, markersize=3, label=f"{_label(run)} (test)")
    xs, ys = _series(run["records"], "local_accuracy_mean")
    if xs:
      ax.plot(xs, ys, "--", color=color, alpha=0.7, label=f"{_label(run)} (local mean)")
  ax.set_xlabel("round")
  ax.set_ylabel("accuracy")
  ax.set_title("accuracy vs round")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_accuracy_vs_size(runs: list[dict], path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, key, label in ((axes[0], "params", "kept parameters"),
                         (axes[1], "flops", "FLOPs per example (batch 1)")):
    points = []
    for i, run in enumerate(runs):
      size, acc = final_value(run, key), final_value(run, "test_accuracy")
      if size is None or acc is None:
        continue
      points.append((size, acc))
      ax.scatter([size], [acc], color=f"C{i % 10}", zorder=3)
      ax.annotate(_label(run), (size, acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points)
    if len(front) > 1:
      ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", alpha=0.5,
              label="Pareto front")
      ax.legend(fontsize=7)
    if points and max(p[0] for p in points) > 10 * min(p[0] for p in points):
      ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
  fig.suptitle("accuracy vs model size (one point per run)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_layers(run: dict, path: str) -> bool:
  """Per-layer density/width over rounds; False (nothing written) when the run logs none."""
  keys = sorted({k for r in run["records"] for k in r if k.startswith(LAYER_PREFIXES)})
  if not keys:
    return False
  kinds = [p for p in LAYER_PREFIXES if any(k.startswith(p) for k in keys)]
  fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4.5), squeeze=False)
  for ax, prefix in zip(axes[0], kinds):
    for key in (k for k in keys if k.startswith(prefix)):
      xs, ys = _series(run["records"], key)
      ax.plot(xs, ys, "-o", markersize=2, label=key[len(prefix):])
    ax.set_xlabel("round")
    ax.set_ylabel(prefix.rstrip("/"))
    ax.set_title(f"{_label(run)}: per-layer {prefix.rstrip('/')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_keys_vs_round(runs: list[dict], keys: list[str], path: str) -> bool:
  """One panel per record key, its value against the round, one line per run that logs it
  (e.g. the fraction of gates with θ ∈ {0, 1} over training). False (nothing written) when
  no run logs any key."""
  if not any(key in r for run in runs for r in run["records"] for key in keys):
    return False
  fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, run in enumerate(runs):
      xs, ys = _series(run["records"], key)
      if xs:
        ax.plot(xs, ys, "-", color=f"C{i % 10}", label=_label(run))
    ax.set_xlabel("round")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


SUM_PREFIX = "sum:"


def run_value(run: dict, key: str):
  """A run's value of `key`: a config field ('attack.fraction', from config.json), else
  'sum:<record key>' (the key summed over the records, e.g. the total `bytes_up`), else
  the key's final value (`final_value`: 'test_accuracy', 'dp_epsilon'); None if absent."""
  if key.startswith(SUM_PREFIX):
    values = [r[key[len(SUM_PREFIX):]] for r in run["records"] if key[len(SUM_PREFIX):] in r]
    return sum(values) if values else None
  if "config" not in run:
    run["config"] = config_values(run["path"])
  if key in run["config"]:
    return run["config"][key]
  return final_value(run, key)


def _matches(run: dict, where: list[str]) -> bool:
  """Whether the run's config has every 'field=value' of `where` (values compared as text)."""
  for condition in where:
    field, sep, want = condition.partition("=")
    if not sep:
      raise ValueError(f"--where takes FIELD=VALUE, got {condition!r}")
    if str(run_value(run, field)) != want:
      return False
  return True


def _mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample std (0 for one value)."""
  mean = sum(values) / len(values)
  std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
         if len(values) > 1 else 0.0)
  return mean, std


def baseline_level(runs: list[dict], y: str, baseline: str,
                   where: list[str] = ()) -> tuple[float, float, int] | None:
  """(mean y, sample std, runs) over the finished runs matching `where` and the `baseline`
  condition ('FIELD=VALUE', e.g. the dense runs of a density sweep: one level, not a point
  at whatever x their config holds); None when no such run records y."""
  values = [float(v) for run in runs
            if run["summary"] and _matches(run, [*where, baseline])
            and (v := run_value(run, y)) is not None]
  return (*_mean_std(values), len(values)) if values else None


def field_sweep(runs: list[dict], x: str, series: list[str], y: str,
                where: list[str] = (), exclude: str | None = None
                ) -> dict[str, list[tuple[float, float, float, int]]]:
  """{series label: [(x, mean y, sample std of y (0 for one run), runs)] sorted by x}:
  the finished runs (with a summary.json, as `experiments.report` counts them) matching
  `where` and not the `exclude` condition ('FIELD=VALUE'), grouped by their `series` fields
  and x (seeds pooled); runs without x or y are left out. `grouped_sweep` grouped by x."""
  return {label: [(r[0], r[2], r[3], r[4]) for r in rows]
          for label, rows in grouped_sweep(runs, x, series, y, x, where, exclude).items()}


def grouped_sweep(runs: list[dict], x: str, series: list[str], y: str, group: str,
                  where: list[str] = (), exclude: str | None = None
                  ) -> dict[str, list[tuple[float, float, float, float, int, object]]]:
  """{series label: [(mean x, std x, mean y, std y, runs, group value)] sorted by mean x}:
  the finished runs (with a summary.json, as `experiments.report` counts them) matching
  `where` and not the `exclude` condition ('FIELD=VALUE'), grouped by their `series` fields;
  a point is the runs sharing a value of `group` (a config field or record key), x and y
  both pooled over them (sample stds; 0 for one run); runs without x, y or group are left
  out. Grouped by x itself, it is `field_sweep`. With another group, for an x that is a
  result, not a setting: accuracy against the kept FLOPs of each penalty weight γ, say,
  where each seed keeps a different number (`--x flops --group cavp.gamma`)."""
  groups: dict[str, dict[object, list[tuple[float, float]]]] = {}
  for run in runs:
    if not run["summary"] or not _matches(run, list(where)):
      continue
    if exclude is not None and _matches(run, [exclude]):
      continue
    xv, yv, gv = run_value(run, x), run_value(run, y), run_value(run, group)
    if xv is None or yv is None or gv is None:
      continue
    label = ", ".join(f"{f}={run_value(run, f)}" for f in series) or y
    groups.setdefault(label, {}).setdefault(gv, []).append((float(xv), float(yv)))
  out = {}
  for label, by_group in groups.items():
    rows = []
    for gv, pairs in by_group.items():
      x_mean, x_std = _mean_std([p[0] for p in pairs])
      y_mean, y_std = _mean_std([p[1] for p in pairs])
      rows.append((x_mean, x_std, y_mean, y_std, len(pairs), gv))
    out[label] = sorted(rows, key=lambda r: r[0])
  return out


def plot_field_sweep(runs: list[dict], x: str, series: list[str], ys: list[str], path: str,
                     where: list[str] = (), baseline: str | None = None,
                     relabel: dict[str, str] | None = None, group: str | None = None,
                     front: bool = False) -> bool:
  """One panel per y: the y of each series (mean ± std over seeds) against x; with
  `baseline` ('FIELD=VALUE'), the matching runs drawn as a horizontal level (dashed mean,
  shaded ± std) instead of a series; `relabel` maps a series' label (as the legend would
  print it) to the text to print. With `group` (a config field), the points are
  `grouped_sweep`'s (x pooled too, horizontal error bars, each point annotated with its
  group value); with `front`, the Pareto front of all series' points (smaller x, higher
  y; the baseline level counts as a point at the baseline runs' mean x) is drawn and the
  points on it ringed. False (nothing written) when no run has x and any y.

  Raises:
    ValueError: a `relabel` key that is no series' label (a typo would go unnoticed).
  """
  tables = [(y, grouped_sweep(runs, x, series, y, group or x, where, exclude=baseline))
            for y in ys]  # grouped by x itself, x's std is 0: field_sweep's points
  if not any(table for _, table in tables):
    return False
  labels = {label for _, table in tables for label in table}
  unknown = sorted(set(relabel or {}) - labels)
  if unknown:
    raise ValueError(f"--relabel names {unknown}, which are not series here: {sorted(labels)}")
  fig, axes = plt.subplots(1, len(ys), figsize=(6.5 * len(ys), 4.5), squeeze=False)
  for ax, (y, table) in zip(axes[0], tables):
    for i, (label, rows) in enumerate(sorted(table.items())):
      ax.errorbar([r[0] for r in rows], [r[2] for r in rows], yerr=[r[3] for r in rows],
                  xerr=[r[1] for r in rows] if group is not None else None,
                  fmt="-o", color=f"C{i % 10}", markersize=4, capsize=3,
                  label=(relabel or {}).get(label, label))
      if group is not None:
        for r in rows:
          ax.annotate(f"{r[5]}" + (f" (n={r[4]})" if r[4] > 1 else ""), (r[0], r[2]),
                      fontsize=6, xytext=(3, 3), textcoords="offset points")
    points = [(r[0], r[2]) for rows in table.values() for r in rows]
    level = baseline_level(runs, y, baseline, where) if baseline else None
    if level is not None:
      mean, std, count = level
      ax.axhline(mean, color="k", linestyle="--", linewidth=1,
                 label=f"{baseline} ({count} run{'s' if count > 1 else ''})")
      ax.axhspan(mean - std, mean + std, color="k", alpha=0.1, linewidth=0)
      base_x = baseline_level(runs, x, baseline, where)
      if base_x is not None:
        points.append((base_x[0], mean))
    if front and points:
      line = pareto_front(points)
      ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="k",
              alpha=0.4, linewidth=1, label="Pareto front")
      ax.scatter([p[0] for p in line], [p[1] for p in line], s=80, facecolors="none",
                 edgecolors="k", zorder=4)
    xs = [r[0] for rows in table.values() for r in rows]
    if xs and min(xs) > 0 and max(xs) > 100 * min(xs):
      ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"final {y}")
    ax.grid(alpha=0.3)
    if table:
      ax.legend(fontsize=7)
  title = f"vs {x}" + (f" ({', '.join(where)})" if where else "")
  fig.suptitle(title + "; mean ± std over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _file_part(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=-]", "_", text)


def plot_workdirs(paths: list[str], out_dir: str) -> list[str]:
  """Writes the PNGs for the runs under `paths` (paths or LABEL@PATH) into `out_dir`;
  returns the files written."""
  runs = load_labelled(paths)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  path = os.path.join(out_dir, "accuracy_vs_round.png")
  plot_accuracy_vs_round(runs, path)
  written.append(path)
  path = os.path.join(out_dir, "accuracy_vs_size.png")
  plot_accuracy_vs_size(runs, path)
  written.append(path)
  for run in runs:
    path = os.path.join(out_dir, "layers_" + _file_part(run["name"]) + ".png")
    if plot_layers(run, path):
      written.append(path)
  return written


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+",
                      help="workdirs, or sweep roots holding workdirs; LABEL@PATH labels them")
  parser.add_argument("--out", required=True, help="directory for the PNGs")
  parser.add_argument("--x", default=None,
                      help="instead: final values against this config field / record key "
                           "(e.g. attack.fraction, dp_epsilon, sum:bytes_up)")
  parser.add_argument("--y", default="test_accuracy",
                      help="with --x: comma-separated record keys, one panel each")
  parser.add_argument("--series", default="",
                      help="with --x: comma-separated config fields, one line per value")
  parser.add_argument("--where", action="append", default=[],
                      help="with --x: only runs whose FIELD=VALUE (repeatable)")
  parser.add_argument("--baseline", default=None,
                      help="with --x: FIELD=VALUE runs drawn as a horizontal level (mean ± "
                           "std), not a series, e.g. sparse.method=dense")
  parser.add_argument("--relabel", action="append", default=[],
                      help="with --x: 'SERIES LABEL->TEXT' prints TEXT in the legend for that "
                           "series (repeatable)")
  parser.add_argument("--group", default=None,
                      help="with --x: a config field; one point per series and value of it, "
                           "x pooled over its runs too (for an x that is a result, e.g. "
                           "--x flops --group cavp.gamma)")
  parser.add_argument("--front", action="store_true",
                      help="with --x: draw the Pareto front (smaller x, higher y) of the points")
  parser.add_argument("--vs_round", default=None,
                      help="instead: these comma-separated record keys against the round, one "
                           "panel per key, one line per run (e.g. units_binary_frac)")
  parser.add_argument("--name", default=None, help="with --x / --vs_round: the PNG's file name")
  args = parser.parse_args(argv)
  if args.x is not None and args.vs_round is not None:
    parser.error("--x and --vs_round are two different plots: give one")
  if args.vs_round is not None:
    keys = [k for k in args.vs_round.split(",") if k]
    if not keys:
      parser.error("--vs_round takes comma-separated record keys")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.name or _file_part("_".join(keys) + "_vs_round") + ".png")
    runs = load_labelled(args.workdirs)
    if not plot_keys_vs_round(runs, keys, path):
      raise SystemExit(f"no run logs any of --vs_round {keys}")
    print(path)
    return
  if args.x is None:
    for path in plot_workdirs(args.workdirs, args.out):
      print(path)
    return
  ys = [k for k in args.y.split(",") if k]
  series = [k for k in args.series.split(",") if k]
  if args.baseline is not None and "=" not in args.baseline:
    parser.error(f"--baseline takes FIELD=VALUE, got {args.baseline!r}")
  relabel = {}
  for item in args.relabel:
    old, arrow, new = item.partition("->")
    if not arrow or not old.strip() or not new.strip():
      parser.error(f"--relabel takes 'SERIES LABEL->TEXT', got {item!r}")
    relabel[old.strip()] = new.strip()
  os.makedirs(args.out, exist_ok=True)
  name = args.name or _file_part(f"{'_'.join(ys)}_vs_{args.x}") + ".png"
  path = os.path.join(args.out, name)
  runs = load_labelled(args.workdirs)
  try:
    written = plot_field_sweep(runs, args.x, series, ys, path, args.where, args.baseline, relabel,
                               group=args.group, front=args.front)
  except ValueError as e:
    parser.exit(2, f"error: {e}\n")
  if not written:
    raise SystemExit(f"no run has both --x {args.x!r} and --y {args.y!r}"
                     + (f" under --where {args.where}" if args.where else ""))
  print(path)


if __name__ == "__main__":
  main()

"""Tables from a sweep's workdirs, the way docs/results/ reports them (REPRODUCE.md).

  python -m experiments.report workdir/asp_femnist_converged400
  python -m experiments.report workdir/sweep --rounds 50,100,200,400 --out table.md

Runs that differ only in their seeds (`seeds.*`) form one group; each group gets one row:
how many runs finished (and how many are still running, with the round they reached), the
final test accuracy as mean ± sample std over the finished runs, the convergence tail (the
gain over the last 20 % of rounds, REPRODUCE.md §1, each end the mean of 3 evaluations; the
largest over the group's runs), params and FLOPs (mean), the cumulative
communication ratio against dense when the method records it, optionally the mean of each
run's evaluations from a round on (`--plateau_from`: where one evaluation of a
client-sampled run moves by about a point, the plateau's mean compares methods, not noise),
the mean ± std of any numeric `summary.json` fields (`--summary`: the costs a method records,
e.g. `client_training_flops_per_round`), the paired difference to a reference method
(`--paired_with`, below), and the mean test accuracy at the chosen rounds (the curve).

Paired differences: runs with the same seeds share their initial weights and their client
sampling, so the per-seed difference between two methods has far less spread than either
method's own seed std (the seed noise cancels). `--paired_with method=fedtiny --pair_on
sparse.density` pairs every finished run with the finished reference run (config matching
every KEY=VALUE) of equal seeds and equal `--pair_on` fields, and adds the columns
"Δ vs reference": the mean ± std of (run − reference) over the pairs, and in how many pairs
the run is ahead (`+0.012 ± 0.004 (3/3)`); the same for `--plateau_from`'s mean. A group is named by the config fields that set it apart from
the other groups (read from each run's `config.json`, so hashed run names do not matter).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

from experiments import plot
from experiments.curves import TAIL_FRACTION, TAIL_WINDOW, plateau_mean, tail_gain  # noqa: F401

SEED_PREFIX = "seeds."


def load_config(workdir: str) -> dict:
  """The run's config.json, flattened to {'dotted.key': JSON text} (hashable, comparable)."""
  return {k: json.dumps(v, sort_keys=True) for k, v in plot.config_values(workdir).items()}


def group_runs(workdirs: list[str]) -> list[tuple[str, list[str]]]:
  """[(group label, [workdir, ...])] in first-seen order; a group = runs equal but for seeds.

  The label lists the non-seed fields whose values differ between runs (`k=v, ...`);
  one group only, or no differing field, is labelled 'all'.
  """
  configs = {w: load_config(w) for w in workdirs}
  keys = sorted(set().union(*configs.values()))
  varying = [k for k in keys if not k.startswith(SEED_PREFIX)
             and len({configs[w].get(k) for w in workdirs}) > 1]
  groups: dict[tuple, list[str]] = {}
  for w in workdirs:
    groups.setdefault(tuple(configs[w].get(k) for k in varying), []).append(w)
  labelled = []
  for values, members in groups.items():
    label = ", ".join(f"{k}={json.loads(v) if v is not None else None}"
                      for k, v in zip(varying, values)) or "all"
    labelled.append((label, members))
  return labelled


def parse_match(spec: str) -> dict[str, object]:
  """'method=fedtiny,sparse.density=0.1' -> {'method': 'fedtiny', 'sparse.density': 0.1}
  (values read as JSON where they parse, else as strings).

  Raises:
    ValueError: an item without '=' or with an empty key.
  """
  match = {}
  for item in (i.strip() for i in spec.split(",") if i.strip()):
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"--paired_with wants KEY=VALUE[,KEY=VALUE...], got item {item!r}")
    try:
      match[key.strip()] = json.loads(text)
    except json.JSONDecodeError:
      match[key.strip()] = text
  return match


def _pairing_key(config: dict, pair_on: tuple[str, ...]) -> tuple:
  """What a run and its reference share: every seed field and the `pair_on` fields."""
  seeds = sorted((k, v) for k, v in config.items() if k.startswith(SEED_PREFIX))
  return tuple(seeds) + tuple((k, config.get(k)) for k in pair_on)


def reference_runs(workdirs: list[str], match: dict[str, object],
                   pair_on: tuple[str, ...]) -> dict[tuple, str]:
  """{pairing key: workdir} of the finished runs whose config matches every `match` item.

  Raises:
    ValueError: no finished run matches, or two share a pairing key (the pairing would be
      ambiguous: add the field that tells them apart to `pair_on` or `match`).
  """
  references: dict[tuple, str] = {}
  for w in workdirs:
    values = plot.config_values(w)
    if any(k not in values or values[k] != v for k, v in match.items()):
      continue
    if not plot.load_run(w)["summary"]:
      continue
    key = _pairing_key(load_config(w), pair_on)
    if key in references:
      raise ValueError(f"runs {references[key]!r} and {w!r} both match {match} with the same "
                       f"seeds and {list(pair_on)}: name the field that tells them apart")
    references[key] = w
  if not references:
    raise ValueError(f"no finished run matches --paired_with {match}")
  return references


def paired_differences(workdirs: list[str], references: dict[tuple, str],
                       pair_on: tuple[str, ...], plateau_from: int | None = None) -> dict:
  """The group's finished runs minus their reference runs (equal seeds and `pair_on`).

  Returns {'final': (mean, std) | None, 'plateau': (mean, std) | None, 'ahead': int,
  'ahead_plateau': int, 'pairs': int, 'pairs_plateau': int, 'is_reference': bool}: `final`
  compares the final test accuracy, `plateau` the mean of the evaluations from `plateau_from`
  on; `ahead` / `ahead_plateau` count the pairs where the run is strictly higher, `pairs` /
  `pairs_plateau` the pairs compared (a pair counts for the plateau only when both runs have
  an evaluation from `plateau_from` on). Runs without a finished partner are left out.
  """
  finals, plateaus, is_reference = [], [], True
  for w in workdirs:
    run = plot.load_run(w)
    if not run["summary"]:
      continue
    partner = references.get(_pairing_key(load_config(w), pair_on))
    if partner is None:
      is_reference = False
      continue
    is_reference &= os.path.samefile(partner, w)
    ref = plot.load_run(partner)
    finals.append(float(run["summary"]["test_accuracy"]) -
                  float(ref["summary"]["test_accuracy"]))
    if plateau_from is not None:
      mine = plateau_mean(accuracy_curve(run), plateau_from)
      theirs = plateau_mean(accuracy_curve(ref), plateau_from)
      if mine is not None and theirs is not None:
        plateaus.append(mine - theirs)
  return {"final": _mean_std(finals), "plateau": _mean_std(plateaus),
          "ahead": sum(d > 0 for d in finals), "ahead_plateau": sum(d > 0 for d in plateaus),
          "pairs": len(finals), "pairs_plateau": len(plateaus),
          "is_reference": bool(finals) and is_reference}


def accuracy_curve(run: dict) -> dict[int, float]:
  """{round: test_accuracy} over the records that evaluated."""
  return {int(r["round"]): float(r["test_accuracy"]) for r in run["records"]
          if r.get("test_accuracy") is not None}


def _mean_std(values: list[float]) -> tuple[float, float] | None:
  if not values:
    return None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarise_group(workdirs: list[str], rounds_at: list[int],
                    plateau_from: int | None = None,
                    summary_fields: tuple[str, ...] = ()) -> dict:
  """One group's row: finished/running counts, accuracy mean ± std, tail, size, curve and,
  with `plateau_from`, the mean ± std over finished runs of `plateau_mean`; with
  `summary_fields`, the mean ± std over finished runs of each field of `summary.json` (None
  where no run of the group records it: a method without that cost).

  Raises:
    ValueError: some but not all finished runs of the group record a field (the column would
      average over other runs than the accuracy), or a field is not a number.
  """
  runs = [plot.load_run(w) for w in workdirs]
  done = [r for r in runs if r["summary"]]
  running = [r for r in runs if not r["summary"]]
  acc = _mean_std([float(r["summary"]["test_accuracy"]) for r in done])
  tails = [t for r in done
           if (t := tail_gain(accuracy_curve(r), int(r["summary"].get("rounds", 0)))) is not None]
  ratios = [float(r["summary"]["communication_ratio"]) for r in done
            if r["summary"].get("communication_ratio") is not None]
  curves = [accuracy_curve(r) for r in done]
  summary_values = {}
  for field in summary_fields:
    have = [r for r in done if field in r["summary"]]
    if have and len(have) < len(done):
      missing = sorted(r["name"] for r in done if field not in r["summary"])
      raise ValueError(f"summary.json field {field!r} is missing from runs {missing} but "
                       f"present in others of their group")
    for r in have:
      value = r["summary"][field]
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"run {r['name']!r}: summary.json field {field!r} is {value!r}, "
                         f"not a number")
    summary_values[field] = _mean_std([float(r["summary"][field]) for r in have])
  return {
      "finished": len(done),
      "running": [(r["name"], r["records"][-1]["round"] if r["records"] else 0) for r in running],
      "test_accuracy": acc,
      "tail_gain_max": max(tails) if tails else None,
      "params": _mean_std([float(plot.final_value(r, "params")) for r in done
                           if plot.final_value(r, "params") is not None]),
      "flops": _mean_std([float(plot.final_value(r, "flops")) for r in done
                          if plot.final_value(r, "flops") is not None]),
      "communication_ratio": _mean_std(ratios),
      "curve": {t: _mean_std([c[t] for c in curves if t in c]) for t in rounds_at},
      "plateau": None if plateau_from is None else _mean_std(
          [m for c in curves if (m := plateau_mean(c, plateau_from)) is not None]),
      "summary": summary_values,
  }


def _fmt_acc(ms) -> str:
  if ms is None:
    return "–"
  mean, std = ms
  return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _fmt_num(ms, digits: int = 0) -> str:
  return "–" if ms is None else f"{ms[0]:,.{digits}f}"


def _fmt_field(ms) -> str:
  """A summary field's mean ± std in 4 significant digits (costs span 1e3 … 1e12)."""
  if ms is None:
    return "–"
  mean, std = ms
  return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def _fmt_delta(ms, ahead: int, pairs: int, is_reference: bool) -> str:
  """A paired difference: '+0.012 ± 0.004 (3/3)' (mean ± std, pairs ahead / pairs)."""
  if is_reference:
    return "reference"
  if ms is None:
    return "–"
  mean, std = ms
  spread = "" if math.isnan(std) else f" ± {std:.3f}"
  return f"{mean:+.3f}{spread} ({ahead}/{pairs})"


def markdown(rows: list[tuple[str, dict]], rounds_at: list[int],
             plateau_from: int | None = None, summary_fields: tuple[str, ...] = (),
             paired: bool = False) -> str:
  """The groups as a markdown table (accuracy as mean ± sample std over finished runs; with
  `paired`, each row's 'paired' entry as Δ columns)."""
  head = ["group", "finished", "test accuracy", "last-20 % gain", "params", "FLOPs",
          "comm. ratio"] + ([f"mean of evals ≥{plateau_from}"] if plateau_from is not None
                            else []) + list(summary_fields)
  if paired:
    head += ["Δ vs reference (paired)"] + (
        [f"Δ mean of evals ≥{plateau_from} (paired)"] if plateau_from is not None else [])
  head += [f"@{t}" for t in rounds_at]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for label, row in rows:
    finished = str(row["finished"]) + "".join(f" (+{name[:24]}… at {r})" if len(name) > 24
                                              else f" (+{name} at {r})"
                                              for name, r in row["running"])
    tail = "–" if row["tail_gain_max"] is None else f"{100 * row['tail_gain_max']:+.1f} pt"
    cells = [label, finished, _fmt_acc(row["test_accuracy"]), tail, _fmt_num(row["params"]),
             _fmt_num(row["flops"]), _fmt_num(row["communication_ratio"], 2)]
    if plateau_from is not None:
      cells.append(_fmt_acc(row["plateau"]))
    cells += [_fmt_field(row["summary"].get(f)) for f in summary_fields]
    if paired:
      d = row["paired"]
      cells.append(_fmt_delta(d["final"], d["ahead"], d["pairs"], d["is_reference"]))
      if plateau_from is not None:
        cells.append(_fmt_delta(d["plateau"], d["ahead_plateau"], d["pairs_plateau"],
                                d["is_reference"]))
    cells += [_fmt_acc(row["curve"][t]) for t in rounds_at]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def report(paths: list[str], rounds_at: list[int], plateau_from: int | None = None,
           summary_fields: tuple[str, ...] = (), paired_with: dict | None = None,
           pair_on: tuple[str, ...] = ()) -> str:
  """The markdown table of the runs under `paths` (see the module docstring).

  Raises:
    FileNotFoundError: a path holds no run.
    ValueError: a bad summary field, a `pair_on` field no run has, or a `paired_with` that
      matches no finished run or matches two with the same seeds and `pair_on` values.
  """
  workdirs = plot.find_runs(paths)
  groups = group_runs(workdirs)
  rows = [(label, summarise_group(members, rounds_at, plateau_from, summary_fields))
          for label, members in groups]
  if paired_with:
    known = set().union(*(load_config(w) for w in workdirs))
    unknown = [k for k in pair_on if k not in known]
    if unknown:
      raise ValueError(f"--pair_on fields {unknown} are in no run's config.json")
    references = reference_runs(workdirs, paired_with, pair_on)
    for (_, members), (_, row) in zip(groups, rows):
      row["paired"] = paired_differences(members, references, pair_on, plateau_from)
  return markdown(rows, rounds_at, plateau_from, summary_fields, paired=bool(paired_with))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("paths", nargs="+", help="workdirs, or sweep roots holding them")
  parser.add_argument("--rounds", default="", help="comma-separated rounds for the curve columns")
  parser.add_argument("--plateau_from", type=int, default=None,
                      help="add a column: the mean of each run's evaluations from this round on")
  parser.add_argument("--summary", default="",
                      help="comma-separated summary.json fields to add as columns (mean ± std "
                           "over finished runs), e.g. client_training_flops_per_round")
  parser.add_argument("--paired_with", default="",
                      help="KEY=VALUE[,KEY=VALUE...]: the reference runs; adds each group's "
                           "paired difference to them (equal seeds), e.g. method=fedtiny")
  parser.add_argument("--pair_on", default="",
                      help="comma-separated config fields a run and its reference also share, "
                           "besides the seeds, e.g. sparse.density")
  parser.add_argument("--out", default=None, help="also write the table to this file")
  args = parser.parse_args(argv)
  if args.plateau_from is not None and args.plateau_from < 1:
    parser.error(f"--plateau_from must be a round >= 1, got {args.plateau_from}")
  try:
    rounds_at = [int(t) for t in args.rounds.split(",") if t.strip()]
  except ValueError:
    parser.error(f"--rounds must be comma-separated integers, got {args.rounds!r}")
  pair_on = tuple(f.strip() for f in args.pair_on.split(",") if f.strip())
  if pair_on and not args.paired_with:
    parser.error("--pair_on needs --paired_with (the reference runs)")
  try:
    table = report(args.paths, rounds_at, args.plateau_from,
                   tuple(f.strip() for f in args.summary.split(",") if f.strip()),
                   parse_match(args.paired_with) or None, pair_on)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f"error: {e}\n")
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()

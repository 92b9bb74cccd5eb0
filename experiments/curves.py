"""Test-accuracy curves: REPRODUCE.md §1's convergence tail, plateau means, plateau rounds.

A curve is {round: test accuracy} over the rounds that evaluated. No plotting library here,
so that config modules (whose sweeps read their finished runs) can import it cheaply.
"""
from __future__ import annotations

import json
import os
import statistics

TAIL_FRACTION = 0.2  # REPRODUCE.md: converged when the last 20 % of rounds gain < 1 point
TAIL_WINDOW = 3  # evaluations averaged at each end of the tail (tail_gain)


def read_records(workdir: str) -> list[dict]:
  """The records of a workdir's metrics.jsonl, one per line, in order; a line cut short by
  a kill ends them (`experiments.train` rewrites the file from its checkpoint on resume).

  Raises:
    FileNotFoundError: the workdir has no metrics.jsonl.
  """
  records = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return records


def read_curve(workdir: str) -> dict[int, float]:
  """{round: test_accuracy} of the evaluated rounds of `read_records(workdir)`."""
  return {int(r["round"]): float(r["test_accuracy"]) for r in read_records(workdir)
          if r.get("test_accuracy") is not None}


def archived_runs(archive: str, needs: tuple[str, ...] = ("config.json", "summary.json",
                                                           "metrics.jsonl")
                  ) -> list[tuple[str, dict]]:
  """The finished runs of a sweep's `--archive` folder: [(run folder, its config.json)] for
  each subfolder holding every file of `needs` (a run still going has no summary.json),
  sorted by name; [] when the folder does not exist (nothing archived yet)."""
  runs = []
  for name in sorted(os.listdir(archive)) if os.path.isdir(archive) else []:
    run = os.path.join(archive, name)
    if all(os.path.isfile(os.path.join(run, f)) for f in needs):
      with open(os.path.join(run, "config.json")) as f:
        runs.append((run, json.load(f)))
  return runs


def tail_gain(curve: dict[int, float], rounds: int, window: int = TAIL_WINDOW) -> float | None:
  """Accuracy gained over the last TAIL_FRACTION of `rounds`, each end smoothed: the mean of
  the last `window` evaluations minus the mean of the `window` evaluations at or before the
  (1 - TAIL_FRACTION) mark. One evaluation on a client-sampled run moves by about a point
  from round to round, so comparing two single points would judge the noise, not the trend.
  None when the run did not reach `rounds` or has too few evaluations before the mark."""
  if not curve or max(curve) < rounds:
    return None
  start = rounds - int(round(TAIL_FRACTION * rounds))
  before = sorted(r for r in curve if r <= start)[-window:]
  last = sorted(curve)[-window:]
  if len(before) < window or set(before) & set(last):
    return None
  return (sum(curve[r] for r in last) - sum(curve[r] for r in before)) / window


def plateau_mean(curve: dict[int, float], from_round: int) -> float | None:
  """The mean test accuracy over the evaluations at rounds >= `from_round` (None: none)."""
  values = [acc for r, acc in curve.items() if r >= from_round]
  return statistics.fmean(values) if values else None


def plateau_round(curve: dict[int, float], rounds: int, within: float = 0.01,
                  window: int = TAIL_WINDOW) -> int:
  """The first evaluated round by which a converged curve has reached its plateau.

  The curve must be converged at `rounds` (REPRODUCE.md §1: `tail_gain` < `within`); its
  plateau is the mean of its last `window` evaluations. The answer is the smallest evaluated
  round r at which the curve cut at r is itself converged (tail_gain(cut, r) < `within`) and
  its last `window` evaluations average at least plateau − `within`: a run of r rounds (at a
  constant learning rate, no schedule tied to the total) is converged and within `within`
  of where the long run ends. Methods compared with the dense run can then train r rounds,
  not `rounds`, and still meet §1.

  Raises:
    ValueError: the curve does not reach `rounds`, has too few evaluations to judge its tail,
      or is not converged there (the message gives the gain).
  """
  gain = tail_gain(curve, rounds, window)
  if gain is None:
    reached = max(curve) if curve else 0
    raise ValueError(f"the curve (evaluated up to round {reached}, {len(curve)} evaluations) "
                     f"cannot be judged converged at round {rounds}: it must reach it with "
                     f"{window} evaluations at or before round "
                     f"{rounds - int(round(TAIL_FRACTION * rounds))} and {window} after")
  if gain >= within:
    raise ValueError(f"not converged at round {rounds}: its last {TAIL_FRACTION:.0%} of rounds "
                     f"gained {100 * gain:.1f} points (REPRODUCE.md §1 asks < "
                     f"{100 * within:g}): raise the rounds")
  upto = sorted(r for r in curve if r <= rounds)
  plateau = statistics.fmean(curve[r] for r in upto[-window:])
  for i, r in enumerate(upto):
    cut = {q: curve[q] for q in upto[:i + 1]}
    cut_gain = tail_gain(cut, r, window)
    level = statistics.fmean(cut[q] for q in upto[max(0, i + 1 - window):i + 1])
    if cut_gain is not None and cut_gain < within and level >= plateau - within:
      return r
  return rounds  # not reached: at r = rounds both conditions hold

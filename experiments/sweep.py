"""Sweeps: expand `sweep(add)` beside a config into runs, one workdir each, resumable.

  python -m experiments.sweep --config experiments/configs/fedavg_tiny.py --workdir /tmp/sweep
  python -m experiments.sweep --config ... --workdir ... --config.rounds=50   # base overrides

A config module may define `sweep(add)`; every `add(**{"dotted.key": value})` is
one run: the base config (with the command-line overrides) plus these overrides.
Each run goes to `<workdir>/<name>`, the name made from its overrides
(e.g. `client.learning_rate=0.05`). Re-running the command skips finished runs
(`summary.json` present), resumes interrupted ones from their latest checkpoint
and starts the rest. Raising `c.rounds` (or `--config.rounds`) and re-running the sweep
extends every run, finished or not, to the new rounds where its method allows it
(`train.check_extension`; bit-identical to a run that had them from the start). Every
run is validated before the first one starts. At the end a summary table is printed
and written to `sweep_summary.json` and `sweep_summary.md` in `<workdir>`.

  --runs=8:12,20      only these runs (1-based, as the log's [i/N] numbers them; 'A:' = A to
                      the end): slices of a long sweep for separate sessions or machines
  --archive=DIR       keeps what a finished run wrote (config.json, metrics.jsonl,
                      summary.json; no checkpoints) in DIR/<run>, e.g. a folder under
                      docs/results/runs committed with the results; a run of the same config
                      found there is restored into the workdir and counts as finished, so a
                      sweep continues across machines whose workdirs do not survive
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
from typing import Any, Callable, NamedTuple

from experiments import build, methods, runtime, train
from fedjax_prune import _files

ARCHIVED_FILES = ("config.json", "metrics.jsonl", "summary.json")  # small; no checkpoints
SUMMARY_COLUMNS = ("run", "status", "rounds", "test_accuracy", "local_accuracy_mean", "params",
                   "flops", "wall_time_s")


class Run(NamedTuple):
  """One run of a sweep: its directory name, overrides and resolved config."""
  name: str
  overrides: dict
  config: Any


def load_sweep_fn(config_path: str) -> Callable | None:
  """The `sweep(add)` function of the config module at `config_path` (None if it has none).

  config_flags allows 'file.py:arg' (the arg `get_config` receives); a `sweep(add, arg)`
  that takes an `arg` parameter gets the same arg (None without one), so that one config
  file can hold the grids of several sweeps."""
  path, sep, arg = config_path.partition(":")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot load the config module {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, "sweep", None)
  if fn is not None and "arg" in inspect.signature(fn).parameters:
    return functools.partial(fn, arg=arg if sep else None)
  return fn


def _format(value) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_format(v) for v in value) + ")"
  return str(value)


def run_name(overrides: dict) -> str:
  """A readable, filesystem-safe directory name made from the overrides."""
  if not overrides:
    return "base"
  name = ",".join(f"{k}={_format(v)}" for k, v in sorted(overrides.items()))
  name = re.sub(r"[^A-Za-z0-9._=,()+-]", "_", name)
  if len(name) > 120:  # file systems limit names to 255 bytes; keep them readable
    name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
  return name


def apply_overrides(config, overrides: dict):
  """A copy of `config` with dotted-key overrides; ConfigError names an unknown key or bad type."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
      if part not in node:
        raise build.ConfigError(f"sweep override {key!r}: config has no field "
                                f"{'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise build.ConfigError(f"sweep override {key!r}: config has no field {key!r}")
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise build.ConfigError(f"sweep override {key}={value!r} has the wrong type: {e}") from None
  return config


def grid(sweep_fn: Callable | None) -> list[dict]:
  """The overrides a config's `sweep(add)` adds, in order.

  A grid that reads finished runs may refuse them (a dense run that did not converge): its
  ValueError becomes a ConfigError saying the sweep refused its grid, which the command line
  prints as one line; any other exception is a bug in the config and keeps its traceback."""
  if sweep_fn is None:
    raise build.ConfigError("the config defines no sweep(add) function: nothing to sweep")
  overrides: list[dict] = []
  try:
    sweep_fn(lambda **kw: overrides.append(dict(kw)))
  except build.ConfigError:
    raise
  except ValueError as e:
    raise build.ConfigError(f"the config's sweep refused its grid: {e}") from None
  return overrides


def expand(config, sweep_fn: Callable | None) -> list[Run]:
  """The runs of a sweep, each config validated (ConfigError names the run and the field)."""
  overrides = grid(sweep_fn)
  if not overrides:
    raise build.ConfigError("the config's sweep(add) added no runs: the sweep is empty (a sweep "
                            "whose grid reads finished runs adds none until they exist: see "
                            "its config's docstring)")
  runs, seen = [], {}
  for ov in overrides:
    name = run_name(ov)
    if name in seen:
      raise build.ConfigError(f"sweep adds the run {name!r} twice")
    seen[name] = True
    cfg = apply_overrides(config, ov)
    try:
      build.validate(cfg)
      train.validate_run_fields(cfg)
      method = cfg.get("method", "fedavg")
      if method not in methods.DRIVERS:
        raise build.ConfigError(f"config.method={method!r} is invalid: allowed one of "
                                f"{tuple(methods.DRIVERS)}")
      methods.DRIVERS[method].validate(cfg)
    except build.ConfigError as e:
      raise build.ConfigError(f"sweep run {name!r}: {e}") from None
    runs.append(Run(name, ov, cfg))
  return runs


def parse_runs(spec: str | None, count: int) -> list[int]:
  """The 0-based indices that `--runs` selects: '3', '8:12' (inclusive), '8:' or a comma
  list of these, 1-based as the sweep log numbers runs; ConfigError names a bad spec."""
  if spec is None or not str(spec).strip():
    return list(range(count))
  chosen: list[int] = []
  for part in str(spec).split(","):
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d*)\s*)?", part)
    if match is None:
      raise build.ConfigError(f"--runs={spec!r} is invalid: expected numbers and ranges "
                              f"like '3', '8:12' or '8:', got {part!r}")
    first = int(match.group(1))
    last = first if match.group(2) is None else int(match.group(2) or count)
    if not 1 <= first <= last <= count:
      raise build.ConfigError(f"--runs={spec!r} is invalid: {part.strip()!r} is outside the "
                              f"sweep's runs 1..{count}")
    chosen += [i for i in range(first - 1, last) if i not in chosen]
  return sorted(chosen)


def _copy_atomic(source: str, target: str) -> None:
  with open(source) as f:
    text = f.read()
  _files.write_atomic(target, lambda f: f.write(text))


def archive_run(workdir: str, archive_dir: str) -> bool:
  """Copies a finished run's `ARCHIVED_FILES` to `archive_dir` (each file written whole);
  False (nothing copied) when the run has not finished."""
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    return False
  os.makedirs(archive_dir, exist_ok=True)
  for name in ARCHIVED_FILES:  # summary.json last: its presence marks a whole archive
    if os.path.exists(os.path.join(workdir, name)):
      _copy_atomic(os.path.join(workdir, name), os.path.join(archive_dir, name))
  return True


def restore_run(run: Run, archive_dir: str, workdir: str) -> bool:
  """Restores an archived finished run of exactly `run.config` into a workdir that holds
  no run yet; False (nothing written) otherwise, and the run is then run as usual."""
  if (os.path.exists(os.path.join(workdir, "config.json"))
      or not all(os.path.exists(os.path.join(archive_dir, n)) for n in ARCHIVED_FILES)):
    return False
  try:
    with open(os.path.join(archive_dir, "config.json")) as f:
      saved = json.load(f)
  except json.JSONDecodeError:
    return False
  if not isinstance(saved, dict) or train.config_differences(saved, run.config):
    return False
  os.makedirs(workdir, exist_ok=True)
  for name in ARCHIVED_FILES:  # config.json first, summary.json last
    _copy_atomic(os.path.join(archive_dir, name), os.path.join(workdir, name))
  return True


def run_status(run: Run, workdir: str) -> str:
  """'done' (summary.json of this config), 'resume' (checkpoints of this config, or a run
  of this config with fewer rounds that its driver lets `train` extend) or 'new';
  "this config" ignores the fields that do not change results (`train.config_differences`)."""
  config_path = os.path.join(workdir, "config.json")
  same = False
  if os.path.exists(config_path):
    with open(config_path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError:
        saved = None
    if isinstance(saved, dict):
      # As train does: result-neutral fields (progress, eval cadence, ...) may differ.
      same = not train.config_differences(saved, run.config)
      old_rounds = None if same else train.rounds_only_difference(saved, run.config)
      if (old_rounds is not None and old_rounds < run.config.rounds
          and run.config.get("checkpoint_every", 0) and train.extension_refusal(run.config) is None):
        return "resume"  # train extends it (or names why this workdir cannot be extended)
  if not same:
    return "new"  # train refuses a workdir holding another config; that error is reported
  if os.path.exists(os.path.join(workdir, "summary.json")):
    return "done"
  ckpt = train.checkpointer_for(run.config, workdir)
  if getattr(ckpt, "steps", lambda: [])():
    return "resume"
  return "new"


def run_sweep(config, sweep_fn: Callable | None, root: str, *, log=print,
              train_fn: Callable = train.train_and_evaluate, runs_spec: str | None = None,
              archive: str | None = None) -> list[dict]:
  """Runs (or skips, or resumes) the runs of the sweep that `runs_spec` selects (all by
  default; `parse_runs`), restoring from and saving to `archive` when given (`restore_run`,
  `archive_run`); writes and returns the summary rows of the selected runs."""
  runs = expand(config, sweep_fn)
  selected = parse_runs(runs_spec, len(runs))
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise OSError(e.errno, f"cannot create the sweep workdir {root!r}: {e.strerror or e}") from e
  rows = []
  for i in selected:
    run = runs[i]
    workdir = os.path.join(root, run.name)
    restored = archive is not None and restore_run(run, os.path.join(archive, run.name), workdir)
    status = run_status(run, workdir)
    log(f"[{i + 1}/{len(runs)}] {run.name}: "
        + {"done": "finished, skipped", "resume": "resuming", "new": "starting"}[status]
        + (" (restored from the archive)" if restored else ""))
    try:
      if status == "done":
        with open(os.path.join(workdir, "summary.json")) as f:
          summary = json.load(f)
      else:
        summary = train_fn(run.config, workdir, resume=status == "resume")
      row = {"run": run.name, "status": "skipped (done)" if status == "done" else
             ("resumed" if status == "resume" else "ran"), **run.overrides}
      row.update({k: summary.get(k) for k in SUMMARY_COLUMNS[2:]})
      if archive is not None:
        archive_run(workdir, os.path.join(archive, run.name))
    except Exception as e:  # one bad run must not stop the sweep; it is reported below
      log(f"run {run.name} failed: {type(e).__name__}: {e}")
      log(traceback.format_exc(limit=3))
      row = {"run": run.name, "status": f"failed: {type(e).__name__}: {e}", **run.overrides}
    rows.append(row)
  write_summary(rows, root)
  log(markdown_table(rows))
  return rows


def _cell(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def markdown_table(rows: list[dict]) -> str:
  swept = []
  for row in rows:  # the swept keys go right after the run name and status
    swept += [k for k in row if k not in SUMMARY_COLUMNS and k not in swept]
  columns = list(SUMMARY_COLUMNS[:2]) + swept + list(SUMMARY_COLUMNS[2:])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_summary(rows: list[dict], root: str) -> None:
  runtime.write_json_atomic(os.path.join(root, "sweep_summary.json"), rows)
  with open(os.path.join(root, "sweep_summary.md"), "w") as f:
    f.write(markdown_table(rows) + "\n")


def main(argv):
  from absl import app, flags, logging
  from ml_collections import config_flags
  del argv
  logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  from experiments import main as main_lib
  try:
    rows = run_sweep(config, load_sweep_fn(path), flags.FLAGS.workdir,
                     runs_spec=flags.FLAGS.runs, archive=flags.FLAGS.archive)
  except main_lib.USER_ERRORS as e:  # a bad sweep, --runs or workdir: one line, no traceback
    print(main_lib.describe(e), file=sys.stderr)
    sys.exit(main_lib.EXIT_REFUSED)
  failed = [r["run"] for r in rows if str(r["status"]).startswith("failed")]
  if failed:
    raise app.UsageError(f"{len(failed)} of {len(rows)} runs failed: {failed}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config file with sweep(add).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per run.")
  flags.DEFINE_string("runs", None, "Only these runs, 1-based: '3', '8:12', '8:' or a "
                      "comma list of these (default: all).")
  flags.DEFINE_string("archive", None, "Folder that keeps each finished run's config, "
                      "metrics and summary (no checkpoints) and restores them into the workdir.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)

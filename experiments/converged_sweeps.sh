#!/usr/bin/env bash
# The converged CPU tables of docs/results/ as resumable sweeps, run one after another
# (REPRODUCE.md §5: one heavy job at a time on the 2 cores), in the order the open issues
# take them: the fidelity issues' sweeps (24-26) first, then robust/private/compressed FL
# (28) and text (27).
#
#   bash experiments/converged_sweeps.sh              # every sweep in order; re-run to continue
#   bash experiments/converged_sweeps.sh NAME ...     # only these, in the order given
#   bash experiments/converged_sweeps.sh --list       # names, configs, archived / total runs
#
# Each sweep runs in workdir/NAME and keeps every finished run in docs/results/runs/NAME
# (`experiments.sweep --archive`): a fresh checkout restores the archived runs and goes on
# with the first unfinished one, an interrupted run resumes from its last checkpoint. A sweep
# whose grid grows when its runs finish (the CAVP sweeps add their headline γ's seeds once
# seed 0 is archived; the text sweeps' other runs wait for their dense seed 0, whose curve
# sets their rounds) is run again until its grid stops growing. Commit
# the archive folders with the tables they feed. Extra `--config.x=y` arguments are not taken:
# a table's runs must share one config (change the config file and say so in its docs).
# Exit status: 0 when every named sweep finished, else the failing sweep's status (its log,
# workdir/NAME.log, says which run and why).
set -u
cd "$(dirname "$0")/.."

# NAME -> sweep config ('file.py' or 'file.py:arg'); ORDER is the run order.
declare -A CONFIGS=(
  [fedtiny_cifar10_converged]=experiments/configs/fedtiny_cifar10_converged.py
  [cavp_cifar10_centralised]=experiments/configs/cavp_cifar10_centralised.py
  [cavp_femnist_converged]=experiments/configs/cavp_femnist_converged.py
  [fiarse_cifar10_converged]=experiments/configs/fiarse_cifar10_converged.py
  [fiarse_femnist_converged]=experiments/configs/fiarse_femnist_converged.py
  [robust_femnist]=experiments/configs/robust_femnist.py
  [dp_femnist]=experiments/configs/dp_femnist.py
  [compress_femnist]=experiments/configs/compress_femnist.py
  [text_lstm_dense]=experiments/configs/fedavg_shakespeare.py
  [text_tr_dense]=experiments/configs/fedavg_shakespeare.py:transformer
  [text_tr_asp]=experiments/configs/fedavg_shakespeare.py:transformer,asp
  [text_tr_fiarse]=experiments/configs/fedavg_shakespeare.py:fiarse
  [text_tr_cavp]=experiments/configs/fedavg_shakespeare.py:cavp
  [text_lstm_fedtiny]=experiments/configs/fedavg_shakespeare.py:fedtiny
)
ORDER=(fedtiny_cifar10_converged cavp_cifar10_centralised cavp_femnist_converged
       fiarse_cifar10_converged fiarse_femnist_converged robust_femnist dp_femnist
       compress_femnist text_lstm_dense text_tr_dense text_tr_asp text_tr_fiarse text_tr_cavp
       text_lstm_fedtiny)
# Runs to skip: the robust sweep's runs 1-7 finished before archiving existed, and their
# numbers are quoted from their logs in docs/results/robust.md (re-making them: ~3 h).
declare -A RUNS=([robust_femnist]=8:)
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

if [ "${1:-}" = "--list" ]; then
  # One Python process for every sweep: `experiments.sweep.load_sweep_fn` reads each config's
  # `sweep(add)`; the archive's run folders holding a summary count as archived.
  args=()
  for name in "${ORDER[@]}"; do args+=("$name" "${CONFIGS[$name]}" "${RUNS[$name]:-}"); done
  "$PYTHON" - "${args[@]}" <<'EOF'
import glob, os, sys
from experiments import sweep
print(f"{'NAME':<28} {'CONFIG':<52} ARCHIVED/RUNS")
rows = sys.argv[1:]
for name, config, runs_spec in zip(rows[::3], rows[1::3], rows[2::3]):
  archived = len(glob.glob(os.path.join("docs", "results", "runs", name, "*", "summary.json")))
  try:  # a grid that reads finished runs may refuse them (a dense run not converged, say)
    runs = sweep.grid(sweep.load_sweep_fn(config))
  except sweep.build.ConfigError as e:
    print(f"{name:<28} {config:<52} {archived}/? ({e})")
    continue
  skipped = f" (runs {runs_spec})" if runs_spec else ""
  print(f"{name:<28} {config:<52} {archived}/{len(runs)}{skipped}")
EOF
  exit $?
fi
for arg in "$@"; do
  case "$arg" in
    -*) echo "unknown option '$arg' (config overrides are not taken: see the header)" >&2
        exit 2;;
  esac
  if [ -z "${CONFIGS[$arg]:-}" ]; then
    echo "unknown sweep '$arg'; known: ${ORDER[*]}" >&2
    exit 2
  fi
done

# How many runs a sweep config's grid has now: a grid may read its own finished runs (the
# CAVP sweeps add their headline γ's seeds once seed 0 is archived).
# A refused grid prints one line naming the config and stops the queue.
count_runs() {
  "$PYTHON" -c 'import sys
from experiments import sweep
try:
  print(len(sweep.grid(sweep.load_sweep_fn(sys.argv[1]))))
except sweep.build.ConfigError as e:
  sys.exit(f"sweep config {sys.argv[1]}: {e}")' "$1"
}

names=("$@")
[ "${#names[@]}" -eq 0 ] && names=("${ORDER[@]}")
mkdir -p workdir
for name in "${names[@]}"; do
  echo "== $name (${CONFIGS[$name]}): log workdir/$name.log"
  runs=()
  [ -n "${RUNS[$name]:-}" ] && runs=(--runs "${RUNS[$name]}")
  while :; do
    before=$(count_runs "${CONFIGS[$name]}") || exit 1
    "$PYTHON" -m experiments.sweep --config "${CONFIGS[$name]}" --workdir "workdir/$name" \
        --archive "docs/results/runs/$name" "${runs[@]}" >> "workdir/$name.log" 2>&1
    status=$?
    if [ "$status" != 0 ]; then
      echo "sweep $name failed (exit status $status): see workdir/$name.log" >&2
      exit "$status"
    fi
    after=$(count_runs "${CONFIGS[$name]}") || exit 1
    [ "$after" = "$before" ] && break
    echo "   $name: its grid grew from $before to $after runs (it reads its finished runs): again"
  done
done

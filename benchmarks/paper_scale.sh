#!/usr/bin/env bash
# The papers' own settings on a lent GPU, as resumable sweeps run in slices of ~10 minutes.
#
#   bash benchmarks/paper_scale.sh NAME [--config.field=value ...]   # one slice of NAME's sweep
#   bash benchmarks/paper_scale.sh --list                            # the names and their configs
#   bash benchmarks/paper_scale.sh experiments/configs/X.py         # any other sweep config
#
# NAME     config (its `sweep(add)` lists the runs)          setting (docs/results/<file>)
# asp      experiments/configs/asp_femnist_fullscale.py       FEMNIST CNN, 600 rounds x 50 clients, dense vs ASP (asp.md)
# fiarse   experiments/configs/fiarse_cifar10.py              CIFAR-10 ResNet-18, 800 rounds, 100 clients (fiarse.md)
# fedtiny  experiments/configs/fedtiny_cifar10.py             CIFAR-10 ResNet-18, 500 rounds, 10 of 100 (fedtiny.md)
# cavp     experiments/configs/cavp_cifar10.py                CIFAR-10 ResNet-56 gates (cavp.md)
#
# A slice runs `python -m experiments.sweep` under `timeout` (SLICE_S seconds, default 540) and
# stops it there; the next slice skips finished runs and resumes the interrupted one from its
# latest checkpoint (kill-and-resume is bit-exact: tests/test_resume.py). Extra arguments go to
# the sweep (base-config overrides, e.g. --config.checkpoint_every=5 for short slices).
#
# Where the workdir lives: WORKDIR, else workdir/paper/NAME. Device machines are bare on every
# new lease, so the workdir has to travel between slices:
#   - when $OUT is set, the slice ends by packing the workdir (records, summaries and the last
#     checkpoints; orbax keeps 3) into $OUT/paper_NAME.tar.gz;
#   - the next slice unpacks it first: PACK=path/to/paper_NAME.tar.gz bash benchmarks/paper_scale.sh NAME
#     (on the device machine, carry the fetched tarball as an ignored path).
# Exit status: 0 when the sweep finished, 3 when the slice ran out of time (run it again),
# anything else is the sweep's own failure (its log says which run and why).
set -u
cd "$(dirname "$0")/.."

declare -A CONFIGS=(
  [asp]=experiments/configs/asp_femnist_fullscale.py
  [fiarse]=experiments/configs/fiarse_cifar10.py
  [fedtiny]=experiments/configs/fedtiny_cifar10.py
  [cavp]=experiments/configs/cavp_cifar10.py
)

if [ "${1:-}" = "--list" ] || [ -z "${1:-}" ]; then
  for name in "${!CONFIGS[@]}"; do echo "$name ${CONFIGS[$name]}"; done | sort
  [ -n "${1:-}" ] && exit 0
  echo "usage: bash benchmarks/paper_scale.sh NAME [--config.field=value ...]" >&2
  exit 2
fi
NAME="$1"; shift
CONFIG="${CONFIGS[$NAME]:-}"
case "$NAME" in *.py) CONFIG="$NAME"; NAME="$(basename "$NAME" .py)";; esac  # any sweep config
if [ -z "$CONFIG" ] || [ ! -f "$CONFIG" ]; then
  echo "unknown NAME '$NAME'; known: ${!CONFIGS[*]}" >&2
  exit 2
fi
WORKDIR="${WORKDIR:-workdir/paper/$NAME}"
SLICE_S="${SLICE_S:-540}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

if [ -n "${PACK:-}" ]; then
  if [ ! -f "$PACK" ]; then echo "PACK file '$PACK' does not exist" >&2; exit 2; fi
  mkdir -p "$WORKDIR"
  tar -xzf "$PACK" -C "$WORKDIR" || { echo "cannot unpack '$PACK' (corrupt?)" >&2; exit 2; }
  echo "unpacked $PACK into $WORKDIR"
fi

"$PYTHON" -c "import jax; print('devices:', jax.devices())"
timeout --signal=TERM --kill-after=30 "$SLICE_S" \
  "$PYTHON" -m experiments.sweep --config "$CONFIG" --workdir "$WORKDIR" "$@"
status=$?
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "slice over after ${SLICE_S}s: run the same command again to continue"
  status=3
fi

if [ -n "${OUT:-}" ] && [ -d "$WORKDIR" ]; then
  tar -czf "$OUT/paper_$NAME.tar.gz" -C "$WORKDIR" . && \
    echo "packed $WORKDIR into \$OUT/paper_$NAME.tar.gz ($(du -h "$OUT/paper_$NAME.tar.gz" | cut -f1))"
  [ -f "$WORKDIR/sweep_summary.md" ] && cp "$WORKDIR/sweep_summary.md" "$OUT/paper_${NAME}_summary.md"
fi
exit "$status"

#!/usr/bin/env bash
# Runs the benchmark suite on a GPU machine and writes the results, device named.
#
#   bash benchmarks/run_gpu.sh            # full suite, <= ~10 minutes on one H100
#   bash benchmarks/run_gpu.sh --smoke    # every script at CI size (checks the setup, ~2 min)
#   ONLY=pfl_reference,precision bash benchmarks/run_gpu.sh   # just these steps
#
# Run from anywhere; it cd's to the repository root. Results go to $OUT when that
# variable is set (at most 8 files: 6 JSON, 1 PNG, 1 log), else to
# benchmarks/results/. Every JSON names the device (`device`, `backend`, `jax`).
#
# Python: $PYTHON if set, else the first of python3, python, .venv/bin/python
# whose JAX sees a GPU. It needs jax with CUDA, flax, optax, numpy and
# matplotlib; the package itself is imported from this checkout (no install).
# Without network access, missing packages can come from a local wheel folder:
# put the wheels in .whl/ (or point $WHEELS at a folder) and they are installed
# with `pip install --no-index --target` into a temporary site dir first.
#
# Each step has its own time limit (`timeout`) and writes its JSON as it goes, so
# a slow step costs its own results only; a step that fails is logged and the
# suite carries on. Limits (seconds): engine 170, pfl reference 120, pruning 40,
# memory 110, precision 90, scaling 55: at most 585 s plus the setup check. (On an H100
# on 2026-11-23 the pfl reference's two modes took ~60 s each after compiling.)
# Two more steps run only when named in ONLY (they would not fit in the 10 minutes):
#   ONLY=engine_resnet bash benchmarks/run_gpu.sh        # ResNet-18 at 8, 32, 64 clients (limit 280 s)
#   ONLY=engine_resnet_bf16 bash benchmarks/run_gpu.sh   # the same with bf16 GEMMs (mixed precision;
#                                                        # % of a bf16 matmul ceiling)
# and the text models (issue 27; LEAF Shakespeare: batch 10 windows of 80, 26 local steps), one
# step each (limit 280 s, one JSON each), so that both fit one ~10-minute slice, or one a slice:
#   ONLY=engine_text_lstm,engine_text_transformer bash benchmarks/run_gpu.sh
set -u
cd "$(dirname "$0")/.."

SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke"

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/run_gpu${SMOKE:+_smoke}.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

# Optional offline wheel cache.
WHEELS="${WHEELS:-.whl}"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "installing wheels from $WHEELS into /tmp/fedjax_prune_site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedjax_prune_site "$WHEELS"/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH="/tmp/fedjax_prune_site${PYTHONPATH:+:$PYTHONPATH}"
fi

CHECK='import jax, flax, optax, numpy, matplotlib; b = jax.default_backend(); print(b, jax.devices()[0].device_kind, jax.__version__); raise SystemExit(0 if b in ("gpu", "cuda", "rocm", "tpu") else 3)'
PY=""
SEEN=""  # interpreters already checked (python3 and python are often the same one): one import each
for cand in ${PYTHON:-} python3 python .venv/bin/python; do
  command -v "$cand" >/dev/null 2>&1 || continue
  env_id=$("$cand" -c 'import os, sys; print(os.path.realpath(sys.executable), sys.prefix)' 2>/dev/null) || continue
  case "$SEEN" in *"|$env_id|"*) continue ;; esac
  SEEN="$SEEN|$env_id|"
  if info=$("$cand" -c "$CHECK" 2>/dev/null); then
    PY="$cand"; break
  fi
done
if [ -z "$PY" ]; then
  say "ERROR: no Python here has JAX with a GPU backend plus flax, optax, numpy and matplotlib."
  say "  Tried: ${PYTHON:-} python3 python .venv/bin/python. What each says:"
  for cand in ${PYTHON:-} python3 python .venv/bin/python; do
    command -v "$cand" >/dev/null 2>&1 && say "  $cand: $("$cand" -c "$CHECK" 2>&1 | tail -1)"
  done
  say "  Fix: install jax[cuda12] (or cuda13), flax, optax, matplotlib, or put their wheels in .whl/,"
  say "  or set PYTHON=/path/to/python. (On a CPU-only machine run the scripts directly instead.)"
  exit 3
fi
say "python: $(command -v "$PY")  backend/device/jax: $info"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

export PYTHONUNBUFFERED=1
START=$(date +%s)
OPTIONAL=",engine_resnet,engine_resnet_bf16,engine_text_lstm,engine_text_transformer,"  # run only when ONLY names them
step() {  # step NAME LIMIT_S ARGS...: one benchmark under its own time limit
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  if [ -z "${ONLY:-}" ] && [[ "$OPTIONAL" == *",$name,"* ]]; then
    say "(step $name runs only when asked: ONLY=$name)"; return
  fi
  local t0=$(date +%s)
  say ""
  say "=== $name (limit ${limit}s, elapsed $((t0 - START))s) ==="
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$@" 2>&1 | grep --line-buffered -v "^W0000\|^I0000" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "=== $name: exit $rc after $(( $(date +%s) - t0 ))s $( [ "$rc" = 124 ] && echo '(time limit: partial results kept)')"
}

O=(--out-dir "$RESULTS")
if [ -n "$SMOKE" ]; then
  step engine 150 benchmarks/engine.py --smoke --models leaf_femnist_cnn,resnet18,shakespeare_lstm,shakespeare_transformer \
    --out "$RESULTS/engine_gpu_smoke.json"
  step pfl_reference 60 benchmarks/pfl_reference.py --smoke "${O[@]}"
  step pruning_payoff 60 benchmarks/pruning_payoff.py --smoke "${O[@]}"
  step memory 60 benchmarks/memory.py --smoke --remat --verify "${O[@]}"
  step precision 60 benchmarks/precision.py --smoke "${O[@]}"
  step scaling 60 benchmarks/scaling.py --smoke --no-weak --engine-json "$RESULTS/engine_gpu_smoke.json" "${O[@]}"
else
  # Engine: FEMNIST CNN at 8, 64, 512 and 1024 clients, ResNet-18 at 8; the loop baseline is the
  # faster of lax and im2col convs (im2col's loop was 2x faster than lax's on an H100 for the
  # FEMNIST CNN). '+lowrank' trains the 3136x2048 kernel as factors (federated.LowRankDense).
  # Entries of a cohort size are compiled first, then timed in turns; the shuffled loop
  # baselines (the engine's exact round as a loop) are skipped here for time.
  step engine 170 benchmarks/engine.py --models leaf_femnist_cnn,resnet18 \
    --cohorts 8,64,512,1024 --model-cohorts "resnet18=8" \
    --strategies vmap+im2col,vmap+im2col+lowrank,vmap+lax+lowrank,chunked128+im2col+lowrank \
    --model-strategies "resnet18=vmap+lax,chunked16+lax" \
    --loop-impls lax,im2col --no-flax-ref --no-shuffled-loop --donate --repeats 2 --time-budget 150 "${O[@]}"
  # ResNet-18 beyond 8 clients (bigger convolutions: the best chance at the matmul ceiling).
  step engine_resnet 280 benchmarks/engine.py --models resnet18 --cohorts 8,32,64 \
    --strategies vmap+im2col,vmap+lax,chunked16+im2col --loop-impls lax,im2col --no-shuffled-loop \
    --donate --repeats 2 --time-budget 260 --tag _resnet18 "${O[@]}"
  step engine_resnet_bf16 280 benchmarks/engine.py --models resnet18 --cohorts 8,32,64 \
    --strategies vmap+im2col,vmap+lax,chunked16+im2col --loop-impls lax,im2col --no-shuffled-loop \
    --donate --repeats 2 --time-budget 260 --compute-dtype bfloat16 --tag _resnet18_bf16 "${O[@]}"
  # Text models at cohorts 10, 64, 256 (engine.py's accelerator default for them): vmap, and chunks
  # of 64 at 256 clients; the per-client loop up to 64 clients (at 256 it is ~4x the 64-client
  # loop: nothing new for the time). The sequential strategy (a loop in the graph) is left out
  # for the same reason. JSON written after every cohort: a cut step keeps what it measured.
  for m in lstm transformer; do
    step engine_text_$m 280 benchmarks/engine.py --models shakespeare_$m --strategies vmap+lax,chunked64+lax \
      --loop-impls lax --max-loop-cohort 64 --no-shuffled-loop --donate --repeats 2 --time-budget 250 \
      --tag _text_$m "${O[@]}"
  done
  step pfl_reference 120 benchmarks/pfl_reference.py --strategy vmap+im2col+lowrank "${O[@]}"
  step pruning_payoff 40 benchmarks/pruning_payoff.py --model leaf_femnist_cnn --cohort 64 "${O[@]}"
  # Memory with and without factored dense kernels (remat saved nothing for this model on an H100).
  step memory 110 benchmarks/memory.py --model leaf_femnist_cnn --cohorts 8,64 --chunk 8 --lowrank --verify "${O[@]}"
  step precision 90 benchmarks/precision.py --rounds 20 --strategy vmap+im2col "${O[@]}"
  step scaling 55 benchmarks/scaling.py --cohorts 8,32,128,512 --no-weak --strategy vmap+im2col+lowrank \
    --engine-json "$RESULTS/engine_gpu.json" "${O[@]}"
fi
say ""
say "done in $(( $(date +%s) - START ))s; results in $RESULTS:"
ls -l "$RESULTS" | tee -a "$LOG"

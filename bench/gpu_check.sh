#!/usr/bin/env bash
# The one-call GPU check (docs/gpu.md): versions, install, CUDA parity tests, benchmarks, table.
#
#   bash bench/gpu_check.sh            # results under $OUT, default bench/results/latest
#
# Every step runs even when an earlier one fails (one device call should bring back everything it
# can); the exit status is non-zero if any step failed. Budget: under 7 minutes in all, enforced by
# per-step timeouts (SIGINT, so pytest ends its session and prints what failed). An interrupted
# pytest-benchmark writes no JSON report, so the bench also appends each record to
# $OUT/records.jsonl as it goes, and the summary falls back to that file.
#
# Knobs: OUT, PYTHON, ROLLINGQ_COMMIT (when the tree has no .git), PRECOMPILE_TIMEOUT, PARITY_TIMEOUT,
# BENCH_TIMEOUT, ROLLINGQ_SKIP_INSTALL=1 (dry run in an existing environment, e.g. on a CPU box).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
PRECOMPILE_TIMEOUT="${PRECOMPILE_TIMEOUT:-60}"
PARITY_TIMEOUT="${PARITY_TIMEOUT:-130}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-220}"
unset TRITON_INTERPRET  # the kernels must run on the GPU, not through the interpreter
export ROLLINGQ_BENCH_JSONL="$OUT/records.jsonl"
export ROLLINGQ_AUTOTUNE_JSONL="$OUT/autotune.jsonl"  # every config's time per autotune key (bench step)
# A reused OUT must not lend an old report to this run's summary.
rm -f "$ROLLINGQ_BENCH_JSONL" "$ROLLINGQ_AUTOTUNE_JSONL" "$OUT"/{bench.json,results.json,table.md,autotune.md,parity.log,bench.log}
START=$SECONDS
declare -a FAILED=()

step() { echo; echo "=== $* ($((SECONDS - START)) s)"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
  || echo "nvidia-smi failed"
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'(cuda', str(torch.version.cuda) + ') | triton', triton.__version__, '| device', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')" || FAILED+=("versions")
# Without a device every GPU case skips and the run "passes": say so in the exit status.
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "NO CUDA DEVICE: the GPU cases will skip"; FAILED+=("no-cuda-device"); }

COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$COMMIT" != unknown ] && [ -n "$(git --no-optional-locks status --porcelain 2>/dev/null)" ]; then COMMIT="$COMMIT-dirty"; fi
export ROLLINGQ_COMMIT="${ROLLINGQ_COMMIT:-$COMMIT}"
echo "commit $ROLLINGQ_COMMIT"

step "install"
if [ -n "${ROLLINGQ_SKIP_INSTALL:-}" ]; then
  echo "skipped (ROLLINGQ_SKIP_INSTALL set: dry run in an existing environment)"
else
  "$PY" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -n 5 || FAILED+=("install")
fi

step "precompile (every kernel the next two steps launch, in parallel, into Triton's cache)"
timeout -s INT -k 10 "$PRECOMPILE_TIMEOUT" "$PY" bench/precompile.py 2>&1 | tail -n 12
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || { echo "precompile rc=$rc: the launches compile on the clock instead"; FAILED+=("precompile(rc=$rc)"); }

step "CUDA parity tests (pytest tests/ -m cuda)"
timeout -s INT -k 15 "$PARITY_TIMEOUT" "$PY" -m pytest tests/ -q -m cuda -p no:cacheprovider 2>&1 \
  | tee "$OUT/parity.log" | tail -n 25
rc=${PIPESTATUS[0]}
case $rc in
  0) ;;
  5) echo "NO TEST MARKED cuda WAS COLLECTED: parity NOT checked"; FAILED+=("parity(none collected)") ;;
  124|130) echo "parity tests hit the ${PARITY_TIMEOUT} s limit"; FAILED+=("parity(timeout)") ;;
  *) FAILED+=("parity(rc=$rc)") ;;
esac

step "benchmarks (pytest bench/)"
timeout -s INT -k 20 "$BENCH_TIMEOUT" "$PY" -m pytest bench/ -q -p no:cacheprovider -rfEs \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=rounds 2>&1 | tee "$OUT/bench.log" | tail -n 30
rc=${PIPESTATUS[0]}
case $rc in
  0) ;;
  124|130) echo "benchmarks hit the ${BENCH_TIMEOUT} s limit"; FAILED+=("bench(timeout)") ;;
  *) FAILED+=("bench(rc=$rc)") ;;
esac

step "summary"
SRC="$OUT/bench.json"
if ! "$PY" -c "import json, sys; json.load(open(sys.argv[1]))" "$SRC" 2>/dev/null \
   && [ -s "$ROLLINGQ_BENCH_JSONL" ]; then
  echo "no JSON report: summarizing the records written so far"; SRC="$ROLLINGQ_BENCH_JSONL"
fi
echo "steps failed: ${FAILED[*]:-none}; total $((SECONDS - START)) s"
# Which config won each autotune key, and plain vs wide split, to a file (the table prints last).
if [ -s "$ROLLINGQ_AUTOTUNE_JSONL" ]; then
  "$PY" bench/autotune_report.py "$ROLLINGQ_AUTOTUNE_JSONL" --out "$OUT/autotune.md" > /dev/null \
    || FAILED+=("autotune_report")
fi
echo
"$PY" bench/summarize.py "$SRC" --out "$OUT/results.json" --table "$OUT/table.md" || FAILED+=("summarize")
[ ${#FAILED[@]} -eq 0 ]

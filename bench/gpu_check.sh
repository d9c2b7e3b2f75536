#!/usr/bin/env bash
# The one-call GPU check (docs/gpu.md): versions, install, CUDA parity tests, benchmarks, table.
#
#   ROLLINGQ_COMMIT=<sha> bash bench/gpu_check.sh   # results under $OUT, default bench/results/latest
#
# The device gets a copy of the working tree without .git: the caller passes the commit
# (`ROLLINGQ_COMMIT=<sha>`, the sha written in where `git rev-parse HEAD` works;
# bench/results/README.md); without it the run is recorded as commit "unknown", with a loud warning.
#
# Every step runs even when an earlier one fails (one device call should bring back everything it
# can); the exit status is non-zero if any step failed. Time: at most TOTAL_BUDGET (400 s) in all,
# limits and kill graces included (docs/gpu.md: under 7 minutes, so a second try fits). Every step's
# limit ends by the deadline TOTAL_BUDGET - SUMMARY_RESERVE - KILL_GRACE (385 s), so its SIGKILL
# comes by 390 s; the summary (standard library only, about a second) has the last 10 s. Nominal:
#   GPU + versions (limits 15 + 45 s, ~5 s), install (limit 60 s, ~5 s),
#   precompile 60 s + 5 s grace, CUDA parity tests 110 s + 5 s grace,
#   benchmarks: the rest until 385 s (+ 5 s grace): 195 s when the steps before take 10 + 65 + 115 s,
#   summary <= 10 s: 10 + 65 + 115 + 195 + 5 + 10 = 400 s.
# A limit sends SIGINT (pytest ends its session and prints what failed), then SIGKILL after the
# grace: exit status 124 (or 130) and 137 both read as a timeout.
#
# The benchmarks run as one pytest process per unit (ROLLINGQ_BENCH_SELECT, bench/conftest.py): the
# peak-memory measurement first (design.md's L = 16384 target), then each shape of shapes.GPU_SHAPES
# in order, each with the time left to the shared bench deadline, so a sticky CUDA error in one
# shape cannot poison the others. Every process appends its records to $OUT/records.jsonl as they
# are made, and the summary is built from that file (an interrupted or crashed process leaves its
# records there; pytest-benchmark then writes no report). The per-process JSON reports are merged
# into $OUT/bench.json. $OUT holds at most 8 files: bench.json, records.jsonl, results.json,
# table.md, autotune.jsonl, autotune.md, parity.log (precompile + parity), bench.log.
#
# Knobs: OUT, PYTHON (default: python3, else python; the first that has torch), ROLLINGQ_COMMIT,
# TOTAL_BUDGET, PRECOMPILE_TIMEOUT, PARITY_TIMEOUT, BENCH_TIMEOUT (optional cap on the bench's total),
# KILL_GRACE, BENCH_MIN_UNIT_S, BENCH_MEMORY_UNIT_S (the memory unit's cap, 60 s),
# ROLLINGQ_SKIP_INSTALL=1 (dry run in an existing environment, e.g. on a CPU box).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
REPO="$(pwd)"

OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# python3 first, python next, then this checkout's .venv (a CPU dry run without an activated venv):
# the first that has torch (a look-up, not an import), else python3.
pick_python() {
  local c
  for c in python3 python "$REPO/.venv/bin/python3"; do
    command -v "$c" > /dev/null && "$c" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" \
      2> /dev/null && { command -v "$c"; return; }
  done
  command -v python3 || command -v python
}
PY="${PYTHON:-$(pick_python)}"
TOTAL_BUDGET="${TOTAL_BUDGET:-400}"
SUMMARY_RESERVE=10
GRACE="${KILL_GRACE:-5}"  # SIGINT first; SIGKILL this much later
PRECOMPILE_TIMEOUT="${PRECOMPILE_TIMEOUT:-60}"
PARITY_TIMEOUT="${PARITY_TIMEOUT:-110}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-}"
MIN_UNIT_S="${BENCH_MIN_UNIT_S:-20}"  # a bench process with less time left is not started (imports + autotuning would not fit)
MEMORY_UNIT_S="${BENCH_MEMORY_UNIT_S:-60}"  # the memory unit's own cap: a hang there must leave the shapes their time
unset TRITON_INTERPRET  # the kernels must run on the GPU, not through the interpreter
export ROLLINGQ_BENCH_JSONL="$OUT/records.jsonl"
export ROLLINGQ_AUTOTUNE_JSONL="$OUT/autotune.jsonl"  # every config's time per autotune key (bench step)
unset ROLLINGQ_BENCH_SELECT
# A reused OUT must not lend an old report to this run's summary.
rm -f "$ROLLINGQ_BENCH_JSONL" "$ROLLINGQ_AUTOTUNE_JSONL" "$OUT"/{bench.json,results.json,table.md,autotune.md,parity.log,bench.log}
START=$SECONDS
declare -a FAILED=()

DEADLINE=$((START + TOTAL_BUDGET - SUMMARY_RESERVE - GRACE))  # every step's limit ends by here, its kill GRACE later
step() { echo; echo "=== $* ($((SECONDS - START)) s)"; }
capped() { local left=$((DEADLINE - SECONDS)); [ "$1" -lt "$left" ] && left=$1; echo $((left > 1 ? left : 1)); }
is_timeout() { case $1 in 124|130|137) return 0 ;; *) return 1 ;; esac; }

step "GPU (budget ${TOTAL_BUDGET} s: precompile ${PRECOMPILE_TIMEOUT} s, parity ${PARITY_TIMEOUT} s, bench the rest; every limit ends by $((DEADLINE - START)) s, + ${GRACE} s grace)"
timeout -k 2 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
  || echo "nvidia-smi failed"
# One interpreter start for the versions and the device check (exit 3: no CUDA device).
timeout -k 5 45 "$PY" -c "import sys, torch, triton; cuda = torch.cuda.is_available(); \
print('python', sys.version.split()[0], '| torch', torch.__version__, '(cuda', str(torch.version.cuda) + ') | triton', \
triton.__version__, '| device', torch.cuda.get_device_name(0) if cuda else 'NONE'); sys.exit(0 if cuda else 3)"
case $? in
  0) ;;
  3) echo "NO CUDA DEVICE: the GPU cases will skip"; FAILED+=("no-cuda-device") ;;  # a run of skips must not "pass"
  *) FAILED+=("versions") ;;
esac

COMMIT=unknown
if [ "$(git rev-parse --show-toplevel 2>/dev/null)" = "$REPO" ]; then  # this tree's own .git, not a parent's
  COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  if [ "$COMMIT" != unknown ] && [ -n "$(git --no-optional-locks status --porcelain 2>/dev/null)" ]; then
    COMMIT="$COMMIT-dirty"
  fi
fi
export ROLLINGQ_COMMIT="${ROLLINGQ_COMMIT:-$COMMIT}"
echo "commit $ROLLINGQ_COMMIT"
commit_warning() {
  [ "$ROLLINGQ_COMMIT" = unknown ] || return 0
  echo "!!!!! WARNING: COMMIT UNKNOWN: this copy has no .git and ROLLINGQ_COMMIT is not set; the results"
  echo "!!!!! cannot be tied to a version. Run: ROLLINGQ_COMMIT=<sha> bash bench/gpu_check.sh (bench/results/README.md)"
}
commit_warning

step "install"
if [ -n "${ROLLINGQ_SKIP_INSTALL:-}" ]; then
  echo "skipped (ROLLINGQ_SKIP_INSTALL set: dry run in an existing environment)"
else
  timeout -k 5 60 "$PY" -m pip install -q --no-index --disable-pip-version-check -e . --no-deps \
    --no-build-isolation 2>&1 | tail -n 5
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || FAILED+=("install(rc=$rc)")
fi

step "precompile (every kernel the next two steps launch, parity tests' first, in parallel, into Triton's cache)"
{ echo "=== precompile"; timeout -s INT -k "$GRACE" "$(capped "$PRECOMPILE_TIMEOUT")" "$PY" bench/precompile.py 2>&1; } \
  | tee "$OUT/parity.log" | tail -n 12
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  is_timeout "$rc" && echo "precompile hit the ${PRECOMPILE_TIMEOUT} s limit (rc=$rc): the rest compiles on the clock"
  FAILED+=("precompile(rc=$rc)")
fi

step "CUDA parity tests (pytest tests/ -m cuda)"
{ echo; echo "=== CUDA parity tests"; } >> "$OUT/parity.log"
timeout -s INT -k "$GRACE" "$(capped "$PARITY_TIMEOUT")" "$PY" -m pytest tests/ -q -m cuda -p no:cacheprovider 2>&1 \
  | tee -a "$OUT/parity.log" | tail -n 15
rc=${PIPESTATUS[0]}
case $rc in
  0) ;;
  5) echo "NO TEST MARKED cuda WAS COLLECTED: parity NOT checked"; FAILED+=("parity(none collected)") ;;
  124|130|137) echo "parity tests hit the ${PARITY_TIMEOUT} s limit (rc=$rc)"; FAILED+=("parity(timeout)") ;;
  *) FAILED+=("parity(rc=$rc)") ;;
esac

BENCH_END=$DEADLINE  # each process's limit ends here, its kill GRACE later
if [ -n "$BENCH_TIMEOUT" ] && [ $((SECONDS + BENCH_TIMEOUT)) -lt "$BENCH_END" ]; then BENCH_END=$((SECONDS + BENCH_TIMEOUT)); fi
step "benchmarks (pytest bench/, one process per unit, until $((BENCH_END - START)) s)"
# The shape names from summarize.py (standard library: no torch import); a test keeps them equal to shapes.GPU_SHAPES.
read -r -a SHAPE_NAMES <<< "$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import summarize; \
print(*summarize.GPU_SHAPE_NAMES)" 2>/dev/null)"
UNITS=(memory,smoke "${SHAPE_NAMES[@]}")  # the CPU smoke case (about a second) rides with the memory measurement
if [ ${#SHAPE_NAMES[@]} -eq 0 ]; then
  echo "no shape list: one process for the whole bench"; UNITS=(""); FAILED+=("bench(shape list)")
fi
PARTS="$(mktemp -d "${TMPDIR:-/tmp}/rollingq_bench_parts.XXXXXX")"  # per-process reports, merged below
: > "$ROLLINGQ_BENCH_JSONL"
n=0
for unit in "${UNITS[@]}"; do
  n=$((n + 1))
  left=$((BENCH_END - SECONDS))
  label="${unit%%,*}"; label="${label:-all}"
  if [ "$left" -lt "$MIN_UNIT_S" ]; then
    echo "--- $label: NOT RUN (${left} s left before the bench deadline)" | tee -a "$OUT/bench.log"
    FAILED+=("bench:$label(not run)"); continue
  fi
  if [ "$label" = memory ] && [ "$left" -gt "$MEMORY_UNIT_S" ]; then left=$MEMORY_UNIT_S; fi
  echo "--- $label (limit ${left} s, at $((SECONDS - START)) s)" | tee -a "$OUT/bench.log"
  ROLLINGQ_BENCH_SELECT="$unit" timeout -s INT -k "$GRACE" "$left" "$PY" -m pytest bench/ -q -p no:cacheprovider \
    -rfE --benchmark-json="$PARTS/$n.json" --benchmark-columns=rounds 2>&1 | tee -a "$OUT/bench.log" \
    | grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|deselected|errors?)\b|Interrupt|Timeout' | tail -n 8
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    if is_timeout "$rc"; then echo "$label hit the bench deadline (rc=$rc)"; FAILED+=("bench:$label(timeout)")
    else FAILED+=("bench:$label(rc=$rc)"); fi
  fi
done

step "summary"
parts=("$PARTS"/*.json)
[ -e "${parts[0]}" ] || parts=()
"$PY" bench/merge_reports.py "$OUT/bench.json" "${parts[@]}" || echo "(bench.json: no complete pytest report)"
rm -rf "$PARTS"
# Which config won each autotune key, and plain vs wide split, to a file (the table prints last).
if [ -s "$ROLLINGQ_AUTOTUNE_JSONL" ]; then
  "$PY" bench/autotune_report.py "$ROLLINGQ_AUTOTUNE_JSONL" --out "$OUT/autotune.md" > /dev/null \
    || FAILED+=("autotune_report")
fi
echo "steps failed: ${FAILED[*]:-none}; total $((SECONDS - START)) s"
commit_warning
echo
# From records.jsonl: every process appended there, including those cut short.
"$PY" bench/summarize.py "$ROLLINGQ_BENCH_JSONL" --out "$OUT/results.json" --table "$OUT/table.md" \
  || FAILED+=("summarize")
[ ${#FAILED[@]} -eq 0 ]

#!/usr/bin/env bash
# The one command that proves fastverify on a GPU (DESIGN §6):
#
#   scripts/gpu_check.sh [--smoke] [--out DIR]
#
# Stages, in order of value, each time-boxed, each writing its results under DIR as soon as
# it ends (a stage cut off or failing still leaves data, and the next stage still runs):
#   env     device, versions
#   build   the CUDA extension (parallel JIT compile; --smoke: the CPU emulator of the kernels)
#   tests   every family's correctness tests on the cuda and triton backends and on the torch
#           backend with CUDA tensors, against the same oracles as on CPU (--smoke: a
#           representative subset, Triton interpreter + CUDA emulator)
#   bench   the four families at the goal shapes against their baselines, in one process
#           (--smoke: tiny shapes, every backend)
#   static  sm_90 registers / spills / shared memory of every CUDA kernel (nvcc -Xptxas -v; runs
#           beside tests and bench) and of the Triton kernels (--smoke: the rejection family)
#   report  DIR/gpu_check.{md,json,png} and a one-screen summary
# GPU mode fits in 8 minutes on an H100 from a bare checkout; --smoke in 5 on 2 CPU cores.
# Python packages missing on the machine travel as wheels in .whl/ (installed to a temporary
# folder first). Exit status: 0 when every stage passed, 1 otherwise (the report is written
# either way).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (usage: scripts/gpu_check.sh [--smoke] [--out DIR])" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT" ]; then
    OUT="gpu_check-out/$( [ $SMOKE = 1 ] && echo smoke || echo gpu )-$(date -u +%Y%m%d-%H%M%S)"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/stages.jsonl"

if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=${PYTHON:-python3}; fi
if ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: installing the wheels of .whl/ into /tmp/fastverify-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastverify-site \
        .whl/*.whl && export PYTHONPATH=/tmp/fastverify-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ $SMOKE = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    FLAG=--smoke
    LIMITS=(env=60 build=240 tests=150 bench=150 static=240 report=60)
else
    FLAG=
    LIMITS=(env=60 build=180 tests=180 bench=150 static=300 report=60)
fi
limit() { for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

FAILED=0
record() {  # record STAGE RC SECONDS
    local timed_out=false
    { [ "$2" = 124 ] || [ "$2" = 137 ]; } && timed_out=true
    echo "{\"stage\": \"$1\", \"rc\": $2, \"seconds\": $3, \"timed_out\": $timed_out}" >> "$OUT/stages.jsonl"
    [ "$2" = 0 ] || FAILED=1
    echo "gpu_check: stage $1 exit $2 in ${3}s$( $timed_out && echo ' (cut off by its time box)')"
}
stage() {  # stage NAME: run one stage in the foreground, time-boxed
    local t0=$SECONDS rc
    echo "=== gpu_check: $1 (at most $(limit "$1") s) ==="
    timeout --kill-after=15 "$(limit "$1")" "$PY" scripts/gpu_check.py "$1" --out "$OUT" $FLAG
    rc=$?
    record "$1" $rc $((SECONDS - t0))
}

T0=$SECONDS
stage env
stage build
# static compiles on the CPU cores while the GPU runs the tests and benchmarks
( t0=$SECONDS; timeout --kill-after=15 "$(limit static)" "$PY" scripts/gpu_check.py static --out "$OUT" $FLAG \
      > "$OUT/static.log" 2>&1; echo $? $((SECONDS - t0)) > "$OUT/static.rc" ) &
STATIC=$!
stage tests
stage bench
echo "=== gpu_check: static (waiting for it) ==="
wait $STATIC
cat "$OUT/static.log"
read -r rc secs < "$OUT/static.rc" || { rc=1; secs=0; }
record static "$rc" "$secs"
stage report
echo "gpu_check: $((SECONDS - T0)) s in all; results in $OUT"
exit $FAILED

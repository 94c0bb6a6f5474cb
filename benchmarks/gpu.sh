#!/usr/bin/env bash
# Everything a lent GPU (one H100/H200) is for, in one call of under 9 minutes (the parts' limits
# add up to 540 s), in order of need (a run cut off loses the last parts): the machine, the GPU
# tests, the tuning study, the benchmark at gemma2-2b and llama3-8b (bf16, loss and
# loss+backward, logitless against every peer; no vocabulary sweep), the rest of the test suite
# on CUDA. FILTERING=1 adds the filtering study with the kernel's own census (the study itself
# runs on a CPU too). Every table and log lands under one folder; each part has its own time
# limit (seconds, below).
#
#   bash benchmarks/gpu.sh [OUT]              OUT defaults to $OUT (the device tool's), else
#                                             bench-gpu-<UTC time>
#   PRESETS="gemma2-2b" REGIMES="trained" OPS="loss+backward" bash benchmarks/gpu.sh   # a part
#   TESTS=0 TUNE=0 SUITE=0 bash benchmarks/gpu.sh    # the benchmark only
#
# OUT/machine.txt: date, commit, nvidia-smi, versions; OUT/gpu-tests.log: `pytest -m gpu`;
# OUT/tune.txt: benchmarks/tune.py (where the time goes; buffer sizes; the tiles chosen);
# OUT/bench.log: the benchmark's progress, a line per method and table as each finishes, then
# every table; OUT/bench.tgz: <preset>-<regime>-<op>/ with table.txt, results.csv and
# results.json of each table, rewritten after each method so that a run cut off at its limit
# keeps every method it finished (one archive: the device tool returns at most 8 files);
# OUT/suite.log: every other test, on CUDA; OUT/filtering.txt: what each filtering rule skips on
# trained data, at what error. Each benchmark method runs in one worker process for all tables, so
# its imports are paid once (each table compiles afresh, as a fresh process would, and only the
# first table's "1st work" is a process's first call). Tests run on pytest-xdist workers where it
# is installed, which compile the kernels' variants in parallel.
#
# No network is needed. Peers come as wheels from .whl/ (cut-cross-entropy, liger-kernel:
# pure Python, installed without dependencies). The trained regime's model and token ids come
# from .bench-cache/ when present (copy ~/.cache/logitless/* there), else are built here first
# (the model trains in about half a minute on the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-${OUT:-bench-gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
PRESETS=${PRESETS:-gemma2-2b llama3-8b}
REGIMES=${REGIMES:-trained}
OPS=${OPS:-loss loss+backward}
# every CUDA peer (PyTorch's F.linear_cross_entropy, torch-lce, included; cut-cross-entropy's
# torch_compile path is its CPU fallback), torch.compile last: its compilation is the slowest
# part, and a run cut off at the limit then loses only its last tables
METHODS=${METHODS:-logitless-triton logitless-triton-filtered cce cce-exact liger torch-lce eager matmul torch-compile}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps .whl/*.whl 2>&1 | tail -3 \
        || echo "warning: some wheels did not install; those methods will show n/a" >&2
fi
if [ -z "${LOGITLESS_CACHE:-}" ] && [ -d .bench-cache ]; then
    export LOGITLESS_CACHE=$PWD/.bench-cache
fi

{
    date -u
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null
    nvidia-smi
    "$PYTHON" -m pip list 2>/dev/null | grep -iE "^(torch|triton|cut.cross|liger|numpy|transformers) "
} > "$OUT/machine.txt" 2>&1
head -20 "$OUT/machine.txt"

# log, time limit, xdist workers, pytest arguments; interrupted (SIGINT) at the time limit, so
# that pytest still prints its summary of failures
run_tests() {
    local log=$1 limit=$2 workers=()
    "$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n "$3")
    shift 3
    timeout -s INT -k 15 "$limit" "$PYTHON" -m pytest "${workers[@]}" -rfE --tb=short \
        -p no:cacheprovider -p no:benchmark "$@" tests 2>&1 | tee -a "$OUT/$log" | tail -25
}

if [ "${TESTS:-1}" = 1 ]; then
    echo "== pytest -m gpu" >&2
    # model shapes take GBs each: four at a time; the two past 2^31 elements one at a time; each
    # test's name and outcome logged as it ends (-v), so that a run cut off says which ran
    run_tests gpu-tests.log "${TESTS_TIMEOUT:-160}" 4 -v -m gpu -k "not past_two_to_the_31"
    run_tests gpu-tests.log 50 0 -v -m gpu -k "past_two_to_the_31"
fi

if [ "${TUNE:-1}" = 1 ]; then
    echo "== where the time goes (benchmarks/tune.py)" >&2
    # shellcheck disable=SC2086
    timeout "${TUNE_TIMEOUT:-100}" "$PYTHON" benchmarks/tune.py --preset $PRESETS 2>&1 \
        | tee "$OUT/tune.txt"
fi

echo "== benchmark: $PRESETS / $REGIMES / $OPS" >&2
# shellcheck disable=SC2086  # the lists are words
timeout "${BENCH_TIMEOUT:-210}" "$PYTHON" -m logitless bench --device cuda --dtype bfloat16 \
    --preset $PRESETS --data $REGIMES --op $OPS --methods $METHODS --repeats "${REPEATS:-5}" \
    --warmup 1 --sweep-v --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | grep -vE "^ {6}[a-z]" || true
tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -r "$OUT/bench"

if [ "${SUITE:-1}" = 1 ]; then
    echo "== every other test, on CUDA" >&2
    run_tests suite.log "${SUITE_TIMEOUT:-20}" 14 -q -m "not gpu"
fi

if [ "${FILTERING:-0}" = 1 ]; then
    echo "== gradient filtering on the trained regime (benchmarks/filtering.py)" >&2
    # shellcheck disable=SC2086
    timeout "${FILTERING_TIMEOUT:-90}" "$PYTHON" benchmarks/filtering.py --preset $PRESETS 2>&1 \
        | tee "$OUT/filtering.txt"
fi
echo "results under $OUT/" >&2

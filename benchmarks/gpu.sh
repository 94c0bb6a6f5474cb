#!/usr/bin/env bash
# Everything a lent GPU (one H100/H200) is for, in one call of about 7 minutes: the machine, the
# GPU tests, then the benchmark at gemma2-2b and llama3-8b, bf16, trained and random data, loss
# and loss+backward, logitless against every peer, every table and log under one folder.
#
#   bash benchmarks/gpu.sh [OUT]              OUT defaults to $OUT (the device tool's), else
#                                             bench-gpu-<UTC time>
#   PRESETS="gemma2-2b" REGIMES="trained" OPS="loss+backward" bash benchmarks/gpu.sh   # a part
#   TESTS=0 bash benchmarks/gpu.sh            # the benchmark only
#
# OUT/machine.txt: date, commit, nvidia-smi, versions; OUT/gpu-tests.log: `pytest -m gpu`;
# OUT/filtering.txt: what a per-token filtering budget can skip on trained data (FILTERING=0: not);
# OUT/bench.log: the benchmark's progress, a line per method and table as each finishes (so a run
# cut off still says where it was), then every table; OUT/bench.tgz: <preset>-<regime>-<op>/ with
# table.txt, results.csv and results.json of each table (one archive: the device tool returns at
# most 8 files). Each method runs in one worker process for all tables, so its imports and
# compilation are paid once.
#
# No network is needed. Peers come as wheels from .whl/ (cut-cross-entropy, liger-kernel:
# pure Python, installed without dependencies). The trained regime's model and token ids come
# from .bench-cache/ when present (copy ~/.cache/logitless/* there), else are built here first
# (the model trains in about half a minute on the GPU; it is copied to OUT for the next call).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-${OUT:-bench-gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
PRESETS=${PRESETS:-gemma2-2b llama3-8b}
REGIMES=${REGIMES:-trained random}
OPS=${OPS:-loss loss+backward}
METHODS=${METHODS:-logitless-triton logitless-triton-exact cce cce-exact liger torch-compile eager matmul}
TESTS=${TESTS:-1}
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

if [ "$TESTS" = 1 ]; then
    echo "== pytest -m gpu" >&2
    timeout 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 \
        | tee "$OUT/gpu-tests.log" | tail -25
fi

if [ "${FILTERING:-1}" = 1 ]; then
    echo "== gradient filtering on the trained regime (benchmarks/filtering.py)" >&2
    # shellcheck disable=SC2086
    timeout 150 "$PYTHON" benchmarks/filtering.py --preset $PRESETS 2>&1 | tee "$OUT/filtering.txt"
fi

echo "== benchmark: $PRESETS / $REGIMES / $OPS" >&2
# shellcheck disable=SC2086  # the lists are words
timeout "${BENCH_TIMEOUT:-360}" "$PYTHON" -m logitless bench --device cuda --dtype bfloat16 --preset $PRESETS --data $REGIMES \
    --op $OPS --methods $METHODS --repeats "${REPEATS:-5}" --warmup 1 --sweep-v \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | grep -vE "^ {6}[a-z]" || true
tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -r "$OUT/bench"
cp "${LOGITLESS_CACHE:-$HOME/.cache/logitless}"/bench-lm-*.pt "$OUT/" 2>/dev/null || true
echo "results under $OUT/" >&2

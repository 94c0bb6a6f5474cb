#!/usr/bin/env bash
# The benchmark on one CUDA GPU (H100/H200): gemma2-2b and llama3-8b presets, trained and random
# data, loss and loss+backward, every method, bf16; all output under one folder.
#
#   bash benchmarks/gpu.sh [OUT [PRESET...]]     OUT defaults to bench-gpu-<UTC time>
#   REGIMES="trained" OPS="loss+backward" bash benchmarks/gpu.sh out gemma2-2b   # a part only
#
# Each (preset, regime, op) run writes OUT/<preset>-<regime>-<op>/ (table.txt, results.csv,
# results.json; the loss+backward runs on trained data also the sweep plots over V = 32k..256k)
# and its progress log beside it. Expect about 3-4 minutes per run, so split the presets over
# separate calls where one call is limited to 10 minutes.
#
# No internet is needed: wheels in .whl/ (cut-cross-entropy, liger-kernel, and where missing
# tokenizers and matplotlib with their dependencies) are installed from there first. The trained
# regime uses the LM cache in $LOGITLESS_CACHE, else .bench-cache/ when present (copy
# ~/.cache/logitless/* there to reuse the model trained elsewhere), else trains it here.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-bench-gpu-$(date -u +%Y%m%dT%H%M%SZ)}
shift || true
PRESETS=${*:-gemma2-2b llama3-8b}
REGIMES=${REGIMES:-trained random}
OPS=${OPS:-loss loss+backward}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing wheels from .whl/" >&2
    "$PYTHON" -m pip install --quiet --no-index --find-links .whl .whl/*.whl \
        || echo "warning: some wheels did not install; those methods will show n/a" >&2
fi
if [ -z "${LOGITLESS_CACHE:-}" ] && [ -d .bench-cache ]; then
    export LOGITLESS_CACHE=$PWD/.bench-cache
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi 2>/dev/null || true
    "$PYTHON" -m pip list 2>/dev/null || true
} > "$OUT/machine.txt"

for preset in $PRESETS; do
    for regime in $REGIMES; do
        for op in $OPS; do
            run="$preset-$regime-${op/+/-}"
            sweep=(--sweep-v)  # no sweep ...
            if [ "$regime" = trained ] && [ "$op" = loss+backward ]; then
                sweep=()  # ... except here: the default vocabulary sweep
            fi
            echo "== $run" >&2
            "$PYTHON" -m logitless bench --device cuda --dtype bfloat16 --preset "$preset" \
                --data "$regime" --op "$op" "${sweep[@]}" --out "$OUT/$run" \
                2> >(tee "$OUT/$run.log" >&2) || echo "!! $run failed (see $OUT/$run.log)" >&2
        done
    done
done
echo "results under $OUT/" >&2

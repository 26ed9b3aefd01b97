#!/usr/bin/env bash
# The CPU benchmark behind docs/performance.md: every network at its card input size,
# 512² input slices, against the official-style reference loop and with the onnxruntime
# backend, in one run per network.
#
#   scripts/benchmark_cpu.sh [OUTDIR]            (default: $TMPDIR/lesionseg-benchmark)
#   THREADS=1 taskset -c 1 scripts/benchmark_cpu.sh out   # one core, as in docs/performance.md
#
# L-Seg runs at its card size 960×1440 with fewer slices and batch sizes 1, 2: one batch of
# 8 fundus-size images needs ~8 GB of activations.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${TMPDIR:-/tmp}/lesionseg-benchmark}
mkdir -p "$OUT"
LS=${LESIONSEG:-.venv/bin/lesionseg}
THREADS_ARG=()
if [ -n "${THREADS:-}" ]; then THREADS_ARG=(--threads "$THREADS"); fi
MODELS=${MODELS:-unet msenet mslkseg m2snet msnet bsnet lseg}
for m in $MODELS; do
  if [ "$m" = lseg ]; then sizes=(--slices 4 --batch-sizes 1,2); else sizes=(--slices 8 --batch-sizes 1,2,4,8); fi
  "$LS" benchmark --models "$m" --devices cpu "${sizes[@]}" --repeats 3 --linearity --onnx "${THREADS_ARG[@]}" \
    --json "$OUT/$m.json" > "$OUT/$m.md" 2> "$OUT/$m.log"
done

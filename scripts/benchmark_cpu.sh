#!/usr/bin/env bash
# The CPU benchmark behind docs/performance.md: every network at its card input size,
# 512² input slices, against the official-style reference loop, in one run per network.
# Usage: scripts/benchmark_cpu.sh [OUTDIR]   (default: $TMPDIR/lesionseg-benchmark)
# L-Seg runs at its card size 960×1440 with fewer slices and batch sizes 1, 2: one
# batch of 8 fundus-size images needs ~8 GB of activations.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${TMPDIR:-/tmp}/lesionseg-benchmark}
mkdir -p "$OUT"
LS=${LESIONSEG:-.venv/bin/lesionseg}
for m in unet msenet mslkseg m2snet msnet bsnet; do
  "$LS" benchmark --models "$m" --devices cpu --slices 8 --batch-sizes 1,2,4,8 --repeats 3 --linearity \
    --json "$OUT/$m.json" > "$OUT/$m.md" 2> "$OUT/$m.log"
done
"$LS" benchmark --models lseg --devices cpu --slices 4 --batch-sizes 1,2 --repeats 3 --linearity \
  --json "$OUT/lseg.json" > "$OUT/lseg.md" 2> "$OUT/lseg.log"

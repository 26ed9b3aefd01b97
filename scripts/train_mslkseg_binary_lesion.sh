#!/usr/bin/env bash
# MS-LKSeg `binary-lesion`, the network that is not shipped (docs/results.md, "Not shipped"):
# the paper names no data set, so LesionSeg trains it on the polyp release's set — CVC-ClinicDB
# and Kvasir-SEG, split by video sequence (weights/splits/polyp.json) — with the polyp
# release's budget (42 epochs of 320 images, batch 16, 224²), so that its held-out scores sit
# beside M2SNet `polyp` and their U-Net baseline. MS-LKSeg's own recipe otherwise (AdamW,
# cosine schedule, DyConv temperature anneal); no early stop, as for the baselines.
#
#   scripts/train_mslkseg_binary_lesion.sh [OUT] [--resume ...more train options]
#   python scripts/release_weights.py OUT/mslkseg-binary-lesion --name mslkseg-binary-lesion --out DIR \
#       --budget "…" --licence "research and educational use only (CVC-ClinicDB, Kvasir-SEG)" --command "…"
#   LESIONSEG_RELEASE_WEIGHTS=DIR lesionseg predict --model mslkseg IMAGES -o OUT
#
# Its fp16 file is about 45 MB: beside the three shipped files it would pass the repository's
# 150 MB, hence a folder of your own (DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
shift $(( $# < 1 ? $# : 1 ))
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

exec "$PY" -m LesionSegLib train --model mslkseg --preset binary-lesion \
  --data "$DATA/polyp-clinicdb" "$DATA/polyp-kvasir256" --split weights/splits/polyp.json \
  --out "$OUT/mslkseg-binary-lesion" --epochs 42 --batch-size 16 \
  --set 'size=[224,224]' --set multiscale=null --set epoch_length=320 \
  --set early_stopping=null --set checkpoint_every_steps=20 "$@"

#!/usr/bin/env bash
# Shortened CPU training runs of BSNet and the U-Net baseline on COVID-SemiSeg (50 slices,
# case-level split: 7 blocks of 10 consecutive slice numbers, about 20 % of the slices for
# validation). No GPU and no ImageNet backbone file were available: BSNet's Res2Net-50
# starts from random weights, the sizes are reduced to 192 and each run stops after
# 13 minutes (time_limit_s, checked between epochs). See docs/training.md for the results.
#
#   scripts/train_covid_cpu.sh [DATA] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/covid-semiseg/train}
OUT=${2:-runs/covid-cpu}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

run() {  # name, then lesionseg train arguments
  local name=$1; shift
  local start=$(date +%s)
  "$PY" -m LesionSegLib train "$@" --data "$DATA" --out "$OUT/$name" --device cpu \
      --set time_limit_s=780 --set checkpoint_every_steps=0 2>&1 | tee "$OUT/$name.txt"
  echo "$name: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/$name.txt"
}

# BSNet: the Inf-Net recipe (Adam 1e-4, gradient clamp 0.5, deep supervision + edge BCE),
# without the three-size cycle (one size, 192) and with batch 4 instead of 24
run bsnet --model bsnet --preset covid-ct --epochs 100 --batch-size 4 \
    --set 'size=[192,192]' --set multiscale=null

# U-Net baseline: the X-Net recipe (Adam 1e-3, plateau 0.2/3, early stop 5 on val_loss),
# flips and +-10 deg rotations, 192 instead of 352
run unet --model unet --preset covid-ct --epochs 100 --batch-size 8 --set 'size=[192,192]'

#!/usr/bin/env bash
# U-Net baselines beside the shipped weights: the same data, split and budget as the
# release runs of M2SNet `polyp` and `breast-us` and L-Seg `fundus-dr` (weights/*.md, "Reproduce"),
# with U-Net's own recipe (Adam 1e-3, plateau) and no early stop, so that both see the
# same number of images. One CPU thread each; the two can run side by side.
#
#   scripts/train_unet_baselines.sh polyp|breast-us|fundus [OUT] [--resume ...more train options]
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:?polyp, breast-us or fundus}
OUT=${2:-runs}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

case "$TASK" in
  polyp)
    exec "$PY" -m LesionSegLib train --model unet --preset polyp \
      --data "$DATA/polyp-clinicdb" "$DATA/polyp-kvasir256" --split weights/splits/polyp.json \
      --out "$OUT/unet-polyp" --epochs 42 --batch-size 16 \
      --set 'size=[224,224]' --set multiscale=null --set epoch_length=320 \
      --set early_stopping=null --set time_limit_s=6600 --set checkpoint_every_steps=20 "$@" ;;
  breast-us)
    # M2SNet's BUSI fine-tuning budget (20 epochs of 256 images at 224², batch 16). M2SNet
    # started from its polyp release; the U-Net starts from random weights (its preset reads
    # one grey channel, the polyp U-Net three, and no polyp U-Net has been trained): a
    # comparison that favours M2SNet by its polyp pre-training, stated with the result.
    exec "$PY" -m LesionSegLib train --model unet --preset breast-us \
      --data "$DATA/breast-busi" --split weights/splits/busi.json \
      --out "$OUT/unet-breast-us" --epochs 20 --batch-size 16 \
      --set 'size=[224,224]' --set multiscale=null --set epoch_length=256 \
      --set early_stopping=null --set time_limit_s=6600 --set checkpoint_every_steps=10 \
      --set 'case_regex="^(.*)$"' "$@" ;;
  fundus)
    # L-Seg's run: tiles, optimizer, schedule, augmentation and loss (the card's
    # multi-label outputs select the multi-channel bin loss)
    exec "$PY" -m LesionSegLib train --model unet --preset fundus-dr \
      --data "$DATA/fundus-idrid20" --split weights/splits/idrid.json \
      --out "$OUT/unet-fundus" --epochs 40 --batch-size 4 \
      --set 'tile_from=[960,1440]' --set 'size=[320,320]' --set epoch_length=80 --set accumulate=1 \
      --set 'optimizer={"name":"adam","lr":0.0001,"weight_decay":0.0002}' \
      --set 'schedule={"name":"step","step_epochs":[30],"gamma":0.1}' \
      --set 'augment={"hflip":0.5,"vflip":0.5,"rotate":10.0,"scale":null}' \
      --set early_stopping=null --set time_limit_s=6600 --set checkpoint_every_steps=20 \
      --set 'case_regex="^(.*)$"' "$@" ;;
  *) echo "unknown task '$TASK' (polyp, breast-us or fundus)" >&2; exit 2 ;;
esac

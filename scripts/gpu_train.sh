#!/usr/bin/env bash
# The device side of scripts/gpu_kit.py (read its docstring first): runs on the lent GPU
# machine, in the repository root, with python3 = the image's PyTorch.
#
#   bash scripts/gpu_train.sh install              # call 1, carry .gpu/whl
#   bash scripts/gpu_train.sh TASK SECONDS         # call 2, carry .gpu/data: the release network and
#                                                  # its U-Net baseline side by side on the GPU for at
#                                                  # most SECONDS, then the GPU benchmark; the release
#                                                  # network's run comes back under $OUT in parts
#   bash scripts/gpu_train.sh fetch unet-TASK      # call 3 at once: the baseline's run (a call returns
#                                                  # 64 MiB at most: M2SNet in fp16 alone is 57 MiB)
#
# Both networks get the same data, split, image sizes and number of epochs (the M2SNet
# recipe's sizes); the number of epochs is what fits: a one-epoch probe of the release
# network measures an epoch, then both train that many epochs from the start.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.gpu/site
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

pack_run() {  # run name: its folder, weights in fp16 (as released), in parts of 15 MiB under $OUT
  local name=$1
  [ -f "runs/$name/best.pt" ] || { echo "runs/$name/best.pt: no such file" >&2; return 1; }
  rm -f "runs/$name/training_state.pt" "runs/$name/last.pt"
  python3 - "runs/$name/best.pt" <<'PY'
import sys
from LesionSegLib import checkpoint
path = sys.argv[1]
ck = checkpoint.load(path)
checkpoint.save(path, ck.model.half(), card=ck.card, config=ck.config, provenance=ck.provenance)
PY
  tar -cf "/tmp/$name.tar" -C runs "$name"
  sha256sum "/tmp/$name.tar" | cut -d' ' -f1 > "$OUT/$name.tar.sha256"
  split -b 15M -d -a 1 "/tmp/$name.tar" "$OUT/$name.tar.part"
}

if [ "${1:-}" = fetch ]; then   # call 3: a run left on the machine by call 2
  pack_run "${2:?run name, e.g. unet-polyp}"
  ls -la "$OUT"
  exit 0
fi

if [ "${1:-}" = install ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl
  python3 -c "import SimpleITK, torch, LesionSegLib; print('ready: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  exit 0
fi

TASK=${1:?task: polyp or breast-us}
BUDGET=${2:-420}
DATA=.gpu/data
[ -f "$DATA/task.json" ] || { echo "no $DATA/task.json: run 'scripts/gpu_kit.py pack $TASK' here and carry .gpu/data" >&2; exit 2; }
python3 -c "import SimpleITK" 2>/dev/null || { echo "SimpleITK missing: run 'bash scripts/gpu_train.sh install' first (carry .gpu/whl)" >&2; exit 2; }
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo 'no nvidia-smi'; } | tee "$OUT/gpu.txt"
START=$(date +%s)
# the task as pack wrote it: model, preset, case rule (a --set value, or "-") and data folders
read -r MODEL PRESET CASES FOLDERS < <(python3 -c "
import json
t = json.load(open('$DATA/task.json'))
r = t['case_regex']
print(t['model'], t['preset'], '-' if r is None else 'case_regex=\"%s\"' % r, *('$DATA/' + f for f in t['folders']))")
[ "$CASES" = - ] && CASES=
# LossNet needs the ImageNet VGG16 (59 MB), which cannot travel beside the data: off, as in the CPU releases
COMMON=(--data $FOLDERS --split "$DATA/split.json" --device "${DEVICE:-cuda}" --batch-size 16
        --set checkpoint_every_steps=0 --set early_stopping=null ${CASES:+--set "$CASES"})
SIZES=(--set 'size=[352,352]' --set 'multiscale={"sizes":[224,256,288,320,352],"mode":"random"}')
# a dry run of the whole path on a CPU: DEVICE=cpu GPU_KIT_EXTRA="--set epoch_length=16 --set 'size=[64,64]' …"
eval "DRY=(${GPU_KIT_EXTRA:-})"

train() {  # name model epochs seconds [more options]
  local name=$1 model=$2 epochs=$3 secs=$4; shift 4
  python3 -m LesionSegLib train --model "$model" --preset "$PRESET" "${COMMON[@]}" "${SIZES[@]}" \
    --out "runs/$name" --epochs "$epochs" --set "time_limit_s=$secs" "$@" ${DRY[@]+"${DRY[@]}"}
}

rm -rf runs/probe "runs/$MODEL-$TASK" "runs/unet-$TASK"
extra=()
[ "$MODEL" = m2snet ] && extra=(--set loss.lossnet_weight=0)
train probe "$MODEL" 1 300 "${extra[@]}" > "$OUT/probe.log" 2>&1 || { tail -20 "$OUT/probe.log"; exit 1; }
# the probe's epoch time (60 s if it logged none)
EPOCH_S=$(python3 -c "
import csv
try: print(float(list(csv.DictReader(open('runs/probe/log.csv')))[-1]['epoch_time_s']))
except Exception: print(60.0)")
LEFT=$(( BUDGET - ($(date +%s) - START) - 90 ))   # 90 s for the benchmark and the packing
# side by side the release network runs about a third slower than alone
EPOCHS=$(python3 -c "print(max(1, min(50, int($LEFT / ($EPOCH_S * 1.35)))))")
echo "one epoch alone: ${EPOCH_S} s; $LEFT s left: $EPOCHS epochs each" | tee "$OUT/plan.txt"

train "$MODEL-$TASK" "$MODEL" "$EPOCHS" "$LEFT" "${extra[@]}" > "$OUT/train-$MODEL.log" 2>&1 &
P1=$!
train "unet-$TASK" unet "$EPOCHS" "$LEFT" > "$OUT/train-unet.log" 2>&1 &
P2=$!
wait $P1 || echo "the $MODEL run failed (see train-$MODEL.log)"
wait $P2 || echo "the U-Net run failed (see train-unet.log)"
tail -n 3 "$OUT/train-$MODEL.log" "$OUT/train-unet.log" || true

# GPU benchmark (the fast-CPU issue's GPU figures): slices/s at 352² in bf16, a 512×512×300 volume
timeout 80 python3 -m LesionSegLib benchmark --models bsnet,m2snet --devices "${DEVICE:-cuda}" --slices 300 --slice-size 512 \
  --size 352 --precision bf16 --batch-sizes "" --repeats 2 --no-reference --json "$OUT/benchmark.json" \
  > "$OUT/benchmark.txt" 2>&1 || echo "benchmark stopped (see benchmark.txt)"

pack_run "$MODEL-$TASK" || echo "nothing to bring back of $MODEL-$TASK"
cat "$OUT"/*.log > "$OUT/logs.txt"; rm -f "$OUT"/*.log "$OUT/gpu.txt" "$OUT/plan.txt"
ls -la "$OUT"
echo "next, at once (the machine stays warm 30 s): bash scripts/gpu_train.sh fetch unet-$TASK"

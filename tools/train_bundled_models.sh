#!/usr/bin/env bash
# Trains the two bundled models, the robust brain model (random LR synthesis: it shares the brain cache)
# and their ablations, all at once on one GPU, from prepared caches.
#
# The caches are made beforehand (they let the GPU machine train without SimpleITK):
#   python -m SASSRSegmentLib preprocess --dataset ../shared/data/Dataset001_BraTSFLAIR \
#       --output .gpu/cache-brain --config configs/brain-tumour-flair-3d.json
#   python -m SASSRSegmentLib preprocess --dataset ../shared/data/Dataset002_BUSI \
#       --output .gpu/cache-busi --config configs/breast-ultrasound-2d.json
#   tar cJf .gpu/transport/brain.txz -C .gpu cache-brain; tar cJf .gpu/transport/busi.txz -C .gpu cache-busi
# Then, on the GPU machine, from the repository root:
#   MINUTES=7 DEVICE=cuda RESULTS=$OUT bash tools/train_bundled_models.sh
# Every run gets the same wall-clock budget (MINUTES) on the same GPU, concurrently.
set -uo pipefail
MINUTES=${MINUTES:-7}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-runs/results}
SMOKE_STEPS=${SMOKE_STEPS:-2}
WORK=${WORK:-/tmp/sassr-work}
PY=${PY:-python3}
export PYTHONPATH="$PWD/SASSRSegment${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$WORK/runs" "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)

[ -d "$WORK/cache-brain" ] || tar xJf .gpu/transport/brain.txz -C "$WORK" &
[ -d "$WORK/cache-busi" ] || tar xJf .gpu/transport/busi.txz -C "$WORK" &
wait
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
nproc

# name dataset config ablation loader-workers (3D patches need more workers to keep up)
RUNS="
brain-full cache-brain configs/brain-tumour-flair-3d.json full 3
brain-robust cache-brain configs/brain-tumour-flair-3d-robust.json full 4
brain-baseline cache-brain configs/brain-tumour-flair-3d.json baseline 3
busi-full cache-busi configs/breast-ultrasound-2d.json full 1
busi-baseline cache-busi configs/breast-ultrasound-2d.json baseline 1
busi-sr-fa cache-busi configs/breast-ultrasound-2d.json sr-fa 1
busi-sr-fa-sdc cache-busi configs/breast-ultrasound-2d.json sr-fa-sdc 1
busi-no-learned-up cache-busi configs/breast-ultrasound-2d.json no-learned-upsampling 1
"

train() {  # name dataset config ablation [extra args]
  local name=$1 data=$2 config=$3 ablation=$4; shift 4
  "$PY" -m SASSRSegmentLib train --dataset "$WORK/$data" --output "$WORK/runs/$name" --config "$config" \
    --ablation "$ablation" --device "$DEVICE" --progress bar "$@"
}

RUNS=$(echo "$RUNS" | grep -E -- "${RUNS_FILTER:-.}")

# Fail fast (optional): a few steps of each configuration before spending the budget.
if [ "$SMOKE_STEPS" -gt 0 ]; then
  echo "$RUNS" | while read -r name data config ablation workers; do
    [ -n "$name" ] || continue
    if ! train "$name" "$data" "$config" "$ablation" --max-steps "$SMOKE_STEPS" --val-every 100000 \
        --workers "$workers" --output "$WORK/smoke/$name" > "$WORK/smoke-$name.log" 2>&1; then
      echo "SMOKE FAILED: $name"; tail -20 "$WORK/smoke-$name.log"; exit 3
    fi
    echo "smoke ok: $name"
  done || exit 3
fi

echo "$RUNS" | {
  while read -r name data config ablation workers; do
    [ -n "$name" ] || continue
    train "$name" "$data" "$config" "$ablation" --max-minutes "$MINUTES" --workers "$workers" \
      > "$WORK/runs/$name.log" 2>&1 &
  done
  wait
}

# One archive per run (the GPU machine returns at most 8 files): bundle, card, curves, log.
echo "$RUNS" | while read -r name data config ablation workers; do
  [ -n "$name" ] || continue
  echo "== $name"; tail -3 "$WORK/runs/$name.log"
  (cd "$WORK/runs" && tar cf "$RESULTS/$name.tar" "$name.log" \
    $(cd "$WORK/runs" && ls -d "$name"/model.pt "$name"/model.json "$name"/log.csv 2>/dev/null))
done
ls -la "$RESULTS"

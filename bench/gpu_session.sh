#!/usr/bin/env bash
# A CUDA session's work in one command: the GPU's training throughput, then the recipe of
# runs/f48-aug (BENCHMARKS.md, "Augmentation from the first step") trained for MINUTES, resumed if
# an earlier call on the same machine left runs/gpu-f48-aug, then scored on the validation and
# report splits. Everything worth keeping goes to $OUT (the device tool's folder; runs/gpu-out
# elsewhere): the log, the metrics, and the checkpoint in 15 MB parts (join them with cat).
#
#   bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]   # DEVICE: cuda (default), or cpu to try it
#   (STEPS=N sets the timed steps of each throughput variant, 50 by default)
#
# Through the device tool, with the data copied into the ignored data/ folder and carried:
#   cp -r ../shared/data/cpen455 data/   # then run(command="bash bench/gpu_session.sh data/cpen455 8",
#                                        #          carry=["data/cpen455"], timeout_s=600)
set -uo pipefail
data=${1:?usage: bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]}
minutes=${2:?usage: bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]}
device=${3:-cuda}
out=${OUT:-runs/gpu-out}
run=runs/gpu-f48-aug
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TQDM_MININTERVAL=60   # a progress line a minute in the log
exec > >(tee -a "$out/session.log") 2>&1

echo "== $(date -u) on $(hostname): $device, $minutes minutes of training"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

if [ ! -f "$run/last.pt" ]; then
  echo "== throughput (the recipe's network, batch 32)"
  python bench/train_throughput.py --device "$device" --configs "configs/cpen455.yaml:nr_filters=48" \
      --variants fp32 bf16 bf16+channels_last --rounds 1 --steps "${STEPS:-50}"
  echo "== training from scratch"
  python train.py --config configs/cpen455.yaml --data-dir "$data" --device "$device" --nr-filters 48 \
      --shift 2 --hflip --lr-decay 0.9998 --epochs 220 --max-time "${minutes}m" --num-workers 4 \
      --out-dir "$run" --overwrite
else
  echo "== resuming $run"
  python train.py --resume "$run/last.pt" --out-dir "$run" --device "$device" --max-time "${minutes}m"
fi

for split in val report; do
  echo "== classify.py on $split"
  python classify.py --checkpoint "$run/last.pt" --data-dir "$data" --csv "$run/splits/$split.csv" \
      --device "$device" --out "$run/$split.csv" --metrics-out "$out/$split.json"
done
cp "$run/metrics.jsonl" "$out/"
split -b 15M -d "$run/last.pt" "$out/last.pt.part"
echo "== done $(date -u)"

#!/usr/bin/env bash
# A CUDA lease's work in one command: the GPU's training throughput, then the recipe of runs/f48-aug
# (BENCHMARKS.md, "Augmentation from the first step": 48 filters, mirroring and 2-pixel shifts, one
# slow decay of the rate, 22,660 steps of 32 images) trained for MINUTES, then scored on its
# validation and report splits. A lease is too short for the whole schedule, so a run goes on
# across leases: RESUME names the last.pt that an earlier lease returned (carried in), and the run
# continues from it exactly.
#
# Why batch 32 and float32: on an H200 this network's step at batch 32 issues thousands of small
# operations and is bound by launching them (16.7 steps a second), where bf16's casts made it
# slower (0.82x), and the same 220 epochs at batch 128 ended 0.2 bits/dim worse (BENCHMARKS.md,
# "The first GPU lease").
#
#   bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]     # DEVICE: cuda (default), or cpu to try it
#   RESUME=path/last.pt  continue that run instead of starting one (and skip the throughput)
#   RUN=runs/NAME        the run's folder (runs/gpu-f48-aug by default; runs/f48-aug-all is the same
#                        recipe with the report split in training, begun on a CPU on 2026-12-04)
#   STEPS=N              timed steps of each throughput variant (20 by default; 0 skips it)
#   TRAIN_ARGS="..."     appended to train.py's flags when starting (e.g. a tiny network, to try it)
#
# Everything worth keeping goes to $OUT (the device tool's folder; runs/gpu-out elsewhere):
# session.log, and run.tar (last.pt, metrics, logs, scores, samples) in 15 MB parts:
#   cat run.tar.part* | tar x       # -> runs/gpu-f48-aug/... (or RUN's folder)
# Through the device tool, with the data (and the run to resume) in ignored folders, carried:
#   cp -r ../shared/data/cpen455 data/
# Overrun 570 s and a call returns nothing: throughput (<= 90 s) + MINUTES (5, or 7 resuming) + ~2 min to start and score.
#   run(command="bash bench/gpu_session.sh data/cpen455 5", carry=["data/cpen455"], timeout_s=570)
#   run(command="RESUME=runs/gpu-f48-aug/last.pt bash bench/gpu_session.sh data/cpen455 7",
#       carry=["data/cpen455", "runs/gpu-f48-aug/last.pt", "runs/gpu-f48-aug/metrics.jsonl"], timeout_s=570)
#   run(command="RUN=runs/f48-aug-all RESUME=runs/f48-aug-all/last.pt bash bench/gpu_session.sh data/cpen455 7",
#       carry=["data/cpen455", "runs/f48-aug-all/last.pt", "runs/f48-aug-all/metrics.jsonl"], timeout_s=570)
set -uo pipefail
data=${1:?usage: bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]}
minutes=${2:?usage: bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]}
device=${3:-cuda}
out=${OUT:-runs/gpu-out}
run=${RUN:-runs/gpu-f48-aug}
mkdir -p "$out" "$run"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ "$device" = cuda ] && export OMP_NUM_THREADS=4   # the GPU machine has 16 cores; a CPU run keeps its own
exec > >(tee -a "$out/session.log") 2>&1

echo "== $(date -u) on $(hostname): $device, $minutes minutes of training"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

if [ -z "${RESUME:-}" ] && [ "${STEPS:-20}" != 0 ]; then
  echo "== throughput: the recipe's network at batch 32 (compile: torch.compile, whose warm-up is not timed)"
  # two calls: the table prints when a call ends, so compile's unknown warm-up cannot cost the eager rows
  timeout 40 python bench/train_throughput.py --device "$device" --configs "configs/cpen455.yaml:nr_filters=48" \
      --variants fp32 bf16 --rounds 1 --steps "${STEPS:-20}" --batch-size 32
  timeout 50 python bench/train_throughput.py --device "$device" --configs "configs/cpen455.yaml:nr_filters=48" \
      --variants fp32 compile --rounds 1 --steps "${STEPS:-20}" --batch-size 32
fi

if [ -n "${RESUME:-}" ]; then
  echo "== resuming $RESUME: $(date -u)"
  [ "$RESUME" = "$run/last.pt" ] || cp "$RESUME" "$run/last.pt"
  python train.py --resume "$run/last.pt" --out-dir "$run" --data-dir "$data" --device "$device" \
      --max-time "${minutes}m" --progress false $([ "$device" = cuda ] && echo --amp false) >>"$run/train.log" 2>&1
else
  echo "== training from scratch: $(date -u)"
  python train.py --config configs/cpen455.yaml --data-dir "$data" --device "$device" --nr-filters 48 \
      --shift 2 --hflip --lr-decay 0.9998 --epochs 220 --amp false --channels-last false \
      --max-time "${minutes}m" --progress false \
      --out-dir "$run" --overwrite ${TRAIN_ARGS:-} >>"$run/train.log" 2>&1
fi
echo "== trained (exit $?): $(date -u)"
tail -n 8 "$run/train.log"

step=$(python -c "import torch; print(torch.load('$run/last.pt', weights_only=True)['step'])")
for split in val report; do
  [ -f "$run/splits/$split.csv" ] || continue   # a run with report_fraction 0 held out no report split
  python classify.py --checkpoint "$run/last.pt" --data-dir "$data" --held-out "$split" \
      --device "$device" --no-progress --out "$run/${split}_step$step.csv" \
      --metrics-out "$run/${split}_step$step.json" 2>&1 | tail -n 2
done
rm -f "$out"/run.tar.part*   # an earlier session's parts would join this run's in cat run.tar.part*
tar cf runs/gpu-run.tar --exclude=best.pt "$run" && split -b 15M -d runs/gpu-run.tar "$out/run.tar.part"
ls -l "$out"
echo "== done $(date -u)"

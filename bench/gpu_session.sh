#!/usr/bin/env bash
# A CUDA session's work in one command: the GPU's training throughput, then three variants of the
# recipe of runs/f48-aug (BENCHMARKS.md, "Augmentation from the first step") trained side by side on
# the one GPU for at most MINUTES each, then each scored on its validation and report splits.
#
# Why larger batches: at batch 32 a training step issues about 4,500 operations on tensors far too
# small to fill a GPU, so it is bound by launching them, and the recipe's 22,660 steps do not fit
# in a lease of 15 minutes. The variants keep the recipe per epoch (220 epochs, the rate decayed to
# 1% of its start by the last step, the EMA's horizon in epochs, the hybrid objective on a quarter
# of each batch) at batch 256 or 128, and three launch-bound processes share the GPU.
#
#   bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]   # DEVICE: cuda (default), or cpu to try it
#   (STEPS=N sets the timed steps of each throughput variant, 20 by default, 0 to skip it;
#    TRAIN_ARGS="..." is appended to each run's train.py flags, e.g. a tiny network to try the script)
#
# Everything worth keeping goes to $OUT (the device tool's folder; runs/gpu-out elsewhere):
# session.log, and runs.tar (each run's last.pt, metrics, logs and scores) in 15 MB parts:
#   cat runs.tar.part* | tar x      # -> runs/gpu-<variant>/..., runs/gpu-<variant>.log
# Through the device tool, with the data copied into the ignored data/ folder and carried:
#   cp -r ../shared/data/cpen455 data/   # then run(command="bash bench/gpu_session.sh data/cpen455 6",
#                                        #          carry=["data/cpen455"], timeout_s=570)
set -uo pipefail
data=${1:?usage: bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]}
minutes=${2:?usage: bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]}
device=${3:-cuda}
out=${OUT:-runs/gpu-out}
mkdir -p "$out" runs
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TQDM_MININTERVAL=60 OMP_NUM_THREADS=2
exec > >(tee -a "$out/session.log") 2>&1

echo "== $(date -u) on $(hostname): $device, $minutes minutes of training"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

echo "== throughput: the recipe's network at batch 32 and 256"
for spec in "32 fp32 bf16" "256 fp32 bf16 bf16+channels_last"; do
  [ "${STEPS:-20}" = 0 ] && break
  read -r batch variants <<<"$spec"
  timeout 150 python bench/train_throughput.py --device "$device" --configs "configs/cpen455.yaml:nr_filters=48" \
      --variants $variants --rounds 1 --steps "${STEPS:-20}" --batch-size "$batch"
done

#        name          batch  lr     lr_decay ema_decay
variants=("b256-lr2e-3 256   0.002  0.9984   0.96"
          "b256-lr4e-3 256   0.004  0.9984   0.96"
          "b128-lr2e-3 128   0.002  0.9992   0.98")
names=() pids=()
echo "== training ${#variants[@]} runs side by side: $(date -u)"
for spec in "${variants[@]}"; do
  read -r name batch lr decay ema <<<"$spec"
  names+=("$name")
  python train.py --config configs/cpen455.yaml --data-dir "$data" --device "$device" --nr-filters 48 \
      --shift 2 --hflip --epochs 220 --batch-size "$batch" --cls-batch-size $((batch / 4)) --lr "$lr" \
      --lr-decay "$decay" --ema-decay "$ema" --eval-every 5 --save-every 5 --sample-every 0 \
      --eval-batch-size 256 --num-workers 0 --max-time "${minutes}m" --out-dir "runs/gpu-$name" \
      --overwrite ${TRAIN_ARGS:-} >"runs/gpu-$name.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"   # by pid: a bare wait would also wait for the log's tee, which never ends
echo "== trained: $(date -u)"
for name in "${names[@]}"; do   # the log's last lines, less the progress bars
  echo "-- $name"; tr '\r' '\n' <"runs/gpu-$name.log" | grep -v -E "batch/s|s/batch|^ *$" | tail -n 8
done

pids=()
for name in "${names[@]}"; do
  [ -f "runs/gpu-$name/last.pt" ] || continue
  for split in val report; do
    python classify.py --checkpoint "runs/gpu-$name/last.pt" --data-dir "$data" \
        --csv "runs/gpu-$name/splits/$split.csv" --device "$device" --batch-size 256 --no-progress \
        --out "runs/gpu-$name/$split.csv" --metrics-out "runs/gpu-$name/$split.json" \
        >"runs/gpu-$name/classify-$split.log" 2>&1 &
    pids+=($!)
  done
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
for name in "${names[@]}"; do
  for split in val report; do echo "-- $name $split"; tail -n 4 "runs/gpu-$name/classify-$split.log"; done
done

files=()
for name in "${names[@]}"; do
  files+=("runs/gpu-$name.log")
  for f in last.pt metrics.jsonl config.yaml splits val.json report.json val.png report.png \
           val.csv report.csv classify-val.log classify-report.log; do
    [ -e "runs/gpu-$name/$f" ] && files+=("runs/gpu-$name/$f")
  done
  for f in "runs/gpu-$name"/samples_epoch*.png; do [ -e "$f" ] && files+=("$f"); done
done
tar cf runs/gpu-runs.tar "${files[@]}" && split -b 15M -d runs/gpu-runs.tar "$out/runs.tar.part"
ls -l "$out"
echo "== done $(date -u)"

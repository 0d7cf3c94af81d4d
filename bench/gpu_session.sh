#!/usr/bin/env bash
# A CUDA lease's work in one command: the training step's throughput at batch 32, eager against
# torch.compile replayed as CUDA graphs; then a wider network than any CPU session here could
# finish (FILTERS, 96 by default, the width of runs/f96-s2 in BENCHMARKS.md), trained in the
# faster mode on a schedule sized to end inside MINUTES; then up to 15 epochs of fine-tuning at
# hybrid weight 0.01, the shipped model's last step (eager, FT_MINUTES); each run scored on its
# validation and report splits and packed for the trip back as soon as it ends.
#
# Why batch 32 and float32: on an H200 the 48-filter step at batch 32 issues thousands of small
# operations and is bound by launching them (16.7 steps a second), where bf16's casts made it
# slower (0.82x), and the same 220 epochs at batch 128 ended 0.2 bits/dim worse (BENCHMARKS.md,
# "The first GPU lease"): this data wants many small steps. So a wider network should cost little
# more a step there, and replaying the step as CUDA graphs (compile_mode reduce-overhead) should
# cut the launching itself.
#
# Why one lease: a 96-filter last.pt (weights, their average, Adam's moments) is about 83 MB,
# more than the device tool carries either way (64 MiB, the repository included), so the run
# cannot continue across leases. The schedule is the recipe of runs/f96-s2 (mirroring, 2-pixel
# shifts, the rate decayed to 1% of its start by the last step), with as many epochs (at most
# 130) as the measured rate fits into MINUTES, less twice the compile's warm-up. What comes back is each run's averaged weights
# (checkpoint.py --averaged-only), its metrics and its scores.
#
#   bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]     # DEVICE: cuda (default), or cpu to try it
#   FILTERS=N            the network's width (96 by default)
#   MODE=eager|compile|graphs   how to train (default: graphs where the throughput found them faster)
#   FT_MINUTES=M         the fine-tune's limit (1.5 by default; 0 skips it)
#   STEPS=N              timed steps of each throughput variant (20 by default)
#   TRAIN_ARGS="..."     appended to train.py's flags (e.g. a tiny network, to try it)
#   RUN=runs/NAME        the run's folder (runs/gpu-f96 by default; the fine-tune goes to NAME-ft)
#
# Everything worth keeping goes to $OUT (the device tool's folder; runs/gpu-out elsewhere):
# session.log, throughput.md, and NAME.tar in 15 MB parts for each run, written when the run ends:
#   cat gpu-f96.tar.part* | tar x       # -> runs/gpu-f96/... (and the same for gpu-f96-ft)
# Through the device tool, with the data in an ignored folder, carried (cp -r ../shared/data/cpen455 data/).
# The call's time: throughput (<= 4 min with start-up) + MINUTES + about 1 min to evaluate, save,
# score and pack, + FT_MINUTES + 1 min if it fine-tunes. A 15-minute lease, less the machine's
# start, leaves one such call, with no room for the fine-tune:
#   run(command="FT_MINUTES=0 bash bench/gpu_session.sh data/cpen455 4", carry=["data/cpen455"], timeout_s=590)
#
# It exits 2 on a wrong usage or MODE and otherwise 0: every step's errors, and the exit status of
# training and fine-tuning, go to session.log, and a failed step does not stop the ones after it
# (the throughput alone is worth bringing back).
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash bench/gpu_session.sh DATA_DIR MINUTES [DEVICE]" >&2
  exit 2
fi
data=$1
minutes=$2
device=${3:-cuda}
out=${OUT:-runs/gpu-out}
run=${RUN:-runs/gpu-f96}
filters=${FILTERS:-96}
mkdir -p "$out" "$run"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ "$device" = cuda ] && export OMP_NUM_THREADS=4   # the GPU machine has 16 cores; a CPU run keeps its own
exec > >(tee -a "$out/session.log") 2>&1
log_writer=$!

echo "== $(date -u) on $(hostname): $device, $minutes minutes of training"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv

echo "== throughput: $filters filters at batch 32"
: >"$out/throughput.md"
# one call per variant: a table prints when its call ends, so a slow compile cannot cost the others
for variant_limit in fp32:40 compile_graphs:200; do
  timeout "${variant_limit#*:}" python bench/train_throughput.py --device "$device" \
      --configs "configs/cpen455.yaml:nr_filters=$filters" --variants "${variant_limit%:*}" --rounds 1 \
      --steps "${STEPS:-20}" --batch-size 32 | tee -a "$out/throughput.md"
done
# column N (3: img/s, 8: warm-up s) of a variant's row; empty where it failed or ran out of time
column() { awk -F'|' -v v=" $1 " -v n="$2" '$2 == v && $3 ~ /^ *[0-9.]+ *$/ {print $n + 0}' "$out/throughput.md"; }
mode=eager rate=$(column fp32 3) warmup=0
graphs=$(column compile_graphs 3)
if [ -n "$graphs" ] && awk -v a="$graphs" -v b="${rate:-0}" 'BEGIN {exit !(a > b)}'; then
  rate=$graphs warmup=$(column compile_graphs 8) mode=graphs
fi
mode=${MODE:-$mode}
case $mode in
  eager) compile_flags="--compile false" ;;
  compile) compile_flags="--compile true --compile-mode default" ;;
  graphs) compile_flags="--compile true --compile-mode reduce-overhead" ;;
  *) echo "MODE must be eager, compile or graphs, got $mode" >&2; exit 2 ;;
esac
# Without a timing, the 48-filter step's rate on an H200 (BENCHMARKS.md). 3,275 training images:
# 103 steps an epoch, 102 compiled (train.py drops the smaller last batch); 80% of the timed rate,
# for the evaluations, the average and the clipping; twice the compile's warm-up (one in the
# benchmark, which caches the graph for train.py, one to spare).
rate=${rate:-534}
per_epoch=$([ "$mode" = eager ] && echo 103 || echo 102)
read -r epochs lr_decay < <(python -c "
seconds = max(0.0, $minutes * 60 - 2 * ${warmup:-0})
epochs = max(1, min(130, int($rate / 32 * 0.8 * seconds) // $per_epoch))
print(epochs, 0.01 ** (1 / (epochs * $per_epoch)))")

# Score a finished run on both splits, keep its averaged weights, and pack it into $OUT.
finish() {
  for split in val report; do
    python classify.py --checkpoint "$1/last.pt" --data-dir "$data" --held-out "$split" --device "$device" \
        --no-progress --out "$1/${split}_final.csv" --metrics-out "$1/${split}_final.json" 2>&1 | tail -n 2
  done
  python checkpoint.py --averaged-only "$1/last.pt" "$1/averaged.pt"
  name=$(basename "$1")
  rm -f "$out/$name.tar.part"*   # an earlier session's parts would join these in cat
  tar cf "runs/$name.tar" --exclude=last.pt --exclude=best.pt "$1" && split -b 15M -d "runs/$name.tar" "$out/$name.tar.part"
  ls -l "$out"
}

echo "== training from scratch: $mode at $rate img/s -> $epochs epochs, lr decay $lr_decay a step: $(date -u)"
python train.py --config configs/cpen455.yaml --data-dir "$data" --device "$device" --nr-filters "$filters" \
    --shift 2 --hflip --epochs "$epochs" --lr-decay "$lr_decay" --eval-every 5 --samples-per-class 0 \
    --amp false --channels-last false $compile_flags --max-time "${minutes}m" --progress false \
    --out-dir "$run" --overwrite ${TRAIN_ARGS:-} >>"$run/train.log" 2>&1
echo "== trained (exit $?): $(date -u)"
tail -n 4 "$run/train.log"
finish "$run"

trained=$(python -c "import torch; print(torch.load('$run/last.pt', weights_only=True)['epoch'])")
if [ "${FT_MINUTES:-1.5}" != 0 ] && [ "$trained" = "$epochs" ]; then
  echo "== fine-tuning at hybrid weight 0.01, up to 15 epochs, eager: $(date -u)"
  mkdir -p "$run-ft"
  python train.py --resume "$run/last.pt" --out-dir "$run-ft" --cls-loss-weight 0.01 --lr 1e-4 \
      --lr-decay 0.9995 --epochs $((epochs + 15)) --compile false --max-time "${FT_MINUTES:-1.5}m" \
      --progress false >>"$run-ft/train.log" 2>&1
  echo "== fine-tuned (exit $?): $(date -u)"
  tail -n 4 "$run-ft/train.log"
  finish "$run-ft"
elif [ "${FT_MINUTES:-1.5}" != 0 ]; then
  echo "== no fine-tune: the run stopped at epoch $trained of $epochs"
fi
echo "== done $(date -u)"
exec >&- 2>&-
wait "$log_writer"   # session.log complete before the call returns

#!/usr/bin/env bash
# The conditioning/objective comparison on CPEN455 (BENCHMARKS.md). Every run gets the same
# wall-clock budget on one CPU thread, and the same model size, data, seed and validation split
# (10% of train.csv, seed 0). Two lanes of runs go side by side, one per core.
# Usage: bash bench/conditioning.sh [budget, default 8m] [data dir]
set -euo pipefail
budget=${1:-8m}
data=${2:-../shared/data/cpen455}
run() {  # name, then the overrides
  local name=$1; shift
  OMP_NUM_THREADS=1 python train.py --config configs/cpen455.yaml --data-dir "$data" --max-time "$budget" \
    --epochs 1000 --eval-every 1 --sample-every 0 --samples-per-class 0 --wandb disabled --overwrite \
    --out-dir "runs/ablation-$budget/$name" "$@" > "runs/ablation-$budget-$name.log" 2>&1
}
mkdir -p runs
(
  run concat            --embedding-dim 32 --block-conditioning none --cls-loss-weight 0
  run bias              --embedding-dim 32 --block-conditioning bias --cls-loss-weight 0
  run film-only         --embedding-dim 0  --block-conditioning film --cls-loss-weight 0
) &
(
  run film              --embedding-dim 32 --block-conditioning film --cls-loss-weight 0
  run concat-hybrid     --embedding-dim 32 --block-conditioning none --cls-loss-weight 0.01
  run film-hybrid-0.0003 --embedding-dim 32 --block-conditioning film --cls-loss-weight 0.0003
) &
wait
for f in runs/ablation-$budget/*/metrics.jsonl; do echo "$f $(tail -n 1 "$f")"; done

#!/usr/bin/env bash
# The conditioning/objective comparison on CPEN455 (BENCHMARKS.md): every run gets the same
# wall-clock budget on one CPU thread, the same model size, data, seed and validation split
# (10% of train.csv, seed 0). Usage: bash bench/conditioning.sh [budget, default 10m] [data dir]
set -euo pipefail
budget=${1:-10m}
data=${2:-../shared/data/cpen455}
common="--config configs/cpen455.yaml --data-dir $data --max-time $budget --epochs 1000 \
  --eval-every 1 --sample-every 0 --samples-per-class 0 --wandb disabled --overwrite"
run() {  # name, then the overrides
  local name=$1; shift
  OMP_NUM_THREADS=1 python train.py $common --out-dir runs/ablation-$budget/$name "$@"
}
run concat        --embedding-dim 32 --block-conditioning none --cls-loss-weight 0
run bias          --embedding-dim 32 --block-conditioning bias --cls-loss-weight 0
run film          --embedding-dim 32 --block-conditioning film --cls-loss-weight 0
run film-only     --embedding-dim 0  --block-conditioning film --cls-loss-weight 0
run concat-hybrid --embedding-dim 32 --block-conditioning none --cls-loss-weight 1
run film-hybrid   --embedding-dim 32 --block-conditioning film --cls-loss-weight 1

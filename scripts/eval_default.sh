#!/usr/bin/env bash
# Evaluate a checkpoint (default: the packaged model) on the validation split of all four
# datasets; print the README's accuracy tables (tables.md) and its acceptance table (targets.md).
# Usage: scripts/eval_default.sh [CKPT] [OUT]
set -euo pipefail
ckpt=${1:-default}
out=${2:-results/default_eval}
data=${DATA_ROOT:-../shared/data}
promptseg evaluate "$ckpt" --data "$data/chaos-mr-t2spir" --dataset chaos-mr --split val --out "$out/chaos-mr"
promptseg evaluate "$ckpt" --data "$data/brain-tumor-cheng" --dataset brain-tumor --split val --out "$out/brain-tumor"
promptseg evaluate "$ckpt" --data "$data/btcv-ct-slices" --dataset btcv-ct --split val --out "$out/btcv-ct"
promptseg evaluate "$ckpt" --data "$data/lits-ct" --dataset lits-ct --split val --out "$out/lits-ct"
promptseg report "$out/chaos-mr" "$out/brain-tumor" "$out/btcv-ct" "$out/lits-ct" | tee "$out/tables.md"
promptseg report "$out/chaos-mr" "$out/brain-tumor" "$out/btcv-ct" "$out/lits-ct" --targets | tee "$out/targets.md"

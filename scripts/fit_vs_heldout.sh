#!/usr/bin/env bash
# Fit versus generalisation of one dataset's targets: the packaged model (or CKPT) evaluated with
# the deployed behaviour on that dataset's train, tune and validation splits, one line each.
# A high train Dice with lower tune/val Dice says the training cases are learnt and unseen
# scans are the limit (more data), not the capacity of the model.
#   scripts/fit_vs_heldout.sh [DATASET] [CKPT] [OUT]     # default: btcv-ct default results/fit_vs_heldout
# Progress and errors go to stderr. BTCV and LiTS outputs stay local (git-ignored by name).
set -euo pipefail
kind=${1:-btcv-ct}
ckpt=${2:-default}
out=${3:-results/fit_vs_heldout}
data=${DATA_ROOT:-../shared/data}
folder=$(python -c "from promptseg.data.datasets import DATASET_FOLDERS as F; print(F['$kind'])")
for split in train tune val; do
    promptseg evaluate "$ckpt" --data "$data/$folder" --dataset "$kind" --split "$split" \
        --out "$out/$split/$kind" | sed "s/^/$split  /" | grep -v "absent-target"
done

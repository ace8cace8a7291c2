#!/usr/bin/env bash
# Make a trained checkpoint the packaged default model and regenerate everything measured from
# it, in dependency order. Run with training paused or stopped (the timings need idle cores).
#
#   scripts/ship_default.sh [CKPT]        # default: results/default_run/best.pt
#
# 1. copy CKPT to promptseg/weights/default.pt and choose its presence thresholds on the tune
#    split (never validation): results/presence_calibration/{presence.json,presence.png}
# 2. re-export the packaged engine runtime/default_engine (FP32 + FP16 graphs, INT8 text
#    encoder, prompt cache with the refusal and ambiguity limits recalibrated, verified)
# 3. export an INT8 engine beside it (float fallback cross-validated on train-split cases) and
#    run the parity table FP32 / FP16 / INT8 against PyTorch through promptseg-run's path
# 4. validation tables (scripts/eval_default.sh), CPU latency, pictures
set -euo pipefail
ckpt=${1:-results/default_run/best.pt}
data=${DATA_ROOT:-../shared/data}
step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "1. presence thresholds"
cp "$ckpt" promptseg/weights/default.pt.tmp && mv promptseg/weights/default.pt.tmp promptseg/weights/default.pt
promptseg calibrate-presence promptseg/weights/default.pt --data-root "$data" --out results/presence_calibration

step "2. packaged engine"
python -m promptseg.export.default_engine

step "3. INT8 engine and parity"
rm -rf results/engine_int8
promptseg-export default -o results/engine_int8 --fp16 --int8 --calib-data "$data" --text-encoder-quant int8 --no-verify
python -m promptseg.calibration.parity results/engine_int8 --checkpoint default --data-root "$data" \
    --out results/parity --threads 2 --no-fail
cp results/engine_int8/manifest.json results/parity/engine_manifest.json

step "4. validation tables"
scripts/eval_default.sh default results/default_eval

step "5. latency"
python bench/latency.py --checkpoint default --iters 200 --warmup 20 --batch 16 --batch-iters 30 \
    --json results/bench/cpu_default.json

step "6. pictures"
mkdir -p out
promptseg-run promptseg/examples/chaos_mr_1.nii.gz --prompt liver --prompt spleen --prompt "left kidney" \
    --prompt "right kidney" -o out/ex_mask.nii.gz --render results/experiments/pictures/example_3d.png
promptseg grids default --data-root "$data" --out results/experiments/pictures --threads 2
step "done"

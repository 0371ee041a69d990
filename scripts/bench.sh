#!/usr/bin/env bash
# Benchmarks (not tests), one run, every number from it: the bundle's runtime report on this board
# (latency per stage, bytes, energy, bandwidth sweep, LC / EC / SC / SC+EE, overhead vs bare onnxruntime),
# the int8 recipe and the TFLite float-vs-int8 comparisons on the ImageNet samples when they are present,
# and the split planner. Usage: scripts/bench.sh OUT BOARD
set -euo pipefail
OUT=${1:-out}; BOARD=${2:-host}
BIN=.venv/bin
BUNDLE="$OUT/efficientnet-lite0-blocks.5"
REPORT="$OUT/bench-$BOARD"
[ -f "$BUNDLE/manifest.json" ] || $BIN/eetool export efficientnet-lite0 --split blocks.5 --int8 -o "$BUNDLE"
$BIN/python -m runtime bench "$BUNDLE" --board "$BOARD" --out "$REPORT"
$BIN/eetool plan efficientnet-lite0 --board "$BOARD" --bandwidth 1,10,100mbit --plot "$REPORT/plan.png" \
    --json > "$REPORT/plan.json"
SAMPLES=../shared/data/imagenet-samples
if [ -d "$SAMPLES" ]; then
  $BIN/python bench/int8_recipe.py --configs "u8u8-minmax (recipe = QuantConfig())" --latency \
      --out "$REPORT/int8_recipe.json"
  $BIN/python bench/tflite_latency.py --jpegs "$SAMPLES" --ncal 200 --out "$REPORT/tflite_latency.json"
fi
echo "reports in $REPORT"

#!/usr/bin/env bash
# Benchmarks (not tests). One run, every number from it, one page: $OUT/bench-$BOARD/report.md.
#  1. EfficientNet-Lite0 split after blocks.5 (int8): the runtime's report on this board (latency per
#     stage, bytes, energy, bandwidth sweep, LC / EC / SC, per-layer profile -> layers.json), on the
#     labelled ImageNet samples beside the repo when present (calibration images left out), else the
#     bundle's own samples; then `eetool rate`: bytes vs top-1 of its wire codecs (int8, 6..2-bit, step
#     quantisers at byte budgets, with and without the channels' KLT; zstd and brotli) against JPEG / WebP
#     of the same crop, on fold 1/2 of the samples (calibrated on fold 0/2);
#  2. with Fashion-MNIST installed (apt-get install -y dataset-fashion-mnist): the reference CNN with two
#     trained exits and the Exit Predictor, thresholds calibrated on held-out training images, benched on
#     2000 labelled test images: LC / LC+EE / EC / SC / SC+EE; then `eetool exits curve` on the 10k test
#     images: accuracy vs device MFLOPs (exits alone, with the predictor, backbone alone) and accuracy vs
#     bandwidth under a latency budget (fixed vs latency-aware thresholds, PLAN_BOARD's profile);
#  3. the split planner fed with step 1's per-layer profile (device = this board, and a target board
#     whose device side is a labelled FLOPs estimate; that board again with the 4-bit feature codec),
#     then one Markdown page of it all;
#  4. the edge server under load: step 1's bundle (fp32 tail, int8 wire) served with batching and without,
#     1/8/32/64 client processes, every reply checked, and the bare batched ceiling and bare batch-1 tail
#     in-process, in one interleaved run;
#  5. with the ImageNet samples: the int8 recipe and TFLite float-vs-int8 benchmarks (JSON beside it).
# Every number describes the machine that runs this script: BOARD must be this machine's profile (checked
# first, before any work; FORCE_BOARD=1 overrides the CPU / board-model detection, never the architecture).
# To plan for another board from here, use PLAN_BOARD.
# Usage: scripts/bench.sh OUT BOARD [PLAN_BOARD] [--force-board]
set -euo pipefail
OUT=${1:-out}; BOARD=${2:-host}; PLAN_BOARD=${3:-rpi4}; FORCE=${4:-}
BIN=.venv/bin
REPORT="$OUT/bench-$BOARD"
BUNDLES="$REPORT/bundles"
SAMPLES=${EETOOL_IMAGENET_SAMPLES:-../shared/data/imagenet-samples}
$BIN/python -m runtime.boards check "$BOARD" ${FORCE:+--force} --advice "make bench measures the machine it runs on. \
To measure a $BOARD, run the bench on it: export a bundle here (eetool export efficientnet-lite0 --split blocks.5 \
--int8 -o out/b5), copy it to the $BOARD (scp -r out/b5 USER@BOARD:) and run \`make bench BOARD=$BOARD\` in it. \
To plan for a $BOARD from this machine: \`make bench PLAN_BOARD=$BOARD\` (this machine measured as host, the \
$BOARD's device side a FLOPs estimate from boards/$BOARD.json)." || exit 2
mkdir -p "$BUNDLES"
BENCHES=()
CURVES=()

echo "== 1. EfficientNet-Lite0, split after blocks.5, int8"
EFF="$BUNDLES/efficientnet-lite0-blocks.5"
# with the ImageNet samples: calibrate on fold 0 of 2, measure accuracy on fold 1 (disjoint images)
CALIB=(); EVAL=samples
[ -d "$SAMPLES" ] && CALIB=(--calib "$SAMPLES:fold=0/2" --calib-samples 200) && EVAL="$SAMPLES:fold=1/2"
$BIN/eetool export efficientnet-lite0 --split blocks.5 --int8 "${CALIB[@]}" -o "$EFF"
INPUTS=()
[ -d "$SAMPLES" ] && INPUTS=(--inputs "$SAMPLES" --max-inputs 64)
$BIN/python -m runtime bench "$EFF" --board "$BOARD" $FORCE --repeat 2 "${INPUTS[@]}" --out "$REPORT/efficientnet-lite0" >/dev/null
BENCHES+=("$REPORT/efficientnet-lite0")

echo "== 1b. rate vs accuracy: the split feature's wire codecs against JPEG / WebP of the same crop"
# RATE_BUNDLES (space-separated bundle folders) adds other operating points, e.g. bottleneck bundles; the
# float bundle with the channels' KLT and a byte budget adds the transform-coded points (README, "Transform
# coding and rate control"), and --wire-budget the step quantiser on the plain feature
KLT="$BUNDLES/efficientnet-lite0-blocks.5-klt"
$BIN/eetool export efficientnet-lite0 --split blocks.5 --format onnx --wire-transform klt --wire-budget 4900 \
    --wire-codec brotli "${CALIB[@]}" -o "$KLT" > /dev/null
$BIN/eetool rate "$EFF" "$KLT" ${RATE_BUNDLES:-} --data "$EVAL" --wire-bits 6,5,4,3,2 --wire-budget 2500,3500 \
    --codecs zstd,brotli -o "$REPORT/rate.png" --json > /dev/null

if $BIN/python -c "from calibration.fashion_mnist import load_fashion_mnist; load_fashion_mnist('test')" 2>/dev/null; then
  echo "== 2. Fashion-MNIST reference CNN with two early exits"
  REF="$OUT/fashion-reference"
  [ -f "$REF/backbone.pt" ] || $BIN/python -m toolkit.train_reference --out "$REF" --no-progress
  FASH="$BUNDLES/fashion-cnn-stage2-exits"
  $BIN/eetool export fashion-cnn --weights "$REF/backbone.pt" --exits "$REF" --split stage2 --int8 \
      --calib fashion-mnist:train --verify-data fashion-mnist:test --verify-samples 2000 --samples 2000 -o "$FASH"
  $BIN/eetool exits calibrate "$FASH" --data fashion-mnist:train --offset 55000 --delta 0.005
  # the Exit Predictor (Dong, Mao & Zhang), trained on training images through the bundle's own graphs; then
  # every threshold chosen again, jointly with its prediction thresholds
  $BIN/eetool exits predictor train "$FASH" --data fashion-mnist:train --limit 30000
  $BIN/eetool exits calibrate "$FASH" --data fashion-mnist:train --offset 55000 --delta 0.005
  $BIN/python -m runtime bench "$FASH" --board "$BOARD" $FORCE --repeat 2 --out "$REPORT/fashion-cnn-exits" >/dev/null
  BENCHES+=("$REPORT/fashion-cnn-exits")
  # latency-aware thresholds on a copy (its fixed thresholds are the latency budget's): the $PLAN_BOARD profile,
  # 2 ms round trip, 3 ms budget, chosen at 1..20 Mbit/s and regressed on bandwidth; then the curves (accuracy
  # vs device MFLOPs with and without the predictor; accuracy vs bandwidth, fixed vs adaptive; a changing link)
  FASHL="$BUNDLES/fashion-cnn-stage2-latency"
  rm -rf "$FASHL" && cp -r "$FASH" "$FASHL"
  $BIN/eetool exits calibrate "$FASHL" --data fashion-mnist:train --offset 55000 --board "$PLAN_BOARD" --rtt 2ms \
      --budget-ms 3 --bandwidth 1,2,3,5,7,10,14,20mbit
  $BIN/eetool exits curve "$FASHL" --bandwidth 1,5,20mbit --out "$REPORT/fashion-cnn-curve" >/dev/null
  CURVES+=("$REPORT/fashion-cnn-curve")
else
  echo "== 2. skipped: Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)"
fi

echo "== 3. split planner from this run's per-layer profile"
PLANS=()
for PB in $(echo "$BOARD $PLAN_BOARD" | tr ' ' '\n' | awk '!seen[$0]++'); do
  MEAS=()
  [ "$PB" = "$BOARD" ] && MEAS=(--measurements "$REPORT/efficientnet-lite0")
  $BIN/eetool plan efficientnet-lite0 --board "$PB" --server-profile "$REPORT/efficientnet-lite0" "${MEAS[@]}" \
      --bandwidth 1,10,100mbit --plot "$REPORT/plan-$PB.png" --json > "$REPORT/plan-$PB.json"
  PLANS+=("$REPORT/plan-$PB.json")
done
# the same target board with the 4-bit feature codec (bytes from the codec's real frames at every cut)
$BIN/eetool plan efficientnet-lite0 --board "$PLAN_BOARD" --server-profile "$REPORT/efficientnet-lite0" \
    --wire-bits 4 --bandwidth 1,10,100mbit --plot "$REPORT/plan-$PLAN_BOARD-4bit.png" --json \
    > "$REPORT/plan-$PLAN_BOARD-4bit.json"
PLANS+=("$REPORT/plan-$PLAN_BOARD-4bit.json")

echo "== 4. edge server load test (batching vs the batch-1 path, and the bare batched ceiling)"
$BIN/python -m runtime loadtest "$EFF" --precision fp32 --clients "${LOADTEST_CLIENTS:-1,8,32,64}" \
    --duration "${LOADTEST_DURATION:-20}" --out "$REPORT/loadtest" >/dev/null

$BIN/python -m runtime report "$REPORT/report.md" --title "eetool bench on $BOARD" \
    --bench "${BENCHES[@]}" --plan "${PLANS[@]}" --rate "$REPORT/rate.json" --loadtest "$REPORT/loadtest" \
    ${CURVES[@]:+--curve "${CURVES[@]}"}

if [ -d "$SAMPLES" ]; then
  echo "== 5. int8 recipe and TFLite float-vs-int8 benchmarks"
  $BIN/python bench/int8_recipe.py --variants "u8s8 +BC" "u8s8 reduce_range +BC" \
      --calib "$SAMPLES:fold=0/2" --eval "$SAMPLES:fold=1/2" --out "$REPORT/int8_recipe"
  $BIN/python bench/tflite_latency.py --jpegs "$SAMPLES" --ncal 200 --out "$REPORT/tflite_latency.json"
fi
echo "report: $REPORT/report.md"

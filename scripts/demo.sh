#!/usr/bin/env bash
# The main job end to end on the embedded default: real EfficientNet-Lite0 weights, real images.
# Usage: scripts/demo.sh OUT SPLIT BOARD PORT
set -euo pipefail
OUT=${1:-out}; SPLIT=${2:-blocks.5}; BOARD=${3:-host}; PORT=${4:-8470}
BIN=.venv/bin
BUNDLE="$OUT/efficientnet-lite0-$SPLIT"

echo "== 1. candidate split points"
$BIN/eetool inspect efficientnet-lite0

echo "== 2. export: head/tail ONNX, float + int8 calibrated on real images, verified against PyTorch"
$BIN/eetool export efficientnet-lite0 --split "$SPLIT" --int8 --calib-samples 100 -o "$BUNDLE"

echo "== 3. accuracy of every chain on real images not used for calibration"
$BIN/eetool eval "$BUNDLE" --offset 100 --limit 200

echo "== 4. edge server (tail) and device (head) as two processes over loopback"
(cd "$BUNDLE" && exec ../../$BIN/python -m runtime serve . --port "$PORT") &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.2; done
(cd "$BUNDLE" && ../../$BIN/python -m runtime run . --server 127.0.0.1:"$PORT" --board "$BOARD" samples/*)

echo "== 5. measurement report: latency per stage, bytes, energy, latency vs bandwidth"
(cd "$BUNDLE" && ../../$BIN/python -m runtime bench . --board "$BOARD" --server 127.0.0.1:"$PORT" \
    --out ../bench-"$BOARD")
echo "bundle: $BUNDLE   report: $OUT/bench-$BOARD/report.md"

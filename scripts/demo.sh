#!/usr/bin/env bash
# The main job end to end on the embedded default: real EfficientNet-Lite0 weights, real images.
# Usage: scripts/demo.sh OUT SPLIT BOARD PORT
set -euo pipefail
OUT=${1:-out}; SPLIT=${2:-blocks.5}; BOARD=${3:-host}; PORT=${4:-8470}
BIN=.venv/bin
ROOT=$(pwd)
BUNDLE="$OUT/efficientnet-lite0-$SPLIT"
# With the 800 ImageNet samples beside the repo: calibrate on 100, evaluate on 200 others. On a fresh
# clone the demo has only scikit-image's 5 photos: calibrate on 3 and evaluate on the other 2.
if [ -d ../shared/data/imagenet-samples ] || [ -n "${EETOOL_IMAGENET_SAMPLES:-}" ]; then
  CAL=100; EVAL_ARGS="--limit 200"
else
  CAL=3; EVAL_ARGS=""
fi

echo "== 1. candidate split points"
$BIN/eetool inspect efficientnet-lite0

echo "== 2. export: head/tail ONNX, float + int8 calibrated on real images, verified against PyTorch"
$BIN/eetool export efficientnet-lite0 --split "$SPLIT" --int8 --calib-samples "$CAL" -o "$BUNDLE"

echo "== 3. accuracy of every chain on real images not used for calibration"
$BIN/eetool eval "$BUNDLE" $EVAL_ARGS

echo "== 4. edge server (tail) and device (head) as two processes over loopback"
(cd "$BUNDLE" && exec "$ROOT/$BIN/python" -m runtime serve . --port "$PORT") &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.2; done
(cd "$BUNDLE" && "$ROOT/$BIN/python" -m runtime run . --server 127.0.0.1:"$PORT" --board "$BOARD" samples/*)

echo "== 5. measurement report: latency per stage, bytes, energy, latency vs bandwidth"
"$BIN/python" -m runtime bench "$BUNDLE" --board "$BOARD" --server 127.0.0.1:"$PORT" --out "$OUT/demo-bench-$BOARD"
echo "bundle: $BUNDLE   report: $OUT/demo-bench-$BOARD/report.md"

#!/usr/bin/env bash
# Benchmarks (not tests): the bundle's runtime report on this board, plus the toolkit's side-by-side
# measurements under bench/ when their dependencies are installed. Usage: scripts/bench.sh OUT BOARD
set -euo pipefail
OUT=${1:-out}; BOARD=${2:-host}
BIN=.venv/bin
BUNDLE="$OUT/efficientnet-lite0-blocks.5"
[ -f "$BUNDLE/manifest.json" ] || $BIN/eetool export efficientnet-lite0 --split blocks.5 --int8 -o "$BUNDLE"
$BIN/python -m runtime bench "$BUNDLE" --board "$BOARD" --out "$OUT/bench-$BOARD"
for script in bench/*.py; do
  [ -e "$script" ] || continue
  echo "== $script"
  $BIN/python "$script" --out "$OUT/bench-$BOARD/$(basename "$script" .py).json"
done

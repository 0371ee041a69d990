#!/usr/bin/env bash
# Make sure Fashion-MNIST (Debian's dataset-fashion-mnist) is where the readers look for it, before any
# test runs: `make test` and `make reference` need it. As root it installs the package (apt-get); otherwise
# it stops at once with the command to run. The readers look in $EETOOL_FASHION_MNIST when set, else in
# /usr/share/datasets/fashion-mnist (calibration/fashion_mnist.py: default_root).
# Usage: scripts/fashion_mnist.sh [PYTHON]
set -euo pipefail
PY=${1:-.venv/bin/python}
PKG=dataset-fashion-mnist
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
ROOT=$("$PY" -c 'from calibration.fashion_mnist import default_root; print(default_root())')

missing() {
  local out=() f
  for f in "${FILES[@]}"; do [ -f "$ROOT/$f" ] || out+=("$f"); done
  echo "${out[*]:-}"
}

[ -z "$(missing)" ] && exit 0
echo "Fashion-MNIST not found in $ROOT (missing: $(missing))" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get on this machine: put the four *-ubyte.gz files of Fashion-MNIST in a folder and set" \
       "EETOOL_FASHION_MNIST to it, then run make test again" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: make test needs Debian's $PKG; run:  sudo apt-get install -y $PKG  and then make test again" >&2
  exit 2
fi
echo "installing it: apt-get install -y $PKG" >&2
# a fresh machine may have no package lists yet: update once and retry
apt-get install -y -qq "$PKG" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$PKG" >/dev/null; }
if [ -n "$(missing)" ]; then
  echo "error: $PKG is installed but $ROOT still lacks $(missing): EETOOL_FASHION_MNIST=${EETOOL_FASHION_MNIST:-}" \
       "points elsewhere; unset it (or copy the files there)" >&2
  exit 2
fi

#!/usr/bin/env bash
# make board-check BOARD=rpi4 [BUNDLE=dir]: prove that "copy the bundle to the board, pip install its
# requirements, python3 -m runtime run" works on real aarch64 binaries, on an x86 host, with qemu-user.
#
#   scripts/board_check.sh [--board rpi4|rpi5] [--bundle DIR] [--requirements FILE] [--wheels-only]
#
#  1. aarch64 wheels: `pip download --only-binary=:all:` of the requirements (--requirements, else the bundle's
#     requirements/BOARD.txt, else the pins in boards/BOARD.json) for CPython 3.11 manylinux aarch64
#     into $BOARD_CHECK_CACHE/wheels-aarch64.  A package without such a wheel fails here, naming the package.
#  2. a minimal Debian bookworm arm64 root filesystem (debootstrap, cached in $BOARD_CHECK_CACHE/rootfs-bookworm-arm64),
#     run through binfmt_misc + qemu-user-static, with QEMU_CPU set to the board's core (rpi4: cortex-a72,
#     rpi5: cortex-a76) and an ARM /proc/cpuinfo of that board bind-mounted over the chroot's.
#  3. a venv inside it (as user pi), `pip install --no-index` of those wheels (cached per requirements file).
#  4. smoke test: import numpy, onnxruntime, ai_edge_litert, zstandard, lz4, PIL; run a tiny ONNX model
#     and a tiny TFLite model; outputs must match the host's.
#  5. with --bundle: `cp -r` the bundle to /home/pi/bundle, start the edge server on the HOST
#     (`python -m runtime serve`), run `python3 -m runtime run ... --json samples/*` inside the chroot and the
#     same command on the host; results must agree and the board must report aarch64 and its backend.
#
# Latency under emulation means nothing: this script never reports inference times.
# Needs root (chroot, mounts). Every mount lives in a private mount namespace (unshare -m) and is also
# unmounted by an EXIT trap, so nothing stays mounted after a failure.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPTS="$REPO/scripts"
CACHE=${BOARD_CHECK_CACHE:-/var/cache/eetool-board-check}
ROOTFS="$CACHE/rootfs-bookworm-arm64"
WHEELS="$CACHE/wheels-aarch64"
STATE="$CACHE/board-check"            # cpuinfo files, venvs per requirements hash, last results
SUITE=bookworm
HOST_PY=${BOARD_CHECK_HOST_PYTHON:-$REPO/.venv/bin/python}
CHROOT_PATH=/home/pi/venv/bin:/usr/local/bin:/usr/bin:/bin
CHROOT=$(PATH=$PATH:/usr/sbin:/sbin command -v chroot)

BOARD=rpi4 BUNDLE= REQS= WHEELS_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --board) BOARD=$2; shift 2 ;;
    --board=*) BOARD=${1#*=}; shift ;;
    --bundle) BUNDLE=$2; shift 2 ;;
    --bundle=*) BUNDLE=${1#*=}; shift ;;
    --requirements) REQS=$2; shift 2 ;;
    --requirements=*) REQS=${1#*=}; shift ;;
    --wheels-only) WHEELS_ONLY=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "board-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$BOARD" in
  rpi4) QEMU_CPU=cortex-a72 ;;
  rpi5) QEMU_CPU=cortex-a76 ;;
  *) echo "board-check: board '$BOARD' not supported (rpi4, rpi5: Raspberry Pi OS bookworm 64-bit)" >&2; exit 2 ;;
esac
if [ -n "$BUNDLE" ]; then
  [ -f "$BUNDLE/manifest.json" ] || { echo "board-check: $BUNDLE is not a bundle (no manifest.json)" >&2; exit 2; }
  BUNDLE=$(cd "$BUNDLE" && pwd)
  [ -z "$REQS" ] && REQS="$BUNDLE/requirements/$BOARD.txt"
fi
[ -x "$HOST_PY" ] || HOST_PY=$(command -v python3)
if [ -z "$REQS" ]; then  # the board profile's own pins, as every bundle's requirements/BOARD.txt carries them
  mkdir -p "$CACHE/board-check"
  REQS="$CACHE/board-check/requirements-$BOARD.txt"
  "$HOST_PY" "$SCRIPTS/board_check_wheels.py" --requirements-of "$BOARD" > "$REQS" || exit 2
fi
[ -f "$REQS" ] || { echo "board-check: requirements file $REQS does not exist" >&2; exit 2; }
REQS=$(cd "$(dirname "$REQS")" && pwd)/$(basename "$REQS")

T0=$(date +%s)
log() { echo "board-check [$(( $(date +%s) - T0 ))s] $*"; }
die() { echo "board-check: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------- 1. aarch64 wheels (host, no root needed)
if [ -z "${_BOARD_CHECK_IN_NS:-}" ]; then
  log "board $BOARD (qemu cpu $QEMU_CPU), requirements $REQS"
  log "1/5 aarch64 wheels -> $WHEELS"
  "$HOST_PY" "$SCRIPTS/board_check_wheels.py" "$REQS" "$WHEELS" || exit 3
  [ "$WHEELS_ONLY" = 1 ] && exit 0

  [ "$(id -u)" = 0 ] || die "needs root (chroot and mounts); run as root or with sudo"

  # host tools: debootstrap, qemu-user-static, binfmt-support
  if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null \
     || ! command -v update-binfmts >/dev/null; then
    log "installing debootstrap qemu-user-static binfmt-support"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             debootstrap qemu-user-static binfmt-support >/dev/null; } || die "apt-get install failed"
  fi
  # binfmt_misc: mounted and qemu-aarch64 registered (left in place: it is host configuration, like
  # systemd's proc-sys-fs-binfmt_misc.mount)
  [ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || die "cannot mount binfmt_misc on /proc/sys/fs/binfmt_misc"
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || die "update-binfmts --enable qemu-aarch64 failed"
  grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt qemu-aarch64 is registered but disabled"

  # everything else in a private mount namespace: its mounts vanish with it, whatever happens
  if unshare --mount --propagation private true 2>/dev/null; then
    export _BOARD_CHECK_IN_NS=1 _BOARD_CHECK_T0=$T0
    exec unshare --mount --propagation private "$BASH" "${BASH_SOURCE[0]}" --board "$BOARD" \
      ${BUNDLE:+--bundle "$BUNDLE"} --requirements "$REQS"
  fi
  log "unshare --mount is not available: relying on the EXIT trap alone to unmount"
else
  T0=${_BOARD_CHECK_T0:-$T0}
fi

# ---------------------------------------------------------------- cleanup (mounts, server, work dir)
MOUNTS=()            # mount points, unmounted in reverse order
SERVER_PID=
WORK=$(mktemp -d "${TMPDIR:-/tmp}/board-check.XXXXXX")
cleanup() {
  local rc=$? i
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  for (( i=${#MOUNTS[@]}-1; i>=0; i-- )); do
    umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || true
  done
  # debootstrap's own mounts in a partial rootfs
  for m in proc sys dev/pts; do
    mountpoint -q "$ROOTFS.partial/$m" 2>/dev/null && umount -l "$ROOTFS.partial/$m" || true
  done
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
domount() { mount "$@"; MOUNTS+=("${!#}"); }

in_chroot() {  # in_chroot ROOT USER CMD...: a clean environment (env -i: no host pip/proxy variables)
  local root=$1 user=$2; shift 2
  env -i PATH=$CHROOT_PATH HOME=$([ "$user" = root ] && echo /root || echo /home/$user) LANG=C.UTF-8 \
    QEMU_CPU=$QEMU_CPU "$CHROOT" --userspec="$user:$user" "$root" "$@"
}

apt_mirror() {  # the Debian mirror apt is configured with (deb822 .sources or one-line format)
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (u && s && t) { print u; exit } u=s=t=""; next }
      /^URIs:/ { u=$2 } /^Types:/ { t=($0 ~ /[[:space:]]deb([[:space:]]|$)/) }
      /^Suites:/ { for (i=2; i<=NF; i++) if ($i==suite) s=1 }
      END { if (u && s && t) print u }' "$f" | head -n1)
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '$1=="deb" { for (i=2;i<=NF;i++) if ($i==suite) { u=$(i-1); if (u ~ /^\[/) u=$(i-1); print u; exit } }' "$f" | head -n1)
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  echo http://deb.debian.org/debian
}

write_cpuinfo() {  # write_cpuinfo BOARD FILE: the board's /proc/cpuinfo (64-bit Raspberry Pi OS kernel)
  local feats var part rev model revision i
  case "$1" in
    rpi4) feats="fp asimd evtstrm crc32 cpuid"; var=0x0; part=0xd08; rev=3
          revision=c03114; model="Raspberry Pi 4 Model B Rev 1.4" ;;
    rpi5) feats="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
          var=0x4; part=0xd0b; rev=1; revision=d04170; model="Raspberry Pi 5 Model B Rev 1.0" ;;
  esac
  {
    for i in 0 1 2 3; do
      printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$feats"
      printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$var" "$part" "$rev"
    done
    printf 'Revision\t: %s\nSerial\t\t: 10000000e3a1b2c4\nModel\t\t: %s\n' "$revision" "$model"
  } > "$2"
}

# ---------------------------------------------------------------- 2. root filesystem (cached)
mkdir -p "$STATE"
exec 9>"$STATE/.lock"      # one board-check at a time per cache (shared rootfs and venvs)
flock 9
if [ -f "$ROOTFS/.eetool-rootfs-ok" ]; then
  log "2/5 reusing $ROOTFS"
else
  MIRROR=${BOARD_CHECK_MIRROR:-$(apt_mirror)}
  log "2/5 building $ROOTFS: debootstrap --arch=arm64 --variant=minbase --include=python3-venv $SUITE $MIRROR"
  rm -rf "$ROOTFS.partial" "$ROOTFS"
  t=$(date +%s)
  debootstrap --arch=arm64 --variant=minbase --include=python3-venv "$SUITE" "$ROOTFS.partial" "$MIRROR" \
    > "$STATE/debootstrap.log" 2>&1 || { tail -n 30 "$STATE/debootstrap.log" >&2; die "debootstrap failed (log: $STATE/debootstrap.log)"; }
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin QEMU_CPU=cortex-a72 "$CHROOT" "$ROOTFS.partial" \
    useradd --create-home --uid 1000 --user-group --shell /bin/bash pi || die "useradd pi failed"
  rm -f "$ROOTFS.partial"/var/cache/apt/archives/*.deb
  for m in proc sys dev/pts; do mountpoint -q "$ROOTFS.partial/$m" && umount -l "$ROOTFS.partial/$m" || true; done
  touch "$ROOTFS.partial/.eetool-rootfs-ok"
  mv "$ROOTFS.partial" "$ROOTFS"
  log "    rootfs built in $(( $(date +%s) - t ))s ($(du -sh "$ROOTFS" | cut -f1))"
fi

# the run's root: an overlay over the cached rootfs, so the cache stays pristine
ROOT="$WORK/root"
mkdir -p "$WORK/upper" "$WORK/ovl-work" "$ROOT"
if ! domount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$WORK/upper,workdir=$WORK/ovl-work" "$ROOT" 2>/dev/null; then
  log "    overlayfs unavailable: copying the rootfs"
  cp -a "$ROOTFS/." "$ROOT/"
fi
write_cpuinfo "$BOARD" "$STATE/cpuinfo-$BOARD"
domount -t proc proc "$ROOT/proc"
domount --bind "$STATE/cpuinfo-$BOARD" "$ROOT/proc/cpuinfo"    # qemu 7.2 + onnxruntime: x86 cpuinfo segfaults
domount -t sysfs -o ro sysfs "$ROOT/sys"                        # cpuinfo library reads /sys/devices/system/cpu
domount -t tmpfs -o mode=1777 tmpfs "$ROOT/dev/shm"
# binfmt entry without the F flag: the interpreter must exist inside the chroot
INTERP=$(sed -n 's/^interpreter //p' /proc/sys/fs/binfmt_misc/qemu-aarch64)
if ! grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  mkdir -p "$ROOT$(dirname "$INTERP")" && cp "$(readlink -f "$INTERP")" "$ROOT$INTERP"
fi
[ "$(in_chroot "$ROOT" root /usr/bin/uname -m)" = aarch64 ] || die "the chroot does not run aarch64 binaries"

# ---------------------------------------------------------------- 3. venv + pip install --no-index (cached)
REQ_HASH=$(cat "$REQS" | sha256sum | cut -c1-16)
VENV="$STATE/venv-$REQ_HASH"
mkdir -p "$ROOT/home/pi/venv" "$ROOT/wheels" "$VENV"
cp "$REQS" "$ROOT/home/pi/requirements.txt"
domount --bind "$VENV" "$ROOT/home/pi/venv"
domount --bind -o ro "$WHEELS" "$ROOT/wheels"
if [ -f "$VENV/.eetool-venv-ok" ]; then
  log "3/5 reusing venv for these requirements ($VENV)"
else
  log "3/5 python3 -m venv /home/pi/venv; pip install --no-index --find-links /wheels -r requirements.txt (as pi)"
  log "    pip install --no-index fails here if a wheel does not install on aarch64 / glibc 2.36 / CPython 3.11.2"
  t=$(date +%s)
  find "$VENV" -mindepth 1 -delete
  chown 1000:1000 "$VENV" "$ROOT/home/pi/requirements.txt"
  in_chroot "$ROOT" pi /usr/bin/python3 -m venv /home/pi/venv || die "python3 -m venv failed in the chroot"
  # --no-compile: byte-compiling every installed module under qemu costs minutes; Python compiles what is
  # imported on first use instead (the venv belongs to pi, so it can write __pycache__)
  in_chroot "$ROOT" pi /home/pi/venv/bin/pip install --quiet --no-index --find-links /wheels --no-cache-dir \
    --no-compile --disable-pip-version-check -r /home/pi/requirements.txt \
    || die "pip install --no-index of $REQS failed inside the aarch64 rootfs"
  in_chroot "$ROOT" pi /home/pi/venv/bin/pip check --disable-pip-version-check || die "pip check failed"
  touch "$VENV/.eetool-venv-ok"
  log "    installed in $(( $(date +%s) - t ))s"
fi

# ---------------------------------------------------------------- 4. smoke test: imports + tiny models
log "4/5 smoke test under QEMU_CPU=$QEMU_CPU: numpy, onnxruntime, ai_edge_litert, zstandard, lz4, PIL; tiny ONNX + TFLite"
"$HOST_PY" "$SCRIPTS/board_check_models.py" "$WORK/smoke" >"$WORK/models.log" 2>&1 \
  || { cat "$WORK/models.log" >&2; die "could not build the tiny models on the host"; }
mkdir -p "$ROOT/home/pi/smoke"
cp "$WORK/smoke/"* "$SCRIPTS/board_check_smoke.py" "$ROOT/home/pi/smoke/"
chown -R 1000:1000 "$ROOT/home/pi/smoke"
SMOKE=$(in_chroot "$ROOT" pi /home/pi/venv/bin/python /home/pi/smoke/board_check_smoke.py /home/pi/smoke 2>"$WORK/smoke.err") \
  || { cat "$WORK/smoke.err" >&2; echo "$SMOKE" >&2; die "smoke test failed inside the aarch64 rootfs"; }
echo "$SMOKE" > "$STATE/last-smoke-$BOARD.json"
log "    $SMOKE"

# ---------------------------------------------------------------- 5. the bundle: server on host, device in chroot
if [ -z "$BUNDLE" ]; then
  log "5/5 skipped: no --bundle given (make board-check BOARD=$BOARD BUNDLE=dir)"
  log "OK: $BOARD smoke test passed (emulated: no latency figures are meaningful here)"
  exit 0
fi
[ -d "$BUNDLE/samples" ] && ls "$BUNDLE/samples" | grep -q . || die "bundle $BUNDLE has no samples/ to run"
log "5/5 bundle $BUNDLE: cp -r to /home/pi/bundle, server on the host, device side in the chroot"
cp -r "$BUNDLE" "$ROOT/home/pi/bundle"
chown -R 1000:1000 "$ROOT/home/pi/bundle"
SAMPLES=()
while IFS= read -r f; do SAMPLES+=("samples/$f"); done < <(ls "$BUNDLE/samples")

PORT=$("$HOST_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$BUNDLE" && exec env -u PYTHONPATH "$HOST_PY" -m runtime serve . --host 127.0.0.1 --port "$PORT") \
  > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 600); do
  (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; die "edge server exited"; }
  sleep 0.2
done
(exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null || { cat "$WORK/server.log" >&2; die "edge server did not listen on $PORT"; }
log "    edge server on the host at 127.0.0.1:$PORT"

(cd "$BUNDLE" && "$HOST_PY" -m runtime run . --server 127.0.0.1:"$PORT" --board "$BOARD" --json "${SAMPLES[@]}") \
  > "$WORK/host.json" 2> "$WORK/host.err" || { cat "$WORK/host.err" >&2; die "host run failed"; }
in_chroot "$ROOT" pi /bin/sh -c 'server=$0 board=$1; shift
  cd /home/pi/bundle && exec python3 -m runtime run /home/pi/bundle --server "$server" --board "$board" --json "$@"' \
  "127.0.0.1:$PORT" "$BOARD" "${SAMPLES[@]}" > "$WORK/board.json" 2> "$WORK/board.err" \
  || { cat "$WORK/board.err" >&2; die "device-side run failed inside the aarch64 rootfs"; }
"$HOST_PY" "$SCRIPTS/board_check_compare.py" "$WORK/host.json" "$WORK/board.json" --board "$BOARD" \
  --out "$STATE/last-run-$BOARD.json" || die "board and host results differ (details above; $STATE/last-run-$BOARD.json)"
log "OK: $BOARD ran the bundle on aarch64 binaries and agreed with the host (emulated: no latency figures)"

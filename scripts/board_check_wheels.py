"""Download, on the host, the aarch64 wheels a board's requirements file needs (step 1 of `make board-check`).

    python scripts/board_check_wheels.py REQUIREMENTS DEST [--python-version 3.11]
    python scripts/board_check_wheels.py --requirements-of rpi4 > rpi4.txt   # the pins in boards/rpi4.json

A Raspberry Pi has no compiler toolchain worth the name and hours to spare: every requirement must exist as a
CPython 3.11 manylinux aarch64 wheel (Raspberry Pi OS / Debian bookworm: Python 3.11, glibc 2.36).  This runs
`pip download --only-binary=:all:` for exactly those platforms; when a package (or one of its dependencies)
has no such wheel it exits 3 with one line naming the package, instead of pip's generic resolver error.

Warm runs are offline: the wheel cache DEST is tried first with --no-index; the index is only asked when the
cache does not satisfy the requirements.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

# Raspberry Pi OS bookworm (64-bit) = Debian bookworm arm64: glibc 2.36, CPython 3.11
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64")
PYTHON_VERSION = "3.11"

_NO_DIST = re.compile(r"No matching distribution found for (\S+)")
_NO_VERSION = re.compile(r"Could not find a version that satisfies the requirement (\S+)(?: \(from (?!versions:)([^)]*)\))?")
_NET = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                  r"Connection refused|Network is unreachable|ConnectTimeout|ReadTimeout")


class WheelCheckError(Exception):
    """The requirements cannot be met with aarch64 wheels.  ``package`` names the culprit when pip said."""

    def __init__(self, message: str, package: Optional[str] = None, pip_output: str = ""):
        super().__init__(message)
        self.package = package
        self.pip_output = pip_output


def pip_download_cmd(requirements: Path, dest: Path, python_version: str = PYTHON_VERSION,
                     pip: Sequence[str] = (sys.executable, "-m", "pip"), extra: Sequence[str] = ()) -> List[str]:
    cmd = [*pip, "download", "--only-binary=:all:", "--implementation", "cp", "--python-version", python_version,
           "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    return cmd + list(extra)


def _explain(output: str, requirements: Path, python_version: str) -> WheelCheckError:
    m = _NO_VERSION.search(output)
    req = (m.group(1) if m else None) or ((_NO_DIST.search(output) or [None, None])[1])
    pkg = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] if req else None
    if pkg is None:
        tail = "\n".join(line for line in output.splitlines() if line.startswith("ERROR"))[-2000:]
        return WheelCheckError("board-check: pip could not download aarch64 wheels for %s:\n%s"
                               % (requirements, tail or output[-2000:]), None, output)
    if _NET.search(output):
        return WheelCheckError("board-check: could not reach the package index while looking for %r "
                               "(network error; the wheel cache did not have it either)" % pkg, pkg, output)
    via = " (requirement %s%s)" % (req, ", needed by %s" % m.group(2) if m and m.group(2) else "")
    return WheelCheckError(
        "board-check: no aarch64 wheel for %r%s in %s: no CPython %s manylinux aarch64 wheel "
        "(platforms %s) exists on the index, so a Raspberry Pi would have to build it from source. "
        "Pin a version that ships an aarch64 wheel or drop the package from the board's requirements."
        % (pkg, via, requirements, python_version, ", ".join(PLATFORMS)), pkg, output)


def download_wheels(requirements, dest, python_version: str = PYTHON_VERSION,
                    pip: Sequence[str] = (sys.executable, "-m", "pip"), index_args: Sequence[str] = (),
                    offline_first: bool = True) -> List[Path]:
    """Fill ``dest`` with the aarch64 wheels ``requirements`` resolve to; return the wheel paths.

    ``index_args`` go to the online attempt only (e.g. ``["--no-index", "--find-links", DIR]`` in tests).
    Raises :class:`WheelCheckError` naming the package that has no wheel."""
    requirements, dest = Path(requirements), Path(dest)
    if not requirements.is_file():
        raise WheelCheckError("board-check: requirements file %s does not exist" % requirements)
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*"))
    if offline_first and any(dest.glob("*.whl")):
        cached = subprocess.run(pip_download_cmd(requirements, dest, python_version, pip,
                                                 ["--no-index", "--find-links", str(dest)]),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if cached.returncode == 0:
            return sorted(dest.glob("*.whl"))
    proc = subprocess.run(pip_download_cmd(requirements, dest, python_version, pip, index_args),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise _explain(proc.stdout, requirements, python_version)
    stray = [p for p in set(dest.glob("*")) - before if not p.name.endswith(".whl")]
    if stray:  # cannot happen with --only-binary, but a non-wheel must never reach the board
        raise WheelCheckError("board-check: pip downloaded non-wheel files %s" % [p.name for p in stray])
    return sorted(dest.glob("*.whl"))


def board_requirements(board: str) -> str:
    """The pip requirements file text of ``board`` from its profile (boards/BOARD.json ``requirements``),
    exactly as ``eetool export`` writes it into a bundle's requirements/BOARD.txt."""
    sys.path.insert(0, str(REPO))
    from runtime.boards import load_board, requirements_text

    return requirements_text(load_board(board, str(REPO / "boards")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("requirements", nargs="?")
    ap.add_argument("dest", nargs="?")
    ap.add_argument("--python-version", default=PYTHON_VERSION)
    ap.add_argument("--requirements-of", metavar="BOARD", help="print the pins of boards/BOARD.json and exit")
    args = ap.parse_args(argv)
    if args.requirements_of:
        try:
            sys.stdout.write(board_requirements(args.requirements_of))
        except ValueError as e:  # runtime.boards.BoardError: unknown board, invalid profile
            print("board-check: %s" % e, file=sys.stderr)
            return 2
        return 0
    if not args.requirements or not args.dest:
        ap.error("give REQUIREMENTS and DEST, or --requirements-of BOARD")
    try:
        wheels = download_wheels(args.requirements, args.dest, args.python_version)
    except WheelCheckError as e:
        print(str(e), file=sys.stderr)
        return 3
    print("board-check: %d aarch64 wheels for %s in %s" % (len(wheels), args.requirements, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

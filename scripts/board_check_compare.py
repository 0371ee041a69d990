"""Compare `python -m runtime run --json` on the host with the same command on the emulated board.

    python scripts/board_check_compare.py HOST.json BOARD.json [--board rpi4] [--out FILE]

Passes when the board reports machine aarch64 and a backend, uses the same backend and precision as the host,
and every input gets the same top-1, the same exit / place of decision, no error, and confidences within
--atol.  Latency (`ms`) is dropped from everything this prints or writes: under qemu-user it says nothing
about the board.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

TIMING_KEYS = ("ms", "latency", "latency_ms", "time", "seconds")


def strip_timings(obj):
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def compare(host: dict, board: dict, atol: float = 0.02) -> List[str]:
    """Problems found (empty list: agreement)."""
    problems = []
    if board.get("machine") != "aarch64":
        problems.append("board side reports machine %r, not aarch64" % board.get("machine"))
    if not board.get("backend"):
        problems.append("board side does not report the backend it used")
    for key in ("backend", "precision"):
        if host.get(key) != board.get(key):
            problems.append("%s differs: host %r, board %r" % (key, host.get(key), board.get(key)))
    hr, br = host.get("results") or [], board.get("results") or []
    if not hr:
        problems.append("host produced no results")
    if [r.get("input") for r in hr] != [r.get("input") for r in br]:
        problems.append("inputs differ: host %s, board %s" % ([r.get("input") for r in hr], [r.get("input") for r in br]))
        return problems
    for h, b in zip(hr, br):
        name = h.get("input")
        for r, side in ((h, "host"), (b, "board")):
            if r.get("error"):
                problems.append("%s: %s error: %s" % (name, side, r["error"]))
        for key in ("top1", "exit", "where"):
            if h.get(key) != b.get(key):
                problems.append("%s: %s differs: host %r, board %r" % (name, key, h.get(key), b.get(key)))
        hc, bc = h.get("confidences") or {}, b.get("confidences") or {}
        if set(hc) != set(bc):
            problems.append("%s: confidences for different exits: host %s, board %s" % (name, sorted(hc), sorted(bc)))
        for k in set(hc) & set(bc):
            if abs(hc[k] - bc[k]) > atol:
                problems.append("%s: confidence %s differs by %.4f (host %.5f, board %.5f)"
                                % (name, k, abs(hc[k] - bc[k]), hc[k], bc[k]))
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("board")
    ap.add_argument("--board", dest="board_name", default="")
    ap.add_argument("--atol", type=float, default=0.02, help="confidence tolerance (int8 kernels differ by arch)")
    ap.add_argument("--out", help="write both sides (timings removed) and the verdict here")
    args = ap.parse_args(argv)
    with open(args.host) as f:
        host = strip_timings(json.load(f))
    with open(args.board) as f:
        board = strip_timings(json.load(f))
    problems = compare(host, board, args.atol)
    hc = [c for r in host.get("results", []) for c in (r.get("confidences") or {}).values()]
    bc = [c for r in board.get("results", []) for c in (r.get("confidences") or {}).values()]
    max_diff = max((abs(a - b) for a, b in zip(hc, bc)), default=0.0)
    summary = {"board": args.board_name, "ok": not problems, "problems": problems,
               "board_machine": board.get("machine"), "host_machine": host.get("machine"),
               "backend": board.get("backend"), "precision": board.get("precision"),
               "inputs": len(board.get("results", [])), "max_confidence_diff": max_diff,
               "note": "run under qemu-user emulation: latency is not measured or reported",
               "host": host, "board_side": board}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    for r in board.get("results", []):
        print("  %-40s top1 %5s  via %-10s %s" % (r.get("input"), r.get("top1"), r.get("exit") or r.get("where"),
                                                  "(error: %s)" % r["error"] if r.get("error") else ""))
    print("board %s: machine %s, backend %s/%s, %d inputs, max confidence diff vs host %.2g: %s"
          % (args.board_name, board.get("machine"), board.get("backend"), board.get("precision"),
             len(board.get("results", [])), max_diff, "AGREE" if not problems else "DIFFER"))
    for p in problems:
        print("  - " + p, file=sys.stderr)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

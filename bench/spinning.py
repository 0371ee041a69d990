"""onnxruntime worker spinning on vs off (benchmark, not a test): CPU time per inference and latency at a
fixed, low request rate, the way a board serves a camera.

The bundle's whole model (every segment, float ONNX, the runtime's own Chain) is opened twice with the same
threads, once with ``session.intra_op/inter_op.allow_spinning`` = 1 (onnxruntime's default) and once = 0
(the runtime's default on boards). After a common warm-up, blocks of ``--per-block`` inferences at
``--rate`` per second alternate on / off / on / off ... (ABAB), so drift in the machine's load hits both
alike. Per block: process CPU time (``time.process_time``, every thread) per inference and median latency.
Reported: per setting the median over its blocks, and the median of the per-block-pair CPU ratios.

    eetool export efficientnet-lite0 --split blocks.5 -o out/b5
    python bench/spinning.py out/b5 --threads 2 --rate 5 --blocks 6 --per-block 10 --out out/spinning.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def block(chain, name, xs, n, rate):
    """``n`` inferences at ``rate`` per second; returns (CPU ms per inference, median latency ms)."""
    period = 1.0 / rate
    lat = []
    c0 = time.process_time()
    t_next = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        chain.run_segments({name: xs[i % len(xs)]})
        lat.append((time.perf_counter() - t0) * 1e3)
        t_next += period
        time.sleep(max(0.0, t_next - time.perf_counter()))
    return (time.process_time() - c0) * 1e3 / n, float(np.median(lat))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate", type=float, default=5.0, help="inferences per second")
    ap.add_argument("--blocks", type=int, default=6, help="blocks per setting (alternating)")
    ap.add_argument("--per-block", type=int, default=10, help="inferences per block")
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    from runtime.bundle import Bundle
    from runtime.chain import Chain
    from runtime.preprocess import list_images, load_inputs

    bundle = Bundle.load(a.bundle)
    name = bundle.manifest.input.name
    xs = [load_inputs([f], bundle.manifest.preprocess) for f in list_images(bundle.root / "samples")]
    chains = {s: Chain(bundle, "all", "onnx", "fp32", a.threads, with_exits=False, allow_spinning=s == "on")
              for s in ("on", "off")}
    for c in chains.values():  # common warm-up
        for x in xs:
            c.run_segments({name: x})
    rows = {"on": [], "off": []}
    for k in range(2 * a.blocks):
        s = ("on", "off")[k % 2]
        rows[s].append(block(chains[s], name, xs, a.per_block, a.rate))
    pair_ratio = [on[0] / off[0] for on, off in zip(rows["on"], rows["off"])]
    res = {"bundle": str(bundle.root), "threads": a.threads, "rate_per_s": a.rate, "blocks": a.blocks,
           "per_block": a.per_block, "order": "blocks alternating on/off (ABAB) after a common warm-up",
           **{s: {"cpu_ms_per_inference": float(np.median([r[0] for r in rows[s]])),
                  "latency_p50_ms": float(np.median([r[1] for r in rows[s]])), "blocks": rows[s]} for s in rows},
           "cpu_ratio_on_over_off_median": float(np.median(pair_ratio)),
           "cpu_ratio_iqr": [float(v) for v in np.percentile(pair_ratio, [25, 75])]}
    print("spinning on : CPU %.1f ms/inference, p50 %.1f ms" % (res["on"]["cpu_ms_per_inference"], res["on"]["latency_p50_ms"]))
    print("spinning off: CPU %.1f ms/inference, p50 %.1f ms" % (res["off"]["cpu_ms_per_inference"], res["off"]["latency_p50_ms"]))
    print("CPU time on / off: median %.2fx (IQR %.2f-%.2f) over %d block pairs, %d threads, %.0f inferences/s" % (
        res["cpu_ratio_on_over_off_median"], *res["cpu_ratio_iqr"], a.blocks, a.threads, a.rate))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

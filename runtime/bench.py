"""``python -m runtime bench``: measure a bundle on this board against an edge server.

Per request after warm-up: preprocessing, each device segment and exit, quantisation, encoding,
network (send + receive, server time excluded), the server's own tail time, bytes on the wire; p50 / p90
/ p99 and throughput; energy from the board's sensor (or a labelled estimate); latency vs emulated
bandwidth; and the runtime's overhead against bare onnxruntime sessions on the same graphs.
Writes ``report.json``, ``report.md`` and PNG plots (when matplotlib is installed) to ``--out``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from .bundle import Bundle
from .device import percentiles


def start_server(bundle_dir: str, extra: List[str]) -> tuple:
    """Start ``python -m runtime serve`` on a free loopback port; returns (process, "127.0.0.1:PORT")."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", bundle_dir, "--port", "0"] + extra,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        raise OSError("edge server did not start: %r" % line)
    return proc, line.strip().rsplit(" on ", 1)[1]


def _inputs(args, bundle: Bundle) -> List[str]:
    if args.inputs:
        return list(args.inputs)
    samples = bundle.root / "samples"
    files = sorted(str(p) for p in samples.iterdir()) if samples.is_dir() else []
    if not files:
        raise ValueError("no inputs: give --inputs FILE... (the bundle has no samples/)")
    return files


def _run_pass(runner, xs, repeat: int) -> List:
    out = []
    for _ in range(repeat):
        for x in xs:
            out.append(runner.infer(x))
    return out


def _stage_table(results) -> Dict[str, Dict[str, float]]:
    stages: Dict[str, List[float]] = {}
    for r in results:
        for k, v in r.ms.items():
            stages.setdefault(k, []).append(v)
        stages.setdefault("total", []).append(sum(r.ms.values()))
    return {k: percentiles(v) for k, v in stages.items()}


def bare_onnxruntime_ms(bundle: Bundle, xs, threads, repeat: int) -> Dict[str, float]:
    """Whole model (all segments, float ONNX) run as bare onnxruntime sessions vs the runtime's Chain, on
    the same inputs in one run: returns p50 ms of each and their ratio."""
    import onnxruntime as ort

    from .chain import Chain

    chain = Chain(bundle, "all", "onnx", "fp32", threads, with_exits=False)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    bare = [(s["inputs"], ort.InferenceSession(str(bundle.graph_path(bundle.graph_key(s, "onnx", "fp32"))), opts,
                                               providers=["CPUExecutionProvider"])) for s in bundle.segments]
    t_chain, t_bare = [], []
    for _ in range(repeat):
        for x in xs:
            t0 = time.perf_counter()
            chain.run_segments({"input": x})
            t_chain.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            values = {"input": x}
            for inputs, sess in bare:
                names = [o.name for o in sess.get_outputs()]
                values.update(zip(names, sess.run(names, {n: values[n] for n in inputs})))
            t_bare.append((time.perf_counter() - t0) * 1e3)
    c, b = float(np.median(t_chain)), float(np.median(t_bare))
    return {"runtime_chain_p50_ms": c, "bare_onnxruntime_p50_ms": b, "overhead_ratio": c / b}


def run_bench(args) -> int:
    from . import __main__ as cli
    from .boards import load_board
    from .energy import meter_for_board
    from .preprocess import load_inputs

    bundle = Bundle.load(args.bundle)
    board = load_board(args.board or "host")
    files = _inputs(args, bundle)
    t0 = time.perf_counter()
    xs = [load_inputs([f], bundle.manifest["preprocess"]) for f in files]
    preprocess_ms = (time.perf_counter() - t0) * 1e3 / len(files)
    proc = None
    if not args.server:
        proc, args.server = start_server(args.bundle, ["--backend", args.backend, "--precision", "fp32"])
    try:
        report = _measure(args, bundle, board, xs, preprocess_ms, meter_for_board, cli, files)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    _plots(report, out)
    print(render_markdown(report))
    print("report written to %s" % out)
    return 0


def _measure(args, bundle, board, xs, preprocess_ms, meter_for_board, cli, files=()) -> dict:
    runner, fmt, precision = cli.make_runner(args, bundle, board)
    threads = cli._threads(args, board)
    _run_pass(runner, xs[: max(1, args.warmup)], 1)
    meter = meter_for_board(board, **({"csv_path": args.energy_csv} if args.energy_csv else {}))
    idle_w = None
    if not meter.estimated:
        idle_w = meter.measure_idle(1.0)
    meter.start()
    t0 = time.perf_counter()
    results = _run_pass(runner, xs, args.repeat)
    wall = time.perf_counter() - t0
    energy = meter.stop()
    n = len(results)
    report = {
        "bundle": str(bundle.root), "split": bundle.manifest["split"], "board": board.get("name"),
        "machine": platform.machine(), "python": platform.python_version(), "backend": fmt,
        "precision": precision, "threads": threads, "codec": args.codec, "wire_dtype": args.wire_dtype,
        "requests": n, "inputs": len(xs), "preprocess_ms_mean": preprocess_ms,
        "stages_ms": _stage_table(results), "throughput_per_s": n / wall,
        "bytes_sent_mean": float(np.mean([r.bytes_sent for r in results])),
        "bytes_received_mean": float(np.mean([r.bytes_received for r in results])),
        "exit_rates": _exit_rates(results),
        "energy": {**energy.to_json(), "per_inference_j": energy.joules / n,
                   "idle_w_measured": idle_w, "label": "estimated" if energy.estimated else "measured"},
    }
    report["bandwidth_sweep"] = _sweep(args, bundle, board, xs, cli)
    report["graph_latency"] = graph_latency(bundle, xs, args.repeat)
    report["input_file_bytes_mean"] = float(np.mean([os.path.getsize(f) for f in files]))
    if not getattr(args, "no_compare", False):
        report["comparison"] = compare_modes(args, bundle, board, xs, cli, meter_for_board)
    report["findings"] = findings(report)
    if "onnx/fp32" in bundle.formats():
        report["runtime_vs_bare_onnxruntime"] = bare_onnxruntime_ms(bundle, xs, threads, args.repeat)
    return report


def _timed_mode(infer, xs, repeat: int, meter) -> dict:
    """Run ``infer(x) -> (top1, bytes_sent)`` over ``xs`` after one warm-up pass; wall ms per request,
    bytes per request, device energy per inference, and the top-1 of the last pass."""
    for x in xs:
        infer(x)
    ms, sent, top1 = [], [], []
    meter.start()
    for _ in range(repeat):
        top1 = []
        for x in xs:
            t0 = time.perf_counter()
            t, b = infer(x)
            ms.append((time.perf_counter() - t0) * 1e3)
            sent.append(b)
            top1.append(t)
    energy = meter.stop()
    return {"latency_ms": percentiles(ms), "bytes_per_sample": float(np.mean(sent)), "top1": top1,
            "energy_j_per_inference": energy.joules / len(ms), "energy_label": "estimated" if energy.estimated else "measured"}


def compare_modes(args, bundle, board, xs, cli, meter_for_board) -> dict:
    """The survey's comparison on the same inputs (Matsubara, Levorato & Restuccia, sec. 2): local
    computing (LC, whole model on the device), edge computing (EC, the int8-quantised input sent to a
    server running the whole model), split computing (SC) and SC with early exits (SC+EE, when the
    bundle has exits). Latency is wall time per request from preprocessed input to result (ms)."""
    from . import codec
    from .client import EdgeClient
    from .device import DeviceRunner

    fmt = cli.pick_backend(bundle, args.backend, board)
    precision = cli.pick_precision(bundle, fmt, args.precision)
    threads = cli._threads(args, board)
    meter = meter_for_board(board)
    modes: Dict[str, dict] = {}
    lc = DeviceRunner(bundle, None, fmt, precision, threads, exits=False, local_tail=True)
    modes["LC"] = _timed_mode(lambda x: (lc.infer(x).top1, 0), xs, args.repeat, meter)
    proc, address = start_server(args.bundle, ["--whole-model", "--backend", fmt, "--precision", "fp32"])
    try:
        host, port = address.rsplit(":", 1)
        client = EdgeClient(host, int(port), codec=args.codec)

        def offload(x):
            q = {"scale": float(x.max() - x.min()) / 255.0 or 1.0}
            q["zero_point"] = int(np.clip(round(-128 - float(x.min()) / q["scale"]), -128, 127))
            q["dtype"] = "int8"
            reply = client.infer({"input": codec.quantize(x, q["scale"], q["zero_point"], "int8")}, {"input": q})
            return int(reply.logits[0].argmax()), reply.bytes_sent

        modes["EC"] = _timed_mode(offload, xs, args.repeat, meter)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    saved = args.no_exits
    args.no_exits = True
    sc, _, _ = cli.make_runner(args, bundle, board)
    modes["SC"] = _timed_mode(lambda x: (lambda r: (r.top1, r.bytes_sent))(sc.infer(x)), xs, args.repeat, meter)
    if bundle.exits:
        args.no_exits = False
        see, _, _ = cli.make_runner(args, bundle, board)
        modes["SC+EE"] = _timed_mode(lambda x: (lambda r: (r.top1, r.bytes_sent))(see.infer(x)), xs, args.repeat, meter)
    args.no_exits = saved
    for m in modes.values():
        m["top1_agreement_with_LC"] = float(np.mean([a == b for a, b in zip(m["top1"], modes["LC"]["top1"])]))
    return {"backend": "%s/%s" % (fmt, precision), "server_on_this_machine": True, "modes": modes}


def graph_latency(bundle: Bundle, xs, repeat: int, threads=(1, 2)) -> Dict[str, dict]:
    """p50 ms per segment graph for every format/precision the bundle has (float vs int8, onnxruntime vs
    LiteRT) at 1 and 2 threads, batch 1, on the same inputs: ``{"onnx/int8@2": {"seg0": ms, ...}}``."""
    from .chain import Chain

    out: Dict[str, dict] = {}
    for pair in bundle.formats():
        fmt, precision = pair.split("/")
        for t in threads:
            try:
                chain = Chain(bundle, "all", fmt, precision, t, with_exits=False)
            except Exception as e:  # e.g. no LiteRT interpreter installed on this board
                out["%s@%d" % (pair, t)] = {"error": str(e)}
                continue
            timings: Dict[str, List[float]] = {}
            chain.run_segments({"input": xs[0]})  # warm-up
            for _ in range(repeat):
                for x in xs:
                    ms: Dict[str, float] = {}
                    chain.run_segments({"input": x}, ms)
                    for k, v in ms.items():
                        timings.setdefault(k, []).append(v)
            out["%s@%d" % (pair, t)] = {k: float(np.median(v)) for k, v in timings.items()}
    return out


def findings(r: dict) -> List[str]:
    """The survey's qualitative claims, checked against this run's own numbers (true or not)."""
    out = []
    sent, jpeg = r["bytes_sent_mean"], r["input_file_bytes_mean"]
    if sent:
        out.append("bytes sent per request (%.0f B mean, int8 + %s, 0 when an exit fires) are %s than the input "
                   "file (%.0f B mean)"
                   % (sent, r["codec"], "smaller" if sent < jpeg else "NOT smaller", jpeg))
    sweep = r.get("bandwidth_sweep") or []
    if len(sweep) > 1:
        lo, hi = sweep[0], sweep[-1]
        out.append("end-to-end p50 falls from %.1f ms at %s to %.1f ms at %s: the network share %s with bandwidth"
                   % (lo["total_ms"]["p50"], lo["bandwidth"], hi["total_ms"]["p50"], hi["bandwidth"],
                      "shrinks" if hi["total_ms"]["p50"] < lo["total_ms"]["p50"] else "does NOT shrink"))
    modes = (r.get("comparison") or {}).get("modes", {})
    if modes:
        best = min(modes, key=lambda m: modes[m]["latency_ms"]["p50"])
        out.append("fastest mode on this link: %s (p50 %.1f ms)" % (best, modes[best]["latency_ms"]["p50"]))
    if "SC+EE" in modes and "SC" in modes:
        ee, sc = modes["SC+EE"], modes["SC"]
        out.append("early exits: p50 %.1f ms vs %.1f ms without, %.0f vs %.0f B per request, top-1 agreement "
                   "with LC %.1f %% vs %.1f %%" % (ee["latency_ms"]["p50"], sc["latency_ms"]["p50"],
                                                   ee["bytes_per_sample"], sc["bytes_per_sample"],
                                                   100 * ee["top1_agreement_with_LC"], 100 * sc["top1_agreement_with_LC"]))
    return out


def _exit_rates(results) -> Dict[str, float]:
    counts: Dict[str, int] = {}
    for r in results:
        key = r.exit or r.where
        counts[key] = counts.get(key, 0) + 1
    return {k: v / len(results) for k, v in counts.items()}


def _sweep(args, bundle, board, xs, cli) -> List[dict]:
    """End-to-end p50 per emulated bandwidth (token-bucket shaping of the client's send path)."""
    rows = []
    original = args.bandwidth
    for bw in [b for b in (args.bandwidths or "").split(",") if b]:
        args.bandwidth = bw
        runner, _, _ = cli.make_runner(args, bundle, board)
        res = _run_pass(runner, xs, 1)
        rows.append({"bandwidth": bw, "rtt": args.rtt, "total_ms": percentiles([sum(r.ms.values()) for r in res]),
                     "bytes_sent_mean": float(np.mean([r.bytes_sent for r in res]))})
    args.bandwidth = original
    return rows


def render_markdown(r: dict) -> str:
    """The report as a Markdown page (numbers from this run only)."""
    lines = ["# eetool bench: %s on %s (%s)" % (r["bundle"], r["board"], r["machine"]), "",
             "split after `%s`, backend %s/%s, %s threads, codec %s, wire %s, %d requests over %d inputs" % (
                 r["split"], r["backend"], r["precision"], r["threads"] or "default", r["codec"], r["wire_dtype"],
                 r["requests"], r["inputs"]), "",
             "| stage | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---:|---:|---:|---:|"]
    for stage, p in r["stages_ms"].items():
        lines.append("| %s | %.2f | %.2f | %.2f | %.2f |" % (stage, p["p50"], p["p90"], p["p99"], p["mean"]))
    e = r["energy"]
    lines += ["", "preprocessing %.2f ms/input; throughput %.1f req/s; bytes sent %.0f / received %.0f per request" % (
        r["preprocess_ms_mean"], r["throughput_per_s"], r["bytes_sent_mean"], r["bytes_received_mean"]),
        "", "exit rates: " + ", ".join("%s %.1f%%" % (k, 100 * v) for k, v in r["exit_rates"].items()),
        "", "energy (%s, %s): %.3f J per inference gross, mean %.2f W%s" % (
            e["label"].upper(), e.get("source"), e["per_inference_j"], e.get("mean_w", 0.0),
            ", net of idle %.3f J total" % e["net_joules"] if e.get("net_joules") is not None else "")]
    if r.get("bandwidth_sweep"):
        lines += ["", "| link | total p50 ms | bytes sent |", "|---|---:|---:|"]
        for row in r["bandwidth_sweep"]:
            lines.append("| %s, rtt %s | %.2f | %.0f |" % (row["bandwidth"], row["rtt"], row["total_ms"]["p50"],
                                                          row["bytes_sent_mean"]))
    if r.get("runtime_vs_bare_onnxruntime"):
        o = r["runtime_vs_bare_onnxruntime"]
        lines += ["", "whole model, fp32 ONNX, on this machine: runtime chain p50 %.2f ms vs bare onnxruntime "
                  "sessions %.2f ms: overhead ratio %.3f" % (
            o["runtime_chain_p50_ms"], o["bare_onnxruntime_p50_ms"], o["overhead_ratio"])]
    if r.get("findings"):
        lines += ["", "## Findings (from this run)", ""] + ["- " + f for f in r["findings"]]
    if r.get("graph_latency"):
        segs = sorted({k for v in r["graph_latency"].values() for k in v if k != "error"})
        lines += ["", "## Latency per graph (p50 ms, batch 1)", "",
                  "| graphs @ threads | " + " | ".join(segs) + " |", "|---" + "|---:" * len(segs) + "|"]
        for key, v in r["graph_latency"].items():
            cells = [("%.2f" % v[sg]) if sg in v else "-" for sg in segs]
            lines.append("| %s | %s |" % (key, " | ".join(cells)) if "error" not in v else "| %s | %s |" % (key, v["error"]))
    if r.get("comparison"):
        c = r["comparison"]
        lines += ["", "## LC / EC / SC / SC+EE on the same inputs (%s; the edge server ran on this machine)" % c["backend"],
                  "", "| mode | p50 ms | p90 ms | bytes / sample | device energy J / inference | top-1 agreement with LC |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, m in c["modes"].items():
            lines.append("| %s | %.2f | %.2f | %.0f | %.3f (%s) | %.1f %% |" % (
                name, m["latency_ms"]["p50"], m["latency_ms"]["p90"], m["bytes_per_sample"],
                m["energy_j_per_inference"], m["energy_label"], 100 * m["top1_agreement_with_LC"]))
    return "\n".join(lines) + "\n"


def _plots(r: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    stages = {k: v["mean"] for k, v in r["stages_ms"].items() if k != "total"}
    fig, ax = plt.subplots(figsize=(6, 2.4))
    left = 0.0
    for name, ms in stages.items():
        ax.barh([0], [ms], left=left, label=name)
        left += ms
    ax.set_yticks([])
    ax.set_xlabel("mean latency per request (ms)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    ax.set_title("latency breakdown (%s, %s)" % (r["board"], r["backend"]))
    fig.savefig(out / "latency_breakdown.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    if r.get("bandwidth_sweep"):
        fig, ax = plt.subplots(figsize=(5, 3))
        xs = [row["bandwidth"] for row in r["bandwidth_sweep"]]
        ax.plot(xs, [row["total_ms"]["p50"] for row in r["bandwidth_sweep"]], marker="o")
        ax.set_xlabel("emulated uplink")
        ax.set_ylabel("end-to-end p50 (ms)")
        ax.set_title("latency vs bandwidth")
        fig.savefig(out / "latency_vs_bandwidth.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    if r.get("comparison"):
        modes = r["comparison"]["modes"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(modes), [m["latency_ms"]["p50"] for m in modes.values()], color="tab:blue")
        ax.set_ylabel("p50 latency per request (ms)")
        ax.set_title("LC / EC / SC / SC+EE (%s)" % r["board"])
        fig.savefig(out / "comparison.png", dpi=120, bbox_inches="tight")
        plt.close(fig)

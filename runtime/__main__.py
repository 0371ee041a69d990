"""Runtime command line, for boards and edge servers that have only the runtime installed:

    python -m runtime serve BUNDLE [--host 127.0.0.1] [--port 8470] [--secret S]
    python -m runtime run   BUNDLE --server HOST:PORT [--json] INPUT...
    python -m runtime bench BUNDLE [--board rpi4] [--server HOST:PORT] [--out DIR]

(argparse only: a board may not have click.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional

from .bundle import Bundle, BundleError


def pick_backend(bundle: Bundle, backend: str, board: Optional[dict]) -> str:
    """``onnx`` or ``tflite``: the asked one, or (``auto``) the board's preferred interpreter when the
    bundle has graphs for it and it imports, else onnx. Raises BundleError when the bundle lacks it."""
    have = {p.split("/")[0] for p in bundle.formats()}
    if backend != "auto":
        if backend not in have:
            raise BundleError("bundle has no %s graphs (has: %s)" % (backend, ", ".join(sorted(have))))
        return backend
    preferred = ((board or {}).get("backend") or {}).get("preferred", "onnxruntime")
    if preferred == "litert" and "tflite" in have and _litert_importable():
        return "tflite"
    return "onnx" if "onnx" in have else sorted(have)[0]


def _litert_importable() -> bool:
    for mod in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            __import__(mod)
            return True
        except ImportError:
            continue
    return False


def pick_precision(bundle: Bundle, fmt: str, precision: str) -> str:
    """``auto`` -> int8 when the bundle has int8 graphs in ``fmt``, else fp32."""
    if precision != "auto":
        return precision
    return "int8" if "%s/int8" % fmt in bundle.formats() else "fp32"


def _board(name: Optional[str]) -> Optional[dict]:
    if not name:
        return None
    from .boards import load_board

    return load_board(name)


def _threads(args, board) -> Optional[int]:
    if args.threads:
        return args.threads
    return ((board or {}).get("backend") or {}).get("threads")


def cmd_serve(args) -> int:
    from .chain import Chain
    from .protocol import FILE_TENSOR
    from .server import EdgeServer, run_until_signal

    bundle = Bundle.load(args.bundle)
    fmt = pick_backend(bundle, args.backend, None)
    precision = pick_precision(bundle, fmt, args.precision)
    # --whole-model: edge computing (EC), the device offloads its input and the server runs everything
    # an edge server keeps onnxruntime's default (spinning on: it serves many clients) unless told
    spin = None if args.spinning is None else args.spinning == "on"
    chain = Chain(bundle, "all" if args.whole_model else "server", fmt, precision, args.threads, with_exits=False,
                  allow_spinning=spin)
    if not chain.segments or not bundle.server_segments:
        raise BundleError("the bundle has no server segments: the whole model runs on the device")
    inp = bundle.manifest["input"]
    if args.input_file and not args.whole_model:
        raise ValueError("--input-file needs --whole-model (the server then decodes and runs everything)")
    if args.input_file:
        # EC as usually deployed: the device sends its image file as it is; the server decodes it
        expected = {FILE_TENSOR: {"shape": [None], "dtype": "uint8"}}
    elif args.whole_model:
        expected = {inp["name"]: {"shape": inp["shape"], "dtype": "float32"}}
    else:
        expected = {n: {"shape": bundle.tensor(n)["shape"], "dtype": "float32"} for n in bundle.wire_tensors}

    def tail(feeds):
        if args.input_file:
            from .preprocess import decode_image

            feeds = {inp["name"]: decode_image(feeds[FILE_TENSOR], bundle.manifest["preprocess"], "request file")[None]}
        return {"logits": chain.run_segments(feeds)["logits"]}

    secret = args.secret or os.environ.get("EETOOL_SECRET")
    if not 0 <= args.port < 65536:
        raise ValueError("--port %d: ports are 0-65535" % args.port)
    server = EdgeServer(tail, expected, host=args.host, port=args.port, secret=secret,
                        max_connections=args.max_connections, idle_timeout_s=args.idle_timeout)
    host, port = server.address
    what = "whole model, input files" if args.input_file else ("whole model" if args.whole_model else "tail")
    print("eetool server: %s %s (%s/%s) on %s:%d" % (bundle.root, what,
                                                     fmt, precision, host, port), flush=True)
    run_until_signal(server)
    return 0


def make_runner(args, bundle: Bundle, board: Optional[dict]):
    """A DeviceRunner (and its client) from the ``run``/``bench`` options."""
    from .boards import allow_spinning
    from .client import EdgeClient
    from .device import DeviceRunner
    from .link import LinkShaper

    fmt = pick_backend(bundle, args.backend, board)
    precision = pick_precision(bundle, fmt, args.precision)
    client = None
    if args.server:
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("--server %r: expected HOST:PORT, e.g. 192.168.1.20:8470" % args.server)
        shaper = LinkShaper.from_strings(args.bandwidth, args.rtt) if args.bandwidth else None
        client = EdgeClient(host or "127.0.0.1", int(port), secret=args.secret or os.environ.get("EETOOL_SECRET"),
                            timeout_s=args.timeout, shaper=shaper, codec=args.codec)
    thresholds = {}
    for item in args.threshold or []:
        name, _, value = item.partition("=")
        try:
            thresholds[name] = float(value)
        except ValueError:
            raise ValueError("--threshold %r: expected EXIT=VALUE with VALUE in [0, 1], e.g. exit0=0.8" % item)
    runner = DeviceRunner(bundle, client, fmt, precision, _threads(args, board), thresholds,
                          exits=not args.no_exits, wire_dtype=args.wire_dtype, local_tail=args.local_tail,
                          allow_spinning=allow_spinning(board, args.spinning))
    return runner, fmt, precision


def cmd_run(args) -> int:
    from .boards import board_mismatch
    from .preprocess import load_inputs

    bundle = Bundle.load(args.bundle)
    board = _board(args.board)
    why = board_mismatch(board) if board else None
    if why:  # run only takes threads and the backend from the profile: say so, do not refuse
        print("warning: %s; its settings (threads, backend) are used as given" % why, file=sys.stderr)
    runner, fmt, precision = make_runner(args, bundle, board)
    results = []
    for path in args.inputs:
        batch = check_input(load_inputs([path], bundle.manifest["preprocess"]), bundle, path)
        for i in range(len(batch)):  # the device handles one sample at a time (exits decide per sample)
            r = runner.infer(batch[i:i + 1])
            name = os.path.basename(path) + ("[%d]" % i if len(batch) > 1 else "")
            results.append(dict(input=name, **r.to_json()))
    info = {"machine": platform.machine(), "python": platform.python_version(), "backend": fmt,
            "precision": precision, "board": args.board, "results": results}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("%s, Python %s, %s/%s" % (info["machine"], info["python"], fmt, precision))
        for r in results:
            where = r["exit"] if r["exit"] else r["where"]
            total = sum(r["ms"].values())
            print("%-32s top1 %4d  via %-8s  %7d B sent  %8.2f ms%s" % (
                r["input"], r["top1"], where, r["bytes_sent"], total, "  (%s)" % r["error"] if "error" in r else ""))
    return 0


def check_input(x, bundle: Bundle, source: str):
    """Refuse inputs that do not match the manifest's input ``(N, C, H, W)`` or hold NaN/Inf."""
    import numpy as np

    want = bundle.manifest["input"].get("shape")
    if want and list(x.shape[1:]) != [d for d in want[1:]]:
        raise ValueError("%s: input shape %s, the bundle expects (N, %s)" % (
            source, tuple(x.shape), ", ".join(str(d) for d in want[1:])))
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise ValueError("%s: %d of %d samples contain NaN/Inf" % (source, int(bad.sum()), len(x)))
    return x


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def cmd_report(args) -> int:
    from .report import run

    return run(args)


def _bandwidth(text: str) -> str:
    """argparse type: a bandwidth in the one grammar (runtime.link.parse_bandwidth), refused at parse time."""
    from .link import parse_bandwidth

    try:
        parse_bandwidth(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def _bandwidths(text: str) -> str:
    """argparse type: a comma-separated list of bandwidths ("" = none)."""
    from .link import parse_bandwidths

    try:
        if text.strip():
            parse_bandwidths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def _common(p):
    p.add_argument("bundle")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "tflite"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"])
    p.add_argument("--threads", type=int, help="intra-op threads (default: board profile / backend default)")
    p.add_argument("--spinning", choices=["on", "off"],
                   help="onnxruntime worker threads spin-wait between inferences (on) or sleep (off); default: "
                        "the board profile's backend.allow_spinning (off on every board) for run / bench, "
                        "onnxruntime's default (on) for serve")
    p.add_argument("--secret", help="shared secret for HMAC frame authentication (or $EETOOL_SECRET)")


def _device_opts(p):
    p.add_argument("--board", help="board profile name (boards/*.json) or path")
    p.add_argument("--codec", default="zstd", choices=["zstd", "lz4", "none"])
    p.add_argument("--wire-dtype", default="int8", choices=["int8", "float32"],
                   help="send the split tensor int8-quantised (default) or as float32")
    p.add_argument("--bandwidth", type=_bandwidth,
                   help="emulate a link (token bucket on the send path): b = bit, B = byte, k/M/G decimal, /s or "
                        "ps optional, e.g. 10mbit, 10Mb/s, 500kB/s; a bare number is Mbit/s")
    p.add_argument("--rtt", default="0ms", help="emulated round-trip time, e.g. 20ms")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")
    p.add_argument("--threshold", action="append", metavar="EXIT=VALUE", help="override an exit threshold")
    p.add_argument("--no-exits", action="store_true", help="disable early exits")
    p.add_argument("--local-tail", action="store_true", help="load the tail too, to fall back on offline")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime", description="eetool runtime (device and edge server)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="run the tail graphs as an edge server")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--max-connections", type=int, default=64, help="concurrent connections served")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds an idle connection is kept")
    p.add_argument("--whole-model", action="store_true",
                   help="run the whole model on the server (edge computing: the device sends its input)")
    p.add_argument("--input-file", action="store_true",
                   help="with --whole-model: take the input image file's bytes (tensor 'file', uint8, 1-D: JPEG, "
                        "PNG, ...) and decode + preprocess it on the server as the manifest says")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("run", help="run inputs on the device side")
    _common(p)
    _device_opts(p)
    p.add_argument("--server", help="HOST:PORT of the edge server")
    p.add_argument("--json", action="store_true")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("bench", help="measure latency per stage, bytes and energy; write a report")
    _common(p)
    _device_opts(p)
    p.add_argument("--server", help="HOST:PORT of a running edge server (default: start one on loopback)")
    p.add_argument("--inputs", nargs="*", help="input files or folders of images (default: the bundle's samples/); "
                                               "labels from synsets.txt / labels.txt beside them give accuracy")
    p.add_argument("--max-inputs", type=int, help="keep this many inputs, spread evenly over those given")
    p.add_argument("--include-calibration", action="store_true",
                   help="also measure on inputs the bundle was calibrated on (left out by default)")
    p.add_argument("--no-layer-profile", action="store_true",
                   help="skip the per-layer latency profile (layers.json, for 'eetool plan --measurements')")
    p.add_argument("--profile-runs", type=int, default=20, help="profiled runs of the whole model")
    p.add_argument("--repeat", type=int, default=3, help="passes over the inputs after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bandwidths", type=_bandwidths, default="1mbit,10mbit,100mbit",
                   help="emulated links for latency vs bandwidth, comma-separated, as --bandwidth ('' = none)")
    p.add_argument("--energy-csv", help="power log (timestamp,watts) of an external USB meter")
    p.add_argument("--energy-rails", metavar="RAIL[,RAIL...]",
                   help="sensor rails to sum for energy (Jetson INA3221, e.g. VDD_CPU_CV,VDD_GPU_SOC; Pi 5 PMIC), "
                        "'sum' for every readable rail; default: the total-input rail when there is one, else the "
                        "sum of the readable rails (unreadable channels are left out and named in the report)")
    p.add_argument("--force-board", action="store_true",
                   help="measure under --board even though this machine does not look like that board "
                        "(architecture / CPU / board model differ)")
    p.add_argument("--out", default="bench-report", help="report directory")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the LC / EC / SC / SC+EE comparison (it starts a second, whole-model server)")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("report", help="one Markdown page from bench report folders and plan JSONs")
    from .report import add_arguments

    add_arguments(p)
    p.set_defaults(fn=cmd_report)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (BundleError, ValueError, OSError, RuntimeError) as e:
        hint = ""
        if isinstance(e, RuntimeError) and "server unavailable" in str(e):
            hint = " (start 'python -m runtime serve' on the edge server, or pass --local-tail)"
        print("error: %s%s" % (e, hint), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

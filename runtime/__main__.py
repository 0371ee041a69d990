"""Runtime command line, for boards and edge servers that have only the runtime installed:

    python -m runtime serve BUNDLE [--host 127.0.0.1] [--port 8470] [--secret S] [--workers N] [--device cuda]
    python -m runtime loadtest BUNDLE [--server HOST:PORT] [--clients 1,8,32,64] [--duration S] [--json]
    python -m runtime run   BUNDLE --server HOST:PORT [--json] INPUT...
    python -m runtime bench BUNDLE [--board rpi4] [--server HOST:PORT] [--out DIR]

(argparse only: a board may not have click.) This module only parses arguments; the work is done by
:mod:`runtime.session` (backends, threads, runners, servers) and :mod:`runtime.bench`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

from . import session as S
from .bundle import Bundle, BundleError


def device_options(args) -> S.DeviceOptions:
    """The ``run`` / ``bench`` arguments as :class:`runtime.session.DeviceOptions`."""
    return S.DeviceOptions(backend=args.backend, precision=args.precision, threads=args.threads,
                           spinning=args.spinning, server=args.server, secret=args.secret, timeout_s=args.timeout,
                           codec=args.codec, bandwidth=args.bandwidth, rtt=args.rtt,
                           thresholds=S.parse_thresholds(args.threshold), exits=not args.no_exits,
                           wire_dtype=args.wire_dtype, local_tail=args.local_tail, gates=S.parse_gates(args.gate),
                           predictor=not args.no_predictor, adaptive=args.adaptive,
                           assume_bandwidth=args.assume_bandwidth)


def server_options(args) -> S.ServerOptions:
    """The ``serve`` arguments as :class:`runtime.session.ServerOptions`."""
    return S.ServerOptions(
        backend=args.backend, precision=args.precision, threads=args.threads, spinning=args.spinning,
        host=args.host, port=args.port, secret=args.secret, max_connections=args.max_connections,
        idle_timeout_s=args.idle_timeout, whole_model=args.whole_model, input_file=args.input_file,
        batching=not args.no_batching, workers=args.workers, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, device=args.device, provider=args.provider)


def cmd_serve(args) -> int:
    """Serve until SIGINT / SIGTERM. stdout: ``eetool server: ... on HOST:PORT`` first, then one line per
    default chosen (with its reason) and ``plan {json}`` (scripts read these)."""
    from .server import run_until_signal

    bundle = Bundle.load(args.bundle)
    opts = server_options(args)
    if args.engine == "ray":
        from .ray_engine import serve_ray

        return serve_ray(args, bundle, opts)
    server, fmt, precision, what, plan = S.make_server(bundle, opts)
    host, port = server.address
    print("eetool server: %s %s (%s/%s) on %s:%d" % (bundle.root, what, fmt, precision, host, port), flush=True)
    if not opts.batching:
        print("  batching off: each request runs alone in its connection's thread through one session (spinning %s)"
              % {None: "onnxruntime's default", True: "on", False: "off"}[plan.allow_spinning], flush=True)
    for line in plan.reasons:
        print("  " + line, flush=True)
    print("plan " + json.dumps(dict(plan.to_json(), **server.describe()), sort_keys=True), flush=True)
    run_until_signal(server)
    return 0


def cmd_run(args) -> int:
    from .boards import board_mismatch

    bundle = Bundle.load(args.bundle)
    board = S.board_profile(args.board)
    why = board_mismatch(board) if board else None
    if why:  # run only takes threads and the backend from the profile: say so, do not refuse
        print("warning: %s; its settings (threads, backend) are used as given" % why, file=sys.stderr)
    runner, fmt, precision = S.make_runner(bundle, board, device_options(args))
    schedule = None
    if args.bandwidth_schedule:
        from .link import parse_schedule

        schedule = parse_schedule(args.bandwidth_schedule)
    shaper = getattr(runner.client, "shaper", None)
    results = []
    for name, r in S.run_files(runner, bundle, args.inputs, schedule):
        results.append(dict(input=name, **r.to_json()))
        if shaper is not None:
            results[-1]["emulated_mbps"] = shaper.bandwidth_mbps
    info = {"machine": platform.machine(), "python": platform.python_version(), "backend": fmt,
            "precision": precision, "board": args.board, "results": results}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print("%s, Python %s, %s/%s" % (info["machine"], info["python"], fmt, precision))
        for r in results:
            where = r["exit"] if r["exit"] else r["where"]
            total = sum(r["ms"].values())
            adapt = ""
            if "bandwidth_estimate_mbps" in r:
                adapt = "  at %.2f Mbit/s: thresholds %s" % (r["bandwidth_estimate_mbps"], ", ".join(
                    "%s %s" % (k, "off" if v is None else "%.3f" % v) for k, v in r["thresholds"].items()))
            print("%-32s top1 %4d  via %-8s  %7d B sent  %8.2f ms%s%s" % (
                r["input"], r["top1"], where, r["bytes_sent"], total, adapt,
                "  (%s)" % r["error"] if "error" in r else ""))
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchOptions, run_bench

    return run_bench(args.bundle, device_options(args), BenchOptions(
        board=args.board, inputs=args.inputs, max_inputs=args.max_inputs,
        include_calibration=args.include_calibration, layer_profile=not args.no_layer_profile,
        profile_runs=args.profile_runs, repeat=args.repeat, warmup=args.warmup, bandwidths=args.bandwidths,
        energy_csv=args.energy_csv, energy_rails=args.energy_rails, force_board=args.force_board, out=args.out,
        compare=not args.no_compare, adaptive_schedule=args.adaptive_schedule))


def cmd_loadtest(args) -> int:
    from .loadtest import run_loadtest

    return run_loadtest(args)


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
                        "for serve: off with several batching workers (they share the cores), else onnxruntime's "
                        "default (on)")
    p.add_argument("--secret", help="shared secret for HMAC frame authentication (or $EETOOL_SECRET)")


def _device_opts(p):
    p.add_argument("--board", help="board profile name (boards/*.json) or path")
    p.add_argument("--codec", choices=["zstd", "lz4", "brotli", "none"],
                   help="entropy coder for the split tensor (default: the bundle's, from export --wire-codec)")
    p.add_argument("--wire-dtype", default="int8", choices=["int8", "float32"],
                   help="send the split tensor quantised as the manifest says (int8 or n-bit codes; default) "
                        "or as float32")
    p.add_argument("--bandwidth", type=_bandwidth,
                   help="emulate a link (token bucket on the send path): b = bit, B = byte, k/M/G decimal, /s or "
                        "ps optional, e.g. 10mbit, 10Mb/s, 500kB/s; a bare number is Mbit/s")
    p.add_argument("--rtt", default="0ms", help="emulated round-trip time, e.g. 20ms")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")
    p.add_argument("--threshold", action="append", metavar="EXIT=VALUE", help="override an exit threshold")
    p.add_argument("--no-exits", action="store_true", help="disable early exits")
    p.add_argument("--local-tail", action="store_true", help="load the tail too, to fall back on offline")
    p.add_argument("--gate", action="append", metavar="EXIT=VALUE",
                   help="override the Exit Predictor's prediction threshold of an exit (off: not gated)")
    p.add_argument("--no-predictor", action="store_true", help="do not run the Exit Predictor")
    p.add_argument("--adaptive", action="store_true",
                   help="latency-aware thresholds: the manifest's regression at the bandwidth measured from this "
                        "device's own transfers (pings when idle); each result records the estimate and thresholds")
    p.add_argument("--assume-bandwidth", type=_bandwidth,
                   help="with --adaptive: take the thresholds for this bandwidth instead of measuring it")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime", description="eetool runtime (device and edge server)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="run the tail graphs as an edge server")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--max-connections", type=int, default=256, help="concurrent connections served (devices)")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds an idle connection is kept")
    p.add_argument("--workers", type=int, help="batching workers, each with its own session (default: from the machine)")
    p.add_argument("--max-batch", type=int, help="most samples in one batch (default: measured at start-up)")
    p.add_argument("--max-wait-ms", type=float, help="longest a batch waits for more requests (default: half the "
                                                      "batch-1 tail time; a lone device never waits)")
    p.add_argument("--max-queue", type=int, help="requests waiting beyond which the server answers busy "
                                                 "(default: 2 x max-batch x workers)")
    p.add_argument("--no-batching", action="store_true",
                   help="run each request alone in its connection's thread through one session (no queue)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="run the tail on the CPU or on a GPU (onnxruntime-gpu's CUDA provider, TensorRT's where installed)")
    p.add_argument("--provider", help="an onnxruntime execution provider by name, e.g. CUDAExecutionProvider")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: batching workers in this process; ray: a Ray Serve deployment (pip install eetool[ray])")
    p.add_argument("--replicas", type=int, default=2, help="--engine ray: replicas of the tail deployment")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: cluster to join (default: $RAY_ADDRESS, a running 'ray start' cluster, or a "
                        "local one); 'local': always a new instance on this machine, bound to 127.0.0.1")
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
    p.add_argument("--bandwidth-schedule", metavar="RATE:N,...",
                   help="change the emulated link during the run: RATE:REQUESTS phases in turn, e.g. "
                        "1mbit:50,20mbit:50 (needs --server and --bandwidth)")
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
    p.add_argument("--adaptive-schedule", default="1mbit:60,20mbit:60,5mbit:60",
                   help="with latency-aware thresholds in the bundle: RATE:REQUESTS phases of the emulated link for one "
                        "adaptive run against the server ('' = skip)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the LC / EC / SC / SC+EE comparison (it starts a second, whole-model server)")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("loadtest", help="many client processes against an edge server, every reply checked; "
                                        "the bare-session ceiling in the same run")
    from .loadtest import add_arguments as loadtest_arguments

    loadtest_arguments(p)
    p.set_defaults(fn=cmd_loadtest)
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
        if isinstance(e, RuntimeError) and ("auth_required" in str(e) or "bad_hmac" in str(e)):
            # the server is up: the frames' HMAC secrets differ (one side has none, or another one)
            hint = " (the server answered: give this device the edge server's --secret, the same on both sides)"
        elif isinstance(e, RuntimeError) and "server unavailable" in str(e):
            hint = " (start 'python -m runtime serve' on the edge server, or pass --local-tail)"
        print("error: %s%s" % (e, hint), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

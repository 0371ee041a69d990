"""The runtime as a library: backend and precision choice, thread defaults, and the creation of device
runners and edge servers from explicit options. ``python -m runtime`` (runtime/__main__.py) only parses its
arguments into these options and calls in here; ``runtime bench`` (and any other tool) calls the same
functions with the same options, so every entry point picks backends and threads the same way. (The split
follows optimum's exporters, where the command line unpacks its arguments into keyword arguments of one
library function, ``main_export``.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import Bundle, BundleError

__all__ = ["DeviceOptions", "ServerOptions", "board_profile", "check_input", "make_runner", "make_server",
           "parse_gates", "parse_server_address", "parse_thresholds", "pick_backend", "pick_precision", "run_files",
           "runtime_threads", "server_inputs"]


def board_profile(name: Optional[str]) -> Optional[dict]:
    """The board profile ``name`` (boards/NAME.json or a path), or None for no name. Raises BoardError."""
    if not name:
        return None
    from .boards import load_board

    return load_board(name)


def pick_backend(bundle: Bundle, backend: str = "auto", board: Optional[dict] = None) -> str:
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


def pick_precision(bundle: Bundle, fmt: str, precision: str = "auto", side: str = "device") -> str:
    """``auto`` -> int8 when the bundle has int8 graphs in ``fmt``, else fp32; on the server side of an x86
    machine ``auto`` -> fp32: the wire is already int8 and the server has the compute, so int8 tails
    would only add rounding error there (and, without VNNI, run slower than float; runtime/targets.py)."""
    if precision != "auto":
        return precision
    if side == "server":
        from .targets import host_target

        if (host_target() or "").startswith("x86"):
            return "fp32"
    return "int8" if "%s/int8" % fmt in bundle.formats() else "fp32"


def runtime_threads(threads: Optional[int], board: Optional[dict]) -> Optional[int]:
    """Intra-op threads: the asked number, else the board profile's ``backend.threads``, else None (the
    backend's default, one per core)."""
    if threads:
        return threads
    return ((board or {}).get("backend") or {}).get("threads")


def parse_thresholds(items: Optional[Sequence[str]]) -> Dict[str, float]:
    """``["exit0=0.8", ...]`` (``--threshold``) -> ``{"exit0": 0.8}``. Raises ValueError for a bad item."""
    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError("--threshold %r: expected EXIT=VALUE with VALUE in [0, 1], e.g. exit0=0.8" % item)
    return out


def parse_server_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` -> (host, port). Raises ValueError with an example."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("--server %r: expected HOST:PORT, e.g. 192.168.1.20:8470" % text)
    return host, int(port)


@dataclass
class DeviceOptions:
    """How the device side runs (``runtime run`` / ``runtime bench`` options, units in the names).

    ``spinning``: ``on`` / ``off`` for onnxruntime's worker threads spin-waiting (None: the board
    profile's ``backend.allow_spinning``); ``server``: ``HOST:PORT`` of the edge server (None: no server;
    exits or ``local_tail`` decide); ``bandwidth`` / ``rtt``: emulated link (``10mbit`` or Mbit/s,
    ``20ms``); ``thresholds``: per-exit overrides; ``exits=False`` disables early exits; ``wire_dtype``:
    ``int8`` (quantised as the manifest says: int8 or n-bit codes) or ``float32`` on the wire; ``codec``: the
    entropy coder (None: the bundle's, :func:`runtime.device.wire_codec`); ``gates``: per-exit overrides of
    the Exit Predictor's prediction thresholds (None: not gated); ``predictor=False``: do not run it;
    ``adaptive``: latency-aware thresholds from the manifest's regression at the bandwidth measured from the
    runner's own transfers, or at ``assume_bandwidth`` when given."""

    backend: str = "auto"
    precision: str = "auto"
    threads: Optional[int] = None
    spinning: Optional[str] = None
    server: Optional[str] = None
    secret: Optional[str] = None
    timeout_s: float = 5.0
    codec: Optional[str] = None
    bandwidth: Optional[Union[str, float]] = None
    rtt: str = "0ms"
    thresholds: Dict[str, float] = field(default_factory=dict)
    exits: bool = True
    wire_dtype: str = "int8"
    local_tail: bool = False
    gates: Dict[str, Optional[float]] = field(default_factory=dict)
    predictor: bool = True
    adaptive: bool = False
    assume_bandwidth: Optional[Union[str, float]] = None


def make_runner(bundle: Bundle, board: Optional[dict], opts: DeviceOptions):
    """A :class:`runtime.device.DeviceRunner` (with its :class:`runtime.client.EdgeClient` when
    ``opts.server`` is set) and the ``(runner, fmt, precision)`` it runs. Raises BundleError / ValueError."""
    from .boards import allow_spinning
    from .client import EdgeClient
    from .device import DeviceRunner, wire_codec
    from .link import LinkShaper

    fmt = pick_backend(bundle, opts.backend, board)
    precision = pick_precision(bundle, fmt, opts.precision)
    client = None
    if opts.server:
        host, port = parse_server_address(opts.server)
        shaper = LinkShaper.from_strings(opts.bandwidth, opts.rtt) if opts.bandwidth else None
        client = EdgeClient(host, port, secret=opts.secret or os.environ.get("EETOOL_SECRET"),
                            timeout_s=opts.timeout_s, shaper=shaper, codec=opts.codec or wire_codec(bundle))
    from .link import parse_bandwidth

    runner = DeviceRunner(bundle, client, fmt, precision, runtime_threads(opts.threads, board), opts.thresholds,
                          exits=opts.exits, wire_dtype=opts.wire_dtype, local_tail=opts.local_tail,
                          allow_spinning=allow_spinning(board, opts.spinning), gates=opts.gates or None,
                          predictor=opts.predictor, adaptive=opts.adaptive,
                          bandwidth_mbps=parse_bandwidth(opts.assume_bandwidth) if opts.assume_bandwidth else None)
    return runner, fmt, precision


def parse_gates(items: Optional[Sequence[str]]) -> Dict[str, Optional[float]]:
    """``["exit0=0.4", "exit1=off"]`` (``--gate``) -> ``{"exit0": 0.4, "exit1": None}``. Raises ValueError."""
    out = {}  # type: Dict[str, Optional[float]]
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            out[name] = None if value in ("off", "none") else float(value)
        except ValueError:
            raise ValueError("--gate %r: expected EXIT=VALUE with VALUE in [0, 1] or off, e.g. exit0=0.4" % item)
    return out


@dataclass
class ServerOptions:
    """How the edge server runs (``runtime serve`` options). ``whole_model``: edge computing (EC), the
    device offloads its input and the server runs every segment; ``input_file``: with ``whole_model``, the
    request carries the input image file's bytes, decoded and preprocessed on the server; ``spinning``:
    ``on`` / ``off`` (None: off with several batching workers, else onnxruntime's default, on).
    ``workers``, ``threads``, ``max_batch``, ``max_wait_ms``, ``max_queue``: dynamic batching (None: chosen
    from the machine, see :mod:`runtime.serving`); ``batching=False``: each request alone through one
    session; ``device`` / ``provider``: onnxruntime execution providers (:mod:`runtime.providers`)."""

    backend: str = "auto"
    precision: str = "auto"
    threads: Optional[int] = None
    spinning: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8470
    secret: Optional[str] = None
    max_connections: int = 256
    idle_timeout_s: float = 60.0
    whole_model: bool = False
    input_file: bool = False
    batching: bool = True
    workers: Optional[int] = None
    max_batch: Optional[int] = None
    max_wait_ms: Optional[float] = None
    max_queue: Optional[int] = None
    device: str = "cpu"
    provider: Optional[str] = None


def server_inputs(bundle: Bundle, opts: ServerOptions):
    """``(fmt, precision, expected inputs, what)`` of the server ``opts`` describe. Raises BundleError /
    ValueError."""
    from .serving import tail_inputs

    if not bundle.server_segments:
        raise BundleError("the bundle has no server segments: the whole model runs on the device")
    if opts.input_file and not opts.whole_model:
        raise ValueError("--input-file needs --whole-model (the server then decodes and runs everything)")
    if not 0 <= opts.port < 65536:
        raise ValueError("--port %d: ports are 0-65535" % opts.port)
    fmt = pick_backend(bundle, opts.backend, None)
    precision = pick_precision(bundle, fmt, opts.precision, side="server")
    what = "whole model, input files" if opts.input_file else ("whole model" if opts.whole_model else "tail")
    return fmt, precision, tail_inputs(bundle, opts.whole_model, opts.input_file), what


def make_server(bundle: Bundle, opts: ServerOptions):
    """An :class:`runtime.server.EdgeServer` running the bundle's tail (or, with ``whole_model``, every
    segment) on batching workers, bound and ready for :func:`runtime.server.run_until_signal`. Returns
    ``(server, fmt, precision, what, plan)``, ``plan`` a :class:`runtime.serving.ServePlan` (what was chosen
    and why). Raises BundleError (no server segments, missing graphs), ValueError (options) or
    runtime.providers.ProviderError (a device that cannot run here)."""
    from .serving import build_workers, probe_sample
    from .server import EdgeServer

    fmt, precision, expected, what = server_inputs(bundle, opts)
    m = bundle.manifest
    one = not opts.batching
    chains, plan = build_workers(bundle, "all" if opts.whole_model else "server", fmt, precision,
                                 1 if one else opts.workers, opts.threads, 1 if one else opts.max_batch,
                                 0.0 if one else opts.max_wait_ms, 1 if one else opts.max_queue,
                                 None if opts.spinning is None else opts.spinning == "on", opts.device, opts.provider,
                                 probe_sample(bundle, opts.whole_model))
    prepare = None
    if opts.input_file:
        from .preprocess import decode_image
        from .protocol import FILE_TENSOR

        def prepare(feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
            # EC as usually deployed: the device sends its image file as it is; the server decodes it, in the
            # request's own thread, in parallel with the batches
            return {m.input.name: decode_image(feeds[FILE_TENSOR], m.preprocess, "request file")[None]}

    def make_tail(chain):
        return lambda feeds: {"logits": chain.run_segments(feeds)[m.output.name]}  # "logits": the reply's key

    tails = [make_tail(c) for c in chains]
    server = EdgeServer(tails[0] if one else tails, expected, host=opts.host, port=opts.port,
                        secret=opts.secret or os.environ.get("EETOOL_SECRET"),
                        max_connections=opts.max_connections, idle_timeout_s=opts.idle_timeout_s, batching=not one,
                        max_batch=plan.max_batch, max_wait_ms=plan.max_wait_ms, max_queue=plan.max_queue,
                        prepare=prepare)
    return server, fmt, precision, what, plan


def run_files(runner, bundle: Bundle, paths: Sequence[str], schedule: Optional[Sequence[Tuple[float, int]]] = None
              ) -> List[Tuple[str, object]]:
    """Preprocess each input file (image, or ``.npy`` in model layout) as the manifest says, check it
    (:func:`check_input`) and run it through ``runner`` one sample at a time (exits decide per sample).
    ``schedule`` (``[(Mbit/s, requests), ...]``, :func:`runtime.link.parse_schedule`) changes the emulated
    link during the run, phase after phase, repeating. Returns ``[(name, runtime.device.Result)]``; a file
    holding N samples gives ``name[0] .. name[N-1]``. Raises ValueError for a schedule without a link."""
    from .preprocess import load_inputs

    shaper = getattr(runner.client, "shaper", None) if runner.client is not None else None
    if schedule and shaper is None:
        raise ValueError("a bandwidth schedule needs --server and an emulated link (--bandwidth)")
    steps = [bw for bw, n in schedule or [] for _ in range(n)]
    out = []
    for path in paths:
        batch = check_input(load_inputs([path], bundle.manifest.preprocess), bundle, path)
        for i in range(len(batch)):
            if steps:
                shaper.set_bandwidth(steps[len(out) % len(steps)])
            name = os.path.basename(path) + ("[%d]" % i if len(batch) > 1 else "")
            out.append((name, runner.infer(batch[i:i + 1])))
    return out


def check_input(x: np.ndarray, bundle: Bundle, source: str) -> np.ndarray:
    """Refuse inputs ``x`` (float32 ``(N, C, H, W)``) that do not match the manifest's input shape or hold
    NaN/Inf; returns ``x``. Raises ValueError naming ``source``."""
    want = bundle.manifest.input.shape
    if want and list(x.shape[1:]) != [d for d in want[1:]]:
        raise ValueError("%s: input shape %s, the bundle expects (N, %s)" % (
            source, tuple(x.shape), ", ".join(str(d) for d in want[1:])))
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise ValueError("%s: %d of %d samples contain NaN/Inf" % (source, int(bad.sum()), len(x)))
    return x

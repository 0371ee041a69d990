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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import session as S
from .bundle import Bundle
from .device import percentiles, wire_codec


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


@dataclass
class BenchOptions:
    """What ``runtime bench`` measures (its options besides the device ones in
    :class:`runtime.session.DeviceOptions`): ``inputs`` (files or folders; None: the bundle's samples/),
    ``max_inputs`` spread evenly, ``repeat`` passes after ``warmup``, ``bandwidths`` emulated for the
    sweep (``"1mbit,10mbit"``), the per-layer profile (``profile_runs`` runs), the LC / EC / SC comparison
    (``compare``), an external power log ``energy_csv``, the sensor rails ``energy_rails``, ``force_board``
    to measure under a board name this machine does not match, the report folder ``out``, and (for a bundle
    with latency-aware thresholds) ``adaptive_schedule``: the emulated link's phases of one adaptive run,
    ``RATE:REQUESTS,...`` ("" to skip)."""

    board: Optional[str] = None
    inputs: Optional[List[str]] = None
    max_inputs: Optional[int] = None
    include_calibration: bool = False
    layer_profile: bool = True
    profile_runs: int = 20
    repeat: int = 3
    warmup: int = 3
    bandwidths: str = "1mbit,10mbit,100mbit"
    energy_csv: Optional[str] = None
    energy_rails: Optional[str] = None
    force_board: bool = False
    out: str = "bench-report"
    compare: bool = True
    adaptive_schedule: str = "1mbit:60,20mbit:60,5mbit:60"


#: files a bench run writes into --out (removed first, so none can be left over from an earlier run)
OUTPUTS = ("report.json", "report.md", "layers.json", "latency_breakdown.png", "latency_vs_bandwidth.png",
           "comparison.png")


def select_inputs(opts: BenchOptions, bundle: Bundle) -> tuple:
    """The input files to measure on, and a note on how they were chosen: ``--inputs`` (files or folders
    of images) or the bundle's ``samples/``; files the bundle was calibrated on are left out (unless
    ``--include-calibration``) so accuracy is not measured on calibration data; ``--max-inputs N`` keeps
    N spread evenly over the rest. Raises ValueError when nothing is left."""
    from .preprocess import IMAGE_SUFFIXES, list_images

    if opts.inputs:
        files: List[str] = []
        for a in opts.inputs:
            files.extend(str(f) for f in list_images(a)) if Path(a).is_dir() else files.append(str(a))
        files = list(dict.fromkeys(files))  # a file named twice is measured once
        where = ", ".join(opts.inputs)
        if not files:
            raise ValueError("--inputs %s: no image files there (%s)" % (where, ", ".join(sorted(IMAGE_SUFFIXES))))
    else:
        samples = bundle.root / "samples"
        files = [str(p) for p in list_images(samples)] if samples.is_dir() else []
        where = "the bundle's samples/"
        if not files:
            raise ValueError("the bundle has no samples/ to measure on: give --inputs FILE_OR_FOLDER...")
    calib = set(bundle.manifest.calibration_names)
    kept = files if opts.include_calibration else [f for f in files if Path(f).name not in calib]
    note = "%d inputs from %s" % (len(kept), where)
    if not kept and not opts.inputs:
        # exported from a source too small to hold anything else (e.g. 'samples', 5 photos): measure on
        # them anyway, and say that accuracy on them is optimistic
        kept = files
        note = "%d inputs from %s, all of them calibration samples (the export had no others): accuracy on " \
               "them is optimistic" % (len(kept), where)
    elif not kept:
        raise ValueError("all %d inputs are calibration samples of this bundle; give other inputs or "
                         "--include-calibration" % len(files))
    elif len(kept) < len(files):
        n = len(files) - len(kept)
        note += " (%d calibration sample%s left out, matched by file name)" % (n, "" if n == 1 else "s")
    if opts.max_inputs and len(kept) > opts.max_inputs:
        idx = np.unique(np.linspace(0, len(kept) - 1, opts.max_inputs).round().astype(int))
        kept = [kept[i] for i in idx]
        note += ", %d spread evenly over them" % len(kept)
    return kept, note


def timed(fn, clock=time.perf_counter, cpu_clock=time.process_time):
    """Run ``fn()`` and return ``(its result, wall seconds, CPU seconds)``. CPU time is the whole process's
    (``time.process_time``: user + system time of every thread, onnxruntime's workers included, and the
    energy meter's sampling thread when one runs), so a worker spin-waiting between inferences shows up
    here and not in the latency."""
    t0, c0 = clock(), cpu_clock()
    out = fn()
    return out, clock() - t0, cpu_clock() - c0


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
    total = stages.pop("total")  # last, whatever order the stages first appeared in
    return {**{k: percentiles(v) for k, v in stages.items()}, "total": percentiles(total)}


def interleaved_pairs(run_a, run_b, items, repeat: int, warmup: int = 1, clock=time.perf_counter) -> List[tuple]:
    """Time ``run_a(x)`` and ``run_b(x)`` back to back on every item of ``items``, ``repeat`` passes, after
    ``warmup`` untimed passes of both: one pair per item and pass, A then B in even pairs and B then A in
    odd ones (AB BA AB ...), so neither side always runs first (warm caches, threads just woken, clock
    boost). Returns ``[(a_ms, b_ms), ...]`` in the order measured."""
    for _ in range(warmup):
        for x in items:
            run_a(x)
            run_b(x)
    pairs = []
    for _ in range(repeat):
        for x in items:
            ms = [0.0, 0.0]
            for side in ((0, 1) if len(pairs) % 2 == 0 else (1, 0)):
                t0 = clock()
                (run_a if side == 0 else run_b)(x)
                ms[side] = (clock() - t0) * 1e3
            pairs.append((ms[0], ms[1]))
    return pairs


def ratio_summary(pairs: List[tuple]) -> Dict[str, float]:
    """Per-pair ratios a/b of :func:`interleaved_pairs`: their median and interquartile range (the spread
    the noise leaves), next to each side's median ms."""
    ratios = [a / b for a, b in pairs if b > 0]
    q1, med, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    return {"pairs": len(pairs), "ratio_median": med, "ratio_iqr": [q1, q3],
            "a_p50_ms": float(np.median([a for a, _ in pairs])), "b_p50_ms": float(np.median([b for _, b in pairs]))}


def runtime_overhead(bundle: Bundle, xs, threads, repeat: int, warmup: int = 1, allow_spinning=None) -> Dict:
    """The runtime's overhead on the whole model (every segment, float ONNX): its :class:`Chain` against
    bare onnxruntime sessions of the same graphs with the same session options (threads, spinning; see
    :func:`runtime.backends.session_options`), warmed up alike and timed interleaved on the same inputs
    (:func:`interleaved_pairs`). The ratio chain / bare is taken per pair and summarised by its median and
    IQR (:func:`ratio_summary`); the chain does everything the bare sessions do and more, so a ratio below
    1 beyond the IQR means the measurement is unfair, and the report says so."""
    from .backends import ort_session, session_options
    from .chain import Chain

    chain = Chain(bundle, "all", "onnx", "fp32", threads, with_exits=False, allow_spinning=allow_spinning)
    bare = [(s.inputs, ort_session(Path(bundle.graph_path(bundle.graph_key(s, "onnx", "fp32"))),
                                   session_options(threads, allow_spinning))) for s in bundle.segments]
    name = bundle.manifest.input.name

    def run_chain(x):
        chain.run_segments({name: x})

    def run_bare(x):
        values = {name: x}
        for inputs, sess in bare:
            names = [o.name for o in sess.get_outputs()]
            values.update(zip(names, sess.run(names, {n: values[n] for n in inputs})))

    pairs = interleaved_pairs(run_chain, run_bare, xs, repeat, warmup)
    r = ratio_summary(pairs)
    return {"runtime_chain_p50_ms": r["a_p50_ms"], "bare_onnxruntime_p50_ms": r["b_p50_ms"],
            "overhead_ratio": r["ratio_median"], "overhead_ratio_iqr": r["ratio_iqr"], "pairs": r["pairs"],
            "order": "interleaved, A/B order alternating per pair", "warmup_passes": warmup, "threads": threads,
            "allow_spinning": allow_spinning, "pairs_ms": [[round(a, 4), round(b, 4)] for a, b in pairs],
            "below_1_beyond_noise": r["ratio_iqr"][1] < 1.0}


def run_bench(bundle_dir: str, device: S.DeviceOptions, opts: BenchOptions) -> int:
    """Measure the bundle at ``bundle_dir`` with the device options ``device`` (a server is started on
    loopback when ``device.server`` is None) and write the report to ``opts.out``. Returns 0; raises
    ValueError / BundleError / BoardError / OSError for bad options, bundles, boards or inputs."""
    from . import report as R
    from .boards import board_mismatch, check_board, matching_boards
    from .energy import meter_for_board, parse_rails
    from .labels import labels_for
    from .preprocess import load_inputs

    if opts.repeat < 1 or opts.warmup < 0 or opts.profile_runs < 1 or (opts.max_inputs is not None and opts.max_inputs < 1):
        raise ValueError("--repeat, --profile-runs and --max-inputs must be >= 1, --warmup >= 0")
    # before any work: the report must describe the machine that runs it, under its own name
    board = S.board_profile(opts.board or "host")
    name = board["name"]
    if board_mismatch(board):
        own = matching_boards()
        check_board(board, force=opts.force_board, advice=(
            "To measure a %s, run the bench on it: copy the bundle there (scp -r %s USER@BOARD:) and run `make "
            "bench BOARD=%s` in it (or `python -m runtime bench . --board %s`).%s" % (
                name, os.path.abspath(bundle_dir), name, name,
                " To measure this machine, use its own profile: `make bench BOARD=%s` (--board %s)." % (own[0], own[0])
                if own else "")))
    rails = parse_rails(opts.energy_rails)

    def meters(b, **kw):  # every meter of this run reads the rails asked for
        return meter_for_board(b, **(dict(kw, rails=rails) if rails else kw))

    meters(board, **({"csv_path": opts.energy_csv} if opts.energy_csv else {}))  # refuse bad --energy-rails now
    bundle = Bundle.load(bundle_dir)
    files, note = select_inputs(opts, bundle)
    sample_labels = bundle.manifest.samples.labels if bundle.manifest.samples else None
    labels, why = labels_for(files, sample_labels, bundle.root / "samples", explain=True)
    if labels:
        check_labels(labels, files, bundle)
    else:
        note += "; no accuracy: %s" % why
    t0 = time.perf_counter()
    xs = [load_inputs([f], bundle.manifest.preprocess) for f in files]
    preprocess_ms = (time.perf_counter() - t0) * 1e3 / len(files)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # an earlier run's files must not pass for this run's (plan reads layers.json)
        (out / name).unlink(missing_ok=True)
    remote = bool(device.server)
    proc = None
    if not device.server:
        proc, address = start_server(bundle_dir, ["--backend", device.backend, "--precision", "fp32"])
        device = replace(device, server=address)
    try:
        report = _measure(bundle_dir, device, opts, bundle, board, xs, preprocess_ms, meters, files, labels)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    report["inputs_note"] = note
    if opts.force_board:
        report["board_forced"] = board_mismatch(board)  # None when this machine does look like the board
    if report.get("comparison"):
        report["comparison"]["sc_server"] = "%s (%s)" % (device.server, "given" if remote else "started on this machine")
    if opts.layer_profile:
        report["layer_profile"] = layer_profile(opts, bundle, board, xs, files, out,
                                                S.runtime_threads(device.threads, board), device.spinning)
    report["findings"] = R.findings(report)
    R.write(out, report)  # plots first: the report lists the ones written
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(R.render_markdown(report))
    print("report written to %s" % out)
    return 0


def check_labels(labels: List[int], files: List[str], bundle: Bundle) -> None:
    """Refuse ground truth outside the model's classes ``0..C-1`` (C from the manifest's output shape):
    it would only read as a low accuracy. Raises ValueError naming the first such file."""
    classes = bundle.manifest.num_classes
    for f, y in zip(files, labels):
        if y < 0 or (classes and y >= classes):
            raise ValueError("%s: label %d is not a class of this model (0..%s); check its synsets.txt / labels.txt"
                             % (f, y, (classes - 1) if classes else "?"))


def layer_profile(opts: BenchOptions, bundle: Bundle, board: dict, xs, files, out: Path, threads=None,
                  spinning: Optional[str] = None) -> dict:
    """Per-layer latency of the whole model on this board (:func:`runtime.profile_layers.profile_onnx` on
    the bundle's ``profile/model.fp32.onnx``), written to ``out/layers.json`` for ``eetool plan
    --measurements``; a note when the bundle has no profile graph (exported with --no-profile-graph)."""
    from . import profile_layers as P

    spec = bundle.manifest.layer_profile_graph
    if not spec:
        return {"skipped": "the bundle has no layer_profile_graph (exported with --no-profile-graph)"}
    path = bundle.root / spec.file  # checksummed with every other file when the bundle was loaded
    try:
        from .boards import allow_spinning

        prof = P.profile_onnx(path, xs[:8], opts.profile_runs, max(1, opts.warmup), threads,
                              board.get("name", "host"), source_note="runtime bench of %s" % bundle.root.name,
                              allow_spinning=allow_spinning(board, spinning))
    except P.ProfileError as e:  # e.g. a LiteRT-only board without onnxruntime: the rest of the report stands
        return {"skipped": str(e)}
    images = [f for f in files if not str(f).endswith(".npy")][:8]
    if images and bundle.manifest.preprocess.kind == "image":
        prof["preprocess_ms"] = P.preprocess_ms(images, bundle.manifest.preprocess)
    prof["model_source"] = bundle.manifest.model.source  # plan refuses another model's
    P.save_profile(prof, out / "layers.json")
    return {"file": "layers.json", "total_ms": prof["total_ms"], "source": prof["source"],
            "modules": len(prof["cumulative_ms"])}


def _measure(bundle_dir: str, device: S.DeviceOptions, opts: BenchOptions, bundle: Bundle, board: dict, xs,
             preprocess_ms: float, meter_for_board, files=(), labels=None) -> dict:
    from .boards import allow_spinning

    runner, fmt, precision = S.make_runner(bundle, board, device)
    threads = S.runtime_threads(device.threads, board)
    spinning = allow_spinning(board, device.spinning)
    _run_pass(runner, xs[: max(1, opts.warmup)], 1)
    meter = meter_for_board(board, **({"csv_path": opts.energy_csv} if opts.energy_csv else {}))
    idle_w = None
    if not meter.estimated:
        idle_w = meter.measure_idle(1.0)
    meter.start()
    results, wall, cpu = timed(lambda: _run_pass(runner, xs, opts.repeat))
    energy = meter.stop()
    n = len(results)
    report = {
        "bundle": str(bundle.root), "split": bundle.manifest.split, "board": board.get("name"),
        "model": bundle.manifest.model.source,
        "machine": platform.machine(), "python": platform.python_version(), "backend": fmt,
        "precision": precision, "threads": threads, "codec": device.codec or wire_codec(bundle),
        "wire_dtype": device.wire_dtype, "wire": wire_description(bundle, device.wire_dtype),
        "allow_spinning": spinning,
        "requests": n, "inputs": len(xs), "preprocess_ms_mean": preprocess_ms,
        "labelled_inputs": len(labels) if labels else 0,
        "stages_ms": _stage_table(results), "throughput_per_s": n / wall,
        "cpu_ms_per_inference": cpu * 1e3 / n, "cpu_cores_busy": cpu / wall if wall > 0 else None,
        "bytes_sent_mean": float(np.mean([r.bytes_sent for r in results])),
        "bytes_received_mean": float(np.mean([r.bytes_received for r in results])),
        "device_mflops_mean": float(np.mean([device_mflops(bundle, r) for r in results])),
        "exit_rates": _exit_rates(results),
        "energy": {**energy.to_json(), "per_inference_j": energy.joules / n,
                   "idle_w_measured": idle_w, "label": "estimated" if energy.estimated else "measured"},
    }
    if labels:
        report["top1_accuracy"] = accuracy([r.top1 for r in results[-len(xs):]], labels)
    report["bandwidth_sweep"] = _sweep(device, opts, bundle, board, xs)
    report["graph_latency"] = graph_latency(bundle, xs, opts.repeat, allow_spinning=spinning)
    report["input_file_bytes_mean"] = float(np.mean([os.path.getsize(f) for f in files]))
    if opts.compare:
        report["comparison"] = compare_modes(bundle_dir, device, opts, bundle, board, xs, meter_for_board, labels, files)
    if bundle.manifest.latency_adaptation is not None and opts.adaptive_schedule and device.server:
        report["adaptive_link"] = adaptive_link(bundle, device.server, fmt, precision, opts.adaptive_schedule, xs,
                                                labels, threads, device.codec, device.timeout_s)
    if "onnx/fp32" in bundle.formats():
        report["runtime_vs_bare_onnxruntime"] = runtime_overhead(bundle, xs, threads, opts.repeat, max(1, opts.warmup),
                                                                 allow_spinning=spinning)
    return report


def wire_description(bundle: Bundle, wire_dtype: str = "int8") -> str:
    """How the split feature travels, from the manifest: e.g. ``int8 per-tensor`` or ``4-bit per-channel``."""
    if wire_dtype == "float32" or not bundle.server_segments:
        return "float32" if bundle.server_segments else "-"
    q = bundle.tensor(bundle.wire_tensors[0]).quant
    if q is None:
        return "float32"
    if q.bits is not None:
        return "%d-bit %s" % (q.bits, "per-channel" if q.axis is not None else "per-tensor")
    return "%s per-tensor" % q.dtype


def accuracy(top1: List[int], labels: List[int]) -> float:
    """Fraction of ``top1`` equal to ``labels`` (same order and length)."""
    return float(np.mean([int(a) == int(b) for a, b in zip(top1, labels)]))


def device_mflops(bundle: Bundle, result) -> float:
    """MFLOPs the device spent on one request: the segments, exit branches and Exit Predictor it ran (the
    stages timed in ``result.ms``), plus the server segments when it ran the tail itself."""
    spent = sum(s.mflops or 0.0 for s in bundle.segments if s.name in result.ms)
    spent += sum(e.mflops or 0.0 for e in bundle.exits if e.name in result.ms)
    if bundle.predictor is not None and bundle.predictor.name in result.ms:
        spent += bundle.predictor.mflops or 0.0
    if "local_tail" in result.ms:
        spent += sum(s.mflops or 0.0 for s in bundle.server_segments)
    return float(spent)


def _timed_mode(infer, xs, repeat: int, meter, labels=None) -> dict:
    """Run ``infer(x) -> (top1, bytes_sent, device MFLOPs)`` over ``xs`` after one warm-up pass; wall ms
    per request, this process's CPU ms per request (:func:`timed`), bytes per request, device MFLOPs and
    energy per inference, the top-1 of the last pass and, with ``labels``, its accuracy."""
    for x in xs:
        infer(x)
    ms, sent, mflops, top1 = [], [], [], []

    def passes():
        nonlocal top1
        for _ in range(repeat):
            top1 = []
            for x in xs:
                t0 = time.perf_counter()
                t, b, f = infer(x)
                ms.append((time.perf_counter() - t0) * 1e3)
                sent.append(b)
                mflops.append(f)
                top1.append(t)

    meter.start()
    _, _, cpu = timed(passes)
    energy = meter.stop()
    out = {"latency_ms": percentiles(ms), "cpu_ms_per_inference": cpu * 1e3 / len(ms),
           "bytes_per_sample": float(np.mean(sent)), "device_mflops": float(np.mean(mflops)), "top1": top1,
           "energy_j_per_inference": energy.joules / len(ms),
           "energy_label": "estimated" if energy.estimated else "measured"}
    if labels:
        out["top1_accuracy"] = accuracy(top1, labels)
    return out


def compare_modes(bundle_dir: str, device: S.DeviceOptions, opts: BenchOptions, bundle: Bundle, board: dict, xs,
                  meter_for_board, labels=None, files=()) -> dict:
    """The survey's comparison on the same inputs (Matsubara, Levorato & Restuccia, sec. 2): local
    computing (LC, whole model on the device), edge computing (EC, the input sent to a server running the
    whole model), split computing (SC) and, when the bundle has exits, SC with early exits (SC+EE) and LC
    with early exits (LC+EE). Device MFLOPs count the graphs the device ran; accuracy needs ``labels``.

    With image files as inputs every mode starts from the file's bytes in memory, so latency (ms) is file
    to result: the device decodes and preprocesses for LC / SC, while for EC it sends the file as it is
    and the server decodes it (``serve --whole-model --input-file``). With arrays (.npy) every mode
    starts from the preprocessed input and EC sends it int8-quantised."""
    from .client import EdgeClient
    from .device import DeviceRunner
    from .preprocess import IMAGE_SUFFIXES, decode_image
    from .protocol import FILE_TENSOR
    from .quant import QuantParams

    from .boards import allow_spinning

    fmt = S.pick_backend(bundle, device.backend, board)
    precision = S.pick_precision(bundle, fmt, device.precision)
    threads = S.runtime_threads(device.threads, board)
    spin = allow_spinning(board, device.spinning)
    meter = meter_for_board(board)
    spec = bundle.manifest.preprocess
    inp = bundle.manifest.input.name
    from_files = bool(files) and all(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files)
    if from_files:
        items = [Path(f).read_bytes() for f in files]
        to_input = lambda b: decode_image(b, spec)[None]  # noqa: E731
    else:
        items, to_input = list(xs), (lambda x: x)

    def run(runner):
        return lambda item: (lambda r: (r.top1, r.bytes_sent, device_mflops(bundle, r)))(runner.infer(to_input(item)))

    modes: Dict[str, dict] = {}
    lc = DeviceRunner(bundle, None, fmt, precision, threads, exits=False, local_tail=True, allow_spinning=spin)
    modes["LC"] = _timed_mode(run(lc), items, opts.repeat, meter, labels)
    proc, address = start_server(bundle_dir, ["--whole-model", "--backend", fmt, "--precision", "fp32"]
                                 + (["--input-file"] if from_files else []))
    try:
        host, port = S.parse_server_address(address)
        client = EdgeClient(host, port, codec=device.codec or "zstd")

        def offload(item):
            if from_files:
                reply = client.infer({FILE_TENSOR: np.frombuffer(item, np.uint8)}, {})
            else:
                q = QuantParams.from_tensor(item, "int8")  # the range includes 0, as on every other path
                reply = client.infer({inp: q.quantize(item)}, {inp: q.to_json()})
            return int(reply.logits[0].argmax()), reply.bytes_sent, 0.0

        modes["EC"] = _timed_mode(offload, items, opts.repeat, meter, labels)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    sc, _, _ = S.make_runner(bundle, board, replace(device, exits=False))
    modes["SC"] = _timed_mode(run(sc), items, opts.repeat, meter, labels)
    if bundle.exits:
        see, _, _ = S.make_runner(bundle, board, replace(device, exits=True))
        modes["SC+EE"] = _timed_mode(run(see), items, opts.repeat, meter, labels)
        lcee = DeviceRunner(bundle, None, fmt, precision, threads, exits=True, local_tail=True, allow_spinning=spin)
        modes["LC+EE"] = _timed_mode(run(lcee), items, opts.repeat, meter, labels)
    for m in modes.values():
        m["top1_agreement_with_LC"] = float(np.mean([a == b for a, b in zip(m["top1"], modes["LC"]["top1"])]))
    return {"backend": "%s/%s" % (fmt, precision), "server_on_this_machine": True,
            "latency_from": "input file bytes (decode + preprocess included)" if from_files else "preprocessed input",
            "ec_sends": "the input file as it is (server decodes)" if from_files else "the input, int8-quantised",
            "whole_model_mflops": sum(sg.mflops or 0.0 for sg in bundle.segments),
            "labelled_inputs": len(labels) if labels else 0, "modes": modes}


def graph_latency(bundle: Bundle, xs, repeat: int, threads=(1, 2), allow_spinning=None) -> Dict[str, dict]:
    """p50 ms per segment graph for every format/precision the bundle has (float vs int8, onnxruntime vs
    LiteRT) at 1 and 2 threads, batch 1, on the same inputs: ``{"onnx/int8@2": {"seg0": ms, ...}}``."""
    from .chain import Chain

    out: Dict[str, dict] = {}
    for pair in bundle.formats():
        fmt, precision = pair.split("/")
        for t in threads:
            try:
                chain = Chain(bundle, "all", fmt, precision, t, with_exits=False, allow_spinning=allow_spinning)
            except Exception as e:  # e.g. no LiteRT interpreter installed on this board
                out["%s@%d" % (pair, t)] = {"error": str(e)}
                continue
            timings: Dict[str, List[float]] = {}
            inp = bundle.manifest.input.name
            chain.run_segments({inp: xs[0]})  # warm-up
            for _ in range(repeat):
                for x in xs:
                    ms: Dict[str, float] = {}
                    chain.run_segments({inp: x}, ms)
                    for k, v in ms.items():
                        timings.setdefault(k, []).append(v)
            out["%s@%d" % (pair, t)] = {k: float(np.median(v)) for k, v in timings.items()}
    return out


def _exit_rates(results) -> Dict[str, float]:
    counts: Dict[str, int] = {}
    for r in results:
        key = r.exit or r.where
        counts[key] = counts.get(key, 0) + 1
    return {k: v / len(results) for k, v in counts.items()}


def _sweep(device: S.DeviceOptions, opts: BenchOptions, bundle: Bundle, board: dict, xs) -> List[dict]:
    """End-to-end p50 per emulated bandwidth (token-bucket shaping of the client's send path); each row has
    the link in Mbit/s (``mbps``) and as a label (``bandwidth``)."""
    from .link import format_bandwidth, parse_bandwidths

    rows = []
    for mbps in parse_bandwidths(opts.bandwidths) if (opts.bandwidths or "").strip() else []:
        runner, _, _ = S.make_runner(bundle, board, replace(device, bandwidth=mbps))
        res = _run_pass(runner, xs, 1)
        rows.append({"bandwidth": format_bandwidth(mbps), "mbps": mbps, "rtt": device.rtt,
                     "total_ms": percentiles([sum(r.ms.values()) for r in res]),
                     "bytes_sent_mean": float(np.mean([r.bytes_sent for r in res]))})
    return rows




def adaptive_link(bundle: Bundle, server: str, fmt: str, precision: str, schedule: str, xs, labels=None,
                  threads=None, codec: str = "zstd", timeout: float = 5.0) -> dict:
    """Latency-aware thresholds on a link whose emulated bandwidth changes during one run: the device runner
    in adaptive mode against the edge server at ``server`` (HOST:PORT), the link shaper set to each phase's
    rate of ``schedule`` (``"1mbit:60,20mbit:60"``, :func:`runtime.link.parse_schedule`), with the round trip
    the regression was fitted for. Per phase: the device's own bandwidth estimate, the thresholds it
    applied, the share offloaded, mean wall latency per request (ms) and top-1 when ``labels`` are known
    (inputs ``xs``, float32 (1, C, H, W) each, are taken in turn); plus the per-request trace."""
    from .client import EdgeClient
    from .device import DeviceRunner
    from .link import LinkShaper, parse_schedule

    la = bundle.manifest.latency_adaptation
    pair = "%s/%s" % (fmt, precision)
    if pair not in la.models:
        return {"skipped": "no latency adaptation model for %s (has %s)" % (pair, ", ".join(sorted(la.models)))}
    phases = parse_schedule(schedule)
    host, port = S.parse_server_address(server)
    shaper = LinkShaper(phases[0][0], la.rtt_ms)
    client = EdgeClient(host, port, shaper=shaper, codec=codec, timeout_s=timeout)
    runner = DeviceRunner(bundle, client, fmt, precision, threads, adaptive=True)
    names = [e.name for e in bundle.exits]
    trace, summary, k = [], [], 0
    for bw, n in phases:
        shaper.set_bandwidth(bw)
        rows = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = runner.infer(xs[k % len(xs)])
            row = {"emulated_mbps": bw, "estimate_mbps": r.bandwidth_mbps, "where": r.where, "exit": r.exit,
                   "ms": (time.perf_counter() - t0) * 1e3, "thresholds": [r.thresholds.get(m) for m in names],
                   "gates": None if r.gates is None else [r.gates.get(m) for m in names]}
            if labels:
                row["correct"] = int(r.top1 == labels[k % len(xs)])
            rows.append(row)
            k += 1
        est = [q["estimate_mbps"] for q in rows[len(rows) // 2:] if q["estimate_mbps"] is not None]
        summary.append({"bandwidth_mbps": bw, "requests": n,
                        "estimate_mbps": float(np.median(est)) if est else None,
                        "thresholds": rows[-1]["thresholds"], "gates": rows[-1]["gates"],
                        "offloaded": float(np.mean([q["where"] == "server" for q in rows])),
                        "latency_ms_mean": float(np.mean([q["ms"] for q in rows])),
                        "accuracy": float(np.mean([q["correct"] for q in rows])) if labels else None})
        trace += rows
    client.close()
    est = runner.estimator
    return {"pair": pair, "budget_ms": la.budget_ms, "rtt_ms": la.rtt_ms, "phases": summary,
            "estimator": "rate: max over the last %d transfers within %g s; round trip: min over the probes of the "
                         "last %g s; probes when idle for %g s" % (est.window, est.max_age_s, est.rtt_window_s,
                                                                    est.idle_s), "trace": trace}

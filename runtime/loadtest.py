"""``python -m runtime loadtest``: many devices against one edge server, every reply checked.

Real request frames: the bundle's sample images go through the device side here (head, int8 quantisation
with the manifest's scale / zero point) and the tail runs here too, giving the reference logits. Each
client is a separate process (``python -m runtime.loadtest DIR``) on its own connection, sending one
request at a time through :class:`runtime.client.EdgeClient` (compression, retry-once: what a board runs)
for a bounded time and count, and checking each reply against the reference: a reply whose top-1 differs
or whose logits are off by more than 1e-3 x (1 + max |logit|) is a *wrong answer*; an ERROR reply is an
*error* (by code); a request with no answer at all (timeout, connection broken twice) is *lost*.

Without ``--server`` it starts the servers itself on 127.0.0.1: ``serve`` with its defaults (batching)
and, unless ``--no-baseline``, ``serve --no-batching`` (each request alone through one session, the server
before batching), and measures both at every client count, interleaved (ABAB, ``--rounds``). In the same
run it measures the ceiling: bare tail sessions, no server, at each batch size (the server's workers x
threads, and one session on every core), the best of which is what batching can at most reach.

Writes ``loadtest.json``, ``loadtest.md`` and ``loadtest.png`` (throughput and p99 against clients) to
``--out``; ``--json`` also prints the JSON. Units: ms, requests/s, samples/s.
"""
from __future__ import annotations

import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["run_loadtest", "add_arguments", "prepare_requests", "summarize", "ceiling"]

#: a reply is wrong when |logits - reference| exceeds this x (1 + max |reference|), or top-1 differs
TOLERANCE = 1e-3


# --------------------------------------------------------------------------- requests and references
def prepare_requests(bundle, fmt: str, precision: str, limit: int = 16, threads: Optional[int] = None) -> dict:
    """Request tensors from the bundle's samples as a device sends them, and the reference logits.

    Returns {"tensors": [name -> int8 (1, C, H, W)], "quant": name -> {scale, zero_point, dtype},
    "reference": [(1, K) float32 logits from the tail run here], "files": [...]}.

    Raises:
        ValueError: the bundle has no samples/ or no server side.
    """
    from .chain import Chain
    from .device import quantize_wire, wire_params
    from .preprocess import list_images, load_inputs

    files = [str(p) for p in list_images(bundle.root / "samples")] if (bundle.root / "samples").is_dir() else []
    if not files:
        raise ValueError("%s has no samples/ to build requests from (re-export it with --samples N)" % bundle.root)
    if not bundle.server_segments:
        raise ValueError("the bundle has no server segments: nothing to load-test")
    files = files[:limit]
    m = bundle.manifest
    head = Chain(bundle, "device", fmt, precision, threads, with_exits=False)
    tail = Chain(bundle, "server", fmt, precision, threads, with_exits=False)
    params = wire_params(bundle, "int8")
    tensors, refs, quant = [], [], {}
    for f in files:
        x = load_inputs([f], m.preprocess)
        values = head.run_segments({m.input.name: x[:1]})
        t, quant = quantize_wire(params, values)
        feed = {n: params[n].dequantize(t[n]) for n in t}  # what the server dequantises
        tensors.append(t)
        refs.append(tail.run_segments(feed)[m.output.name].astype(np.float32))
    return {"tensors": tensors, "quant": quant, "reference": refs, "files": [os.path.basename(f) for f in files]}


def write_requests(req: dict, folder: Path) -> None:
    """``requests.npz`` (arrays only, loaded with allow_pickle=False) and ``requests.json`` (quantisation)."""
    arrays = {}
    for i, (t, ref) in enumerate(zip(req["tensors"], req["reference"])):
        for name, a in t.items():
            arrays["t%d/%s" % (i, name)] = a
        arrays["ref%d" % i] = ref
    np.savez(folder / "requests.npz", **arrays)
    (folder / "requests.json").write_text(json.dumps({"quant": req["quant"], "count": len(req["tensors"]),
                                                      "names": sorted(req["tensors"][0])}))


# --------------------------------------------------------------------------- one client process
def _load_requests(folder: Path):
    meta = json.loads((folder / "requests.json").read_text())
    with np.load(folder / "requests.npz", allow_pickle=False) as z:
        tensors = [{n: z["t%d/%s" % (i, n)] for n in meta["names"]} for i in range(meta["count"])]
        refs = [z["ref%d" % i] for i in range(meta["count"])]
    return tensors, refs, meta["quant"]


def client_run(tensors, refs, quant, server: str, start_at: float, duration: float, max_requests: int,
               offset: int, timeout_s: float, secret=None) -> dict:
    """One client's bounded request loop against ``server`` (HOST:PORT) from wall time ``start_at`` for
    ``duration`` s or ``max_requests`` requests; every reply checked against ``refs``."""
    from .client import EdgeClient, ServerError, ServerUnavailable, EdgeClientError

    host, _, port = server.rpartition(":")
    cli = EdgeClient(host, int(port), secret=secret, timeout_s=timeout_s)
    out = {"sent": 0, "ok": 0, "wrong": 0, "lost": 0, "retried": 0, "errors": {}, "latency_ms": [], "batches": []}
    try:
        try:
            cli.ping()  # connect before the clock starts
        except EdgeClientError as exc:
            out["errors"]["connect"] = 1
            out["error_example"] = str(exc)[:300]
            return out
        time.sleep(max(0.0, start_at - time.time()))
        end = time.perf_counter() + duration
        i = offset
        while time.perf_counter() < end and out["sent"] < max_requests:
            k = i % len(tensors)
            i += 1
            out["sent"] += 1
            t0 = time.perf_counter()
            try:
                r = cli.infer(tensors[k], quant)
            except ServerError as exc:
                out["errors"][exc.code] = out["errors"].get(exc.code, 0) + 1
                out.setdefault("error_example", str(exc)[:300])
                continue
            except ServerUnavailable as exc:
                code = "busy" if "busy" in str(exc) else None
                if code:
                    out["errors"][code] = out["errors"].get(code, 0) + 1
                else:
                    out["lost"] += 1
                out.setdefault("error_example", str(exc)[:300])
                continue
            except EdgeClientError as exc:
                out["errors"]["bad_reply"] = out["errors"].get("bad_reply", 0) + 1
                out.setdefault("error_example", str(exc)[:300])
                continue
            out["latency_ms"].append((time.perf_counter() - t0) * 1e3)
            out["retried"] += int(r.attempts > 1)
            if "batch" in r.meta:
                out["batches"].append(int(r.meta["batch"]))
            ref = refs[k]
            tol = TOLERANCE * (1.0 + float(np.abs(ref).max()))
            if r.logits is None or r.logits.shape != ref.shape or int(r.logits.argmax()) != int(ref.argmax()) \
                    or float(np.abs(r.logits - ref).max()) > tol:
                out["wrong"] += 1
            else:
                out["ok"] += 1
    finally:
        cli.close()  # an idle open connection would make the batcher wait for it
    return out


def client_main(argv: Sequence[str]) -> int:
    """Child process: read one JSON command per stdin line, answer one JSON result line per command."""
    folder = Path(argv[0])
    tensors, refs, quant = _load_requests(folder)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        res = client_run(tensors, refs, quant, cmd["server"], cmd["start_at"], cmd["duration"], cmd["max_requests"],
                         cmd["offset"], cmd["timeout_s"], cmd.get("secret"))
        print(json.dumps(res), flush=True)
    return 0


class _Lines(object):
    """Lines of a child's stdout, read by a thread (select() on a buffered pipe misses buffered lines)."""

    def __init__(self, stream):
        self._q = queue.Queue()  # type: queue.Queue
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._q.put(line)
        self._q.put("")  # EOF

    def readline(self, timeout_s: float) -> str:
        """The next line, or "" at EOF or after ``timeout_s`` seconds."""
        try:
            return self._q.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return ""


class ClientPool(object):
    """``n`` client processes (``python -m runtime.loadtest DIR``), driven by JSON lines on stdin/stdout."""

    def __init__(self, n: int, folder: Path, ready_timeout_s: float = 120.0):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.procs = [subprocess.Popen([sys.executable, "-m", "runtime.loadtest", str(folder)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
                      for _ in range(n)]
        self.lines = [_Lines(p.stdout) for p in self.procs]
        deadline = time.monotonic() + ready_timeout_s
        for lines in self.lines:
            line = lines.readline(deadline - time.monotonic())
            if not line or not json.loads(line).get("ready"):
                self.close()
                raise RuntimeError("a load-test client process did not start within %.0f s" % ready_timeout_s)

    def run(self, k: int, server: str, duration: float, max_requests: int, timeout_s: float, secret=None) -> List[dict]:
        """The first ``k`` clients against ``server`` for ``duration`` s, starting together; their results."""
        start_at = time.time() + 0.5 + 0.01 * k  # every client connected (ping) before the clock starts
        for i, p in enumerate(self.procs[:k]):
            p.stdin.write(json.dumps({"server": server, "start_at": start_at, "duration": duration,
                                      "max_requests": max_requests, "offset": i, "timeout_s": timeout_s,
                                      "secret": secret}) + "\n")
            p.stdin.flush()
        out = []
        deadline = time.monotonic() + start_at - time.time() + duration + timeout_s * 2 + 30
        for lines in self.lines[:k]:
            line = lines.readline(deadline - time.monotonic())
            if not line:
                raise RuntimeError("a load-test client gave no result in time")
            out.append(json.loads(line))
        return out

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"quit": True}) + "\n")
                p.stdin.flush()
            except (OSError, ValueError):
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# --------------------------------------------------------------------------- aggregation
def summarize(results: List[dict], duration: float) -> dict:
    """One measurement from its clients' results: req/s (checked replies), p50/p90/p99/mean ms, errors by
    code, wrong answers, lost requests, retried requests, mean batch size seen in replies."""
    lat = [v for r in results for v in r["latency_ms"]]
    errors: Dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    batches = [b for r in results for b in r.get("batches", [])]
    out = {"clients": len(results), "sent": sum(r["sent"] for r in results), "replies": len(lat),
           "ok": sum(r["ok"] for r in results), "wrong": sum(r["wrong"] for r in results),
           "lost": sum(r["lost"] for r in results), "retried": sum(r["retried"] for r in results),
           "errors": errors, "req_per_s": len(lat) / duration if duration else 0.0}
    if lat:
        a = np.asarray(lat)
        out.update({"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
                    "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())})
    if batches:
        out["mean_batch"] = float(np.mean(batches))
    examples = [r["error_example"] for r in results if r.get("error_example")]
    if examples:
        out["error_example"] = examples[0]
    return out


def _merge(parts: List[dict]) -> dict:
    """Rounds of one (server, clients) cell: counts added, latencies pooled, rates from the total time."""
    dur = sum(p["duration"] for p in parts)
    by_client: Dict[int, dict] = {}
    for p in parts:
        for i, r in enumerate(p["results"]):
            c = by_client.setdefault(i, {"sent": 0, "ok": 0, "wrong": 0, "lost": 0, "retried": 0, "errors": {},
                                         "latency_ms": [], "batches": []})
            for k in ("sent", "ok", "wrong", "lost", "retried"):
                c[k] += r[k]
            for code, n in r["errors"].items():
                c["errors"][code] = c["errors"].get(code, 0) + n
            c["latency_ms"] += r["latency_ms"]
            c["batches"] += r.get("batches", [])
            if r.get("error_example"):
                c["error_example"] = r["error_example"]
    return summarize(list(by_client.values()), dur)


# --------------------------------------------------------------------------- the ceiling
def ceiling(bundle, fmt: str, precision: str, layouts: Sequence[tuple], batches: Sequence[int], sample: dict,
            seconds: float = 2.0) -> dict:
    """Bare tail sessions, no server: samples/s at each batch size for each (sessions, threads) layout,
    the sessions running concurrently (spinning off when more than one), the median of three windows of
    ``seconds / 3``. Returns {"points": [...], "best": {...}}."""
    from .chain import Chain

    points = []
    for sessions, threads in layouts:
        chains = [Chain(bundle, "server", fmt, precision, threads, with_exits=False,
                        allow_spinning=False if sessions > 1 else None) for _ in range(sessions)]
        for b in batches:
            feeds = {k: np.ascontiguousarray(np.repeat(v, b, axis=0)) for k, v in sample.items()}
            for c in chains:
                c.run_segments(feeds)  # warm-up at this shape
            rates = []
            for _ in range(3):  # the median of three windows: one quiet moment on a shared machine is no ceiling
                counts = [0] * sessions
                end = time.perf_counter() + seconds / 3

                def work(i):
                    while time.perf_counter() < end:
                        chains[i].run_segments(feeds)
                        counts[i] += b

                t0 = time.perf_counter()
                threads_ = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
                for t in threads_:
                    t.start()
                for t in threads_:
                    t.join()
                rates.append(sum(counts) / (time.perf_counter() - t0))
            points.append({"sessions": sessions, "threads": threads, "batch": b,
                           "samples_per_s": float(np.median(rates)), "windows": [round(v, 1) for v in rates]})
    best = max(points, key=lambda p: p["samples_per_s"])
    return {"points": points, "best": best, "seconds_per_point": seconds}


# --------------------------------------------------------------------------- servers
def start_server(bundle_dir: str, extra: Sequence[str], log_path: Path, timeout_s: float = 180.0):
    """``python -m runtime serve BUNDLE --port 0 EXTRA`` on loopback; returns (process, "127.0.0.1:PORT", plan)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", bundle_dir, "--host", "127.0.0.1", "--port", "0"]
                            + list(extra), stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    log.close()
    addr, plan, lines = None, None, []
    reader = _Lines(proc.stdout)
    deadline = time.monotonic() + timeout_s
    while plan is None and time.monotonic() < deadline:
        line = reader.readline(deadline - time.monotonic())
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("eetool server:") and " on " in line:
            addr = line.strip().rsplit(" on ", 1)[1]
        elif line.startswith("plan "):
            plan = json.loads(line[5:])
    if addr is None or plan is None:
        proc.kill()
        proc.wait(5)
        raise OSError("edge server did not start (%s); its log: %s" % (" | ".join(lines[-3:]) or "no output", log_path))
    return proc, addr, plan


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------- the command
def add_arguments(p) -> None:
    """The ``loadtest`` command's arguments."""
    p.add_argument("bundle")
    p.add_argument("--server", help="HOST:PORT of a running server (default: start them here on 127.0.0.1)")
    p.add_argument("--clients", default="1,8,32,64", help="client counts, comma-separated (default 1,8,32,64)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per client count and server (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds the duration is split into (ABAB)")
    p.add_argument("--max-requests", type=int, default=100000, help="most requests per client and round")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    p.add_argument("--no-baseline", action="store_true", help="do not measure 'serve --no-batching' alongside")
    p.add_argument("--serve-args", default="", help="extra arguments for the batching server it starts, e.g. "
                                                    "'--workers 1 --max-batch 16'")
    p.add_argument("--baseline-args", default="", help="extra arguments for the 'serve --no-batching' server, "
                                                       "e.g. '--spinning off' (same session options as the workers)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "tflite"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"],
                   help="graphs for the servers it starts, the references and the ceiling")
    p.add_argument("--samples", type=int, default=16, help="distinct request inputs from the bundle's samples/")
    p.add_argument("--ceiling-seconds", type=float, default=2.0, help="seconds per ceiling point (0: skip the ceiling)")
    p.add_argument("--ceiling-batches", default="1,2,4,8,16,32,64")
    p.add_argument("--secret", help="shared secret of the server (or $EETOOL_SECRET)")
    p.add_argument("--out", default="loadtest-report", help="folder for loadtest.json / .md / .png")
    p.add_argument("--json", action="store_true", help="print the JSON result")


def _ints(text: str, what: str) -> List[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError("%s %r: expected positive integers separated by commas, e.g. 1,8,32,64" % (what, text))
    return out


def run_loadtest(args) -> int:
    """The ``loadtest`` command (see the module doc). Raises ValueError for bad options."""
    import shlex

    from .bundle import Bundle
    from .session import pick_backend, pick_precision
    from .serving import probe_sample, usable_cores

    clients = _ints(args.clients, "--clients")
    batches = _ints(args.ceiling_batches, "--ceiling-batches")
    if args.duration <= 0 or args.rounds < 1:
        raise ValueError("--duration must be > 0 and --rounds >= 1")
    if args.server:
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("--server %r: expected HOST:PORT, e.g. 127.0.0.1:8470" % args.server)
    secret = args.secret or os.environ.get("EETOOL_SECRET")
    bundle = Bundle.load(args.bundle)
    fmt = pick_backend(bundle, args.backend, None)
    precision = pick_precision(bundle, fmt, args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("loadtest.json", "loadtest.md", "loadtest.png"):
        (out / name).unlink(missing_ok=True)  # nothing left over from an earlier run
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.time()
    req = prepare_requests(bundle, fmt, precision, args.samples)
    servers = []  # (label, proc or None, addr, plan)
    pool = None
    with tempfile.TemporaryDirectory(prefix="eetool-loadtest-") as tmp:
        write_requests(req, Path(tmp))
        try:
            if args.server:
                servers.append(("server", None, args.server, None))
            else:
                common = ["--backend", fmt, "--precision", precision] + (["--secret", secret] if secret else [])
                p, addr, plan = start_server(str(bundle.root), common + shlex.split(args.serve_args), out / "serve.log")
                servers.append(("batching", p, addr, plan))
                if not args.no_baseline:
                    p, addr, plan = start_server(str(bundle.root), common + ["--no-batching"]
                                                 + shlex.split(getattr(args, "baseline_args", "") or ""),
                                                 out / "serve-nobatch.log")
                    servers.append(("no batching", p, addr, plan))
            pool = ClientPool(max(clients), Path(tmp))
            cells: Dict[tuple, List[dict]] = {}
            per_round = args.duration / args.rounds
            for k in clients:
                for _ in range(args.rounds):
                    for label, _, addr, _ in servers:  # interleaved: A B A B
                        res = pool.run(k, addr, per_round, args.max_requests, args.timeout, secret)
                        cells.setdefault((label, k), []).append({"results": res, "duration": per_round})
                        s = summarize(res, per_round)
                        print("%-12s %3d clients: %7.1f req/s  p50 %7.1f ms  p99 %7.1f ms  wrong %d lost %d errors %s"
                              % (label, k, s["req_per_s"], s.get("p50_ms", float("nan")), s.get("p99_ms", float("nan")),
                                 s["wrong"], s["lost"], s["errors"] or 0), file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.close()
            for _, p, _, _ in servers:
                if p is not None:
                    stop_server(p)
    levels = []
    for k in clients:
        levels.append({"clients": k, **{label: _merge(cells[(label, k)]) for label, _, _, _ in servers}})
    cores = usable_cores()
    result = {
        "bundle": str(bundle.root), "backend": fmt, "precision": precision, "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "cores": cores, "logical_cpus": os.cpu_count(),
        "python": platform.python_version(), "duration_s": args.duration, "rounds": args.rounds,
        "request_inputs": len(req["tensors"]), "tolerance": TOLERANCE,
        "servers": {label: {"address": addr, "plan": plan, "started_here": p is not None}
                    for label, p, addr, plan in servers},
        "levels": levels,
    }
    if args.ceiling_seconds > 0:
        plan = servers[0][3] or {}
        layouts = [(1, cores)]
        if plan.get("workers", 1) > 1 and plan.get("threads"):
            layouts.append((plan["workers"], plan["threads"]))
        if cores > 1:
            layouts.append((cores, 1))
        result["ceiling"] = ceiling(bundle, fmt, precision, list(dict.fromkeys(layouts)), batches,
                                    probe_sample(bundle, False), args.ceiling_seconds)
    result["load_average"] = {"before": list(load_before) if load_before else None,
                              "after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    result["wall_s"] = round(time.time() - t_start, 1)
    result["targets"] = targets(result)
    (out / "loadtest.json").write_text(json.dumps(result, indent=2))
    from .report import loadtest_markdown, loadtest_plot

    plot = loadtest_plot(result, out / "loadtest.png")
    (out / "loadtest.md").write_text(loadtest_markdown(result, plot and os.path.basename(plot)))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print((out / "loadtest.md").read_text())
    return 0


def targets(r: dict) -> dict:
    """The issue's targets from one run's numbers: throughput at the most clients against the ceiling,
    p99 / p50 there, lone-device p50 against the server without batching, wrong and lost counts."""
    levels = r["levels"]
    out: Dict[str, object] = {}
    top, lone = levels[-1], levels[0]
    b = top.get("batching") or top.get("server")
    if b and r.get("ceiling"):
        out["throughput_vs_ceiling"] = {"clients": top["clients"], "req_per_s": b["req_per_s"],
                                        "ceiling_samples_per_s": r["ceiling"]["best"]["samples_per_s"],
                                        "ratio": b["req_per_s"] / r["ceiling"]["best"]["samples_per_s"], "target": 0.8}
    if b and b.get("p50_ms"):
        out["p99_over_p50"] = {"clients": top["clients"], "ratio": b["p99_ms"] / b["p50_ms"], "target": 3.0}
    lb, ln = lone.get("batching"), lone.get("no batching")
    if lb and ln and lb.get("p50_ms") and ln.get("p50_ms"):
        out["lone_device_p50_vs_no_batching"] = {"clients": lone["clients"], "batching_p50_ms": lb["p50_ms"],
                                                 "no_batching_p50_ms": ln["p50_ms"],
                                                 "ratio": lb["p50_ms"] / ln["p50_ms"], "target": 1.10}
    cells = [c for lv in levels for key, c in lv.items() if key != "clients"]
    out["wrong_answers"] = sum(c["wrong"] for c in cells)
    out["lost_replies"] = sum(c["lost"] for c in cells)
    return out


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))

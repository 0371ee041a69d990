"""``python -m runtime loadtest``: many devices against one edge server, every reply checked.

Real request frames: the bundle's sample images go through the device side here (head, int8 quantisation
with the manifest's scale / zero point) and the tail runs here too, giving the reference logits. Each
client is a separate process (``python -m runtime.loadtest DIR``) on its own connection, sending one
request at a time through :class:`runtime.client.EdgeClient` (compression, retry-once: what a board runs)
for a bounded time and count, and checking each reply against the reference: a reply whose top-1 differs
or whose logits are off by more than 1e-3 x (1 + max |logit|) is a *wrong answer*; an ERROR reply is an
*error* (by code); a request with no answer at all (timeout, connection broken twice) is *lost*.

Without ``--server`` it starts the servers itself on 127.0.0.1: ``serve`` with its defaults (batching)
and, unless ``--no-baseline``, the batch-1 path: ``serve --no-batching`` (each request alone through one
session, the server before batching) with a batching worker's session options (threads, spinning), and
measures both at every client count, interleaved (ABAB, ``--rounds``). Two in-process cells, no sockets,
join the rotation at the same rounds: the *bare batched ceiling* (the server's worker sessions, at its
threads, spinning and ``max_batch``, each running batches of the real requests back to back; joins the
largest client count) and the *bare batch-1 tail* (one such session, one request at a time; joins the
smallest client count). Every cell runs once untimed before the rounds (``--warmup``). The targets are
ratios taken per round and given as median and interquartile range over the rounds. After the rounds a
batch-size sweep of bare sessions (``--sweep-seconds``) shows whether another batch size or layout would
raise the ceiling.

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

__all__ = ["run_loadtest", "add_arguments", "prepare_requests", "summarize", "bare_cell", "bare_batches",
           "inprocess_config", "batch_sweep", "targets"]

#: a reply is wrong when |logits - reference| exceeds this x (1 + max |reference|), or top-1 differs
TOLERANCE = 1e-3


# --------------------------------------------------------------------------- requests and references
def prepare_requests(bundle, fmt: str, precision: str, limit: int = 16, threads: Optional[int] = None) -> dict:
    """Request tensors from the bundle's samples as a device sends them, and the reference logits.

    Returns {"tensors": [name -> int8 (1, C, H, W)], "quant": name -> {scale, zero_point, dtype},
    "feeds": [name -> float32 (1, C, H, W): the tail's inputs as the server dequantises them],
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
    tensors, refs, feeds, quant = [], [], [], {}
    for f in files:
        x = load_inputs([f], m.preprocess)
        values = head.run_segments({m.input.name: x[:1]})
        t, quant = quantize_wire(params, values)
        feed = {n: params[n].dequantize(t[n]) for n in t}  # what the server dequantises
        tensors.append(t)
        feeds.append(feed)
        refs.append(tail.run_segments(feed)[m.output.name].astype(np.float32))
    return {"tensors": tensors, "quant": quant, "feeds": feeds, "reference": refs,
            "files": [os.path.basename(f) for f in files]}


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


def is_right(logits: Optional[np.ndarray], ref: np.ndarray) -> bool:
    """Whether ``logits`` ((1, K) float32) answer like the reference ``ref`` (same shape): same top-1 and
    no logit off by more than TOLERANCE x (1 + max |ref|)."""
    if logits is None or logits.shape != ref.shape or int(logits.argmax()) != int(ref.argmax()):
        return False
    return float(np.abs(logits - ref).max()) <= TOLERANCE * (1.0 + float(np.abs(ref).max()))


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
            if is_right(r.logits, refs[k]):
                out["ok"] += 1
            else:
                out["wrong"] += 1
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
    out = summarize(list(by_client.values()), dur)
    out["per_round"] = []
    for p in parts:  # each round on its own: the ratios against the cells next to it are taken per round
        s = summarize(p["results"], p["duration"])
        out["per_round"].append({k: s[k] for k in ("req_per_s", "replies", "p50_ms", "p99_ms") if k in s})
    return out


# --------------------------------------------------------------------------- in-process cells (no sockets)
def inprocess_config(plan: Optional[dict], cores: int) -> dict:
    """The bare sessions that stand for a batching server: {"sessions", "threads", "batch", "spinning",
    "providers"} from its start-up ``plan`` (``serve``'s or Ray Serve's JSON plan line): one session per
    worker (replica), the same intra-op threads and spinning, batches of its ``max_batch``."""
    plan = plan or {}
    return {"sessions": int(plan.get("workers") or plan.get("replicas") or 1),
            "threads": plan.get("threads") or (None if plan.get("device") == "gpu" else cores),
            "batch": int(plan.get("max_batch") or 1), "spinning": plan.get("allow_spinning"),
            "providers": plan.get("providers")}


def bare_batches(feeds: List[Dict[str, np.ndarray]], batch: int, max_rows: int = 512) -> List[tuple]:
    """Batches of ``batch`` requests each, as the batcher concatenates them: [(name -> (batch, ...) float32,
    [request index of each row])]. Batch j holds requests j, j + 1, ... (mod the number of requests): one
    batch per request, fewer when that would hold more than ``max_rows`` rows (at least one batch)."""
    n = len(feeds)
    out = []
    for j in range(min(n, max(1, max_rows // batch))):
        idx = [(j + i) % n for i in range(batch)]
        out.append(({k: np.ascontiguousarray(np.concatenate([feeds[i][k] for i in idx], axis=0)) for k in feeds[0]},
                    idx))
    return out


def bare_cell(chains, output: str, batches: List[tuple], refs: List[np.ndarray], seconds: float,
              keep_answers: bool = False, runs: Optional[int] = None) -> dict:
    """One in-process cell: every chain (one tail session each, as a batching worker has) runs ``batches``
    in turn, back to back, in its own thread, for ``seconds`` s (or exactly ``runs`` batches each); every
    row of every output is checked against ``refs`` (:func:`is_right`).

    Returns {"runs", "samples", "ok", "wrong", "seconds", "samples_per_s", "latency_ms": [ms per run]} and,
    with ``keep_answers``, "answers": request index -> (1, K) float32 logits (the last seen)."""
    stats = [{"runs": 0, "samples": 0, "ok": 0, "wrong": 0, "latency_ms": []} for _ in chains]
    answers: Dict[int, np.ndarray] = {}
    end = time.perf_counter() + seconds

    def work(w: int) -> None:
        st, j = stats[w], w
        while (st["runs"] < runs) if runs is not None else (time.perf_counter() < end):
            feeds, idx = batches[j % len(batches)]
            j += len(chains)
            t0 = time.perf_counter()
            logits = chains[w].run_segments(feeds)[output]
            st["latency_ms"].append((time.perf_counter() - t0) * 1e3)
            st["runs"] += 1
            st["samples"] += len(idx)
            for row, k in enumerate(idx):
                got = np.asarray(logits[row:row + 1], dtype=np.float32)
                if is_right(got, refs[k]):
                    st["ok"] += 1
                else:
                    st["wrong"] += 1
                if keep_answers:
                    answers[k] = got

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(len(chains))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = {k: sum(st[k] for st in stats) for k in ("runs", "samples", "ok", "wrong")}
    out.update(seconds=wall, samples_per_s=out["samples"] / wall if wall > 0 else 0.0,
               latency_ms=[v for st in stats for v in st["latency_ms"]])
    if keep_answers:
        out["answers"] = answers
    return out


def _merge_bare(parts: List[dict], config: dict) -> dict:
    """Rounds of one in-process cell: counts added, run latencies pooled, the rate over the total time,
    and each round's rate and p50."""
    lat = np.asarray([v for p in parts for v in p["latency_ms"]])
    secs = sum(p["seconds"] for p in parts)
    out = dict(config, **{k: sum(p[k] for p in parts) for k in ("runs", "samples", "ok", "wrong")})
    out.update(seconds=secs, samples_per_s=out["samples"] / secs if secs else 0.0,
               per_round=[{"samples_per_s": p["samples_per_s"], "runs": p["runs"],
                           "p50_ms": float(np.percentile(p["latency_ms"], 50)) if p["latency_ms"] else None}
                          for p in parts])
    if lat.size:
        out.update({"p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
                    "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean())})
    return out


def batch_sweep(bundle, fmt: str, precision: str, layouts: Sequence[tuple], batches: Sequence[int], sample: dict,
                seconds: float = 2.0, server: Optional[dict] = None) -> dict:
    """Bare tail sessions, no server: samples/s at each batch size for each (sessions, threads) layout,
    the sessions running concurrently (spinning off when more than one), the median of three windows of
    ``seconds / 3``. Not interleaved with the server cells: read it as ratios within the sweep.
    ``server``: the in-process config of the batching server (:func:`inprocess_config`); its point, when
    measured, gives "best_vs_server_config" (how much a different batch size or layout would add).
    Returns {"points": [...], "best": {...}, "seconds_per_point", "best_vs_server_config"?}."""
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
    out = {"points": points, "best": best, "seconds_per_point": seconds}
    if server:
        mine = [p for p in points if (p["sessions"], p["threads"], p["batch"])
                == (server["sessions"], server["threads"], server["batch"])]
        if mine:
            out["server_config"] = mine[0]
            out["best_vs_server_config"] = best["samples_per_s"] / mine[0]["samples_per_s"]
    return out


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
    p.add_argument("--duration", type=float, default=20.0, help="seconds per client count and server (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the duration is split into (ABAB); "
                                                          "the targets' ratios are taken per round")
    p.add_argument("--max-requests", type=int, default=100000, help="most requests per client and round")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout per request (s)")
    p.add_argument("--no-baseline", action="store_true", help="do not measure 'serve --no-batching' alongside")
    p.add_argument("--serve-args", default="", help="extra arguments for the batching server it starts, e.g. "
                                                    "'--workers 1 --max-batch 16'")
    p.add_argument("--baseline-args", default="", help="extra arguments for the 'serve --no-batching' server (the "
                                                       "batch-1 path), after the batching workers' --threads and "
                                                       "--spinning it gets by default, e.g. '--spinning on'")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "tflite"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8"],
                   help="graphs for the servers it starts, the references and the ceiling")
    p.add_argument("--samples", type=int, default=16, help="distinct request inputs from the bundle's samples/")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds each cell runs untimed before the rounds (servers at the most clients)")
    p.add_argument("--no-bare", action="store_true",
                   help="skip the in-process cells (bare batched ceiling, bare batch-1 tail)")
    p.add_argument("--sweep-seconds", type=float, default=2.0,
                   help="seconds per point of the batch-size sweep of bare sessions after the rounds (0: skip it)")
    p.add_argument("--sweep-batches", default="1,2,4,8,16,32,64")
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


def _session_options(plan: dict) -> List[str]:
    """``serve`` arguments giving a session the batching workers' threads and spinning (from their plan)."""
    out = ["--threads", str(plan["threads"])] if plan.get("threads") else []
    if plan.get("allow_spinning") is not None:
        out += ["--spinning", "on" if plan["allow_spinning"] else "off"]
    return out


def _load1() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _progress(label: str, k: Optional[int], s: dict) -> None:
    if k is None:  # an in-process cell
        print("%-24s %7.1f samples/s  %d runs, p50 %7.1f ms per run  wrong %d" % (
            label, s["samples_per_s"], s["runs"], float(np.percentile(s["latency_ms"], 50)) if s["latency_ms"]
            else float("nan"), s["wrong"]), file=sys.stderr, flush=True)
        return
    print("%-12s %3d clients: %7.1f req/s  p50 %7.1f ms  p99 %7.1f ms  wrong %d lost %d errors %s"
          % (label, k, s["req_per_s"], s.get("p50_ms", float("nan")), s.get("p99_ms", float("nan")),
             s["wrong"], s["lost"], s["errors"] or 0), file=sys.stderr, flush=True)


def run_loadtest(args) -> int:
    """The ``loadtest`` command (see the module doc). Raises ValueError for bad options."""
    import shlex

    from .bundle import Bundle
    from .chain import Chain
    from .session import pick_backend, pick_precision
    from .serving import build_workers, probe_sample, usable_cores

    clients = sorted(set(_ints(args.clients, "--clients")))
    sweep_batches = _ints(args.sweep_batches, "--sweep-batches")
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        raise ValueError("--duration must be > 0, --rounds >= 1 and --warmup >= 0")
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
    cores = usable_cores()
    req = prepare_requests(bundle, fmt, precision, args.samples)
    output = bundle.manifest.output.name
    servers = []  # (label, proc or None, addr, plan)
    pool = None
    cfg, chains = None, []  # the in-process cells' config and sessions
    cells: Dict[tuple, List[dict]] = {}
    bare: Dict[str, List[dict]] = {"ceiling": [], "batch1": []}
    warm: Dict[str, dict] = {}
    loads: List[float] = []  # 1-minute load average after every measured cell: how shared the machine was
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
                    # the batch-1 path: each request alone through one session with a batching worker's options
                    p, addr, plan_b = start_server(str(bundle.root), common + ["--no-batching"] + _session_options(plan)
                                                   + shlex.split(getattr(args, "baseline_args", "") or ""),
                                                   out / "serve-nobatch.log")
                    servers.append(("no batching", p, addr, plan_b))
            if not args.no_bare:
                plan = servers[0][3]
                if plan is None:  # a server started elsewhere: stand in with what 'serve' would choose here
                    _, sp = build_workers(bundle, "server", fmt, precision, sample=probe_sample(bundle, False))
                    plan = sp.to_json()
                cfg = inprocess_config(plan, cores)
                cfg["from"] = "the batching server's plan" if servers[0][3] else "this machine's serve defaults"
                chains = [Chain(bundle, "server", fmt, precision, cfg["threads"], with_exits=False,
                                allow_spinning=cfg["spinning"], providers=cfg["providers"])
                          for _ in range(cfg["sessions"])]
                ceil_batches = bare_batches(req["feeds"], cfg["batch"])
                one_batches = bare_batches(req["feeds"], 1)
            pool = ClientPool(max(clients), Path(tmp))
            if args.warmup > 0:  # every cell once, untimed: sessions, connections and allocations warm alike
                for label, _, addr, _ in servers:
                    warm[label] = summarize(pool.run(clients[-1], addr, args.warmup, args.max_requests, args.timeout,
                                                     secret), args.warmup)
                if chains:
                    for name, cs, bs in (("ceiling", chains, ceil_batches), ("batch1", chains[:1], one_batches)):
                        w = bare_cell(cs, output, bs, req["reference"], args.warmup)
                        warm[name] = {"wrong": w["wrong"], "ok": w["ok"], "lost": 0}
            per_round = args.duration / args.rounds
            for k in clients:
                for _ in range(args.rounds):
                    for label, _, addr, _ in servers:  # interleaved: A B (C) A B (C)
                        res = pool.run(k, addr, per_round, args.max_requests, args.timeout, secret)
                        cells.setdefault((label, k), []).append({"results": res, "duration": per_round})
                        _progress(label, k, summarize(res, per_round))
                        loads.append(_load1())
                    if chains and k == clients[-1]:
                        bare["ceiling"].append(bare_cell(chains, output, ceil_batches, req["reference"], per_round))
                        _progress("bare batched ceiling", None, bare["ceiling"][-1])
                        loads.append(_load1())
                    if chains and k == clients[0]:
                        bare["batch1"].append(bare_cell(chains[:1], output, one_batches, req["reference"], per_round))
                        _progress("bare batch-1 tail", None, bare["batch1"][-1])
                        loads.append(_load1())
        finally:
            if pool is not None:
                pool.close()
            for _, p, _, _ in servers:
                if p is not None:
                    stop_server(p)
    del chains
    levels = []
    for k in clients:
        levels.append({"clients": k, **{label: _merge(cells[(label, k)]) for label, _, _, _ in servers}})
    result = {
        "bundle": str(bundle.root), "backend": fmt, "precision": precision, "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "cores": cores, "logical_cpus": os.cpu_count(),
        "python": platform.python_version(), "duration_s": args.duration, "rounds": args.rounds,
        "warmup_s": args.warmup, "request_inputs": len(req["tensors"]), "tolerance": TOLERANCE,
        "servers": {label: {"address": addr, "plan": plan, "started_here": p is not None}
                    for label, p, addr, plan in servers},
        "levels": levels, "warmup": warm,
    }
    if cfg is not None:
        result["ceiling"] = _merge_bare(bare["ceiling"], cfg)
        result["bare_batch1"] = _merge_bare(bare["batch1"], dict(cfg, sessions=1, batch=1))
    if args.sweep_seconds > 0:
        layouts = [(1, cores)]
        if cfg is not None and cfg["threads"]:
            layouts.append((cfg["sessions"], cfg["threads"]))
        if cores > 1:
            layouts.append((cores, 1))
        if cfg is not None and cfg["batch"] not in sweep_batches:
            sweep_batches = sorted(sweep_batches + [cfg["batch"]])
        result["batch_sweep"] = batch_sweep(bundle, fmt, precision, list(dict.fromkeys(layouts)), sweep_batches,
                                            probe_sample(bundle, False), args.sweep_seconds, cfg)
    result["load_average"] = {"before": list(load_before) if load_before else None,
                              "after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                              "cells_1min": [round(v, 2) for v in loads if v is not None]}
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


def _spread(values: Sequence[float]) -> dict:
    """Median ("ratio"), quartiles and every value of per-round ratios."""
    a = np.asarray(values, dtype=float)
    return {"ratio": float(np.median(a)), "q25": float(np.percentile(a, 25)), "q75": float(np.percentile(a, 75)),
            "per_round": [round(float(v), 4) for v in a]}


def targets(r: dict) -> dict:
    """The issue's targets from one run's numbers, each a ratio taken per round (the cells it divides ran
    next to each other) with its median ("ratio"), quartiles and the pooled value:

    - throughput_vs_ceiling: batching req/s at the most clients / the bare batched ceiling (target >= 0.8);
    - p99_over_p50: at the most clients, with batching (target <= 3);
    - lone_device_vs_batch1_path: p50 at the fewest clients, batching / the batch-1 path (``serve
      --no-batching``, same session options; target <= 1.10);
    - lone_device_vs_bare_batch1: the same p50 / the bare batch-1 tail in-process (the whole cost of the
      server and the wire at one device; no target);
    - wrong_answers, lost_replies: over every cell and warm-up (target 0).
    """
    levels = r["levels"]
    out: Dict[str, object] = {}
    top, lone = levels[-1], levels[0]
    b = top.get("batching") or top.get("server")
    ceil = r.get("ceiling")
    if b and ceil and ceil.get("samples_per_s"):
        vals = [x["req_per_s"] / y["samples_per_s"] for x, y in zip(b["per_round"], ceil["per_round"])
                if y["samples_per_s"] > 0]
        out["throughput_vs_ceiling"] = dict(_spread(vals), clients=top["clients"], req_per_s=b["req_per_s"],
                                            ceiling_samples_per_s=ceil["samples_per_s"],
                                            pooled=b["req_per_s"] / ceil["samples_per_s"], target=0.8, better="higher")
    if b and b.get("p50_ms"):
        vals = [x["p99_ms"] / x["p50_ms"] for x in b["per_round"] if x.get("p50_ms")]
        out["p99_over_p50"] = dict(_spread(vals), clients=top["clients"], p50_ms=b["p50_ms"], p99_ms=b["p99_ms"],
                                   pooled=b["p99_ms"] / b["p50_ms"], target=3.0, better="lower")
    lb = lone.get("batching") or lone.get("server")
    for key, other, of, target in (("lone_device_vs_batch1_path", lone.get("no batching"), "p50_ms", 1.10),
                                   ("lone_device_vs_bare_batch1", r.get("bare_batch1"), "p50_ms", None)):
        if lb and other and lb.get("p50_ms") and other.get(of):
            vals = [x["p50_ms"] / y[of] for x, y in zip(lb["per_round"], other["per_round"]) if x.get("p50_ms") and y.get(of)]
            out[key] = dict(_spread(vals), clients=lone["clients"], server_p50_ms=lb["p50_ms"], other_p50_ms=other[of],
                            pooled=lb["p50_ms"] / other[of], target=target, better="lower")
    for t in out.values():
        if t.get("target") is not None:
            t["met"] = t["ratio"] >= t["target"] if t["better"] == "higher" else t["ratio"] <= t["target"]
    cells = [c for lv in levels for key, c in lv.items() if key != "clients"]
    cells += [c for c in (r.get("ceiling"), r.get("bare_batch1")) if c] + list((r.get("warmup") or {}).values())
    out["wrong_answers"] = sum(c["wrong"] for c in cells)
    out["lost_replies"] = sum(c.get("lost", 0) for c in cells)
    return out


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))

"""``serve --engine ray``: the tail as a Ray Serve deployment of N replicas, batched by Ray's
``@serve.batch``, behind the same TCP front end the devices already speak to.

The front end is an :class:`runtime.server.EdgeServer` whose tail forwards each decoded request to the
deployment handle from its connection thread (no lock: Ray gathers concurrent calls into batches on each
replica). Devices change nothing. The replicas receive the bundle's manifest and server graphs as bytes in
their constructor arguments and check them against the manifest's sha256 on their own node, so a cluster
started with ``ray start`` on several machines needs no shared folder: ``serve`` joins the cluster given by
``--ray-address`` / ``$RAY_ADDRESS``, or the one ``ray start`` left on this machine, or starts a local one.

Faults: a replica that dies while running a request is retried once on another replica by the front end;
if that fails too the device gets ERROR ``replica_lost``, which :class:`runtime.client.EdgeClient` resends
once. Ray's own back-pressure (``max_queued_requests``) answers ``busy``.

Ray moves tensors between the front end and the replicas with its own serialisation: run the cluster on
machines you trust, as Ray's documentation says. Only ``serve --engine ray`` imports this module; the
board runtime never does. Needs ``pip install eetool[ray]``.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

__all__ = ["serve_ray", "bundle_files", "APP_NAME"]

log = logging.getLogger("eetool.server")

APP_NAME = "eetool-tail"
INSTALL_HINT = "--engine ray needs Ray Serve: pip install 'eetool[ray]' (ray[serve]==2.60.0)"


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RuntimeError("%s (%s)" % (INSTALL_HINT, exc))
    return ray, serve


def bundle_files(bundle, side: str, fmt: str, precision: str) -> Dict[str, bytes]:
    """The manifest and the graphs of ``side`` as relative path -> bytes: what a replica on another node needs."""
    segs = bundle.segments if side == "all" else [s for s in bundle.segments if s.side == side]
    files = {"manifest.json": (bundle.root / "manifest.json").read_bytes()}
    for s in segs:
        rel = bundle.graph(bundle.graph_key(s, fmt, precision)).file
        files[rel] = (bundle.root / rel).read_bytes()
    return files


class TailReplica(object):
    """One replica: the bundle's ``side`` graphs in a folder of its own, checked by sha256, run as a Chain.

    ``__call__`` takes one request's inputs (name -> (n, ...) float32) and is batched by ``@serve.batch``
    (applied in :func:`make_deployment`) across the concurrent calls this replica receives."""

    def __init__(self, files: Dict[str, bytes], side: str, fmt: str, precision: str, threads: Optional[int]):
        from .bundle import Bundle
        from .chain import Chain

        self._dir = tempfile.mkdtemp(prefix="eetool-replica-")
        for rel, data in files.items():
            path = Path(self._dir) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        bundle = Bundle.load(self._dir, verify=False)
        bundle.verify([rel for rel in files if rel != "manifest.json"])  # what arrived is what was exported
        self.chain = Chain(bundle, side, fmt, precision, threads, with_exits=False)
        self.output = bundle.manifest.output.name

    def run_batch(self, requests: List[Dict[str, np.ndarray]]) -> List[Dict[str, np.ndarray]]:
        counts = [len(next(iter(r.values()))) for r in requests]
        feeds = {k: np.concatenate([r[k] for r in requests], axis=0) for k in requests[0]}
        logits = self.chain.run_segments(feeds)[self.output]
        if len(logits) != sum(counts):
            raise ValueError("tail returned %d rows for a batch of %d" % (len(logits), sum(counts)))
        out, start = [], 0
        for n in counts:
            out.append({"logits": logits[start:start + n]})
            start += n
        return out


def make_deployment(serve, replicas: int, max_batch: int, max_wait_ms: float, num_cpus: float, max_queued: int):
    """The Ray Serve deployment class: :class:`TailReplica` with ``@serve.batch`` on its entry point."""

    @serve.deployment(name="TailDeployment", num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=max(2 * max_batch, 8), max_queued_requests=max_queued)
    class TailDeployment(TailReplica):
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_wait_ms / 1e3)
        async def __call__(self, requests: List[Dict[str, np.ndarray]]) -> List[Dict[str, np.ndarray]]:
            return self.run_batch(requests)

    return TailDeployment


def _replica_died(ray, exc: BaseException) -> bool:
    kinds = tuple(k for k in (getattr(ray.exceptions, n, None) for n in
                              ("ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorUnschedulableError"))
                  if k is not None)
    return isinstance(exc, kinds)


def make_tail(ray, handle, timeout_s: float = 60.0):
    """The front end's tail: one deployment call per request, retried once when the replica died."""
    from .server import TailError

    try:
        from ray.serve.exceptions import BackPressureError as backpressure
    except ImportError:
        backpressure = None

    def tail(feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        for attempt in (1, 2):
            try:
                return handle.remote(feeds).result(timeout_s=timeout_s)
            except Exception as exc:
                if backpressure is not None and isinstance(exc, backpressure):
                    raise TailError("busy", "all replicas are full: %s" % exc)
                if not _replica_died(ray, exc):
                    raise
                log.warning("replica lost (attempt %d): %s", attempt, str(exc).splitlines()[0][:200])
                if attempt == 2:
                    raise TailError("replica_lost", "the replica running this request died twice; resend it")
        raise AssertionError("unreachable")

    return tail


def serve_ray(args, bundle, opts) -> int:
    """Deploy the tail on Ray Serve and serve devices through the TCP front end until SIGINT / SIGTERM.
    ``opts``: the :class:`runtime.session.ServerOptions` of the command; ``args`` adds ``replicas`` and
    ``ray_address``."""
    import json

    from .server import EdgeServer, run_until_signal
    from .session import server_inputs

    fmt, precision, expected, what = server_inputs(bundle, opts)
    side = "all" if opts.whole_model else "server"
    secret = opts.secret or os.environ.get("EETOOL_SECRET")
    if args.replicas < 1:
        raise ValueError("--replicas %d: must be at least 1" % args.replicas)
    if args.input_file:
        raise ValueError("--engine ray serves tensors; --input-file is for the local engine")
    if args.device != "cpu" or args.provider:
        raise ValueError("--engine ray runs replicas on the CPU here; give replicas GPUs with Ray's own resources")
    # Ray Serve takes over this process's stdout once it starts; keep a handle on the real one for the
    # start-up lines (the address and the plan) that scripts read
    out = os.fdopen(os.dup(1), "w", buffering=1)
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        # a new single-machine instance on the loopback interface (Ray's own switch, read at import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray, serve = _import_ray()
    max_batch = args.max_batch or 16
    max_wait_ms = 2.0 if args.max_wait_ms is None else args.max_wait_ms
    threads = args.threads or 1
    if not ray.is_initialized():
        # no address: Ray joins the cluster 'ray start' left on this machine, or starts a local one
        # py_modules ships this runtime package to every node: a 'ray start' cluster needs only Ray, numpy and
        # onnxruntime installed there
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
    try:
        serve.start(http_options={"location": "NoServer"})
        dep = make_deployment(serve, args.replicas, max_batch, max_wait_ms, threads, max_queued=args.max_queue or 256)
        t0 = time.perf_counter()
        handle = serve.run(dep.bind(bundle_files(bundle, side, fmt, precision), side, fmt, precision, threads),
                           name=APP_NAME, route_prefix=None)
        deploy_s = time.perf_counter() - t0
        server = EdgeServer(make_tail(ray, handle), expected, host=args.host, port=args.port, secret=secret,
                            max_connections=args.max_connections, idle_timeout_s=args.idle_timeout, batching=False,
                            concurrent_tail=True)
    except BaseException:
        _teardown(ray, serve)
        raise
    host, port = server.address
    print("eetool server: %s %s (%s/%s, Ray Serve) on %s:%d" % (bundle.root, what, fmt, precision, host, port),
          file=out, flush=True)
    plan = {"engine": "ray", "replicas": args.replicas, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
            "threads": threads, "ray_address": ray.get_runtime_context().gcs_address, "deploy_s": round(deploy_s, 1),
            "batching": True, "workers": args.replicas,
            "reasons": ["Ray Serve: %d replicas of %d CPU each, @serve.batch(max_batch_size=%d, batch_wait_timeout_s=%g)"
                        % (args.replicas, threads, max_batch, max_wait_ms / 1e3)]}
    for line in plan["reasons"]:
        print("  " + line, file=out, flush=True)
    print("plan " + json.dumps(plan, sort_keys=True), file=out, flush=True)
    try:
        run_until_signal(server)
    finally:
        _teardown(ray, serve)
    return 0


def _teardown(ray, serve) -> None:
    """Delete the app (other apps on a shared cluster stay) and disconnect; a local instance this process
    started stops with it."""
    try:
        serve.delete(APP_NAME)
    except Exception as exc:  # the cluster may already be gone
        log.warning("could not delete the Ray Serve app: %s", exc)
    ray.shutdown()

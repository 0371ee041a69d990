"""Edge server: receives split tensors, runs the tail graph, replies with logits and top-k.

One thread per connection (bounded by ``max_connections``) reads a frame, validates and decodes it,
and hands the request to a :class:`runtime.batching.Batcher`: requests from every connection share
one queue, and each of the batcher's workers (one tail session each) runs what has arrived as one
batch. The connection thread then sends its own reply, so replies stay in order per connection and a
client that vanishes costs only its reply. ``batching=False`` instead runs every request in its
connection thread through one tail behind a lock (the server before batching; kept for comparison).

A bad frame only ever affects its own connection: framing errors (bad magic, oversize, truncated,
timeout) get an ERROR frame when possible and the connection is closed; content errors (bad JSON,
wrong names / shapes / dtypes, a failing tail) get an ERROR frame and the connection stays usable. A
tail that raises fails only the requests of its batch; a full queue answers ``busy`` at once. The
server never dies on peer input.

Logs go to the ``eetool.server`` logger (stderr when started through :func:`run_until_signal`).
Python 3.8 compatible; numpy + stdlib only.
"""
from __future__ import annotations

import logging
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import protocol as P
from .batching import Batcher, BatchError

__all__ = ["EdgeServer", "TailError", "run_until_signal", "topk_softmax", "ERROR_CODES"]

log = logging.getLogger("eetool.server")

TailFn = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]

#: codes of ERROR frames the server sends, beyond the ProtocolError codes of runtime.protocol.
ERROR_CODES = {
    "wrong_inputs": "tensor names differ from the tail's inputs",
    "wrong_shape": "a tensor's shape does not match the tail's input",
    "wrong_dtype": "a tensor cannot be converted to the tail's input dtype",
    "tail_failed": "the tail function raised or returned something unusable",
    "unexpected_type": "the client sent a frame type the server does not accept",
    "busy": "too many connections, or the request queue is full",
    "tail_timeout": "the tail did not answer within the server's tail timeout",
    "replica_lost": "the replica running the request died (scale-out engine); resending it is safe",
    "shutting_down": "the server is stopping",
    "internal": "unexpected server error",
}

_AUTH_CODES = (P.AUTH_REQUIRED, P.BAD_HMAC)


def topk_softmax(logits: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k classes of logits.

    Args:
        logits: (N, C) float array.
        k: number of classes to return (clipped to C).

    Returns:
        (indices (N, k) int32 sorted by decreasing score, ties by lower index;
         scores (N, k) float32 softmax probabilities).
    """
    x = np.asarray(logits, dtype=np.float32)
    k = max(1, min(int(k), x.shape[1]))
    shifted = x - x.max(axis=1, keepdims=True)
    ex = np.exp(shifted)
    prob = ex / ex.sum(axis=1, keepdims=True)
    idx = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(prob, idx, axis=1).astype(np.float32)


class TailError(Exception):
    """Raised by a tail function to answer the request with ERROR ``code`` (one of ERROR_CODES, e.g.
    ``replica_lost`` or ``busy``) instead of ``tail_failed``."""

    def __init__(self, code: str, message: str):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


class _RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _NoLock(object):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


class EdgeServer:
    """TCP server running the tail graph for device clients.

    Args:
        tail: function name -> float32 (B, ...) array (the tail's inputs, batch first) to name -> (B, ...)
            array (its outputs), or a list of such functions, one per batching worker (each its own
            session). The output named ``logits`` (or the only output) must be (B, C) float.
        expected: name -> {"shape": [None, C, H, W], "dtype": "float32"} of the tail's inputs;
            None in a shape matches any size.
        host: address to bind (default 127.0.0.1).
        port: TCP port, 0 = pick a free one (see :attr:`address`).
        secret: shared secret; when set every frame must carry a valid HMAC tag and replies are
            tagged.
        max_frame_bytes: largest accepted frame (bytes, default 64 MiB).
        topk: number of classes in the top-k part of a reply.
        max_connections: concurrent connections served; beyond it a new client gets ERROR "busy".
        frame_timeout_s: seconds a client has from the first to the last byte of a frame.
        idle_timeout_s: seconds an idle connection is kept open between frames.
        reply_logits: include the full logits tensor in replies (False: top-k only).
        batching: run requests through a :class:`runtime.batching.Batcher` (default); False: each
            request in its connection thread through ``tail`` (one function) behind a lock, at its own batch.
        concurrent_tail: with ``batching=False``, call ``tail`` from every connection thread at once, without
            the lock (a tail that batches on its own, e.g. a Ray Serve deployment handle).
        max_batch: most samples in one batch.
        max_wait_ms: longest a batch waits for more requests after its first arrived (ms).
        max_queue: most requests waiting for a worker; beyond it a request gets ERROR "busy" at once
            (default: 2 x max_batch x workers, at least 16).
        prepare: optional function run on each request's decoded inputs in its connection thread, before
            batching (e.g. decoding an image file); returns the tail's inputs with a batch dimension.
        tail_timeout_s: longest a connection waits for its batch (s); then ERROR "tail_timeout".

    Raises:
        OSError: the address cannot be bound.
        ValueError: bad ``expected`` description, bad batching limits, several tails without batching.
    """

    def __init__(self, tail: Union[TailFn, Sequence[TailFn]], expected: Mapping[str, Mapping[str, Any]],
                 host: str = "127.0.0.1", port: int = 0, secret: Union[None, str, bytes] = None,
                 max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES, topk: int = 5,
                 max_connections: int = 64, frame_timeout_s: float = 30.0, idle_timeout_s: float = 300.0,
                 reply_logits: bool = True, batching: bool = True, max_batch: int = 32, max_wait_ms: float = 2.0,
                 max_queue: Optional[int] = None, prepare: Optional[TailFn] = None, tail_timeout_s: float = 60.0,
                 concurrent_tail: bool = False):
        self._tails = list(tail) if isinstance(tail, (list, tuple)) else [tail]
        if not self._tails or not all(callable(t) for t in self._tails):
            raise ValueError("tail must be a function or a non-empty list of functions")
        if not batching and len(self._tails) != 1:
            raise ValueError("batching=False runs one tail; got %d" % len(self._tails))
        self._tail = self._tails[0]
        self._prepare = prepare
        self.expected = self._check_expected(expected)
        self.secret = secret
        self.max_frame_bytes = int(max_frame_bytes)
        self.topk = int(topk)
        self.max_connections = int(max_connections)
        self.frame_timeout_s = float(frame_timeout_s)
        self.idle_timeout_s = float(idle_timeout_s)
        self.tail_timeout_s = float(tail_timeout_s)
        self.reply_logits = bool(reply_logits)
        self._max_raw = self._max_raw_bytes()
        self._tail_lock = _NoLock() if concurrent_tail else threading.Lock()
        self._conn_lock = threading.Lock()
        self._conns: Dict[socket.socket, threading.Thread] = {}
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._stats_lock = threading.Lock()
        self.stats: Dict[str, int] = {"connections": 0, "requests": 0, "replies": 0, "errors": 0, "rejected": 0}
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.batcher = None  # type: Optional[Batcher]
        if batching:
            queue = max_queue if max_queue is not None else max(16, 2 * int(max_batch) * len(self._tails))
            try:
                self.batcher = Batcher(self._tails, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=queue,
                                       sources=lambda: len(self._conns))
            except ValueError:
                for s in (self._listener, self._wake_r, self._wake_w):
                    s.close()
                raise

    def describe(self) -> Dict[str, Any]:
        """How requests are run: workers, batching limits (for the startup log and tests)."""
        if self.batcher is None:
            return {"batching": False, "workers": 1}
        b = self.batcher
        return {"batching": True, "workers": len(b.runners), "max_batch": b.max_batch,
                "max_wait_ms": b.max_wait_s * 1e3, "max_queue": b.max_queue}

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _check_expected(expected: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
        if not expected:
            raise ValueError("expected must describe at least one tail input")
        out = {}
        for name, spec in expected.items():
            shape = spec.get("shape")
            if not isinstance(shape, (list, tuple)) or not all(d is None or (isinstance(d, int) and d >= 0) for d in shape):
                raise ValueError("expected[%r].shape must be a list of ints / None, got %r" % (name, shape))
            dtype = str(spec.get("dtype", "float32"))
            np.dtype(dtype)
            out[str(name)] = {"shape": list(shape), "dtype": dtype}
        return out

    def _max_raw_bytes(self) -> int:
        # Largest raw (decompressed) tensor a request may declare: 4x the frame limit. Shapes are
        # checked against `expected` before anything is decompressed.
        return max(4 * self.max_frame_bytes, 1)

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) actually bound."""
        host, port = self._listener.getsockname()[:2]
        return host, port

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    # ------------------------------------------------------------------ serving
    def serve_forever(self, poll_s: float = 0.5) -> None:
        """Accept and serve connections until :meth:`shutdown` / :meth:`request_shutdown`."""
        self._stopped.clear()
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ, "accept")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            log.info("eetool edge server listening on %s:%d", *self.address)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=poll_s):
                    if key.data == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    elif not self._stop.is_set():
                        self._accept()
        finally:
            sel.close()
            self._close_all()
            self._stopped.set()
            log.info("eetool edge server stopped")

    def _accept(self) -> None:
        for _ in range(64):  # drain the backlog a bit, bounded
            try:
                conn, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(True)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            with self._conn_lock:
                busy = len(self._conns) >= self.max_connections
                if not busy:
                    t = threading.Thread(target=self._serve_conn, args=(conn, addr), daemon=True,
                                         name="eetool-conn-%s:%s" % addr[:2])
                    self._conns[conn] = t
            if busy:
                self._count("rejected")
                log.warning("rejecting %s:%s: %d connections already open", addr[0], addr[1], self.max_connections)
                self._send_quiet(conn, P.encode_error(0, "busy", "server busy: %d connections open" % self.max_connections,
                                                      self.secret, 1))  # version 1: every client reads it
                self._close_quiet(conn)
                continue
            self._count("connections")
            t.start()

    def _serve_conn(self, conn: socket.socket, addr) -> None:
        peer = "%s:%s" % tuple(addr[:2])
        try:
            while not self._stop.is_set():
                try:
                    frame = P.read_frame(conn, self.max_frame_bytes, timeout=self.frame_timeout_s,
                                         secret=self.secret, idle_timeout=self.idle_timeout_s)
                except P.ProtocolError as exc:
                    if exc.code == P.CLOSED or self._stop.is_set():
                        return
                    self._count("errors")
                    log.warning("%s: %s", peer, exc)
                    rid = exc.request_id or 0
                    if exc.code != P.TIMEOUT:
                        self._send_quiet(conn, P.encode_error(rid, exc.code, exc.message, self.secret, exc.version or 1))
                    if exc.fatal or exc.code in _AUTH_CODES:
                        return
                    continue
                if frame.msg_type == P.PING:
                    self._send(conn, P.encode_pong(frame.request_id, self.secret, frame.version))
                elif frame.msg_type == P.REQUEST:
                    self._count("requests")
                    self._send(conn, self._handle_request(frame, peer))
                else:
                    self._count("errors")
                    self._send(conn, P.encode_error(frame.request_id, "unexpected_type",
                                                    "server accepts REQUEST and PING, got %s" % frame.type_name, self.secret,
                                                    frame.version))
        except OSError as exc:
            if not self._stop.is_set():
                log.info("%s: connection dropped: %s", peer, exc)
        except Exception:  # never let one connection take the server down
            log.exception("%s: unexpected error", peer)
        finally:
            self._close_quiet(conn)
            with self._conn_lock:
                self._conns.pop(conn, None)

    def _handle_request(self, frame: P.Frame, peer: str) -> bytes:
        rid, version = frame.request_id, frame.version  # the reply speaks the request's protocol version
        t_in = time.perf_counter()
        try:
            specs = P.parse_tensor_specs(frame.header, len(frame.payload), rid, self._max_raw)
            self._validate(specs)  # before any decompression
            msg = P.RequestMessage(rid, specs, P.decode_tensors(frame.payload, specs, rid))
            inputs = self._to_inputs(msg)
            if self._prepare is not None:
                try:
                    inputs = self._prepare(inputs)
                except Exception as exc:
                    raise _RequestError("tail_failed", "preparing the input failed: %s: %s" % (type(exc).__name__, exc))
            meta = None
            if self.batcher is not None:
                outputs, tail_ms, meta = self._run_batched(inputs)
            else:
                with self._tail_lock:
                    t0 = time.perf_counter()
                    try:
                        outputs = self._tail(inputs)
                    except TailError as exc:
                        log.warning("%s: request %d: %s", peer, rid, exc)
                        raise _RequestError(exc.code, exc.message)
                    except Exception as exc:
                        log.exception("%s: tail raised on request %d", peer, rid)
                        raise _RequestError("tail_failed", "tail raised %s: %s" % (type(exc).__name__, exc))
                    tail_ms = (time.perf_counter() - t0) * 1000.0
            reply = self._reply_tensors(outputs)
            # the request's whole time here (decoding, queue, tail): a device timing its link subtracts this,
            # not tail_ms alone, or a wait for a worker would read as a slow link
            meta = dict(meta or {}, server_ms=round((time.perf_counter() - t_in) * 1000.0, 3))
            out = P.encode_reply(rid, reply, tail_ms, self.secret, meta=meta, version=version)
            self._count("replies")
            return out
        except P.ProtocolError as exc:
            self._count("errors")
            log.warning("%s: request %d rejected: %s", peer, rid, exc)
            return P.encode_error(rid, exc.code, exc.message, self.secret, version)
        except _RequestError as exc:
            self._count("errors")
            log.warning("%s: request %d rejected: %s: %s", peer, rid, exc.code, exc.message)
            return P.encode_error(rid, exc.code, exc.message, self.secret, version)
        except Exception as exc:
            self._count("errors")
            log.exception("%s: request %d failed", peer, rid)
            return P.encode_error(rid, "internal", "%s: %s" % (type(exc).__name__, exc), self.secret, version)

    def _run_batched(self, inputs: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], float, Dict[str, Any]]:
        """Queue one request, wait for its batch; (its outputs, the batch's tail ms, reply meta)."""
        try:
            pending = self.batcher.submit(inputs)
            outputs = pending.wait(self.tail_timeout_s)
        except BatchError as exc:
            code = "tail_timeout" if exc.code == "timeout" else exc.code
            raise _RequestError(code, exc.message)
        except ValueError as exc:
            raise _RequestError("wrong_shape", str(exc))
        return outputs, pending.run_ms, {"batch": pending.batch, "queue_ms": round(pending.queue_ms, 3)}

    def _describe_expected(self) -> str:
        return ", ".join("%s %s %s" % (n, _fmt_shape(s["shape"]), s["dtype"]) for n, s in self.expected.items())

    def _validate(self, specs: List[P.TensorSpec]) -> None:
        got = {s.name: s for s in specs}
        if set(got) != set(self.expected):
            raise _RequestError("wrong_inputs", "expected tensors {%s}, got {%s}" % (
                self._describe_expected(), ", ".join("%s %s %s" % (s.name, _fmt_shape(s.shape), s.dtype) for s in specs)))
        for name, exp in self.expected.items():
            s = got[name]
            shape = exp["shape"]
            ok = len(shape) == len(s.shape) and all(e is None or e == g for e, g in zip(shape, s.shape))
            if not ok:
                raise _RequestError("wrong_shape", "tensor %r: expected shape %s, got %s" % (
                    name, _fmt_shape(shape), _fmt_shape(s.shape)))
            if np.dtype(exp["dtype"]).kind == "f" and s.scale is None and s.dtype not in ("float16", "float32"):
                raise _RequestError("wrong_dtype", "tensor %r: expected %s (or int8/uint8 with scale and zero_point), got %s"
                                    % (name, exp["dtype"], s.dtype))
            if np.dtype(exp["dtype"]).kind in "iu" and (s.dtype != exp["dtype"] or s.scale is not None):
                raise _RequestError("wrong_dtype", "tensor %r: expected raw %s (no scale / zero point), got %s%s"
                                    % (name, exp["dtype"], s.dtype, " quantised" if s.scale is not None else ""))

    def _to_inputs(self, msg: P.RequestMessage) -> Dict[str, np.ndarray]:
        # integer inputs (e.g. an encoded image file's bytes) go to the tail as sent; float ones dequantised
        deq = msg.dequantized()
        return {name: msg.tensors[name] if np.dtype(exp["dtype"]).kind in "iu"
                else deq[name].astype(exp["dtype"], copy=False) for name, exp in self.expected.items()}

    def _reply_tensors(self, outputs: Any) -> Dict[str, np.ndarray]:
        if not isinstance(outputs, Mapping) or not outputs:
            raise _RequestError("tail_failed", "tail must return a non-empty dict of arrays, got %s" % type(outputs).__name__)
        if "logits" in outputs:
            logits = outputs["logits"]
        elif len(outputs) == 1:
            logits = next(iter(outputs.values()))
        else:
            raise _RequestError("tail_failed", "tail returned %s; expected a 'logits' output" % sorted(outputs))
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.dtype.kind not in "fiu" or logits.shape[1] == 0:
            raise _RequestError("tail_failed", "logits must be (N, C) numeric, got %s %s" % (logits.shape, logits.dtype))
        logits = logits.astype(np.float32, copy=False)
        if not np.all(np.isfinite(logits)):
            raise _RequestError("tail_failed", "logits contain NaN or inf")
        idx, scores = topk_softmax(logits, self.topk)
        reply = {"topk_indices": idx, "topk_scores": scores}
        if self.reply_logits:
            reply = {"logits": logits, "topk_indices": idx, "topk_scores": scores}
        return reply

    # ------------------------------------------------------------------ io helpers
    @staticmethod
    def _send(conn: socket.socket, data: bytes) -> None:
        conn.settimeout(30.0)
        conn.sendall(data)

    @staticmethod
    def _send_quiet(conn: socket.socket, data: bytes) -> None:
        try:
            conn.settimeout(2.0)
            conn.sendall(data)
        except OSError:
            pass

    @staticmethod
    def _close_quiet(conn: socket.socket) -> None:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            conn.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ shutdown
    def request_shutdown(self) -> None:
        """Ask :meth:`serve_forever` to stop; returns at once (safe from a signal handler)."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop serving: close the listener and every connection, wait up to ``timeout_s`` for
        :meth:`serve_forever` and the connection threads to end. Call from another thread than
        serve_forever (from a signal handler use :meth:`request_shutdown`)."""
        self.request_shutdown()
        self._stopped.wait(timeout_s)
        self._close_all(timeout_s)
        for s in (self._listener, self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass

    def _close_all(self, timeout_s: float = 5.0) -> None:
        with self._conn_lock:
            items = list(self._conns.items())
        for conn, _ in items:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        if self.batcher is not None:  # queued requests end with shutting_down; running batches finish
            self.batcher.close(timeout_s)
        for _, thread in items:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Alias of :meth:`shutdown`."""
        self.shutdown()

    def __enter__(self) -> "EdgeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _setup_stderr_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("eetool")
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def run_until_signal(server: EdgeServer, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
                     log_level: int = logging.INFO) -> Optional[int]:
    """Serve until SIGINT or SIGTERM, then shut down cleanly. Must run in the main thread.

    Logs to stderr. Previous signal handlers are restored before returning.

    Returns:
        The number of the signal that stopped the server (None if stopped otherwise).
    """
    _setup_stderr_logging(log_level)
    received: List[int] = []

    def handler(signum, _frame):
        received.append(signum)
        log.info("signal %d received, shutting down", signum)
        server.request_shutdown()

    previous = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        server.serve_forever()
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        server.shutdown()
    return received[0] if received else None

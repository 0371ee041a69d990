"""Device-side client: sends quantized split tensors to the edge server and returns its result.

On a timeout or a refused connection :class:`EdgeClient.infer` raises :class:`ServerUnavailable`
so the device can fall back to its best early-exit result. A connection that breaks (reset, closed,
broken pipe) is re-established once and the request resent (inference is idempotent); so is a request the
server answers ``replica_lost`` (a scale-out replica died while running it).

Python 3.8 compatible; numpy + stdlib only (zstandard / lz4 / brotli for those codecs).
"""
from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import protocol as P
from .link import LinkShaper

__all__ = ["EdgeClient", "Reply", "EdgeClientError", "ServerUnavailable", "ServerError", "BadReply"]

_BROKEN = (P.CLOSED, P.TRUNCATED)
#: ERROR codes after which the request is sent once more (the server says resending is safe)
RETRY_ONCE_CODES = frozenset(["replica_lost"])
_CLOSE_AFTER = frozenset([P.BAD_MAGIC, P.UNSUPPORTED_VERSION, P.BAD_TYPE, P.BAD_FLAGS, P.OVERSIZE,
                          P.TRUNCATED, P.TIMEOUT, P.AUTH_REQUIRED, P.BAD_HMAC, "busy", "shutting_down"])


class EdgeClientError(Exception):
    """Base class of every error :class:`EdgeClient` raises (catch this to degrade gracefully)."""


class ServerUnavailable(EdgeClientError):
    """The server could not be reached or did not answer in time (refused, timeout, connection
    broken twice)."""


class ServerError(EdgeClientError):
    """The server answered with an ERROR frame.

    Attributes: code (e.g. "wrong_shape", "bad_hmac"), message, request_id.
    """

    def __init__(self, code: str, message: str, request_id: int = 0):
        super().__init__("server error %s: %s" % (code, message))
        self.code = code
        self.message = message
        self.request_id = request_id


class BadReply(EdgeClientError):
    """The server's answer violated the protocol (bad HMAC, malformed, wrong request id).

    Attributes: code (a runtime.protocol error code), message.
    """

    def __init__(self, code: str, message: str):
        super().__init__("bad reply %s: %s" % (code, message))
        self.code = code
        self.message = message


@dataclass
class Reply:
    """Result of one :meth:`EdgeClient.infer` call.

    Attributes:
        request_id: id of the request.
        logits: (N, C) float32, or None when the server sends top-k only.
        topk_indices: (N, k) int32 class indices, best first.
        topk_scores: (N, k) float32 softmax probabilities.
        tail_ms: the server's own time in the tail graph (ms).
        network_ms: wall time from the first byte sent to the reply fully received (ms),
            including the server's time and any emulated link delay.
        encode_ms: time to build the request frame, compression included (ms).
        bytes_sent: size of the request frame (bytes).
        bytes_received: size of the reply frame (bytes).
        attempts: 1, or 2 after a reconnect.
        tensors: every tensor of the reply by name.
        meta: the reply's meta object.
    """

    request_id: int
    logits: Optional[np.ndarray]
    topk_indices: np.ndarray
    topk_scores: np.ndarray
    tail_ms: float
    network_ms: float
    encode_ms: float
    bytes_sent: int
    bytes_received: int
    attempts: int = 1
    tensors: Dict[str, np.ndarray] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def transfer_ms(self) -> float:
        """network_ms minus the server's tail_ms: transport + (de)serialisation overhead (ms)."""
        return self.network_ms - self.tail_ms

    @property
    def wire_ms(self) -> float:
        """network_ms minus the server's whole time on the request (``meta["server_ms"]``: decoding, queue and
        tail; ``tail_ms`` from a server that does not send it): the link's share of the exchange (ms)."""
        server = self.meta.get("server_ms") if isinstance(self.meta, dict) else None
        if not isinstance(server, (int, float)) or isinstance(server, bool) or not server >= 0:
            server = self.tail_ms
        return max(0.0, self.network_ms - max(float(server), self.tail_ms))

    @property
    def topk(self) -> List[List[Tuple[int, float]]]:
        """Per sample, the list of (class index, probability), best first."""
        return [[(int(i), float(s)) for i, s in zip(ri, rs)] for ri, rs in zip(self.topk_indices, self.topk_scores)]


class EdgeClient:
    """Connection to an :class:`runtime.server.EdgeServer`. One request at a time (calls are
    serialised by a lock); use one client per thread for parallel requests.

    Args:
        host, port: server address.
        secret: shared secret (str or bytes) for HMAC-SHA256 tags; must match the server's.
        timeout_s: seconds for connecting and for each reply (server time included).
        shaper: optional :class:`runtime.link.LinkShaper` emulating a slower link.
        codec: "zstd", "lz4", "brotli" or "none" for the request tensors.
        level: codec level (None: codec default).
        max_frame_bytes: largest reply accepted (bytes).
        layout: layout label sent with 4-D tensors.
        protocol_version: wire protocol version of the requests and pings (``runtime.protocol.VERSION``;
            1 talks to an edge server whose runtime predates version 2).

    Raises:
        codec.CodecUnavailable: the codec's package is missing (raised at construction).
    """

    def __init__(self, host: str, port: int, secret: Union[None, str, bytes] = None, timeout_s: float = 5.0,
                 shaper: Optional[LinkShaper] = None, codec: str = "zstd", level: Optional[int] = None,
                 max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES, layout: Optional[str] = "NCHW",
                 protocol_version: int = P.VERSION):
        from . import codec as _codec
        _codec.check_codec(codec)
        if protocol_version not in P.SUPPORTED_VERSIONS:
            raise ValueError("protocol_version %r not supported (%s)" % (protocol_version, P.SUPPORTED_VERSIONS))
        self.protocol_version = int(protocol_version)
        self.host = host
        self.port = int(port)
        self.secret = secret
        self.timeout_s = float(timeout_s)
        self.shaper = shaper
        self.codec = codec
        self.level = level
        self.max_frame_bytes = int(max_frame_bytes)
        self.layout = layout
        self._sock = None  # type: Optional[socket.socket]
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.reconnects = 0
        self.retries = 0  # requests resent after a replica_lost answer
        self.last_ping_bytes = 0

    # ------------------------------------------------------------------ connection
    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except (socket.timeout, OSError) as exc:
            raise ServerUnavailable("cannot connect to %s:%d: %s" % (self.host, self.port, exc))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return sock

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ exchange
    def _exchange(self, frame: bytes) -> Tuple[P.Frame, float, int]:
        """Send a frame and read the answer, reconnecting once on a broken connection.

        Returns (answer frame, wall ms from send to receive, attempts)."""
        last_exc = None  # type: Optional[BaseException]
        for attempt in (1, 2):
            if self._sock is None:
                self._sock = self._connect()
                if attempt == 2:
                    self.reconnects += 1
            sock = self._sock
            t0 = time.perf_counter()
            try:
                sock.settimeout(self.timeout_s)
                if self.shaper is not None:
                    self.shaper.send(sock, frame)
                else:
                    sock.sendall(frame)
                answer = P.read_frame(sock, self.max_frame_bytes, timeout=self.timeout_s, secret=self.secret)
                if self.shaper is not None:
                    self.shaper.after_receive(answer.nbytes)
                return answer, (time.perf_counter() - t0) * 1000.0, attempt
            except socket.timeout as exc:
                self.close()
                raise ServerUnavailable("no answer from %s:%d within %.1f s: %s" % (self.host, self.port, self.timeout_s, exc))
            except P.ProtocolError as exc:
                self.close()
                if exc.code == P.TIMEOUT:
                    raise ServerUnavailable("no answer from %s:%d within %.1f s" % (self.host, self.port, self.timeout_s))
                if exc.code in _BROKEN:
                    last_exc = exc
                    continue
                raise BadReply(exc.code, exc.message)
            except (ConnectionError, OSError) as exc:  # reset, broken pipe, ...
                self.close()
                last_exc = exc
                continue
        raise ServerUnavailable("connection to %s:%d broken twice: %s" % (self.host, self.port, last_exc))

    def _check_answer(self, answer: P.Frame, rid: int) -> None:
        if answer.msg_type == P.ERROR:
            try:
                err = P.decode_error(answer)
            except P.ProtocolError as exc:
                self.close()
                raise BadReply(exc.code, exc.message)
            if err.code in _CLOSE_AFTER:
                self.close()
            if err.code in ("busy", "shutting_down"):
                raise ServerUnavailable("server %s:%d: %s" % (self.host, self.port, err.message))
            raise ServerError(err.code, err.message, err.request_id)
        if answer.request_id != rid:
            self.close()
            raise BadReply(P.PAYLOAD_MISMATCH, "answer is for request %d, expected %d" % (answer.request_id, rid))

    def infer(self, tensors: Mapping[str, np.ndarray], quant: Optional[Mapping[str, Mapping[str, Any]]] = None,
              meta: Optional[Mapping[str, Any]] = None) -> Reply:
        """Run the tail on the server.

        Args:
            tensors: name -> already-quantized integer array (int8/uint8, e.g. (N, C, H, W); uint8
                codes for n-bit tensors), or float16/float32 arrays sent unquantized.
            quant: name -> {"scale": float, "zero_point": int, "dtype": "int8"|"uint8"} for each
                quantized tensor, or the n-bit form {"bits", "scale", "zero_point", "axis"}
                (see :func:`runtime.protocol.encode_request`).
            meta: optional JSON object passed to the server.

        Returns:
            :class:`Reply` (logits (N, C) float32, top-k, tail_ms, network_ms, sizes in bytes).

        Raises:
            ServerUnavailable: refused, timed out, or the connection broke twice.
            ServerError: the server answered ERROR (e.g. code "wrong_shape").
            BadReply: the answer violated the protocol (e.g. bad HMAC).
            ValueError: bad tensors / quant (nothing was sent).
        """
        with self._lock:
            rid = next(self._ids)
            t0 = time.perf_counter()
            frame = P.encode_request(rid, tensors, quant, layout=self.layout, codec=self.codec,
                                     secret=self.secret, level=self.level, meta=meta, version=self.protocol_version)
            encode_ms = (time.perf_counter() - t0) * 1000.0
            answer, network_ms, attempts = self._exchange(frame)
            try:
                self._check_answer(answer, rid)
            except ServerError as exc:
                if exc.code not in RETRY_ONCE_CODES or attempts > 1:
                    raise
                # the same retry-once budget as a broken connection: inference is idempotent
                self.retries += 1
                answer, network_ms, _ = self._exchange(frame)
                attempts = 2
                self._check_answer(answer, rid)
            if answer.msg_type != P.REPLY:
                self.close()
                raise BadReply(P.BAD_TYPE, "expected REPLY, got %s" % answer.type_name)
            try:
                rep = P.decode_reply(answer)
            except P.ProtocolError as exc:
                raise BadReply(exc.code, exc.message)
            t = rep.tensors
            if "topk_indices" not in t or "topk_scores" not in t:
                raise BadReply(P.BAD_HEADER, "reply lacks topk_indices / topk_scores (has %s)" % sorted(t))
            logits = t.get("logits")
            return Reply(
                request_id=rid,
                logits=None if logits is None else logits.astype(np.float32, copy=False),
                topk_indices=t["topk_indices"], topk_scores=t["topk_scores"].astype(np.float32, copy=False),
                tail_ms=rep.tail_ms, network_ms=network_ms, encode_ms=encode_ms,
                bytes_sent=len(frame), bytes_received=answer.nbytes, attempts=attempts,
                tensors=dict(t), meta=rep.meta,
            )

    def ping(self, pad_bytes: int = 0) -> float:
        """Round trip of a PING frame (ms, link emulation included); ``pad_bytes`` of ignored payload probe the
        uplink. ``last_ping_bytes`` then holds the bytes moved (PING + PONG frames).

        Raises:
            ServerUnavailable, ServerError, BadReply: as :meth:`infer`.
        """
        with self._lock:
            rid = next(self._ids)
            frame = P.encode_ping(rid, self.secret, pad_bytes, self.protocol_version)
            answer, ms, _ = self._exchange(frame)
            self.last_ping_bytes = len(frame) + answer.nbytes
            self._check_answer(answer, rid)
            if answer.msg_type != P.PONG:
                self.close()
                raise BadReply(P.BAD_TYPE, "expected PONG, got %s" % answer.type_name)
            return ms

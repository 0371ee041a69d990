"""Wire protocol between the device (head graph) and the edge server (tail graph), version 2.

A frame is::

    prefix (28 bytes, big-endian) | header (UTF-8 JSON object) | payload (tensor bytes) | [tag (32 bytes)]

    prefix = magic b"EET1" | version u8 | type u8 | flags u16 | request_id u64 | header_len u32 | payload_len u64

``tag`` is HMAC-SHA256(secret, prefix + header + payload), present iff ``flags & FLAG_HMAC``.
docs/protocol.md documents every byte. Tensors are described in the JSON header (name, dtype,
shape, layout, scale, zero_point, codec, nbytes, wire_nbytes, offset; bits and axis for n-bit codes)
and stored back to back in the payload, each compressed on its own, little-endian, C order; n-bit
codes are bit-packed (:mod:`runtime.nbit`) before compression.

Version 2 writes each tensor's description as a JSON array of those fields in a fixed order
(:data:`TENSOR_FIELDS`, under the key ``t``) instead of an object (under ``tensors``, version 1): the same
fields and values, about 100 bytes fewer per tensor, which matters for frames of a few hundred bytes
(a bottleneck's code). Receivers accept both versions and hand every layer above the same object form
(``Frame.header["tensors"]``); the server answers in the version of the request.

Only numpy and the standard library are needed (zstandard / lz4 / brotli when those codecs are used).
Nothing is ever unpickled; every length, dtype and shape from the peer is validated before use.
Python 3.8 compatible.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import codec as _codec
from . import nbit as _nbit
from .quant import QuantError, QuantParams

__all__ = [
    "MAGIC", "VERSION", "SUPPORTED_VERSIONS", "TENSOR_FIELDS", "PREFIX", "PREFIX_SIZE", "TAG_SIZE", "FLAG_HMAC",
    "REQUEST", "REPLY", "ERROR", "PING", "PONG", "MESSAGE_TYPES",
    "ALLOWED_DTYPES", "DEFAULT_MAX_FRAME_BYTES", "MAX_HEADER_BYTES", "MAX_TENSORS",
    "ProtocolError", "Frame", "TensorSpec", "RequestMessage", "ReplyMessage", "ErrorMessage",
    "encode_frame", "parse_frame", "read_frame",
    "encode_request", "decode_request", "encode_reply", "decode_reply",
    "encode_error", "decode_error", "encode_ping", "encode_pong",
    "parse_tensor_specs", "decode_tensors",
]

MAGIC = b"EET1"
VERSION = 2
#: versions a receiver accepts; senders write VERSION unless told otherwise
SUPPORTED_VERSIONS = (1, 2)
#: version 2: a tensor's description is an array of these fields in this order; the first 8 are required,
#: trailing ones that are null may be left out
TENSOR_FIELDS = ("name", "dtype", "shape", "layout", "codec", "nbytes", "wire_nbytes", "offset",
                 "scale", "zero_point", "bits", "axis")
_REQUIRED_FIELDS = 8
#: struct layout of the fixed prefix: magic, version, type, flags, request id, header len, payload len.
PREFIX = struct.Struct(">4sBBHQIQ")
PREFIX_SIZE = PREFIX.size  # 28 bytes
TAG_SIZE = 32  # HMAC-SHA256
FLAG_HMAC = 0x0001
_KNOWN_FLAGS = FLAG_HMAC

REQUEST, REPLY, ERROR, PING, PONG = 1, 2, 3, 4, 5
MESSAGE_TYPES: Dict[int, str] = {REQUEST: "REQUEST", REPLY: "REPLY", ERROR: "ERROR", PING: "PING", PONG: "PONG"}

#: dtypes a peer may put on the wire (always little-endian).
ALLOWED_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "int64", "float16", "float32")
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
#: REQUEST tensor holding an encoded input file, uint8 1-D (``serve --whole-model --input-file``)
FILE_TENSOR = "file"
DEFAULT_MAX_RAW_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_TENSORS = 64
MAX_NDIM = 8
MAX_NAME_CHARS = 256
MAX_ERROR_MESSAGE_CHARS = 4096

# Error codes carried by ProtocolError.code (and by ERROR frames the server sends back).
CLOSED = "closed"                      # peer closed before the first byte of a frame
TIMEOUT = "timeout"                    # frame not complete within the deadline
BAD_MAGIC = "bad_magic"
UNSUPPORTED_VERSION = "unsupported_version"
BAD_TYPE = "bad_type"
BAD_FLAGS = "bad_flags"
OVERSIZE = "oversize"                  # frame larger than max_frame_bytes
TRUNCATED = "truncated"                # EOF in the middle of a frame / short buffer
AUTH_REQUIRED = "auth_required"        # receiver has a secret, frame carries no tag (or vice versa)
BAD_HMAC = "bad_hmac"
BAD_JSON = "bad_json"
BAD_HEADER = "bad_header"              # JSON valid but fields missing / wrong type
BAD_DTYPE = "bad_dtype"                # dtype not in ALLOWED_DTYPES
BAD_CODEC = "bad_codec"                # codec unknown or not installed on the receiver
BAD_COMPRESSION = "bad_compression"    # corrupt compressed bytes
TOO_LARGE = "too_large"                # decompressed tensor over the limit (bomb guard)
PAYLOAD_MISMATCH = "payload_mismatch"  # offsets / sizes / shape*itemsize disagree with the payload

_FATAL_CODES = frozenset([CLOSED, TIMEOUT, BAD_MAGIC, UNSUPPORTED_VERSION, BAD_TYPE, BAD_FLAGS, OVERSIZE, TRUNCATED])


class ProtocolError(Exception):
    """A frame that violates the protocol.

    Attributes:
        code: short machine-readable reason (see the module constants, e.g. ``"bad_hmac"``).
        message: human-readable detail.
        request_id: the frame's request id when the prefix was readable, else None.
        fatal: True when the byte stream can no longer be trusted to be at a frame boundary
            (the connection must be closed); False when the whole frame was consumed.
        version: the offending frame's protocol version when its prefix was valid, else None.
    """

    def __init__(self, code: str, message: str, request_id: Optional[int] = None, fatal: Optional[bool] = None):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.request_id = request_id
        self.fatal = (code in _FATAL_CODES) if fatal is None else bool(fatal)
        #: the frame's protocol version once its prefix was accepted, else None (answer such errors in
        #: version 1: an ERROR frame carries no tensors, so every receiver reads it)
        self.version = None  # type: Optional[int]


@dataclass
class Frame:
    """One decoded frame (HMAC already verified, header already parsed).

    Attributes:
        msg_type: REQUEST / REPLY / ERROR / PING / PONG.
        request_id: u64 chosen by the client, echoed by the server.
        header: the parsed JSON object, tensors in the object form (``tensors``) whatever the version.
        payload: raw payload bytes (tensor data).
        flags: prefix flags (FLAG_HMAC).
        version: protocol version of the frame.
        nbytes: total size of the frame on the wire in bytes.
    """

    msg_type: int
    request_id: int
    header: Dict[str, Any]
    payload: bytes
    flags: int = 0
    version: int = VERSION
    nbytes: int = 0

    @property
    def type_name(self) -> str:
        return MESSAGE_TYPES.get(self.msg_type, str(self.msg_type))


@dataclass
class TensorSpec:
    """How one tensor is laid out in a payload (one entry of the header's ``tensors`` list).

    ``nbytes`` is the raw (decompressed) size in bytes, ``wire_nbytes`` the size in the payload,
    ``offset`` its position in the payload (bytes). ``scale`` / ``zero_point`` are set for
    affinely quantized int8/uint8 tensors and None otherwise.

    n-bit codes (``bits`` 2..8, dtype uint8) are bit-packed (:mod:`runtime.nbit`): densely when ``codec`` is
    ``none`` (``nbytes = ceil(prod(shape) * bits / 8)``), byte-aligned under an entropy coder (``8 // bits``
    codes per byte, ``nbytes = ceil(prod(shape) / (8 // bits))``); their ``scale`` / ``zero_point`` are tuples (one value per slice
    along ``axis``) when per channel. ``bits`` and ``axis`` are None for whole-byte tensors.
    """

    name: str
    dtype: str
    shape: Tuple[int, ...]
    layout: Optional[str]
    scale: Union[None, float, Tuple[float, ...]]
    zero_point: Union[None, int, Tuple[int, ...]]
    codec: str
    nbytes: int
    wire_nbytes: int
    offset: int
    bits: Optional[int] = None
    axis: Optional[int] = None

    @property
    def nbit(self) -> Optional[QuantParams]:
        """The n-bit quantisation of this tensor (``uint8`` codes of ``bits`` bits; None for whole-byte tensors)."""
        if self.bits is None:
            return None
        return QuantParams("uint8", self.scale, self.zero_point, self.axis, self.bits)

    def to_json(self) -> Dict[str, Any]:
        out = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape), "layout": self.layout,
            "scale": list(self.scale) if isinstance(self.scale, tuple) else self.scale,
            "zero_point": list(self.zero_point) if isinstance(self.zero_point, tuple) else self.zero_point,
            "codec": self.codec, "nbytes": self.nbytes, "wire_nbytes": self.wire_nbytes, "offset": self.offset,
        }
        if self.bits is not None:
            out["bits"] = self.bits
        if self.axis is not None:
            out["axis"] = self.axis
        return out


@dataclass
class RequestMessage:
    """A decoded REQUEST: wire tensors (as sent, e.g. int8) plus their specs."""

    request_id: int
    specs: List[TensorSpec]
    tensors: Dict[str, np.ndarray]
    meta: Dict[str, Any] = field(default_factory=dict)

    def dequantized(self) -> Dict[str, np.ndarray]:
        """float32 copies of every tensor: ``(q - zero_point) * scale`` for quantized ones,
        a float32 cast for the others. Shapes are unchanged."""
        out: Dict[str, np.ndarray] = {}
        for spec in self.specs:
            arr = self.tensors[spec.name]
            if spec.bits is not None:
                out[spec.name] = spec.nbit.dequantize(arr)
            elif spec.scale is not None:
                out[spec.name] = _codec.dequantize(arr, spec.scale, int(spec.zero_point or 0))
            else:
                out[spec.name] = arr.astype(np.float32)
        return out


@dataclass
class ReplyMessage:
    """A decoded REPLY: result tensors (``logits`` (N, C) float32, ``topk_indices`` (N, k) int32,
    ``topk_scores`` (N, k) float32 softmax probabilities, or others) and the server's tail time (ms)."""

    request_id: int
    tensors: Dict[str, np.ndarray]
    tail_ms: float
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ErrorMessage:
    """A decoded ERROR frame: machine-readable ``code`` and human-readable ``message``."""

    request_id: int
    code: str
    message: str


# --------------------------------------------------------------------------- helpers
def _secret_bytes(secret: Union[None, str, bytes]) -> Optional[bytes]:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, (bytes, bytearray)) or len(secret) == 0:
        raise ValueError("secret must be a non-empty str or bytes")
    return bytes(secret)


def _tag(secret: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def _json_dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _no_dup_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key %r" % key)
        out[key] = value
    return out


def _reject_constant(name):
    raise ValueError("non-finite number %s" % name)


def _json_loads(raw: bytes, request_id: int) -> Dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dup_pairs, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_JSON, "header is not valid UTF-8 JSON: %s" % exc, request_id)
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_JSON, "header must be a JSON object, got %s" % type(obj).__name__, request_id)
    return obj


def _compact_header(header: Mapping[str, Any]) -> Dict[str, Any]:
    """Version 2 form of a header: its ``tensors`` objects become ``t`` arrays (:data:`TENSOR_FIELDS` order,
    trailing nulls left out; keys outside TENSOR_FIELDS are not written). Raises ValueError for ``tensors``
    that is not a list of objects."""
    if "tensors" not in header:
        return dict(header)
    items = header["tensors"]
    if not isinstance(items, list) or not all(isinstance(e, Mapping) for e in items):
        raise ValueError("header 'tensors' must be a list of objects to be written as version 2; got %r"
                         % (items,))
    rows = []
    for entry in items:
        row = [entry.get(k) for k in TENSOR_FIELDS]
        while len(row) > _REQUIRED_FIELDS and row[-1] is None:
            row.pop()
        rows.append(row)
    out: Dict[str, Any] = {"t": rows}
    out.update((k, v) for k, v in header.items() if k != "tensors")
    return out


def _expand_header(header: Dict[str, Any], request_id: int) -> Dict[str, Any]:
    """Object form of a version 2 header (``t`` arrays back to ``tensors`` objects); ``bad_header`` for a
    ``t`` that is not a list of arrays of at least 8 fields, or a version 2 header that uses ``tensors``.
    Fields after the 12 of TENSOR_FIELDS are ignored, as version 1 receivers ignore unknown keys."""
    if "tensors" in header:
        raise ProtocolError(BAD_HEADER, "a version 2 header lists its tensors under 't' (arrays of %s), "
                            "not 'tensors'" % ", ".join(TENSOR_FIELDS), request_id)
    if "t" not in header:
        return header
    rows = header.pop("t")
    if not isinstance(rows, list):
        raise ProtocolError(BAD_HEADER, "header field 't' (the tensors) must be a list", request_id)
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) < _REQUIRED_FIELDS:
            raise ProtocolError(BAD_HEADER, "t[%d] must be an array of at least %d fields (%s)"
                                % (i, _REQUIRED_FIELDS, ", ".join(TENSOR_FIELDS)), request_id)
        items.append(dict(zip(TENSOR_FIELDS, row)))
    header["tensors"] = items
    return header


def encode_frame(msg_type: int, request_id: int, header: Mapping[str, Any], payload: bytes = b"",
                 secret: Union[None, str, bytes] = None, version: int = VERSION) -> bytes:
    """Serialise one frame.

    Args:
        msg_type: REQUEST, REPLY, ERROR, PING or PONG.
        request_id: integer in [0, 2**64).
        header: JSON-serialisable mapping (no NaN / inf), tensors in the object form (``tensors``); version
            2 writes them as arrays (``t``).
        payload: bytes appended after the header.
        secret: shared secret; when given an HMAC-SHA256 tag (32 bytes) is appended.
        version: protocol version to write, one of SUPPORTED_VERSIONS (a reply uses its request's).

    Returns:
        The frame bytes (28 + len(header JSON) + len(payload) [+ 32]).

    Raises:
        ValueError: bad type, request id, version, header too large or not serialisable.
    """
    if msg_type not in MESSAGE_TYPES:
        raise ValueError("unknown message type %r" % (msg_type,))
    if not (isinstance(request_id, int) and 0 <= request_id < 2 ** 64):
        raise ValueError("request_id must be an int in [0, 2**64), got %r" % (request_id,))
    if version not in SUPPORTED_VERSIONS:
        raise ValueError("protocol version %r not supported (%s)" % (version, ", ".join(map(str, SUPPORTED_VERSIONS))))
    head = _json_dumps(_compact_header(header) if version >= 2 else header)
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("header of %d bytes exceeds %d" % (len(head), MAX_HEADER_BYTES))
    key = _secret_bytes(secret)
    flags = FLAG_HMAC if key is not None else 0
    prefix = PREFIX.pack(MAGIC, version, msg_type, flags, request_id, len(head), len(payload))
    parts = [prefix, head, bytes(payload)]
    if key is not None:
        parts.append(_tag(key, *parts))
    return b"".join(parts)


def _check_prefix(prefix: bytes, max_frame_bytes: int) -> Tuple[int, int, int, int, int, int]:
    magic, version, msg_type, flags, request_id, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(BAD_MAGIC, "expected magic %r, got %r" % (MAGIC, magic))
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(UNSUPPORTED_VERSION, "protocol version %d not supported (this side speaks %s)"
                            % (version, ", ".join(map(str, SUPPORTED_VERSIONS))), request_id)
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(BAD_TYPE, "unknown message type %d" % msg_type, request_id)
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(BAD_FLAGS, "unknown flag bits 0x%04x" % (flags & ~_KNOWN_FLAGS), request_id)
    tag_len = TAG_SIZE if flags & FLAG_HMAC else 0
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(OVERSIZE, "header of %d bytes exceeds %d" % (header_len, MAX_HEADER_BYTES), request_id)
    total = PREFIX_SIZE + header_len + payload_len + tag_len
    if total > max_frame_bytes:
        raise ProtocolError(OVERSIZE, "frame of %d bytes exceeds the limit of %d bytes" % (total, max_frame_bytes), request_id)
    return version, msg_type, flags, request_id, header_len, payload_len


def _finish(prefix: bytes, body: bytes, version: int, msg_type: int, flags: int, request_id: int,
            header_len: int, payload_len: int, key: Optional[bytes]) -> Frame:
    head = body[:header_len]
    payload = body[header_len:header_len + payload_len]
    has_tag = bool(flags & FLAG_HMAC)
    if key is not None:
        if not has_tag:
            raise ProtocolError(AUTH_REQUIRED, "frame carries no HMAC tag but a shared secret is configured", request_id)
        tag = body[header_len + payload_len:]
        if not hmac.compare_digest(tag, _tag(key, prefix, head, payload)):
            raise ProtocolError(BAD_HMAC, "HMAC-SHA256 tag does not match (wrong secret or corrupted frame)", request_id)
    elif has_tag:
        raise ProtocolError(AUTH_REQUIRED, "frame carries an HMAC tag but no shared secret is configured here", request_id)
    header = _json_loads(bytes(head), request_id)
    if version >= 2:
        header = _expand_header(header, request_id)
    return Frame(msg_type, request_id, header, bytes(payload), flags, version,
                 PREFIX_SIZE + len(body))


@contextlib.contextmanager
def _stamped(version: int):
    """Record ``version`` (the frame's, its prefix accepted) on any ProtocolError raised inside, so that the
    answer to the error speaks the peer's version."""
    try:
        yield
    except ProtocolError as exc:
        exc.version = version
        raise


def parse_frame(buf: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                secret: Union[None, str, bytes] = None) -> Frame:
    """Parse exactly one complete frame from a byte string.

    Raises:
        ProtocolError: any protocol violation (``truncated`` for a short buffer, ``payload_mismatch``
            for trailing bytes, plus every code :func:`read_frame` raises except closed/timeout).
    """
    key = _secret_bytes(secret)
    buf = bytes(buf)
    if len(buf) < PREFIX_SIZE:
        raise ProtocolError(TRUNCATED, "%d bytes, shorter than the %d-byte prefix" % (len(buf), PREFIX_SIZE))
    version, msg_type, flags, rid, hlen, plen = _check_prefix(buf[:PREFIX_SIZE], max_frame_bytes)
    body_len = hlen + plen + (TAG_SIZE if flags & FLAG_HMAC else 0)
    body = buf[PREFIX_SIZE:]
    with _stamped(version):
        if len(body) < body_len:
            raise ProtocolError(TRUNCATED, "frame needs %d bytes after the prefix, got %d" % (body_len, len(body)), rid)
        if len(body) > body_len:
            raise ProtocolError(PAYLOAD_MISMATCH, "%d bytes after the end of the frame" % (len(body) - body_len), rid, fatal=True)
        return _finish(buf[:PREFIX_SIZE], body, version, msg_type, flags, rid, hlen, plen, key)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float, started: bool, request_id: Optional[int],
               before: int = 0, total: Optional[int] = None) -> None:
    """Fill ``view`` from ``sock``. ``before``: bytes of this frame already read; ``total``: the frame's size
    when known (else the bytes read so far plus ``len(view)``), so that errors count the whole frame."""
    got = 0
    n = len(view)
    total = before + n if total is None else total
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(TIMEOUT, "frame incomplete after deadline (%d of %d bytes)" % (before + got, total), request_id)
        sock.settimeout(remaining)
        try:
            k = sock.recv_into(view[got:], n - got)
        except socket.timeout:
            raise ProtocolError(TIMEOUT, "timed out waiting for data (%d of %d bytes)" % (before + got, total), request_id)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
            if not started and got == 0:
                raise ProtocolError(CLOSED, "connection reset before a frame: %s" % exc, request_id)
            raise ProtocolError(TRUNCATED, "connection reset mid-frame: %s" % exc, request_id)
        if k == 0:
            if not started and got == 0:
                raise ProtocolError(CLOSED, "peer closed the connection", request_id)
            raise ProtocolError(TRUNCATED, "peer closed mid-frame (%d of %d bytes)" % (before + got, total), request_id)
        got += k


def read_frame(sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, timeout: float = 10.0,
               secret: Union[None, str, bytes] = None, idle_timeout: Optional[float] = None) -> Frame:
    """Read one whole frame from a stream socket, looping over partial reads.

    Args:
        sock: connected stream socket (its timeout is changed and restored).
        max_frame_bytes: largest acceptable frame in bytes; checked from the prefix before
            reading the rest (nothing larger is ever buffered).
        timeout: seconds allowed from the first byte to the last byte of the frame (also guards
            against slow-drip peers).
        secret: shared secret; when set every frame must carry a valid HMAC tag.
        idle_timeout: seconds to wait for the first byte; None = ``timeout``.

    Returns:
        The :class:`Frame` (HMAC verified, JSON header parsed).

    Raises:
        ProtocolError: ``closed`` (EOF before a frame), ``timeout``, ``truncated``, ``bad_magic``,
            ``unsupported_version``, ``bad_type``, ``bad_flags``, ``oversize``, ``auth_required``,
            ``bad_hmac``, ``bad_json``, ``bad_header`` (a version 2 tensor list that does not parse). Errors
            found after the prefix was accepted carry the frame's ``version``.
        OSError: other socket failures.
    """
    key = _secret_bytes(secret)
    old_timeout = sock.gettimeout()
    try:
        prefix = bytearray(PREFIX_SIZE)
        view = memoryview(prefix)
        first_wait = timeout if idle_timeout is None else idle_timeout
        # First byte: idle wait. Then the rest of the frame within `timeout`.
        _recv_into(sock, view[:1], time.monotonic() + first_wait, False, None)
        deadline = time.monotonic() + timeout
        _recv_into(sock, view[1:], deadline, True, None, before=1)
        version, msg_type, flags, rid, hlen, plen = _check_prefix(bytes(prefix), max_frame_bytes)
        body = bytearray(hlen + plen + (TAG_SIZE if flags & FLAG_HMAC else 0))
        with _stamped(version):
            if body:
                _recv_into(sock, memoryview(body), deadline, True, rid, before=PREFIX_SIZE, total=PREFIX_SIZE + len(body))
            return _finish(bytes(prefix), bytes(body), version, msg_type, flags, rid, hlen, plen, key)
    finally:
        try:
            sock.settimeout(old_timeout)
        except OSError:
            pass


# --------------------------------------------------------------------------- tensors
def _le(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _encode_tensors(tensors: Mapping[str, np.ndarray], quant: Optional[Mapping[str, Mapping[str, Any]]],
                    layout: Union[None, str, Mapping[str, str]], codec_name: str,
                    level: Optional[int]) -> Tuple[List[Dict[str, Any]], bytes]:
    quant = quant or {}
    _codec.check_codec(codec_name)
    unknown = sorted(set(quant) - set(tensors))
    if unknown:
        raise ValueError("quant given for unknown tensors %s" % unknown)
    if len(tensors) > MAX_TENSORS:
        raise ValueError("at most %d tensors per frame" % MAX_TENSORS)
    entries: List[Dict[str, Any]] = []
    chunks: List[bytes] = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError("tensor names must be non-empty str of at most %d chars" % MAX_NAME_CHARS)
        arr = np.ascontiguousarray(value)
        dname = arr.dtype.name
        if dname not in ALLOWED_DTYPES:
            raise ValueError("tensor %r has dtype %s; allowed: %s" % (name, dname, ", ".join(ALLOWED_DTYPES)))
        if arr.ndim > MAX_NDIM:
            raise ValueError("tensor %r has %d dims (max %d)" % (name, arr.ndim, MAX_NDIM))
        scale = zero_point = nq = None
        if name in quant and quant[name].get("bits") is not None:
            nq = _nbit_quant(name, arr, quant[name])
        elif name in quant:
            q = quant[name]
            qdtype = q.get("dtype", dname)
            if dname != qdtype or dname not in _codec.QUANT_RANGES:
                raise ValueError("tensor %r must already be quantized to %s (got dtype %s); use codec.quantize"
                                 % (name, qdtype, dname))
            scale, zero_point, _, _ = _codec._check_qparams(q["scale"], q["zero_point"], dname)
        if isinstance(layout, Mapping):
            lay = layout.get(name)
        else:
            lay = layout if (layout is not None and len(layout) == arr.ndim) else None
        # n-bit codes go byte-aligned into an entropy coder (it then models whole codes), densely when sent as is
        coded = codec_name != "none" and arr.size > 0
        if nq is not None:
            raw = _nbit.pack_bits(arr, nq.bits, aligned=coded)
        else:
            raw = arr.astype(_le(arr.dtype), copy=False).tobytes()
        used = codec_name
        wire = raw
        if coded:
            wire = _codec.compress(raw, codec_name, level)
            dense = _nbit.packed_nbytes(arr.size, nq.bits) if nq is not None else len(raw)
            if len(wire) >= dense:  # incompressible: send as is
                raw = _nbit.pack_bits(arr, nq.bits) if nq is not None else raw
                wire, used = raw, "none"
        elif codec_name != "none":
            used = "none"
        entry = {
            "name": name, "dtype": dname, "shape": [int(d) for d in arr.shape], "layout": lay,
            "scale": scale, "zero_point": zero_point, "codec": used,
            "nbytes": len(raw), "wire_nbytes": len(wire), "offset": offset,
        }
        if nq is not None:
            entry.update(scale=nq.to_json()["scale"], zero_point=nq.to_json()["zero_point"], bits=nq.bits)
            if nq.axis is not None:
                entry["axis"] = nq.axis
        entries.append(entry)
        chunks.append(wire)
        offset += len(wire)
    return entries, b"".join(chunks)


def _nbit_quant(name: str, arr: np.ndarray, q: Mapping[str, Any]) -> QuantParams:
    """Validated n-bit parameters for the uint8 codes ``arr`` (raises ValueError, naming the tensor)."""
    if arr.dtype != np.uint8:
        raise ValueError("tensor %r: n-bit codes must be uint8 (got %s); quantise with "
                         "QuantParams('uint8', ..., bits=N)" % (name, arr.dtype))
    try:
        nq = QuantParams("uint8", q["scale"], q["zero_point"], q.get("axis"), q["bits"])
        if not _nbit.MIN_BITS <= nq.bits <= _nbit.MAX_BITS:
            raise QuantError("bits must be in %d..%d, got %d" % (_nbit.MIN_BITS, _nbit.MAX_BITS, nq.bits))
        _check_channels(nq, arr.shape)
    except (KeyError, QuantError) as exc:
        raise ValueError("tensor %r: bad n-bit quantisation %s: %s" % (name, dict(q), exc))
    if arr.size and int(arr.max()) > nq.qmax:
        raise ValueError("tensor %r: code %d does not fit in %d bits" % (name, int(arr.max()), nq.bits))
    return nq


def _check_channels(q: QuantParams, shape: Sequence[int]) -> None:
    """QuantError unless per-channel parameters fit ``shape``: axis in ``0..ndim-1``, one value per channel."""
    if q.axis is None:
        return
    if not 0 <= q.axis < len(shape):
        raise QuantError("axis %d out of range for a %d-D tensor" % (q.axis, len(shape)))
    if shape[q.axis] != len(q.scale):
        raise QuantError("%d per-channel values for %d channels (axis %d of shape %s)"
                         % (len(q.scale), shape[q.axis], q.axis, list(shape)))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_tensor_specs(header: Mapping[str, Any], payload_len: int, request_id: Optional[int] = None,
                       max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> List[TensorSpec]:
    """Validate the header's ``tensors`` list against the payload (cheap: no decompression).

    Raises:
        ProtocolError: ``bad_header`` (missing / mistyped fields, duplicate names, bad quant
            parameters), ``bad_dtype``, ``bad_codec``, ``too_large`` (nbytes > max_raw_bytes),
            ``payload_mismatch`` (shape x itemsize != nbytes, offsets not contiguous, sizes not
            summing to the payload length).
    """
    rid = request_id
    items = header.get("tensors")
    if not isinstance(items, list):
        raise ProtocolError(BAD_HEADER, "header field 'tensors' (version 2: 't') must be a list", rid)
    if len(items) > MAX_TENSORS:
        raise ProtocolError(BAD_HEADER, "%d tensors (max %d)" % (len(items), MAX_TENSORS), rid)
    specs: List[TensorSpec] = []
    seen = set()
    offset = 0
    for i, t in enumerate(items):
        if not isinstance(t, dict):
            raise ProtocolError(BAD_HEADER, "tensors[%d] must be an object" % i, rid)
        name = t.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ProtocolError(BAD_HEADER, "tensors[%d].name must be a non-empty string" % i, rid)
        if name in seen:
            raise ProtocolError(BAD_HEADER, "duplicate tensor name %r" % name, rid)
        seen.add(name)
        dname = t.get("dtype")
        if dname not in ALLOWED_DTYPES:
            raise ProtocolError(BAD_DTYPE, "tensor %r: dtype %r not allowed (allowed: %s)"
                                % (name, dname, ", ".join(ALLOWED_DTYPES)), rid)
        shape = t.get("shape")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d) and 0 <= d < 2 ** 31 for d in shape)):
            raise ProtocolError(BAD_HEADER, "tensor %r: shape must be a list of <= %d non-negative ints" % (name, MAX_NDIM), rid)
        for key in ("nbytes", "wire_nbytes", "offset"):
            if not _is_int(t.get(key)) or t[key] < 0:
                raise ProtocolError(BAD_HEADER, "tensor %r: %s must be a non-negative int" % (name, key), rid)
        nbytes, wire, off = t["nbytes"], t["wire_nbytes"], t["offset"]
        cname = t.get("codec")
        if cname not in _codec.CODECS:
            raise ProtocolError(BAD_CODEC, "tensor %r: unknown codec %r" % (name, cname), rid)
        bits = t.get("bits")
        if bits is not None and (not _is_int(bits) or not _nbit.MIN_BITS <= bits <= _nbit.MAX_BITS or dname != "uint8"):
            raise ProtocolError(BAD_HEADER, "tensor %r: bits must be an int in %d..%d on a uint8 tensor, got %r (%s)"
                                % (name, _nbit.MIN_BITS, _nbit.MAX_BITS, bits, dname), rid)
        itemsize = np.dtype(dname).itemsize
        count = 1
        for d in shape:
            count *= d
        if bits is not None:
            want = _nbit.packed_nbytes(count, bits, aligned=cname != "none")
            if want != nbytes:
                raise ProtocolError(PAYLOAD_MISMATCH, "tensor %r: %d codes of %d bits pack into %d bytes (%s), not "
                                    "nbytes %d" % (name, count, bits, want, "densely" if cname == "none" else
                                                   "byte-aligned under codec %s" % cname, nbytes), rid)
        elif count * itemsize != nbytes:
            raise ProtocolError(PAYLOAD_MISMATCH, "tensor %r: shape %s x %d bytes != nbytes %d"
                                % (name, shape, itemsize, nbytes), rid)
        if nbytes > max_raw_bytes:
            raise ProtocolError(TOO_LARGE, "tensor %r: %d bytes exceeds the limit of %d" % (name, nbytes, max_raw_bytes), rid)
        if cname == "none" and wire != nbytes:
            raise ProtocolError(PAYLOAD_MISMATCH, "tensor %r: uncompressed but wire_nbytes %d != nbytes %d"
                                % (name, wire, nbytes), rid)
        if off != offset or off + wire > payload_len:
            raise ProtocolError(PAYLOAD_MISMATCH, "tensor %r: offset %d / wire_nbytes %d do not fit the payload "
                                "(expected offset %d, payload %d bytes)" % (name, off, wire, offset, payload_len), rid)
        offset += wire
        scale, zp = t.get("scale"), t.get("zero_point")
        if (scale is None) != (zp is None):
            raise ProtocolError(BAD_HEADER, "tensor %r: scale and zero_point must both be set or both null" % name, rid)
        axis = t.get("axis")
        if bits is not None:
            scale, zp, axis = _nbit_params(name, t, bits, shape, rid)
        elif axis is not None or isinstance(scale, list) or isinstance(zp, list):
            raise ProtocolError(BAD_HEADER, "tensor %r: per-channel scale / zero_point / axis need 'bits'" % name, rid)
        elif scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise ProtocolError(BAD_HEADER, "tensor %r: scale must be a number" % name, rid)
            if not _is_int(zp):
                raise ProtocolError(BAD_HEADER, "tensor %r: zero_point must be an int" % name, rid)
            try:
                _codec._check_qparams(scale, zp, dname)
            except _codec.CodecError as exc:
                raise ProtocolError(BAD_HEADER, "tensor %r: %s" % (name, exc), rid)
        layout = t.get("layout")
        if layout is not None and (not isinstance(layout, str) or len(layout) > 16):
            raise ProtocolError(BAD_HEADER, "tensor %r: layout must be null or a short string" % name, rid)
        if bits is None:
            scale = None if scale is None else float(scale)
        specs.append(TensorSpec(name, dname, tuple(shape), layout, scale, zp, cname, nbytes, wire, off, bits, axis))
    if offset != payload_len:
        raise ProtocolError(PAYLOAD_MISMATCH, "tensors cover %d bytes but the payload has %d" % (offset, payload_len), rid)
    return specs


def _nbit_params(name: str, t: Mapping[str, Any], bits: int, shape: List[int], rid: Optional[int]):
    """(scale, zero_point, axis) of an n-bit tensor entry, as floats / ints or tuples of them per channel;
    raises ProtocolError ``bad_header`` for anything :class:`runtime.quant.QuantParams` refuses or a list
    that does not fit the shape."""
    scale, zp, axis = t.get("scale"), t.get("zero_point"), t.get("axis")
    for key, v in (("scale", scale), ("zero_point", zp)):
        items = v if isinstance(v, list) else [v]
        kinds = (int, float) if key == "scale" else (int,)
        if not items or len(items) > 2 ** 16 or not all(isinstance(e, kinds) and not isinstance(e, bool) for e in items):
            raise ProtocolError(BAD_HEADER, "tensor %r: n-bit %s must be a %s or a list of them"
                                % (name, key, "number" if key == "scale" else "int"), rid)
    if axis is not None and not _is_int(axis):
        raise ProtocolError(BAD_HEADER, "tensor %r: axis must be null or an int" % name, rid)
    if (isinstance(scale, list) or isinstance(zp, list)) and axis is None:
        raise ProtocolError(BAD_HEADER, "tensor %r: per-channel scale / zero_point lists need an axis" % name, rid)
    try:
        q = QuantParams("uint8", scale, zp, axis, bits)
        _check_channels(q, shape)
    except QuantError as exc:
        raise ProtocolError(BAD_HEADER, "tensor %r: %s" % (name, exc), rid)
    return q.scale, q.zero_point, q.axis


def decode_tensors(payload: bytes, specs: List[TensorSpec], request_id: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Decompress and view each tensor of a payload (specs from :func:`parse_tensor_specs`).

    Returns:
        name -> array of the spec's dtype (native byte order) and shape.

    Raises:
        ProtocolError: ``bad_codec`` (codec not installed here), ``bad_compression``,
            ``too_large``, ``payload_mismatch``.
    """
    out: Dict[str, np.ndarray] = {}
    view = memoryview(payload)
    for spec in specs:
        chunk = view[spec.offset:spec.offset + spec.wire_nbytes]
        if spec.codec == "none":
            raw = chunk
        else:
            try:
                raw = _codec.decompress(chunk, spec.codec, max_output_bytes=spec.nbytes, expected_size=spec.nbytes)
            except _codec.CodecUnavailable as exc:
                raise ProtocolError(BAD_CODEC, "tensor %r: %s" % (spec.name, exc), request_id)
            except _codec.DecompressionBomb as exc:
                raise ProtocolError(TOO_LARGE, "tensor %r: %s" % (spec.name, exc), request_id)
            except _codec.CodecError as exc:
                raise ProtocolError(BAD_COMPRESSION, "tensor %r: %s" % (spec.name, exc), request_id)
        if len(raw) != spec.nbytes:
            raise ProtocolError(PAYLOAD_MISMATCH, "tensor %r: %d bytes, expected %d" % (spec.name, len(raw), spec.nbytes), request_id)
        if spec.bits is not None:
            count = int(np.prod(spec.shape, dtype=np.int64))
            try:
                out[spec.name] = _nbit.unpack_bits(raw, spec.bits, count, aligned=spec.codec != "none").reshape(spec.shape)
            except _nbit.NBitError as exc:
                raise ProtocolError(PAYLOAD_MISMATCH, "tensor %r: %s" % (spec.name, exc), request_id)
            continue
        wire_dtype = _le(np.dtype(spec.dtype))
        arr = np.frombuffer(raw, dtype=wire_dtype).reshape(spec.shape)
        out[spec.name] = arr.astype(wire_dtype.newbyteorder("="), copy=False)
    return out


def _as_frame(data: Union[Frame, bytes, bytearray, memoryview], secret, max_frame_bytes: int) -> Frame:
    if isinstance(data, Frame):
        return data
    return parse_frame(bytes(data), max_frame_bytes=max_frame_bytes, secret=secret)


def _expect(frame: Frame, msg_type: int) -> None:
    if frame.msg_type != msg_type:
        raise ProtocolError(BAD_TYPE, "expected a %s frame, got %s" % (MESSAGE_TYPES[msg_type], frame.type_name),
                            frame.request_id, fatal=False)


def _meta(header: Mapping[str, Any], rid: int) -> Dict[str, Any]:
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise ProtocolError(BAD_HEADER, "header field 'meta' must be an object", rid)
    return meta


# --------------------------------------------------------------------------- messages
def encode_request(request_id: int, tensors: Mapping[str, np.ndarray], quant: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   layout: Union[None, str, Mapping[str, str]] = "NCHW", codec: str = "zstd",
                   secret: Union[None, str, bytes] = None, level: Optional[int] = None,
                   meta: Optional[Mapping[str, Any]] = None, version: int = VERSION) -> bytes:
    """Build a REQUEST frame carrying split tensors.

    Args:
        request_id: u64 chosen by the client; the REPLY echoes it.
        tensors: name -> array. Quantized tensors must already be int8/uint8 (see
            :func:`runtime.codec.quantize`), n-bit ones uint8 codes (:func:`runtime.nbit.quantize`);
            float16/float32 tensors may be sent unquantized. Allowed dtypes: ALLOWED_DTYPES.
        quant: name -> {"scale": float, "zero_point": int, "dtype": "int8"|"uint8"} for each
            quantized tensor, or {"bits": 2..8, "scale": float | [float], "zero_point": int | [int],
            "axis": int | None} for n-bit codes, bit-packed on the wire (the manifest's
            ``tensors[...].quant`` works as is).
        layout: a layout string such as "NCHW" applied to tensors of matching rank, or a
            name -> layout mapping.
        codec: "zstd", "lz4", "brotli" or "none"; applied per tensor, falling back to "none" for a
            tensor that does not shrink.
        secret: shared secret for the HMAC tag (None: no tag).
        level: codec level (see :func:`runtime.codec.compress`).
        meta: optional JSON object passed through to the server (e.g. device-side timings).

    Returns:
        Frame bytes.

    Raises:
        ValueError: bad dtype / quant / names; codec.CodecError(ValueError) and
            codec.CodecUnavailable for a codec problem.
    """
    entries, payload = _encode_tensors(tensors, quant, layout, codec, level)
    header: Dict[str, Any] = {"tensors": entries}
    if meta:
        header["meta"] = dict(meta)
    return encode_frame(REQUEST, request_id, header, payload, secret, version)


def decode_request(data: Union[Frame, bytes], secret: Union[None, str, bytes] = None,
                   max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                   max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> RequestMessage:
    """Decode a REQUEST from a :class:`Frame` (from :func:`read_frame`) or from frame bytes.

    ``secret`` and ``max_frame_bytes`` apply only when ``data`` is bytes.

    Returns:
        :class:`RequestMessage` with the wire tensors (dtype as sent) and their specs.

    Raises:
        ProtocolError: every code of :func:`parse_frame`, :func:`parse_tensor_specs` and
            :func:`decode_tensors`, and ``bad_type`` for a frame of another type.
    """
    frame = _as_frame(data, secret, max_frame_bytes)
    _expect(frame, REQUEST)
    specs = parse_tensor_specs(frame.header, len(frame.payload), frame.request_id, max_raw_bytes)
    tensors = decode_tensors(frame.payload, specs, frame.request_id)
    return RequestMessage(frame.request_id, specs, tensors, _meta(frame.header, frame.request_id))


def encode_reply(request_id: int, tensors: Mapping[str, np.ndarray], tail_ms: float,
                 secret: Union[None, str, bytes] = None, codec: str = "none",
                 meta: Optional[Mapping[str, Any]] = None, version: int = VERSION) -> bytes:
    """Build a REPLY frame.

    Args:
        request_id: id of the REQUEST answered.
        tensors: result tensors, conventionally ``logits`` (N, C) float32, ``topk_indices``
            (N, k) int32 and ``topk_scores`` (N, k) float32.
        tail_ms: the server's own time spent in the tail graph (ms), finite and >= 0.
        secret: shared secret for the HMAC tag.
        codec: codec for the result tensors ("none" by default: logits are small).
        meta: optional JSON object.

    Raises:
        ValueError: bad tensors or tail_ms.
    """
    tail = float(tail_ms)
    if not np.isfinite(tail) or tail < 0:
        raise ValueError("tail_ms must be finite and >= 0, got %r" % (tail_ms,))
    entries, payload = _encode_tensors(tensors, None, None, codec, None)
    header: Dict[str, Any] = {"tensors": entries, "tail_ms": tail}
    if meta:
        header["meta"] = dict(meta)
    return encode_frame(REPLY, request_id, header, payload, secret, version)


def decode_reply(data: Union[Frame, bytes], secret: Union[None, str, bytes] = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> ReplyMessage:
    """Decode a REPLY (Frame or bytes).

    Raises:
        ProtocolError: as :func:`decode_request`, plus ``bad_header`` for a missing / invalid tail_ms.
    """
    frame = _as_frame(data, secret, max_frame_bytes)
    _expect(frame, REPLY)
    tail = frame.header.get("tail_ms")
    if isinstance(tail, bool) or not isinstance(tail, (int, float)) or tail < 0:
        raise ProtocolError(BAD_HEADER, "REPLY needs a non-negative number 'tail_ms'", frame.request_id)
    specs = parse_tensor_specs(frame.header, len(frame.payload), frame.request_id, max_raw_bytes)
    tensors = decode_tensors(frame.payload, specs, frame.request_id)
    return ReplyMessage(frame.request_id, tensors, float(tail), _meta(frame.header, frame.request_id))


def encode_error(request_id: int, code: str, message: str, secret: Union[None, str, bytes] = None,
                 version: int = VERSION) -> bytes:
    """Build an ERROR frame (empty payload). ``message`` is cut to 4096 characters."""
    return encode_frame(ERROR, request_id, {"code": str(code)[:64], "message": str(message)[:MAX_ERROR_MESSAGE_CHARS]},
                        b"", secret, version)


def decode_error(data: Union[Frame, bytes], secret: Union[None, str, bytes] = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> ErrorMessage:
    """Decode an ERROR frame.

    Raises:
        ProtocolError: frame errors, ``bad_type``, ``bad_header`` (code / message not strings).
    """
    frame = _as_frame(data, secret, max_frame_bytes)
    _expect(frame, ERROR)
    code, message = frame.header.get("code"), frame.header.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ProtocolError(BAD_HEADER, "ERROR needs string 'code' and 'message'", frame.request_id)
    return ErrorMessage(frame.request_id, code, message)


def encode_ping(request_id: int, secret: Union[None, str, bytes] = None, pad_bytes: int = 0,
                version: int = VERSION) -> bytes:
    """Build a PING frame (header ``{}``); the server answers PONG (empty) with the same id. ``pad_bytes``
    zero bytes of payload, which the server ignores, let the client time the uplink with a known load
    (:mod:`runtime.bandwidth`)."""
    if pad_bytes < 0:
        raise ValueError("pad_bytes must be >= 0, got %r" % (pad_bytes,))
    return encode_frame(PING, request_id, {}, bytes(int(pad_bytes)), secret, version)


def encode_pong(request_id: int, secret: Union[None, str, bytes] = None, version: int = VERSION) -> bytes:
    """Build a PONG frame answering a PING (in the PING's ``version``)."""
    return encode_frame(PONG, request_id, {}, b"", secret, version)

"""runtime.protocol: round trips, every ProtocolError code, HMAC, partial / truncated reads over
socketpairs. Runs under Python 3.8 too."""
import json
import socket
import struct
import threading

import numpy as np
import pytest

from runtime import codec, nbit
from runtime.quant import QuantParams
from runtime import protocol as P
from runtime.protocol import ProtocolError

QUANT = {"feat": {"scale": 0.03, "zero_point": -128, "dtype": "int8"}}


def _feat(n=1, seed=0):
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, 16, 7, 7)).astype(np.float32), 0)
    return codec.quantize(x, 0.03, -128, "int8")


def _code(fn, *a, **k):
    with pytest.raises(ProtocolError) as ei:
        fn(*a, **k)
    return ei.value.code


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("secret", [None, "s3cret", b"\x00\xffbytes"])
def test_request_round_trip(name, secret):
    q = _feat(2)
    extra = np.arange(6, dtype=np.float32).reshape(2, 3)
    buf = P.encode_request(7, {"feat": q, "aux": extra}, QUANT, layout="NCHW", codec=name, secret=secret,
                           meta={"exit": 1})
    msg = P.decode_request(buf, secret=secret)
    assert msg.request_id == 7 and msg.meta == {"exit": 1}
    np.testing.assert_array_equal(msg.tensors["feat"], q)
    np.testing.assert_array_equal(msg.tensors["aux"], extra)
    spec = {s.name: s for s in msg.specs}
    assert spec["feat"].layout == "NCHW" and spec["aux"].layout is None
    assert spec["feat"].scale == pytest.approx(0.03) and spec["feat"].zero_point == -128
    assert spec["aux"].scale is None and spec["feat"].nbytes == q.nbytes
    deq = msg.dequantized()
    np.testing.assert_array_equal(deq["feat"], codec.dequantize(q, 0.03, -128))
    assert deq["aux"].dtype == np.float32


def test_frame_layout_is_as_documented():
    buf = P.encode_request(0x0102030405060708, {"feat": _feat()}, QUANT, codec="none")
    assert P.PREFIX_SIZE == 28
    magic, ver, typ, flags, rid, hlen, plen = struct.unpack(">4sBBHQIQ", buf[:28])
    assert (magic, ver, typ, flags, rid) == (b"EET1", 2, P.REQUEST, 0, 0x0102030405060708)
    header = json.loads(buf[28:28 + hlen].decode("utf-8"))
    assert plen == _feat().nbytes and len(buf) == 28 + hlen + plen
    # version 2: one array per tensor, fields in TENSOR_FIELDS order, trailing nulls (bits, axis) left out
    assert set(header) == {"t"} and header["t"] == [["feat", "int8", [1, 16, 7, 7], "NCHW", "none", 784, 784, 0, 0.03, -128]]
    v1 = P.encode_request(0x0102030405060708, {"feat": _feat()}, QUANT, codec="none", version=1)
    magic, ver, typ, flags, rid, hlen1, plen = struct.unpack(">4sBBHQIQ", v1[:28])
    t = json.loads(v1[28:28 + hlen1].decode("utf-8"))["tensors"][0]
    assert ver == 1 and set(t) == {"name", "dtype", "shape", "layout", "scale", "zero_point", "codec", "nbytes",
                                   "wire_nbytes", "offset"}
    assert hlen < hlen1 - 60
    signed = P.encode_request(1, {"feat": _feat()}, QUANT, codec="none", secret="k")
    assert len(signed) == len(P.encode_request(1, {"feat": _feat()}, QUANT, codec="none")) + P.TAG_SIZE
    assert struct.unpack(">H", signed[6:8])[0] == P.FLAG_HMAC


@pytest.mark.parametrize("version", [1, 2])
def test_both_versions_decode_to_the_same_header_and_tensors(version):
    """A receiver accepts version 1 (tensor objects) and 2 (tensor arrays); above the frame both read the same
    object form, n-bit fields included, and the frame records its version."""
    codes = np.random.default_rng(0).integers(0, 16, (1, 3, 4, 4), dtype=np.uint8)
    quant = {"code": {"bits": 4, "scale": [0.1, 0.2, 0.3], "zero_point": [0, 1, 2], "axis": 1}}
    buf = P.encode_request(5, {"code": codes}, quant, codec="zstd", meta={"exit": 0}, version=version)
    frame = P.parse_frame(buf)
    ref = P.parse_frame(P.encode_request(5, {"code": codes}, quant, codec="zstd", meta={"exit": 0}, version=1))
    assert frame.version == version and frame.header == ref.header
    assert frame.header["tensors"][0]["bits"] == 4 and frame.header["tensors"][0]["axis"] == 1
    msg = P.decode_request(frame)
    np.testing.assert_array_equal(msg.tensors["code"], codes)
    assert msg.meta == {"exit": 0}


@pytest.mark.parametrize("header, match", [
    ({"tensors": []}, "under 't'"),
    ({"t": {"name": "x"}}, "'t' \\(the tensors\\) must be a list"),
    ({"t": [["x", "int8", [1], None, "none", 1, 1]]}, r"t\[0\] must be an array of at least 8"),
    ({"t": [{"name": "x"}]}, r"t\[0\] must be an array"),
    ({"t": [["x", "float64", [1], None, "none", 8, 8, 0]]}, "float64"),  # the fields get version 1's checks
])
def test_malformed_version_2_header_is_refused(header, match):
    raw = json.dumps(header).encode()
    buf = P.PREFIX.pack(P.MAGIC, 2, P.REQUEST, 0, 9, len(raw), 1) + raw + b"\0"
    with pytest.raises(P.ProtocolError, match=match) as err:
        frame = P.parse_frame(buf)
        P.parse_tensor_specs(frame.header, len(frame.payload), frame.request_id)
    assert err.value.code in (P.BAD_HEADER, P.BAD_DTYPE) and err.value.request_id == 9 and not err.value.fatal


def test_version_2_fields_after_the_twelfth_are_ignored_and_the_encoder_refuses_non_objects():
    """Room for later fields: a row longer than TENSOR_FIELDS decodes, the extra values ignored (as version 1
    ignores unknown keys); the encoder refuses tensors it cannot write as rows; errors after the prefix
    carry the frame's version, errors before it none."""
    good = P.parse_frame(P.encode_request(3, {"x": np.zeros((1, 2), np.float32)}, codec="none"))
    raw = json.dumps({"t": [[*P._compact_header(good.header)["t"][0], None, None, None, None, "later"]]}).encode()
    frame = P.parse_frame(P.PREFIX.pack(P.MAGIC, 2, P.REQUEST, 0, 3, len(raw), 8) + raw + good.payload)
    assert P.parse_tensor_specs(frame.header, 8) == P.parse_tensor_specs(good.header, 8)
    for bad in ({"tensors": "nope"}, {"tensors": [["x"]]}):
        with pytest.raises(ValueError, match="list of objects"):
            P.encode_frame(P.REQUEST, 1, bad)
    v1 = P.encode_frame(P.REQUEST, 4, {"tensors": "nope"}, version=1)
    bad_json = v1[:P.PREFIX_SIZE] + b"{" * (len(v1) - P.PREFIX_SIZE)
    err = pytest.raises(P.ProtocolError, P.parse_frame, bad_json).value
    assert err.code == P.BAD_JSON and err.version == 1
    assert pytest.raises(P.ProtocolError, P.parse_frame, b"XXXX" + v1[4:]).value.version is None


def test_incompressible_tensor_falls_back_to_none():
    noise = np.frombuffer(np.random.default_rng(3).bytes(4096), dtype=np.int8).reshape(1, 4, 32, 32)
    buf = P.encode_request(1, {"feat": noise}, {"feat": {"scale": 1.0, "zero_point": 0, "dtype": "int8"}}, codec="zstd")
    frame = P.parse_frame(buf)
    assert frame.header["tensors"][0]["codec"] == "none"
    np.testing.assert_array_equal(P.decode_request(frame).tensors["feat"], noise)


def test_big_endian_input_goes_out_little_endian():
    x = np.arange(12, dtype=">f4").reshape(3, 4)
    buf = P.encode_request(1, {"x": x}, codec="none")
    frame = P.parse_frame(buf)
    assert frame.payload == np.arange(12, dtype="<f4").tobytes()
    np.testing.assert_array_equal(P.decode_request(frame).tensors["x"], x)


def test_reply_error_ping_round_trips():
    logits = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    idx = np.argsort(-logits, axis=1)[:, :3].astype(np.int32)
    buf = P.encode_reply(9, {"logits": logits, "topk_indices": idx}, tail_ms=3.25, secret="k", meta={"server": "x"})
    rep = P.decode_reply(buf, secret="k")
    assert rep.request_id == 9 and rep.tail_ms == 3.25 and rep.meta == {"server": "x"}
    np.testing.assert_array_equal(rep.tensors["logits"], logits)
    np.testing.assert_array_equal(rep.tensors["topk_indices"], idx)
    err = P.decode_error(P.encode_error(4, "wrong_shape", "expected [None, 16, 7, 7]" + "x" * 10000))
    assert err.code == "wrong_shape" and err.request_id == 4 and len(err.message) == P.MAX_ERROR_MESSAGE_CHARS
    ping = P.parse_frame(P.encode_ping(5, "k"), secret="k")
    assert ping.msg_type == P.PING and ping.request_id == 5 and ping.payload == b""
    assert P.parse_frame(P.encode_pong(5)).msg_type == P.PONG
    assert _code(P.decode_reply, P.encode_ping(1)) == P.BAD_TYPE
    with pytest.raises(ValueError):
        P.encode_reply(1, {"logits": logits}, tail_ms=float("nan"))


def test_encode_side_validation():
    q = _feat()
    with pytest.raises(ValueError):  # float tensor with quant params: must be quantized first
        P.encode_request(1, {"feat": q.astype(np.float32)}, QUANT)
    with pytest.raises(ValueError):
        P.encode_request(1, {"feat": np.zeros(3, np.float64)})
    with pytest.raises(ValueError):
        P.encode_request(1, {"feat": q}, {"other": QUANT["feat"]})
    with pytest.raises(ValueError):
        P.encode_request(-1, {"feat": q}, QUANT)
    with pytest.raises(ValueError):
        P.encode_request(2 ** 64, {"feat": q}, QUANT)
    with pytest.raises(codec.CodecError):
        P.encode_request(1, {"feat": q}, QUANT, codec="gzip")
    with pytest.raises(codec.CodecError):
        P.encode_request(1, {"feat": q}, {"feat": {"scale": 0.0, "zero_point": 0, "dtype": "int8"}})


# ------------------------------------------------------------------ every ProtocolError code
def _good(secret=None):
    return P.encode_request(3, {"feat": _feat()}, QUANT, codec="zstd", secret=secret)


def _with_prefix(buf, **fields):
    names = ["magic", "version", "type", "flags", "rid", "hlen", "plen"]
    vals = dict(zip(names, struct.unpack(">4sBBHQIQ", buf[:28])))
    vals.update(fields)
    return struct.pack(">4sBBHQIQ", *[vals[n] for n in names]) + buf[28:]


def _raw_frame(header, payload=b"", msg_type=P.REQUEST, secret=None, head_bytes=None):
    head = json.dumps(header).encode("utf-8") if head_bytes is None else head_bytes
    flags = P.FLAG_HMAC if secret else 0
    prefix = struct.pack(">4sBBHQIQ", b"EET1", 1, msg_type, flags, 11, len(head), len(payload))
    buf = prefix + head + payload
    if secret:
        import hashlib
        import hmac
        buf += hmac.new(secret.encode(), buf, hashlib.sha256).digest()
    return buf


def _tensor(**over):
    t = {"name": "feat", "dtype": "int8", "shape": [1, 2, 2, 2], "layout": "NCHW", "scale": 0.1,
         "zero_point": 0, "codec": "none", "nbytes": 8, "wire_nbytes": 8, "offset": 0}
    t.update(over)
    return t


def test_prefix_errors():
    good = _good()
    assert _code(P.parse_frame, b"XXXX" + good[4:]) == P.BAD_MAGIC
    assert _code(P.parse_frame, _with_prefix(good, version=3)) == P.UNSUPPORTED_VERSION
    assert _code(P.parse_frame, _with_prefix(good, version=0)) == P.UNSUPPORTED_VERSION
    assert _code(P.parse_frame, _with_prefix(good, type=99)) == P.BAD_TYPE
    assert _code(P.parse_frame, _with_prefix(good, flags=0x8000)) == P.BAD_FLAGS
    assert _code(P.parse_frame, good, max_frame_bytes=len(good) - 1) == P.OVERSIZE
    assert _code(P.parse_frame, _with_prefix(good, hlen=P.MAX_HEADER_BYTES + 1)) == P.OVERSIZE
    assert _code(P.parse_frame, good[:-1]) == P.TRUNCATED
    assert _code(P.parse_frame, good[:10]) == P.TRUNCATED
    assert _code(P.parse_frame, good + b"\x00") == P.PAYLOAD_MISMATCH
    e = pytest.raises(ProtocolError, P.parse_frame, _with_prefix(good, version=9)).value
    assert e.fatal and e.request_id == 3


def test_hmac_errors():
    signed = _good(secret="right")
    assert P.parse_frame(signed, secret="right").request_id == 3
    assert _code(P.parse_frame, signed, secret="wrong") == P.BAD_HMAC
    flipped = bytearray(signed)
    flipped[-40] ^= 0x01  # a payload byte
    assert _code(P.parse_frame, bytes(flipped), secret="right") == P.BAD_HMAC
    flipped = bytearray(signed)
    flipped[12] ^= 0x01  # request id inside the prefix is authenticated too
    assert _code(P.parse_frame, bytes(flipped), secret="right") == P.BAD_HMAC
    assert _code(P.parse_frame, _good(), secret="right") == P.AUTH_REQUIRED  # unsigned frame
    assert _code(P.parse_frame, signed) == P.AUTH_REQUIRED  # signed frame, no secret here
    e = pytest.raises(ProtocolError, P.parse_frame, signed, secret="wrong").value
    assert not e.fatal  # the frame was consumed whole


@pytest.mark.parametrize("head", [b"\xff\xfe not utf8", b"{not json", b"[1, 2]", b'{"a": NaN}',
                                  b'{"a": 1, "a": 2}', b"[" * 100000 + b"]" * 100000])
def test_bad_json(head):
    assert _code(P.parse_frame, _raw_frame(None, head_bytes=head)) == P.BAD_JSON


@pytest.mark.parametrize("header,payload,code", [
    ({"tensors": "x"}, b"", P.BAD_HEADER),
    ({}, b"", P.BAD_HEADER),
    ({"tensors": [5]}, b"", P.BAD_HEADER),
    ({"tensors": [_tensor(name="")]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(), _tensor(offset=8)]}, bytes(16), P.BAD_HEADER),  # duplicate name
    ({"tensors": [_tensor(shape=[1, -2, 2, 2])]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(shape=[1, 2.0, 2, 2])]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(shape=[1] * 9, nbytes=1, wire_nbytes=1)]}, bytes(1), P.BAD_HEADER),
    ({"tensors": [_tensor(nbytes=True)]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(zero_point=None)]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(scale=-1.0)]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(zero_point=300)]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(layout=7)]}, bytes(8), P.BAD_HEADER),
    ({"tensors": [_tensor(dtype="float64", nbytes=64, wire_nbytes=64)]}, bytes(64), P.BAD_DTYPE),
    ({"tensors": [_tensor(dtype="object")]}, bytes(8), P.BAD_DTYPE),
    ({"tensors": [_tensor(dtype=None)]}, bytes(8), P.BAD_DTYPE),
    ({"tensors": [_tensor(codec="gzip")]}, bytes(8), P.BAD_CODEC),
    ({"tensors": [_tensor(nbytes=9, wire_nbytes=9)]}, bytes(9), P.PAYLOAD_MISMATCH),  # shape x itemsize
    ({"tensors": [_tensor()]}, bytes(9), P.PAYLOAD_MISMATCH),  # trailing payload byte
    ({"tensors": [_tensor()]}, bytes(7), P.PAYLOAD_MISMATCH),  # short payload
    ({"tensors": [_tensor(offset=1)]}, bytes(9), P.PAYLOAD_MISMATCH),  # gap
    ({"tensors": [_tensor(wire_nbytes=4)]}, bytes(4), P.PAYLOAD_MISMATCH),  # uncompressed but sizes differ
    ({"tensors": [_tensor(codec="zstd", wire_nbytes=8)]}, b"garbage!", P.BAD_COMPRESSION),
])
def test_content_errors(header, payload, code):
    buf = _raw_frame(header, payload)
    err = pytest.raises(ProtocolError, P.decode_request, buf).value
    assert err.code == code, err
    assert not err.fatal and err.request_id == 11


def test_too_large_and_bomb():
    t = _tensor(shape=[1, 1024, 1024, 8], nbytes=8 * 1024 * 1024, codec="zstd")
    big = codec.compress(bytes(8 * 1024 * 1024), "zstd")
    t["wire_nbytes"] = len(big)
    buf = _raw_frame({"tensors": [t]}, big)
    assert _code(P.decode_request, buf, max_raw_bytes=1024 * 1024) == P.TOO_LARGE
    # a frame whose declared nbytes is small but whose zstd data expands far beyond it
    liar = _tensor(shape=[1, 2, 2, 2], nbytes=8, codec="zstd", wire_nbytes=len(big))
    assert _code(P.decode_request, _raw_frame({"tensors": [liar]}, big)) == P.TOO_LARGE
    lz = codec.compress(bytes(8 * 1024 * 1024), "lz4")
    liar = _tensor(shape=[1, 2, 2, 2], nbytes=8, codec="lz4", wire_nbytes=len(lz))
    assert _code(P.decode_request, _raw_frame({"tensors": [liar]}, lz)) == P.TOO_LARGE


def test_bad_reply_and_error_headers():
    assert _code(P.decode_reply, _raw_frame({"tensors": []}, msg_type=P.REPLY)) == P.BAD_HEADER
    assert _code(P.decode_reply, _raw_frame({"tensors": [], "tail_ms": -1}, msg_type=P.REPLY)) == P.BAD_HEADER
    assert _code(P.decode_error, _raw_frame({"code": 5, "message": "x"}, msg_type=P.ERROR)) == P.BAD_HEADER
    assert _code(P.decode_request, _raw_frame({"tensors": [], "meta": 3})) == P.BAD_HEADER


# ------------------------------------------------------------------ read_frame over sockets
def _pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def _send_in_pieces(sock, data, piece):
    for i in range(0, len(data), piece):
        sock.sendall(data[i:i + piece])


@pytest.mark.parametrize("piece", [1, 7, 1000, 10 ** 6])
def test_read_frame_loops_over_partial_reads(piece):
    data = P.encode_request(5, {"feat": _feat(4)}, QUANT, codec="lz4", secret="k")
    a, b = _pair()
    try:
        t = threading.Thread(target=_send_in_pieces, args=(a, data, piece))
        t.start()
        frame = P.read_frame(b, max_frame_bytes=1 << 20, timeout=5.0, secret="k")
        t.join(5)
        assert frame.nbytes == len(data) and frame.request_id == 5
        np.testing.assert_array_equal(P.decode_request(frame).tensors["feat"], _feat(4))
        # two frames back to back on one stream
        a.sendall(P.encode_ping(6, "k") + P.encode_ping(7, "k"))
        assert P.read_frame(b, 1 << 20, 5.0, secret="k").request_id == 6
        assert P.read_frame(b, 1 << 20, 5.0, secret="k").request_id == 7
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("cut", [0, 1, 27, 28, 100, -1])
def test_read_frame_truncated_or_closed(cut):
    data = _good()
    a, b = _pair()
    try:
        a.sendall(data[:cut] if cut >= 0 else data[:-1])
        a.shutdown(socket.SHUT_WR)
        err = pytest.raises(ProtocolError, P.read_frame, b, 1 << 20, 5.0).value
        assert err.code == (P.CLOSED if cut == 0 else P.TRUNCATED)
        assert err.fatal
        if cut != 0:  # the count is of the whole frame, the first (idle-wait) byte included
            sent = cut if cut >= 0 else len(data) - 1
            total = len(data) if sent >= P.PREFIX_SIZE else P.PREFIX_SIZE
            assert f"({sent} of {total} bytes)" in str(err)
    finally:
        a.close()
        b.close()


def test_read_frame_timeout_and_idle_timeout():
    a, b = _pair()
    try:
        a.sendall(_good()[:40])  # prefix arrives, the rest never does
        assert _code(P.read_frame, b, 1 << 20, 0.2) == P.TIMEOUT
        assert b.gettimeout() == 5  # restored
    finally:
        a.close()
        b.close()
    a, b = _pair()
    try:
        assert _code(P.read_frame, b, 1 << 20, 5.0, idle_timeout=0.1) == P.TIMEOUT  # nothing at all
    finally:
        a.close()
        b.close()


def test_read_frame_oversize_is_detected_from_the_prefix():
    a, b = _pair()
    try:
        a.sendall(struct.pack(">4sBBHQIQ", b"EET1", 1, P.REQUEST, 0, 1, 10, 2 ** 40))
        err = pytest.raises(ProtocolError, P.read_frame, b, 1 << 20, 5.0).value
        assert err.code == P.OVERSIZE and err.fatal and err.request_id == 1
    finally:
        a.close()
        b.close()


def test_read_frame_content_errors_are_not_fatal():
    a, b = _pair()
    try:
        a.sendall(_good(secret="x") + P.encode_ping(8, "y"))
        err = pytest.raises(ProtocolError, P.read_frame, b, 1 << 20, 5.0, secret="y").value
        assert err.code == P.BAD_HMAC and not err.fatal
        assert P.read_frame(b, 1 << 20, 5.0, secret="y").request_id == 8  # still in sync
    finally:
        a.close()
        b.close()


def test_frame_overhead_numbers():
    """Overhead of the framing for one (1, 80, 14, 14) int8 tensor (recorded in the report)."""
    q = np.zeros((1, 80, 14, 14), np.int8)
    raw = P.encode_request(1, {"blocks.5": q}, {"blocks.5": {"scale": 0.0421, "zero_point": -128, "dtype": "int8"}},
                           codec="none")
    overhead = len(raw) - q.nbytes
    assert P.PREFIX_SIZE <= overhead < 300
    signed = P.encode_request(1, {"blocks.5": q}, {"blocks.5": {"scale": 0.0421, "zero_point": -128, "dtype": "int8"}},
                              codec="none", secret="k")
    assert len(signed) - len(raw) == 32


# ------------------------------------------------------------------ n-bit feature codes
def _nbit_request(bits=4, per_channel=True, codec_name="zstd", n=1, seed=0, relu=False):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 6, 5, 5)) * 2).astype(np.float32)
    if relu:  # mostly zeros, like a post-activation feature: every codec shrinks it
        x = np.maximum(x - 2, 0)
    if per_channel:
        q = QuantParams("uint8", [0.5, 0.25, 1.0, 0.75, 2.0, 0.3], [1, 2, 3, 0, 1, (1 << bits) - 1], axis=1, bits=bits)
    else:
        q = QuantParams("uint8", 0.5, 1 << (bits - 1), bits=bits)
    codes = q.quantize(x)
    return codes, q, {"feat": q.to_json()}


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("name", codec.available_codecs())
def test_nbit_request_round_trip_is_exact(bits, per_channel, name):
    codes, q, quant = _nbit_request(bits, per_channel, name, n=2, seed=bits)
    buf = P.encode_request(3, {"feat": codes}, quant, codec=name)
    frame = P.parse_frame(buf)
    t = frame.header["tensors"][0]
    # dense with codec none, byte-aligned (8 // bits codes per byte) under an entropy coder
    packed = -(-codes.size * bits // 8) if t["codec"] == "none" else -(-codes.size // (8 // bits))
    assert t["bits"] == bits and t["dtype"] == "uint8" and t["nbytes"] == packed
    assert t.get("axis") == (1 if per_channel else None)
    assert t["scale"] == q.to_json()["scale"] and t["zero_point"] == q.to_json()["zero_point"]
    msg = P.decode_request(frame)
    got = msg.tensors["feat"]
    assert got.dtype == np.uint8 and got.shape == codes.shape and got.tobytes() == codes.tobytes()
    spec = msg.specs[0]
    assert spec.bits == bits and spec.nbit == q and spec.to_json() == t
    np.testing.assert_array_equal(msg.dequantized()["feat"], q.dequantize(codes))


def test_nbit_payload_is_the_packed_codes():
    codes, q, quant = _nbit_request(3, True)
    frame = P.parse_frame(P.encode_request(1, {"feat": codes}, quant, codec="none"))
    assert frame.payload == nbit.pack_bits(codes, 3)
    assert len(frame.payload) == -(-150 * 3 // 8)


def test_nbit_codes_go_byte_aligned_into_an_entropy_coder():
    codes, q, quant = _nbit_request(3, True, n=4, relu=True)  # mostly one code: zstd shrinks it
    frame = P.parse_frame(P.encode_request(1, {"feat": codes}, quant, codec="zstd"))
    t = frame.header["tensors"][0]
    assert t["codec"] == "zstd" and t["nbytes"] == codes.size // 2
    assert codec.decompress(frame.payload, "zstd", t["nbytes"]) == nbit.pack_bits(codes, 3, aligned=True)
    assert P.decode_request(frame).tensors["feat"].tobytes() == codes.tobytes()


def test_incompressible_nbit_codes_fall_back_to_dense_packing():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 8, (1, 6, 5, 5)).astype(np.uint8)  # uniform: nothing to gain over 3 bits a code
    q = QuantParams("uint8", 0.5, 4, bits=3)
    frame = P.parse_frame(P.encode_request(1, {"feat": codes}, {"feat": q.to_json()}, codec="zstd"))
    t = frame.header["tensors"][0]
    assert t["codec"] == "none" and frame.payload == nbit.pack_bits(codes, 3)
    assert P.decode_request(frame).tensors["feat"].tobytes() == codes.tobytes()


def test_byte_aligned_payload_errors_get_error_replies():
    codes, q, quant = _nbit_request(3, True, n=4, relu=True)
    frame = P.parse_frame(P.encode_request(1, {"feat": codes}, quant, codec="zstd"))
    t = dict(frame.header["tensors"][0])
    aligned = nbit.pack_bits(codes, 3, aligned=True)
    # the dense size under an entropy coder is not the packed size
    dense_n = nbit.packed_nbytes(codes.size, 3)
    wire = codec.compress(nbit.pack_bits(codes, 3), "zstd")
    bad = {**t, "nbytes": dense_n, "wire_nbytes": len(wire)}
    err = pytest.raises(ProtocolError, P.decode_request, _raw_frame({"tensors": [bad]}, wire)).value
    assert err.code == P.PAYLOAD_MISMATCH and "byte-aligned" in str(err) and not err.fatal
    # set unused low bits of a code byte
    dirty = bytes([aligned[0] | 0x01]) + aligned[1:]
    wire = codec.compress(dirty, "zstd")
    bad = {**t, "wire_nbytes": len(wire)}
    err = pytest.raises(ProtocolError, P.decode_request, _raw_frame({"tensors": [bad]}, wire)).value
    assert err.code == P.PAYLOAD_MISMATCH and "unused low bits" in str(err) and not err.fatal


def test_nbit_encode_side_validation():
    codes, q, quant = _nbit_request(3, True)
    with pytest.raises(ValueError, match="must be uint8"):
        P.encode_request(1, {"feat": codes.astype(np.int8)}, quant)
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        P.encode_request(1, {"feat": codes | 8}, quant)
    with pytest.raises(ValueError, match="6 per-channel values for 5 channels"):
        P.encode_request(1, {"feat": codes[:, :5]}, quant)
    with pytest.raises(ValueError, match="bits"):
        P.encode_request(1, {"feat": codes}, {"feat": {**quant["feat"], "bits": 9}})


def _nbit_header(**over):
    codes, q, quant = _nbit_request(4, True, "none")
    frame = P.parse_frame(P.encode_request(11, {"feat": codes}, quant, codec="none"))
    t = dict(frame.header["tensors"][0])
    t.update(over)
    return {"tensors": [t]}, frame.payload


@pytest.mark.parametrize("over,code", [
    ({"bits": 1}, P.BAD_HEADER), ({"bits": 9}, P.BAD_HEADER), ({"bits": 4.0}, P.BAD_HEADER),
    ({"bits": True}, P.BAD_HEADER), ({"dtype": "int8"}, P.BAD_HEADER),
    ({"axis": None}, P.BAD_HEADER), ({"axis": 2}, P.BAD_HEADER), ({"axis": -1}, P.BAD_HEADER), ({"axis": 7}, P.BAD_HEADER),
    ({"axis": "1"}, P.BAD_HEADER), ({"scale": [0.5] * 5}, P.BAD_HEADER), ({"scale": [0.5] * 5 + [0.0]}, P.BAD_HEADER),
    ({"scale": [0.5] * 5 + [True]}, P.BAD_HEADER), ({"scale": []}, P.BAD_HEADER), ({"scale": "0.5"}, P.BAD_HEADER),
    ({"zero_point": [1, 2, 3, 0, 1, 16]}, P.BAD_HEADER), ({"zero_point": [1, 2, 3, 0, 1, 1.5]}, P.BAD_HEADER),
    ({"zero_point": None}, P.BAD_HEADER), ({"scale": None}, P.BAD_HEADER),
    ({"nbytes": 150, "wire_nbytes": 150}, P.PAYLOAD_MISMATCH),  # nbytes as if one byte per code
])
def test_nbit_header_errors(over, code):
    header, payload = _nbit_header(**over)
    err = pytest.raises(ProtocolError, P.decode_request, _raw_frame(header, payload)).value
    assert err.code == code, err
    assert not err.fatal


def test_per_channel_lists_need_bits():
    t = _tensor(scale=[0.5, 0.5], zero_point=[0, 0], axis=1)
    assert _code(P.decode_request, _raw_frame({"tensors": [t]}, bytes(8))) == P.BAD_HEADER


def test_nbit_set_padding_bits_are_refused():
    codes, q, quant = _nbit_request(3, True, "none")  # 150 codes x 3 bits = 450 bits -> 6 padding bits
    frame = P.parse_frame(P.encode_request(11, {"feat": codes}, quant, codec="none"))
    bad = frame.payload[:-1] + bytes([frame.payload[-1] | 1])
    assert _code(P.decode_request, _raw_frame(frame.header, bad)) == P.PAYLOAD_MISMATCH


@pytest.mark.parametrize("name", codec.available_codecs()[1:])
def test_nbit_truncated_and_garbage_payloads_get_error_codes(name):
    """Every cut of a compressed n-bit payload and random garbage in its place: a ProtocolError with
    a content code, never another exception and never a wrong tensor."""
    codes, q, quant = _nbit_request(4, True, name, n=4, relu=True)
    frame = P.parse_frame(P.encode_request(11, {"feat": codes}, quant, codec=name))
    t = frame.header["tensors"][0]
    assert t["codec"] == name
    rng = np.random.default_rng(5)
    bad_payloads = [frame.payload[:k] for k in range(0, len(frame.payload), max(1, len(frame.payload) // 40))]
    bad_payloads += [rng.bytes(len(frame.payload)) for _ in range(20)]
    bad_payloads += [frame.payload[:-1] + bytes([frame.payload[-1] ^ 0xFF])]
    for bad in bad_payloads:
        header = {"tensors": [dict(t, wire_nbytes=len(bad))]}
        try:
            msg = P.decode_request(_raw_frame(header, bad))
        except ProtocolError as err:
            assert err.code in (P.BAD_COMPRESSION, P.PAYLOAD_MISMATCH, P.TOO_LARGE), err
            assert not err.fatal
        else:  # a corruption the codec cannot see still decodes to in-range codes of the declared shape
            got = msg.tensors["feat"]
            assert got.shape == codes.shape and int(got.max()) < 16


def test_old_style_int8_header_is_unchanged():
    # whole-byte tensors carry no bits/axis keys: frames of earlier versions and sizes stay as they were
    buf = P.encode_request(1, {"feat": _feat()}, QUANT, codec="none")
    t = P.parse_frame(buf).header["tensors"][0]
    assert "bits" not in t and "axis" not in t

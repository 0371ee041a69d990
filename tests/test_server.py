"""runtime.server + runtime.client against a real EdgeServer on 127.0.0.1 (loopback only).

Fuzz with random / truncated / oversized / wrong-shape frames from several connections, then
>= 20 concurrent clients; the server keeps serving throughout; SIGTERM shutdown returns."""
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from runtime import codec
from runtime import protocol as P
from runtime.client import BadReply, EdgeClient, ServerError, ServerUnavailable
from runtime.server import EdgeServer, topk_softmax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, H, W, K = 8, 4, 4, 10
SCALE, ZP = 0.05, -128
QUANT = {"feat": {"scale": SCALE, "zero_point": ZP, "dtype": "int8"}}
WEIGHTS = np.random.default_rng(42).standard_normal((C, K)).astype(np.float32)
EXPECTED = {"feat": {"shape": [None, C, H, W], "dtype": "float32"}}


def tail(inputs):
    x = inputs["feat"]
    assert x.dtype == np.float32
    if np.all(x == x.flat[0]) and x.flat[0] == 0.0:  # an all-zero tensor makes the tail fail
        raise RuntimeError("boom")
    return {"logits": x.mean(axis=(2, 3)) @ WEIGHTS}


def make_input(seed, n=1):
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, C, H, W)).astype(np.float32), 0) + 0.01
    return codec.quantize(x, SCALE, ZP, "int8")


def reference(q):
    return tail({"feat": codec.dequantize(q, SCALE, ZP)})["logits"]


@pytest.fixture()
def server():
    srv = EdgeServer(tail, EXPECTED, max_frame_bytes=1 << 20, topk=3, frame_timeout_s=3.0, idle_timeout_s=20.0,
                     max_connections=48)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_s": 0.1}, daemon=True)
    th.start()
    yield srv
    srv.shutdown(timeout_s=5)
    th.join(5)
    assert not th.is_alive()


def connect(srv, timeout=5.0):
    s = socket.create_connection(srv.address, timeout=timeout)
    return s


def read_until_closed(s, limit=1 << 20):
    """Everything the server sends until it closes (bounded)."""
    out = b""
    while len(out) < limit:
        try:
            chunk = s.recv(65536)
        except OSError:  # reset by the server, or timeout (socket.timeout is an OSError)
            break
        if not chunk:
            break
        out += chunk
    return out


def error_frames(data):
    """Decode the ERROR frames in a byte string."""
    errs = []
    while len(data) >= P.PREFIX_SIZE:
        _, _, _, flags, _, hlen, plen = struct.unpack(">4sBBHQIQ", data[:P.PREFIX_SIZE])
        n = P.PREFIX_SIZE + hlen + plen + (P.TAG_SIZE if flags & P.FLAG_HMAC else 0)
        errs.append(P.decode_error(data[:n]))
        data = data[n:]
    return errs


def good_request(rid, seed=0, secret=None):
    return P.encode_request(rid, {"feat": make_input(seed)}, QUANT, codec="zstd", secret=secret)


def check_reply(srv_reply_frame, q):
    rep = P.decode_reply(srv_reply_frame)
    np.testing.assert_allclose(rep.tensors["logits"], reference(q), rtol=1e-6, atol=1e-6)
    return rep


# ------------------------------------------------------------------ basics
def test_infer_and_ping(server):
    q = make_input(1, n=2)
    with EdgeClient(*server.address, codec="zstd") as cli:
        r = cli.infer({"feat": q}, QUANT)
        assert cli.ping() >= 0
    ref = reference(q)
    np.testing.assert_allclose(r.logits, ref, rtol=1e-6, atol=1e-6)
    assert r.logits.shape == (2, K) and r.logits.dtype == np.float32
    idx, scores = topk_softmax(ref, 3)
    np.testing.assert_array_equal(r.topk_indices, idx)
    np.testing.assert_allclose(r.topk_scores, scores, rtol=1e-6)
    assert r.topk_indices.shape == (2, 3) and r.topk[0][0][0] == int(np.argmax(ref[0]))
    assert r.tail_ms >= 0 and r.network_ms >= 0 and r.bytes_sent > 0 and r.bytes_received > 0
    assert r.attempts == 1


def test_padded_ping_probes_the_link_and_the_connection_keeps_serving(server):
    q = make_input(2)
    with EdgeClient(*server.address, codec="none") as cli:
        cli.ping()
        empty = cli.last_ping_bytes
        cli.ping(pad_bytes=4096)
        assert cli.last_ping_bytes == empty + 4096  # the padding went out, the PONG stays empty
        r = cli.infer({"feat": q}, QUANT)  # same connection, next request still served
    np.testing.assert_allclose(r.logits, reference(q), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pad_bytes"):
        P.encode_ping(1, None, -1)


def test_reply_carries_the_servers_whole_time_and_the_link_time_leaves_it_out(server):
    from runtime.client import Reply

    with EdgeClient(*server.address, codec="none") as cli:
        r = cli.infer({"feat": make_input(3)}, QUANT)
    assert r.meta["server_ms"] >= r.tail_ms >= 0  # decoding and tail both counted
    assert r.wire_ms == pytest.approx(r.network_ms - r.meta["server_ms"])

    def reply(meta, network_ms=40.0, tail_ms=2.0):
        e = np.zeros((1, 1), np.float32)
        return Reply(1, None, e.astype(np.int32), e, tail_ms, network_ms, 0.0, 100, 50, meta=meta)

    assert reply({"server_ms": 30.0, "queue_ms": 27.5}).wire_ms == 10.0  # a wait for a worker is no link time
    assert reply({}).wire_ms == 38.0  # an older server: tail_ms only
    assert reply({"server_ms": "x"}).wire_ms == 38.0 and reply({"server_ms": 1.0}).wire_ms == 38.0
    assert reply({"server_ms": 50.0}).wire_ms == 0.0


def test_topk_softmax_ties_and_small_c():
    idx, sc = topk_softmax(np.array([[1.0, 3.0, 3.0, 0.0]], np.float32), 10)
    assert idx.tolist() == [[1, 2, 0, 3]] and sc.shape == (1, 4)
    assert float(sc.sum()) == pytest.approx(1.0, abs=1e-6)


def test_content_errors_keep_the_connection(server):
    s = connect(server)
    try:
        cases = [
            (P.encode_request(1, {"feat": make_input(0)[:, :, :3]}, QUANT), "wrong_shape", "expected shape [None, 8, 4, 4]"),
            (P.encode_request(2, {"other": make_input(0)}, {"other": QUANT["feat"]}), "wrong_inputs", "feat [None, 8, 4, 4]"),
            (P.encode_request(3, {"feat": make_input(0).astype(np.int32)}), "wrong_dtype", "int32"),
            (P.encode_request(4, {"feat": np.zeros((1, C, H, W), np.int8)}, QUANT), None, None),  # valid frame
            (P.encode_request(5, {"feat": codec.quantize(np.zeros((1, C, H, W), np.float32), SCALE, ZP)}, QUANT),
             "tail_failed", "boom"),
            (P.encode_pong(6), "unexpected_type", "PONG"),
            (P.encode_frame(P.REQUEST, 7, {"tensors": "nope"}, version=1), P.BAD_HEADER, "tensors"),
            (P.encode_frame(P.REQUEST, 7, {"t": "nope"}), P.BAD_HEADER, "tensors"),
            (P.encode_frame(P.REQUEST, 8, {"tensors": [{"name": "feat", "dtype": "float64", "shape": [1], "layout": None,
                                                        "scale": None, "zero_point": None, "codec": "none", "nbytes": 8,
                                                        "wire_nbytes": 8, "offset": 0}]}, bytes(8)), P.BAD_DTYPE, "float64"),
        ]
        for frame, code, text in cases:
            s.sendall(frame)
            ans = P.read_frame(s, 1 << 20, 5.0)
            if code is None:
                assert ans.msg_type == P.REPLY
                continue
            assert ans.msg_type == P.ERROR
            err = P.decode_error(ans)
            assert err.code == code and text in err.message, err
            assert err.request_id == ans.request_id
        s.sendall(good_request(99, seed=3))  # the same connection still works
        ans = P.read_frame(s, 1 << 20, 5.0)
        assert ans.request_id == 99
        check_reply(ans, make_input(3))
    finally:
        s.close()


def test_server_answers_in_the_version_of_the_request(server):
    """A version 1 peer (tensor objects in the header) gets version 1 replies, errors and pongs; a version 2
    peer gets version 2, on the same server; both replies carry the same logits."""
    s = connect(server)
    try:
        for version in (1, 2, 1):
            s.sendall(P.encode_request(10 + version, {"feat": make_input(2)}, QUANT, codec="zstd", version=version))
            ans = P.read_frame(s, 1 << 20, 5.0)
            assert ans.msg_type == P.REPLY and ans.version == version
            check_reply(ans, make_input(2))
            s.sendall(P.encode_request(20 + version, {"feat": make_input(0)[:, :2]}, QUANT, version=version))
            err = P.read_frame(s, 1 << 20, 5.0)
            assert err.msg_type == P.ERROR and err.version == version
            s.sendall(P.encode_ping(30 + version, version=version))
            pong = P.read_frame(s, 1 << 20, 5.0)
            assert pong.msg_type == P.PONG and pong.version == version and pong.request_id == 30 + version
            # an error found while reading the frame (here: bad JSON) is answered in the frame's version too
            raw = b"{bad"
            s.sendall(P.PREFIX.pack(P.MAGIC, version, P.REQUEST, 0, 40 + version, len(raw), 0) + raw)
            err = P.read_frame(s, 1 << 20, 5.0)
            assert err.msg_type == P.ERROR and err.version == version and P.decode_error(err).code == P.BAD_JSON
    finally:
        s.close()
    with EdgeClient(*server.address, protocol_version=1) as cli:  # a new device talking to an old server
        assert cli.infer({"feat": make_input(2)}, QUANT).logits.shape == (1, K)


def test_client_maps_error_reply_to_server_error(server):
    with EdgeClient(*server.address) as cli:
        with pytest.raises(ServerError) as ei:
            cli.infer({"feat": make_input(0)[:, :4]}, QUANT)
        assert ei.value.code == "wrong_shape" and "expected shape [None, 8, 4, 4], got [1, 4, 4, 4]" in ei.value.message
        assert cli.infer({"feat": make_input(5)}, QUANT).logits.shape == (1, K)  # same client keeps working


# ------------------------------------------------------------------ fuzz
def _fuzz_one(srv, i, results):
    rng = np.random.default_rng(1000 + i)
    kind = i % 6
    good = good_request(500 + i, seed=i)
    if kind == 0:
        data = rng.bytes(int(rng.integers(1, 4000)))  # random bytes
    elif kind == 1:
        data = P.MAGIC + bytes([1]) + rng.bytes(int(rng.integers(23, 500)))  # random after a valid magic
    elif kind == 2:
        data = good[: int(rng.integers(1, len(good)))]  # truncated valid frame
    elif kind == 3:
        data = struct.pack(">4sBBHQIQ", b"EET1", 1, P.REQUEST, 0, 77, 10, 1 << 40)  # oversized claim
    elif kind == 4:
        data = bytearray(good)
        for _ in range(5):  # bit flips in header / payload
            pos = int(rng.integers(P.PREFIX_SIZE, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        data = bytes(data)
    else:
        data = P.encode_request(600 + i, {"feat": make_input(i)[:, :, :2]}, QUANT)  # wrong shape
    s = connect(srv)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the server sees EOF after the garbage
        except OSError:
            pass  # the server may hang up (RST) while garbage is still in flight: that is fine
        answer = read_until_closed(s)
        results[i] = (kind, answer)
    except Exception as exc:
        results[i] = (kind, exc)
    finally:
        s.close()


def test_fuzz_then_concurrent_clients(server):
    n_fuzz = 36
    results = {}
    threads = [threading.Thread(target=_fuzz_one, args=(server, i, results)) for i in range(n_fuzz)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(results) == n_fuzz and not any(t.is_alive() for t in threads)
    for kind, answer in results.values():
        assert not isinstance(answer, Exception), (kind, answer)
        errs = error_frames(answer) if kind in (2, 3, 5) else []  # those are fully consumed: no RST
        if kind == 3:
            assert [e.code for e in errs] == [P.OVERSIZE]
        if kind == 5:
            assert [e.code for e in errs] == ["wrong_shape"]
        if kind == 2:
            assert [e.code for e in errs] == [P.TRUNCATED]
    assert server.stats["errors"] >= n_fuzz // 2

    # >= 20 concurrent clients, several requests each: every reply arrives and is correct
    n_clients, per_client = 24, 4
    failures = []

    def client_job(c):
        try:
            with EdgeClient(*server.address, timeout_s=20.0, codec=("zstd", "lz4", "none")[c % 3]) as cli:
                for j in range(per_client):
                    q = make_input(10_000 + c * 100 + j, n=1 + j % 2)
                    r = cli.infer({"feat": q}, QUANT)
                    np.testing.assert_allclose(r.logits, reference(q), rtol=1e-6, atol=1e-6)
                    assert r.topk_indices[:, 0].tolist() == np.argmax(reference(q), axis=1).tolist()
        except Exception as exc:  # collected and asserted in the main thread
            failures.append((c, repr(exc)))

    threads = [threading.Thread(target=client_job, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert server.stats["replies"] >= n_clients * per_client


def test_auth(tmp_path):
    srv = EdgeServer(tail, EXPECTED, secret="shared", frame_timeout_s=3.0)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_s": 0.1}, daemon=True)
    th.start()
    try:
        with EdgeClient(*srv.address, secret="shared") as good:
            assert good.infer({"feat": make_input(1)}, QUANT).logits.shape == (1, K)
        with EdgeClient(*srv.address, secret="wrong") as bad:
            with pytest.raises(BadReply):  # server's ERROR is signed with a key the client lacks
                bad.infer({"feat": make_input(1)}, QUANT)
        s = connect(srv)
        try:
            s.sendall(good_request(1))  # unsigned
            ans = P.read_frame(s, 1 << 20, 5.0, secret="shared")
            assert P.decode_error(ans).code == P.AUTH_REQUIRED
            assert read_until_closed(s) == b""  # and the server hung up
        finally:
            s.close()
        with EdgeClient(*srv.address, secret="shared") as good:  # still serving
            assert good.ping() >= 0
    finally:
        srv.shutdown()
        th.join(5)


def test_busy_when_too_many_connections():
    srv = EdgeServer(tail, EXPECTED, max_connections=2)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_s": 0.1}, daemon=True)
    th.start()
    try:
        c1, c2 = EdgeClient(*srv.address), EdgeClient(*srv.address)
        c1.ping()
        c2.ping()
        with pytest.raises(ServerUnavailable, match="busy"):
            EdgeClient(*srv.address).ping()
        c1.close()
        ok = False
        for _ in range(50):  # the slot frees once the server notices c1's close (bounded)
            try:
                with EdgeClient(*srv.address) as c3:
                    c3.ping()
                ok = True
                break
            except ServerUnavailable:
                threading.Event().wait(0.05)
        assert ok
        c2.close()
    finally:
        srv.shutdown()
        th.join(5)


# ------------------------------------------------------------------ client failure modes
def test_client_refused_and_timeout():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ServerUnavailable):
        EdgeClient("127.0.0.1", port, timeout_s=1.0).infer({"feat": make_input(0)}, QUANT)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    try:
        cli = EdgeClient(*silent.getsockname()[:2], timeout_s=0.3)
        with pytest.raises(ServerUnavailable, match="within"):
            cli.infer({"feat": make_input(0)}, QUANT)
    finally:
        silent.close()


def test_client_reconnects_once():
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(5)
    served = []

    def fake_server():
        c1, _ = lst.accept()  # first connection: read the request, hang up without answering
        P.read_frame(c1, 1 << 20, 5.0)
        c1.close()
        c2, _ = lst.accept()  # second: answer properly
        f = P.read_frame(c2, 1 << 20, 5.0)
        served.append(f.request_id)
        msg = P.decode_request(f)
        logits = reference(msg.tensors["feat"])
        idx, sc = topk_softmax(logits, 2)
        c2.sendall(P.encode_reply(f.request_id, {"logits": logits, "topk_indices": idx, "topk_scores": sc}, 1.5))
        c2.close()

    th = threading.Thread(target=fake_server, daemon=True)
    th.start()
    try:
        cli = EdgeClient(*lst.getsockname()[:2], timeout_s=5.0)
        q = make_input(8)
        r = cli.infer({"feat": q}, QUANT)
        assert r.attempts == 2 and cli.reconnects == 1 and r.tail_ms == 1.5
        np.testing.assert_allclose(r.logits, reference(q))
        th.join(5)
        with pytest.raises(ServerUnavailable):  # fake server is gone: reconnect fails -> unavailable
            lst.close()
            cli.infer({"feat": q}, QUANT)
    finally:
        lst.close()


# ------------------------------------------------------------------ signal shutdown
SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from runtime.server import EdgeServer, run_until_signal
W = np.ones((8, 10), np.float32)
srv = EdgeServer(lambda d: {"logits": d["feat"].mean(axis=(2, 3)) @ W},
                 {"feat": {"shape": [None, 8, 4, 4], "dtype": "float32"}})
print(srv.address[1], flush=True)
sig = run_until_signal(srv)
print("stopped by signal", sig, flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_until_signal_shuts_down_cleanly(sig):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, REPO], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline().decode().strip())
        cli = EdgeClient("127.0.0.1", port, timeout_s=10.0)
        r = cli.infer({"feat": make_input(2)}, QUANT)  # an open keep-alive connection during shutdown
        assert r.logits.shape == (1, K)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err.decode()
        assert ("stopped by signal %d" % sig) in out.decode()
        assert "listening on" in err.decode() and "stopped" in err.decode()  # logs went to stderr
        with pytest.raises(ServerUnavailable):
            cli.infer({"feat": make_input(2)}, QUANT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_client_resends_once_after_replica_lost():
    """ERROR replica_lost (a scale-out replica died running the request) is resent once, like a broken
    connection; a second one reaches the caller as ServerError."""
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(5)
    seen = []

    def fake_server(answers):
        c, _ = lst.accept()
        c.settimeout(5)
        for lost in answers:
            f = P.read_frame(c, 1 << 20, 5.0)
            seen.append(f.request_id)
            if lost:
                c.sendall(P.encode_error(f.request_id, "replica_lost", "replica died"))
            else:
                logits = reference(P.decode_request(f).tensors["feat"])
                idx, sc = topk_softmax(logits, 2)
                c.sendall(P.encode_reply(f.request_id, {"logits": logits, "topk_indices": idx, "topk_scores": sc}, 1.0))
        c.close()

    try:
        th = threading.Thread(target=fake_server, args=([True, False, True, True],), daemon=True)
        th.start()
        cli = EdgeClient(*lst.getsockname()[:2], timeout_s=5.0)
        q = make_input(9)
        r = cli.infer({"feat": q}, QUANT)
        assert r.attempts == 2 and cli.retries == 1 and seen == [1, 1]  # the same request, resent once
        np.testing.assert_allclose(r.logits, reference(q))
        with pytest.raises(ServerError) as ei:
            cli.infer({"feat": q}, QUANT)
        assert ei.value.code == "replica_lost" and cli.retries == 2 and seen == [1, 1, 2, 2]
        th.join(5)
    finally:
        lst.close()


@pytest.mark.parametrize("code, hint", [("auth_required", "--secret"), ("bad_hmac", "--secret"),
                                        ("refused", "start 'python -m runtime serve'")])
def test_run_error_hint_names_the_secret_when_the_server_answered(code, hint, monkeypatch, capsys):
    """A server that answers auth_required / bad_hmac is up: the hint is the shared secret, not 'start it'."""
    import argparse

    import runtime.__main__ as cli

    def fail(args):
        raise RuntimeError("server unavailable (BadReply: bad reply %s: ...) and the bundle has no exit" % code)

    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(fn=fail)

    monkeypatch.setattr(cli, "build_parser", lambda: Parser())
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert hint in err and (hint == "--secret") == ("start 'python" not in err)

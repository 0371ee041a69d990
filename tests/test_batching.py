"""runtime.batching and the batching EdgeServer on 127.0.0.1: requests from many connections run as one
batch, each reply goes to its own connection in order, a failing batch fails only its requests, a client
that vanishes costs only its reply, a full queue answers busy at once, several workers run in parallel.

Batch composition is made deterministic with gates (a tail that blocks until the test releases it), never
with sleeps or wall-clock assertions. Runtime-only (numpy + stdlib): also runs under Python 3.8."""
import socket
import threading
import time

import numpy as np
import pytest

from runtime import codec
from runtime import protocol as P
from runtime.batching import Batcher, BatchError
from runtime.client import EdgeClient, ServerError, ServerUnavailable
from runtime.server import EdgeServer

C, H, W, K = 4, 2, 2, 6
SCALE, ZP = 0.05, 0
QUANT = {"feat": {"scale": SCALE, "zero_point": ZP, "dtype": "int8"}}
WEIGHTS = np.random.default_rng(7).standard_normal((C, K)).astype(np.float32)
EXPECTED = {"feat": {"shape": [None, C, H, W], "dtype": "float32"}}
WAIT = 10.0  # generous bound for any single wait; never reached when the code is right


def logits_of(x):
    return x.mean(axis=(2, 3)) @ WEIGHTS


def make_q(seed, n=1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 3.0, (n, C, H, W)).astype(np.float32)
    return codec.quantize(x, SCALE, ZP, "int8")


def reference(q):
    return logits_of(codec.dequantize(q, SCALE, ZP))


class GatedTail(object):
    """A tail that records each batch size, blocks on ``gate`` until released, and raises on a batch
    holding an all-zero sample."""

    def __init__(self, block_first=True):
        self.sizes = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not block_first:
            self.gate.set()
        self.lock = threading.Lock()

    def __call__(self, feeds):
        x = feeds["feat"]
        with self.lock:
            self.sizes.append(int(x.shape[0]))
        self.started.set()
        assert self.gate.wait(WAIT), "test never released the gate"
        if np.any(np.all(x.reshape(len(x), -1) == 0, axis=1)):
            raise RuntimeError("poisoned sample in batch")
        return {"logits": logits_of(x)}


def wait_until(cond, what):
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.005)


def start(srv):
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_s": 0.05}, daemon=True)
    th.start()
    return th


def stop(srv, th):
    srv.shutdown(timeout_s=5)
    th.join(5)
    assert not th.is_alive()


# ------------------------------------------------------------------ Batcher alone
def test_batcher_composes_fifo_batches_and_fails_only_the_bad_one():
    tail = GatedTail()
    b = Batcher([tail], max_batch=2, max_wait_ms=0)
    try:
        gate_req = b.submit({"feat": np.ones((1, C, H, W), np.float32)})
        assert tail.started.wait(WAIT)  # the worker is inside the first batch; the rest queue up
        a = b.submit({"feat": np.full((1, C, H, W), 2.0, np.float32)})
        z = b.submit({"feat": np.zeros((1, C, H, W), np.float32)})  # poisons its batch
        c = b.submit({"feat": np.full((1, C, H, W), 3.0, np.float32)})
        d = b.submit({"feat": np.full((2, C, H, W), 4.0, np.float32)})  # 2 samples: c + d exceed max_batch
        tail.gate.set()
        assert gate_req.wait(WAIT)["logits"].shape == (1, K)
        for bad in (a, z):
            with pytest.raises(BatchError) as ei:
                bad.wait(WAIT)
            assert ei.value.code == "tail_failed" and "poisoned" in ei.value.message
        np.testing.assert_allclose(c.wait(WAIT)["logits"], logits_of(np.full((1, C, H, W), 3.0, np.float32)), rtol=1e-6)
        np.testing.assert_allclose(d.wait(WAIT)["logits"], logits_of(np.full((2, C, H, W), 4.0, np.float32)), rtol=1e-6)
        assert tail.sizes == [1, 2, 1, 2]
        assert (a.batch, c.batch, d.batch) == (2, 1, 2)
        st = b.describe()
        assert st["failed_batches"] == 1 and st["batches"] == 3 and st["outstanding"] == 0
    finally:
        tail.gate.set()
        b.close()


def test_batcher_splits_on_shape_and_checks_output_rows():
    def tail(feeds):
        x = feeds["feat"]
        if x.shape[-1] == 3:
            return {"logits": np.zeros((len(x) + 1, K), np.float32)}  # one row too many
        return {"logits": x.reshape(len(x), -1).sum(axis=1, keepdims=True)}

    gate = threading.Event()
    started = threading.Event()

    def gated(feeds):
        started.set()
        gate.wait(WAIT)
        return tail(feeds)

    b = Batcher([gated], max_batch=8, max_wait_ms=0)
    try:
        first = b.submit({"feat": np.ones((1, 2), np.float32)})
        assert started.wait(WAIT)
        small = [b.submit({"feat": np.full((1, 2), i, np.float32)}) for i in range(3)]
        odd = b.submit({"feat": np.ones((1, 3), np.float32)})  # other per-sample shape: a batch of its own
        after = b.submit({"feat": np.full((1, 2), 9.0, np.float32)})
        gate.set()
        assert first.wait(WAIT)["logits"].tolist() == [[2.0]]
        assert [p.wait(WAIT)["logits"].tolist() for p in small] == [[[0.0]], [[2.0]], [[4.0]]]
        assert [p.batch for p in small] == [3, 3, 3]
        with pytest.raises(BatchError, match="batch's 1 rows"):
            odd.wait(WAIT)
        assert after.wait(WAIT)["logits"].tolist() == [[18.0]] and after.batch == 1
    finally:
        gate.set()
        b.close()


def test_batcher_busy_when_queue_full_and_shutdown_fails_queued():
    tail = GatedTail()
    b = Batcher([tail], max_batch=1, max_wait_ms=0, max_queue=2)
    x = np.ones((1, C, H, W), np.float32)
    running = b.submit({"feat": x})
    assert tail.started.wait(WAIT)
    queued = [b.submit({"feat": x}), b.submit({"feat": x})]
    with pytest.raises(BatchError) as ei:
        b.submit({"feat": x})  # answered at once, while the worker is still blocked
    assert ei.value.code == "busy" and not tail.gate.is_set()
    threading.Timer(0.05, tail.gate.set).start()
    b.close(timeout_s=WAIT)
    assert running.wait(WAIT)["logits"].shape == (1, K)  # the running batch finished
    for p in queued:
        with pytest.raises(BatchError) as ei:
            p.wait(WAIT)
        assert ei.value.code == "shutting_down"
    with pytest.raises(BatchError, match="shutting_down"):
        b.submit({"feat": x})


def test_batcher_workers_run_in_parallel():
    barrier = threading.Barrier(2, timeout=WAIT)
    seen = []

    def make(i):
        def tail(feeds):
            seen.append(i)
            barrier.wait()  # breaks (and the batch fails) unless the other worker runs at the same time
            return {"logits": logits_of(feeds["feat"])}
        return tail

    b = Batcher([make(0), make(1)], max_batch=1, max_wait_ms=0)
    try:
        x = np.ones((1, C, H, W), np.float32)
        ps = [b.submit({"feat": x}), b.submit({"feat": x})]
        assert [p.wait(WAIT)["logits"].shape for p in ps] == [(1, K), (1, K)]
        assert sorted(seen) == [0, 1]
    finally:
        b.close()


def test_lone_source_never_waits_for_max_wait():
    # max_wait 60 s: a batch that waited for it would time out the 10 s wait below
    b = Batcher([lambda f: {"logits": logits_of(f["feat"])}], max_batch=64, max_wait_ms=60000, sources=lambda: 1)
    try:
        for _ in range(3):
            p = b.submit({"feat": np.ones((1, C, H, W), np.float32)})
            assert p.wait(WAIT)["logits"].shape == (1, K) and p.batch == 1
    finally:
        b.close()


def test_batcher_rejects_bad_limits():
    with pytest.raises(ValueError):
        Batcher([], max_batch=4)
    with pytest.raises(ValueError):
        Batcher([lambda f: f], max_batch=0)


# ------------------------------------------------------------------ through the server
def test_server_batches_across_connections_and_replies_to_each():
    tail = GatedTail()
    srv = EdgeServer(tail, EXPECTED, max_batch=16, max_wait_ms=0, frame_timeout_s=5.0)
    th = start(srv)
    n = 8
    results, errors = {}, []

    def client(i):
        try:
            with EdgeClient(*srv.address, timeout_s=WAIT) as cli:
                q = make_q(100 + i)
                results[i] = (q, cli.infer({"feat": q}, QUANT))
        except Exception as exc:
            errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=client, args=(0,))]
        threads[0].start()
        assert tail.started.wait(WAIT)  # request 0 runs alone (the only connection); the others queue
        threads += [threading.Thread(target=client, args=(i,)) for i in range(1, n)]
        for t in threads[1:]:
            t.start()
        wait_until(lambda: srv.batcher.outstanding == n, "all requests queued")
        tail.gate.set()
        for t in threads:
            t.join(WAIT)
        assert errors == [] and len(results) == n
        for q, r in results.values():  # every connection got its own answer
            np.testing.assert_allclose(r.logits, reference(q), rtol=1e-5, atol=1e-6)
        assert tail.sizes == [1, n - 1]  # the 7 queued requests ran as one batch
        assert sorted(r.meta["batch"] for _, r in results.values()) == [1] + [n - 1] * (n - 1)
    finally:
        tail.gate.set()
        stop(srv, th)


def test_server_lone_device_does_not_wait_for_max_wait():
    # max_wait 60 s, one connection: each request runs at once (a wait would time the 10 s client out)
    srv = EdgeServer(lambda f: {"logits": logits_of(f["feat"])}, EXPECTED, max_batch=64, max_wait_ms=60000)
    th = start(srv)
    try:
        with EdgeClient(*srv.address, timeout_s=WAIT) as cli:
            for i in range(3):
                r = cli.infer({"feat": make_q(i)}, QUANT)
                assert r.meta["batch"] == 1
    finally:
        stop(srv, th)


def test_pipelined_requests_reply_in_order_on_one_connection():
    srv = EdgeServer([lambda f: {"logits": logits_of(f["feat"])}] * 2, EXPECTED, max_batch=4, max_wait_ms=0)
    th = start(srv)
    try:
        s = socket.create_connection(srv.address, timeout=WAIT)
        qs = [make_q(200 + i, n=1 + i % 3) for i in range(6)]
        s.sendall(b"".join(P.encode_request(10 + i, {"feat": q}, QUANT) for i, q in enumerate(qs)))
        for i, q in enumerate(qs):
            rep = P.decode_reply(P.read_frame(s, 1 << 20, WAIT))
            assert rep.request_id == 10 + i
            np.testing.assert_allclose(rep.tensors["logits"], reference(q), rtol=1e-5, atol=1e-6)
        s.close()
    finally:
        stop(srv, th)


def test_failing_batch_and_vanished_client_cost_only_their_own_replies():
    tail = GatedTail()
    srv = EdgeServer(tail, EXPECTED, max_batch=8, max_wait_ms=0)
    th = start(srv)
    try:
        first = EdgeClient(*srv.address, timeout_s=WAIT)
        t0 = threading.Thread(target=lambda: first.infer({"feat": make_q(1)}, QUANT))
        t0.start()
        assert tail.started.wait(WAIT)
        # while the worker is blocked: a good request, a request whose client vanishes, a poisoned one
        good = socket.create_connection(srv.address, timeout=WAIT)
        gone = socket.create_connection(srv.address, timeout=WAIT)
        good.sendall(P.encode_request(1, {"feat": make_q(2)}, QUANT))
        gone.sendall(P.encode_request(2, {"feat": make_q(3)}, QUANT))
        wait_until(lambda: srv.batcher.outstanding == 3, "two requests queued")
        gone.close()  # disconnects before its batch runs
        tail.gate.set()
        rep = P.decode_reply(P.read_frame(good, 1 << 20, WAIT))
        np.testing.assert_allclose(rep.tensors["logits"], reference(make_q(2)), rtol=1e-5, atol=1e-6)
        assert rep.meta["batch"] == 2  # it shared its batch with the vanished client's request
        t0.join(WAIT)

        # a batch with a poisoned sample fails only its requests; the next batch and connection are fine
        tail.gate.clear()
        tail.started.clear()
        t1 = threading.Thread(target=lambda: first.infer({"feat": make_q(4)}, QUANT))
        t1.start()
        assert tail.started.wait(WAIT)
        poison = socket.create_connection(srv.address, timeout=WAIT)
        poison.sendall(P.encode_request(3, {"feat": np.zeros((1, C, H, W), np.int8)}, QUANT))
        good.sendall(P.encode_request(4, {"feat": make_q(5)}, QUANT))
        wait_until(lambda: srv.batcher.outstanding == 3, "poisoned batch queued")
        tail.gate.set()
        for s, rid in ((poison, 3), (good, 4)):
            err = P.decode_error(P.read_frame(s, 1 << 20, WAIT))
            assert (err.code, err.request_id) == ("tail_failed", rid) and "poisoned" in err.message
        t1.join(WAIT)
        good.sendall(P.encode_request(5, {"feat": make_q(6)}, QUANT))  # same connection still serves
        rep = P.decode_reply(P.read_frame(good, 1 << 20, WAIT))
        np.testing.assert_allclose(rep.tensors["logits"], reference(make_q(6)), rtol=1e-5, atol=1e-6)
        for s in (good, poison):
            s.close()
        first.close()
    finally:
        tail.gate.set()
        stop(srv, th)


def test_overload_answers_busy_at_once():
    tail = GatedTail()
    srv = EdgeServer(tail, EXPECTED, max_batch=1, max_wait_ms=0, max_queue=2)
    th = start(srv)
    try:
        socks = [socket.create_connection(srv.address, timeout=WAIT) for _ in range(4)]
        socks[0].sendall(P.encode_request(1, {"feat": make_q(1)}, QUANT))
        assert tail.started.wait(WAIT)
        for i in (1, 2):
            socks[i].sendall(P.encode_request(1 + i, {"feat": make_q(1 + i)}, QUANT))
        wait_until(lambda: srv.batcher.outstanding == 3, "queue full")
        socks[3].sendall(P.encode_request(4, {"feat": make_q(4)}, QUANT))
        err = P.decode_error(P.read_frame(socks[3], 1 << 20, WAIT))
        assert err.code == "busy" and not tail.gate.is_set()  # answered while the worker is still blocked
        tail.gate.set()
        for i in range(3):
            rep = P.decode_reply(P.read_frame(socks[i], 1 << 20, WAIT))
            np.testing.assert_allclose(rep.tensors["logits"], reference(make_q(1 + i)), rtol=1e-5, atol=1e-6)
        with EdgeClient(*srv.address, timeout_s=WAIT) as cli:  # and the client maps busy to unavailable
            tail.gate.clear()
            tail.started.clear()
            socks[0].sendall(P.encode_request(9, {"feat": make_q(9)}, QUANT))
            assert tail.started.wait(WAIT)
            for i in (1, 2):
                socks[i].sendall(P.encode_request(9, {"feat": make_q(9)}, QUANT))
            wait_until(lambda: srv.batcher.outstanding == 3, "queue full again")
            with pytest.raises(ServerUnavailable, match="busy"):
                cli.infer({"feat": make_q(5)}, QUANT)
            tail.gate.set()
        for s in socks:
            s.close()
    finally:
        tail.gate.set()
        stop(srv, th)


def test_unbatched_mode_and_bad_output_rows():
    srv = EdgeServer(lambda f: {"logits": logits_of(f["feat"])}, EXPECTED, batching=False)
    th = start(srv)
    try:
        assert srv.describe() == {"batching": False, "workers": 1}
        with EdgeClient(*srv.address) as cli:
            q = make_q(3, n=2)
            r = cli.infer({"feat": q}, QUANT)
            np.testing.assert_allclose(r.logits, reference(q), rtol=1e-5, atol=1e-6)
            assert "batch" not in r.meta
    finally:
        stop(srv, th)
    with pytest.raises(ValueError, match="one tail"):
        EdgeServer([lambda f: f, lambda f: f], EXPECTED, batching=False)
    srv = EdgeServer(lambda f: {"logits": np.zeros((1, K), np.float32)}, EXPECTED)  # always one row
    th = start(srv)
    try:
        with EdgeClient(*srv.address) as cli:
            with pytest.raises(ServerError) as ei:
                cli.infer({"feat": make_q(1, n=3)}, QUANT)
            assert ei.value.code == "tail_failed" and "3 rows" in ei.value.message
    finally:
        stop(srv, th)

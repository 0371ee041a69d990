"""Online bandwidth estimate (runtime.bandwidth) and the device runner's latency-aware thresholds on a link
whose rate changes during a run. Deterministic: an injected clock and a client whose exchange times follow
the link model, so nothing depends on this machine's speed."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.bandwidth import BandwidthEstimator


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def exchange_ms(nbytes: float, mbps: float, rtt_ms: float) -> float:
    return rtt_ms + nbytes * 8 / (mbps * 1e3)


def test_estimate_recovers_rate_and_rtt_and_follows_a_change():
    clock = Clock()
    est = BandwidthEstimator(window=8, max_age_s=10, idle_s=1.0, clock=clock)
    assert est.estimate_mbps() is None and est.needs_probe()
    est.observe_probe(60, exchange_ms(60, 2.0, 4.0), 2108, exchange_ms(2108, 2.0, 4.0))
    for _ in range(8):
        clock.t += 0.05
        est.observe(1200, exchange_ms(1200, 2.0, 4.0))
    assert est.estimate_mbps() == pytest.approx(2.0, rel=1e-3)
    assert est.rtt_ms == pytest.approx(4.0, rel=1e-3)
    assert not est.needs_probe()
    seen = []
    for _ in range(8):  # the link gets 5x faster: the window turns over in 8 transfers
        clock.t += 0.05
        est.observe(1200, exchange_ms(1200, 10.0, 4.0))
        seen.append(est.estimate_mbps())
    assert seen == sorted(seen) and seen[0] < 3.0
    assert seen[-1] == pytest.approx(10.0, rel=1e-3)  # the round trip measured at the old rate still holds
    clock.t += 1.5
    assert est.needs_probe()  # idle: ask for a ping
    clock.t += 10.0
    assert est.estimate_mbps() is None  # everything aged out


def test_estimate_without_pings_is_a_lower_bound():
    est = BandwidthEstimator(clock=Clock())
    est.observe(1000, exchange_ms(1000, 8.0, 2.0))
    assert est.estimate_mbps() < 8.0 and est.rtt_ms == 0.0
    with pytest.raises(ValueError):
        BandwidthEstimator(window=0)
    with pytest.raises(ValueError):
        est.observe(-1, 3.0)


class FakeShaper:
    def __init__(self, mbps):
        self.bandwidth_mbps = mbps


class ModelClient:
    """Stands in for EdgeClient: answers with the logits of a local tail and exchange times from the link
    model (rate ``shaper.bandwidth_mbps``, round trip ``rtt_ms``), advancing the injected clock."""

    def __init__(self, tail, clock, rtt_ms):
        self.tail, self.clock, self.rtt_ms = tail, clock, rtt_ms
        self.shaper = FakeShaper(1.0)
        self.last_ping_bytes = 0
        self.pings = 0

    def _ms(self, nbytes):
        ms = exchange_ms(nbytes, self.shaper.bandwidth_mbps, self.rtt_ms)
        self.clock.t += ms / 1e3
        return ms

    def ping(self, pad_bytes=0):
        self.pings += 1
        self.last_ping_bytes = 60 + pad_bytes
        return self._ms(self.last_ping_bytes)

    def infer(self, tensors, quant):
        from runtime import codec
        from runtime.client import Reply

        name = next(iter(tensors))
        x = codec.dequantize(tensors[name], quant[name]["scale"], quant[name]["zero_point"])
        logits = self.tail.run_segments({name: x})["logits"]
        sent = 40 + tensors[name].nbytes
        ms = self._ms(sent + 100)
        return Reply(1, logits, np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32), 0.0, ms, 0.0, sent, 100)


def test_runner_thresholds_follow_the_link(adaptive_bundle):
    """Adaptive mode end to end, without sockets: the estimate tracks the emulated rate after a change, and
    every request's thresholds are the regression's at the estimate it records."""
    from runtime.adaptive import thresholds_for
    from runtime.bundle import Bundle
    from runtime.chain import Chain
    from runtime.device import DeviceRunner

    out, test = adaptive_bundle
    bundle = Bundle.load(out)
    reg = bundle.manifest.latency_adaptation.models["onnx/int8"].to_json()
    clock = Clock()
    client = ModelClient(Chain(bundle, "server", "onnx", "int8", with_exits=False), clock,
                         bundle.manifest.latency_adaptation.rtt_ms)
    est = BandwidthEstimator(window=6, idle_s=0.5, clock=clock)
    runner = DeviceRunner(bundle, client, "onnx", "int8", adaptive=True, estimator=est)
    phases = []
    for mbps in (1.0, 20.0):
        client.shaper.bandwidth_mbps = mbps
        rows = [runner.infer(test.x[i:i + 1]) for i in range(60)]
        phases.append(rows)
        for r in rows:
            th, gates = thresholds_for(reg, r.bandwidth_mbps)
            assert r.thresholds == th
    assert client.pings >= 2  # the first request found no measurement and probed
    last1 = [r.bandwidth_mbps for r in phases[0][-10:]]
    last2 = [r.bandwidth_mbps for r in phases[1][-10:]]
    assert np.median(last1) == pytest.approx(1.0, rel=0.1)
    assert np.median(last2) == pytest.approx(20.0, rel=0.1)
    off1 = np.mean([r.where == "server" for r in phases[0][-30:]])
    off2 = np.mean([r.where == "server" for r in phases[1][-30:]])
    assert off2 > off1  # a faster link: more samples go to the server
    assert phases[0][-1].thresholds != phases[1][-1].thresholds
    assert all(r.to_json()["bandwidth_estimate_mbps"] > 0 for r in phases[1])

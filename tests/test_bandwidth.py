"""Online bandwidth estimate (runtime.bandwidth), deterministic: an injected clock and exchange times from
the link model, so nothing depends on this machine's speed. Runtime-only (runs under Python 3.8 too)."""
from __future__ import annotations

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

"""Online estimate of the device's uplink bandwidth from its own transfers (numpy-free, Python 3.8).

Link model (the one :mod:`runtime.link` emulates and the latency model of Dong, Mao & Zhang 2022, eq. 11,
assumes): moving ``b`` bytes in a request and its reply takes ``rtt + b * 8 / B`` on the wire, with the
same rate ``B`` both ways. Each observation is one exchange with the edge server:

* a request: bytes of the request frame + the reply frame, and its wire time = the client's send-to-reply
  time minus the server's whole time on it (``Reply.wire_ms``: the reply's ``meta.server_ms`` covers
  decoding, the wait for a worker and the tail; ``tail_ms`` from a server that does not send it);
* a ping (``PING`` -> ``PONG``), optionally padded to probe the link when it is idle.

Estimate (documented window): over the last ``window`` observations (default 8) that are at most
``max_age_s`` old (default 10 s),

    B = sum(bits_i) / sum(max(ms_i - rtt, floor_ms))

i.e. total bits over total serialisation time — the rate of the window as a whole, so one small or fast
exchange cannot swing it, and a change of link shows fully after ``window`` transfers. ``rtt`` comes from
probes: an empty ping and a ping padded to ``probe_bytes`` sent back to back give two equations
``ms = rtt + bits / B`` for one rate, hence both unknowns; the estimate keeps the median rtt of the last
``window`` probes (0 before the first probe: the rate is then a lower bound), and never more than 90 % of
the quickest recent exchange (no exchange is faster than the round trip; a probe slowed down by anything
else must not leave the transfers with no time to serialise). When no transfer happened for
``idle_s`` (default 1 s) — every sample left at an exit — :meth:`needs_probe` says so and the runner probes.
With payloads much smaller than a round trip's worth of bits the rate is ill-conditioned (a little rtt
jitter swings it) but then it also matters little for latency, which the round trip dominates.

Units: bytes, ms, Mbit/s (10**6 bit/s); times from ``time.monotonic`` unless a clock is injected.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Deque, Dict, Optional, Tuple

__all__ = ["BandwidthEstimator"]


class BandwidthEstimator:
    """Smoothed uplink estimate from recent exchanges; see the module docstring for the model and window.

    Args:
        window: observations kept (>= 1).
        max_age_s: observations older than this (seconds) are dropped.
        idle_s: :meth:`needs_probe` is true when the newest observation is older than this (seconds).
        probe_bytes: payload of the padded probe ping (bytes).
        floor_ms: smallest serialisation time counted per observation (ms), against timer noise.
        clock: monotonic clock in seconds.

    Raises ValueError for a window < 1 or negative times.
    """

    def __init__(self, window: int = 8, max_age_s: float = 10.0, idle_s: float = 1.0, probe_bytes: int = 2048,
                 floor_ms: float = 0.01, clock: Callable[[], float] = time.monotonic):
        if window < 1 or max_age_s <= 0 or idle_s < 0 or probe_bytes < 0 or floor_ms <= 0:
            raise ValueError("window >= 1, max_age_s > 0, idle_s >= 0, probe_bytes >= 0 and floor_ms > 0 are needed")
        self.window, self.max_age_s, self.idle_s = int(window), float(max_age_s), float(idle_s)
        self.probe_bytes, self.floor_ms, self.clock = int(probe_bytes), float(floor_ms), clock
        self._obs = deque(maxlen=self.window)  # type: Deque[Tuple[float, float, float]]  # (t, bits, ms)
        self._rtts = deque(maxlen=self.window)  # type: Deque[float]
        self._estimate = None  # type: Optional[float]
        self.observations = 0

    # -- inputs ------------------------------------------------------------------------------
    def observe(self, bytes_moved: int, ms: float, now: Optional[float] = None) -> None:
        """One exchange that moved ``bytes_moved`` bytes (request + reply frames) in ``ms`` on the wire."""
        if bytes_moved < 0 or ms < 0:
            raise ValueError("bytes and ms must be >= 0, got %r and %r" % (bytes_moved, ms))
        self._obs.append((self.clock() if now is None else now, 8.0 * bytes_moved, float(ms)))
        self.observations += 1
        self._update()

    def observe_probe(self, small_bytes: int, small_ms: float, big_bytes: int, big_ms: float) -> None:
        """Two pings back to back (bytes moved and ms each; the second padded): solves ``ms = rtt + bits/B``
        for the round trip, then counts the padded one as a transfer."""
        dbits = 8.0 * (big_bytes - small_bytes)
        if dbits > 0 and big_ms > small_ms:
            rate = dbits / (big_ms - small_ms)  # bits per ms
            self._rtts.append(max(0.0, small_ms - 8.0 * small_bytes / rate))
        self.observe(big_bytes, big_ms)

    # -- outputs -----------------------------------------------------------------------------
    def _recent(self, items, now: float):
        return [o for o in items if now - o[0] <= self.max_age_s]

    def _update(self) -> None:
        obs = self._recent(self._obs, self.clock())
        if not obs:
            self._estimate = None
            return
        rtt = min(self.rtt_ms, 0.9 * min(ms for _, _, ms in obs))
        busy = sum(max(ms - rtt, self.floor_ms) for _, _, ms in obs)
        self._estimate = sum(bits for _, bits, _ in obs) / busy / 1e3  # bits per ms -> Mbit/s

    @property
    def rtt_ms(self) -> float:
        """Round-trip estimate (ms): the median of the last ``window`` probes' (0 before any probe)."""
        if not self._rtts:
            return 0.0
        v = sorted(self._rtts)
        mid = len(v) // 2
        return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])

    def estimate_mbps(self) -> Optional[float]:
        """The smoothed uplink estimate (Mbit/s), or None without a recent observation."""
        if self._estimate is not None and not self._recent(self._obs, self.clock()):
            self._estimate = None
        return self._estimate

    def needs_probe(self) -> bool:
        """True when no observation is younger than ``idle_s``: the runner should ping."""
        return not self._obs or self.clock() - self._obs[-1][0] > self.idle_s

    def to_json(self) -> Dict[str, object]:
        est = self.estimate_mbps()
        return {"bandwidth_mbps": None if est is None else round(est, 4), "rtt_ms": round(self.rtt_ms, 4),
                "window": self.window, "max_age_s": self.max_age_s, "observations": self.observations}

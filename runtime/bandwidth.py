"""Online estimate of the device's uplink bandwidth from its own transfers (numpy-free, Python 3.8).

Link model (the one :mod:`runtime.link` emulates and the latency model of Dong, Mao & Zhang 2022, eq. 11,
assumes): moving ``b`` bytes in a request and its reply takes ``rtt + b * 8 / B`` on the wire, with the
same rate ``B`` both ways. Each observation is one exchange with the edge server:

* a request: bytes of the request frame + the reply frame, and its wire time = the client's send-to-reply
  time minus the server's whole time on it (``Reply.wire_ms``: the reply's ``meta.server_ms`` covers
  decoding, the wait for a worker and the tail; ``tail_ms`` from a server that does not send it);
* a probe (``PING`` -> ``PONG``): ``probe_pings`` empty pings and as many padded to ``probe_bytes``; the
  quickest of each kind give the round trip and the rate (below), and the quickest padded one counts as a
  transfer. The runner probes when the link has been idle.

Measured times carry one-sided noise: a busy device or server (scheduling, garbage collection, the tail
of another request) only ever *adds* time to an exchange, never removes any. A mean over exchanges (total
bits / total time) therefore reads low under load. The estimate instead keeps the exchanges that were
least delayed, as congestion control does with the same kind of noise:

* round trip: a windowed **minimum** over the probes of the last ``rtt_window_s`` seconds (default 10 s) —
  BBR's ``min_rtt = windowed_min(rtt, 10 seconds)`` (Cardwell et al., "BBR: Congestion-Based Congestion
  Control", ACM Queue 2016; Linux ``tcp_bbr.c``) and LEDBAT's base delay, the minimum of the delays
  observed over a history, with the current delay itself the minimum of the last few samples (Shalunov et
  al., RFC 6817). Each probe contributes the quickest of its empty
  pings less that ping's own serialisation, at the rate of the probe's two sizes: ``(bits_padded -
  bits_empty) / (ms_padded - ms_empty)`` over the quickest ping of each size — the minimum per packet
  size of pathchar (V. Jacobson, 1997; A. Downey, "Using pathchar to estimate Internet link
  characteristics", SIGCOMM 1999), which cancels the delays as long as one ping of each size went through
  undelayed. (A rate read low here would make the round trip too short, the one error a minimum keeps.)
  It is capped at 90 % of the quickest exchange in the window (no exchange is faster than the round
  trip). :meth:`needs_probe` asks for another probe when the newest is older than ``rtt_window_s / 2``,
  so the window holds at least two (BBR's PROBE_RTT refreshes its minimum every 10 s), and when an
  exchange of the window was quicker than the round trip (the probes were all delayed), at most once per
  ``idle_s``;
* rate: a windowed **maximum** over the last ``window`` observations (default 8) at most ``max_age_s``
  old (default 10 s) of each exchange's own rate ``bits_i / (ms_i - rtt)`` — BBR's
  ``bottleneck_bandwidth = windowed_max(delivered / elapsed, 10 round trips)``. An exchange delayed by
  ``d`` ms reads ``bits / (bits / B + d)`` < ``B``, so the maximum is the least delayed exchange's rate:
  exact (given the round trip) as soon as one exchange of the window went through undelayed, whatever the
  others suffered.

Following a change of link (documented window): a faster link shows on the first undelayed exchange at the
new rate; a slower one once the faster exchanges have left the window, i.e. after at most ``window``
exchanges (or ``max_age_s`` seconds). The cost of the maximum: a round trip read too long (no undelayed
probe yet) leaves less serialisation time per exchange and the rate reads high, the more so the smaller
the payload against a round trip's worth of bits (then it matters little for latency, which the round
trip dominates). Without any probe the round trip is 0 and the rate is a lower bound.

Units: bytes, ms, Mbit/s (10**6 bit/s); times from ``time.monotonic`` unless a clock is injected.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Deque, Dict, Optional, Tuple

__all__ = ["BandwidthEstimator"]


class BandwidthEstimator:
    """Uplink estimate robust to one-sided delays, from recent exchanges; see the module docstring for the
    model, the filters and the window.

    Args:
        window: observations kept for the rate's maximum (>= 1).
        max_age_s: observations older than this (seconds) are dropped.
        idle_s: :meth:`needs_probe` is true when the newest observation is older than this (seconds).
        probe_bytes: payload of the padded probe ping (bytes).
        floor_ms: smallest serialisation time counted per observation (ms), against timer noise.
        rtt_window_s: the round trip is the minimum over probes this recent (seconds); older ones expire
            and a probe is asked for.
        probe_pings: empty pings, and as many padded ones, per probe (>= 1); the quickest of each counts.
        clock: monotonic clock in seconds.

    Raises ValueError for a window < 1, probe_pings < 1 or negative times.
    """

    def __init__(self, window: int = 8, max_age_s: float = 10.0, idle_s: float = 1.0, probe_bytes: int = 2048,
                 floor_ms: float = 0.01, rtt_window_s: float = 10.0, probe_pings: int = 3,
                 clock: Callable[[], float] = time.monotonic):
        if (window < 1 or max_age_s <= 0 or idle_s < 0 or probe_bytes < 0 or floor_ms <= 0 or rtt_window_s <= 0
                or probe_pings < 1):
            raise ValueError("window >= 1, max_age_s > 0, idle_s >= 0, probe_bytes >= 0, floor_ms > 0, "
                             "rtt_window_s > 0 and probe_pings >= 1 are needed")
        self.window, self.max_age_s, self.idle_s = int(window), float(max_age_s), float(idle_s)
        self.probe_bytes, self.floor_ms, self.clock = int(probe_bytes), float(floor_ms), clock
        self.rtt_window_s, self.probe_pings = float(rtt_window_s), int(probe_pings)
        self._obs = deque(maxlen=self.window)  # type: Deque[Tuple[float, float, float]]  # (t, bits, ms)
        self._rtts = deque()  # type: Deque[Tuple[float, float]]  # (t, rtt ms), oldest first
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
        """A probe: bytes moved by one empty ping and the quickest empty one's ms, bytes moved by one padded
        ping and the quickest padded one's ms. Adds a round-trip sample: the empty ping's time less its
        serialisation at the rate between the two sizes (at the current estimate when the sizes give none,
        none subtracted without either); then the padded ping counts as a transfer."""
        if small_bytes < 0 or small_ms < 0 or big_bytes < 0 or big_ms < 0:
            raise ValueError("bytes and ms must be >= 0")
        dbits = 8.0 * (big_bytes - small_bytes)
        if dbits > 0 and big_ms > small_ms:
            rate = dbits / (big_ms - small_ms)  # bits per ms
        else:
            rate = self._estimate * 1e3 if self._estimate else None
        now = self.clock()
        self._rtts.append((now, max(0.0, small_ms - (8.0 * small_bytes / rate if rate else 0.0))))
        self.observe(big_bytes, big_ms, now)

    # -- outputs -----------------------------------------------------------------------------
    def _recent(self, items, now: float):
        return [o for o in items if now - o[0] <= self.max_age_s]

    def _update(self) -> None:
        obs = self._recent(self._obs, self.clock())
        if not obs:
            self._estimate = None
            return
        quickest = 0.9 * min(ms for _, _, ms in obs)
        rtt = min(self.rtt_ms, quickest)
        rates = [bits / max(ms - rtt, self.floor_ms) for _, bits, ms in obs if bits > 0]
        self._estimate = max(rates) / 1e3 if rates else None  # bits per ms -> Mbit/s

    @property
    def rtt_ms(self) -> float:
        """Round-trip estimate (ms): the minimum over the probes of the last ``rtt_window_s`` seconds (0
        without one)."""
        now = self.clock()
        while self._rtts and now - self._rtts[0][0] > self.rtt_window_s:
            self._rtts.popleft()
        return min(r for _, r in self._rtts) if self._rtts else 0.0

    def estimate_mbps(self) -> Optional[float]:
        """The uplink estimate (Mbit/s), or None without a recent observation."""
        if self._estimate is not None and not self._recent(self._obs, self.clock()):
            self._estimate = None
        return self._estimate

    def needs_probe(self) -> bool:
        """True when the runner should probe (:meth:`observe_probe`): no observation younger than ``idle_s``,
        no probe younger than ``rtt_window_s / 2``, or an exchange quicker than the round trip (probes
        delayed) and no probe younger than ``idle_s``."""
        now = self.clock()
        if not self._obs or now - self._obs[-1][0] > self.idle_s or not self._rtts:
            return True
        age = now - self._rtts[-1][0]
        if age > self.rtt_window_s / 2:
            return True
        obs = self._recent(self._obs, now)
        return age > self.idle_s and bool(obs) and min(ms for _, _, ms in obs) < self.rtt_ms

    def to_json(self) -> Dict[str, object]:
        est = self.estimate_mbps()
        return {"bandwidth_mbps": None if est is None else round(est, 4), "rtt_ms": round(self.rtt_ms, 4),
                "window": self.window, "max_age_s": self.max_age_s, "rtt_window_s": self.rtt_window_s,
                "observations": self.observations}

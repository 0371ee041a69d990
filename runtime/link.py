"""Emulated network link on the client's side (bandwidth + round-trip latency).

:class:`LinkShaper` paces the bytes a client writes with a token bucket so that sending ``N`` bytes
takes ``N * 8 / bandwidth + rtt / 2`` seconds (one-way propagation), and adds ``rtt / 2`` (plus the
downlink serialisation time of the reply) after a reply has been received. The real transport
(loopback TCP) is much faster, so the emulated delays dominate and the measured end-to-end time
matches a link of the given speed.

Release rule: each chunk is released when the bucket holds enough tokens for it, i.e. at the time
its last bit would have left a link of that rate, so the peer sees the complete message no earlier
than ``start + rtt/2 + N*8/bandwidth``. ``burst_bytes`` lets an idle link send that many bytes at
once (default 0: strict pacing). With an injected clock and sleep the shaper is deterministic.

Units: bandwidth in Mbit/s (1 Mbit = 10**6 bits), times in ms in the public API, seconds for
clock / sleep callables. Python 3.8 compatible, stdlib only.
"""
from __future__ import annotations

import re
import time
from typing import Callable, Optional, Union

__all__ = ["LinkShaper", "parse_bandwidth", "parse_duration"]

_BW_UNITS = {
    # bits per second (tc-style "kbit", "mbit", plus the common "kbps"/"mbps" = kilo/mega BITS per s)
    "bit": 1e-6, "bps": 1e-6, "b/s": 1e-6,
    "kbit": 1e-3, "kbps": 1e-3, "kb/s": 1e-3, "kbit/s": 1e-3,
    "mbit": 1.0, "mbps": 1.0, "mbit/s": 1.0,
    "gbit": 1e3, "gbps": 1e3, "gbit/s": 1e3,
    # bytes per second (spelled out to avoid the bit/byte ambiguity)
    "byte/s": 8e-6, "kbyte/s": 8e-3, "mbyte/s": 8.0, "gbyte/s": 8e3,
    "kib/s": 8 * 1024 / 1e6, "mib/s": 8 * 1024 * 1024 / 1e6,
}
_DUR_UNITS = {"us": 1e-3, "µs": 1e-3, "usec": 1e-3, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3, "min": 60e3}
_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_bandwidth(text: Union[str, float, int]) -> float:
    """Parse a bandwidth such as ``"10mbit"``, ``"1.5mbps"``, ``"500kbit"``, ``"2 MB/s"``.

    Units (case-insensitive): bit, kbit, mbit, gbit and bps, kbps, mbps, gbps are **bits** per
    second (SI, k = 1000). NOTE: Linux ``tc`` reads "mbps" as megaBYTES/s; here "mbps" means
    megabits/s as in everyday networking. Bytes per second must be written byte/s, kbyte/s,
    mbyte/s, KiB/s or MiB/s. A bare number is Mbit/s.

    Returns:
        Bandwidth in Mbit/s (float > 0).

    Raises:
        ValueError: unparsable text, unknown unit, or a value <= 0 / not finite.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUM + r"([A-Za-zµ/]*)\s*", str(text))
        if not m:
            raise ValueError("cannot parse bandwidth %r (examples: '10mbit', '1.5mbps', '500kbit')" % (text,))
        unit = m.group(2).lower()
        if unit == "":
            factor = 1.0
        elif unit in ("mb/s", "gb/s", "mib", "kib"):
            raise ValueError("ambiguous bandwidth unit %r in %r: write mbit / mbps for bits or mbyte/s for bytes"
                             % (m.group(2), text))
        elif unit in _BW_UNITS:
            factor = _BW_UNITS[unit]
        else:
            raise ValueError("unknown bandwidth unit %r in %r; known: %s" % (m.group(2), text, ", ".join(sorted(_BW_UNITS))))
        value = float(m.group(1)) * factor
    if not (value > 0 and value != float("inf")):
        raise ValueError("bandwidth must be > 0 and finite, got %r" % (text,))
    return value


def parse_duration(text: Union[str, float, int]) -> float:
    """Parse a duration such as ``"20ms"``, ``"0.5s"``, ``"150us"``; a bare number is ms.

    Returns:
        Duration in milliseconds (float >= 0).

    Raises:
        ValueError: unparsable text, unknown unit or a negative / non-finite value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUM + r"([A-Za-zµ]*)\s*", str(text))
        if not m:
            raise ValueError("cannot parse duration %r (examples: '20ms', '0.5s', '150us')" % (text,))
        unit = m.group(2).lower()
        if unit and unit not in _DUR_UNITS:
            raise ValueError("unknown duration unit %r in %r; known: %s" % (m.group(2), text, ", ".join(sorted(_DUR_UNITS))))
        value = float(m.group(1)) * (_DUR_UNITS[unit] if unit else 1.0)
    if not (value >= 0 and value != float("inf")):
        raise ValueError("duration must be >= 0 and finite, got %r" % (text,))
    return value


class LinkShaper:
    """Token-bucket emulation of a link of ``bandwidth_mbps`` and round trip ``rtt_ms``.

    Args:
        bandwidth_mbps: uplink rate in Mbit/s (> 0).
        rtt_ms: round-trip time in ms (>= 0); half is added before the first byte of a message
            goes out and half after a reply is received.
        downlink_mbps: rate used for received bytes (Mbit/s); None = same as the uplink.
        burst_bytes: bucket capacity in bytes (0 = strict pacing).
        chunk_bytes: bytes handed to the socket per release (> 0).
        clock: monotonic clock in seconds (default time.monotonic).
        sleep: sleep function taking seconds (default time.sleep).

    Raises:
        ValueError: a rate <= 0, negative rtt / burst, or chunk_bytes <= 0.
    """

    def __init__(self, bandwidth_mbps: float, rtt_ms: float = 0.0, downlink_mbps: Optional[float] = None,
                 burst_bytes: int = 0, chunk_bytes: int = 16384,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.bandwidth_mbps = parse_bandwidth(bandwidth_mbps)
        self.rtt_ms = parse_duration(rtt_ms)
        self.downlink_mbps = self.bandwidth_mbps if downlink_mbps is None else parse_bandwidth(downlink_mbps)
        if burst_bytes < 0 or chunk_bytes <= 0:
            raise ValueError("burst_bytes must be >= 0 and chunk_bytes > 0")
        self.burst_bytes = int(burst_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._clock = clock
        self._sleep = sleep
        self._rate = self.bandwidth_mbps * 1e6 / 8.0  # bytes per second
        self._tokens = float(self.burst_bytes)
        self._last = None  # type: Optional[float]
        self.bytes_sent = 0
        self.bytes_received = 0
        self.slept_s = 0.0

    @classmethod
    def from_strings(cls, bandwidth: str, rtt: str = "0ms", **kwargs) -> "LinkShaper":
        """``LinkShaper.from_strings("10mbit", "20ms")``: parses with :func:`parse_bandwidth` / :func:`parse_duration`."""
        return cls(parse_bandwidth(bandwidth), parse_duration(rtt), **kwargs)

    def __repr__(self) -> str:
        return "LinkShaper(%.3f Mbit/s up, %.3f Mbit/s down, rtt %.3f ms)" % (
            self.bandwidth_mbps, self.downlink_mbps, self.rtt_ms)

    # -- pure model -------------------------------------------------------------------------
    def uplink_ms(self, nbytes: int) -> float:
        """Model time (ms) for the peer to have ``nbytes`` sent from an idle link: N*8/bw + rtt/2."""
        return nbytes * 8.0 / (self.bandwidth_mbps * 1e3) + self.rtt_ms / 2.0

    def downlink_ms(self, nbytes: int) -> float:
        """Model time (ms) added after receiving ``nbytes``: N*8/downlink + rtt/2."""
        return nbytes * 8.0 / (self.downlink_mbps * 1e3) + self.rtt_ms / 2.0

    # -- emulation --------------------------------------------------------------------------
    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._sleep(seconds)
            self.slept_s += seconds

    def _refill(self) -> None:
        now = self._clock()
        if self._last is None:
            self._tokens = float(self.burst_bytes)
        else:
            self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * self._rate)
        self._last = now

    def transmit(self, data: bytes, sendall: Callable[[bytes], None]) -> float:
        """Send ``data`` through ``sendall`` paced to the emulated link.

        Sleeps rtt/2 first, then releases ``chunk_bytes`` at a time as tokens allow.

        Returns:
            Seconds elapsed on the shaper's clock.
        """
        start = self._clock()
        self._wait(self.rtt_ms / 2000.0)
        view = memoryview(data)
        for pos in range(0, len(view), self.chunk_bytes):
            chunk = view[pos:pos + self.chunk_bytes]
            self._refill()
            self._tokens -= len(chunk)
            if self._tokens < 0:
                self._wait(-self._tokens / self._rate)
                self._refill()
            sendall(chunk)
            self.bytes_sent += len(chunk)
        return self._clock() - start

    def send(self, sock, data: bytes) -> float:
        """:meth:`transmit` over a socket (``sock.sendall``); returns elapsed seconds."""
        return self.transmit(data, sock.sendall)

    def after_receive(self, nbytes: int) -> float:
        """Sleep for the downlink part of a reply of ``nbytes``: N*8/downlink + rtt/2; returns seconds slept."""
        self.bytes_received += int(nbytes)
        seconds = self.downlink_ms(int(nbytes)) / 1000.0
        self._wait(seconds)
        return seconds

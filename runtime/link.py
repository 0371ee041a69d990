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
from typing import Callable, List, Optional, Tuple, Union

__all__ = ["LinkShaper", "parse_bandwidth", "parse_bandwidths", "parse_schedule", "format_bandwidth", "parse_duration",
           "BANDWIDTH_GRAMMAR"]

# One bandwidth grammar for every option that takes a bandwidth (run / bench --bandwidth(s), eetool plan
# --bandwidth / --downlink, eetool exits calibrate --bandwidth):
#     NUMBER [PREFIX] UNIT [PER]     or a bare NUMBER (Mbit/s)
#     PREFIX: k, M, G (decimal: 10^3, 10^6, 10^9; case-insensitive, since milli-bits make no sense)
#             Ki, Mi, Gi (binary: 2^10, 2^20, 2^30)
#     UNIT:   b or bit(s) = bit;  B or byte(s) = byte (8 bits)   -- "b" and "B" are case-sensitive
#     PER:    /s or ps, optional
# A prefix without a unit ("10m", "5G") is refused: it could be bits or bytes.
_BW_RE = re.compile(r"\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
                    r"(?P<prefix>(?:[kKmMgG]i?)?)(?P<unit>(?i:bits?|bytes?)|b|B|)(?P<per>(?i:/s|ps)|)\s*")
_BW_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2.0 ** 10, "mi": 2.0 ** 20, "gi": 2.0 ** 30}
_DUR_UNITS = {"us": 1e-3, "µs": 1e-3, "usec": 1e-3, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3, "min": 60e3}
_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"
BANDWIDTH_GRAMMAR = ("NUMBER[k|M|G][b|bit|B|byte][/s|ps]: b = bit, B = byte, k/M/G decimal (Ki/Mi/Gi binary), "
                     "a bare number is Mbit/s; e.g. 10mbit, 10Mb/s, 1Gbps, 500kB/s, 10MBps")


def parse_bandwidth(text: Union[str, float, int]) -> float:
    """Parse a bandwidth in the one grammar every eetool option uses (see README "Bandwidths").

    ``NUMBER [PREFIX] UNIT [/s|ps]``: ``b``/``bit``/``bits`` is a bit and ``B``/``byte``/``bytes`` a byte
    (``b`` and ``B`` are case-sensitive; the spelled-out words are not); the prefixes ``k``, ``M``, ``G``
    are decimal in either case (``Ki``, ``Mi``, ``Gi`` binary); ``/s`` or ``ps`` may follow. So ``10mbit``
    = ``10Mb/s`` = ``10 Mbps`` = 10 Mbit/s, ``10MBps`` = ``10MB/s`` = 80 Mbit/s, ``500kB/s`` = 4 Mbit/s,
    ``1Gb/s`` = 1000 Mbit/s. A bare number is Mbit/s; numbers pass through as Mbit/s. Linux ``tc`` reads
    "mbps" as megabytes/s: here ``b`` is always a bit.

    Returns:
        Bandwidth in Mbit/s (float > 0).

    Raises:
        ValueError: unparsable text; a prefix without a unit (``10m``: bits or bytes?), with a suggested
            spelling; a value <= 0 or not finite.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _BW_RE.fullmatch(str(text))
        if not m:
            raise ValueError("cannot parse bandwidth %r; write %s" % (text, BANDWIDTH_GRAMMAR))
        num, prefix, unit, per = m.group("num", "prefix", "unit", "per")
        if not unit and (prefix or per):
            if prefix:
                p = {"k": "k", "m": "M", "g": "G", "ki": "Ki", "mi": "Mi", "gi": "Gi"}[prefix.lower()]
                raise ValueError("ambiguous bandwidth %r: %s%s could be bits or bytes; write %s%sbit (%s Mbit/s) or "
                                 "%s%sB/s (%s Mbit/s)" % (text, num, prefix, num, p, _g(float(num) * _BW_PREFIX[prefix.lower()] / 1e6),
                                                          num, p, _g(float(num) * _BW_PREFIX[prefix.lower()] * 8 / 1e6)))
            raise ValueError("cannot parse bandwidth %r: %r needs a unit before it; write %s" % (text, per, BANDWIDTH_GRAMMAR))
        if not unit:
            value = float(num)
        else:
            bits = 8.0 if unit == "B" or unit.lower().startswith("byte") else 1.0
            value = float(num) * _BW_PREFIX[prefix.lower()] * bits / 1e6
    if not (value > 0 and value != float("inf")):
        raise ValueError("bandwidth must be > 0 and finite, got %r" % (text,))
    return value


def _g(x: float) -> str:
    return "%g" % x


def parse_bandwidths(text: str) -> List[float]:
    """A comma-separated list of bandwidths in :func:`parse_bandwidth`'s grammar, in Mbit/s:
    ``"1,10,100mbit"`` -> ``[1.0, 10.0, 100.0]``. The unit of the last item applies to bare numbers before it
    (``"0.5,2MB/s"`` -> ``[4.0, 16.0]``). Raises ValueError for an empty list or any item that does not parse."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("give at least one bandwidth, e.g. 1,10,100mbit")
    last = parse_bandwidth(items[-1])  # its own error first: its unit is lent to the bare numbers
    unit = items[-1][_BW_RE.fullmatch(items[-1]).end("num"):].strip()
    return [parse_bandwidth(t + unit if unit and re.fullmatch(_NUM, t) else t) for t in items[:-1]] + [last]


def parse_schedule(text: str) -> List[Tuple[float, int]]:
    """A link that changes during a run: ``"1mbit:60,20mbit:60"`` -> ``[(1.0, 60), (20.0, 60)]`` (Mbit/s,
    requests per phase). Raises ValueError naming the bad item."""
    out = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        bw, _, n = item.rpartition(":")
        if not bw or not n.isdigit() or int(n) < 1:
            raise ValueError("schedule item %r: expected RATE:REQUESTS, e.g. 1mbit:60,20mbit:60" % item)
        out.append((parse_bandwidth(bw), int(n)))
    if not out:
        raise ValueError("empty schedule: give RATE:REQUESTS items, e.g. 1mbit:60,20mbit:60")
    return out


def format_bandwidth(mbps: float) -> str:
    """``10.0`` -> ``"10 Mbit/s"``; ``0.5`` -> ``"500 kbit/s"``; ``2000`` -> ``"2 Gbit/s"`` (decimal prefixes)."""
    if mbps >= 1e3:
        return "%g Gbit/s" % (mbps / 1e3)
    if mbps < 1:
        return "%g kbit/s" % (mbps * 1e3)
    return "%g Mbit/s" % mbps


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
    def set_bandwidth(self, bandwidth_mbps: Union[str, float], downlink_mbps: Union[None, str, float] = None) -> None:
        """Change the emulated rate from the next chunk on (a link that changes during a run); the downlink
        follows unless given. Raises ValueError like the constructor."""
        same = self.downlink_mbps == self.bandwidth_mbps
        self.bandwidth_mbps = parse_bandwidth(bandwidth_mbps)
        if downlink_mbps is not None:
            self.downlink_mbps = parse_bandwidth(downlink_mbps)
        elif same:
            self.downlink_mbps = self.bandwidth_mbps
        self._rate = self.bandwidth_mbps * 1e6 / 8.0

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

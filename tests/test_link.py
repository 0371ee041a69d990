"""runtime.link: bandwidth / duration parsing and the token-bucket shaper on a fake clock."""
import threading

import numpy as np
import pytest

from runtime import codec
from runtime.link import LinkShaper, format_bandwidth, parse_bandwidth, parse_bandwidths, parse_duration


class FakeClock(object):
    """time only moves when the code under test sleeps."""

    def __init__(self, t=1000.0):
        self.t = t
        self.sleeps = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        assert s >= 0
        self.sleeps.append(s)
        self.t += s


# The one bandwidth grammar of every option that takes a bandwidth (README "Bandwidths"):
# NUMBER [k|M|G] [b|bit|B|byte] [/s|ps]; b = bit, B = byte, k/M/G decimal, a bare number is Mbit/s.
BANDWIDTH_FORMS = [
    # bits
    ("10mbit", 10.0), ("10Mbit", 10.0), ("10 Mbit/s", 10.0), ("10Mb/s", 10.0), ("10Mbps", 10.0), ("10mbps", 10.0),
    ("10mb", 10.0), ("1.5mbps", 1.5), ("500kbit", 0.5), ("500kbps", 0.5), ("500 kb/s", 0.5), ("1gbit", 1000.0),
    ("1Gb/s", 1000.0), ("1Gbps", 1000.0), ("8000bit", 0.008), ("8000 bit/s", 0.008), ("8000bps", 0.008),
    ("2 Mbits/s", 2.0), (" 10MBIT ", 10.0), ("1e3kbit", 1.0),
    # bytes
    ("10MBps", 80.0), ("10MB/s", 80.0), ("10MB", 80.0), ("10 MBps", 80.0), ("500kB/s", 4.0), ("500KB/s", 4.0),
    ("1GB/s", 8000.0), ("1mbyte/s", 8.0), ("1 Mbytes/s", 8.0), ("125000B/s", 1.0), ("125000 bytes/s", 1.0),
    # binary prefixes, spelled out
    ("1MiB/s", 8.388608), ("1Mibit", 1.048576), ("1KiB/s", 0.008192),
    # bare numbers are Mbit/s
    ("100", 100.0), (25, 25.0), (2.5, 2.5),
]


@pytest.mark.parametrize("text,mbps", BANDWIDTH_FORMS)
def test_parse_bandwidth(text, mbps):
    assert parse_bandwidth(text) == pytest.approx(mbps)


@pytest.mark.parametrize("text,hint", [
    ("10m", "10Mbit (10 Mbit/s) or 10MB/s (80 Mbit/s)"),  # a prefix without a unit: bits or bytes?
    ("5G", "5Gbit (5000 Mbit/s) or 5GB/s (40000 Mbit/s)"),
    ("500k", "500kbit (0.5 Mbit/s) or 500kB/s (4 Mbit/s)"),
    ("10ps", "needs a unit"),
])
def test_ambiguous_bandwidths_are_refused_with_a_spelling(text, hint):
    with pytest.raises(ValueError) as e:
        parse_bandwidth(text)
    assert hint in str(e.value)


@pytest.mark.parametrize("text", ["fast", "10 furlongs", "0mbit", "-1mbit", "", "inf", "1..2mbit", True,
                                  "10 Mbit/sec", "10xbit"])
def test_parse_bandwidth_rejects(text):
    with pytest.raises(ValueError):
        parse_bandwidth(text)


def test_bandwidth_lists_share_the_grammar():
    assert parse_bandwidths("1,10,100mbit") == pytest.approx([1.0, 10.0, 100.0])
    assert parse_bandwidths("0.5,2MB/s") == pytest.approx([4.0, 16.0])  # the last item's unit for bare numbers
    assert parse_bandwidths("1mbit, 10MBps,1Gb/s") == pytest.approx([1.0, 80.0, 1000.0])
    assert parse_bandwidths("1,10") == pytest.approx([1.0, 10.0])
    with pytest.raises(ValueError, match="could be bits or bytes"):
        parse_bandwidths("1,10m")
    with pytest.raises(ValueError, match="at least one"):
        parse_bandwidths(" , ")
    assert format_bandwidth(80.0) == "80 Mbit/s" and format_bandwidth(0.5) == "500 kbit/s"
    assert format_bandwidth(1000.0) == "1 Gbit/s"


@pytest.mark.parametrize("text,ms", [("20ms", 20.0), ("0.5s", 500.0), ("150us", 0.15), ("150µs", 0.15),
                                     ("5", 5.0), (7, 7.0), ("0ms", 0.0), ("1min", 60000.0), ("2 sec", 2000.0)])
def test_parse_duration(text, ms):
    assert parse_duration(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["soon", "-5ms", "5 parsecs", ""])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_transmit_takes_size_over_bandwidth_plus_half_rtt():
    clk = FakeClock()
    shaper = LinkShaper(10.0, 20.0, clock=clk, sleep=clk.sleep, chunk_bytes=10000)
    data = bytes(range(256)) * 500  # 128000 bytes
    sent, times = [], []

    def sendall(chunk):
        sent.append(bytes(chunk))
        times.append(clk.t - 1000.0)

    elapsed = shaper.transmit(data, sendall)
    assert b"".join(sent) == data
    expected = len(data) * 8 / 10e6 + 0.010
    assert elapsed == pytest.approx(expected, abs=1e-12)
    assert shaper.uplink_ms(len(data)) == pytest.approx(expected * 1000)
    # each chunk is released when its last bit would have left the link
    cum = np.cumsum([len(c) for c in sent])
    np.testing.assert_allclose(times, 0.010 + cum * 8 / 10e6, atol=1e-12)
    assert shaper.bytes_sent == len(data) and shaper.slept_s == pytest.approx(expected)


def test_back_to_back_sends_get_no_credit_but_burst_after_idle():
    clk = FakeClock()
    s = LinkShaper("8mbit", "0ms", clock=clk, sleep=clk.sleep)  # 1 byte per microsecond
    assert s.transmit(bytes(1000), lambda c: None) == pytest.approx(0.001)
    assert s.transmit(bytes(1000), lambda c: None) == pytest.approx(0.001)
    clk.t += 5.0  # idle for a long time: strict pacing still (burst 0)
    assert s.transmit(bytes(1000), lambda c: None) == pytest.approx(0.001)

    clk2 = FakeClock()
    b = LinkShaper("8mbit", "0ms", burst_bytes=4000, chunk_bytes=1000, clock=clk2, sleep=clk2.sleep)
    assert b.transmit(bytes(4000), lambda c: None) == pytest.approx(0.0)  # fits the bucket
    assert b.transmit(bytes(2000), lambda c: None) == pytest.approx(0.002)  # bucket empty
    clk2.t += 0.003  # refills 3000 bytes
    assert b.transmit(bytes(4000), lambda c: None) == pytest.approx(0.001)


def test_after_receive_and_asymmetric_link():
    clk = FakeClock()
    s = LinkShaper.from_strings("1mbit", "40ms", downlink_mbps="4mbit", clock=clk, sleep=clk.sleep)
    assert s.after_receive(5000) == pytest.approx(5000 * 8 / 4e6 + 0.020)
    assert clk.t - 1000.0 == pytest.approx(0.030)
    assert s.downlink_ms(5000) == pytest.approx(30.0)
    assert "1.000 Mbit/s up" in repr(s)


def test_bad_shaper_args():
    with pytest.raises(ValueError):
        LinkShaper(0, 10)
    with pytest.raises(ValueError):
        LinkShaper(10, -1)
    with pytest.raises(ValueError):
        LinkShaper(10, 1, chunk_bytes=0)


def test_client_with_shaper_over_loopback_uses_the_model():
    """A real EdgeClient + EdgeServer with a fake-clock shaper: the emulated delay equals the model."""
    from runtime.client import EdgeClient
    from runtime.server import EdgeServer

    srv = EdgeServer(lambda d: {"logits": d["feat"].reshape(d["feat"].shape[0], -1)[:, :10]},
                     {"feat": {"shape": [None, 4, 8, 8], "dtype": "float32"}})
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        clk = FakeClock()
        shaper = LinkShaper("2mbit", "30ms", clock=clk, sleep=clk.sleep)
        x = codec.quantize(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32), 0.05, 0, "int8")
        with EdgeClient(*srv.address, shaper=shaper, codec="lz4") as cli:
            r = cli.infer({"feat": x}, {"feat": {"scale": 0.05, "zero_point": 0, "dtype": "int8"}})
        assert shaper.bytes_sent == r.bytes_sent and shaper.bytes_received == r.bytes_received
        model_s = (shaper.uplink_ms(r.bytes_sent) + shaper.downlink_ms(r.bytes_received)) / 1000.0
        assert shaper.slept_s == pytest.approx(model_s)
        assert clk.t - 1000.0 == pytest.approx(model_s)
    finally:
        srv.shutdown()
        th.join(5)


def test_runtime_cli_reads_bandwidths_with_the_same_grammar(capsys):
    """run / bench take --bandwidth and --bandwidths in the same grammar and refuse an ambiguous one while
    parsing the command line, before a bundle is even looked at."""
    from runtime.__main__ import build_parser, main

    args = build_parser().parse_args(["run", "B", "--server", "h:1", "--bandwidth", "10MBps", "x.jpg"])
    assert LinkShaper.from_strings(args.bandwidth, args.rtt).bandwidth_mbps == pytest.approx(80.0)
    args = build_parser().parse_args(["bench", "B", "--bandwidths", "500kB/s,1Gb/s"])
    assert parse_bandwidths(args.bandwidths) == pytest.approx([4.0, 1000.0])
    for argv in (["run", "/no/such/bundle", "--bandwidth", "10m", "x.jpg"], ["bench", "/no/such/bundle", "--bandwidths", "1,10m"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "10Mbit (10 Mbit/s) or 10MB/s (80 Mbit/s)" in err and "no such" not in err

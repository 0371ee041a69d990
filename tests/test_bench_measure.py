"""How the bench measures: the runtime-vs-bare-onnxruntime ratio from interleaved pairs, CPU time next to
latency, and onnxruntime's spinning set as configured. Fake clocks where timing is involved: nothing here
depends on how fast this machine is."""
import numpy as np
import pytest

from runtime.backends import SPIN_KEYS, OrtSession, session_options
from runtime.bench import interleaved_pairs, ratio_summary, runtime_overhead, timed
from runtime.boards import allow_spinning, list_boards, load_board


class Clock(object):
    """Time moves only when a fake run says how long it took."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_pairs_are_interleaved_after_a_common_warm_up():
    clock, log = Clock(), []
    a_ms, b_ms = {0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 4.0, 2: 1.0}

    def run(side, table):
        def f(x):
            log.append((side, x))
            clock.t += table[x] / 1e3
        return f

    pairs = interleaved_pairs(run("A", a_ms), run("B", b_ms), [0, 1, 2], repeat=2, warmup=1, clock=clock)
    # warm-up: both sides on every input, untimed; then one pair per input and pass, order alternating
    assert log[:6] == [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A", 2), ("B", 2)]
    assert [s for s, _ in log[6:]] == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert [x for _, x in log[6:]] == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert pairs == [pytest.approx((a_ms[x], b_ms[x])) for x in (0, 1, 2, 0, 1, 2)]


def test_ratio_is_the_median_of_per_pair_ratios_with_its_spread():
    pairs = [(3.0, 1.0), (5.0, 4.0), (4.0, 1.0), (3.0, 1.0), (5.0, 4.0), (4.0, 1.0)]
    r = ratio_summary(pairs)
    ratios = [3.0, 1.25, 4.0, 3.0, 1.25, 4.0]
    assert r["pairs"] == 6 and r["ratio_median"] == pytest.approx(np.median(ratios)) == pytest.approx(3.0)
    assert r["ratio_iqr"] == pytest.approx(list(np.percentile(ratios, [25, 75])))
    # not the ratio of the medians (4.0 / 1.0), which mixes inputs of different cost
    assert r["a_p50_ms"] / r["b_p50_ms"] == pytest.approx(4.0) != r["ratio_median"]


def test_timed_reports_cpu_time_next_to_wall_time():
    wall, cpu = Clock(), Clock()

    def work():
        wall.t += 0.010
        cpu.t += 0.025  # two threads busy (or one spinning)
        return "done"

    assert timed(work, clock=wall, cpu_clock=cpu) == ("done", pytest.approx(0.010), pytest.approx(0.025))


def test_session_options_set_spinning_and_threads_as_asked():
    off = session_options(2, allow_spinning=False)
    assert [off.get_session_config_entry(k) for k in SPIN_KEYS] == ["0", "0"]
    assert off.intra_op_num_threads == 2 and off.inter_op_num_threads == 1
    on = session_options(None, allow_spinning=True)
    assert [on.get_session_config_entry(k) for k in SPIN_KEYS] == ["1", "1"]
    default = session_options(None, allow_spinning=None)  # onnxruntime's own default left alone
    for k in SPIN_KEYS:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            default.get_session_config_entry(k)


def test_boards_turn_spinning_off_unless_told():
    for name in list_boards():
        assert allow_spinning(load_board(name)) is False
    assert allow_spinning(load_board("rpi4"), "on") is True
    assert allow_spinning(dict(load_board("rpi4"), backend={"preferred": "litert", "allow_spinning": True})) is True
    assert allow_spinning(None) is False  # the device side without a profile
    with pytest.raises(ValueError):
        allow_spinning(None, "maybe")


def _sessions(runner):
    return [sess for _, sess in runner.chain.segments]


def test_device_sessions_read_back_the_board_setting(effnet_bundle):
    from runtime.__main__ import build_parser, device_options
    from runtime.bundle import Bundle
    from runtime.session import make_runner

    out, _ = effnet_bundle
    bundle = Bundle.load(out)
    for extra, want in (([], "0"), (["--spinning", "on"], "1"), (["--spinning", "off"], "0")):
        args = build_parser().parse_args(["run", str(out), "--board", "rpi4"] + extra + ["x.jpg"])
        runner, fmt, _ = make_runner(bundle, load_board("rpi4"), device_options(args))
        sessions = _sessions(runner)
        assert fmt == "onnx" and sessions and all(isinstance(s, OrtSession) for s in sessions)
        for s in sessions:
            assert [s.options.get_session_config_entry(k) for k in SPIN_KEYS] == [want, want]
            assert s.options.intra_op_num_threads == 4  # rpi4's backend.threads


def test_runtime_overhead_runs_both_sides_on_the_same_options_and_inputs(effnet_bundle, verify_images,
                                                                         monkeypatch):
    """The measured structure on the real graphs: pairs = inputs x repeat, the ratio is the median of the
    pairs' ratios, and the bare sessions get the same session options as the chain's."""
    import runtime.bench as bench
    from runtime.bundle import Bundle

    made = []
    real = bench.interleaved_pairs

    def spy(run_a, run_b, items, repeat, warmup=1, clock=None):
        made.append((len(items), repeat, warmup))
        return real(run_a, run_b, items, repeat, warmup)

    monkeypatch.setattr(bench, "interleaved_pairs", spy)
    import onnxruntime as ort

    opened = []
    real_session = ort.InferenceSession

    def record(path, sess_options=None, **kw):
        opened.append(sess_options)
        return real_session(path, sess_options=sess_options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", record)
    bundle = Bundle.load(effnet_bundle[0])
    xs = [verify_images.x[i:i + 1] for i in range(3)]
    o = runtime_overhead(bundle, xs, threads=2, repeat=2, warmup=1, allow_spinning=False)
    assert made == [(3, 2, 1)] and o["pairs"] == 6 == len(o["pairs_ms"])
    ratios = [a / b for a, b in o["pairs_ms"]]
    assert o["overhead_ratio"] == pytest.approx(np.median(ratios), rel=1e-3)
    assert o["overhead_ratio_iqr"] == pytest.approx(list(np.percentile(ratios, [25, 75])), rel=1e-3)
    assert len(opened) == 2 * len(bundle.segments)  # the chain's sessions and the bare ones
    for opts in opened:
        assert [opts.get_session_config_entry(k) for k in SPIN_KEYS] == ["0", "0"]
        assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1

"""Threshold math on hand-built logits (numpy only)."""
import math

import numpy as np
import pytest

from calibration import thresholds as T


def test_rules_on_known_logits():
    z = np.array([[0, 0, 0, 0], [100, 0, 0, 0], [1000, -1000, 0, 0], [math.log(3), 0, 0, 0]], np.float32)
    ent = T.normalized_entropy(z)
    ms = T.max_softmax(z)
    assert ent.shape == ms.shape == (4,) and ent.dtype == ms.dtype == np.float32
    assert ent[0] == pytest.approx(1.0, abs=1e-6)      # uniform -> 1
    assert ms[0] == pytest.approx(0.25)
    assert ent[1] == pytest.approx(0.0, abs=1e-6) and ms[1] == pytest.approx(1.0)
    assert np.isfinite(ent[2]) and ms[2] == 1.0          # huge logits: no overflow
    assert ms[3] == pytest.approx(0.5)                   # probs (1/2, 1/6, 1/6, 1/6)
    p = np.array([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert ent[3] == pytest.approx(-(p * np.log(p)).sum() / math.log(4), rel=1e-6)
    # shift invariance
    np.testing.assert_allclose(T.normalized_entropy(z[3:] + 50), ent[3:], rtol=1e-6)


def test_nan_logits_rejected_with_count():
    z = np.zeros((5, 3), np.float32)
    z[1, 0] = np.nan
    z[3, :2] = np.nan
    with pytest.raises(ValueError, match="3 NaN/inf values in 2 of 5 rows"):
        T.max_softmax(z)
    with pytest.raises(ValueError, match="3 NaN"):
        T.normalized_entropy(z)


def _profile():
    """3 outputs (2 exits + final), 8 samples, costs 1 / 2 / 7 MFLOPs, branches 0.1 / 0.2.

    exit0 confident and right on samples 0-3, unsure elsewhere; exit1 confident and right on 4-5,
    confident but WRONG on 6; final right on all but 7.
    """
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    def logits(conf_right):  # {i: (confident, right)}
        z = np.zeros((8, 2), np.float32)
        for i, (conf, right) in conf_right.items():
            cls = y[i] if right else 1 - y[i]
            z[i, cls] = 6.0 if conf else 0.2
        return z
    e0 = logits({i: (i < 4, i < 4) for i in range(8)})
    e1 = logits({i: (i in (4, 5, 6), i != 6) for i in range(8)})
    fin = logits({i: (True, i != 7) for i in range(8)})
    return T.ExitProfile.from_logits({"a": e0, "b": e1, "final": fin}, y, [1, 2, 7], [0.1, 0.2])


def test_simulate_sequential_costs():
    p = _profile()
    assert p.backbone_mflops == 10
    none = T.simulate(p, [None, None])
    assert none["accuracy"] == 7 / 8 and none["exit_rates"] == [0, 0, 1]
    assert none["expected_mflops"] == pytest.approx(10.0) and none["mflops_ratio"] == pytest.approx(1.0)
    r = T.simulate(p, [0.9, 0.9])
    # 4 leave at a (cost 1.1), 3 at b (1.1 + 2.2), 1 at final (3.3 + 7)
    assert r["exit_rates"] == [0.5, 0.375, 0.125]
    assert r["expected_mflops"] == pytest.approx((4 * 1.1 + 3 * 3.3 + 10.3) / 8)
    assert r["accuracy"] == pytest.approx(6 / 8)  # 6 wrong at b, 7 wrong at final
    assert r["exit_accuracy"][1] == pytest.approx(2 / 3)
    # entropy rule mirrors it
    e = T.simulate(p, [0.1, 0.1], rule="normalized_entropy")
    assert e["exit_rates"] == r["exit_rates"]


def test_choose_thresholds_respects_delta():
    p = _profile()
    tight = T.choose_thresholds_accuracy(p, delta=0.0)
    assert tight["accuracy"] >= 7 / 8 - 1e-12
    # a takes 0-3 (all right); b taking everything else loses 6 but wins 7 (final gets 7 wrong): the
    # cheapest setting with no accuracy loss sends nobody to the final output
    assert tight["exit_rates"] == [0.5, 0.5, 0.0]
    assert tight["expected_mflops"] == pytest.approx((4 * 1.1 + 4 * 3.3) / 8)
    # delta 0.2 allows nothing cheaper (a alone is 4/8 right); delta 0.5 sends everyone out at a
    assert T.choose_thresholds_accuracy(p, delta=0.2)["expected_mflops"] == pytest.approx(2.2)
    loose = T.choose_thresholds_accuracy(p, delta=0.5)
    assert loose["exit_rates"] == [1.0, 0.0, 0.0] and loose["accuracy"] == 0.5
    assert loose["expected_mflops"] == pytest.approx(1.1)
    for rule in T.RULES:
        for delta in (0.0, 0.125, 0.5):
            r = T.choose_thresholds_accuracy(p, delta=delta, rule=rule)
            assert r["accuracy"] >= r["final_accuracy"] - delta - 1e-12
            assert r == {**T.simulate(p, r["thresholds"], rule), "delta": delta, "rule": rule,
                         "final_accuracy": 7 / 8}


def test_choose_thresholds_random_profile_constraint():
    rng = np.random.default_rng(0)
    n, c = 2000, 10
    y = rng.integers(0, c, n)
    outs = []
    for noise in (3.0, 2.0, 1.0):  # deeper exits are better
        z = rng.normal(0, noise, (n, c)).astype(np.float32)
        z[np.arange(n), y] += 2.5
        outs.append(z)
    p = T.ExitProfile.from_logits(outs, y, [0.5, 1.5, 8.0], [0.05, 0.05])
    for rule in T.RULES:
        r = T.choose_thresholds_accuracy(p, delta=0.005, rule=rule)
        assert r["accuracy"] >= p.accuracy()["final"] - 0.005 - 1e-12
        assert r["expected_mflops"] < p.backbone_mflops  # some exiting is possible
        c = T.curve(p, rule, num=11)
        assert len(c["accuracy"]) == 11 and len(c["exit_rates"][0]) == 3


def test_invalid_inputs():
    p = _profile()
    for bad in ([1.5, None], [-0.1, 0.5], [float("nan"), 0.5]):
        with pytest.raises(ValueError, match="outside"):
            T.simulate(p, bad)
    with pytest.raises(ValueError, match="2 thresholds"):
        T.simulate(p, [0.5])
    with pytest.raises(ValueError, match="rule"):
        T.simulate(p, [0.5, 0.5], rule="margin")
    z = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="single class"):
        T.ExitProfile.from_logits([z, z], np.array([2, 2, 2, 2]), [1, 1], [0.1])
    zn = z.copy()
    zn[0, 0] = np.nan
    with pytest.raises(ValueError, match="output 'exit0': logits contain 1 NaN"):
        T.ExitProfile.from_logits([zn, z], np.array([0, 1, 2, 0]), [1, 1], [0.1])


def test_latency_model_and_choice(tmp_path):
    p = _profile()
    board = {"segments": [2.0, 4.0], "exits": [0.5, 0.5]}
    # no exits: device head 6 ms + 1 ms rtt + 1000 B at 8 Mbit/s (1 ms) + server 3 ms
    r = T.expected_latency_ms(p, [None, None], "max_softmax", board, 8.0, 1000, 3.0, rtt_ms=1.0)
    assert r["expected_ms"] == pytest.approx(11.0)
    r = T.expected_latency_ms(p, [0.9, 0.9], "max_softmax", board, 8.0, 1000, 3.0, rtt_ms=1.0)
    # Dong et al. eq. 3/11: 0.5 * 2.5 + 0.375 * 7 + 0.125 * (7 + 1 + 1 + 3)
    assert r["expected_ms"] == pytest.approx(0.5 * 2.5 + 0.375 * 7 + 0.125 * 12)
    best = T.choose_thresholds_latency(p, board, 8.0, 1000, 3.0, rtt_ms=1.0, delta=0.0)
    assert best["accuracy"] >= 7 / 8 and best["expected_ms"] < 11.0
    budget = T.choose_thresholds_latency(p, board, 8.0, 1000, 3.0, rtt_ms=1.0, budget_ms=8.0)
    assert budget["expected_ms"] <= 8.0
    with pytest.raises(ValueError, match="unreachable"):
        T.choose_thresholds_latency(p, board, 8.0, 1000, 3.0, rtt_ms=1.0, budget_ms=0.5)
    c = T.curve(p, "normalized_entropy", num=5)
    T.plot_curve(c, tmp_path / "c.png", chosen=[best])
    assert (tmp_path / "c.png").stat().st_size > 1000

"""Early exiting with the Exit Predictor (calibration.predictor_thresholds, runtime.adaptive): simulation and
costs checked by hand on a tiny case, the joint search against its constraints, and the bandwidth regression."""
from __future__ import annotations

import numpy as np
import pytest

from calibration import predictor_thresholds as PT
from calibration import thresholds as T
from runtime import adaptive as A


def tiny() -> PT.PredictorProfile:
    """4 samples, 2 exits + final, 3 classes. Exit confidences (max softmax) are set by the logits."""
    sure = [5.0, 0.0, 0.0]  # confident class 0
    flat = [0.1, 0.0, 0.0]  # unsure class 0
    e0 = np.array([sure, flat, flat, flat])
    e1 = np.array([sure, sure, flat, flat])
    fin = np.array([sure, sure, sure, [0.0, 5.0, 0.0]])
    y = np.array([0, 0, 0, 2])  # sample 3 is wrong everywhere
    prof = T.ExitProfile.from_logits({"e0": e0, "e1": e1, "final": fin}, y, [1.0, 2.0, 7.0], [0.5, 0.25])
    scores = np.array([[0.9, 0.1, 0.1, 0.1],    # predictor: sample 0 exits at e0,
                       [0.9, 0.8, 0.2, 0.2]])   # samples 0 and 1 at e1
    return PT.PredictorProfile(prof, scores, predictor_mflops=0.1)


def test_simulate_without_predictor_matches_plain_exits():
    p = tiny()
    for th in ([0.9, 0.9], [None, 0.9], [0.3, None], [None, None]):
        a, b = PT.simulate(p, th, None), T.simulate(p.exits, th)
        assert a["accuracy"] == b["accuracy"] and a["exit_rates"] == b["exit_rates"]
        assert a["expected_mflops"] == pytest.approx(b["expected_mflops"])


def test_gated_costs_by_hand():
    p = tiny()
    r = PT.simulate(p, [0.9, 0.9], [0.5, 0.5])
    # sample 0: pred + seg0 + e0 = 0.1 + 1 + 0.5; sample 1: skips e0, runs e1 and exits: 0.1 + 3 + 0.25;
    # samples 2, 3: skip both branches, run to the end: 0.1 + 10 each
    assert r["expected_mflops"] == pytest.approx((1.6 + 3.35 + 10.1 + 10.1) / 4)
    assert r["exit_rates"] == [0.25, 0.25, 0.5]
    assert r["branch_rates"] == [0.25, 0.25]
    assert r["bypass_rate"] == 0.5
    assert r["accuracy"] == 0.75
    plain = PT.simulate(p, [0.9, 0.9], None)  # every branch evaluated: samples 2, 3 pay 10.75
    assert plain["expected_mflops"] == pytest.approx((1.5 + 3.75 + 10.75 + 10.75) / 4)
    assert r["expected_mflops"] < plain["expected_mflops"]
    # a gate that is too strict also stops an exit that would have fired
    strict = PT.simulate(p, [0.9, 0.9], [0.95, 0.5])
    assert strict["exit_rates"] == [0.0, 0.5, 0.5]


def test_latency_by_hand():
    p = tiny()
    model = PT.LatencyModel(segments_ms=[1.0, 2.0], exits_ms=[0.5, 0.5], predictor_ms=0.25, server_ms=4.0,
                            bytes_per_sample=1000, rtt_ms=2.0)
    run = PT._run(p, [0.9, 0.9], [0.5, 0.5], "max_softmax")
    tx = 2.0 + 1000 * 8 / (8 * 1e3)  # 8 Mbit/s: 1 ms serialisation
    want = [0.25 + 1 + 0.5, 0.25 + 3 + 0.5, 0.25 + 3 + tx + 4, 0.25 + 3 + tx + 4]
    assert PT.expected_latency_ms(p, run, model, 8.0) == pytest.approx(np.mean(want))
    with pytest.raises(ValueError, match="bandwidth"):
        model.tx_ms(0)


def test_bad_arguments():
    p = tiny()
    with pytest.raises(ValueError, match="prediction threshold"):
        PT.simulate(p, [0.5, 0.5], [0.5, 1.5])
    with pytest.raises(ValueError, match="2 prediction thresholds"):
        PT.simulate(p, [0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="exactly one"):
        PT.choose(p, budget=1.0, delta=0.01)
    with pytest.raises(ValueError, match="probabilities"):
        PT.PredictorProfile(p.exits, p.scores * 3)
    with pytest.raises(ValueError, match="no predictor scores"):
        PT.simulate(PT.PredictorProfile(p.exits), [0.5, 0.5], [0.5, 0.5])


def synthetic(n: int = 3000, seed: int = 0) -> PT.PredictorProfile:
    """Exits whose confidence tracks a per-sample difficulty; the predictor sees the difficulty with noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0, 1, n)
    y = rng.integers(0, 10, n)
    logits = []
    for depth, skill in ((0, 0.45), (1, 0.75), (2, 1.2)):
        z = rng.normal(0, 1, (n, 10))
        margin = 6 * (skill - difficulty) + rng.normal(0, 1.0, n)
        z[np.arange(n), y] += np.clip(margin, -3, 8)
        logits.append(z)
    prof = T.ExitProfile.from_logits(logits, y, [0.2, 1.2, 5.0], [0.08, 0.08])
    conf = np.stack([T.max_softmax(z) for z in logits[:2]])
    scores = np.clip(1 / (1 + np.exp(-(conf - 0.6) * 8 + rng.normal(0, 0.5, (2, n)))), 0, 1)
    return PT.PredictorProfile(prof, scores, predictor_mflops=0.004)


def test_choose_meets_its_constraints_and_predictor_never_hurts():
    p = synthetic()
    bb = p.backbone_mflops
    for budget in (0.35 * bb, 0.6 * bb):
        plain = PT.choose(p, budget=budget, use_predictor=False)
        joint = PT.choose(p, budget=budget, use_predictor=True)
        assert plain["expected_mflops"] <= budget + 1e-9 and joint["expected_mflops"] <= budget + 1e-9
        assert plain["gates"] is None
        assert joint["accuracy"] >= plain["accuracy"]  # the plain choice is one of the joint search's options
    d = PT.choose(p, delta=0.01)
    assert d["accuracy"] >= d["final_accuracy"] - 0.01 - 1e-12
    assert d["expected_mflops"] < bb  # exits pay off at a 1 pt drop on this profile
    with pytest.raises(ValueError, match="no thresholds meet"):
        PT.choose(p, budget=0.01)


def test_gates_on_given_exits_save_compute_without_losing_accuracy():
    p = synthetic()
    th = PT.choose(p, delta=0.01, use_predictor=False)["thresholds"]
    r = PT.choose_gates(p, th)
    assert r["thresholds"] == r["baseline"]["thresholds"] == th
    assert r["accuracy"] >= r["baseline"]["accuracy"] - 1e-12
    assert r["gates"] is not None and r["expected_mflops"] < r["baseline"]["expected_mflops"]
    assert r["bypass_rate"] > 0
    # a predictor too expensive to pay for itself is left out
    costly = PT.PredictorProfile(p.exits, p.scores, predictor_mflops=10.0)
    r = PT.choose_gates(costly, th)
    assert r["gates"] is None and r["expected_mflops"] == r["baseline"]["expected_mflops"]


def test_frontier_is_pareto():
    f = PT.frontier(synthetic(1500))
    costs = [r["expected_mflops"] for r in f]
    accs = [r["accuracy"] for r in f]
    assert costs == sorted(costs) and accs == sorted(accs) and len(f) > 5


def test_threshold_encoding_round_trip():
    for rule in ("max_softmax", "normalized_entropy"):
        for v in (None, 0.0, 0.37, 1.0):
            assert A.decode_threshold(A.encode_threshold(v, rule), rule) == v
    for v in (None, 0.2, 1.0):
        assert A.decode_gate(A.encode_gate(v)) == v
    model = {"rule": "max_softmax", "bandwidth_range_mbps": [1.0, 100.0], "exits": {"e0": [0.6, 0.5]},
             "gates": {"e0": [0.9, -1.0]}}
    th, g = A.thresholds_for(model, 10.0)  # x = 1
    assert th["e0"] is None and g["e0"] is None  # 0.6 + 0.5 > 1: off; 0.9 - 1 <= 0: not gated
    th, g = A.thresholds_for(model, 1.0)
    assert th["e0"] == 0.6 and g["e0"] == 0.9
    assert A.thresholds_for(model, 0.01) == A.thresholds_for(model, 1.0)  # clamped to the fitted range
    with pytest.raises(ValueError, match="> 0"):
        A.thresholds_for(model, 0.0)


@pytest.mark.parametrize("kind", ["piecewise-linear", "polynomial"])
def test_latency_adaptation_follows_bandwidth_and_meets_budget(kind):
    p = synthetic(2000)
    model = PT.LatencyModel(segments_ms=[0.02, 0.1, 0.0], exits_ms=[0.01, 0.01], predictor_ms=0.001,
                            server_ms=0.1, bytes_per_sample=1200, rtt_ms=1.0)
    budget = 3.0
    search = PT._Search(p, "max_softmax", 25, model)
    fixed = PT.choose_latency(p, model, [1, 5, 20], budget, search=search)
    assert max(fixed["expected_ms"]) <= budget + 1e-9
    reg = PT.fit_latency_adaptation(p, model, budget, [1, 2, 5, 10, 20], ["e0", "e1"], kind=kind, search=search)
    assert reg["budget_met"]
    for f in reg["fit"]:
        assert f["expected_ms"] <= budget + 1e-9
    # more bandwidth: offloading is cheaper, so fewer early exits and more accuracy
    assert reg["fit"][-1]["accuracy"] > reg["fit"][0]["accuracy"]
    at = {b: PT.adaptive_point(p, reg, model, b, ["e0", "e1"]) for b in (1.0, 5.0, 20.0)}
    assert at[20.0]["accuracy"] > fixed["accuracy"] and at[5.0]["accuracy"] > fixed["accuracy"]
    if kind == "piecewise-linear":  # exact at grid points: never below the fixed thresholds, binding at 1 Mbit/s
        assert at[1.0]["accuracy"] >= fixed["accuracy"]

"""The equal-accuracy comparison of the early-exit curve, its targets, and the page (toolkit.exits_curve,
runtime.report), on hand-made curves."""
from __future__ import annotations

import pytest

from runtime.report import curve_markdown, predictor_claims
from toolkit.exits_curve import compare_methods, latency_verdict, targets


def point(acc, mflops, delta=0.0, gates=None):
    m = {"accuracy": acc, "mflops_per_sample": mflops, "exit_rates": {"exit0": 0.5, "final": 0.5}}
    return {"delta": delta, "thresholds": [0.9], "gates": gates, "validation": dict(m),
            "simulation": {**m, "branch_rates": [1.0], "bypass_rate": 0.0}, "runtime": dict(m)}


def curve():
    return {"pair": "onnx/int8", "backbone_mflops": 10.0, "branch_mflops": [0.1], "predictor_mflops": 0.01,
            "validation": {"source": "v", "samples": 10}, "test": {"source": "t", "samples": 10},
            "backbone": {"simulation": {"accuracy": 0.9, "mflops_per_sample": 10.0},
                         "runtime": {"accuracy": 0.9, "mflops_per_sample": 10.0}},
            "methods": {"exits": [point(0.880, 3.0), point(0.890, 4.5), point(0.8995, 6.0)],
                        "exits+predictor": [point(0.8805, 2.9, gates=[0.5]), point(0.8905, 4.6, gates=[0.5]),
                                            point(0.8996, 3.9, gates=[0.5]), point(0.95, 1.0, gates=[0.5])]}}


def test_equal_accuracy_comparison():
    c = curve()
    cmp_ = compare_methods(c)
    rows = {round(r["with_predictor"]["accuracy"], 4): r for r in cmp_["pairs"]}
    assert rows[0.8805]["win"] and rows[0.8805]["exits_alone"]["mflops_per_sample"] == 3.0
    # 4.6 MFLOPs at 89.05 % loses to 4.5 at 89.0 % (within 0.1 pt)
    assert not rows[0.8905]["win"]
    # the cheapest exits-alone point at >= 89.86 % is the 6.0 one
    assert rows[0.8996]["win"] and rows[0.8996]["saving_mflops"] == 6.0 - 3.9
    assert 0.95 not in rows  # nothing without the predictor within 0.1 pt: no pair
    assert cmp_["wins"] == 2 and cmp_["basis"] == "runtime"


def test_targets_and_page():
    c = curve()
    c["comparison"] = compare_methods(c)
    c["targets"] = t = targets(c)
    best = t["best_at_0.40x"]
    assert best["accuracy"] == 0.95 and best["mflops_ratio"] == 0.1  # 1.0 / 10.0
    assert t["runtime_vs_simulation_pt"] == {"accuracy": 0.0, "exit_rates": 0.0}
    c["methods"]["exits"][0]["runtime"]["accuracy"] = 0.870  # a runtime that disagrees shows up
    assert targets(c)["runtime_vs_simulation_pt"]["accuracy"] == pytest.approx(1.0)
    rows = [{"bandwidth_mbps": b, "fixed": {"simulation": {"accuracy": 0.8, "expected_ms": 4.0}},
             "adaptive": {"simulation": {"accuracy": a, "expected_ms": 4.5}}} for b, a in ((1, 0.8), (5, 0.85))]
    v = latency_verdict(rows)
    assert [round(r["gain_pt"], 6) for r in v] == [0.0, 5.0]
    lat = {"pair": "onnx/int8", "budget_ms": 5.0, "board": "rpi4", "kind": "piecewise-linear", "grid_mbps": [1, 5],
           "test": {"samples": 10}, "verdict": v,
           "latency_model": {"source": "estimate", "rtt_ms": 2.0, "bytes_per_sample": 1176, "server_ms": 0.1},
           "rows": [{**r, "fixed": {**r["fixed"], "thresholds": [0.9], "gates": None},
                     "adaptive": {**r["adaptive"], "thresholds": [None], "gates": [0.4]}} for r in rows]}
    page = curve_markdown({"compute": c, "latency": lat})
    assert "| backbone alone |" in page and "2 of 3" in page and "+5.00" in page and "| off |" in page
    claims = predictor_claims({"compute": c, "latency": lat})
    assert claims[0].startswith("the Exit Predictor cuts") and "2 of 3" in claims[0]
    assert claims[1].startswith("latency-aware thresholds beat")  # +5 pt where it can, equal elsewhere
    lat["verdict"][0]["gain_pt"] = -0.5
    assert "do NOT always beat" in predictor_claims({"latency": lat})[0]

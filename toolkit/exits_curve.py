"""``eetool exits curve``: what early exits and the Exit Predictor buy on a bundle's own graphs, measured.

1. **Accuracy vs device MFLOPs** (Dong, Mao & Zhang 2022, their accuracy-computation trade-off): operating
   points chosen on labelled *validation* data (least expected device MFLOPs at a top-1 drop <= delta, for a
   list of deltas), for exits alone and for exits with the Exit Predictor (thresholds chosen jointly), then
   run on the *test* data through the device runtime sample by sample (tail run on the device, so device
   MFLOPs = everything computed), next to the offline simulation of the same thresholds on the same test
   graphs, and the backbone alone.
2. **Accuracy vs bandwidth under a latency budget**: with ``latency_adaptation`` in the manifest (``eetool
   exits calibrate --budget-ms X --bandwidth B1,B2,...``), at each bandwidth asked for, the fixed thresholds
   (the most accurate ones meeting the budget at every grid bandwidth) against the adaptive ones (the
   regression's at that bandwidth), both run through the runtime on the test data, with the expected latency
   of the latency model.
3. **Adaptive thresholds on a changing link**: the runtime in adaptive mode against a real edge server on
   this machine, over an emulated link whose rate changes during the run; the device's own bandwidth
   estimate and the thresholds it applied, per phase.

Writes ``curve.json`` (every number), ``curve.md`` (tables, :func:`runtime.report.curve_markdown`) and PNG
plots; all numbers of one call come from one run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from calibration import predictor_thresholds as PT
from calibration.readers import Dataset
from runtime.bundle import Bundle

from .exit_predictor_bundle import bundle_profile
from .exits import json_default
from .exits_bundle import manifest_gates, measure_early_exit

#: top-1 drops (fractions) the operating points are chosen for on validation data
DELTAS = (0.0, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04)
EQUAL_ACCURACY = 0.001  # "equal accuracy": within 0.1 pt


def _runtime_point(bundle, test, fmt, precision, names, th, gates, use_pred) -> dict:
    opts = {"thresholds": dict(zip(names, th)), "predictor": bool(use_pred and gates is not None)}
    if opts["predictor"]:
        opts["gates"] = dict(zip(names, gates))
    t0 = time.perf_counter()
    r = measure_early_exit(bundle, test, fmt, precision, **opts)
    r["seconds"] = time.perf_counter() - t0
    return r


def compute_curve(bundle: Bundle, val: Dataset, test: Dataset, pair: str, deltas=DELTAS, runtime: bool = True,
                  rule: str | None = None, progress=print) -> dict:
    """Part 1 of the module docstring for the graphs ``pair`` (``onnx/int8``). Operating points with the
    predictor come two ways, both chosen on the validation data: ``joint`` (prediction and confidence
    thresholds chosen together for the same delta) and ``gates on these exits`` (the prediction thresholds
    that cut the most device MFLOPs from a plain point's own exits without losing validation accuracy,
    :func:`calibration.predictor_thresholds.choose_gates`). Returns ``{"pair", "backbone", "methods":
    {"exits": [points], "exits+predictor": [points]}, "comparison", "targets"}``; each point has ``delta``,
    ``how``, ``thresholds``, ``gates``, ``validation`` / ``simulation`` / ``runtime`` results (accuracy, device
    MFLOPs per sample, exit rates)."""
    fmt, precision = pair.split("/")
    names = [e.name for e in bundle.exits]
    rule = rule or bundle.exits[0].rule
    prof_v = bundle_profile(bundle, val, fmt, precision)
    prof_t = bundle_profile(bundle, test, fmt, precision)
    bb = prof_t.backbone_mflops
    out = {"pair": pair, "rule": rule, "validation": {"source": val.source, "samples": len(val)},
           "test": {"source": test.source, "samples": len(test)}, "backbone_mflops": bb,
           "predictor_mflops": prof_t.predictor_mflops if prof_t.scores is not None else None,
           "branch_mflops": [e.mflops or 0.0 for e in bundle.exits]}
    backbone = {"simulation": {"accuracy": float(prof_t.exits.correct[-1].mean()), "mflops_per_sample": bb}}
    if runtime:
        progress(f"{pair}: backbone alone through the runtime on {len(test)} samples")
        t0 = time.perf_counter()
        backbone["runtime"] = measure_early_exit(bundle, test, fmt, precision, exits=False)
        backbone["runtime"]["seconds"] = time.perf_counter() - t0
    out["backbone"] = backbone
    def point(d, how, c) -> dict:
        sim = PT.simulate(prof_t, c["thresholds"], c["gates"], rule)
        p = {"delta": d, "how": how, "thresholds": c["thresholds"], "gates": c["gates"],
             "validation": {"accuracy": c["accuracy"], "mflops_per_sample": c["expected_mflops"]},
             "simulation": {"accuracy": sim["accuracy"], "mflops_per_sample": sim["expected_mflops"],
                            "exit_rates": dict(zip(prof_t.exits.names, sim["exit_rates"])),
                            "branch_rates": sim["branch_rates"], "bypass_rate": sim["bypass_rate"]}}
        if runtime:
            progress(f"{pair}: {'exits alone' if c['gates'] is None else 'with the predictor'} ({how}), "
                     f"delta {100 * d:.2f} pt, through the runtime")
            p["runtime"] = _runtime_point(bundle, test, fmt, precision, names, c["thresholds"], c["gates"],
                                          c["gates"] is not None)
        return p

    search = PT._Search(prof_v, rule, 60)
    plain, joint, seen = [], [], set()
    for d in deltas:
        for use, bucket in ((False, plain), (True, joint)):
            if use and prof_v.scores is None:
                continue
            c = PT.choose(prof_v, rule, use, delta=d, search=search)
            key = (tuple(c["thresholds"]), None if c["gates"] is None else tuple(c["gates"]))
            if key in seen or (use and c["gates"] is None):  # a joint choice without gating is a plain one
                continue
            seen.add(key)
            bucket.append((d, "joint" if use else "exits", c))
    gated = []
    if prof_v.scores is not None:  # the predictor on each plain point's own thresholds
        for d, _, c in plain:
            g = PT.choose_gates(prof_v, c["thresholds"], rule)
            key = (tuple(g["thresholds"]), None if g["gates"] is None else tuple(g["gates"]))
            if g["gates"] is not None and key not in seen:
                seen.add(key)
                gated.append((d, "gates on these exits", g))
    out["methods"] = {"exits": sorted((point(*x) for x in plain), key=lambda p: p["validation"]["mflops_per_sample"])}
    if prof_v.scores is not None:
        out["methods"]["exits+predictor"] = sorted((point(*x) for x in joint + gated),
                                                   key=lambda p: p["validation"]["mflops_per_sample"])
    out["comparison"] = compare_methods(out)
    out["targets"] = targets(out)
    return out


def _measured(p: dict) -> dict:
    return p.get("runtime") or p["simulation"]


def compare_methods(curve: dict, tol: float = EQUAL_ACCURACY) -> dict:
    """Exits with the predictor against exits alone at equal accuracy (within ``tol``), on the measured
    (runtime, else simulated) test points: a point with the predictor *wins* when some point without it lies
    within ``tol`` of its accuracy and every point without it that is at least its accuracy minus ``tol``
    costs strictly more device MFLOPs. Returns ``{"tolerance", "pairs": [...], "wins"}``."""
    a = curve["methods"].get("exits+predictor") or []
    b = curve["methods"].get("exits") or []
    rows = []
    for p in a:
        mp = _measured(p)
        close = [q for q in b if abs(_measured(q)["accuracy"] - mp["accuracy"]) <= tol + 1e-12]
        rivals = [q for q in b if _measured(q)["accuracy"] >= mp["accuracy"] - tol - 1e-12]
        if not close:
            continue
        cheapest = min(rivals, key=lambda q: _measured(q)["mflops_per_sample"])
        mq = _measured(cheapest)
        rows.append({"with_predictor": {"accuracy": mp["accuracy"], "mflops_per_sample": mp["mflops_per_sample"],
                                        "delta": p["delta"]},
                     "exits_alone": {"accuracy": mq["accuracy"], "mflops_per_sample": mq["mflops_per_sample"],
                                     "delta": cheapest["delta"]},
                     "saving_mflops": mq["mflops_per_sample"] - mp["mflops_per_sample"],
                     "win": mp["mflops_per_sample"] < mq["mflops_per_sample"]})
    return {"tolerance": tol, "basis": "runtime" if a and "runtime" in a[0] else "simulation", "pairs": rows,
            "wins": sum(r["win"] for r in rows)}


def targets(curve: dict) -> dict:
    """The issue's checks on this curve's measured numbers: the best point at <= 0.40x backbone MFLOPs and
    its drop versus the backbone; runtime against simulation (largest gaps in accuracy and exit rates, pt)."""
    bb = curve["backbone_mflops"]
    base = (curve["backbone"].get("runtime") or curve["backbone"]["simulation"])["accuracy"]
    best = None
    for method, pts in curve["methods"].items():
        for p in pts:
            m = _measured(p)
            if m["mflops_per_sample"] <= 0.40 * bb + 1e-9 and (best is None or m["accuracy"] > best["accuracy"]):
                best = {"method": method, "delta": p["delta"], "accuracy": m["accuracy"],
                        "mflops_ratio": m["mflops_per_sample"] / bb, "drop_pt": 100 * (base - m["accuracy"])}
    gap_acc = gap_rate = 0.0
    for pts in curve["methods"].values():
        for p in pts:
            if "runtime" not in p:
                continue
            r, s = p["runtime"], p["simulation"]
            gap_acc = max(gap_acc, 100 * abs(r["accuracy"] - s["accuracy"]))
            for k, v in s["exit_rates"].items():
                gap_rate = max(gap_rate, 100 * abs(r["exit_rates"].get(k, 0.0) - v))
    return {"backbone_accuracy": base, "best_at_0.40x": best,
            "runtime_vs_simulation_pt": {"accuracy": gap_acc, "exit_rates": gap_rate}}


def latency_curve(bundle: Bundle, test: Dataset, pair: str, bandwidths, runtime: bool = True, progress=print) -> dict:
    """Part 2 of the module docstring. Needs the manifest's ``latency_adaptation.models[pair]``; raises
    ValueError naming the command that writes it otherwise."""
    from runtime.adaptive import thresholds_for

    la = bundle.manifest.latency_adaptation
    if la is None or pair not in la.models:
        raise ValueError(f"{bundle.root}: no latency adaptation for {pair}; run 'eetool exits calibrate "
                         f"{bundle.root} --board rpi4 --budget-ms X --bandwidth 1,2,5,10,20mbit' first")
    fmt, precision = pair.split("/")
    reg = la.models[pair].to_json()
    model = PT.LatencyModel(**la.latency_model.to_json())
    names = [e.name for e in bundle.exits]
    rule = reg["rule"]
    prof = bundle_profile(bundle, test, fmt, precision)
    fixed_th = [e.threshold_for(pair) for e in bundle.exits]
    fixed_g = manifest_gates(bundle, pair)
    fixed_rt = None
    if runtime:
        progress(f"{pair}: fixed thresholds through the runtime")
        fixed_rt = _runtime_point(bundle, test, fmt, precision, names, fixed_th, fixed_g, fixed_g is not None)
    rows = []
    for b in bandwidths:
        f = PT.evaluate_latency(prof, fixed_th, fixed_g, model, b, rule)
        a = PT.adaptive_point(prof, reg, model, b, names)
        th, gates = thresholds_for(reg, b)
        row = {"bandwidth_mbps": b,
               "fixed": {"thresholds": fixed_th, "gates": fixed_g, "simulation": _lat(f)},
               "adaptive": {"thresholds": [th[n] for n in names],
                            "gates": [gates.get(n) for n in names] if gates else None, "simulation": _lat(a)}}
        if runtime:
            row["fixed"]["runtime"] = fixed_rt
            progress(f"{pair}: adaptive thresholds at {b:g} Mbit/s through the runtime")
            t0 = time.perf_counter()
            rt = measure_early_exit(bundle, test, fmt, precision, adaptive=True, bandwidth_mbps=b)
            rt["seconds"] = time.perf_counter() - t0
            row["adaptive"]["runtime"] = rt
        rows.append(row)
    return {"pair": pair, "budget_ms": la.budget_ms, "rtt_ms": la.rtt_ms, "board": la.board,
            "server": la.server, "latency_model": la.latency_model.to_json(), "kind": reg.get("kind"),
            "grid_mbps": la.grid_mbps, "budget_met_on_validation": reg.get("budget_met"),
            "test": {"source": test.source, "samples": len(test)}, "rows": rows,
            "verdict": latency_verdict(rows)}


def link_run(bundle: Bundle, test: Dataset, pair: str, schedule: str) -> dict:
    """Part 3: the adaptive runtime against a real edge server on this machine over an emulated link whose
    rate changes during the run (:func:`runtime.bench.adaptive_link`), on the test inputs in turn."""
    from runtime.bench import adaptive_link, start_server
    from runtime.link import parse_schedule

    fmt, precision = pair.split("/")
    n = min(len(test), sum(k for _, k in parse_schedule(schedule)))
    proc, address = start_server(str(bundle.root), ["--backend", fmt, "--precision", precision])
    try:
        return adaptive_link(bundle, address, fmt, precision, schedule, [test.x[i:i + 1] for i in range(n)],
                             [int(v) for v in test.y[:n]] if test.y is not None else None)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _lat(r: dict) -> dict:
    return {"accuracy": r["accuracy"], "expected_ms": r["expected_ms"], "mflops_per_sample": r["expected_mflops"],
            "exit_rates": r["exit_rates"]}


def latency_verdict(rows: list[dict]) -> list[dict]:
    """Per bandwidth: adaptive minus fixed accuracy (measured, else simulated), and whether each meets the
    budget in expectation (latency model on the test data)."""
    out = []
    for r in rows:
        fa = (r["fixed"].get("runtime") or r["fixed"]["simulation"])["accuracy"]
        aa = (r["adaptive"].get("runtime") or r["adaptive"]["simulation"])["accuracy"]
        out.append({"bandwidth_mbps": r["bandwidth_mbps"], "gain_pt": 100 * (aa - fa),
                    "fixed_ms": r["fixed"]["simulation"]["expected_ms"],
                    "adaptive_ms": r["adaptive"]["simulation"]["expected_ms"]})
    return out


def plot(curve: dict, out: Path) -> list[str]:
    """PNG plots into ``out``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if curve.get("compute"):
        c = curve["compute"]
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for method, pts in c["methods"].items():
            xs = [_measured(p)["mflops_per_sample"] / c["backbone_mflops"] for p in pts]
            ys = [100 * _measured(p)["accuracy"] for p in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=method)
        bb = c["backbone"].get("runtime") or c["backbone"]["simulation"]
        ax.scatter([bb["mflops_per_sample"] / c["backbone_mflops"]], [100 * bb["accuracy"]], marker="*", s=140,
                   color="k", zorder=3, label="backbone alone")
        written.append(_finish(plt, fig, ax, "device MFLOPs per sample / backbone",
                               f"accuracy vs device compute ({c['pair']}, {c['test']['samples']} test samples)",
                               out / "accuracy_vs_mflops.png"))
    if curve.get("latency"):
        lt = curve["latency"]
        fig, ax = plt.subplots(figsize=(6.4, 4))
        bws = [r["bandwidth_mbps"] for r in lt["rows"]]
        for kind in ("fixed", "adaptive"):
            ax.plot(bws, [100 * (r[kind].get("runtime") or r[kind]["simulation"])["accuracy"] for r in lt["rows"]],
                    marker="o", label=f"{kind} thresholds")
        ax.set_xscale("log")
        written.append(_finish(plt, fig, ax, "uplink bandwidth (Mbit/s)",
                               f"accuracy under a {lt['budget_ms']:g} ms budget ({lt['board']}, {lt['pair']})",
                               out / "accuracy_vs_bandwidth.png"))
    return written


def _finish(plt, fig, ax, xlabel: str, title: str, path: Path) -> str:
    """Top-1 (%) y axis, grid, legend and title; save ``path`` (PNG) and close; returns its file name."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write(curve: dict, out: Path) -> None:
    """``curve.json``, ``curve.md`` and the plots into ``out``."""
    from runtime.report import curve_markdown

    out.mkdir(parents=True, exist_ok=True)
    curve["plots"] = plot(curve, out)
    (out / "curve.json").write_text(json.dumps(curve, indent=1, default=json_default) + "\n")
    (out / "curve.md").write_text(curve_markdown(curve), encoding="utf-8")


"""Bench reports as Markdown pages with PNG plots; every number comes from the run's own JSON.

- :func:`render_markdown` / :func:`write`: one ``python -m runtime bench`` run (``report.json``) as
  ``report.md`` plus plots.
- :func:`render_summary` / ``python -m runtime report``: one page for a whole ``make bench`` run: each
  bench report (e.g. the split bundle and an early-exit bundle), each ``eetool plan`` JSON, each
  ``eetool rate`` JSON (bytes vs top-1 of split points against JPEG / WebP of the same crop), and the
  qualitative claims of the split-computing / early-exit literature checked against those numbers
  (Matsubara, Levorato & Restuccia, "Split Computing and Early Exiting for Deep Learning Applications";
  Kang et al., Neurosurgeon, ASPLOS 2017; Scardapane et al., "Why Should We Add Early Exits to Neural
  Networks?"). A claim the numbers do not support is printed as NOT holding, with the numbers.

Units: ms, bytes per sample, MFLOPs, J per inference, Mbit/s. Python 3.8 compatible; matplotlib optional.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

MODE_ORDER = ["LC", "LC+EE", "EC", "SC", "SC+EE"]


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else "%.1f %%" % (100 * x)


# --------------------------------------------------------------------------- one bench run
def findings(r: dict) -> List[str]:
    """The survey's qualitative claims checked against one bench report's own numbers (true or not)."""
    out = []
    sent, jpeg = r["bytes_sent_mean"], r["input_file_bytes_mean"]
    if sent:
        out.append("bytes sent per request (%.0f B mean, %s + %s, 0 when an exit fires) are %s than the input "
                   "file (%.0f B mean)" % (sent, r.get("wire") or "int8", r["codec"],
                                           "smaller" if sent < jpeg else "NOT smaller", jpeg))
    sweep = r.get("bandwidth_sweep") or []
    if len(sweep) > 1:
        lo, hi = sweep[0], sweep[-1]
        out.append("end-to-end p50 falls from %.1f ms at %s to %.1f ms at %s: the network share %s with bandwidth"
                   % (lo["total_ms"]["p50"], lo["bandwidth"], hi["total_ms"]["p50"], hi["bandwidth"],
                      "shrinks" if hi["total_ms"]["p50"] < lo["total_ms"]["p50"] else "does NOT shrink"))
    modes = (r.get("comparison") or {}).get("modes", {})
    if modes:
        best = min(modes, key=lambda m: modes[m]["latency_ms"]["p50"])
        out.append("fastest mode on this link: %s (p50 %.1f ms)" % (best, modes[best]["latency_ms"]["p50"]))
    for ee, base in (("LC+EE", "LC"), ("SC+EE", "SC")):
        if ee in modes and base in modes:
            out.append(early_exit_claim(modes, ee, base))
    return out


def early_exit_claim(modes: Dict[str, dict], ee: str, base: str) -> str:
    """Scardapane et al.'s claim for one pair of modes: early exits cut device compute (MFLOPs per
    sample, from the graphs each request ran) at a small accuracy cost (labelled top-1, else agreement
    with LC)."""
    a, b = modes[ee], modes[base]
    if "top1_accuracy" in a and "top1_accuracy" in b:
        acc = "top-1 %.2f %% vs %.2f %% (%+.2f pt)" % (100 * a["top1_accuracy"], 100 * b["top1_accuracy"],
                                                      100 * (a["top1_accuracy"] - b["top1_accuracy"]))
    else:
        acc = "top-1 agreement with LC %.1f %% vs %.1f %% (no labels)" % (
            100 * a["top1_agreement_with_LC"], 100 * b["top1_agreement_with_LC"])
    cut = a["device_mflops"] < b["device_mflops"]
    return ("early exits %s device compute: %s %.2f MFLOPs/sample vs %s %.2f (%.2fx), p50 %.2f vs %.2f ms, "
            "%.0f vs %.0f B sent; %s" % (
                "cut" if cut else "do NOT cut", ee, a["device_mflops"], base, b["device_mflops"],
                a["device_mflops"] / b["device_mflops"] if b["device_mflops"] else float("nan"),
                a["latency_ms"]["p50"], b["latency_ms"]["p50"], a["bytes_per_sample"], b["bytes_per_sample"], acc))


def render_markdown(r: dict, level: int = 1, plots_prefix: str = "") -> str:
    """One bench report as Markdown (numbers from that run only); ``level`` is its title's heading level,
    ``plots_prefix`` the path from the page to the report's PNGs."""
    h = "#" * level
    lines = ["%s eetool bench: %s on %s (%s)%s" % (h, r["bundle"], r["board"], r["machine"],
                                                   (" -> `%s/`" % plots_prefix.rstrip("/")) if plots_prefix else ""), "",
             "model %s, split after `%s`, backend %s/%s, %s threads, codec %s, wire %s, %d requests over %d "
             "inputs" % (r.get("model") or "-", r["split"], r["backend"], r["precision"], r["threads"] or "default",
                         r["codec"], r.get("wire") or r["wire_dtype"], r["requests"], r["inputs"])]
    if r.get("board_forced"):
        lines += ["", "WARNING: run with --force-board on a machine that does not look like %s (%s): latency is "
                  "this machine's, and energy comes from its sensor or, without one, the %s power model" % (
                      r["board"], r["board_forced"], r["board"])]
    if r.get("inputs_note"):  # the note says why when there is no accuracy
        lines += ["", "inputs: %s%s" % (r["inputs_note"], "; %d with ground-truth labels" % r["labelled_inputs"]
                                        if r.get("labelled_inputs") else "")]
    lines += ["", "| stage | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---:|---:|---:|---:|"]
    for stage, p in r["stages_ms"].items():
        lines.append("| %s | %.2f | %.2f | %.2f | %.2f |" % (stage, p["p50"], p["p90"], p["p99"], p["mean"]))
    e = r["energy"]
    lines += ["", "preprocessing %.2f ms/input; throughput %.1f req/s; bytes sent %.0f / received %.0f per request; "
              "device %.2f MFLOPs per request" % (
                  r["preprocess_ms_mean"], r["throughput_per_s"], r["bytes_sent_mean"], r["bytes_received_mean"],
                  r.get("device_mflops_mean", 0.0))]
    if r.get("cpu_ms_per_inference") is not None:
        lines += ["", "CPU time %.2f ms per inference next to %.2f ms total p50 latency (this process, all threads; "
                  "%.2f cores busy on average; onnxruntime spinning %s, %s threads)" % (
                      r["cpu_ms_per_inference"], r["stages_ms"]["total"]["p50"], r.get("cpu_cores_busy") or 0.0,
                      "on" if r.get("allow_spinning") else "off", r.get("threads") or "default")]
    lines += ["", "exit rates: " + ", ".join("%s %.1f%%" % (k, 100 * v) for k, v in r["exit_rates"].items())]
    if r.get("top1_accuracy") is not None:
        lines += ["", "top-1 accuracy of this configuration: %.2f %% on %d labelled inputs" % (
            100 * r["top1_accuracy"], r["labelled_inputs"])]
    lines += ["", "energy (%s, %s): %.3f J per inference gross, mean %.2f W%s" % (
        e["label"].upper(), e.get("source"), e["per_inference_j"], e.get("mean_w", 0.0),
        ", net of idle %.3f J total" % e["net_joules"] if e.get("net_joules") is not None else "")]
    if e.get("rails_skipped"):
        lines += ["", "energy rails left out (present but unreadable): %s" % ", ".join(
            "%s (%s)" % kv for kv in sorted(e["rails_skipped"].items()))]
    lp = r.get("layer_profile") or {}
    if lp.get("file"):
        lines += ["", "per-layer latency: %s, whole model %.2f ms, %d modules -> `%s` (feed back with "
                  "`eetool plan MODEL --board %s --measurements THIS_FOLDER`)" % (
                      lp["source"], lp["total_ms"], lp["modules"], lp["file"], r["board"])]
    elif lp.get("skipped"):
        lines += ["", "per-layer latency: not measured (%s)" % lp["skipped"]]
    if r.get("bandwidth_sweep"):
        lines += ["", "| link | total p50 ms | bytes sent |", "|---|---:|---:|"]
        for row in r["bandwidth_sweep"]:
            lines.append("| %s, rtt %s | %.2f | %.0f |" % (row["bandwidth"], row["rtt"], row["total_ms"]["p50"],
                                                          row["bytes_sent_mean"]))
    if r.get("runtime_vs_bare_onnxruntime"):
        o = r["runtime_vs_bare_onnxruntime"]
        lines += ["", overhead_line(o)]
    if r.get("findings"):
        lines += ["", "%s# Findings (from this run)" % h, ""] + ["- " + f for f in r["findings"]]
    if r.get("graph_latency"):
        segs = sorted({k for v in r["graph_latency"].values() for k in v if k != "error"})
        lines += ["", "%s# Latency per graph (p50 ms, batch 1)" % h, "",
                  "| graphs @ threads | " + " | ".join(segs) + " |", "|---" + "|---:" * len(segs) + "|"]
        for key, v in r["graph_latency"].items():
            cells = [("%.2f" % v[sg]) if sg in v else "-" for sg in segs]
            lines.append("| %s | %s |" % (key, " | ".join(cells)) if "error" not in v else "| %s | %s |" % (key, v["error"]))
    if r.get("comparison"):
        lines += [""] + comparison_table(r["comparison"], h)
    if (r.get("adaptive_link") or {}).get("phases"):
        lines += [""] + link_markdown(r["adaptive_link"], h + "#")
    for name in ("latency_breakdown.png", "latency_vs_bandwidth.png", "comparison.png"):
        if r.get("plots") and name in r["plots"]:
            lines += ["", "![%s](%s%s)" % (name[:-4].replace("_", " "), plots_prefix, name)]
    return "\n".join(lines) + "\n"


def overhead_line(o: dict) -> str:
    """The runtime-vs-bare-onnxruntime line: median per-pair ratio and its IQR, and a warning when the
    runtime looks faster than the sessions it wraps beyond that spread (an unfair measurement)."""
    if "overhead_ratio_iqr" not in o:  # a report from before the interleaved measurement
        return "whole model, fp32 ONNX: runtime chain p50 %.2f ms vs bare onnxruntime sessions %.2f ms" % (
            o["runtime_chain_p50_ms"], o["bare_onnxruntime_p50_ms"])
    lo, hi = o["overhead_ratio_iqr"]
    line = ("whole model, fp32 ONNX, on this machine: runtime chain / bare onnxruntime sessions, same session "
            "options, %d interleaved pairs: median ratio %.3f (IQR %.3f-%.3f); p50 %.2f ms vs %.2f ms" % (
                o["pairs"], o["overhead_ratio"], lo, hi, o["runtime_chain_p50_ms"], o["bare_onnxruntime_p50_ms"]))
    if o.get("below_1_beyond_noise"):
        line += (" -- WARNING: below 1 beyond the spread; the runtime cannot be faster than the sessions it "
                 "wraps, so this machine was too noisy for the comparison (rerun with more --repeat)")
    return line


def comparison_table(c: dict, h: str = "#") -> List[str]:
    """LC / LC+EE / EC / SC / SC+EE as Markdown table lines."""
    lines = ["%s# LC / EC / SC / SC+EE on the same inputs (%s)" % (h, c["backend"]),
             "", "latency from %s; EC sends %s to a whole-model server started on this machine; SC's server: %s"
             % (c.get("latency_from", "preprocessed input"), c.get("ec_sends", "the input, int8-quantised"),
                c.get("sc_server", "on this machine")),
             "", "| mode | p50 ms | p90 ms | device CPU ms / sample | bytes / sample | device MFLOPs / sample "
                 "| device energy J / inference | top-1 accuracy | top-1 agreement with LC |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in [m for m in MODE_ORDER if m in c["modes"]] + [m for m in c["modes"] if m not in MODE_ORDER]:
        m = c["modes"][name]
        cpu = m.get("cpu_ms_per_inference")
        lines.append("| %s | %.2f | %.2f | %s | %.0f | %.2f | %.3f (%s) | %s | %.1f %% |" % (
            name, m["latency_ms"]["p50"], m["latency_ms"]["p90"], "-" if cpu is None else "%.2f" % cpu,
            m["bytes_per_sample"], m.get("device_mflops", 0.0),
            m["energy_j_per_inference"], m["energy_label"], _pct(m.get("top1_accuracy")),
            100 * m["top1_agreement_with_LC"]))
    if c.get("labelled_inputs"):
        lines += ["", "accuracy over %d inputs with ground-truth labels (last pass of each mode)" % c["labelled_inputs"]]
    return lines


def plots(r: dict, out: Path) -> List[str]:
    """PNG plots of one bench report into ``out``; returns the file names written (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    stages = {k: v["mean"] for k, v in r["stages_ms"].items() if k != "total"}
    fig, ax = plt.subplots(figsize=(6, 2.4))
    left = 0.0
    for name, ms in stages.items():
        ax.barh([0], [ms], left=left, label=name)
        left += ms
    ax.set_yticks([])
    ax.set_xlabel("mean latency per request (ms)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    ax.set_title("latency breakdown (%s, %s)" % (r["board"], r["backend"]))
    fig.savefig(out / "latency_breakdown.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append("latency_breakdown.png")
    if r.get("bandwidth_sweep"):
        fig, ax = plt.subplots(figsize=(5, 3))
        rows = r["bandwidth_sweep"]
        if all("mbps" in row for row in rows):  # a numeric, log-scaled axis
            ax.plot([row["mbps"] for row in rows], [row["total_ms"]["p50"] for row in rows], marker="o")
            ax.set_xscale("log")
            ax.set_xlabel("emulated uplink (Mbit/s)")
        else:  # a report written before the sweep carried Mbit/s
            ax.plot([row["bandwidth"] for row in rows], [row["total_ms"]["p50"] for row in rows], marker="o")
            ax.set_xlabel("emulated uplink")
        ax.set_ylabel("end-to-end p50 (ms)")
        ax.set_title("latency vs bandwidth")
        fig.savefig(out / "latency_vs_bandwidth.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append("latency_vs_bandwidth.png")
    if r.get("comparison"):
        modes = r["comparison"]["modes"]
        names = [m for m in MODE_ORDER if m in modes]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        axes[0].bar(names, [modes[m]["latency_ms"]["p50"] for m in names], color="tab:blue")
        axes[0].set_ylabel("p50 latency per request (ms)")
        axes[1].bar(names, [modes[m].get("device_mflops", 0.0) for m in names], color="tab:orange")
        axes[1].set_ylabel("device MFLOPs per request")
        fig.suptitle("LC / EC / SC / SC+EE (%s)" % r["board"])
        fig.savefig(out / "comparison.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append("comparison.png")
    return written


def write(out: Path, r: dict) -> None:
    """Write the plots and ``report.md`` of one bench report into ``out``."""
    r["plots"] = plots(r, Path(out))
    (Path(out) / "report.md").write_text(render_markdown(r), encoding="utf-8")


# --------------------------------------------------------------------------- load test
def _spin(plan: dict) -> str:
    if "allow_spinning" not in plan:
        return "-"
    return {None: "on (onnxruntime's default)", True: "on", False: "off"}[plan["allow_spinning"]]


def _quartiles(values) -> str:
    """"median [q25-q75]" of a list of numbers."""
    import numpy as np

    a = np.asarray(values, dtype=float)
    return "%.1f [%.1f-%.1f]" % (np.median(a), np.percentile(a, 25), np.percentile(a, 75)) if a.size else "-"


def _srv_label(label: str) -> str:
    return {"batching": "serve (batching)", "no batching": "serve --no-batching"}.get(label, label)


def loadtest_markdown(r: dict, plot: Optional[str] = None, level: int = 1) -> str:
    """A ``python -m runtime loadtest`` result (``loadtest.json``) as Markdown: one row per server and
    client count, the ceiling, the targets checked, the defaults each server chose and the conditions."""
    h = "#" * level
    labels = [k for k in r["levels"][0] if k != "clients"]
    lines = ["%s eetool load test: %s (%s/%s) on %s, %d cores" % (h, r["bundle"], r["backend"], r["precision"],
                                                                r["processor"], r["cores"]), "",
             "%d s per client count and server in %d interleaved rounds; each client a separate process on its own "
             "connection, one request at a time (%d distinct real inputs, int8 wire); every reply checked against "
             "the tail run locally (wrong: top-1 differs or logits off by more than %g x (1 + max |logit|)); "
             "lost: no answer at all." % (r["duration_s"], r["rounds"], r["request_inputs"], r["tolerance"]), "",
             "| server | clients | req/s | p50 ms | p90 ms | p99 ms | mean batch | wrong | lost | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lv in r["levels"]:
        for label in labels:
            c = lv[label]
            lines.append("| %s | %d | %.1f | %s | %s | %s | %s | %d | %d | %s |" % (
                _srv_label(label), lv["clients"], c["req_per_s"], *("%.1f" % c[k] if k in c else "-"
                                                                     for k in ("p50_ms", "p90_ms", "p99_ms")),
                "%.1f" % c["mean_batch"] if "mean_batch" in c else "-", c["wrong"], c["lost"],
                ", ".join("%s %d" % kv for kv in sorted(c["errors"].items())) or "0"))
    ceil, one = r.get("ceiling"), r.get("bare_batch1")
    if ceil or one:
        lines += ["", "In-process cells (the tail sessions alone, no sockets, in the same rounds as the servers: the "
                  "ceiling next to the most clients, the batch-1 tail next to the fewest; the real requests' tail "
                  "inputs, every answer checked):", "",
                  "| cell | sessions x threads | batch | spinning | samples/s | median [IQR] over rounds | ms per run "
                  "p50 / p99 | wrong |", "|---|---|---:|---|---:|---:|---:|---:|"]
        for name, c in (("bare batched ceiling", ceil), ("bare batch-1 tail", one)):
            if not c:
                continue
            sp = _quartiles([x["samples_per_s"] for x in c["per_round"]])
            lines.append("| %s | %d x %s | %d | %s | %.1f | %s | %s | %d |" % (
                name, c["sessions"], c["threads"], c["batch"], _spin({"allow_spinning": c["spinning"]}), c["samples_per_s"], sp,
                "%.1f / %.1f" % (c["p50_ms"], c["p99_ms"]) if "p50_ms" in c else "-", c["wrong"]))
        if ceil:
            lines += ["", "Sessions, threads, spinning and batch: %s." % ceil.get("from", "the batching server's plan")]
    t = r.get("targets") or {}
    names = {"throughput_vs_ceiling": "req/s with batching at %d clients / bare batched ceiling",
             "p99_over_p50": "p99 / p50 with batching at %d clients",
             "lone_device_vs_batch1_path": "p50 at %d client: batching / batch-1 path (serve --no-batching, same "
                                           "threads and spinning)",
             "lone_device_vs_bare_batch1": "p50 at %d client: batching / bare batch-1 tail (what the server and the "
                                           "wire add)"}
    rows = [(k, t[k]) for k in names if k in t]
    if rows:
        lines += ["", "Targets, each a ratio of cells measured next to each other, taken per round (median and "
                  "interquartile range over %d rounds; judged on the median):" % r["rounds"], "",
                  "| ratio | median | IQR | per round | pooled | target | |", "|---|---:|---:|---|---:|---:|---|"]
        for k, x in rows:
            lines.append("| %s | %.3f | %.3f-%.3f | %s | %.3f | %s | %s |" % (
                names[k] % x["clients"], x["ratio"], x["q25"], x["q75"], " ".join("%.3f" % v for v in x["per_round"]),
                x["pooled"], "-" if x.get("target") is None else ("%s %.2f" % (">=" if x["better"] == "higher" else "<=",
                                                                            x["target"])),
                "" if x.get("target") is None else ("met" if x["met"] else "NOT met")))
    lines += ["", "- wrong answers %d, lost replies %d over every cell and the warm-up (target 0): %s" % (
        t.get("wrong_answers", 0), t.get("lost_replies", 0),
        "met" if not t.get("wrong_answers") and not t.get("lost_replies") else "NOT met")]
    sweep = r.get("batch_sweep")
    if sweep:
        best = sweep["best"]
        lines += ["", "Batch-size sweep (bare sessions after the rounds, %.0f s per point, median of 3 windows; read as "
                  "ratios within the sweep): best %.1f samples/s at batch %d with %d session(s) x %s thread(s)%s." % (
                      sweep["seconds_per_point"], best["samples_per_s"], best["batch"], best["sessions"],
                      best["threads"], ", %.2fx the server's sessions and batch in the same sweep" %
                      sweep["best_vs_server_config"] if "best_vs_server_config" in sweep else ""), "",
                  "| sessions x threads | " + " | ".join("batch %d" % b for b in sorted({p["batch"] for p in sweep["points"]})) + " |",
                  "|---|" + "---:|" * len({p["batch"] for p in sweep["points"]})]
        layouts = list(dict.fromkeys((p["sessions"], p["threads"]) for p in sweep["points"]))
        for lay in layouts:
            row = {p["batch"]: p["samples_per_s"] for p in sweep["points"] if (p["sessions"], p["threads"]) == lay}
            lines.append("| %d x %s | " % lay + " | ".join("%.1f" % row[b] if b in row else "-" for b in sorted(row)) + " |")
    lines += ["", "What each server it started chose (its start-up log):"]
    for label, srv in r["servers"].items():
        plan = srv.get("plan")
        if not plan:
            lines.append("- %s: %s, started elsewhere (its defaults are in its own log)" % (_srv_label(label), srv["address"]))
            continue
        lines.append("- %s: %s" % (_srv_label(label), "workers %s, threads %s, max-batch %s, max-wait-ms %s, max-queue %s, "
                                   "spinning %s, %s" % (plan.get("workers"), plan.get("threads"), plan.get("max_batch"),
                                                        plan.get("max_wait_ms"), plan.get("max_queue"),
                                                        _spin(plan),
                                                        "/".join(plan.get("providers", []) or ["Ray Serve"]))
                                   if plan.get("batching") else "batching off, threads %s, spinning %s" % (
                                       plan.get("threads"), _spin(plan))))
        for reason in plan.get("reasons", []):
            lines.append("  - " + reason)
    la = r.get("load_average") or {}
    if la.get("before"):
        cells = la.get("cells_1min") or []
        lines += ["", "Conditions: %s, Python %s, load average before %s, after %s (1/5/15 min)%s; other jobs share "
                  "this machine when it exceeds the core count %d; the whole run took %.0f s." % (
                      r["machine"], r["python"], "/".join("%.1f" % v for v in la["before"]),
                      "/".join("%.1f" % v for v in la["after"]),
                      ", 1-min load after each cell %.1f to %.1f" % (min(cells), max(cells)) if cells else "",
                      r["cores"], r.get("wall_s", 0))]
    if plot:
        lines += ["", "![throughput and p99 against clients](%s)" % plot]
    return "\n".join(lines) + "\n"


def loadtest_plot(r: dict, path: Path) -> Optional[str]:
    """Throughput and p99 against clients for each server, with the ceiling; the PNG path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [k for k in r["levels"][0] if k != "clients"]
    ks = [lv["clients"] for lv in r["levels"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label in labels:
        a1.plot(ks, [lv[label]["req_per_s"] for lv in r["levels"]], marker="o", label=_srv_label(label))
        a2.plot(ks, [lv[label].get("p99_ms", float("nan")) for lv in r["levels"]], marker="o", label=_srv_label(label))
    if r.get("ceiling"):
        a1.axhline(r["ceiling"]["samples_per_s"], color="k", ls="--", lw=1, label="bare batched ceiling")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("clients")
    a1.set_ylabel("replies / s")
    a2.set_ylabel("p99 latency (ms)")
    a1.legend(fontsize=7)
    fig.suptitle("%s (%s/%s), %d cores" % (os.path.basename(str(r["bundle"]).rstrip("/")), r["backend"],
                                           r["precision"], r["cores"]))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- early-exit curves
def _th(values) -> str:
    if values is None:
        return "-"
    return ", ".join("off" if v is None else "%.3f" % v for v in values)


def _gates(values) -> str:
    if values is None:
        return "not run"
    return ", ".join("-" if v is None else "%.3f" % v for v in values)


def curve_markdown(curve: dict, h: str = "##", plots_prefix: str = "") -> str:
    """``eetool exits curve``'s ``curve.json`` as Markdown: accuracy vs device MFLOPs (exits alone, with the
    Exit Predictor, backbone alone) and accuracy vs bandwidth under a latency budget (fixed vs adaptive
    thresholds), every number as measured."""
    lines: List[str] = []
    c = curve.get("compute")
    if c:
        bb = c["backbone_mflops"]
        lines += ["%s Accuracy vs device MFLOPs (%s graphs through the runtime)" % (h, c["pair"]), "",
                  "operating points chosen on %d validation samples (%s) for the least expected device MFLOPs at a "
                  "top-1 drop <= delta; measured on %d test samples (%s) by the device runtime one sample at a time, "
                  "tail run on the device (device MFLOPs = everything computed: backbone %.3f MFLOPs, exit branches "
                  "%s, predictor %s), beside the offline simulation of the same thresholds on the same graphs." % (
                      c["validation"]["samples"], c["validation"]["source"], c["test"]["samples"], c["test"]["source"],
                      bb, " / ".join("%.4f" % v for v in c["branch_mflops"]),
                      "-" if c.get("predictor_mflops") is None else "%.4f MFLOPs" % c["predictor_mflops"]), "",
                  "| exits | delta (val) | confidence thresholds | prediction thresholds | top-1 runtime | device MFLOPs "
                  "runtime | x backbone | top-1 sim | MFLOPs sim | exit rates runtime | branches run |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---|---|"]
        b = c["backbone"]
        rb = b.get("runtime") or b["simulation"]
        lines.append("| backbone alone | - | - | - | %.2f %% | %.3f | %.3f | %.2f %% | %.3f | - | - |" % (
            100 * rb["accuracy"], rb["mflops_per_sample"], rb["mflops_per_sample"] / bb,
            100 * b["simulation"]["accuracy"], b["simulation"]["mflops_per_sample"]))
        for method, pts in c["methods"].items():
            for p in pts:
                r, sim = p.get("runtime"), p["simulation"]
                rates = r["exit_rates"] if r else sim["exit_rates"]
                lines.append("| %s | %.2f pt | %s | %s | %s | %s | %.3f | %.2f %% | %.3f | %s | %s |" % (
                    method if p.get("how") in (None, "exits") else "%s (%s)" % (method, p["how"]),
                    100 * p["delta"], _th(p["thresholds"]), _gates(p["gates"]),
                    ("%.2f %%" % (100 * r["accuracy"])) if r else "-", ("%.3f" % r["mflops_per_sample"]) if r else "-",
                    (r or sim)["mflops_per_sample"] / bb, 100 * sim["accuracy"], sim["mflops_per_sample"],
                    ", ".join("%s %.1f%%" % (k, 100 * v) for k, v in rates.items()),
                    " / ".join("%.1f%%" % (100 * v) for v in sim["branch_rates"])))
        cmp_ = c.get("comparison") or {}
        if cmp_.get("pairs"):
            lines += ["", "Equal accuracy (within %.1f pt, %s numbers): each point with the predictor against the cheapest "
                      "point without it that is at least as accurate minus %.1f pt." % (
                          100 * cmp_["tolerance"], cmp_["basis"], 100 * cmp_["tolerance"]), "",
                      "| with predictor: top-1 | MFLOPs | exits alone: top-1 | MFLOPs | saving MFLOPs | fewer MFLOPs |",
                      "|---:|---:|---:|---:|---:|---|"]
            for row in cmp_["pairs"]:
                a, e = row["with_predictor"], row["exits_alone"]
                lines.append("| %.2f %% | %.3f | %.2f %% | %.3f | %+.4f | %s |" % (
                    100 * a["accuracy"], a["mflops_per_sample"], 100 * e["accuracy"], e["mflops_per_sample"],
                    row["saving_mflops"], "yes" if row["win"] else "NO"))
            lines += ["", "points where the predictor uses strictly fewer device MFLOPs at equal accuracy: %d of %d"
                      % (cmp_["wins"], len(cmp_["pairs"]))]
        t = c.get("targets") or {}
        if t:
            best = t.get("best_at_0.40x")
            lines += ["", "- best point at <= 0.40x backbone MFLOPs: " + (
                "%s, %.2f %% at %.3fx (%.2f pt below the backbone's %.2f %%)" % (
                    best["method"], 100 * best["accuracy"], best["mflops_ratio"], best["drop_pt"],
                    100 * t["backbone_accuracy"]) if best else "none"),
                      "- runtime vs offline simulation: largest gap %.2f pt in accuracy, %.2f pt in exit rates" % (
                          t["runtime_vs_simulation_pt"]["accuracy"], t["runtime_vs_simulation_pt"]["exit_rates"])]
    lt = curve.get("latency")
    if lt:
        lm = lt["latency_model"]
        lines += ["", "%s Accuracy vs bandwidth under a %g ms latency budget (%s)" % (h, lt["budget_ms"], lt["pair"]), "",
                  "latency model: %s; rtt %g ms, %.0f B per offloaded sample, server %.3f ms; thresholds regressed on "
                  "bandwidth (%s) over %s Mbit/s, on validation data. Fixed: the most accurate thresholds meeting the "
                  "budget at every grid bandwidth. Expected latency is the model's on the %d test samples." % (
                      lm["source"], lm["rtt_ms"], lm["bytes_per_sample"], lm["server_ms"], lt["kind"],
                      ", ".join("%g" % b for b in lt["grid_mbps"] or []), lt["test"]["samples"]), "",
                  "| Mbit/s | fixed: top-1 | expected ms | adaptive: confidence thresholds | prediction thresholds | "
                  "top-1 | expected ms | gain pt |", "|---:|---:|---:|---|---|---:|---:|---:|"]
        for row, v in zip(lt["rows"], lt["verdict"]):
            f, a = row["fixed"], row["adaptive"]
            fm, am = f.get("runtime") or f["simulation"], a.get("runtime") or a["simulation"]
            lines.append("| %g | %.2f %% | %.3f | %s | %s | %.2f %% | %.3f | %+.2f |" % (
                row["bandwidth_mbps"], 100 * fm["accuracy"], f["simulation"]["expected_ms"], _th(a["thresholds"]),
                _gates(a["gates"]), 100 * am["accuracy"], a["simulation"]["expected_ms"], v["gain_pt"]))
        lines += ["", "fixed thresholds: %s; prediction thresholds: %s" % (
            _th(lt["rows"][0]["fixed"]["thresholds"]), _gates(lt["rows"][0]["fixed"]["gates"]))]
    link = curve.get("link")
    if link and link.get("phases"):
        lines += [""] + link_markdown(link, h)
    elif link:
        lines += ["", "adaptive run on a changing link: skipped (%s)" % link.get("skipped")]
    for name in curve.get("plots") or []:
        lines += ["", "![%s](%s%s)" % (name[:-4].replace("_", " "), plots_prefix, name)]
    return "\n".join(lines) + "\n"


def link_markdown(link: dict, h: str = "##") -> List[str]:
    """The adaptive run over an emulated link whose bandwidth changes during the run (runtime bench)."""
    lines = ["%s Adaptive thresholds on a changing link (%s)" % (h, link["pair"]), "",
             "one run against the edge server, the emulated uplink changed between phases; the device estimates "
             "its bandwidth from its own transfers (%s) and takes its thresholds from the regression." % link["estimator"],
             "", "| phase | emulated Mbit/s | requests | estimate Mbit/s (median of the last half) | thresholds used "
             "(last request) | prediction thresholds | offloaded | mean latency ms | top-1 |",
             "|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for i, ph in enumerate(link["phases"]):
        lines.append("| %d | %g | %d | %s | %s | %s | %.1f %% | %.2f | %s |" % (
            i + 1, ph["bandwidth_mbps"], ph["requests"],
            "-" if ph["estimate_mbps"] is None else "%.2f" % ph["estimate_mbps"], _th(ph["thresholds"]),
            _gates(ph["gates"]), 100 * ph["offloaded"], ph["latency_ms_mean"],
            "-" if ph.get("accuracy") is None else "%.2f %%" % (100 * ph["accuracy"])))
    return lines


# --------------------------------------------------------------------------- one page for a whole run
def plan_claim(plan: dict) -> str:
    """Neurosurgeon's claim for one ``eetool plan --json`` result: the best split moves with bandwidth
    (or, when one option wins at every bandwidth asked for, the plan's own reason)."""
    best = plan["best"]
    where = "; ".join("%s at %s" % (b, bw) for bw, b in best.items())
    sweep = "; ".join("%s from %.3g to %.3g Mbit/s" % (b["best"], b["from_mbps"], b["to_mbps"])
                      for b in plan.get("best_by_bandwidth", []))
    if len(set(best.values())) > 1:
        return "the best split moves with bandwidth (%s -> server %s, device %s): %s; over a sweep: %s" % (
            plan["board"], plan["server_profile"], plan["device_label"], where, sweep)
    why = [line for line in plan.get("explanation", []) if line.startswith(("why", "best over"))]
    return "the best split does NOT move over the bandwidths asked (%s: %s); %s" % (
        plan["board"], where, "; ".join(why) or "no reason recorded")


def feature_vs_jpeg_claim(plan: dict) -> Optional[str]:
    """The survey's claim that an int8 split feature at a mid split is smaller than the JPEG input, from
    the plan's bytes measured on real images: the split points in the middle third of the network (by
    head MFLOPs) against full offload's JPEG frame."""
    options = plan["options"]
    jpeg = next((o for o in options if o["kind"] == "offload"), None)
    splits = [o for o in options if o["kind"] == "split"]
    if not jpeg or not splits:
        return None
    total = plan["total_mflops"]
    mid = [o for o in splits if total / 3 <= o["info"].get("head_mflops", -1) <= 2 * total / 3] or splits
    smaller = [o for o in mid if o["request_bytes"] < jpeg["request_bytes"]]
    return ("int8 split features at mid splits are %s than the JPEG input (%s B framed): %s" % (
        "smaller" if len(smaller) == len(mid) else ("smaller at %d of %d" % (len(smaller), len(mid))),
        "{:,.0f}".format(jpeg["request_bytes"]),
        ", ".join("%s %s B" % (o["name"], "{:,.0f}".format(o["request_bytes"])) for o in mid)))


def plan_table(plan: dict, h: str = "##") -> List[str]:
    """The plan as Markdown: one row per option, end-to-end (expected) ms per bandwidth, best in bold."""
    bws = plan["bandwidths"]
    lines = ["%s Split point plan: %s on %s, server %s" % (h, plan["model"], plan["board"], plan["server_profile"]),
             "", "device latency: %s (%s); server latency: %s (%s); bytes measured on %d real inputs from %s, "
                 "wire %s, rtt %g ms" % (plan["device_label"], plan["device_source"], plan["server_label"],
                                         plan["server_source"], plan["samples"], plan["data"],
                                         plan.get("wire") or "int8 + %s" % plan["codec"], plan["rtt_ms"]),
             "", "| option | device ms | bytes / sample | server ms | " + " | ".join(
                 "ms @ %g Mbit/s" % b["mbps"] for b in bws) + " |", "|---|---:|---:|---:|" + "---:|" * len(bws)]
    for o in plan["options"]:
        cells = []
        for b in bws:
            ms = b["rows"][o["name"]]["expected_ms"]
            cells.append("**%.1f**" % ms if b["best"] == o["name"] else "%.1f" % ms)
        lines.append("| %s | %.2f | %s | %s | %s |" % (
            o["name"], o["device_ms"], "{:,.0f}".format(o["request_bytes"]),
            "%.2f" % o["server_ms"] if o["server_ms"] else "-", " | ".join(cells)))
    lines += [""] + ["- " + line for line in plan.get("explanation", [])]
    if plan.get("plot"):
        lines += ["", "![plan](%s)" % os.path.basename(plan["plot"])]
    return lines


def rate_claims(rate: dict) -> List[str]:
    """From one ``eetool rate`` report: does the split frontier dominate every JPEG / WebP row (fewer bytes at
    equal or better top-1), and the fewest bytes of a split point within 0.5 pt of the float model."""
    out = []
    dom = rate.get("dominance") or []
    if dom:
        missed = [d["image"] for d in dom if not d["dominated_by"]]
        out.append("the split points' frontier %s the image encodings of the same crop (JPEG / WebP at every quality "
                   "tried, PNG)%s" % (
            "dominates" if not missed else "does NOT dominate",
            "" if not missed else " (not dominated: %s)" % ", ".join(missed)))
    f = rate.get("float") or {}
    splits = [p for p in rate.get("points", []) if p["kind"] == "split"]
    if f.get("top1") is not None and splits:
        near = [p for p in splits if p["top1"] is not None and p["top1"] >= f["top1"] - 0.005]
        if near:
            b = min(near, key=lambda p: p["bytes_mean"])
            out.append("fewest bytes within 0.5 pt of float (%.2f %%): %s, %s B per sample (p90 %s), top-1 %.2f %%" % (
                100 * f["top1"], b["label"], "{:,.0f}".format(b["bytes_mean"]), "{:,.0f}".format(b["bytes_p90"]),
                100 * b["top1"]))
    return out + list(rate.get("notes") or [])


def rate_table(rate: dict, h: str = "##") -> List[str]:
    """One ``eetool rate`` report as Markdown: every point's bytes (mean, p90) and top-1, and the plot."""
    f = rate["float"]
    lines = ["%s Rate vs accuracy: %s, %d inputs from %s" % (h, f.get("model"), rate["samples"], rate["data"]), "",
             "bytes: %s; float model: %s%s" % (rate["units"]["bytes"], f["graphs"],
                                               ", top-1 %.2f %%" % (100 * f["top1"]) if f["top1"] is not None else ""),
             "", "| point | bytes / sample (mean) | p90 | top-1 | agreement with float |", "|---|---:|---:|---:|---:|"]
    for p in rate["points"]:
        lines.append("| %s%s | %s | %s | %s | %.2f %% |" % (
            p["label"], " (frontier)" if p["label"] in rate.get("frontier", []) else "",
            "{:,.0f}".format(p["bytes_mean"]), "{:,.0f}".format(p["bytes_p90"]), _pct(p["top1"]),
            100 * p["agreement"]))
    lines += [""] + ["- %s: %s" % (d["image"], "dominated by %s (%s B)" % (d["dominated_by"], "{:,.0f}".format(
        d["by_bytes"])) if d["dominated_by"] else "NOT dominated") for d in rate.get("dominance", [])]
    if rate.get("plot"):
        lines += ["", "![rate vs accuracy](%s)" % os.path.basename(rate["plot"])]
    return lines


def predictor_claims(curve: dict) -> List[str]:
    """Dong, Mao & Zhang's two claims checked on an ``eetool exits curve`` result: the Exit Predictor cuts device
    compute at equal accuracy, and latency-aware thresholds beat fixed ones under a latency budget."""
    out = []
    c = curve.get("compute") or {}
    cmp_ = c.get("comparison") or {}
    if cmp_.get("pairs"):
        best = max(cmp_["pairs"], key=lambda r: r["saving_mflops"])
        out.append("the Exit Predictor %s device compute at equal accuracy (within %.1f pt): fewer MFLOPs at %d of %d "
                   "operating points (%s, %s), largest saving %.4f MFLOPs/sample (%.2f %% vs %.2f %% top-1)" % (
                       "cuts" if cmp_["wins"] else "does NOT cut", 100 * cmp_["tolerance"], cmp_["wins"],
                       len(cmp_["pairs"]), c["pair"], cmp_["basis"], best["saving_mflops"],
                       100 * best["with_predictor"]["accuracy"], 100 * best["exits_alone"]["accuracy"]))
    lt = curve.get("latency") or {}
    if lt.get("verdict"):
        gains = ", ".join("%+.2f pt at %g Mbit/s" % (v["gain_pt"], v["bandwidth_mbps"]) for v in lt["verdict"])
        better = [v for v in lt["verdict"] if v["gain_pt"] > 0]
        worse = [v for v in lt["verdict"] if v["gain_pt"] < 0]
        out.append("latency-aware thresholds %s fixed ones under a %g ms budget (%s): %s" % (
            "beat" if better and not worse else ("do NOT always beat" if worse else "equal"), lt["budget_ms"],
            lt["board"], gains))
    return out


def render_summary(benches: Sequence[Tuple[str, dict]], plans: Sequence[dict], title: str,
                   loadtests: Sequence[Tuple[str, dict]] = (), rates: Sequence[dict] = (),
                   curves: Sequence[Tuple[str, dict]] = ()) -> str:
    """One Markdown page for a ``make bench`` run: claims first, then each plan, each rate comparison, each
    bench report, each load test and each early-exit curve. ``benches`` / ``loadtests`` / ``curves``:
    ``(relative directory, report.json / loadtest.json / curve.json dict)``; ``plans``: ``eetool plan --json``
    dicts; ``rates``: ``eetool rate --json`` dicts."""
    claims = [plan_claim(p) for p in plans]
    for r in rates:
        claims += rate_claims(r)
    for _, c in curves:
        claims += predictor_claims(c)
    claims += [c for c in (feature_vs_jpeg_claim(p) for p in plans[:1]) if c]
    for _, r in benches:
        modes = (r.get("comparison") or {}).get("modes", {})
        sent, jpeg = r["bytes_sent_mean"], r["input_file_bytes_mean"]
        if "SC" in modes:
            sc = modes["SC"]["bytes_per_sample"]
            claims.append("%s at `%s`: %.0f B per SC request vs %.0f B mean input file: the split feature is %s" % (
                r.get("model") or r["bundle"], r["split"], sc, jpeg, "smaller" if sc < jpeg else "NOT smaller"))
        elif sent:
            claims.append("%s at `%s`: %.0f B sent per request vs %.0f B mean input file: %s" % (
                r.get("model") or r["bundle"], r["split"], sent, jpeg, "smaller" if sent < jpeg else "NOT smaller"))
        for ee, base in (("LC+EE", "LC"), ("SC+EE", "SC")):
            if ee in modes and base in modes:
                claims.append("%s: %s" % (r.get("model") or r["bundle"], early_exit_claim(modes, ee, base)))
    lines = ["# %s" % title, "", "Every number on this page comes from the bench reports and plans below, as they "
             "were measured (estimates are labelled ESTIMATE with their source).", "", "## Claims checked against "
             "these numbers", ""]
    lines += ["- " + c for c in claims]
    for p in plans:
        lines += [""] + plan_table(p)
    for r in rates:
        lines += [""] + rate_table(r)
    for rel, r in benches:
        lines += ["", render_markdown(r, level=2, plots_prefix=(rel.rstrip("/") + "/") if rel else "")]
    for rel, r in loadtests:
        plot = (rel.rstrip("/") + "/loadtest.png") if (rel and r.get("plot")) else None
        lines += ["", loadtest_markdown(r, plot, level=2)]
    for rel, c in curves:
        lines += ["", "## Early exits and the Exit Predictor: %s -> `%s/`" % (c.get("bundle", ""), rel), "",
                  curve_markdown(c, "###", (rel.rstrip("/") + "/") if rel else "")]
    return "\n".join(lines) + "\n"


BENCH_KEYS = ("bundle", "split", "board", "machine", "stages_ms", "bytes_sent_mean", "input_file_bytes_mean")
PLAN_KEYS = ("model", "board", "best", "options", "bandwidths", "total_mflops")
LOADTEST_KEYS = ("bundle", "levels", "servers", "cores")
RATE_KEYS = ("points", "float", "dominance", "samples", "data")


def _load(path, keys, what: str, made_by: str) -> dict:
    """A JSON object with ``keys`` from ``path``; ValueError naming the file and what it should be."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError("%s: cannot read as JSON (%s)" % (path, e))
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError("%s is not %s (missing %s); it is written by %s" % (path, what, ", ".join(missing), made_by))
    return obj


def add_arguments(p) -> None:
    """The ``report`` command's arguments (``python -m runtime report``)."""
    p.add_argument("out", help="Markdown page to write")
    p.add_argument("--bench", nargs="*", default=[], metavar="DIR",
                   help="folders written by 'python -m runtime bench' (each holds report.json)")
    p.add_argument("--plan", nargs="*", default=[], metavar="PLAN.json", help="'eetool plan --json' outputs")
    p.add_argument("--loadtest", nargs="*", default=[], metavar="DIR",
                   help="folders written by 'python -m runtime loadtest' (each holds loadtest.json)")
    p.add_argument("--rate", nargs="*", default=[], metavar="RATE.json", help="'eetool rate' JSON outputs")
    p.add_argument("--curve", nargs="*", default=[], metavar="DIR", help="folders written by 'eetool exits curve'")
    p.add_argument("--title", default="eetool bench")


def run(a) -> int:
    """Write the page ``a.out`` from ``a.bench`` folders and ``a.plan`` files. Raises ValueError for input
    that is missing or of the wrong kind."""
    page = Path(a.out).resolve().parent
    if not page.is_dir():
        raise ValueError("%s: folder %s does not exist" % (a.out, page))
    benches, plans = [], []
    for d in a.bench:
        f = Path(d) / "report.json"
        if not f.is_file():
            raise ValueError("%s: no report.json (run 'python -m runtime bench BUNDLE --out %s' first)" % (d, d))
        r = _load(f, BENCH_KEYS, "a bench report", "python -m runtime bench")
        benches.append((os.path.relpath(Path(d).resolve(), page), r))
    for f in a.plan:
        plans.append(_load(f, PLAN_KEYS, "a plan", "eetool plan --json"))
    loadtests = []
    for d in getattr(a, "loadtest", []) or []:
        f = Path(d) / "loadtest.json"
        if not f.is_file():
            raise ValueError("%s: no loadtest.json (run 'python -m runtime loadtest BUNDLE --out %s' first)" % (d, d))
        r = _load(f, LOADTEST_KEYS, "a load test", "python -m runtime loadtest")
        r["plot"] = (Path(d) / "loadtest.png").is_file()
        loadtests.append((os.path.relpath(Path(d).resolve(), page), r))
    rates = [_load(f, RATE_KEYS, "a rate report", "eetool rate") for f in getattr(a, "rate", []) or []]
    curves = []
    for d in getattr(a, "curve", None) or []:
        f = Path(d) / "curve.json"
        if not f.is_file():
            raise ValueError("%s: no curve.json (run 'eetool exits curve BUNDLE --out %s' first)" % (d, d))
        curves.append((os.path.relpath(Path(d).resolve(), page),
                       _load(f, ("compute",), "an early-exit curve", "eetool exits curve")))
    if not benches and not plans and not loadtests and not rates and not curves:
        raise ValueError("nothing to report: give --bench DIR, --plan FILE, --rate FILE, --loadtest DIR and/or "
                         "--curve DIR")
    Path(a.out).write_text(render_summary(benches, plans, a.title, loadtests, rates, curves), encoding="utf-8")
    print("report written to %s" % a.out)
    return 0

"""Per-layer latency of a whole model on this board, for ``eetool plan`` (Neurosurgeon-style split choice).

Times one ONNX graph of the *whole* model as deployed (onnxruntime's full graph optimisation), then runs
the same graph unfused (basic optimisation) with onnxruntime's built-in profiler
(``SessionOptions.enable_profiling``), takes every node's kernel time per run in execution order
(warm-up runs dropped), and maps node names back to module paths through the scopes the PyTorch
exporter writes into them (``/blocks/blocks.5/project/project.0/Conv`` belongs to ``blocks``,
``blocks.5``, ``blocks.5.project``, ``blocks.5.project.0``). A module with no node of its own (a
BatchNorm the exporter folded into the Conv before it) is absent; nodes without a scope count where
they run.

The result is the *layer profile* JSON that ``eetool plan --measurements FILE`` reads::

    {
      "schema": "eetool.layer_profile/1",
      "board": "rpi4",                      # board profile name
      "source": "onnxruntime profiling of model.onnx on aarch64, 20 runs, 4 threads",
      "model": "model.onnx", "sha256": "...", "input_shape": [1, 3, 224, 224],
      "total_ms": 41.2,                     # median wall time of one whole-model run (ms, batch 1)
      "unfused_total_ms": 52.0,             # the same, graph without fusions (the one profiled per node)
      "kernel_total_ms": 51.1,              # median over runs of the sum of its node kernel times (ms)
      "cumulative_ms": {"blocks.5": 13.1, ...},  # ms from the input up to the end of each module
      "preprocess_ms": 6.3,                 # optional: decode + resize + normalise one image (ms)
      "nodes": [{"name": "...", "op": "Conv", "ms": 0.41}, ...],
      "threads": 4, "runs": 20, "warmup": 3, "onnxruntime": "1.32.0", "machine": "aarch64", "python": "3.11.2"
    }

``cumulative_ms[m]`` is the kernel time of every node executed up to and including the last node in
module ``m`` (per run; median over runs) in the *unfused* graph (onnxruntime's basic optimisation level,
so each node keeps its module's name), scaled by ``total_ms / kernel_total_ms``: the deployed graph's time
(full optimisation, fused) shared out in proportion (the last module's value equals ``total_ms``). ``nodes`` holds each
node's own median, for reading only. A hand-written file needs only ``board``, ``source``,
``cumulative_ms`` and ``total_ms``. Units: milliseconds throughout.

On the board (numpy + onnxruntime only; Pillow for image inputs)::

    python -m runtime.profile_layers model.onnx --board rpi4 --out rpi4-layers.json samples/*.JPEG

``model.onnx`` comes from ``eetool plan MODEL --export-onnx model.onnx`` on the workstation.
Python 3.8 compatible.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .bundle import sha256_file
from .preprocess import IMAGENET_PREPROCESS  # image inputs when no bundle is given

SCHEMA = "eetool.layer_profile/1"



class ProfileError(ValueError):
    """A layer profile that cannot be produced or read; the message says why."""


def node_scopes(node_name: str) -> List[str]:
    """Module paths encoded in an exporter node name, outermost first:
    ``/blocks/blocks.5/expand/expand.2/Clip_output_0_nchwc`` ->
    ``["blocks", "blocks.5", "blocks.5.expand", "blocks.5.expand.2"]``.

    The TorchScript exporter names each scope by the module's *unqualified* name: its path from the last
    non-numeric atom on (``blocks.5.expand.2`` -> ``expand.2``, ``blocks.5`` -> ``blocks.5``). Each scope
    is a direct child of the one before it, so its full path is the parent's path plus the component's last
    atom (when the component's leading atoms end the parent's path, as they do for direct children; else
    the whole component is appended). A name without a leading ``/`` (e.g. ``ReorderInput_token_3``, a
    node onnxruntime inserted) has no scope."""
    if not node_name.startswith("/"):
        return []
    parts = [p for p in node_name.split("/")[1:-1] if p]
    out: List[str] = []
    for comp in parts:
        atoms = comp.split(".")
        parent = out[-1].split(".") if out else []
        lead = atoms[:-1]
        if not out:
            full = comp
        elif not lead or parent[len(parent) - len(lead):] == lead:
            full = out[-1] + "." + atoms[-1]
        else:
            full = out[-1] + "." + comp
        out.append(full)
    return out


def cumulative_from_nodes(nodes: Sequence[Dict[str, Any]], total_ms: Optional[float] = None) -> Dict[str, float]:
    """``{module path: ms}`` from nodes in execution order (each ``{"name", "ms"}``): the time of every
    node up to and including the last node in that module, scaled so the whole sums to ``total_ms``
    (no scaling when ``total_ms`` is None)."""
    kernel_total = float(sum(n["ms"] for n in nodes))
    factor = (float(total_ms) / kernel_total) if (total_ms and kernel_total > 0) else 1.0
    running = 0.0
    cum: Dict[str, float] = {}
    for n in nodes:
        running += float(n["ms"])
        for scope in node_scopes(n["name"]):
            cum[scope] = running * factor  # later nodes of the same module overwrite: last node wins
    return cum


def _runs_and_nodes(events: List[Dict[str, Any]]):
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    return runs, nodes


def parse_profile(events: List[Dict[str, Any]], warmup: int) -> Dict[str, Any]:
    """From onnxruntime's profile events, dropping the first ``warmup`` runs: per-node median kernel times
    (ms) in execution order (``nodes``), the median wall time of a run (``total_ms``), the median over runs
    of each run's kernel-time sum (``kernel_total_ms``) and, per module path, the median over runs of the
    run's cumulative kernel time at that module's last node (``cumulative_kernel_ms``).

    Medians of per-run *cumulative* times are used (not sums of per-node medians): on a busy machine node
    times are heavy-tailed, and a sum of medians would hide the preemption every real run suffers."""
    runs, nodes = _runs_and_nodes(events)
    measured = runs[warmup:]
    if not measured:
        raise ProfileError("the profile holds %d runs; need more than the %d warm-up runs" % (len(runs), warmup))
    per_run: List[List[Dict[str, Any]]] = []
    i = 0
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        these = []
        while i < len(nodes) and nodes[i]["ts"] < start:
            i += 1
        while i < len(nodes) and nodes[i]["ts"] <= end:
            these.append({"name": nodes[i]["name"][: -len("_kernel_time")], "ms": nodes[i]["dur"] / 1e3,
                          "op": str(nodes[i].get("args", {}).get("op_name", ""))})
            i += 1
        per_run.append(these)
    per_run = [r for r in per_run[warmup:] if r]
    if not per_run:
        raise ProfileError("no node events in the measured runs (was profiling enabled?)")
    order: List[str] = []
    ops: Dict[str, str] = {}
    times: Dict[str, List[float]] = {}
    cums: Dict[str, List[float]] = {}
    sums: List[float] = []
    for these in per_run:
        merged: Dict[str, float] = {}
        for e in these:
            if e["name"] not in times:
                order.append(e["name"])
                times[e["name"]] = []
                ops[e["name"]] = e["op"]
            merged[e["name"]] = merged.get(e["name"], 0.0) + e["ms"]
        for name, ms in merged.items():
            times[name].append(ms)
        for scope, ms in cumulative_from_nodes(these).items():
            cums.setdefault(scope, []).append(ms)
        sums.append(float(sum(e["ms"] for e in these)))
    return {"nodes": [{"name": n, "op": ops[n], "ms": float(statistics.median(times[n]))} for n in order],
            "total_ms": float(statistics.median([r["dur"] / 1e3 for r in measured])),
            "kernel_total_ms": float(statistics.median(sums)),
            "cumulative_kernel_ms": {k: float(statistics.median(v)) for k, v in cums.items()},
            "runs": len(measured)}


def _session(ort, path: Path, threads: Optional[int], level, profile_prefix: Optional[str] = None,
             allow_spinning: Optional[bool] = None):
    from .backends import ort_session, session_options

    opts = session_options(threads, allow_spinning)  # as the runtime's own sessions
    opts.graph_optimization_level = level
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort_session(Path(path), opts)


def profile_onnx(model_path, inputs: Sequence[np.ndarray], runs: int = 20, warmup: int = 3,
                 threads: Optional[int] = None, board: str = "host", source_note: str = "",
                 allow_spinning: Optional[bool] = None) -> Dict[str, Any]:
    """Profile ``model_path`` (a whole-model ONNX graph with one input) at batch 1 on ``inputs`` (float32
    arrays of the input shape, batch 1 each; cycled) and return the layer-profile dict (module docstring).

    Two sessions: the graph as deployed (onnxruntime's full optimisation: fused Conv+activation, NCHWc
    layouts) gives ``total_ms``, the median wall time of a run; the same graph with basic optimisation
    only (constant folding, no fusion, so every node keeps its module's name) is profiled node by node
    and gives where that time goes. ``cumulative_ms`` is the unfused graph's cumulative share scaled to
    the deployed ``total_ms`` (fusion would otherwise name a fused Conv+ReLU after the ReLU and hide the
    Conv's module). ``runs`` measured runs after ``warmup`` runs, in each session; ``threads``:
    onnxruntime intra-op threads (None: its default); ``allow_spinning``: as
    :func:`runtime.backends.session_options`. Raises ProfileError when onnxruntime is missing or the graph
    has several inputs."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ProfileError("onnxruntime is not installed: pip install onnxruntime") from e
    if not inputs:
        raise ProfileError("no inputs to profile with")
    if runs < 1 or warmup < 0:
        raise ProfileError("runs must be >= 1 and warmup >= 0")
    path = Path(model_path)
    level = ort.GraphOptimizationLevel
    deployed = _session(ort, path, threads, level.ORT_ENABLE_ALL, allow_spinning=allow_spinning)
    if len(deployed.get_inputs()) != 1:
        raise ProfileError("%s has %d inputs; profile a single-input whole-model graph" % (path, len(deployed.get_inputs())))
    name = deployed.get_inputs()[0].name
    rank = len(deployed.get_inputs()[0].shape)
    feeds = []
    for x in inputs:
        x = np.ascontiguousarray(x, dtype=np.float32)
        feeds.append({name: x if x.ndim == rank else x[None]})
    wall = []
    for k in range(warmup + runs):
        t0 = time.perf_counter()
        deployed.run(None, feeds[k % len(feeds)])
        if k >= warmup:
            wall.append((time.perf_counter() - t0) * 1e3)
    del deployed
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(ort, path, threads, level.ORT_ENABLE_BASIC, os.path.join(tmp, "ort"), allow_spinning)
        for k in range(warmup + runs):
            sess.run(None, feeds[k % len(feeds)])
        trace = sess.end_profiling()
        with open(trace, "r", encoding="utf-8") as fh:
            events = json.load(fh)
    parsed = parse_profile(events, warmup)
    total = float(statistics.median(wall))
    kernel_total = parsed["kernel_total_ms"]
    factor = total / kernel_total if kernel_total > 0 else 1.0
    shape = [int(d) for d in feeds[0][name].shape]
    n_threads = threads or "default"
    return {
        "schema": SCHEMA, "board": board,
        "source": "onnxruntime profiling of %s on %s, %d runs, %s threads%s" % (
            path.name, platform.machine(), parsed["runs"], n_threads, (", " + source_note) if source_note else ""),
        "model": path.name, "sha256": sha256_file(path), "input_shape": shape,
        "total_ms": total, "unfused_total_ms": parsed["total_ms"], "kernel_total_ms": kernel_total,
        "cumulative_ms": {k: v * factor for k, v in parsed["cumulative_kernel_ms"].items()},
        "nodes": parsed["nodes"], "threads": threads, "runs": parsed["runs"], "warmup": warmup,
        "onnxruntime": ort.__version__, "machine": platform.machine(), "python": platform.python_version(),
    }


def preprocess_ms(files: Sequence, spec: Dict[str, Any]) -> float:
    """Median time (ms) to decode, resize, crop and normalise one image file with the runtime's
    preprocessing (:func:`runtime.preprocess.load_image`)."""
    from .preprocess import load_image

    times = []
    for f in files:
        t0 = time.perf_counter()
        load_image(f, spec)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def validate_profile(profile: Dict[str, Any], where: str = "layer profile") -> Dict[str, Any]:
    """Check the fields ``eetool plan`` needs; returns ``profile``. Raises ProfileError naming the problem."""
    if not isinstance(profile, dict):
        raise ProfileError("%s: expected a JSON object" % where)
    for key in ("board", "source", "cumulative_ms", "total_ms"):
        if key not in profile:
            raise ProfileError("%s: missing %r (needs board, source, cumulative_ms, total_ms)" % (where, key))
    cum = profile["cumulative_ms"]
    if not isinstance(cum, dict) or not cum:
        raise ProfileError("%s: cumulative_ms must be a non-empty object {module path: ms}" % where)
    for k, v in list(cum.items()) + [("total_ms", profile["total_ms"])]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) or v == float("inf"):
            raise ProfileError("%s: %s = %r is not a finite number of ms >= 0" % (where, k, v))
    return profile


def load_profile(path) -> Dict[str, Any]:
    """Read and validate a layer-profile JSON file. Raises ProfileError."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise ProfileError("cannot read layer profile %s: %s" % (path, e))
    return validate_profile(data, str(path))


def save_profile(profile: Dict[str, Any], path) -> None:
    validate_profile(profile)
    Path(path).write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.profile_layers",
                                description="Per-layer latency of a whole-model ONNX graph on this board "
                                            "(input to 'eetool plan --measurements').")
    p.add_argument("model", help="whole-model ONNX graph (eetool plan MODEL --export-onnx FILE)")
    p.add_argument("inputs", nargs="*", help="real input images (or .npy arrays in model layout)")
    p.add_argument("--board", default="host", help="board name to record (default host)")
    p.add_argument("--bundle", help="take the image preprocessing from this bundle's manifest.json")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--out", required=True, help="layer profile JSON to write")
    a = p.parse_args(argv)
    spec = IMAGENET_PREPROCESS
    if a.bundle:
        from .manifest import ManifestError, load_manifest

        try:
            spec = load_manifest(a.bundle).preprocess
        except (ManifestError, OSError) as e:
            print("error: --bundle %s: %s" % (a.bundle, e), file=sys.stderr)
            return 2
    if not a.inputs:
        print("error: give real input images (e.g. a bundle's samples/*)", file=sys.stderr)
        return 2
    from .preprocess import load_inputs

    x = load_inputs(a.inputs, spec)
    prof = profile_onnx(a.model, [x[i: i + 1] for i in range(len(x))], a.runs, a.warmup, a.threads, a.board)
    images = [f for f in a.inputs if not str(f).endswith(".npy")]
    if images:
        prof["preprocess_ms"] = preprocess_ms(images, spec)
    save_profile(prof, a.out)
    print("%s: whole model %.2f ms (median of %d runs), %d nodes; written to %s" % (
        a.board, prof["total_ms"], prof["runs"], len(prof["nodes"]), a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

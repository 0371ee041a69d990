"""Early exits between training and the bundle: load trained exit branches for export, and calibrate the
per-exit confidence thresholds on the bundle's own graphs (float or int8), writing them into the manifest.

Thresholds are chosen on the graphs that will run (``Chain`` over the exported ONNX / TFLite files), so
int8 bundles get thresholds for int8 confidences, and the runtime's exit rates match the prediction.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from calibration import thresholds as T
from calibration.readers import Dataset
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.manifest import ExitCalibration

from .export import ExitSpec


class PoolAsMatmul(torch.nn.Module):
    """``nn.AdaptiveAvgPool2d(out)`` on a fixed ``(H, W)`` input written as two matmuls with averaging
    matrices, so it exports to ONNX and TFLite when ``out`` does not divide the input size (the ONNX
    exporter refuses that case). Same result to float rounding. NCHW float32 in and out."""

    def __init__(self, h: int, w: int, out: int):
        super().__init__()
        self.register_buffer("ph", self._matrix(h, out))  # (out, H)
        self.register_buffer("pw", self._matrix(w, out).t().contiguous())  # (W, out)

    @staticmethod
    def _matrix(n: int, out: int) -> torch.Tensor:
        m = torch.zeros(out, n)
        for i in range(out):  # PyTorch's adaptive pooling windows: [floor(i*n/out), ceil((i+1)*n/out))
            lo, hi = (i * n) // out, -((-(i + 1) * n) // out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.ph, x), self.pw)


def make_exportable(branch: torch.nn.Module, feature_hw: tuple[int, int]) -> torch.nn.Module:
    """Replace adaptive average pools whose output size does not divide ``feature_hw`` by
    :class:`PoolAsMatmul` (in place); returns ``branch``."""
    h, w = feature_hw
    for name, mod in list(branch.named_modules()):
        if isinstance(mod, torch.nn.AdaptiveAvgPool2d):
            out = mod.output_size if isinstance(mod.output_size, int) else mod.output_size[0]
            if out is not None and (h % out or w % out):
                parent = branch.get_submodule(name.rsplit(".", 1)[0]) if "." in name else branch
                setattr(parent, name.rsplit(".", 1)[-1], PoolAsMatmul(h, w, out))
    return branch


def exit_specs(exits_dir, model, sample: torch.Tensor | None = None) -> list[ExitSpec]:
    """Exit branches trained for ``model`` (``exits.json`` + ``exits.pt`` from ``eetool exits train``), with
    their thresholds and rule from ``calibration.json`` when present (else threshold 1.0, max_softmax:
    exits that essentially never fire until ``eetool exits calibrate`` sets them)."""
    from .exits import load_exits

    d = Path(exits_dir)
    ee = load_exits(d, model)
    meta = json.loads((d / "exits.json").read_text())
    calib = {}
    if (d / "calibration.json").is_file():
        calib = {e["at"]: e for e in json.loads((d / "calibration.json").read_text()).get("exits", [])}
    shapes = {}
    if sample is not None:
        from .exits import cut_shapes

        shapes = cut_shapes(model, [e["at"] for e in meta["exits"]], sample)
    specs = []
    for entry in meta["exits"]:
        c = calib.get(entry["at"], {})
        threshold = c.get("threshold", 1.0)
        branch = ee.exits[entry["at"]]
        if entry["at"] in shapes:
            make_exportable(branch, tuple(shapes[entry["at"]][-2:]))
        specs.append(ExitSpec(entry["name"], entry["at"], branch,
                              c.get("rule", "max_softmax"), 1.0 if threshold is None else threshold))
    return specs


def bundle_profile(bundle: Bundle, data: Dataset, fmt: str, precision: str, batch: int = 256) -> T.ExitProfile:
    """Run every exit and the final classifier of ``bundle``'s ``fmt/precision`` graphs over labelled
    ``data`` (float32 NCHW) and build the :class:`calibration.thresholds.ExitProfile` with the manifest's
    per-segment and per-branch MFLOPs. Raises DataError for unlabelled data, BundleError for a bundle
    without exits."""
    from calibration.readers import DataError
    from runtime.bundle import BundleError

    if data.y is None:
        raise DataError(f"{data.source}: threshold calibration needs labels")
    if not bundle.exits:
        raise BundleError(f"{bundle.root}: the bundle has no exits to calibrate (export with --exits DIR)")
    chain = Chain(bundle, "all", fmt, precision)
    inp, out = bundle.manifest.input.name, bundle.manifest.output.name
    finals, exits = [], {}
    for i in range(0, len(data), batch):
        values = chain.run_segments({inp: data.x[i:i + batch]})
        finals.append(values[out])
        for name, logits in chain.run_exits(values).items():
            exits.setdefault(name, []).append(logits)
    names = [e.name for e in bundle.exits]
    logits = {n: np.concatenate(exits[n]) for n in names}
    logits["final"] = np.concatenate(finals)
    seg_cost = _segment_costs(bundle)
    return T.ExitProfile.from_logits(logits, data.y, seg_cost, [e.mflops or 0.0 for e in bundle.exits], list(logits))


def _segment_costs(bundle: Bundle) -> list[float]:
    """Backbone MFLOPs from one exit point to the next (the final entry: the rest of the model)."""
    position = {}
    for k, seg in enumerate(bundle.segments):
        for out in seg.outputs:
            position[out] = k
    cum = np.cumsum([s.mflops or 0.0 for s in bundle.segments])
    ends = [cum[position[e.input]] for e in bundle.exits] + [cum[-1]]
    return list(np.diff([0.0] + ends))


def latency_model(bundle: Bundle, board: dict, server: dict) -> dict:
    """Per-segment and per-exit latency estimates (ms) from the manifest's MFLOPs and the boards'
    ``compute.gflops_sustained`` (MFLOPs / GFLOP/s = ms), in the form
    :func:`calibration.thresholds.choose_thresholds_latency` takes, plus ``server_ms`` and the int8
    ``bytes_per_sample`` crossing the split. Labelled as an estimate."""
    dev_g = float(board["compute"]["gflops_sustained"])
    srv_g = float(server["compute"]["gflops_sustained"])
    seg = _segment_costs(bundle)[:-1]  # backbone between exits
    exit_cut = max(k for k, s in enumerate(bundle.segments) for e in bundle.exits if e.input in s.outputs)
    dev_total = sum(s.mflops or 0.0 for s in bundle.device_segments)
    rest = dev_total - sum(s.mflops or 0.0 for s in bundle.segments[: exit_cut + 1])
    import math

    wire = sum(math.prod(bundle.tensor(n).shape[1:]) for n in bundle.wire_tensors)
    return {"board_latency_ms": {"segments": [m / dev_g for m in seg] + [rest / dev_g],
                                 "exits": [(e.mflops or 0.0) / dev_g for e in bundle.exits]},
            "server_ms": sum(s.mflops or 0.0 for s in bundle.server_segments) / srv_g,
            "bytes_per_sample": float(wire), "source": f"estimate: MFLOPs / gflops_sustained of "
                                                      f"{board.get('name')} and {server.get('name')}"}


def calibrate_thresholds(bundle_dir, data: Dataset, delta: float = 0.005, rule: str = "max_softmax",
                         pairs: list[str] | None = None, latency: dict | None = None) -> dict:
    """Choose per-exit thresholds for every ``fmt/precision`` of the bundle (least expected device MFLOPs
    subject to an accuracy drop <= ``delta`` versus the final exit, on ``data``) and write them into the
    manifest: ``exits[i].thresholds[pair]``, ``expected_exit_rate`` and the prediction in
    ``manifest.exit_calibration``; checksums are refreshed. Flags (warns and records) a threshold that
    no confidence seen on those graphs reaches. Returns the per-pair results.

    ``latency`` switches the objective to expected end-to-end latency (Dong, Mao & Zhang 2022, eq. 3 and
    11): ``{"board": profile, "server": profile, "bandwidth_mbps": float, "rtt_ms": float,
    "budget_ms": float | None}`` — least expected latency at the accuracy constraint, or the most accurate
    thresholds within ``budget_ms``."""
    from .bundle_writer import write_manifest

    bundle = Bundle.load(bundle_dir)
    manifest = bundle.manifest
    results = {}
    for pair in pairs or bundle.formats():
        fmt, precision = pair.split("/")
        profile = bundle_profile(bundle, data, fmt, precision)
        if latency is None:
            chosen = T.choose_thresholds_accuracy(profile, delta=delta, rule=rule)
        else:
            model = latency_model(bundle, latency["board"], latency["server"])
            chosen = T.choose_thresholds_latency(
                profile, model["board_latency_ms"], latency["bandwidth_mbps"], model["bytes_per_sample"],
                model["server_ms"], latency.get("rtt_ms", 0.0), latency.get("budget_ms"), delta, rule)
            chosen["final_accuracy"] = float(profile.correct[-1].mean())
            chosen["mflops_ratio"] = chosen["expected_mflops"] / profile.backbone_mflops
        unreachable = []
        for k, e in enumerate(manifest.exits):
            th = chosen["thresholds"][k]
            conf = profile.conf[rule][k]
            reach = conf.max() if rule == "max_softmax" else conf.min()
            if th is not None and ((rule == "max_softmax" and th > reach) or (rule != "max_softmax" and th < reach)):
                unreachable.append(e.name)
                warnings.warn(f"{pair}: threshold {th:.4f} of {e.name} is never reached by its confidences "
                              f"(best seen {reach:.4f}); the exit never fires")
            e.thresholds[pair] = None if th is None else float(th)
            e.expected_exit_rate[pair] = float(chosen["exit_rates"][k])
            e.rule = rule
        results[pair] = {"accuracy": chosen["accuracy"], "final_accuracy": chosen["final_accuracy"],
                         "exit_rates": chosen["exit_rates"], "expected_mflops": chosen["expected_mflops"],
                         "mflops_ratio": chosen["mflops_ratio"], "thresholds": chosen["thresholds"],
                         "unreachable": unreachable, "samples": len(data), "source": data.source,
                         **({"expected_ms": chosen["expected_ms"], "latency_model": model["source"]}
                            if latency is not None else {}),
                         "exit_accuracy": profile.accuracy()}
    if manifest.exits:  # the default threshold: the float ONNX calibration when present
        default = "onnx/fp32" if "onnx/fp32" in results else next(iter(results))
        for e in manifest.exits:
            e.threshold = e.thresholds[default]
    manifest.exit_calibration = ExitCalibration.from_json(
        {"delta": delta, "rule": rule, "results": results, "objective": "compute" if latency is None else "latency",
         **({"bandwidth_mbps": latency["bandwidth_mbps"], "rtt_ms": latency.get("rtt_ms", 0.0),
             "board": latency["board"].get("name"), "budget_ms": latency.get("budget_ms")}
            if latency is not None else {})}, "manifest.exit_calibration")
    write_manifest(Path(bundle_dir), manifest)
    return results


def measure_early_exit(bundle: Bundle, data: Dataset, fmt: str, precision: str) -> dict:
    """Run the device runtime (exits honoured, tail run locally) sample by sample over labelled ``data``
    and return measured ``accuracy``, ``exit_rates`` (exit names + ``final``) and ``mflops_per_sample``."""
    from runtime.device import DeviceRunner

    runner = DeviceRunner(bundle, None, fmt, precision, local_tail=True)
    cost = _exit_cost(bundle)
    hits, counts, mflops = 0, {}, 0.0
    for i in range(len(data)):
        r = runner.infer(data.x[i:i + 1])
        key = r.exit or "final"
        counts[key] = counts.get(key, 0) + 1
        hits += int(r.top1 == data.y[i])
        mflops += cost[key](runner.thresholds)
    n = len(data)
    return {"accuracy": hits / n, "exit_rates": {k: v / n for k, v in counts.items()}, "mflops_per_sample": mflops / n}


def simulate_early_exit(bundle: Bundle, data: Dataset, fmt: str, precision: str) -> dict:
    """Offline prediction for the manifest's thresholds on ``data``: the exit profile of the same graphs
    run in batches, then :func:`calibration.thresholds.simulate`. Same keys as :func:`measure_early_exit`."""
    pair = f"{fmt}/{precision}"
    th = [e.threshold_for(pair) for e in bundle.exits]
    rules = {e.rule for e in bundle.exits}
    if len(rules) != 1:
        raise ValueError(f"exits use different rules {sorted(rules)}; calibrate them with one rule")
    profile = bundle_profile(bundle, data, fmt, precision)
    sim = T.simulate(profile, th, rules.pop())
    return {"accuracy": sim["accuracy"], "mflops_per_sample": sim["expected_mflops"],
            "exit_rates": dict(zip(profile.names, sim["exit_rates"]))}


def _exit_cost(bundle: Bundle):
    """exit name (or ``final``) -> cost function of the active thresholds: backbone up to that exit plus
    the branches evaluated on the way (disabled exits are not evaluated)."""
    seg = np.cumsum(_segment_costs(bundle))
    exits = bundle.exits

    def upto(k):
        return lambda th: float(seg[k] + sum(e.mflops or 0.0 for e in exits[: k + 1] if th.get(e.name) is not None))

    table = {e.name: upto(k) for k, e in enumerate(exits)}
    table["final"] = lambda th: float(seg[-1] + sum(e.mflops or 0.0 for e in exits if th.get(e.name) is not None))
    return table

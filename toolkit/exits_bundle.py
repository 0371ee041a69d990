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
from runtime.manifest import ExitCalibration, LatencyAdaptation

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


def predictor_latency_model(bundle: Bundle, board: dict, server: dict, rtt_ms: float = 0.0,
                            layers: dict | None = None):
    """:class:`calibration.predictor_thresholds.LatencyModel` of the bundle's device side: per-segment (between
    exits, then up to the split), per-exit and predictor latency (ms), server latency, int8 bytes at the
    split. From MFLOPs and the board profiles' ``compute.gflops_sustained`` (an estimate), or with ``layers``
    (a layer profile measured on the board by ``runtime bench``, ``layers.json``) from its cumulative
    per-module latencies, the branches and the predictor then scaled by the measured ms per MFLOP of the
    device backbone. ``source`` says which. Raises ValueError for a layer profile of another model."""
    from calibration.predictor_thresholds import LatencyModel

    est = latency_model(bundle, board, server)
    segs, exits_ms = est["board_latency_ms"]["segments"], est["board_latency_ms"]["exits"]
    pred = bundle.predictor
    pred_ms = ((pred.mflops or 0.0) / float(board["compute"]["gflops_sustained"])) if pred else 0.0
    source = est["source"]
    if layers is not None:
        cum = layers["cumulative_ms"]
        ends = [e.at for e in bundle.exits] + [bundle.manifest.split]
        missing = [c for c in ends if c not in cum]
        if missing:
            raise ValueError(f"layer profile {layers.get('source')!r} has no latency for {missing}; it must be "
                             f"measured on this model (runtime bench of this bundle)")
        at = [float(cum[c]) for c in ends]
        segs = list(np.diff([0.0] + at))
        dev_mflops = sum(s.mflops or 0.0 for s in bundle.device_segments)
        per_mflop = at[-1] / dev_mflops if dev_mflops else 0.0
        exits_ms = [(e.mflops or 0.0) * per_mflop for e in bundle.exits]
        pred_ms = (pred.mflops or 0.0) * per_mflop if pred else 0.0
        source = (f"measured layer latencies ({layers.get('source')}, board {layers.get('board')}); exit branches "
                  f"and predictor scaled by its {per_mflop:.4f} ms per MFLOP; server: {server.get('name')} estimate")
    return LatencyModel(segments_ms=[float(v) for v in segs], exits_ms=[float(v) for v in exits_ms],
                        predictor_ms=float(pred_ms), server_ms=float(est["server_ms"]),
                        bytes_per_sample=float(est["bytes_per_sample"]), rtt_ms=float(rtt_ms), source=source)



def _store_thresholds(exits, pair: str, rule: str, chosen: dict, conf) -> list[str]:
    """Write the chosen thresholds and expected exit rates of ``pair`` into the manifest's exit branches;
    return the names of exits whose threshold their confidences ``conf[k]`` never reach (each warned)."""
    unreachable = []
    for k, e in enumerate(exits):
        th = chosen["thresholds"][k]
        reach = conf[k].max() if rule == "max_softmax" else conf[k].min()
        if th is not None and ((rule == "max_softmax" and th > reach) or (rule != "max_softmax" and th < reach)):
            unreachable.append(e.name)
            warnings.warn(f"{pair}: threshold {th:.4f} of {e.name} is never reached by its confidences "
                          f"(best seen {reach:.4f}); the exit never fires")
        e.thresholds[pair] = None if th is None else float(th)
        e.expected_exit_rate[pair] = float(chosen["exit_rates"][k])
        e.rule = rule
    return unreachable

def calibrate_thresholds(bundle_dir, data: Dataset, delta: float = 0.005, rule: str = "max_softmax",
                         pairs: list[str] | None = None, latency: dict | None = None,
                         budget_mflops: float | None = None, use_predictor: bool = True) -> dict:
    """Choose per-exit thresholds for every ``fmt/precision`` of the bundle (least expected device MFLOPs
    subject to an accuracy drop <= ``delta`` versus the final exit, on ``data``) and write them into the
    manifest: ``exits[i].thresholds[pair]``, ``expected_exit_rate`` and the prediction in
    ``manifest.exit_calibration``; checksums are refreshed. Flags (warns and records) a threshold that
    no confidence seen on those graphs reaches. Returns the per-pair results.

    ``latency`` switches the objective to expected end-to-end latency (Dong, Mao & Zhang 2022, eq. 3 and
    11): ``{"board": profile, "server": profile, "bandwidth_mbps": float, "rtt_ms": float,
    "budget_ms": float | None}`` — least expected latency at the accuracy constraint, or the most accurate
    thresholds within ``budget_ms``.

    With an Exit Predictor in the bundle, a ``budget_mflops`` (the most accurate thresholds within that many
    expected device MFLOPs per sample) or a latency-aware fit (``latency["grid_mbps"]``),
    :func:`calibrate_jointly` does the work."""
    from .bundle_writer import write_manifest

    bundle = Bundle.load(bundle_dir)
    if bundle.predictor is not None or budget_mflops is not None or (latency or {}).get("grid_mbps"):
        return calibrate_jointly(bundle, data, delta, rule, pairs, latency, budget_mflops, use_predictor)
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
        unreachable = _store_thresholds(manifest.exits, pair, rule, chosen, profile.conf[rule])
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


def calibrate_jointly(bundle: Bundle, data: Dataset, delta: float = 0.005, rule: str = "max_softmax",
                      pairs: list[str] | None = None, latency: dict | None = None,
                      budget_mflops: float | None = None, use_predictor: bool = True) -> dict:
    """Confidence thresholds and the Exit Predictor's prediction thresholds chosen together on each
    ``fmt/precision``'s own graphs (:func:`calibration.predictor_thresholds.choose`, Dong, Mao & Zhang 2022):

    * default: least expected device MFLOPs at a top-1 drop <= ``delta``;
    * ``budget_mflops``: most accurate within that many expected device MFLOPs per sample;
    * ``latency`` (``{"board", "server", "rtt_ms", "budget_ms", "bandwidth_mbps", "layers"?}``): most accurate
      within ``budget_ms`` of expected latency (eq. 3 and 11) at ``bandwidth_mbps`` (or least latency at the
      ``delta`` constraint without a budget); with ``"grid_mbps": [...]`` also the latency-aware regression
      from bandwidth to thresholds (``"kind"``: piecewise-linear or polynomial), stored in
      ``manifest.latency_adaptation.models[pair]``, and as the static thresholds the most accurate ones
      meeting the budget at every grid bandwidth (what a device that cannot adapt must use).

    Writes exit thresholds as :func:`calibrate_thresholds` does, plus ``predictor.thresholds[pair]`` (one
    per exit in ``predictor.exits`` order, or null: predictor not used). Returns per-pair results."""
    from calibration import predictor_thresholds as PT

    from .bundle_writer import write_manifest
    from .exit_predictor_bundle import bundle_profile as predictor_profile

    manifest = bundle.manifest
    names = [e.name for e in bundle.exits]
    model, grid = None, None
    if latency is not None:
        model = predictor_latency_model(bundle, latency["board"], latency["server"], latency.get("rtt_ms", 0.0),
                                        latency.get("layers"))
        grid = sorted(latency.get("grid_mbps") or []) or None
        if grid and latency.get("budget_ms") is None:
            raise ValueError("latency-aware thresholds need a latency budget (--budget-ms)")
    results, models = {}, {}
    for pair in pairs or bundle.formats():
        fmt, precision = pair.split("/")
        prof = predictor_profile(bundle, data, fmt, precision)
        use = use_predictor and prof.scores is not None
        if model is None:
            chosen = PT.choose(prof, rule, use, budget=budget_mflops, delta=None if budget_mflops is not None else delta)
        elif grid:
            search = PT._Search(prof, rule, 40, model)
            chosen = PT.choose_latency(prof, model, grid, latency["budget_ms"], rule, use, search=search)
            models[pair] = PT.fit_latency_adaptation(prof, model, latency["budget_ms"], grid, names, rule, use,
                                                     kind=latency.get("kind", "piecewise-linear"), search=search)
        else:
            budget = latency.get("budget_ms")
            chosen = PT.choose(prof, rule, use, budget=budget, delta=None if budget is not None else delta,
                               latency=(model, latency["bandwidth_mbps"]))
        unreachable = _store_thresholds(manifest.exits, pair, rule, chosen, prof.exits.conf[rule])
        if bundle.predictor is not None:
            gates = chosen["gates"]
            bundle.predictor.thresholds[pair] = (None if gates is None else
                                                 [gates[names.index(n)] for n in bundle.predictor.exits])
        ms = chosen.get("expected_ms")
        results[pair] = {"accuracy": chosen["accuracy"], "final_accuracy": chosen["final_accuracy"],
                         "exit_rates": chosen["exit_rates"], "expected_mflops": chosen["expected_mflops"],
                         "mflops_ratio": chosen["mflops_ratio"], "thresholds": chosen["thresholds"],
                         "prediction_thresholds": chosen["gates"], "branch_rates": chosen["branch_rates"],
                         "bypass_rate": chosen["bypass_rate"], "unreachable": unreachable, "samples": len(data),
                         "source": data.source, "exit_accuracy": prof.exits.accuracy(),
                         **({"expected_ms": max(ms) if isinstance(ms, list) else ms, "latency_model": model.source}
                            if model is not None else {})}
    default = "onnx/fp32" if "onnx/fp32" in results else next(iter(results))
    for e in manifest.exits:
        e.threshold = e.thresholds[default]
    manifest.exit_calibration = ExitCalibration.from_json(
        {"delta": delta, "rule": rule, "results": results, "objective": "compute" if model is None else "latency",
         **({"budget_mflops": budget_mflops} if budget_mflops is not None else {}),
         **({"bandwidth_mbps": grid[0] if grid else latency["bandwidth_mbps"], "rtt_ms": model.rtt_ms,
             "board": latency["board"].get("name"), "budget_ms": latency.get("budget_ms"),
             **({"bandwidths_mbps": grid} if grid else {})} if model is not None else {})},
        "manifest.exit_calibration")
    # an older latency-aware fit belongs to other thresholds: replaced, or dropped
    manifest.latency_adaptation = LatencyAdaptation.from_json(
        {"budget_ms": latency["budget_ms"], "rtt_ms": model.rtt_ms, "board": latency["board"].get("name"),
         "server": latency["server"].get("name"), "grid_mbps": grid, "latency_model": model.to_json(),
         "models": models}, "manifest.latency_adaptation") if models else None
    write_manifest(Path(bundle.root), manifest)
    return results


def measure_early_exit(bundle: Bundle, data: Dataset, fmt: str, precision: str, **runner_options) -> dict:
    """Run the device runtime (exits and the Exit Predictor as the manifest says, tail run locally) sample
    by sample over labelled ``data`` and return measured ``accuracy``, ``exit_rates`` (exit names +
    ``final``) and ``mflops_per_sample`` (the graphs each request ran, :func:`runtime.bench.device_mflops`).
    ``runner_options`` go to :class:`runtime.device.DeviceRunner` (thresholds, gates, predictor, ...)."""
    from runtime.bench import device_mflops
    from runtime.device import DeviceRunner

    runner = DeviceRunner(bundle, None, fmt, precision, local_tail=True, **runner_options)
    hits, counts, mflops = 0, {}, 0.0
    for i in range(len(data)):
        r = runner.infer(data.x[i:i + 1])
        key = r.exit or "final"
        counts[key] = counts.get(key, 0) + 1
        hits += int(r.top1 == data.y[i])
        mflops += device_mflops(bundle, r)
    n = len(data)
    return {"accuracy": hits / n, "exit_rates": {k: v / n for k, v in counts.items()}, "mflops_per_sample": mflops / n}


def simulate_early_exit(bundle: Bundle, data: Dataset, fmt: str, precision: str) -> dict:
    """Offline prediction for the manifest's thresholds (and prediction thresholds) on ``data``: the profile
    of the same graphs run in batches, then :func:`calibration.predictor_thresholds.simulate`. Same keys as
    :func:`measure_early_exit`."""
    from calibration import predictor_thresholds as PT

    from .exit_predictor_bundle import bundle_profile as predictor_profile

    pair = f"{fmt}/{precision}"
    th = [e.threshold_for(pair) for e in bundle.exits]
    rules = {e.rule for e in bundle.exits}
    if len(rules) != 1:
        raise ValueError(f"exits use different rules {sorted(rules)}; calibrate them with one rule")
    profile = predictor_profile(bundle, data, fmt, precision)
    sim = PT.simulate(profile, th, manifest_gates(bundle, pair), rules.pop())
    return {"accuracy": sim["accuracy"], "mflops_per_sample": sim["expected_mflops"],
            "exit_rates": dict(zip(profile.exits.names, sim["exit_rates"]))}


def manifest_gates(bundle: Bundle, pair: str) -> list | None:
    """The manifest's prediction thresholds for ``pair`` in the order of ``bundle.exits`` (None: predictor
    not used)."""
    gates = bundle.predictor.gates_for(pair) if bundle.predictor is not None else None
    return None if gates is None else [gates.get(e.name) for e in bundle.exits]

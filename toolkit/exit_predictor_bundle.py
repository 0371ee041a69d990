"""The Exit Predictor and a bundle: train it on the bundle's own device graphs, export it into the bundle
(ONNX and TFLite, float and int8, beside the other device graphs), verify it by value, and profile it
with the exits for threshold calibration.

Data flow: the bundle's float device graphs give the tensor the predictor reads (the model input or the
first device segment's output) and every exit's confidence on real data; labels come from those
confidences and the exits' calibrated thresholds (:func:`toolkit.exit_predictor.exit_labels`); the
trained predictor is exported like an exit branch and recorded in ``manifest.predictor``
(:class:`runtime.manifest.ExitPredictor`, ``docs/bundle.md``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from calibration import predictor_thresholds as PT
from calibration import thresholds as T
from calibration.readers import Dataset
from runtime.backends import open_session
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.confidence import confidence, sigmoid

from . import exit_predictor as EP
from .exits import json_default
from .onnx_export import ExportError, export_onnx

NAME = "predictor"
OUTPUT = "predictor.logits"
FP32_REL_TOL = 1e-4


def predictor_inputs(bundle: Bundle) -> list[str]:
    """Tensors the predictor may read: the model input and every device tensor produced no later than the
    first exit's (so it runs before any exit it gates)."""
    names = [bundle.manifest.input.name]
    first = min((k for k, s in enumerate(bundle.device_segments) for e in bundle.exits if e.input in s.outputs),
                default=len(bundle.device_segments) - 1)
    for seg in bundle.device_segments[: first + 1]:
        names += list(seg.outputs)
    return names


def default_input(bundle: Bundle) -> str:
    """The first device segment's output (the paper's "first device segment's feature")."""
    return bundle.device_segments[0].outputs[0]


def model_tensors(bundle: Bundle, data: Dataset, tensor: str, pair: str = "onnx/fp32", batch: int = 256
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run all of the bundle's ``pair`` graphs over ``data``: the tensor ``tensor`` (float32, e.g. NCHW) and
    the logits ``{exit name: (N, C), ..., "final": (N, C)}``."""
    fmt, precision = pair.split("/")
    chain = Chain(bundle, "all", fmt, precision, with_exits=True)
    out = bundle.manifest.output.name
    feats, logits = [], {}
    for i in range(0, len(data), batch):
        values = chain.run_segments({bundle.manifest.input.name: data.x[i:i + batch]})
        feats.append(values[tensor])
        for name, z in [*chain.run_exits(values).items(), ("final", values[out])]:
            logits.setdefault(name, []).append(z)
    return np.concatenate(feats), {k: np.concatenate(v) for k, v in logits.items()}


def label_thresholds(bundle: Bundle, pair: str) -> list[float | None]:
    """The exits' thresholds for ``pair`` from the manifest; ValueError when none was calibrated."""
    th = [e.threshold_for(pair) for e in bundle.exits]
    if bundle.manifest.exit_calibration is None:
        raise ValueError(f"{bundle.root}: the exits' thresholds are not calibrated; run 'eetool exits calibrate "
                         f"{bundle.root}' first (the predictor learns which exits pass their thresholds)")
    return th


def train_on_bundle(bundle_dir, data: Dataset, at: str | None = None, pair: str = "onnx/fp32",
                    thresholds: list[float | None] | None = None, holdout: float = 0.1, epochs: int = 8,
                    lr: float = 3e-3, seed: int = 0, progress: bool = True, **arch) -> tuple[EP.ExitPredictor, dict]:
    """Train the Exit Predictor on ``data`` (real inputs, labels not needed) through the bundle's float
    device graphs: features at ``at`` (default: the first device segment's output), labels from the exits'
    confidences under their ``pair`` thresholds (or ``thresholds``). The last ``holdout`` share of
    ``data`` is kept out of training for the report.

    Returns ``(model, report)``; report: ``input``, ``exits``, ``label_thresholds``, ``rule``, ``mflops``,
    ``training``, ``holdout`` metrics (:func:`toolkit.exit_predictor.metrics` at 0.5) and ``effect``
    (holdout simulation at the label thresholds: exits alone vs with the predictor at 0.5).
    Raises ValueError for an unknown ``at``, a bundle without exits or uncalibrated thresholds."""
    bundle = Bundle.load(bundle_dir)
    if not bundle.exits:
        raise ValueError(f"{bundle.root}: no exits; export with --exits DIR first")
    at = at or default_input(bundle)
    allowed = predictor_inputs(bundle)
    if at not in allowed:
        raise ValueError(f"the predictor cannot read {at!r}: it must run before the first exit; choose one of {allowed}")
    rules = {e.rule for e in bundle.exits}
    if len(rules) != 1:
        raise ValueError(f"exits use different rules {sorted(rules)}; calibrate them with one rule")
    rule = rules.pop()
    th = list(thresholds) if thresholds is not None else label_thresholds(bundle, pair)
    feats, logits = model_tensors(bundle, data, at, pair)
    names = [e.name for e in bundle.exits]
    conf = np.stack([confidence(logits[n], rule) for n in names])
    labels = EP.exit_labels(conf, th, rule)
    n_val = max(1, int(round(len(data) * holdout))) if holdout > 0 else 0
    tr = slice(0, len(data) - n_val)
    model, training = EP.train_predictor(feats[tr], labels[tr], epochs=epochs, lr=lr, seed=seed,
                                         progress=progress, **arch)
    report = {"input": at, "exits": names, "rule": rule, "label_thresholds": th, "label_pair": pair,
              "mflops": EP.predictor_mflops(model, feats.shape[1:]), "architecture": model.config,
              "training": {**training, "samples": len(data) - n_val, "source": data.source}}
    if n_val:
        va = slice(len(data) - n_val, len(data))
        scores = EP.predict(model, feats[va])
        report["holdout"] = {"samples": n_val, **EP.metrics(scores, labels[va], 0.5)}
        if data.y is not None:
            report["effect"] = _effect(bundle, logits, data.y, va, scores, th, rule, report["mflops"])
    return model, report


def _effect(bundle, logits, y, va, scores, th, rule, mflops) -> dict:
    """Exits alone vs with the predictor (gates 0.5) at the label thresholds, on the holdout."""
    from .exits_bundle import _segment_costs

    names = [e.name for e in bundle.exits]
    z = {n: logits[n][va] for n in names + ["final"]}
    prof = T.ExitProfile.from_logits(z, y[va], _segment_costs(bundle), [e.mflops or 0.0 for e in bundle.exits])
    pp = PT.PredictorProfile(prof, scores, mflops)
    plain = PT.simulate(pp, th, None, rule)
    gated = PT.simulate(pp, th, [0.5] * len(names), rule)
    keys = ("accuracy", "exit_rates", "branch_rates", "bypass_rate", "expected_mflops", "mflops_ratio")
    return {"note": "holdout, the label thresholds, prediction threshold 0.5 for every exit; MFLOPs per sample "
                    "with the tail run on the device (the thresholds are then chosen jointly by 'eetool exits "
                    "calibrate')", "final_accuracy": float(prof.correct[-1].mean()),
            "exits_alone": {k: plain[k] for k in keys}, "with_predictor": {k: gated[k] for k in keys}}


# ------------------------------------------------------------------------------------------- export

def _quant_config(manifest) -> dict:
    """The ONNX quantiser settings the bundle's other int8 graphs were made with."""
    for g in manifest.graphs.values():
        if g.format == "onnx" and g.quantization is not None and g.quantization.config:
            return dict(g.quantization.config)
    return {}


def add_to_bundle(bundle_dir, model: EP.ExitPredictor, report: dict, calib: np.ndarray, verify: np.ndarray,
                  progress: bool = False) -> dict:
    """Export ``model`` into the bundle at ``bundle_dir`` in every format and precision the bundle has:
    ``graphs/predictor.{fp32,int8}.{onnx,tflite}``, int8 calibrated on ``calib`` (the real tensors it reads,
    float32 ``(N, C, H, W)``), with the TFLite int8 input encoding pinned to that of the int8 segment that
    produces it. Verifies every graph by value on ``verify`` against PyTorch (fp32: max |diff| <= 1e-4 x range
    of the logits and identical decisions at 0.5; int8: decision agreement and max |diff| of the
    probabilities, measured) and records ``manifest.predictor`` and ``report.json["predictor"]``.

    Raises ValueError when the predictor's input is not one it may read, ExportError when a float graph
    misses its tolerance (the graphs stay for diagnosis)."""
    from runtime.manifest import ExitPredictor, GraphEntry

    from .bundle_writer import write_manifest
    from .calibrate import _tflite_pair

    out = Path(bundle_dir)
    bundle = Bundle.load(out)
    manifest = bundle.manifest
    at = report["input"]
    if at not in predictor_inputs(bundle):
        raise ValueError(f"the predictor reads {at!r}, which is not the input or a device tensor before the first "
                         f"exit of this bundle ({predictor_inputs(bundle)})")
    for key in [k for k in manifest.graphs if k.startswith(NAME + ".")]:  # a previous predictor
        (out / manifest.graphs.pop(key).file).unlink(missing_ok=True)
    manifest.predictor = None
    model = model.eval()
    owner = ExitPredictor.from_json({
        "name": NAME, "input": at, "output": OUTPUT, "exits": list(report["exits"]), "mflops": float(report["mflops"]),
        "rule": report["rule"], "label_thresholds": report["label_thresholds"], "architecture": model.config,
        "graphs": {}}, "manifest.predictor")
    sample = torch.from_numpy(np.ascontiguousarray(calib[:1], dtype=np.float32))
    pairs = set(bundle.formats())
    if "onnx/fp32" in pairs:
        rel = f"graphs/{NAME}.fp32.onnx"
        entry = export_onnx(model, (sample,), out / rel, [at], [OUTPUT])
        key = f"{NAME}.onnx.fp32"
        manifest.graphs[key] = GraphEntry.from_json({"file": rel, "format": "onnx", "precision": "fp32", **entry,
                                                     "quantization": None}, f"manifest.graphs[{key!r}]")
        owner.graphs["onnx/fp32"] = key
        if "onnx/int8" in pairs:
            from .quantize_onnx import QuantConfig, quantize_graph

            rel8, key8 = f"graphs/{NAME}.int8.onnx", f"{NAME}.onnx.int8"
            q = quantize_graph(out / rel, out / rel8, {at: calib}, QuantConfig(**_quant_config(manifest)),
                               progress=progress, float_outputs=(OUTPUT,))
            manifest.graphs[key8] = GraphEntry.from_json({**manifest.graphs[key].to_json(), "file": rel8,
                                                          "precision": "int8", "quantization": q},
                                                         f"manifest.graphs[{key8!r}]")
            owner.graphs["onnx/int8"] = key8
    if "tflite/fp32" in pairs:
        fixed = {}
        for seg in bundle.device_segments:
            g = manifest.graphs.get(seg.graphs.get("tflite/int8", ""))
            io = g.quantization.io if g is not None and g.quantization is not None else {}
            if at in io and io[at].scale:
                fixed[at] = {"scale": io[at].scale, "zero_point": io[at].zero_point}
        per_graph = {NAME: {at: calib}} if "tflite/int8" in pairs else None
        _tflite_pair(out, manifest, owner, model, (sample,), per_graph, {}, fixed)
    manifest.predictor = owner
    check = verify_graphs(out, manifest, model, verify)
    rep_path = out / "report.json"
    rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    rep["predictor"] = {**{k: v for k, v in report.items() if k not in ("architecture",)}, "verification": check}
    rep_path.write_text(json.dumps(rep, indent=2, default=json_default) + "\n")
    write_manifest(out, manifest)
    bad = [f"{p}: rel diff {c['rel_diff']:.2e}, decision agreement {c['decision_agreement']:.2%}"
           for p, c in check.items() if p.endswith("fp32") and (c["rel_diff"] > FP32_REL_TOL or c["decision_agreement"] < 1)]
    if bad:
        raise ExportError("predictor verification failed: " + "; ".join(bad) + f" (details in {rep_path})")
    return check


def verify_graphs(out: Path, manifest, model: EP.ExitPredictor, x: np.ndarray) -> dict:
    """Every predictor graph against PyTorch on ``x``, bound by name: ``{pair: {"max_abs_diff", "rel_diff"
    (of the logits), "prob_max_abs_diff", "decision_agreement" (score >= 0.5, every exit)}}``."""
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    owner = manifest.predictor
    res = {}
    for pair, key in owner.graphs.items():
        g = manifest.graphs[key]
        sess = open_session(out / g.file, g.format, None, g.name_map)
        got = np.concatenate([sess.run({owner.input: x[i:i + 64]})[OUTPUT] for i in range(0, len(x), 64)])
        diff = float(np.abs(got - ref).max())
        res[pair] = {"samples": len(x), "max_abs_diff": diff, "rel_diff": diff / (float(np.ptp(ref)) or 1.0),
                     "prob_max_abs_diff": float(np.abs(sigmoid(got) - sigmoid(ref)).max()),
                     "decision_agreement": float(((got >= 0) == (ref >= 0)).all(1).mean())}
    return res


# ------------------------------------------------------------------------------------------ profile

def bundle_profile(bundle: Bundle, data: Dataset, fmt: str, precision: str, batch: int = 256) -> PT.PredictorProfile:
    """:class:`calibration.predictor_thresholds.PredictorProfile` of ``bundle``'s ``fmt/precision`` graphs on
    labelled ``data``: exits and final classifier (as :func:`toolkit.exits_bundle.bundle_profile`) plus the
    predictor's scores from its own graph in the same format (no scores when the bundle has no predictor)."""
    from .exits_bundle import bundle_profile as exits_profile

    prof = exits_profile(bundle, data, fmt, precision, batch)
    spec = bundle.predictor
    if spec is None:
        return PT.PredictorProfile(prof)
    key = bundle.graph_key(spec, fmt, precision)
    g = bundle.graph(key)
    sess = open_session(bundle.graph_path(key), g.format, None, g.name_map)
    chain = Chain(bundle, "device", fmt, precision, with_exits=False)
    scores = []
    for i in range(0, len(data), batch):
        values = chain.run_segments({bundle.manifest.input.name: data.x[i:i + batch]})
        scores.append(sigmoid(sess.run({spec.input: values[spec.input]})[OUTPUT]))
    order = [spec.exits.index(e.name) for e in bundle.exits]
    s = np.concatenate(scores)[:, order].T
    return PT.PredictorProfile(prof, s.astype(np.float64), float(spec.mflops or 0.0))


def features_for(bundle: Bundle, data: Dataset, tensor: str, batch: int = 256) -> np.ndarray:
    """The tensor ``tensor`` as the bundle's float ONNX device graphs compute it on ``data``."""
    if tensor == bundle.manifest.input.name:
        return np.ascontiguousarray(data.x, dtype=np.float32)
    fmt, precision = ("onnx/fp32" if "onnx/fp32" in bundle.formats() else bundle.formats()[0]).split("/")
    chain = Chain(bundle, "device", fmt, precision, with_exits=False)
    return np.concatenate([chain.run_segments({bundle.manifest.input.name: data.x[i:i + batch]})[tensor]
                           for i in range(0, len(data), batch)])

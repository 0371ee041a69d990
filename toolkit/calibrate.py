"""Real intermediate tensors for calibration, wire-tensor int8 ranges, and the quantisation of every graph.

Graphs after the first are calibrated on the tensors that the *float* graphs before them produce on the
representative inputs — never on images or random data — so each graph sees the distribution it will
see at run time.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from runtime.backends import OrtSession
from runtime.manifest import GraphEntry, IOQuant, Manifest, WireQuant
from runtime.quant import QuantParams

BATCH = 16


def graph_inputs(out: Path, manifest: Manifest, x: np.ndarray, progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Run the float ONNX segments in order on ``x`` (float32 NCHW) and return, per graph key prefix
    (segment or exit name), its inputs by tensor name: ``{"seg1": {"blocks.5": (N, 80, 14, 14)}, ...}``."""
    from runtime.progress import progress as bar

    sessions = [(s, OrtSession(out / manifest.graphs[s.graphs["onnx/fp32"]].file)) for s in manifest.segments]
    collected: dict[str, list[np.ndarray]] = {}
    batches = range(0, len(x), BATCH)
    for start in bar(batches, "calibration tensors", "batch", enabled=progress):
        values = {manifest.input.name: x[start: start + BATCH]}
        for spec, sess in sessions:
            for name in spec.inputs:
                collected.setdefault(name, []).append(values[name])
            values.update(sess.run({n: values[n] for n in spec.inputs}))
    tensors = {k: np.concatenate(v) for k, v in collected.items()}
    return {o.name: {n: tensors[n] for n in o.inputs} for o in manifest.owners}


def set_wire_qparams(manifest: Manifest, per_graph: dict, samples: int) -> None:
    """Give every tensor crossing a cut an int8 range from its real values (min/max over the
    representative set): the device quantises the split feature with it before sending."""
    seen = {}
    for graph_inputs_ in per_graph.values():
        seen.update(graph_inputs_)
    for name, spec in manifest.tensors.items():
        if name in seen:
            q = QuantParams.from_tensor(seen[name], "int8").to_json()
            spec.quant = WireQuant(**q, scheme="per-tensor affine", range="minmax", samples=samples)


def quantize_onnx_graphs(out: Path, manifest: Manifest, per_graph: dict, quant: dict, progress: bool) -> dict:
    """Quantise every ONNX float graph (segments and exits) to int8 QDQ with onnxruntime, each on its own
    real inputs; the wire tensors take the int8 head's output scale / zero point so the device sends
    exactly what the int8 head computed. Returns per-graph quantisation summaries."""
    from .quantize_onnx import QuantConfig, quantize_graph

    config = QuantConfig(**quant)
    summary = {}
    for owner in manifest.owners:
        name = owner.name
        fp32 = manifest.graphs[owner.graphs["onnx/fp32"]]
        rel = f"graphs/{name}.int8.onnx"
        logits = [o for o in owner.outputs if o not in manifest.tensors]
        q = quantize_graph(out / fp32.file, out / rel, per_graph[name], config, progress=progress,
                           float_outputs=tuple(logits))
        key = f"{name}.onnx.int8"
        manifest.graphs[key] = GraphEntry.from_json({**fp32.to_json(), "file": rel, "precision": "int8",
                                                     "quantization": q}, f"manifest.graphs[{key!r}]")
        owner.graphs["onnx/int8"] = key
        summary[name] = {k: v for k, v in q.items() if k != "io"}
    for seg in manifest.segments:
        graph = manifest.graphs.get(seg.graphs.get("onnx/int8", ""))
        io = graph.quantization.io if graph is not None and graph.quantization is not None else {}
        for name in seg.outputs:
            if name in manifest.tensors and name in io:
                manifest.tensors[name].quant = _as_int8(manifest.tensors[name].quant, io[name])
    return summary


def _as_int8(wire: WireQuant, io: IOQuant) -> WireQuant:
    """The int8 head's own output encoding ``io`` for the wire, uint8 expressed as int8 (same scale, zero
    point shifted by 128): the wire always carries int8."""
    dtype, zero_point = io.dtype, io.zero_point
    if dtype == "uint8":
        dtype, zero_point = "int8", int(zero_point) - 128
    return dataclasses.replace(wire, dtype=dtype, scale=io.scale, zero_point=zero_point, range="int8 head output")


def export_tflite_graphs(out, manifest, segments, exits, values, per_graph, progress):
    """Float (and with ``per_graph``, full-integer int8) TFLite graphs for every segment and exit, converted
    with litert-torch and quantised with ai-edge-quantizer on the same real per-graph inputs as ONNX.
    A tail's input scale / zero point are pinned to its head's output ones, so the int8 split feature
    passes from head to tail without requantisation."""
    from runtime.progress import progress as bar

    summary = {}
    owners = [(manifest.segment(seg.name), seg.module, tuple(values[n] for n in seg.inputs)) for seg in segments]
    for e in exits:
        owner = manifest.exit_branch(e.name)
        owners.append((owner, e.module, (values[owner.input],)))
    fixed: dict = {}  # int8 encoding of every tensor produced so far, by our name
    for owner, module, args in bar(owners, "TFLite graphs", "graph", enabled=progress):
        _tflite_pair(out, manifest, owner, module, args, per_graph, summary, fixed)
    return summary


def _tflite_pair(out, manifest, owner, module, args, per_graph, summary, fixed):
    from .export_tflite import describe_tflite, export_float, first_convs_float_recipe, quantize_int8

    name, inputs, outputs = owner.name, owner.inputs, owner.outputs
    rel = f"graphs/{name}.fp32.tflite"
    entry = export_float(module, tuple(a[:1] for a in args), out / rel, inputs, outputs)
    entry.update(file=rel, format="tflite", precision="fp32", quantization=None)
    manifest.graphs[f"{name}.tflite.fp32"] = GraphEntry.from_json(entry, f"manifest.graphs['{name}.tflite.fp32']")
    owner.graphs["tflite/fp32"] = f"{name}.tflite.fp32"
    if per_graph is None:
        return
    rel8 = f"graphs/{name}.int8.tflite"
    pinned = {n: fixed[n] for n in inputs if n in fixed}
    # the graph reading the image keeps its first two convolutions float (see first_convs_float_recipe)
    recipe = first_convs_float_recipe(out / rel) if manifest.input.name in inputs else "static_wi8_ai8_minmax"
    q = quantize_int8(out / rel, out / rel8, per_graph[name], recipe, name_map=entry.get("name_map"),
                      fixed_io=pinned or None)
    for n in outputs:
        if n in q.get("io", {}):
            fixed[n] = {"scale": q["io"][n]["scale"], "zero_point": q["io"][n]["zero_point"]}
    entry8 = describe_tflite(str(out / rel8), entry.get("name_map"))
    entry8.update(file=rel8, format="tflite", precision="int8", quantization=q, name_map=entry.get("name_map"),
                  batch=entry.get("batch"))
    manifest.graphs[f"{name}.tflite.int8"] = GraphEntry.from_json(entry8, f"manifest.graphs['{name}.tflite.int8']")
    owner.graphs["tflite/int8"] = f"{name}.tflite.int8"
    summary[name] = {k: v for k, v in q.items() if k != "io"}

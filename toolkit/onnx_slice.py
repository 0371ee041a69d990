"""Split a plain ``.onnx`` model directly by tensor name (graph operations in :mod:`toolkit.onnx_graph`).

A cut is named by a tensor (a node output). Tensors produced at or before the node that makes it and
consumed after it cross the cut, exactly as for PyTorch models (:mod:`toolkit.graph`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from runtime import __version__
from runtime.manifest import (GraphEntry, Manifest, ModelInfo, Preprocess, Segment, TensorSpec, WireQuant,
                              WireTensor)
from runtime.quant import QuantParams

from .bundle_writer import copy_support_files, write_manifest
from .graph import SplitError
from .onnx_export import _spec
from .onnx_graph import Order, extract_segment, node_flops, node_inputs, tensor_infos, value_dtype, value_shape


def crossing(model: onnx.ModelProto, tensor: str) -> list[str]:
    """Tensors crossing the cut right after the node that produces ``tensor`` (subgraph reads count as
    uses; see :mod:`toolkit.onnx_graph`). Raises SplitError for an unknown tensor, listing the nearest
    valid names."""
    return Order.of(model).crossing(tensor)


def onnx_split_table(path: Path, input_shape: tuple | None = None) -> dict:
    """Candidate cuts of an ONNX graph (after each node with a single output where only float32 tensors
    cross): the same columns as
    :func:`toolkit.inspect_model.split_table`, FLOPs counted as PyTorch counts them
    (:func:`toolkit.onnx_graph.node_flops`), parameters as the initializer scalars first read at or before
    the cut. Shapes the model does not declare are measured by a probe run
    (:func:`toolkit.onnx_graph.tensor_infos`); ``input_shape`` fills symbolic input dimensions."""
    model = onnx.load(str(path))
    order = Order.of(model)
    outputs = {o.name for o in model.graph.output}
    names = sorted({t for n in model.graph.node for t in n.output if t} | set(order.inputs))
    infos = tensor_infos(model, names, input_shape)
    shapes = {n: value_shape(v) for n, v in infos.items()}
    flops = np.cumsum([0] + node_flops(model, infos))  # flops[i + 1]: nodes 0..i
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    seen, params = set(), []
    for node in model.graph.node:  # initializer scalars first read by each node (counted once)
        fresh = [t for t in node_inputs(node) if t in sizes and t not in seen]
        seen.update(fresh)
        params.append(sum(sizes[t] for t in fresh))
    params = np.cumsum([0] + params)
    rows = []
    for i, node in enumerate(model.graph.node):
        if len(node.output) != 1 or node.output[0] in outputs or node.op_type == "Constant":
            continue
        t = node.output[0]
        cross = order.crossing(t)
        if any(value_dtype(infos[c]) != "float32" for c in cross):
            continue  # shape arithmetic and masks: the runtime carries float32 tensors only
        elems = sum(int(np.prod([d or 1 for d in shapes[c][1:]])) for c in cross)
        rows.append({"name": t, "aliases": [], "shape": shapes[t], "bytes_fp32": 4 * elems,
                     "bytes_int8": elems, "head_mflops": float(flops[i + 1]) / 1e6, "head_params": int(params[i + 1]),
                     "tail_mflops": float(flops[-1] - flops[i + 1]) / 1e6,
                     "single_tensor": len(cross) == 1, "crossing": cross})
    first = shapes[order.inputs[0]]
    return {"input_shape": [d or 1 for d in first], "total_mflops": float(flops[-1]) / 1e6,
            "total_params": int(sum(sizes.values())),
            "input_bytes_fp32": 4 * int(np.prod([d or 1 for d in first[1:]])), "rows": rows}


def export_onnx_bundle(path: Path, split: list[str], out: Path, data: np.ndarray | None = None) -> dict:
    """Slice ``path`` at the tensors in ``split`` (graph order) into segment graphs and write a float
    bundle; verify the chain against the whole model in onnxruntime on ``data`` (float32, the model's input
    layout; default: random normal inputs of the declared shape, batch 4 — pass real data when you have it).
    The wire tensors' int8 ranges are the min / max of the same inputs.

    Segment 0 runs on the device, the rest on the server. Raises SplitError for unknown tensor names."""
    from runtime.backends import OrtSession

    from .verify import compare

    model = onnx.load(str(path))
    order = Order.of(model)
    inputs = order.inputs
    cuts = sorted(split, key=lambda t: order.produced_at.get(t, 10**9))
    crossings = [order.crossing(t) for t in cuts]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise SplitError("eetool slices single-input, single-output ONNX models")
    bounds = [inputs] + crossings + [[model.graph.output[0].name]]
    infos = tensor_infos(model, sorted({t for b in bounds for t in b}), data=data)
    for k, names in enumerate(bounds):
        other = [f"{t} ({value_dtype(infos[t])})" for t in names if value_dtype(infos[t]) != "float32"]
        if other:  # the runtime feeds and sends float32 tensors (int8 on the wire)
            where = "the model input" if k == 0 else f"the cut at {cuts[k - 1]!r}" if k <= len(cuts) else "the output"
            raise SplitError(f"{', '.join(other)} {'crosses' if len(other) == 1 else 'cross'} {where}; eetool's "
                             "runtime carries float32 tensors only: cut where only float tensors cross (after the "
                             "node that consumes it)")
    segments = [extract_segment(model, bounds[k], bounds[k + 1], infos, f"seg{k}") for k in range(len(bounds) - 1)]
    if out.exists():
        shutil.rmtree(out)
    (out / "graphs").mkdir(parents=True)
    first_input = next(v for v in model.graph.input if v.name == inputs[0])
    manifest = Manifest(created_by=f"eetool {__version__}", model=ModelInfo(path.name, "onnx"),
                        input=TensorSpec.from_json(_spec(first_input), "manifest.input"),
                        output=TensorSpec.from_json({k: v for k, v in _spec(model.graph.output[0]).items()
                                                     if k != "layout"}, "manifest.output"),
                        preprocess=Preprocess("none"), cuts=list(cuts), split=cuts[0])
    for k in range(len(bounds) - 1):
        rel = f"graphs/seg{k}.fp32.onnx"
        onnx.save(segments[k], str(out / rel))
        g = segments[k].graph
        key = f"seg{k}.onnx.fp32"
        manifest.graphs[key] = GraphEntry.from_json({
            "file": rel, "format": "onnx", "precision": "fp32",
            "inputs": [_spec(v) for v in g.input if v.name in bounds[k]], "outputs": [_spec(v) for v in g.output]},
            f"manifest.graphs[{key!r}]")
        manifest.segments.append(Segment(name=f"seg{k}", side="device" if k == 0 else "server",
                                         after=cuts[k - 1] if k else None, until=cuts[k] if k < len(cuts) else None,
                                         inputs=list(bounds[k]), outputs=list(bounds[k + 1]),
                                         graphs={"onnx/fp32": key}))
        for v in g.output:
            if k < len(cuts):
                manifest.tensors[v.name] = WireTensor.from_json({k2: v2 for k2, v2 in _spec(v).items() if k2 != "name"},
                                                                f"manifest.tensors[{v.name!r}]")
    full = OrtSession(path)
    shape = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = data if data is not None else np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = full.run({inputs[0]: x})[model.graph.output[0].name]
    values = {inputs[0]: x}
    for seg in manifest.segments:
        sess = OrtSession(out / manifest.graphs[seg.graphs["onnx/fp32"]].file)
        values.update(sess.run({n: values[n] for n in seg.inputs}))
    source = "random" if data is None else "given"
    for name, tensor in manifest.tensors.items():  # the device quantises the split feature with these
        q = QuantParams.from_tensor(values[name], "int8").to_json()
        tensor.quant = WireQuant(**q, scheme="per-tensor affine", range=f"minmax ({source} inputs)", samples=len(x))
    report = {"verification": {"chains": {"onnx/fp32": {"batch_n": compare(ref, values[model.graph.output[0].name])}},
                               "samples": len(x), "source": source}}
    copy_support_files(out, [])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(out, manifest)
    return report

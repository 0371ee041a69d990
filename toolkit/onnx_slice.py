"""Split a plain ``.onnx`` model directly by tensor name (graph operations in :mod:`toolkit.onnx_graph`).

A cut is named by a tensor (a node output). Tensors produced at or before the node that makes it and
consumed after it cross the cut, exactly as for PyTorch models (:mod:`toolkit.graph`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from runtime import __version__
from runtime.manifest import GraphEntry, Manifest, ModelInfo, Preprocess, Segment, TensorSpec, WireTensor

from .bundle_writer import fresh_bundle_dir
from .graph import SplitError
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


def check_split(path: Path, split: list[str]) -> None:
    """Raise SplitError unless every name in ``split`` is a tensor of the main graph of the model at ``path``
    (the message lists the nearest valid names)."""
    if not split:
        raise SplitError("give at least one split tensor (--split NAME); 'eetool inspect MODEL.onnx' lists them")
    order = Order.of(onnx.load(str(path), load_external_data=False))
    for t in split:
        order.crossing(t)


def slice_onnx(source, split: list[str], out: Path, calib: np.ndarray) -> tuple[Manifest, "callable"]:
    """Slice the ONNX model of ``source`` (:class:`toolkit.sources.ModelSource`, kind ``onnx``) at the tensors
    in ``split`` into float segment graphs under ``out/graphs`` and describe them in a new manifest, as
    :func:`toolkit.export.export_bundle` does for a PyTorch model; it then runs the same steps on both
    (wire ranges, int8, samples, verification). Segments up to the last split tensor run on the device.

    ``calib`` (float32, the model's input layout) drives the probe run for types and shapes the model
    leaves out. Returns the manifest and the reference for verification: the whole model in onnxruntime.
    Raises SplitError for unknown tensors, a cut carrying a non-float32 tensor, or a failed probe."""
    from .verify import onnx_reference

    path = Path(source.onnx_path)
    model = onnx.load(str(path))
    order = Order.of(model)
    if not split:
        raise SplitError("give at least one split tensor (--split NAME); 'eetool inspect MODEL.onnx' lists them")
    crossings = {t: order.crossing(t) for t in split}  # unknown names refused here, with the nearest ones
    cuts = sorted(set(split), key=lambda t: order.produced_at[t])
    bounds = [order.inputs] + [crossings[t] for t in cuts] + [[model.graph.output[0].name]]
    every = sorted({t for n in model.graph.node for t in n.output if t} | set(order.inputs))
    infos = tensor_infos(model, every, source.input_shape, calib)
    for k, names in enumerate(bounds):
        other = [f"{t} ({value_dtype(infos[t])})" for t in names if value_dtype(infos[t]) != "float32"]
        if other:  # the runtime feeds and sends float32 tensors (int8 on the wire)
            where = "the model input" if k == 0 else f"the cut at {cuts[k - 1]!r}" if k <= len(cuts) else "the output"
            raise SplitError(f"{', '.join(other)} {'crosses' if len(other) == 1 else 'cross'} {where}; eetool's "
                             "runtime carries float32 tensors only: cut where only float tensors cross (after the "
                             "node that consumes it)")
    graphs = [extract_segment(model, bounds[k], bounds[k + 1], infos, f"seg{k}") for k in range(len(bounds) - 1)]
    flops = {n.output[0]: f for n, f in zip(model.graph.node, node_flops(model, infos)) if n.output}  # by node

    def spec(name: str) -> dict:
        shape = value_shape(infos[name])
        return {"name": name, "shape": [None, *shape[1:]], "dtype": value_dtype(infos[name]),
                "layout": "NCHW" if len(shape) == 4 else None}

    fresh_bundle_dir(out)
    inp, outp = spec(order.inputs[0]), spec(model.graph.output[0].name)
    manifest = Manifest(created_by=f"eetool {__version__}", model=ModelInfo.from_json(source.describe(), "manifest.model"),
                        input=TensorSpec.from_json({**inp, "shape": [None, *source.input_shape[1:]]}, "manifest.input"),
                        output=TensorSpec.from_json({k: v for k, v in outp.items() if k != "layout"}, "manifest.output"),
                        preprocess=Preprocess.from_json(dict(source.preprocess), "manifest.preprocess"),
                        cuts=list(cuts), split=cuts[-1])
    for k, seg in enumerate(graphs):
        rel, key = f"graphs/seg{k}.fp32.onnx", f"seg{k}.onnx.fp32"
        onnx.save(seg, str(out / rel))
        manifest.graphs[key] = GraphEntry.from_json({
            "file": rel, "format": "onnx", "precision": "fp32",
            "inputs": [spec(t) for t in bounds[k]], "outputs": [spec(t) for t in bounds[k + 1]]},
            f"manifest.graphs[{key!r}]")
        manifest.segments.append(Segment(
            name=f"seg{k}", side="device" if k < len(cuts) else "server", after=cuts[k - 1] if k else None,
            until=cuts[k] if k < len(cuts) else None, inputs=list(bounds[k]), outputs=list(bounds[k + 1]),
            mflops=sum(flops.get(n.output[0], 0) for n in seg.graph.node if n.output) / 1e6,
            params=sum(int(np.prod(i.dims)) for i in seg.graph.initializer), graphs={"onnx/fp32": key}))
        if k < len(cuts):
            for t in bounds[k + 1]:
                manifest.tensors[t] = WireTensor.from_json({k2: v for k2, v in spec(t).items() if k2 != "name"},
                                                           f"manifest.tensors[{t!r}]")
    return manifest, onnx_reference(path)

"""Export one graph (segment or exit branch) to ONNX with named inputs/outputs and a dynamic batch.

The TorchScript-based exporter (``dynamo=False``) is used: its graphs carry full shape information, which
onnxruntime's quantisation pre-processing needs.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17


class ExportError(RuntimeError):
    """A graph could not be exported or failed verification; the message names the graph and the cause."""


def export_onnx(module: torch.nn.Module, samples: tuple[torch.Tensor, ...], path: Path,
                input_names: list[str], output_names: list[str]) -> dict:
    """Write ``module(*samples)`` as ONNX to ``path``; batch (dim 0) is dynamic on every input and output.

    Returns the manifest graph fields ``inputs``/``outputs``: name, shape (``None`` for batch), dtype,
    layout (``NCHW`` for 4-D tensors). Raises ExportError when the exporter fails or names do not match."""
    dynamic = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), samples, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic, opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
    except Exception as e:
        raise ExportError(f"ONNX export of {path.name} failed: {e}") from e
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(f"{path.name}: exported names {got_in} -> {got_out} differ from "
                          f"{input_names} -> {output_names}")
    return {"inputs": [_spec(v) for v in model.graph.input], "outputs": [_spec(v) for v in model.graph.output]}


def _spec(value: onnx.ValueInfoProto) -> dict:
    dims = value.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return {"name": value.name, "shape": shape, "dtype": dtype, "layout": "NCHW" if len(shape) == 4 else None}

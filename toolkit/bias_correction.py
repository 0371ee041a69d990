"""Bias correction of a QDQ int8 ONNX graph (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, sec. 4.2, with the input expectation measured on real
data as in their empirical variant; Finkelstein et al., "Fighting Quantization Bias With Bias", 2019).

Rounding a convolution's weights to 8 bits shifts the *mean* of its output channel ``c`` by
``E[W~ x - W x]_c = sum_{i,k} (W~ - W)[c, i, k] * E[x_i]``. Depthwise convolutions (3x3 or 5x5 kernels,
9-25 weights per channel) are hit hardest: with few weights per channel the rounding errors do not
average out. Per Conv of the QDQ graph:

1. ``E[x_i]``: the per-channel mean of the Conv's (dequantised) input when the QDQ graph runs on the
   representative inputs (graph optimisations off, so the tensor is the exact dequantised value);
2. ``W~ - W``: the dequantised int8 weights minus the float weights of the graph that was quantised;
3. ``bias_q[c] -= round(shift_c / (input_scale * weight_scale[c]))``, in the int32 bias's own scale, so
   the correction is exact in integer arithmetic.

Each layer is corrected for its own weight rounding only (correcting the total measured shift at every
layer at once double-counts what upstream layers already fix and diverges). Zero padding at the borders
is ignored (the expectation is taken over the whole feature map). Only the int32 bias initialisers change.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from runtime.progress import progress as bar

__all__ = ["correct_biases", "correct_biases_sequential", "bias_corrected_model"]

_LAYERS = ("Conv", "Gemm")


def _channel_means(model: onnx.ModelProto, tensors: list[str], calib: dict[str, np.ndarray], batch: int
                   ) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of ``tensors`` over ``calib`` and every other axis, with every graph
    optimisation disabled."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    n = len(next(iter(calib.values())))
    for s in range(0, n, batch):
        outs = sess.run(tensors, {k: np.ascontiguousarray(v[s:s + batch]) for k, v in calib.items()})
        for t, o in zip(tensors, outs):
            o = o.reshape(o.shape[0], o.shape[1], -1)
            sums[t] = sums.get(t, 0.0) + o.sum(axis=(0, 2), dtype=np.float64)
            counts[t] = counts.get(t, 0) + o.shape[0] * o.shape[2]
    return {t: sums[t] / counts[t] for t in tensors}


def _dequantized(inits: dict, dq: onnx.NodeProto) -> np.ndarray:
    """Value of ``DequantizeLinear(initializer)`` (per-tensor or per-axis-0 scale / zero point)."""
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q - np.reshape(zp, shape if np.ndim(zp) else ())) * np.reshape(scale, shape if np.ndim(scale) else ())


def _layers(fmodel: onnx.ModelProto, qmodel: onnx.ModelProto) -> list[dict]:
    """Conv nodes of the QDQ graph with a ``DequantizeLinear(int8 weights)``, an int32 bias and a float
    twin of the same name in ``fmodel``: their input tensor, group count, float and dequantised weights,
    bias and bias-scale initialiser names."""
    qinits = {i.name: i for i in qmodel.graph.initializer}
    finits = {i.name: i for i in fmodel.graph.initializer}
    fconv = {n.name: n for n in fmodel.graph.node if n.op_type == "Conv"}
    prod = {o: n for n in qmodel.graph.node for o in n.output}
    out = []
    for n in qmodel.graph.node:
        if n.op_type != "Conv" or len(n.input) < 3 or n.name not in fconv:
            continue
        wdq, bdq = prod.get(n.input[1]), prod.get(n.input[2])
        if not (wdq and bdq and wdq.op_type == bdq.op_type == "DequantizeLinear"):
            continue
        if wdq.input[0] not in qinits or bdq.input[0] not in qinits or bdq.input[1] not in qinits:
            continue
        if qinits[bdq.input[0]].data_type != onnx.TensorProto.INT32 or fconv[n.name].input[1] not in finits:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        out.append({"name": n.name, "input": n.input[0], "group": group,
                    "w_float": numpy_helper.to_array(finits[fconv[n.name].input[1]]).astype(np.float64),
                    "w_quant": _dequantized(qinits, wdq), "bias": bdq.input[0], "bias_scale": bdq.input[1]})
    return out


def _mean_shift(layer: dict, mean_in: np.ndarray) -> np.ndarray:
    """``sum_{i,k} (W~ - W)[c, i, k] * E[x_i]`` per output channel c, for a grouped Conv."""
    err = (layer["w_quant"] - layer["w_float"]).reshape(layer["w_float"].shape[0], layer["w_float"].shape[1], -1).sum(2)
    cout, cin_g = err.shape
    g = layer["group"]
    mean = mean_in.reshape(g, cin_g)  # input channels of each group
    return np.einsum("gcj,gj->gc", err.reshape(g, cout // g, cin_g), mean).reshape(cout)


def int32_bias_minus(bias: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``bias[c] - round(shift_c / scale[c])``, clipped to int32: a float shift (output units) taken out of
    an int32 bias stored in ``scale`` (``input_scale * weight_scale[c]``), exact in integer arithmetic.
    int32 array of ``bias``'s shape."""
    new = np.asarray(bias, np.int64) - np.round(np.asarray(shift, np.float64) / scale).astype(np.int64)
    return np.clip(new, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32).reshape(np.shape(bias))


def _subtract_from_bias(inits: dict, layer: dict, shift: np.ndarray) -> None:
    """``bias_q[c] -= round(shift_c / bias_scale[c])`` on the layer's int32 bias initialiser."""
    bias = numpy_helper.to_array(inits[layer["bias"]])
    scale = numpy_helper.to_array(inits[layer["bias_scale"]]).astype(np.float64)
    inits[layer["bias"]].CopyFrom(numpy_helper.from_array(int32_bias_minus(bias, shift, scale), layer["bias"]))


def correct_biases(fp32_path: str | Path, qdq_path: str | Path, calib: dict[str, np.ndarray], batch: int = 16) -> dict:
    """Correct, in place, the int32 biases of every Conv of the QDQ graph at ``qdq_path`` for the mean
    output shift its weight rounding causes, against the float graph ``fp32_path`` (the graph that was
    quantised: node names shared), with input means taken on ``calib``.

    calib: graph input name -> float32 array ``(N, ...)`` of real inputs (the calibration set).
    Returns ``{"layers": corrected Conv count, "mean_abs_shift": mean |shift| over all output channels}``.
    """
    fmodel = onnx.load(str(fp32_path))
    qmodel = onnx.load(str(qdq_path))
    layers = _layers(fmodel, qmodel)
    if not layers:
        return {"layers": 0, "mean_abs_shift": 0.0}
    inits = {i.name: i for i in qmodel.graph.initializer}
    means = _channel_means(qmodel, sorted({lay["input"] for lay in layers}), calib, batch)
    shifts = []
    for lay in layers:
        shift = _mean_shift(lay, means[lay["input"]])
        shifts.append(np.abs(shift))
        _subtract_from_bias(inits, lay, shift)
    onnx.save(qmodel, str(qdq_path))
    return {"layers": len(layers), "mean_abs_shift": float(np.concatenate(shifts).mean())}


def correct_biases_sequential(fp32_path: str | Path, qdq_path: str | Path, calib: dict[str, np.ndarray],
                              batch: int = 16, progress: bool = False) -> dict:
    """Empirical bias correction, layer by layer: correct, in place, the int32 bias of every Conv of the QDQ
    graph at ``qdq_path``, in graph order, by the whole mean shift of its output channels against the float
    graph ``fp32_path`` (node names shared; the Conv's own output, before any activation), each measured on
    ``calib`` with every earlier correction in place (``progress``: a bar over the layers). Run after
    :func:`correct_biases`, it also removes what input (activation) quantisation and the layers upstream
    shift, which the weight-rounding term cannot see; measuring again after each correction is what keeps it from double-counting (Nagel et al.,
    ICCV 2019, sec. 4.2, empirical bias correction; Finkelstein et al., "Fighting Quantization Bias With
    Bias", 2019). One pass of the graph over ``calib`` per Conv.

    calib: graph input name -> float32 array ``(N, ...)`` of real inputs (the calibration set).
    Returns ``{"layers": corrected Conv count, "mean_abs_shift": mean |shift| removed over all output
    channels, "mean_abs_shift_after": mean |shift| left, measured once more at the end}``."""
    fmodel = onnx.load(str(fp32_path))
    qmodel = onnx.load(str(qdq_path))
    layers = _layers(fmodel, qmodel)
    if not layers:
        return {"layers": 0, "mean_abs_shift": 0.0, "mean_abs_shift_after": 0.0}
    f_out = {n.name: n.output[0] for n in fmodel.graph.node if n.op_type == "Conv"}
    q_out = {n.name: n.output[0] for n in qmodel.graph.node if n.op_type == "Conv"}
    target = _channel_means(fmodel, [f_out[lay["name"]] for lay in layers], calib, batch)
    inits = {i.name: i for i in qmodel.graph.initializer}
    removed = []
    for lay in bar(layers, f"bias correction, layer by layer: {Path(qdq_path).name}", "layer", enabled=progress):
        out = q_out[lay["name"]]
        shift = _channel_means(qmodel, [out], calib, batch)[out] - target[f_out[lay["name"]]]
        removed.append(np.abs(shift))
        _subtract_from_bias(inits, lay, shift)
    after = _channel_means(qmodel, [q_out[lay["name"]] for lay in layers], calib, batch)
    left = [np.abs(after[q_out[lay["name"]]] - target[f_out[lay["name"]]]) for lay in layers]
    onnx.save(qmodel, str(qdq_path))
    return {"layers": len(layers), "mean_abs_shift": float(np.concatenate(removed).mean()),
            "mean_abs_shift_after": float(np.concatenate(left).mean())}


def bias_corrected_model(model, x: np.ndarray, qmax: int = 127, batch: int = 16):
    """A copy of the PyTorch ``model`` (BatchNorm folded, toolkit.qat.fold_batchnorm) whose Conv2d biases
    absorb the mean shift of rounding each folded weight to symmetric per-channel int ``[-qmax, qmax]``
    (the int8 weight scheme of onnxruntime and of ai-edge-quantizer): ``b -= sum_{i,k} (W~ - W)[c,i,k] E[x_i]``
    with ``E[x_i]`` the per-channel mean of the layer's input over ``x`` (float32 NCHW, the
    representative inputs). For the TFLite int8 graphs, made by a quantiser that takes float models
    (ai-edge-quantizer): it then rounds the unchanged weights and quantises the corrected bias. Returns the
    copy (eval mode, same module names)."""
    import torch

    from .qat import fold_batchnorm

    folded = fold_batchnorm(model)
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    sums: dict = {}
    counts: dict = {}

    def hook(m, args):
        t = args[0].detach()
        sums[m] = sums.get(m, 0.0) + t.sum(dim=(0, 2, 3)).double()
        counts[m] = counts.get(m, 0) + t.shape[0] * t.shape[2] * t.shape[3]

    handles = [m.register_forward_pre_hook(hook) for m in convs]
    with torch.no_grad():
        for s in range(0, len(x), batch):
            folded(torch.from_numpy(np.ascontiguousarray(x[s:s + batch])))
    for h in handles:
        h.remove()
    with torch.no_grad():
        for m in convs:
            if m not in sums:
                continue
            w = m.weight.double()
            amax = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-30).reshape(-1, *([1] * (w.dim() - 1)))
            wq = torch.round(w / (amax / qmax)).clamp(-qmax, qmax) * (amax / qmax)
            err = (wq - w).reshape(w.shape[0], w.shape[1], -1).sum(2)  # (Cout, Cin/groups)
            g = m.groups
            mean = (sums[m] / counts[m]).reshape(g, -1)
            shift = torch.einsum("gcj,gj->gc", err.reshape(g, w.shape[0] // g, -1), mean).reshape(-1)
            bias = m.bias if m.bias is not None else torch.zeros(w.shape[0], dtype=m.weight.dtype)
            m.bias = torch.nn.Parameter((bias.double() - shift).to(m.weight.dtype))
    return folded.eval()

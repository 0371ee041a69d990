"""Post-training static int8 quantization of one ONNX graph (a segment, an exit or a whole model).

This module is glue around ``onnxruntime.quantization`` (``quant_pre_process``, ``quantize_static``,
``qdq_loss_debug``) plus the recipe that was measured to keep EfficientNet-Lite0 within 1 pt of float
top-1 on held-out ImageNet images (see ``bench/int8_recipe.py`` for the numbers and how to reproduce them).

Output format: QDQ (``QuantizeLinear -> DequantizeLinear`` pairs around every quantized tensor, ONNX
operator-set >= 13, see https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html).
Every graph input and output ends up with a Q/DQ pair, so the wire quantization of a cut tensor can be
read from the graph with :func:`tensor_qparams`; quantization is affine per tensor,
``q = clip(round(x / scale) + zero_point, qmin, qmax)`` and ``x ~= (q - zero_point) * scale``.

The default recipe (``QuantConfig()``):

* ``quant_pre_process`` first (symbolic shape inference + onnxruntime graph optimisations, which fold the
  exporter's ``Pad`` / ``BatchNorm`` leftovers so that every Conv gets one QDQ pair).
* uint8 activations **and** uint8 weights (U8U8), weights symmetric per output channel, MinMax
  calibration. On x86 CPUs with AVX2 but without VNNI the onnxruntime U8S8 kernels use ``vpmaddubsw``,
  whose 16-bit intermediate sums saturate; onnxruntime documents ``reduce_range`` or U8U8 as the
  remedies (https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html#when-and-why-do-i-need-to-try-u8u8).
  U8U8 is exact on every CPU (ARM boards included) and cost nothing in accuracy here, whereas
  ``reduce_range`` (7-bit weights) costs resolution and the default U8S8 lost 2 pt top-1 on this CPU.
* optional (``sensitive_float`` > 0, off by default: it did not help here) a per-tensor sensitivity pass with ``onnxruntime.quantization.qdq_loss_debug``: the activation
  tensors with the lowest signal-to-quantization-noise ratio (SQNR) after 8-bit QDQ are given 16-bit
  activations (``TensorQuantOverrides``, QUInt16) so that their producer and consumers compute in
  float. Graph inputs and outputs always stay 8-bit (they are the wire format).
"""
from __future__ import annotations

import math
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["QuantConfig", "quantize_graph", "tensor_qparams", "sensitivity_ranking"]

MIN_SAMPLES = 8

_ACT_TYPES = ("uint8", "int8")
_METHODS = ("minmax", "entropy", "percentile")
_ONNX_DTYPES = {
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.INT16: "int16",
}


@dataclass
class QuantConfig:
    """How to quantize one graph. The defaults are the recipe measured best in ``bench/int8_recipe.py``.

    method: calibration method, ``"minmax"`` (running min/max), ``"entropy"`` (KL-divergence threshold,
        Migacz, "8-bit Inference with TensorRT", GTC 2017) or ``"percentile"`` (histogram percentile).
    activation_type / weight_type: ``"uint8"`` or ``"int8"``.
    per_channel: per-output-channel weight scales (Krishnamoorthi, arXiv:1806.08342, sec. 3.1).
    reduce_range: 7-bit weights (avoids the AVX2 ``vpmaddubsw`` saturation of U8S8 at a resolution cost).
    percentile: percentile kept by ``method="percentile"`` (of the values, both tails cut equally).
    num_bins: histogram bins of ``entropy`` and ``percentile`` over [-max|x|, max|x|] (onnxruntime's
        ``HistogramCalibrater``). Entropy searches thresholds from ``num_quantized_bins`` to ``num_bins``
        bins wide, so it needs ``num_bins`` well above ``num_quantized_bins`` (TensorRT: 2048 vs 128):
        with equal counts the only candidate is the full range, i.e. MinMax.
    num_quantized_bins: bins of the quantised candidate distribution of ``entropy`` (Migacz, slide 35).
    sensitive_float: how many of the most quantization-sensitive activation tensors get 16-bit
        activations (their producer and consumer nodes then compute in float); 0 disables the pass.
    sensitivity_samples: calibration samples used for the sensitivity pass (it keeps every intermediate
        tensor of these samples in memory).
    batch_size: calibration batch size.
    preprocess: run ``onnxruntime.quantization.shape_inference.quant_pre_process`` first.
    zero_dead_channels: zero weight channels with max |w| < 1e-5 of the layer's largest, so that their
        bias is not clipped to int32 (see ``_zero_dead_channels``).
    bias_correction: bias correction (``toolkit.bias_correction``: each Conv's int32 bias absorbs the mean
        output shift that its weight rounding causes, with input means measured on the calibration data).
    bias_correction_samples: calibration samples used for it (and for ``sequential_bias_correction``).
    sequential_bias_correction: then the empirical, layer-by-layer pass
        (``toolkit.bias_correction.correct_biases_sequential``): each Conv, in graph order, absorbs the whole
        mean shift of its output against the float graph, measured with the earlier corrections in place.
    float_first_convs: keep the first N Conv nodes (graph order) in float: for the graph that reads the
        image, whose 3-channel stem conv is sensitive and gains little from int8 kernels.
    float_nodes: names of nodes (as in the graph after ``preprocess``) kept in float
        (``nodes_to_exclude``), e.g. the layers whose quantisation costs the most agreement.
    extra_options: passed through to ``quantize_static(extra_options=...)`` (ours win on conflicts only
        for ``TensorQuantOverrides`` of widened tensors).
    """

    method: str = "minmax"
    activation_type: str = "uint8"
    weight_type: str = "uint8"
    per_channel: bool = True
    reduce_range: bool = False
    percentile: float = 99.999
    num_bins: int = 2048
    num_quantized_bins: int = 128
    sensitive_float: int = 0
    sensitivity_samples: int = 8
    batch_size: int = 16
    preprocess: bool = True
    zero_dead_channels: bool = False
    bias_correction: bool = False
    bias_correction_samples: int = 128
    sequential_bias_correction: bool = False
    float_first_convs: int = 0
    float_nodes: tuple = ()
    extra_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.float_nodes, str):  # one name, not its characters
            self.float_nodes = (self.float_nodes,)
        self.float_nodes = tuple(self.float_nodes)
        if self.method not in _METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r} is not one of {_METHODS}")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in _ACT_TYPES:
                raise ValueError(f"QuantConfig.{name}={getattr(self, name)!r} is not one of {_ACT_TYPES}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantConfig.percentile={self.percentile} must be in (0, 100]")
        if self.num_quantized_bins < 2 or self.num_bins < 2 * self.num_quantized_bins:
            raise ValueError(f"QuantConfig.num_bins={self.num_bins} must be at least 2 x num_quantized_bins="
                             f"{self.num_quantized_bins} (entropy would have no threshold to choose but MinMax)")
        if self.bias_correction_samples < 1 or self.float_first_convs < 0:
            raise ValueError("QuantConfig.float_first_convs must be >= 0, bias_correction_samples >= 1")
        if self.sensitive_float < 0 or self.batch_size < 1 or self.sensitivity_samples < 1:
            raise ValueError("QuantConfig.sensitive_float must be >= 0, batch_size and sensitivity_samples >= 1")


# --------------------------------------------------------------------------------------------- calib data
class _CalibReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over in-memory arrays: yields
    ``{input_name: float32 array (b, ...)}`` batches of ``batch_size`` samples (the last one partial)."""

    def __init__(self, calib: dict[str, np.ndarray], batch_size: int, progress: bool, desc: str):
        from onnxruntime.quantization import CalibrationDataReader

        # subclass lazily so that importing this module does not import onnxruntime.quantization
        self.__class__ = type("_CalibReaderImpl", (_CalibReader, CalibrationDataReader), {})
        self.calib, self.batch_size, self.progress, self.desc = calib, batch_size, progress, desc
        self.n = len(next(iter(calib.values())))
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        starts = range(0, self.n, self.batch_size)
        if self.progress:
            from runtime.progress import progress

            starts = progress(starts, self.desc, "batch")
        for s in starts:
            yield {k: np.ascontiguousarray(v[s : s + self.batch_size]) for k, v in self.calib.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return self.n


def _calibrate(src: Path, calib: dict[str, np.ndarray], config: QuantConfig, cache: Path, progress: bool,
               desc: str) -> None:
    """Activation ranges of every tensor of ``src`` with onnxruntime's calibrator for ``config.method``,
    written to ``cache`` (onnxruntime's JSON calibration cache, which ``quantize_static`` then reads).

    We drive the calibrator instead of letting ``quantize_static`` do it for two reasons: its histogram
    calibrators stack the outputs of all batches of one ``collect_data`` call into one array, which fails
    when the last batch is partial, so here each call gets one batch (histograms merge across calls, as
    onnxruntime's own strided calibration does); and ``quantize_static`` does not pass ``num_bins`` /
    ``num_quantized_bins`` on, which left entropy at 128 / 128 bins, where its only candidate is MinMax."""
    import contextlib
    import io

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    options = {"minmax": {},
               "entropy": {"num_bins": config.num_bins, "num_quantized_bins": config.num_quantized_bins},
               "percentile": {"num_bins": config.num_bins, "percentile": config.percentile, "symmetric": False},
               }[config.method]
    reader = _CalibReader(calib, config.batch_size, progress, desc)
    with tempfile.TemporaryDirectory(prefix="eetool-calib-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        # (the histogram collector prints a line per call; the progress bar says the same)
        calibrator = create_calibrator(src, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=method, extra_options=options)
        for batch in reader._batches():
            calibrator.collect_data(_OneBatch(batch))
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator  # its session holds the augmented graph open until the temporary folder goes


class _OneBatch:
    """A calibration data reader that yields one batch, then ``None``."""

    def __init__(self, batch: dict[str, np.ndarray]):
        self.batch = batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self.batch = self.batch, None
        return batch


def _graph_inputs(model: onnx.ModelProto) -> dict[str, tuple]:
    """Graph inputs that are not initializers -> shape (ints for fixed dims, None for symbolic ones)."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return out


def _validate_calib(model: onnx.ModelProto, calib: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Check ``calib`` against the graph inputs; return float32 arrays and the sample count N."""
    inputs = _graph_inputs(model)
    if not calib:
        raise ValueError(
            "calib is empty: quantize_graph needs real calibration inputs, a dict mapping each graph input "
            f"{sorted(inputs)} to a float32 array (N, ...) of N samples (e.g. 100-200 real images)"
        )
    missing, extra = sorted(set(inputs) - set(calib)), sorted(set(calib) - set(inputs))
    if missing or extra:
        raise ValueError(
            f"calib keys {sorted(calib)} do not match the graph inputs {sorted(inputs)}"
            + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
            + ": pass one array per graph input, keyed by its name"
        )
    out, counts = {}, set()
    for name, arr in calib.items():
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"calib[{name!r}] has dtype {arr.dtype}; pass a float32 array")
        arr = arr.astype(np.float32, copy=False)
        want = inputs[name]
        ok = arr.ndim == len(want) and all(w is None or w == a for w, a in zip(want[1:], arr.shape[1:]))
        if not ok:
            exp = "(" + ", ".join("N" if i == 0 else ("?" if w is None else str(w)) for i, w in enumerate(want)) + ")"
            raise ValueError(
                f"calib[{name!r}] has shape {arr.shape} but the graph input {name!r} expects {exp} "
                "(N = number of samples first): reshape/transposed it to the graph's layout"
            )
        if arr.shape[0] == 0:
            raise ValueError(f"calib[{name!r}] has 0 samples; pass at least {MIN_SAMPLES} (100-200 recommended)")
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"calib[{name!r}] has NaN/Inf values in {int(bad.sum())} of {arr.shape[0]} samples "
                f"(first at index {int(np.flatnonzero(bad)[0])}): drop or fix those samples"
            )
        out[name] = arr
        counts.add(arr.shape[0])
    if len(counts) != 1:
        raise ValueError(f"calib arrays have different sample counts {sorted(counts)}; they must all have the same N")
    n = counts.pop()
    if n < MIN_SAMPLES:
        warnings.warn(
            f"only {n} calibration samples used (fewer than {MIN_SAMPLES}); activation ranges may not be "
            "representative, 100-200 real samples are recommended",
            stacklevel=3,
        )
    return out, n


# ------------------------------------------------------------------------------------------- qparams
def _initializer_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(f"no initializer or Constant named {name!r}")


def _io_quantize_node(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    """The QuantizeLinear that quantizes graph input/output ``tensor``: Q(tensor) for an input,
    Q(x) -> DQ -> tensor for an output."""
    nodes = model.graph.node
    by_output = {o: n for n in nodes for o in n.output}
    for n in nodes:
        if n.op_type == "QuantizeLinear" and n.input[0] == tensor:
            return n
    dq = by_output.get(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = by_output.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q
    return None


def _qparams_of(model: onnx.ModelProto, q: onnx.NodeProto) -> dict:
    scale = _initializer_value(model, q.input[1])
    zp_name = q.input[2] if len(q.input) > 2 and q.input[2] else None
    if zp_name is None:
        return {"dtype": "uint8", "scale": float(scale.reshape(-1)[0]), "zero_point": 0}
    zp = None
    for init in model.graph.initializer:
        if init.name == zp_name:
            dtype = _ONNX_DTYPES.get(init.data_type, str(init.data_type))
            zp = numpy_helper.to_array(init)
            break
    else:
        zp = _initializer_value(model, zp_name)
        dtype = str(zp.dtype)
    if scale.size != 1:
        raise ValueError(f"{q.name}: per-axis scale on a graph input/output is not supported on the wire")
    return {"dtype": dtype, "scale": float(scale.reshape(-1)[0]), "zero_point": int(zp.reshape(-1)[0])}


def tensor_qparams(int8_path: str | Path, tensor_name: str) -> dict:
    """Scale, zero point and storage dtype of the QuantizeLinear on graph input/output ``tensor_name``
    of the QDQ graph at ``int8_path``: ``{"dtype": "uint8"|"int8", "scale": float, "zero_point": int}``.
    Raises ``KeyError`` when the tensor is not quantized in that graph."""
    model = onnx.load(str(int8_path), load_external_data=False)
    q = _io_quantize_node(model, tensor_name)
    if q is None:
        raise KeyError(f"{tensor_name!r} has no QuantizeLinear/DequantizeLinear pair in {int8_path}")
    return _qparams_of(model, q)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


# ops to which onnxruntime's QDQ quantiser gives their input's encoding (max pooling, layout changes)
_SAME_ENCODING_OPS = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def _through_same_encoding_ops(nodes, overrides: dict) -> dict:
    """``overrides`` (TensorQuantOverrides) plus, for each tensor produced by a chain of
    :data:`_SAME_ENCODING_OPS`, the same entry on the tensors feeding that chain: an encoding pinned on a
    max pool's output is otherwise replaced by its input's."""
    producer = {o: n for n in nodes for o in n.output}
    out = dict(overrides)
    for name, entry in overrides.items():
        node = producer.get(name)
        while node is not None and node.op_type in _SAME_ENCODING_OPS:
            out.setdefault(node.input[0], entry)
            node = producer.get(node.input[0])
    return out


def _add_io_qdq(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], act_type: str,
                pins: dict | None = None) -> None:
    """Insert an 8-bit Q/DQ pair (MinMax range from the calibration data, or the scale / zero point that
    ``pins``, TensorQuantOverrides-style, gives the tensor) on each graph input/output in ``ranges`` that
    onnxruntime left unquantized (e.g. its consumer/producer was kept in float, or a max pool's output
    shares its input's encoding)."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    onnx_type = _qtype(act_type).tensor_type  # the helper takes the ONNX element type, not a QuantType
    qmin, qmax = get_qmin_qmax_for_qType(onnx_type)
    outputs = {o.name for o in model.graph.output}
    new_nodes_front, new_nodes_back = [], []
    for name, (rmin, rmax) in ranges.items():
        if _io_quantize_node(model, name) is not None:
            continue
        pin = ((pins or {}).get(name) or [{}])[0]
        if "scale" in pin and "zero_point" in pin:
            zp, scale = int(pin["zero_point"]), np.float32(pin["scale"])
        else:
            zp, scale = compute_scale_zp(np.float32(min(rmin, 0.0)), np.float32(max(rmax, 0.0)), qmin, qmax,
                                         symmetric=False)
        s_name, z_name = f"{name}_io_scale", f"{name}_io_zero_point"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.asarray(scale, dtype=np.float32), s_name),
            helper.make_tensor(z_name, onnx_type, [], [int(zp)]),
        ])
        if name in outputs:  # producer -> name_fp -> Q -> DQ -> name
            fp = f"{name}_io_float"
            for n in model.graph.node:
                n.output[:] = [fp if o == name else o for o in n.output]
                n.input[:] = [fp if i == name else i for i in n.input]
            new_nodes_back += [
                helper.make_node("QuantizeLinear", [fp, s_name, z_name], [f"{name}_io_q"], name=f"{name}_io_Q"),
                helper.make_node("DequantizeLinear", [f"{name}_io_q", s_name, z_name], [name], name=f"{name}_io_DQ"),
            ]
        else:  # name -> Q -> DQ -> name_io_dq -> consumers
            dq = f"{name}_io_dq"
            for n in model.graph.node:
                n.input[:] = [dq if i == name else i for i in n.input]
            new_nodes_front += [
                helper.make_node("QuantizeLinear", [name, s_name, z_name], [f"{name}_io_q"], name=f"{name}_io_Q"),
                helper.make_node("DequantizeLinear", [f"{name}_io_q", s_name, z_name], [dq], name=f"{name}_io_DQ"),
            ]
    if new_nodes_front or new_nodes_back:
        nodes = new_nodes_front + list(model.graph.node) + new_nodes_back
        del model.graph.node[:]
        model.graph.node.extend(nodes)


# ------------------------------------------------------------------------------------------ sensitivity
def sensitivity_ranking(
    fp32_path: str | Path, qdq_path: str | Path, calib: dict[str, np.ndarray], workdir: str | Path
) -> list[tuple[str, float]]:
    """Rank the quantized activation tensors of ``qdq_path`` by their signal-to-quantization-noise ratio
    (dB, lower = more sensitive), most sensitive first.

    Uses ``onnxruntime.quantization.qdq_loss_debug``: every intermediate tensor of both graphs is made a
    graph output, both are run on ``calib`` and each QDQ'd tensor's value before QuantizeLinear is
    compared with its value after DequantizeLinear (``qdq_err``, the local 8-bit rounding/clipping
    noise). Graph inputs and outputs are left out (they stay 8-bit: they are the wire format)."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    workdir = Path(workdir)
    aug_f, aug_q = workdir / "sens_float.onnx", workdir / "sens_qdq.onnx"
    modify_model_output_intermediate_tensors(str(fp32_path), str(aug_f))
    modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q))
    reader = lambda: _CalibReader(calib, batch_size=4, progress=False, desc="")  # noqa: E731
    acts_q = collect_activations(str(aug_q), reader())
    acts_f = collect_activations(str(aug_f), reader())
    errors = compute_activation_error(create_activation_matching(acts_q, acts_f))
    model = onnx.load(str(fp32_path), load_external_data=False)
    io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    ranked = [(k, float(v["qdq_err"])) for k, v in errors.items() if "qdq_err" in v and k not in io]
    ranked = [(k, v) for k, v in ranked if math.isfinite(v)]
    return sorted(ranked, key=lambda kv: kv[1])


def _nodes_touching(model: onnx.ModelProto, tensors: set[str]) -> list[str]:
    """Names of the compute nodes (not Q/DQ) that produce or consume any of ``tensors``."""
    names = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if tensors & (set(n.input) | set(n.output)):
            names.append(n.name or n.output[0])
    return names


# ------------------------------------------------------------------------------------------------ main
def _zero_dead_channels(path: Path, rel: float = 1e-5) -> int:
    """Set to exactly 0 the output channels of Conv/Gemm weights whose max |w| is below ``rel`` times the
    tensor's largest channel max (BN-folded "dead" channels, ~1e-8 in EfficientNet-Lite0).

    With per-channel weights such a channel gets a tiny scale, so the int32 bias scale
    ``input_scale * weight_scale`` overflows and onnxruntime clips the bias (its weight-scale adjustment
    only exists for int8 weights). An all-zero channel gets scale 1 instead and keeps its bias exactly;
    the change to the float function is below ``rel`` of the layer's weights. Returns channels zeroed."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    zeroed = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 0 for a in node.attribute):
            continue  # channel axis would be 1; left alone
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        dead = (amax > 0) & (amax < rel * amax.max())
        if dead.any():
            w = w.copy()
            w[dead] = 0.0
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
            zeroed += int(dead.sum())
    if zeroed:
        onnx.save(model, str(path))
    return zeroed


def _io_ranges(fp32_path: Path, calib: dict[str, np.ndarray], batch_size: int) -> dict[str, tuple[float, float]]:
    """MinMax ranges of the graph inputs (from ``calib``) and outputs (running the float graph)."""
    import onnxruntime as ort

    ranges = {k: (float(v.min()), float(v.max())) for k, v in calib.items()}
    sess = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    lo = {n: math.inf for n in names}
    hi = {n: -math.inf for n in names}
    n = len(next(iter(calib.values())))
    for s in range(0, n, batch_size):
        outs = sess.run(names, {k: np.ascontiguousarray(v[s : s + batch_size]) for k, v in calib.items()})
        for name, o in zip(names, outs):
            lo[name], hi[name] = min(lo[name], float(o.min())), max(hi[name], float(o.max()))
    ranges.update({k: (lo[k], hi[k]) for k in names})
    return ranges


def quantize_graph(
    fp32_path: str | Path,
    int8_path: str | Path,
    calib: dict[str, np.ndarray],
    config: QuantConfig = QuantConfig(),
    progress: bool = True,
    float_outputs: tuple[str, ...] = (),
) -> dict:
    """Quantize the float ONNX graph ``fp32_path`` to a QDQ int8 graph at ``int8_path``.

    calib: graph input name -> float32 array ``(N, ...)`` of N real calibration samples in the graph's
        layout (images: NCHW, preprocessed exactly as at inference; a tail segment: the real intermediate
        tensors the float head produces on calibration images). All inputs need the same N.
    Returns the manifest ``quantization`` dict (``docs/bundle.md``)::

        {"scheme": "QDQ", "activations": "uint8", "weights": "uint8", "per_channel": True,
         "calibration": "minmax", "samples": N, "reduce_range": False,
         "float_nodes": [nodes computing in float/16-bit], "wide_tensors": {tensor: "uint16"},
         "io": {tensor: {"dtype": "uint8", "scale": float, "zero_point": int}}}   # every graph input/output

    float_outputs: graph outputs whose producing node stays float and whose value is not quantised —
        classifier logits: an 8-bit grid on the logits flips the top-1 between near-tied classes, while the
        final layer costs well under 1 % of the FLOPs.

    Raises ``ValueError`` for empty calibration data, NaN/Inf samples or a shape that does not match the
    graph input; warns when fewer than 8 samples are given.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    model = onnx.load(str(fp32_path), load_external_data=False)
    calib, n = _validate_calib(model, calib)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.method]
    extra = dict(config.extra_options)
    wide_type = QuantType.QUInt16 if config.activation_type == "uint8" else QuantType.QInt16

    with tempfile.TemporaryDirectory(prefix="eetool-quant-") as tmp:
        tmp = Path(tmp)
        src = fp32_path
        if config.preprocess:
            src = tmp / "pre.onnx"
            quant_pre_process(str(fp32_path), str(src))
        if config.zero_dead_channels:
            if src == fp32_path:
                src = tmp / "pre.onnx"
                onnx.save(onnx.load(str(fp32_path)), str(src))
            _zero_dead_channels(src)
        src_nodes = onnx.load(str(src), load_external_data=False).graph.node
        if extra.get("TensorQuantOverrides"):
            extra["TensorQuantOverrides"] = _through_same_encoding_ops(src_nodes, extra["TensorQuantOverrides"])
        unknown = set(config.float_nodes) - {nd.name for nd in src_nodes}
        if unknown:  # before the calibration pass, which takes minutes on real data
            weighted = [nd.name for nd in src_nodes if nd.op_type in ("Conv", "Gemm", "MatMul")]
            raise ValueError(f"QuantConfig.float_nodes: no nodes {sorted(unknown)} in {fp32_path.name} (names after "
                             f"quant_pre_process; its weighted nodes: {weighted[:8]}{' ...' if len(weighted) > 8 else ''})")
        keep_float = [nd.name for nd in src_nodes if set(nd.output) & set(float_outputs)]
        keep_float += [nd.name for nd in src_nodes if nd.op_type == "Conv"][: config.float_first_convs]
        keep_float += [n for n in config.float_nodes if n not in keep_float]

        cache = tmp / "calibration.json"  # ranges computed once, read by every quantize_static pass
        _calibrate(src, calib, config, cache, progress, f"calibrating {fp32_path.name} ({config.method})")

        clipped: set[str] = set()

        class _CountBiasClips(logging.Filter):
            # onnxruntime logs one root-logger warning per clipped bias; count them into the report instead
            def filter(self, record):
                msg = record.getMessage()
                if "exceeds the range of a int32" in msg:
                    clipped.add(msg.split("`")[1] if "`" in msg else msg)
                    return False
                return True

        def run(out: Path, overrides: dict, label: str) -> None:
            counter = _CountBiasClips()
            logging.getLogger().addFilter(counter)
            try:
                _run(out, overrides, label)
            finally:
                logging.getLogger().removeFilter(counter)

        def _run(out: Path, overrides: dict, label: str) -> None:
            opts = dict(extra)
            if overrides:
                opts["TensorQuantOverrides"] = {**opts.get("TensorQuantOverrides", {}), **overrides}
            quantize_static(
                str(src), str(out), _CalibReader(calib, config.batch_size, progress, label),
                quant_format=QuantFormat.QDQ, per_channel=config.per_channel, reduce_range=config.reduce_range,
                activation_type=_qtype(config.activation_type), weight_type=_qtype(config.weight_type),
                calibrate_method=method, extra_options=opts, calibration_cache_path=str(cache),
                nodes_to_exclude=keep_float,
            )

        wide: list[str] = []
        ranked: list = []
        if config.sensitive_float > 0:
            first = tmp / "pass1.int8.onnx"
            run(first, {}, f"calibrating {fp32_path.name}")
            k = min(config.sensitivity_samples, n)
            ranked = sensitivity_ranking(src, first, {a: v[:k] for a, v in calib.items()}, tmp)
            wide = [t for t, _ in ranked[: config.sensitive_float]]
        run(int8_path, {t: [{"quant_type": wide_type}] for t in wide}, f"calibrating {fp32_path.name}")
        bias_info = None
        if config.bias_correction:
            from .bias_correction import correct_biases

            k = min(config.bias_correction_samples, n)
            bias_info = correct_biases(src, int8_path, {a: v[:k] for a, v in calib.items()}, batch=config.batch_size)
        if config.sequential_bias_correction:
            from .bias_correction import correct_biases_sequential

            k = min(config.bias_correction_samples, n)
            seq = correct_biases_sequential(src, int8_path, {a: v[:k] for a, v in calib.items()},
                                            batch=config.batch_size, progress=progress)
            bias_info = {**(bias_info or {}), "sequential": seq}

    qmodel = onnx.load(str(int8_path), load_external_data=False)
    io_names = list(_graph_inputs(qmodel)) + [o.name for o in qmodel.graph.output if o.name not in float_outputs]
    missing = [t for t in io_names if _io_quantize_node(qmodel, t) is None]
    if missing:  # only those: the float_outputs stay float
        ranges = _io_ranges(fp32_path, calib, config.batch_size)
        _add_io_qdq(qmodel, {t: ranges[t] for t in missing}, config.activation_type,
                    extra.get("TensorQuantOverrides", {}))
        onnx.save(qmodel, str(int8_path))
    io = {t: _qparams_of(qmodel, _io_quantize_node(qmodel, t)) for t in io_names}
    return {
        "scheme": "QDQ",
        "activations": config.activation_type,
        "weights": config.weight_type,
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "calibration": config.method,
        "samples": n,
        "float_nodes": _nodes_touching(qmodel, set(wide)) + keep_float,
        # biases onnxruntime clipped to int32 (BN-folded channels with ~0 weights; see zero_dead_channels)
        "clipped_biases": sorted(clipped),
        "wide_tensors": {t: ("uint16" if config.activation_type == "uint8" else "int16") for t in wide},
        "bias_correction": bias_info,
        # qdq_loss_debug's per-tensor SQNR (dB, lowest first) that chose wide_tensors
        "sensitivity": [[t, round(v, 2)] for t, v in ranked[:10]],
        "io": io,
        "config": _jsonable(asdict(config)),
    }


def _jsonable(o):
    """``o`` with numpy scalars / arrays (e.g. pinned scales in TensorQuantOverrides) as Python numbers."""
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o.tolist() if isinstance(o, (np.ndarray, np.generic)) else o

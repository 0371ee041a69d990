"""toolkit.quantize_onnx on a small real case: EfficientNet-Lite0 (real ImageNet weights) up to ``blocks.2``,
calibrated on 32 real ImageNet sample images and checked on 16 other ones."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
Image = pytest.importorskip("PIL.Image")

from toolkit.quantize_onnx import QuantConfig, quantize_graph, tensor_qparams  # noqa: E402

N_CALIB, N_EVAL = 32, 16


@pytest.fixture(scope="module")
def images(imagenet_source) -> np.ndarray:
    """48 real images spread over the classes of the ImageNet samples; on a fresh clone without them, the
    5 photos shipped in scikit-image with flipped and shifted copies (still real pixels, not noise)."""
    from calibration.readers import read_dataset
    from toolkit.sources import IMAGENET_PREPROCESS

    ds = read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=N_CALIB + N_EVAL, spread=True)
    x = ds.x
    while len(x) < N_CALIB + N_EVAL:
        x = np.concatenate([x, np.roll(x[:, :, :, ::-1], 7 * len(x), axis=3)])
    rng = np.random.default_rng(0)
    return x[rng.permutation(len(x))][: N_CALIB + N_EVAL]


@pytest.fixture(scope="module")
def head_fp32(tmp_path_factory) -> Path:
    from torch import nn

    from toolkit.models.efficientnet_lite import efficientnet_lite0

    m = efficientnet_lite0()
    head = nn.Sequential(m.stem, *m.blocks[:3]).eval()
    path = tmp_path_factory.mktemp("q") / "head.fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            head, torch.zeros(2, 3, 224, 224), str(path), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["blocks.2"],
            dynamic_axes={"input": {0: "N"}, "blocks.2": {0: "N"}},
        )
    return path


@pytest.fixture(scope="module")
def quantized(head_fp32, images):
    out = head_fp32.with_name("head.int8.onnx")
    info = quantize_graph(head_fp32, out, {"input": images[:N_CALIB]}, QuantConfig(), progress=False)
    return out, info


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_int8_head_matches_float_on_held_out_images(head_fp32, quantized, images):
    int8_path, _ = quantized
    x = images[N_CALIB:]
    ref, got = _run(head_fp32, x), _run(int8_path, x)
    assert got.shape == ref.shape == (N_EVAL, 24, 56, 56)
    a, b = ref.reshape(N_EVAL, -1), got.reshape(N_EVAL, -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98, cos


def test_manifest_and_output_qparams(quantized, images):
    int8_path, info = quantized
    assert info["scheme"] == "QDQ" and info["samples"] == N_CALIB
    assert set(info["io"]) == {"input", "blocks.2"}
    qp = tensor_qparams(int8_path, "blocks.2")
    assert qp == info["io"]["blocks.2"]
    assert qp["dtype"] in ("uint8", "int8") and qp["scale"] > 0 and isinstance(qp["zero_point"], int)
    # the graph ends with QuantizeLinear -> DequantizeLinear on its output
    model = onnx.load(str(int8_path))
    last = {o for n in model.graph.node for o in n.output if n.op_type == "DequantizeLinear"}
    assert "blocks.2" in last
    # the range covers the real outputs: ReLU-free block output, so both signs
    lo = (0 - qp["zero_point"]) * qp["scale"] if qp["dtype"] == "uint8" else (-128 - qp["zero_point"]) * qp["scale"]
    assert lo < 0


def test_all_zero_and_partial_batch(head_fp32, images, tmp_path):
    calib = np.concatenate([np.zeros((16, 3, 224, 224), np.float32), images[:9]])  # batch 16: 1 zero + 1 partial
    cfg = QuantConfig(sensitive_float=0, batch_size=16)
    info = quantize_graph(head_fp32, tmp_path / "z.onnx", {"input": calib}, cfg, progress=False)
    assert info["samples"] == 25 and info["io"]["blocks.2"]["scale"] > 0


def test_errors(head_fp32, images, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="empty"):
        quantize_graph(head_fp32, out, {}, progress=False)
    bad = images[:10].copy()
    bad[3, 0, 0, 0] = np.nan
    bad[7, 1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="2 of 10 samples"):
        quantize_graph(head_fp32, out, {"input": bad}, progress=False)
    with pytest.raises(ValueError, match=r"expects \(N, 3, 224, 224\)"):
        quantize_graph(head_fp32, out, {"input": images[:10, :, :200]}, progress=False)
    with pytest.raises(ValueError, match="graph inputs"):
        quantize_graph(head_fp32, out, {"image": images[:10]}, progress=False)
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="kl")


def test_few_samples_warn(head_fp32, images, tmp_path):
    with pytest.warns(UserWarning, match="only 4 calibration samples"):
        quantize_graph(head_fp32, tmp_path / "f.onnx", {"input": images[:4]}, QuantConfig(sensitive_float=0), progress=False)


def test_sensitive_tensors_kept_16bit(head_fp32, images, tmp_path):
    out = tmp_path / "s.onnx"
    info = quantize_graph(head_fp32, out, {"input": images[:N_CALIB]}, QuantConfig(sensitive_float=2, sensitivity_samples=4),
                          progress=False)
    assert len(info["wide_tensors"]) == 2 and info["float_nodes"]
    assert not set(info["wide_tensors"]) & {"input", "blocks.2"}  # the wire tensors stay 8-bit
    assert tensor_qparams(out, "blocks.2")["dtype"] == "uint8"
    x = images[N_CALIB:]
    a, b = _run(head_fp32, x).reshape(N_EVAL, -1), _run(out, x).reshape(N_EVAL, -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98


def test_named_nodes_stay_float(head_fp32, images, tmp_path):
    """float_nodes: the named Conv reads a float weight (no DequantizeLinear feeds it), every other Conv
    stays int8; a name the graph does not have is refused with the name."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(head_fp32), str(pre))
    convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
    keep = convs[3]
    out = tmp_path / "f.onnx"
    info = quantize_graph(head_fp32, out, {"input": images[:N_CALIB]}, QuantConfig(float_nodes=(keep,)), progress=False)
    assert keep in info["float_nodes"]
    model = onnx.load(str(out))
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    weight_src = {n.name: made_by.get(n.input[1]) for n in model.graph.node if n.op_type == "Conv"}
    assert weight_src[keep] is None  # an initializer: float weights
    assert all(v == "DequantizeLinear" for k, v in weight_src.items() if k != keep) and len(weight_src) == len(convs)
    with pytest.raises(ValueError, match="no nodes .'nope'. .* weighted nodes: .'/"):
        quantize_graph(head_fp32, tmp_path / "g.onnx", {"input": images[:N_CALIB]}, QuantConfig(float_nodes="nope"),
                       progress=False)


def test_runtime_sessions_keep_float_nodes_float(head_fp32, images, tmp_path):
    """A QDQ graph with its stem conv kept float runs in the runtime's session as its QDQ semantics say
    (onnxruntime with every graph optimisation off); onnxruntime's default session quantises that conv's
    float weights itself (the WeightBiasQuantization transformer) and lands measurably further away."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from runtime.backends import OrtSession

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(head_fp32), str(pre))
    stem = next(n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv")
    out = tmp_path / "stem-float.onnx"
    quantize_graph(head_fp32, out, {"input": images[:N_CALIB]}, QuantConfig(float_nodes=(stem,)), progress=False)
    x = images[N_CALIB:]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ours = OrtSession(out).run({"input": x})["blocks.2"]
    default = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = _run(head_fp32, x)

    def rel(a):
        return float(np.linalg.norm(a - exact) / np.linalg.norm(exact))

    assert rel(ours) < 1e-2, rel(ours)  # integer kernels vs float-simulated QDQ: rounding only
    assert rel(default) > 5 * rel(ours), (rel(default), rel(ours))
    err = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(ours) < err(default)


# ------------------------------------------------------------------ calibration methods (issue 12, item 4)
def _activation_ranges(path: Path) -> dict[str, tuple[float, float]]:
    """Real range [lo, hi] of every per-tensor 8-bit QuantizeLinear in a QDQ graph, by tensor name."""
    model = onnx.load(str(path))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[1] in init and init[n.input[1]].size == 1:
            s, z = float(init[n.input[1]]), int(init[n.input[2]])
            # a graph output's quantizer reads "<output>_QuantizeLinear_Input": name it by the output
            out[n.input[0].removesuffix("_QuantizeLinear_Input")] = ((0 - z) * s, (255 - z) * s)
    return out


def _float_values(path: Path, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The float graph's values of the tensors ``names`` on ``x`` (made graph outputs)."""
    model = onnx.load(str(path))
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    names = [t for t in names if t in known]
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in names if t not in outputs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, {"input": x})))


@pytest.fixture(scope="module")
def stem_fp32(tmp_path_factory) -> Path:
    """EfficientNet-Lite0 (real weights) up to blocks.0: ReLU6-bounded tensors and the unbounded,
    heavy-tailed output of the block's projection conv."""
    from torch import nn

    from toolkit.models.efficientnet_lite import efficientnet_lite0

    m = efficientnet_lite0()
    path = tmp_path_factory.mktemp("q") / "stem.fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Sequential(m.stem, m.blocks[0]).eval(), torch.zeros(2, 3, 224, 224), str(path),
                          dynamo=False, opset_version=17, input_names=["input"], output_names=["blocks.0"],
                          dynamic_axes={"input": {0: "N"}, "blocks.0": {0: "N"}})
    return path


def test_histogram_methods_clip_heavy_tails_for_any_sample_count(stem_fp32, images, tmp_path):
    # 13 samples in batches of 8: the last batch is partial (onnxruntime's histogram collector used to fail
    # with "inhomogeneous shape"), and entropy used to return exactly the MinMax range of every tensor.
    x = images[:13]
    ranges = {}
    for method in ("minmax", "entropy", "percentile"):
        cfg = QuantConfig(method=method, batch_size=8)
        info = quantize_graph(stem_fp32, tmp_path / f"{method}.onnx", {"input": x}, cfg, progress=False)
        assert info["calibration"] == method and info["samples"] == 13
        ranges[method] = _activation_ranges(tmp_path / f"{method}.onnx")
    minmax = ranges["minmax"]
    values = _float_values(stem_fp32, list(minmax), x)
    # heavy-tailed: the extreme values lie far beyond the bulk (max |x| > 1.3 x the 99.99th percentile of |x|)
    heavy = [t for t, v in values.items() if np.abs(v).max() > 1.3 * np.percentile(np.abs(v), 99.99)]
    assert heavy, {t: float(np.abs(v).max()) for t, v in values.items()}
    width = {m: {t: r[t][1] - r[t][0] for t in heavy} for m, r in ranges.items()}
    for method in ("entropy", "percentile"):
        assert all(width[method][t] < 0.97 * width["minmax"][t] for t in heavy), (method, width)
    for method in ("entropy", "percentile"):
        for t in heavy:
            (lo, hi), (mlo, mhi) = ranges[method][t], minmax[t]
            # never wider than the values seen, and still covering the bulk of them
            assert mlo - 1e-3 <= lo and hi <= mhi + 1e-3, (method, t)
            assert lo <= np.percentile(values[t], 1) and hi >= np.percentile(values[t], 99), (method, t)
    # ReLU6 outputs (bounded, values piled up at 6) keep their range under entropy: it is not a blanket shrink
    bounded = [t for t, (lo, hi) in minmax.items() if abs(lo) < 1e-6 and abs(hi - 6.0) < 1e-3]
    assert bounded and all(abs(ranges["entropy"][t][1] - 6.0) < 0.1 for t in bounded)


def test_num_bins_must_leave_entropy_a_choice():
    with pytest.raises(ValueError, match="num_bins"):
        QuantConfig(method="entropy", num_bins=128, num_quantized_bins=128)


def test_unquantised_graph_output_gets_its_qdq_pair(head_fp32, images, tmp_path):
    """A graph whose output comes from an op onnxruntime does not quantise (Softplus): eetool adds the
    output's Q/DQ pair itself, with the MinMax range of the real outputs, and float_outputs stay float."""
    from onnx import helper

    model = onnx.load(str(head_fp32))
    last = model.graph.output[0].name
    for n in model.graph.node:
        n.output[:] = ["pre_softplus" if o == last else o for o in n.output]
    model.graph.node.append(helper.make_node("Softplus", ["pre_softplus"], [last]))
    path = tmp_path / "softplus.fp32.onnx"
    onnx.save(model, str(path))
    x = images[:N_CALIB]
    info = quantize_graph(path, tmp_path / "sp.int8.onnx", {"input": x}, QuantConfig(), progress=False)
    qp = tensor_qparams(tmp_path / "sp.int8.onnx", last)
    assert info["io"][last] == qp
    # onnxruntime left it unquantised: the pair is eetool's fallback
    assert f"{last}_io_Q" in {n.name for n in onnx.load(str(tmp_path / "sp.int8.onnx")).graph.node}
    ref = _run(path, x)
    lo, hi = (0 - qp["zero_point"]) * qp["scale"], (255 - qp["zero_point"]) * qp["scale"]
    assert lo <= min(0.0, ref.min()) + 1e-6 and hi >= ref.max() - qp["scale"]  # the real range, 0 included
    assert hi <= ref.max() + qp["scale"]
    got = _run(tmp_path / "sp.int8.onnx", images[N_CALIB:])
    assert np.abs(got - _run(path, images[N_CALIB:])).max() < 0.5 * (ref.max() - ref.min())
    # kept float when asked (classifier logits): no QuantizeLinear on it
    quantize_graph(path, tmp_path / "spf.int8.onnx", {"input": x}, QuantConfig(), progress=False,
                   float_outputs=(last,))
    with pytest.raises(KeyError):
        tensor_qparams(tmp_path / "spf.int8.onnx", last)

"""Slicing plain ONNX models by tensor name where the graph does not make it easy: a cut tensor made by a
contrib op (no type or shape in the model), tensors read only inside If bodies, model-local functions."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calibration.readers import Dataset
from toolkit.export import ExportOptions, export_bundle
from toolkit.graph import SplitError
from toolkit.onnx_graph import Order
from toolkit.onnx_slice import crossing, onnx_split_table
from toolkit.sources import resolve

ort = pytest.importorskip("onnxruntime")


def export_onnx_bundle(path, split, out, x=None):
    """Export the ONNX model at ``path`` (preprocessing none, input size from the model) on arrays ``x``."""
    src = resolve(str(path))
    if x is None:
        x = np.random.default_rng(0).standard_normal((4, *src.input_shape[1:])).astype(np.float32)
    ds = Dataset(x, None, [f"x[{i}]" for i in range(len(x))], "arrays")
    return export_bundle(src, ExportOptions(split=split, out=out, progress=False, layer_profile_graph=False), ds, ds)


def _whole(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def photos():
    """Real photos at 64 x 64 (ImageNet normalisation)."""
    from calibration.readers import read_dataset
    from toolkit.sources import IMAGENET_PREPROCESS

    return read_dataset("samples", {**IMAGENET_PREPROCESS, "crop": [64, 64], "resize_shorter": 73}).x


@pytest.fixture(scope="module")
def gelu_model(tmp_path_factory):
    """A conv net whose GELUs onnxruntime's transformer optimiser fused into com.microsoft Gelu nodes, as
    in models optimised for onnxruntime: ONNX shape inference knows nothing after the first Gelu."""
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.GELU(),
                              torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.GELU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    d = tmp_path_factory.mktemp("gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, 64, 64), str(d / "erf.onnx"), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": {0: "N"}, "scores": {0: "N"}})
    m = OnnxModel(onnx.load(str(d / "erf.onnx")))
    FusionGelu(m).apply()
    m.prune_graph()
    m.topological_sort()
    m.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(m.model, str(d / "gelu.onnx"))
    return d / "gelu.onnx"


def test_cut_after_contrib_op_gets_type_and_shape_from_a_probe(gelu_model, photos, tmp_path):
    model = onnx.load(str(gelu_model))
    gelus = [n.output[0] for n in model.graph.node if n.op_type == "Gelu" and n.domain == "com.microsoft"]
    assert len(gelus) == 2
    inferred = {v.name for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    assert not set(gelus) & inferred  # the model says nothing about them: the case to handle
    report = export_onnx_bundle(gelu_model, [gelus[1]], tmp_path / "b", photos)
    import json

    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["tensors"][gelus[1]]["shape"] == [None, 32, 16, 16]
    assert manifest["tensors"][gelus[1]]["dtype"] == "float32"
    assert report["verification"]["chains"]["onnx/fp32"]["batch_n"]["max_abs_diff"] < 1e-5
    # the segments keep a dynamic batch: run them at another batch size than the probe's
    head = ort.InferenceSession(str(tmp_path / "b" / "graphs" / "seg0.fp32.onnx"))
    tail = ort.InferenceSession(str(tmp_path / "b" / "graphs" / "seg1.fp32.onnx"))
    x = np.concatenate([photos, photos[:2]])
    feat = head.run(None, {"image": x})[0]
    np.testing.assert_allclose(tail.run(None, {gelus[1]: feat})[0], _whole(gelu_model, x), atol=1e-5)
    # inspect measures the shapes the model leaves out instead of printing 4-byte cuts
    rows = {r["name"]: r for r in onnx_split_table(gelu_model)["rows"]}
    assert rows[gelus[0]]["shape"] == [None, 16, 32, 32] and rows[gelus[0]]["bytes_fp32"] == 4 * 16 * 32 * 32
    assert rows[gelus[1]]["bytes_int8"] == 32 * 16 * 16


def _loop_model(path):
    """x -> Conv -> t1 -> Conv -> t2; Loop (2 iterations) from t2 whose body adds t1, read only inside the
    body: y = t2 + 2 t1; then a model-local function Scale(y) = y * s, pooling and a classifier."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w1b"),
             numpy_helper.from_array(np.array(2, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "go"),
             numpy_helper.from_array(np.array(1.5, np.float32), "s"),
             numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(2, np.float32), "b2")]
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "t1"], ["v_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    scale = helper.make_function("local.fn", "Scale", ["v", "k"], ["r"], [helper.make_node("Mul", ["v", "k"], ["r"])],
                                 [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["t1"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Conv", ["t1", "w1b"], ["t2"], name="conv2"),
             helper.make_node("Loop", ["trips", "go", "t2"], ["y"], body=body, name="loop"),
             helper.make_node("Scale", ["y", "s"], ["z"], domain="local.fn", name="scale"),
             helper.make_node("GlobalAveragePool", ["z"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["out"], transB=1, name="fc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)],
                              functions=[scale])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("cut,carried", [("t2", ["t1", "t2"]), ("y", ["y"]), ("z", ["z"])])
def test_subgraph_reads_and_local_functions_are_carried(tmp_path, cut, carried):
    path = _loop_model(tmp_path / "loop.onnx")
    # t1 is read only inside the Loop body: it still crosses a cut between its producer and the Loop
    assert crossing(onnx.load(str(path)), cut) == carried
    x = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    report = export_onnx_bundle(path, [cut], tmp_path / "b", x)
    assert report["verification"]["chains"]["onnx/fp32"]["batch_n"]["max_abs_diff"] < 1e-5
    head = ort.InferenceSession(str(tmp_path / "b" / "graphs" / "seg0.fp32.onnx"))
    tail = ort.InferenceSession(str(tmp_path / "b" / "graphs" / "seg1.fp32.onnx"))
    assert [i.name for i in tail.get_inputs()] == carried
    feats = dict(zip([o.name for o in head.get_outputs()], head.run(None, {"x": x})))
    got = tail.run(None, {i.name: feats[i.name] for i in tail.get_inputs()})[0]
    np.testing.assert_allclose(got, _whole(path, x), atol=1e-5)
    segs = [onnx.load(str(tmp_path / "b" / "graphs" / f"seg{k}.fp32.onnx")) for k in (0, 1)]
    # the function travels with the segment that calls it, and only there
    assert [len(m.functions) for m in segs] == ([0, 1] if cut != "z" else [1, 0])


def test_cut_inside_a_subgraph_or_carrying_a_bool_is_refused(tmp_path):
    path = _loop_model(tmp_path / "loop.onnx")
    with pytest.raises(SplitError, match=r"'v_out' is computed inside a subgraph .* of node 'loop'"):
        Order.of(onnx.load(str(path))).crossing("v_out")
    nodes = [helper.make_node("Greater", ["x", "zero"], ["mask"]), helper.make_node("Cast", ["mask"], ["m"], to=1),
             helper.make_node("Mul", ["x", "m"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mask.onnx"))
    with pytest.raises(SplitError, match=r"mask \(bool\) crosses the cut at 'mask'; .* float32 tensors only"):
        export_onnx_bundle(tmp_path / "mask.onnx", ["mask"], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_probe_that_cannot_run_names_the_tensor(tmp_path):
    """An operator neither ONNX nor onnxruntime knows: a clear error naming the tensor, not a traceback."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Mystery", ["a"], ["b"], domain="vendor.ops"),
             helper.make_node("Relu", ["b"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("vendor.ops", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(SplitError, match=r"the type and shape of b are not in the model .* probe run in onnxruntime"):
        export_onnx_bundle(tmp_path / "m.onnx", ["b"], tmp_path / "b")
    assert not (tmp_path / "b").exists()

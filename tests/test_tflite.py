"""TFLite export (float and full-integer int8) of real EfficientNet-Lite0 graphs and the LiteRT runtime backend.

Head = stem .. blocks.2 (input -> blocks.2, (N,24,56,56)), tail = blocks.3 .. blocks.5 (blocks.2 -> blocks.5,
(N,80,14,14)); real ImageNet sample JPEGs for calibration and checks."""
from __future__ import annotations

import ast
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")

from runtime.backend_litert import LiteRTSession  # noqa: E402
from toolkit.export_tflite import TFLiteConversionError, export_float, quantize_int8, tflite_name  # noqa: E402

@pytest.fixture(scope="module")
def images(imagenet_source):
    """32 real images spread over the classes (on a fresh clone: scikit-image's photos, flipped and shifted
    copies to make up the count): 16 for calibration, 16 to check."""
    from calibration.readers import read_dataset
    from toolkit.sources import IMAGENET_PREPROCESS

    x = read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=32, spread=True).x
    while len(x) < 32:
        x = np.concatenate([x, np.roll(x[:, :, :, ::-1], 7 * len(x), axis=3)])
    return x[:16], x[16:32]


@pytest.fixture(scope="module")
def parts():
    from toolkit.models.efficientnet_lite import efficientnet_lite0

    torch.set_num_threads(2)
    m = efficientnet_lite0()
    head = nn.Sequential(m.stem, *m.blocks[:3]).eval()
    tail = nn.Sequential(*m.blocks[3:6]).eval()
    return head, tail


@pytest.fixture(scope="module")
def exported(tmp_path_factory, parts, images):
    head, tail = parts
    calib, _ = images
    d = tmp_path_factory.mktemp("tflite")
    x = torch.from_numpy(calib[:2])
    with torch.no_grad():
        f = head(x)
    eh = export_float(head, (x,), str(d / "head.fp32.tflite"), ["input"], ["blocks.2"])
    et = export_float(tail, (f,), str(d / "tail.fp32.tflite"), ["blocks.2"], ["blocks.5"])
    return d, eh, et


@pytest.fixture(scope="module")
def quantized(exported, parts, images):
    d, eh, et = exported
    head, _ = parts
    calib, _ = images
    qh = quantize_int8(eh["file"], str(d / "head.int8.tflite"), {"input": calib}, name_map=eh["name_map"])
    with torch.no_grad():
        feats = head(torch.from_numpy(calib)).numpy()  # real float-head outputs, never images or noise
    qt = quantize_int8(et["file"], str(d / "tail.int8.tflite"), {"blocks.2": feats}, name_map=et["name_map"])
    return qh, qt


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_float_entry_names_layout_batch(exported):
    _, eh, et = exported
    assert os.path.getsize(eh["file"]) > 0
    (i,), (o,) = eh["inputs"], eh["outputs"]
    assert (i["name"], i["tflite_name"], i["dtype"], i["layout"], i["shape"]) == (
        "input", "input", "float32", "NCHW", [1, 3, 224, 224])
    assert (o["name"], o["tflite_name"], o["layout"], o["shape"]) == ("blocks.2", "blocks_2", "NCHW", [1, 24, 56, 56])
    assert eh["batch"] == 1 and eh["precision"] == "fp32" and eh["quantization"] is None
    assert eh["name_map"] == {"input": "input", "blocks.2": tflite_name("blocks.2")}
    assert et["inputs"][0]["name"] == "blocks.2" and et["outputs"][0]["shape"] == [1, 80, 14, 14]
    assert eh["max_abs_diff"] < 1e-3 and et["max_abs_diff"] < 1e-3


def test_float_tflite_matches_pytorch_on_real_images(exported, parts, images):
    _, eh, et = exported
    head, tail = parts
    _, check = images
    hs = LiteRTSession(eh["file"], threads=2, name_map=eh["name_map"])
    ts = LiteRTSession(et["file"], threads=2, name_map=et["name_map"])
    with torch.no_grad():
        f_ref = head(torch.from_numpy(check))
        t_ref = tail(f_ref).numpy()
    f = hs.run({"input": check})["blocks.2"]  # batch 16 on a batch-1 graph: the session loops
    t = ts.run({"blocks.2": f})["blocks.5"]
    assert f.shape == (16, 24, 56, 56) and f.dtype == np.float32
    assert np.abs(f - f_ref.numpy()).max() < 1e-3
    assert np.abs(t - t_ref).max() < 1e-3


def test_int8_head_full_integer_io_and_close_to_float(exported, quantized, parts, images):
    d, eh, _ = exported
    qh, _ = quantized
    head, _ = parts
    _, check = images
    assert qh["scheme"] == "full-integer" and qh["samples"] == 16
    for name in ("input", "blocks.2"):
        io = qh["io"][name]
        assert io["dtype"] == "int8" and io["scale"] > 0 and -128 <= io["zero_point"] <= 127
    hs = LiteRTSession(str(d / "head.int8.tflite"), threads=2, name_map=eh["name_map"])
    assert hs.input_quantization()["input"]["dtype"] == "int8"
    assert hs.output_quantization()["blocks.2"]["scale"] == pytest.approx(qh["io"]["blocks.2"]["scale"])
    out = hs.run({"input": check})["blocks.2"]  # float in, dequantised float out
    assert out.dtype == np.float32
    with torch.no_grad():
        ref = head(torch.from_numpy(check)).numpy()
    assert _cos(out, ref).min() > 0.98


def test_tail_calibrated_on_head_outputs_shares_wire_qparams(exported, quantized, parts, images):
    d, eh, et = exported
    qh, qt = quantized
    head, tail = parts
    _, check = images
    h_out, t_in = qh["io"]["blocks.2"], qt["io"]["blocks.2"]
    # Same images -> same range (float TFLite head vs PyTorch head differ by ~1e-5, i.e. float32 rounding)
    assert t_in["zero_point"] == h_out["zero_point"]
    assert t_in["scale"] == pytest.approx(h_out["scale"], rel=1e-5)
    # int8 straight through the wire: head run_quantized -> tail run_quantized, no requantisation
    hs = LiteRTSession(str(d / "head.int8.tflite"), threads=2, name_map=eh["name_map"])
    ts = LiteRTSession(str(d / "tail.int8.tflite"), threads=2, name_map=et["name_map"])
    from runtime.backend_litert import dequantize, quantize

    qi = qh["io"]["input"]
    wire = hs.run_quantized({"input": quantize(check, qi["scale"], qi["zero_point"], np.int8)})["blocks.2"]
    assert wire.dtype == np.int8
    out_q = ts.run_quantized({"blocks.2": wire})["blocks.5"]
    assert out_q.dtype == np.int8
    out = dequantize(out_q, qt["io"]["blocks.5"]["scale"], qt["io"]["blocks.5"]["zero_point"])
    with torch.no_grad():
        ref = tail(head(torch.from_numpy(check))).numpy()
    assert _cos(out, ref).min() > 0.95


def test_fixed_io_pins_tail_input_to_head_output(exported, quantized, parts, images, tmp_path):
    _, _, et = exported
    qh, _ = quantized
    head, _ = parts
    calib, _ = images
    with torch.no_grad():
        feats = head(torch.from_numpy(calib[:8])).numpy()
    want = {k: qh["io"]["blocks.2"][k] for k in ("scale", "zero_point")}
    qt = quantize_int8(et["file"], str(tmp_path / "t.tflite"), {"blocks.2": feats}, name_map=et["name_map"],
                       fixed_io={"blocks.2": want})
    assert qt["io"]["blocks.2"]["zero_point"] == want["zero_point"]
    assert qt["io"]["blocks.2"]["scale"] == pytest.approx(want["scale"], rel=1e-6)


def test_session_binds_by_name(exported):
    _, eh, _ = exported
    s = LiteRTSession(eh["file"], threads=1, name_map=eh["name_map"])
    assert s.input_names == ["input"] and s.output_names == ["blocks.2"] and s.batch == 1
    with pytest.raises(KeyError, match="blocks.2"):
        s.run({"blocks.2": np.zeros((1, 3, 224, 224), np.float32)})
    with pytest.raises(KeyError):
        LiteRTSession(eh["file"], name_map={"input": "no_such_input"})
    raw = LiteRTSession(eh["file"])  # without a map: the signature names
    assert raw.output_names == ["blocks_2"]
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    batch = s.run({"input": x})["blocks.2"]
    one = s.run({"input": x[1:2]})["blocks.2"]
    np.testing.assert_array_equal(batch[1:2], one)


def test_unsupported_op_names_op_and_module(tmp_path):
    class Odd(nn.Module):
        def forward(self, x):
            return torch.kthvalue(x, 2, dim=-1).values

    m = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), Odd())).eval()
    with pytest.raises(TFLiteConversionError, match=r"aten\.kthvalue.*module '1\.1'"):
        export_float(m, (torch.randn(1, 4, 4),), str(tmp_path / "odd.tflite"), ["input"], ["out"])


def test_missing_interpreter_names_pip_package(monkeypatch, exported):
    _, eh, _ = exported
    for mod in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match="pip install ai-edge-litert"):
        LiteRTSession(eh["file"])


def test_backend_is_board_safe_python38():
    path = os.path.join(os.path.dirname(__file__), "..", "runtime", "backend_litert.py")
    src = open(path).read()
    tree = ast.parse(src, feature_version=(3, 8))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    assert not mods & {"torch", "tensorflow", "onnx", "onnxruntime", "toolkit"}
    assert "from __future__ import annotations" in src


def test_first_convolutions_stay_float_in_the_image_graph(exported, images, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from toolkit.export_tflite import first_convs_float_recipe

    d, eh, _ = exported
    calib, check = images
    recipe = first_convs_float_recipe(eh["file"])
    assert recipe.startswith("static_wi8_ai8_minmax+float:^(?:") and recipe.endswith(");$")
    out = tmp_path / "head.int8.tflite"
    q = quantize_int8(eh["file"], str(out), {"input": calib}, recipe, name_map=eh.get("name_map"))
    it = Interpreter(model_path=str(out))
    dtypes = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    convs = [op for op in it._get_ops_details() if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    assert [dtypes[c["inputs"][0]] for c in convs[:2]] == [np.float32, np.float32]  # the two first: float
    assert all(dtypes[c["inputs"][0]] == np.int8 for c in convs[2:])  # the rest: full integer
    assert q["io"]["input"]["dtype"] == "int8" and q["io"]["blocks.2"]["dtype"] == "int8"
    ref = LiteRTSession(eh["file"], name_map=eh.get("name_map")).run({"input": check[:4]})["blocks.2"]
    got = LiteRTSession(str(out), name_map=eh.get("name_map")).run({"input": check[:4]})["blocks.2"]
    cos = (ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cos > 0.98


def test_classifier_logits_stay_float_in_an_int8_graph(images, tmp_path):
    """float_outputs_recipe: the op computing the logits (and nothing else) stays float, its output is a
    float32 graph output, and the int8 graph's logits track the float graph's; an unknown output name is
    refused with the graph's real outputs listed."""
    from ai_edge_litert.interpreter import Interpreter

    from toolkit.export_tflite import float_outputs_recipe
    from toolkit.models.efficientnet_lite import efficientnet_lite0

    m = efficientnet_lite0().eval()
    clf = nn.Sequential(m.head, m.pool, m.classifier).eval()
    calib, check = images
    with torch.no_grad():  # real inputs: the backbone's features of the photos
        feats = m.blocks(m.stem(torch.from_numpy(np.concatenate([calib, check])))).numpy()
    e = export_float(clf, (torch.from_numpy(feats[:2]),), str(tmp_path / "clf.tflite"), ["features"], ["logits"])
    recipe = float_outputs_recipe(e["file"], ["logits"], e["name_map"])
    assert recipe.startswith("static_wi8_ai8_minmax+float:^(?:") and recipe.count("+float:") == 1
    out = tmp_path / "clf.int8.tflite"
    q = quantize_int8(e["file"], str(out), {"features": feats[:16]}, recipe, name_map=e["name_map"])
    assert q["io"]["logits"]["dtype"] == "float32" and q["io"]["features"]["dtype"] == "int8"
    assert q["scheme"] == "mixed"
    it = Interpreter(model_path=str(out))
    dtypes = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    fc = [op for op in ops if op["op_name"] == "FULLY_CONNECTED"]
    conv = [op for op in ops if op["op_name"] == "CONV_2D"]
    assert len(fc) == 1 and dtypes[fc[0]["outputs"][0]] == np.float32 and dtypes[fc[0]["inputs"][0]] == np.float32
    assert conv and all(dtypes[c["inputs"][0]] == np.int8 for c in conv)  # the 1280-channel conv: int8
    ref = LiteRTSession(e["file"], name_map=e["name_map"]).run({"features": feats[16:]})["logits"]
    got = LiteRTSession(str(out), name_map=e["name_map"]).run({"features": feats[16:]})["logits"]
    assert _cos(ref, got).min() > 0.98
    with pytest.raises(ValueError, match="signature outputs"):
        float_outputs_recipe(e["file"], ["logitz"], e["name_map"])


def test_fixed_batch_graph_runs_a_larger_batch_as_a_loop_and_serve_names_it(exported, images):
    """serve's batches reach a TFLite graph exported at a fixed batch as a loop over slices; serving lists it."""
    from types import SimpleNamespace

    from runtime.serving import fixed_batch_graphs

    d, eh, et = exported
    s = LiteRTSession(str(d / "head.fp32.tflite"), threads=2, name_map=eh["name_map"])
    assert s.batch is not None  # litert-torch keeps the trace batch
    x = np.concatenate([images[1][:s.batch], images[1][:s.batch][:, :, ::-1]])
    whole = s.run({"input": x})["blocks.2"]
    parts = np.concatenate([s.run({"input": x[i:i + s.batch]})["blocks.2"] for i in range(0, len(x), s.batch)])
    assert whole.shape[0] == 2 * s.batch
    np.testing.assert_array_equal(whole, parts)
    chain = SimpleNamespace(segments=[(SimpleNamespace(name="seg0"), s)])
    assert fixed_batch_graphs(chain) == ["seg0"]


def test_int8_pooling_matmuls_follow_their_input(tmp_path):
    """An exit's adaptive pooling exported as two constant matmuls (PoolAsMatmul; square input, so the
    converter shares one constant between a BATCH_MATMUL and a FULLY_CONNECTED) quantises to a graph
    that loads and whose output tracks the float one. With the quantizer's default per-channel constant
    for BATCH_MATMUL the graph was refused at load ("quantized_dimension != 0")."""
    from calibration.fashion_mnist import PREPROCESS
    from calibration.readers import read_dataset
    from toolkit.exits_bundle import PoolAsMatmul

    x = read_dataset("fashion-mnist:test", PREPROCESS, limit=64).x  # (64, 1, 28, 28) real images
    torch.manual_seed(0)
    m = nn.Sequential(PoolAsMatmul(28, 28, 3), nn.Flatten(), nn.Linear(9, 4)).eval()
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    f = export_float(m, (torch.from_numpy(x[:1]),), str(tmp_path / "pool.fp32.tflite"), ["input"], ["out"])
    quantize_int8(f["file"], str(tmp_path / "pool.int8.tflite"), {"input": x}, name_map=f["name_map"])  # ranges of these inputs: no clipping
    s = LiteRTSession(tmp_path / "pool.int8.tflite", name_map=f["name_map"])
    got = np.concatenate([s.run({"input": x[i:i + 1]})["out"] for i in range(len(x))])
    spread = want.max() - want.min()
    assert np.abs(got - want).max() < 0.05 * spread, (np.abs(got - want).max(), spread)
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_int16_logits_recipe_keeps_int8_weights_and_resolves_finer(images, tmp_path):
    """float_outputs_recipe(kind="a16"): the logits' FULLY_CONNECTED computes int16 activations from int8
    weights, the graph output is int16, and its logits are closer to the float graph's than those of the
    plain int8 graph (whose 8-bit steps tie classes)."""
    from ai_edge_litert.interpreter import Interpreter

    from toolkit.export_tflite import float_outputs_recipe
    from toolkit.models.efficientnet_lite import efficientnet_lite0

    m = efficientnet_lite0().eval()
    clf = nn.Sequential(m.head, m.pool, m.classifier).eval()
    calib, check = images
    with torch.no_grad():
        feats = m.blocks(m.stem(torch.from_numpy(np.concatenate([calib, check])))).numpy()
    e = export_float(clf, (torch.from_numpy(feats[:2]),), str(tmp_path / "clf.tflite"), ["features"], ["logits"])
    recipe = float_outputs_recipe(e["file"], ["logits"], e["name_map"], kind="a16")
    assert recipe.count("+a16:") == 1 and "+float:" not in recipe
    q16 = quantize_int8(e["file"], str(tmp_path / "a16.tflite"), {"features": feats[:16]}, recipe, name_map=e["name_map"])
    q8 = quantize_int8(e["file"], str(tmp_path / "i8.tflite"), {"features": feats[:16]}, name_map=e["name_map"])
    assert q16["io"]["logits"]["dtype"] == "int16" and q16["io"]["features"]["dtype"] == "int8"
    assert q16["scheme"] == "full-integer" and q16["activations"].startswith("int16 (selected ops)")
    it = Interpreter(model_path=str(tmp_path / "a16.tflite"))
    dtypes = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    (fc,) = [op for op in it._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"]
    assert dtypes[fc["inputs"][1]] == np.int8 and dtypes[fc["outputs"][0]] == np.int16
    ref = LiteRTSession(e["file"], name_map=e["name_map"]).run({"features": feats[16:]})["logits"]
    got16 = LiteRTSession(str(tmp_path / "a16.tflite"), name_map=e["name_map"]).run({"features": feats[16:]})["logits"]
    got8 = LiteRTSession(str(tmp_path / "i8.tflite"), name_map=e["name_map"]).run({"features": feats[16:]})["logits"]
    assert np.abs(got16 - ref).mean() < np.abs(got8 - ref).mean()
    assert len(np.unique(got16)) > len(np.unique(got8))


def test_sequential_bias_correction_edits_only_biases_and_removes_the_mean_shift(exported, quantized, images,
                                                                                 tmp_path):
    """toolkit.bias_correction_tflite: every int8 conv of the head is corrected in graph order; only bias
    bytes change; the per-channel mean shift against the float graph shrinks on the calibration images and
    on other images; graphs of different networks are refused."""
    import shutil

    from toolkit.bias_correction_tflite import _convs, correct_biases_sequential_tflite

    d, eh, et = exported
    calib, check = images
    before, after = d / "head.int8.tflite", tmp_path / "head.int8.tflite"
    shutil.copy(before, after)
    info = correct_biases_sequential_tflite(eh["file"], after, {"input": calib}, eh["name_map"])
    old, new = bytearray(before.read_bytes()), bytearray(after.read_bytes())
    int8_layers = [c for c in _convs(old) if c["bias"] is not None]
    assert info["layers"] == len(int8_layers) >= 8  # stem .. blocks.2
    assert info["mean_abs_shift_after"] < 0.5 * info["mean_abs_shift"]
    assert len(old) == len(new) and old != new
    for buf in (old, new):  # with every bias zeroed, the files are identical
        for c in _convs(buf):
            if c["bias"] is not None:
                c["bias"][:] = 0
    assert old == new

    def mean_shift(path):
        ref = LiteRTSession(eh["file"], name_map=eh["name_map"]).run({"input": check})["blocks.2"]
        got = LiteRTSession(str(path), name_map=eh["name_map"]).run({"input": check})["blocks.2"]
        return np.abs((got - ref).mean(axis=(0, 2, 3))).mean()

    assert mean_shift(after) < mean_shift(before)
    with pytest.raises(ValueError, match="do not pair"):
        correct_biases_sequential_tflite(et["file"], after, {"input": calib}, eh["name_map"])
    with pytest.raises(ValueError, match="calibration inputs"):
        correct_biases_sequential_tflite(eh["file"], after, {"image": calib}, eh["name_map"])


def test_export_gives_tflite_int8_graphs_int16_logits_and_corrected_biases(predictor_bundle):
    """eetool export's TFLite int8 graphs (Fashion CNN with two exits): every graph output no other graph
    reads (tail and exit logits) is int16, the split features stay int8, and every graph with int8 convs
    or fully connected layers had its biases corrected layer by layer, leaving less mean shift than it removed."""
    from runtime.bundle import Bundle

    out = predictor_bundle[0]
    m = Bundle.load(out).manifest
    owners = [o for o in m.owners if "tflite/int8" in o.graphs]
    assert len(owners) >= 4  # head, tail, two exits
    corrected = 0
    for o in owners:
        q = m.graphs[o.graphs["tflite/int8"]].quantization
        for name in o.outputs:
            assert q.io[name].dtype == ("int8" if name in m.tensors else "int16"), (o.name, name)
        seq = q.bias_correction["sequential"]
        assert q.bias_correction["samples"] >= 1
        if seq["layers"]:  # the head's two convs stay float (first_convs_float_recipe): nothing to correct
            assert seq["mean_abs_shift_after"] < seq["mean_abs_shift"], o.name
            corrected += seq["layers"]
    assert corrected >= 2


def test_eval_agreement_is_against_the_float_chain_of_the_same_format(predictor_bundle):
    """evaluate_bundle: a TFLite int8 chain's agreement is with the TFLite fp32 chain, whatever the order of
    the pairs, and the TFLite fp32 chain's with the ONNX fp32 one (the cross-format check); with no TFLite
    fp32 chain, the int8 chain's is with the ONNX fp32 one; the result keeps the requested order."""
    from calibration.fashion_mnist import PREPROCESS
    from calibration.readers import read_dataset
    from runtime.bundle import Bundle
    from toolkit.evaluate import evaluate_bundle

    b = Bundle.load(predictor_bundle[0])
    test = read_dataset("fashion-mnist:test", PREPROCESS, limit=200)
    r = evaluate_bundle(b, test, batch=100, pairs=["tflite/int8", "onnx/fp32", "tflite/fp32"])["chains"]
    assert list(r) == ["tflite/int8", "onnx/fp32", "tflite/fp32"]
    assert r["tflite/int8"]["agreement_reference"] == "tflite/fp32"
    assert r["tflite/fp32"]["agreement_reference"] == "onnx/fp32" and r["tflite/fp32"]["agreement_with_fp32"] >= 0.99
    assert 0.9 <= r["tflite/int8"]["agreement_with_fp32"] <= 1.0
    r = evaluate_bundle(b, test, batch=100, pairs=["tflite/int8", "onnx/fp32"])["chains"]
    assert r["tflite/int8"]["agreement_reference"] == "onnx/fp32"


def test_sequential_bias_correction_leaves_a_shared_bias_alone_and_refuses_bad_inputs(exported, quantized, images,
                                                                                      tmp_path):
    """A weight-tied 1x1 conv whose two uses read inputs of the same int8 scale shares one bias buffer:
    one value cannot take two corrections, so those layers are left alone and counted. A non-TFLite file,
    an int8 reference and an empty calibration set are refused, the int8 file unchanged."""
    import shutil

    from toolkit.bias_correction_tflite import _convs, correct_biases_sequential_tflite

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.other, self.tied = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            with torch.no_grad():  # both ReLU6 branches saturate: the same [0, 6] range, the same input scale
                self.stem.weight.mul_(20)
                self.other.weight.mul_(20)

        def forward(self, x):
            a = nn.functional.relu6(self.stem(x))
            b = nn.functional.relu6(self.other(a))
            return torch.cat([self.tied(a), torch.relu(self.tied(b))], 1)

    torch.manual_seed(0)
    x = np.random.RandomState(0).rand(16, 3, 16, 16).astype(np.float32)
    e = export_float(Tied().eval(), (torch.from_numpy(x[:1]),), str(tmp_path / "t.fp32.tflite"), ["input"], ["out"])
    quantize_int8(e["file"], str(tmp_path / "t.int8.tflite"), {"input": x}, name_map=e["name_map"])
    layers = [c for c in _convs(bytearray((tmp_path / "t.int8.tflite").read_bytes())) if c["bias"] is not None]
    buffers = [c["bias_buffer"] for c in layers]
    assert len(buffers) - len(set(buffers)) == 1  # the tied conv's two uses share one bias buffer
    info = correct_biases_sequential_tflite(e["file"], tmp_path / "t.int8.tflite", {"input": x}, e["name_map"])
    assert info["shared_skipped"] == 2 and info["layers"] == len(layers) - 2

    d, eh, _ = exported
    calib, _ = images
    target = tmp_path / "head.int8.tflite"
    shutil.copy(d / "head.int8.tflite", target)
    before = target.read_bytes()
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07" + b"\x00" * 64)
    for ref, feeds, message in [(onnx_file, {"input": calib}, "not a TFLite flatbuffer"),
                                (d / "head.int8.tflite", {"input": calib}, "must be the float graph"),
                                (eh["file"], {"input": calib[:0]}, "no calibration samples")]:
        with pytest.raises(ValueError, match=message):
            correct_biases_sequential_tflite(ref, target, feeds, eh["name_map"])
    assert target.read_bytes() == before

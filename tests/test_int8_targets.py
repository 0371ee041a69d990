"""int8 per-target graph variants, empirical bias correction and quantisation-aware fine-tuning."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from runtime import targets
from runtime.targets import TargetError, check_targets, choose_graph, group_targets, host_target


# ------------------------------------------------------------------------------------------ targets
def test_host_target_follows_the_instruction_set(monkeypatch):
    monkeypatch.delenv(targets.ENV, raising=False)
    assert host_target("aarch64", set()) == "arm64"
    assert host_target("x86_64", {"avx2", "avx512f", "avx512_vnni"}) == "x86-vnni"
    assert host_target("x86_64", {"avx2", "avx_vnni"}) == "x86-vnni"
    assert host_target("x86_64", {"avx2", "avx512f", "avx512bw"}) == "x86-avx2"  # AVX512 without VNNI saturates too
    assert host_target("x86_64", {"sse4_2"}) is None
    assert host_target("riscv64", set()) is None
    monkeypatch.setenv(targets.ENV, "x86-avx2")
    assert host_target("aarch64", set()) == "x86-avx2"
    monkeypatch.setenv(targets.ENV, "x86")
    with pytest.raises(TargetError, match="arm64, x86-vnni, x86-avx2"):
        host_target()


def test_targets_group_by_kernel_types():
    assert group_targets(["arm64", "x86-vnni", "x86-avx2"]) == [["arm64", "x86-vnni"], ["x86-avx2"]]
    assert group_targets(["x86-avx2"]) == [["x86-avx2"]]
    with pytest.raises(TargetError, match="unknown"):
        check_targets(["arm64", "armv7"])
    graphs = {"a": {"variants": {"x86-avx2": "b"}}, "b": {}, "f": {}}
    assert choose_graph(graphs, "a", "x86-avx2") == "b"
    assert choose_graph(graphs, "a", "arm64") == "a"
    assert choose_graph(graphs, "a", None) == "a"
    assert choose_graph(graphs, "f", "x86-avx2") == "f"


def test_server_runs_float_tails_on_x86(monkeypatch, effnet_bundle):
    from runtime.bundle import Bundle
    from runtime.session import pick_precision

    bundle = Bundle.load(effnet_bundle[0])
    bundle.manifest.segments[1].graphs["onnx/int8"] = "x"  # pretend the bundle has int8 graphs
    bundle.manifest.segments[0].graphs["onnx/int8"] = "y"
    monkeypatch.setenv(targets.ENV, "x86-vnni")
    assert pick_precision(bundle, "onnx", "auto", side="server") == "fp32"
    assert pick_precision(bundle, "onnx", "auto", side="device") == "int8"
    assert pick_precision(bundle, "onnx", "int8", side="server") == "int8"
    monkeypatch.setenv(targets.ENV, "arm64")
    assert pick_precision(bundle, "onnx", "auto", side="server") == "int8"


# --------------------------------------------------------------------------------- export variants
def _float_convs(path) -> tuple[list[str], list[str]]:
    """(every Conv, the Convs whose weight is an initializer rather than a DequantizeLinear output) of an ONNX file."""
    model = onnx.load(str(path))
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return [n.name for n in convs], [n.name for n in convs if made_by.get(n.input[1]) != "DequantizeLinear"]


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, effnet, calib_images, verify_images):
    from toolkit.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("int8") / "b5"
    export_bundle(effnet, ExportOptions(split=["blocks.5"], out=out, int8=True, progress=False, layer_profile_graph=False),
                  calib_images, verify_images)
    return out


def test_every_int8_graph_states_its_targets_and_variants_share_the_wire(int8_bundle, verify_images):
    from runtime.bundle import Bundle
    from runtime.chain import Chain
    from toolkit.quantize_onnx import tensor_qparams

    bundle = Bundle.load(int8_bundle, int8_target="arm64")
    graphs = bundle.manifest.graphs
    int8 = {k: g for k, g in graphs.items() if g.precision == "int8"}
    assert int8 and all(g.targets for g in int8.values())
    for seg in bundle.segments:
        primary = graphs[seg.graphs["onnx/int8"]]
        assert primary.targets == ["arm64", "x86-vnni"]
        assert primary.quantization.weights == "int8" and not primary.quantization.reduce_range
        assert primary.quantization.bias_correction["layers"] > 0  # the default recipe
        alt = graphs[primary.variants["x86-avx2"]]
        assert alt.targets == ["x86-avx2"] and alt.quantization.reduce_range
        # the graph reading the image keeps its stem conv float (IMAGE_GRAPH_RECIPE), no other graph does
        for g in (primary, alt):
            convs, float_convs = _float_convs(int8_bundle / g.file)
            assert float_convs == (convs[:1] if "input" in seg.inputs else []), (seg.name, float_convs)
            assert set(float_convs) <= set(g.quantization.float_nodes)
        for t in seg.outputs:
            if t in bundle.manifest.tensors:  # the wire tensor: same encoding from both heads
                a = tensor_qparams(int8_bundle / primary.file, t)
                b = tensor_qparams(int8_bundle / alt.file, t)
                assert a == b
    # the runtime picks the graph made for its CPU
    assert Bundle.load(int8_bundle, int8_target="x86-avx2").graph_key(bundle.segments[0], "onnx", "int8").endswith("x86-avx2")
    assert Bundle.load(int8_bundle, int8_target="arm64").graph_key(bundle.segments[0], "onnx", "int8") == "seg0.onnx.int8"
    x = verify_images.x[:8]
    ref = Chain(bundle, "all", "onnx", "fp32").run_segments({"input": x})["logits"]
    for target in ("arm64", "x86-avx2"):
        got = Chain(Bundle.load(int8_bundle, int8_target=target), "all", "onnx", "int8").run_segments({"input": x})["logits"]
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert cos.min() > 0.9, target


# ------------------------------------------------------------------------------------ bias correction
def test_bias_correction_brings_int8_features_closer_to_float(tmp_path, effnet, calib_images, verify_images):
    from runtime.backends import OrtSession
    from toolkit.bias_correction import correct_biases
    from toolkit.onnx_export import export_onnx
    from toolkit.quantize_onnx import QuantConfig, quantize_graph

    head = torch.nn.Sequential(effnet.model.stem, *effnet.model.blocks[:2]).eval()
    x = calib_images.x
    fp32 = tmp_path / "head.onnx"
    export_onnx(head, (torch.from_numpy(x[:1]),), fp32, ["input"], ["feat"])
    cfg = QuantConfig(weight_type="int8", reduce_range=True)  # 7-bit weights: a large, measurable shift
    q_plain = quantize_graph(fp32, tmp_path / "plain.onnx", {"input": x}, cfg, progress=False)
    q_bc = quantize_graph(fp32, tmp_path / "bc.onnx", {"input": x}, QuantConfig(**{**cfg.__dict__, "bias_correction": True}),
                          progress=False)
    assert q_bc["bias_correction"]["layers"] >= 5 and q_bc["bias_correction"]["mean_abs_shift"] > 0
    assert q_plain["bias_correction"] is None
    # on other images than it was measured on, the corrected graph's features are closer to float
    xe = verify_images.x
    ref = OrtSession(fp32).run({"input": xe})["feat"]
    err = {k: float(np.abs(OrtSession(tmp_path / f"{k}.onnx").run({"input": xe})["feat"] - ref).mean())
           for k in ("plain", "bc")}
    assert err["bc"] < err["plain"]
    # only int32 biases changed
    a, b = onnx.load(str(tmp_path / "plain.onnx")), onnx.load(str(tmp_path / "bc.onnx"))
    changed = [i.name for i, j in zip(a.graph.initializer, b.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))]
    assert changed and all(i.data_type == onnx.TensorProto.INT32 for i in b.graph.initializer if i.name in changed)
    assert correct_biases(fp32, tmp_path / "plain.onnx", {"input": x[:4]})["layers"] == q_bc["bias_correction"]["layers"]


def test_sequential_bias_correction_removes_the_measured_mean_shift(tmp_path, effnet, calib_images, verify_images):
    from runtime.backends import OrtSession
    from toolkit.bias_correction import _channel_means, correct_biases_sequential
    from toolkit.onnx_export import export_onnx
    from toolkit.quantize_onnx import QuantConfig, quantize_graph

    head = torch.nn.Sequential(effnet.model.stem, *effnet.model.blocks[:2]).eval()
    x = calib_images.x
    fp32 = tmp_path / "head.onnx"
    export_onnx(head, (torch.from_numpy(x[:1]),), fp32, ["input"], ["feat"])
    cfg = QuantConfig(weight_type="int8", reduce_range=True, bias_correction=True)
    quantize_graph(fp32, tmp_path / "bc.onnx", {"input": x}, cfg, progress=False)
    q = quantize_graph(fp32, tmp_path / "seq.onnx", {"input": x},
                       QuantConfig(**{**cfg.__dict__, "sequential_bias_correction": True}), progress=False)
    seq = q["bias_correction"]["sequential"]
    assert seq["layers"] >= 5 and q["bias_correction"]["layers"] == seq["layers"]
    # what is left after the pass is a fraction of what it removed (the int32 grid rounds the rest)
    assert 0 <= seq["mean_abs_shift_after"] < 0.5 * seq["mean_abs_shift"]
    # measured independently: every Conv's output mean is closer to float than after weight-rounding BC alone
    fm = onnx.load(str(fp32))
    names = [n.output[0] for n in fm.graph.node if n.op_type == "Conv"]
    ref = _channel_means(fm, names, {"input": x}, 16)
    gap = {}
    for k in ("bc", "seq"):
        qm = onnx.load(str(tmp_path / f"{k}.onnx"))
        outs = {n.name: n.output[0] for n in qm.graph.node if n.op_type == "Conv"}
        mine = _channel_means(qm, [outs[n.name] for n in fm.graph.node if n.op_type == "Conv"], {"input": x}, 16)
        gap[k] = np.mean([np.abs(mine[outs[n.name]] - ref[n.output[0]]).mean()
                          for n in fm.graph.node if n.op_type == "Conv"])
    assert gap["seq"] < 0.5 * gap["bc"]
    # on other images, the head's output is closer to float too
    xe = verify_images.x
    out = OrtSession(fp32).run({"input": xe})["feat"]
    err = {k: float(np.abs(OrtSession(tmp_path / f"{k}.onnx").run({"input": xe})["feat"] - out).mean()) for k in gap}
    assert err["seq"] < err["bc"]
    # only int32 biases changed, and running it again finds (almost) nothing left to remove
    a, b = onnx.load(str(tmp_path / "bc.onnx")), onnx.load(str(tmp_path / "seq.onnx"))
    changed = [i.name for i, j in zip(a.graph.initializer, b.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))]
    assert changed and all(i.data_type == onnx.TensorProto.INT32 for i in b.graph.initializer if i.name in changed)
    again = correct_biases_sequential(fp32, tmp_path / "seq.onnx", {"input": x})
    assert again["mean_abs_shift"] < 0.5 * seq["mean_abs_shift"]


# -------------------------------------------------------------------------- quantisation-aware tuning
def _resnetish():
    from toolkit.models.resnet import BasicBlock

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            BasicBlock(8, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def test_fold_batchnorm_is_exact_and_keeps_module_names():
    from toolkit.qat import fold_batchnorm

    m = _resnetish()
    f = fold_batchnorm(m)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(m(x), f(x), atol=1e-5)
    assert [n for n, _ in m.named_modules()] == [n for n, _ in f.named_modules()]
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in f.modules())
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # the original is untouched


def test_quant_points_mirror_qdq_placement():
    from toolkit.qat import fold_batchnorm, quant_points

    ins, outs = quant_points(fold_batchnorm(_resnetish()))
    assert ins == ["0", "3.conv1", "3.conv2", "6"]
    assert "2" in outs and "3.relu" in outs  # after conv+BN+ReLU; the block's shared ReLU (two call sites)
    assert "6" not in outs  # logits stay float


def test_finetune_distils_through_the_int8_simulation(calib_images):
    from toolkit.qat import QATConfig, QATError, finetune

    m = _resnetish()
    x = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    student, hist = finetune(m, x, QATConfig(epochs=3, batch_size=8, lr=1e-3), progress=False, eval_x=x[:8])
    assert len(hist["loss"]) == 3 and hist["loss"][-1] < hist["loss"][0]
    assert len(hist["agreement"]) == 3
    assert not any("parametrizations" in k for k in student.state_dict())  # a plain float model again
    with torch.no_grad():
        assert not torch.equal(student[0].weight, m[0].weight)
        assert torch.allclose(student(torch.from_numpy(x)), m(torch.from_numpy(x)), atol=1.0)
    with pytest.raises(QATError, match="epochs"):
        QATConfig(epochs=0)
    with pytest.raises(QATError, match="no Conv2d or Linear"):
        finetune(torch.nn.Sequential(torch.nn.ReLU()), x, QATConfig(epochs=1), progress=False)

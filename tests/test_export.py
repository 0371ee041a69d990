"""The export spine on real models and real images: slicing, ONNX graphs, manifest, verification."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from runtime.bundle import Bundle, BundleError
from runtime.chain import Chain
from toolkit.export import ExportOptions, export_bundle
from toolkit.graph import SplitError, TracedModel
from toolkit.sources import resolve


def test_effnet_real_weights_bundle_matches_pytorch(effnet_bundle, effnet, verify_images):
    out, report = effnet_bundle
    chain = report["verification"]["chains"]["onnx/fp32"]
    assert chain["batch_n"]["top1_agreement"] == 1.0
    assert chain["batch_1"]["rel_diff"] < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["side"] for s in manifest["segments"]] == ["device", "server"]
    assert manifest["segments"][0]["outputs"] == ["blocks.5"] == manifest["segments"][1]["inputs"]
    assert manifest["tensors"]["blocks.5"]["shape"] == [None, 80, 14, 14]
    q = manifest["tensors"]["blocks.5"]["quant"]
    assert q["dtype"] == "int8" and q["scale"] > 0 and -128 <= q["zero_point"] <= 127
    # head -> tail through the runtime equals the PyTorch model, bound by name, on a batch of 3
    bundle = Bundle.load(out)
    x = verify_images.x[:3]
    head, tail = Chain(bundle, "device"), Chain(bundle, "server")
    feat = head.run_segments({"input": x})
    logits = tail.run_segments({"blocks.5": feat["blocks.5"]})["logits"]
    with torch.no_grad():
        ref = effnet.model(torch.from_numpy(x)).numpy()
    assert np.abs(logits - ref).max() <= 1e-4 * (ref.max() - ref.min())


def test_real_weights_are_accurate(verify_images, effnet):
    if verify_images.y is None:  # the built-in photos are unlabelled: check a known one (a tabby cat)
        with torch.no_grad():
            pred = effnet.model(torch.from_numpy(verify_images.x[:1])).argmax(1).item()
        assert pred in (281, 282, 285)
    else:
        with torch.no_grad():
            pred = effnet.model(torch.from_numpy(verify_images.x)).argmax(1).numpy()
        assert (pred == verify_images.y).mean() >= 0.5


def test_corrupt_bundle_is_refused(effnet_bundle, tmp_path):
    import shutil

    out, _ = effnet_bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    Bundle.load(copy)
    graph = copy / "graphs" / "seg1.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="seg1.fp32.onnx.*sha256 mismatch"):
        Bundle.load(copy)


def test_unknown_split_lists_nearest(effnet):
    traced = TracedModel(effnet.model, torch.zeros(1, 3, 224, 224))
    with pytest.raises(SplitError, match="nearest valid: blocks.5"):
        traced.cut("block.5")
    with pytest.raises(SplitError, match="nothing would be left"):
        traced.cut("classifier")


def test_resnet_cut_inside_residual_block_carries_both_tensors(tmp_path, calib_images, verify_images):
    src = resolve("resnet18")
    out = tmp_path / "resnet"
    report = export_bundle(src, ExportOptions(split=["layer2.0.conv1", "layer3"], out=out, progress=False),
                           calib_images.subset(range(4)), verify_images.subset(range(4)))
    manifest = json.loads((out / "manifest.json").read_text())
    seg0 = manifest["segments"][0]
    assert seg0["outputs"] == ["layer2_0_downsample_1", "layer2_0_conv1"]
    assert manifest["segments"][1]["inputs"] == seg0["outputs"]
    assert [s["side"] for s in manifest["segments"]] == ["device", "device", "server"]
    assert report["verification"]["chains"]["onnx/fp32"]["batch_n"]["top1_agreement"] == 1.0
    assert all("quant" in manifest["tensors"][n] for n in seg0["outputs"])


class _UpsamplingDecoder(torch.nn.Module):
    """A dense-prediction shape: EfficientNet-Lite0's stem and first blocks (real weights) as encoder, a
    bilinear x2 upsampling decoder (seeded weights) to a 10-class map, pooled to image-level logits."""

    def __init__(self):
        super().__init__()
        from torch import nn

        from toolkit.models.efficientnet_lite import efficientnet_lite0

        m = efficientnet_lite0()
        self.encoder = nn.Sequential(m.stem, *m.blocks[:3])
        torch.manual_seed(0)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.decoder = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 10, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.decoder(self.up(self.encoder(x)))).flatten(1)


def test_int8_tail_starting_with_bilinear_resize(tmp_path, calib_images, verify_images):
    """onnxruntime leaves the tail's input (read by Resize) unquantised; eetool's fallback adds its Q/DQ
    pair. It used to crash (a QuantType given where the helper takes an ONNX element type) and, once past
    that, also quantised the classifier logits that are meant to stay float."""
    import onnx
    import onnxruntime as ort

    from toolkit.quantize_onnx import tensor_qparams
    from toolkit.sources import IMAGENET_PREPROCESS, ModelSource

    src = ModelSource("upsampling-decoder", "python", _UpsamplingDecoder().eval(), (1, 3, 224, 224),
                      IMAGENET_PREPROCESS)
    out = tmp_path / "up"
    export_bundle(src, ExportOptions(split=["encoder"], out=out, int8=True, progress=False,
                                     layer_profile_graph=False), calib_images, verify_images)
    manifest = json.loads((out / "manifest.json").read_text())
    tail = out / manifest["graphs"][manifest["segments"][1]["graphs"]["onnx/int8"]]["file"]
    model = onnx.load(str(tail))
    # the tail starts with the Resize, reading the dequantised input
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("encoder"))
    assert [n.op_type for n in model.graph.node if dq.output[0] in n.input] == ["Resize"]
    # the tail's input is quantised with the wire encoding the head sends (uint8 = int8 shifted by 128)
    wire, tail_in = manifest["tensors"]["encoder"]["quant"], tensor_qparams(tail, "encoder")
    assert tail_in["zero_point"] - 128 == wire["zero_point"]
    assert tail_in["scale"] == pytest.approx(wire["scale"], rel=1e-6)
    # the logits stay float: produced by a compute node, not by a DequantizeLinear
    producer = next(n for n in model.graph.node if "logits" in n.output)
    assert producer.op_type != "DequantizeLinear"

    # optimised (ORT_ENABLE_ALL) and unoptimised sessions agree within 1 LSB on every quantised tensor
    q_outputs = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.UINT8, None) for t in q_outputs)
    head = ort.InferenceSession(str(out / manifest["graphs"]["seg0.onnx.fp32"]["file"]))
    feat = head.run(["encoder"], {"input": verify_images.x})[0]
    runs = {}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        runs[level] = dict(zip(["logits"] + q_outputs, sess.run(["logits"] + q_outputs, {"encoder": feat})))
    opt, plain = runs.values()
    assert len(q_outputs) >= 4
    for t in q_outputs:
        assert np.abs(opt[t].astype(np.int32) - plain[t].astype(np.int32)).max() <= 1, t
    # the logits are the last quantised tensor (pooled map) dequantised and flattened: 1 LSB of its scale
    pool_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == q_outputs[-1])
    scale = float(onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == pool_q.input[1])))
    assert np.abs(opt["logits"] - plain["logits"]).max() <= scale * 1.0001

"""n-bit wire codecs end to end on a real EfficientNet-Lite0 bundle: calibration on the representative set
(toolkit.calibrate), the device quantising and packing, a real edge server decoding, and `eetool rate` on
real frames (the ImageNet samples beside the repo, else scikit-image's photos)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime import protocol
from runtime.bench import start_server
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.client import EdgeClient
from runtime.device import DeviceRunner, wire_codec
from runtime.manifest import manifest_json
from runtime.preprocess import decode_image, load_image, model_crop
from runtime.quant import QuantParams
from toolkit.calibrate import WireCodec, nbit_qparams, set_wire_qparams


def _with_wire(src, dst, wire: WireCodec, calib_x):
    """A copy of bundle ``src`` whose wire codec is ``wire``, calibrated on ``calib_x`` as export does."""
    shutil.copytree(src, dst)
    bundle = Bundle.load(dst)
    feats = Chain(bundle, "device").run_segments({"input": calib_x})["blocks.5"]
    manifest = bundle.manifest
    set_wire_qparams(manifest, {"seg1": {"blocks.5": feats}}, len(calib_x), wire, dst)
    (dst / "manifest.json").write_text(manifest_json(manifest))
    return dst


@pytest.fixture(scope="module")
def nbit_bundles(effnet_bundle, calib_images, tmp_path_factory):
    src = effnet_bundle[0]
    root = tmp_path_factory.mktemp("wire")
    return {"pt4": _with_wire(src, root / "pt4", WireCodec(4, False, "tail-kl", "brotli"), calib_images.x),
            "pc3": _with_wire(src, root / "pc3", WireCodec(3, True, "minmax", "zstd"), calib_images.x)}


def test_calibrated_manifest_entries(nbit_bundles, calib_images):
    pt = Bundle.load(nbit_bundles["pt4"]).tensor("blocks.5")
    assert pt.codec == "brotli"
    q = pt.quant
    assert (q.dtype, q.bits, q.axis, q.range) == ("uint8", 4, None, "tail-kl")
    assert 0 <= q.zero_point <= 15 and q.scale > 0 and 0.4 <= q.alpha <= 1.0
    assert len(q.kl_curve) == 13 and min(k for _, k in q.kl_curve) == dict(q.kl_curve)[q.alpha]
    pc = Bundle.load(nbit_bundles["pc3"]).tensor("blocks.5").quant
    assert pc.bits == 3 and pc.axis == 1 and len(pc.scale) == len(pc.zero_point) == 80
    # minmax per channel covers every representative value: nothing clips
    feats = Chain(Bundle.load(nbit_bundles["pc3"]), "device").run_segments({"input": calib_images.x})["blocks.5"]
    nq = pc.params()
    err = np.abs(nq.dequantize(nq.quantize(feats)) - feats)
    assert np.all(err <= np.asarray(nq.scale).reshape(1, -1, 1, 1) * 0.5 * (1 + 1e-3) + 1e-6)


def test_nbit_qparams_formula():
    x = np.array([[[[-1.0, 0.5]], [[2.0, 4.0]]]], np.float32)  # (1, 2, 1, 2)
    pt = nbit_qparams(x, 2)
    assert pt == {"dtype": "uint8", "bits": 2, "scale": 1.667, "zero_point": 1}  # 4 significant digits
    pc = nbit_qparams(x, 2, per_channel=True)
    assert pc["scale"] == [0.5, 1.333] and pc["zero_point"] == [2, 0] and pc["axis"] == 1
    with pytest.raises(ValueError, match="2..8"):
        nbit_qparams(x, 9)
    assert nbit_qparams(x, 4, method="mse")["scale"] <= nbit_qparams(x, 4)["scale"]


@pytest.fixture(scope="module")
def servers(nbit_bundles):
    procs = {k: start_server(str(v), []) for k, v in nbit_bundles.items()}
    yield {k: a for k, (_, a) in procs.items()}
    for proc, _ in procs.values():
        proc.terminate()
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize("kind", ["pt4", "pc3"])
def test_device_sends_packed_codes_and_server_decodes_them(kind, nbit_bundles, servers, verify_images):
    bundle = Bundle.load(nbit_bundles[kind])
    host, port = servers[kind].rsplit(":", 1)
    client = EdgeClient(host, int(port), codec=wire_codec(bundle))
    runner = DeviceRunner(bundle, client)
    head, tail = Chain(bundle, "device"), Chain(bundle, "server")
    q = bundle.tensor("blocks.5").quant
    nq = q.params()
    for i in range(3):
        x = verify_images.x[i:i + 1]
        feat = head.run_segments({"input": x})["blocks.5"]
        codes = nq.quantize(feat)
        ref = tail.run_segments({"blocks.5": nq.dequantize(codes)})["logits"][0]
        r = runner.infer(x)
        assert r.where == "server" and np.abs(r.logits - ref).max() < 1e-3
        frame = protocol.encode_request(1, {"blocks.5": codes}, {"blocks.5": nq.to_json()}, codec=wire_codec(bundle))
        assert r.bytes_sent == len(frame)  # what the device sent is exactly this frame's size
        assert r.bytes_sent < codes.size * q.bits / 8 + 2000  # packed: never one byte per code
    # offline, the local tail decodes the same codes
    local = DeviceRunner(bundle, None, local_tail=True).infer(verify_images.x[:1])
    feat = head.run_segments({"input": verify_images.x[:1]})["blocks.5"]
    ref = tail.run_segments({"blocks.5": nq.dequantize(nq.quantize(feat))})["logits"][0]
    assert local.where == "local" and np.abs(local.logits - ref).max() < 1e-4


def test_server_takes_a_crop_sized_image_as_the_crop(imagenet_source, calib_images):
    from PIL import Image

    spec = {"kind": "image", "channels": "RGB", "resize_shorter": 256, "interpolation": "bilinear",
            "crop": [224, 224], "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    f = calib_images.files[0]
    crop = model_crop(f, spec)
    assert crop.size == (224, 224)
    import io

    buf = io.BytesIO()
    crop.save(buf, "PNG")  # lossless: the server must see exactly the crop
    got = decode_image(buf.getvalue(), spec)
    np.testing.assert_array_equal(got, load_image(f, spec))
    # a 224x224 file read as a dataset image is still resized and cropped as before
    assert not np.array_equal(load_image(io.BytesIO(buf.getvalue()), spec), got)
    big = Image.new("RGB", (300, 200))
    b2 = io.BytesIO()
    big.save(b2, "PNG")
    assert decode_image(b2.getvalue(), spec).shape == (3, 224, 224)


def test_int8_graphs_meet_an_nbit_wire_on_its_grid(tmp_path):
    """export --int8 with a 4-bit wire (Fashion CNN, ONNX and TFLite): the int8 device graph's output and the
    int8 server graph's input are quantised on the wire's own grid (toolkit.calibrate.wire_grid_pins), so the
    device's int8 feature requantises to the n-bit codes exactly and the decoded codes enter the tail exactly."""
    import torch

    from calibration.fashion_mnist import PREPROCESS
    from calibration.readers import read_dataset
    from toolkit.calibrate import wire_grid_pins
    from toolkit.export import ExportOptions, export_bundle
    from toolkit.models.small_cnn import SmallCNN
    from toolkit.sources import ModelSource

    torch.manual_seed(0)
    calib = read_dataset("fashion-mnist:train", PREPROCESS, limit=64, spread=True)
    verify = read_dataset("fashion-mnist:test", PREPROCESS, limit=16)
    src = ModelSource("fashion-cnn", "zoo", SmallCNN().eval(), (1, 1, 28, 28), PREPROCESS)
    out = tmp_path / "b"
    export_bundle(src, ExportOptions(split=["stage2"], out=out, int8=True, formats=("onnx", "tflite"), progress=False,
                                     layer_profile_graph=False, wire=WireCodec(4, False, "minmax")), calib, verify)
    b = Bundle.load(out)
    m = b.manifest
    wq = m.tensors["stage2"].quant
    assert (wq.bits, wq.axis) == (4, None)
    assert wire_grid_pins(m, ["stage2", "logits"], "int8") == {"stage2": {"scale": wq.scale,
                                                                         "zero_point": wq.zero_point - 128}}
    head, tail = m.segments[0].name, m.segments[1].name
    for fmt, shift in (("onnx", 0), ("tflite", 128)):  # ONNX: uint8 activations; TFLite: int8
        for owner in (head, tail):
            io = m.graphs[m.segment(owner).graphs[f"{fmt}/int8"]].quantization.io["stage2"]
            assert io.scale == pytest.approx(wq.scale, rel=1e-6), (fmt, owner)
            assert io.zero_point == wq.zero_point - shift, (fmt, owner)
        feat = Chain(b, "device", fmt, "int8").run_segments({"input": verify.x})["stage2"]
        codes = feat / wq.scale + wq.zero_point
        assert np.abs(codes - np.rint(codes)).max() < 1e-3, fmt  # on the grid: the wire rounds nothing more

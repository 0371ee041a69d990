"""Transform coding of the split feature and the entropy-constrained (step / byte-budget) quantiser:
the KLT in closed form, baked into real EfficientNet-Lite0 graphs, sent through a real edge server."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import protocol
from runtime.bench import start_server
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.client import EdgeClient
from runtime.device import DeviceRunner, wire_codec
from toolkit.calibrate import WireCodec, budget_step, frame_bytes, step_qparams
from toolkit.wire_transform import (WireTransformError, forward_transform, inverse_transform, klt_basis,
                                    with_klt)


def _correlated(seed=0, n=20, c=6, hw=5):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(c, c)) * np.linspace(3, 0.1, c)  # unequal, correlated channels
    z = rng.normal(size=(n, hw, hw, c)) @ mix.T + rng.normal(size=c)
    return z.transpose(0, 3, 1, 2).astype(np.float32)


def test_klt_basis_decorrelates_orders_and_is_deterministic():
    x = _correlated()
    mean, basis, var = klt_basis(x)
    c = x.shape[1]
    np.testing.assert_allclose(basis.T @ basis, np.eye(c), atol=1e-10)  # orthonormal
    assert np.all(np.diff(var) <= 0) and var[0] > 10 * var[-1]
    rows = np.moveaxis(x, 1, -1).reshape(-1, c) - mean
    cov = np.cov(rows @ basis, rowvar=False)
    np.testing.assert_allclose(cov, np.diag(var), atol=1e-6 * var[0])  # coefficients uncorrelated
    assert np.all(basis[np.abs(basis).argmax(axis=0), np.arange(c)] > 0)  # sign rule
    again = klt_basis(x.copy())
    np.testing.assert_array_equal(again[1], basis)
    with pytest.raises(WireTransformError, match="NCHW"):
        klt_basis(x[0])
    with pytest.raises(WireTransformError, match="give --calib-samples 2 or more"):
        klt_basis(x[:1, :, :2, :2])


def test_forward_then_inverse_transform_is_the_identity():
    x = _correlated(1)
    mean, basis, _ = klt_basis(x)
    t = torch.from_numpy(x)
    with torch.no_grad():
        y = forward_transform(mean, basis)(t)
        back = inverse_transform(mean, basis)(y)
    np.testing.assert_allclose(back.numpy(), x, atol=1e-4 * np.abs(x).max())
    # the first coefficient carries the most variance, the last the least
    v = y.numpy().var(axis=(0, 2, 3))
    assert v[0] == v.max() and v[-1] == v.min()


def test_step_qparams_centre_the_codes_and_keep_zero_exact():
    x = np.array([-3.0, -1.0, 0.0, 2.0, 9.0], np.float32).reshape(1, 1, 1, 5)
    q = step_qparams(x, 8, 0.5)
    assert q == {"dtype": "uint8", "scale": 0.5, "zero_point": 122, "bits": 8}  # 127.5 - (−3 + 9) / (2 * 0.5)
    from runtime.quant import QuantParams

    p = QuantParams.from_json(q)
    back = p.dequantize(p.quantize(x))
    np.testing.assert_allclose(back, x, atol=0.25)  # nothing clips: every error is within half a step
    assert p.dequantize(p.quantize(np.zeros((1, 1), np.float32)))[0, 0] == 0.0
    small = step_qparams(x, 2, 0.5)  # 4 codes cannot hold 24 steps: centred, the ends clip
    assert small["zero_point"] == 0 and small["bits"] == 2
    with pytest.raises(ValueError, match="> 0"):
        step_qparams(x, 8, 0.0)


@pytest.mark.parametrize("codec", ["zstd", "brotli"])
def test_budget_step_is_the_finest_step_within_the_budget(codec):
    rng = np.random.default_rng(3)
    x = rng.laplace(size=(12, 16, 8, 8)).astype(np.float32) * 3
    budget = 900
    step, size = budget_step("f", x, 8, budget, codec)
    assert size <= budget
    assert frame_bytes("f", x[:64], step_qparams(x, 8, step), codec) == size
    finer = step * 0.97  # bisection: a few percent finer already exceeds the budget
    assert frame_bytes("f", x[:64], step_qparams(x, 8, finer), codec) > budget
    loose, _ = budget_step("f", x, 8, 10 ** 6, codec)  # a loose budget: the finest step that clips nothing
    assert loose == pytest.approx((x.max() - x.min()) / 255, rel=1e-3)
    with pytest.raises(ValueError, match="raise the budget"):
        budget_step("f", x, 8, 50, codec)


def test_a_step_outside_the_data_range_is_refused():
    from toolkit.calibrate import check_step, step_bounds

    x = np.linspace(-3, 9, 50, dtype=np.float32).reshape(1, 2, 5, 5)
    finest, coarsest = step_bounds(x, 8)
    assert finest == pytest.approx(12 / 255) and coarsest == pytest.approx(6)
    check_step("f", x, 8, finest)  # the edges: accepted
    check_step("f", x, 8, coarsest)
    with pytest.raises(ValueError, match="finer than 8-bit codes can cover.*at least 0.04706"):
        check_step("f", x, 8, finest / 2)
    with pytest.raises(ValueError, match="or more --wire-bits"):
        check_step("f", x, 2, 1.0)
    with pytest.raises(ValueError, match="fewer than three levels.*at most 6"):
        check_step("f", x, 8, 7.0)


def test_wire_codec_checks_its_fields():
    assert WireCodec(8, False, "step", step=2.0).nbit and WireCodec(8, False, "budget", budget=10).nbit
    assert not WireCodec().nbit
    for kwargs, msg in (({"range": "step"}, "give a step"), ({"range": "mse", "step": 1.0}, "give a step"),
                        ({"range": "step", "step": -1.0}, "> 0"), ({"range": "step", "step": float("nan")}, "finite"),
                        ({"range": "budget", "budget": 0}, ">= 1"),
                        ({"range": "budget", "budget": 9, "codec": "none"}, "needs an entropy coder"),
                        ({"range": "budget", "budget": 9, "per_channel": True}, "one step for every channel"),
                        ({"range": "nope"}, "range method must be one of")):
        with pytest.raises(ValueError, match=msg):
            WireCodec(**{"bits": 8, **kwargs})


@pytest.fixture(scope="module")
def klt_bundle(effnet, calib_images, verify_images, tmp_path_factory):
    from toolkit.export import ExportOptions, export_bundle

    src, cuts, section = with_klt(effnet, ["blocks.5"], calib_images.x)
    out = tmp_path_factory.mktemp("klt") / "b5-klt"
    wire = WireCodec(8, False, "budget", "brotli", budget=6000)
    report = export_bundle(src, ExportOptions(split=cuts, out=out, progress=False, wire=wire, wire_transform=section),
                           calib_images, verify_images)
    return out, report


def test_klt_bundle_is_verified_and_says_what_it_sends(klt_bundle, effnet_bundle, verify_images):
    out, report = klt_bundle
    b = Bundle.load(out)
    m = b.manifest
    assert m.split == "klt" and b.wire_tensors == ["klt"]
    t = m.wire_transform
    assert (t.kind, t.split, t.cut, t.shape) == ("klt", "blocks.5", "klt", [80, 14, 14])
    assert len(t.variance) == 80 and t.variance == sorted(t.variance, reverse=True)
    assert t.explained[-1] == pytest.approx(1.0, abs=1e-3) and t.explained[7] < t.explained[15]
    q = b.tensor("klt").quant
    assert (q.range, q.budget, q.bits, b.tensor("klt").codec) == ("budget", 6000, 8, "brotli")
    assert q.frame_bytes <= 6000
    # baked in, the rotation changes nothing: the chain's logits are the original bundle's
    x = verify_images.x[:4]
    ref = Chain(Bundle.load(effnet_bundle[0])).run_segments({"input": x})["logits"]
    got = Chain(b).run_segments({"input": x})["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())
    # the device's coefficients: decorrelated across channels, strongest first
    y = Chain(b, "device").run_segments({"input": verify_images.x})["klt"]
    var = y.var(axis=(0, 2, 3))
    assert var[:8].mean() > 10 * var[-8:].mean()


def test_klt_codes_cross_a_real_server(klt_bundle, verify_images):
    b = Bundle.load(klt_bundle[0])
    proc, addr = start_server(str(klt_bundle[0]), [])
    try:
        host, port = addr.rsplit(":", 1)
        runner = DeviceRunner(b, EdgeClient(host, int(port), codec=wire_codec(b)))
        head, tail = Chain(b, "device"), Chain(b, "server")
        nq = b.tensor("klt").quant.params()
        for i in range(3):
            x = verify_images.x[i:i + 1]
            codes = nq.quantize(head.run_segments({"input": x})["klt"])
            ref = tail.run_segments({"klt": nq.dequantize(codes)})["logits"][0]
            r = runner.infer(x)
            assert r.where == "server" and np.abs(r.logits - ref).max() < 1e-3
            frame = protocol.encode_request(1, {"klt": codes}, {"klt": nq.to_json()}, codec="brotli")
            assert r.bytes_sent == len(frame) < codes.size  # entropy coded: under one byte per code
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_klt_needs_one_single_tensor_split(effnet, calib_images):
    with pytest.raises(WireTransformError, match="one split point"):
        with_klt(effnet, ["blocks.3", "blocks.5"], calib_images.x)


def test_a_byte_budget_is_refused_when_several_tensors_cross_the_cut(tmp_path, calib_images, verify_images):
    """A REQUEST frame carries every tensor crossing the cut, so a budget met per tensor would not bound it."""
    from toolkit.export import ExportOptions, export_bundle
    from toolkit.sources import resolve

    with pytest.raises(ValueError, match="2 tensors cross this cut"):
        export_bundle(resolve("resnet18"), ExportOptions(split=["layer3.0.conv1"], out=tmp_path / "b", progress=False,
                                                         wire=WireCodec(8, False, "budget", "zstd", budget=15000)),
                      calib_images, verify_images.subset(range(4)))


def test_manifest_refuses_inconsistent_transform_and_budget_fields(klt_bundle):
    import json

    from runtime.manifest import Manifest, ManifestError

    good = json.loads((klt_bundle[0] / "manifest.json").read_text())
    Manifest.from_json(good)
    for edit, where in ((lambda m: m["wire_transform"].update(shape=[80, 7, 28]), "wire_transform.shape"),
                        (lambda m: m["wire_transform"].update(shape=[80]), "wire_transform.shape"),
                        (lambda m: m["wire_transform"].update(variance=[1.0] * 5), "wire_transform.variance"),
                        (lambda m: m["wire_transform"].update(variance=[-1.0] * 80), "wire_transform.variance"),
                        (lambda m: m["wire_transform"].update(explained=[5.0] * 80), "wire_transform.explained"),
                        (lambda m: m["wire_transform"].update(samples=-3), "wire_transform.samples"),
                        (lambda m: m["tensors"]["klt"]["quant"].pop("budget"), "quant.budget"),
                        (lambda m: m["tensors"]["klt"]["quant"].update(frame_bytes=-1), "quant.frame_bytes")):
        bad = json.loads(json.dumps(good))
        edit(bad)
        with pytest.raises(ManifestError, match=where.replace(".", r"\.")):
            Manifest.from_json(bad)

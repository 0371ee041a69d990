"""ONNX models as first-class sources: EfficientNet-Lite0 (real weights) exported whole to ONNX, then
inspected, exported, served and run like the PyTorch model."""
from __future__ import annotations

import pytest
import torch

from toolkit.inspect_model import split_table
from toolkit.onnx_slice import onnx_split_table
from toolkit.sources import ModelSourceError, resolve

CUT = "/blocks/blocks.5/project/project.0/Conv_output_0"  # the ONNX name of the output of blocks.5


@pytest.fixture(scope="module")
def effnet_onnx(tmp_path_factory, effnet):
    from toolkit.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("onnx-source") / "efficientnet-lite0.onnx"
    export_onnx(effnet.model, (torch.zeros(1, 3, 224, 224),), path, ["image"], ["scores"])
    return path


def test_inspect_counts_what_pytorch_counts(effnet_onnx, effnet):
    table = onnx_split_table(effnet_onnx)
    ref = split_table(effnet.model, (1, 3, 224, 224))
    assert table["total_mflops"] == pytest.approx(ref["total_mflops"], rel=1e-6)  # 770.4
    rows = {r["name"]: r for r in table["rows"]}
    b5 = next(r for r in ref["rows"] if r["name"] == "blocks.5")
    assert rows[CUT]["head_mflops"] == pytest.approx(b5["head_mflops"], rel=1e-6)  # 250.9
    assert rows[CUT]["shape"] == [None, 80, 14, 14] and rows[CUT]["bytes_int8"] == b5["bytes_int8"] == 15680
    # only cuts carrying float tensors are listed (no shape arithmetic, no constants)
    assert all(not r["name"].endswith(("Constant_output_0", "Shape_output_0")) for r in table["rows"])


def test_input_size_from_the_model_or_input_shape(effnet_onnx):
    src = resolve(str(effnet_onnx), preprocess="imagenet")
    assert src.input_shape == (1, 3, 224, 224) and src.preprocess["crop"] == [224, 224]
    assert resolve(str(effnet_onnx)).preprocess == {"kind": "none"}
    with pytest.raises(ModelSourceError, match=r"contradicts the model's declared input \(\?,3,224,224\)"):
        resolve(str(effnet_onnx), input_shape="1,3,256,256")
    with pytest.raises(ModelSourceError, match="gives 1-channel inputs but the model takes 3"):
        resolve(str(effnet_onnx), preprocess="fashion-mnist")


@pytest.fixture(scope="module")
def onnx_bundle(effnet_onnx, imagenet_source, tmp_path_factory):
    """The issue's command: eetool export whole.onnx --split TENSOR --preprocess imagenet --int8."""
    from click.testing import CliRunner

    from toolkit.cli import main

    out = tmp_path_factory.mktemp("onnx-bundle") / "b"
    res = CliRunner().invoke(main, ["export", str(effnet_onnx), "--split", CUT, "--preprocess", "imagenet", "--int8",
                                    "--calib", imagenet_source, "--calib-samples", "16", "--verify-samples", "8",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_export_stores_preprocessing_input_size_wire_quant_and_samples(onnx_bundle, effnet, imagenet_source):
    import json

    from runtime.bundle import Bundle
    from toolkit.quantize_onnx import tensor_qparams
    from toolkit.sources import IMAGENET_PREPROCESS

    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    assert manifest["preprocess"] == IMAGENET_PREPROCESS  # was {"kind": "none"}
    assert manifest["input"] == {"name": "image", "shape": [None, 3, 224, 224], "dtype": "float32", "layout": "NCHW"}
    assert manifest["output"]["name"] == "scores" and manifest["output"]["shape"] == [None, 1000]
    assert manifest["model"] == {"source": "efficientnet-lite0.onnx", "kind": "onnx"}
    # the cut tensor's wire encoding is the int8 head's output encoding, from the representative data
    q = manifest["tensors"][CUT]["quant"]
    head = tensor_qparams(onnx_bundle / manifest["graphs"]["seg0.onnx.int8"]["file"], CUT)
    assert q["dtype"] == "int8" and q["range"] == "int8 head output" and q["samples"] == manifest["calibration"]["samples"]
    assert q["scale"] == pytest.approx(head["scale"]) and q["zero_point"] == head["zero_point"] - 128
    # cost model as for the PyTorch model; device up to the split, server after it
    segs = manifest["segments"]
    assert [(s["side"], round(s["mflops"], 1)) for s in segs] == [("device", 250.9), ("server", 519.5)]
    # verification against the whole ONNX model, every chain
    report = json.loads((onnx_bundle / "report.json").read_text())
    ver = report["verification"]
    # the verification inputs' files are copied as samples (8 by default), with labels when known
    samples = sorted(p.name for p in (onnx_bundle / "samples").iterdir())
    assert len(samples) == min(8, ver["samples"]) >= 5
    if imagenet_source != "samples":
        assert sorted(manifest["samples"]["labels"]) == samples
    assert ver["reference"] == "whole ONNX model" and set(ver["chains"]) == {"onnx/fp32", "onnx/int8"}
    assert ver["chains"]["onnx/fp32"]["batch_n"]["rel_diff"] < 1e-4
    assert ver["chains"]["onnx/fp32"]["batch_1"]["top1_agreement"] == 1.0
    assert ver["chains"]["onnx/int8"]["batch_n"]["cosine"] > 0.95
    assert Bundle.load(onnx_bundle).formats() == ["onnx/fp32", "onnx/int8"]


def test_device_side_runs_against_a_server_and_bench_measures(onnx_bundle, tmp_path):
    """serve, run on a photo of another size than the input (the preprocessing crops it), bench."""
    import json
    import subprocess
    import sys

    import numpy as np

    from calibration.readers import skimage_photo_paths
    from runtime.bench import start_server
    from runtime.bundle import Bundle
    from runtime.chain import Chain
    from runtime.preprocess import load_image

    photo = next(p for p in skimage_photo_paths() if p.name == "chelsea.png")  # 451 x 300
    bundle = Bundle.load(onnx_bundle)
    x = load_image(photo, bundle.manifest.preprocess)[None]
    assert x.shape == (1, 3, 224, 224)
    want = int(Chain(bundle, "all", "onnx", "int8").run_segments({"image": x})["scores"].argmax())
    proc, address = start_server(str(onnx_bundle), [])
    try:
        run = subprocess.run([sys.executable, "-m", "runtime", "run", str(onnx_bundle), "--server", address, "--json",
                              str(photo)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)["results"][0]
        assert result["where"] == "server" and result["top1"] == want
        assert 0 < result["bytes_sent"] < 80 * 14 * 14 + 1024  # the int8 split feature, compressed and framed
        bench = subprocess.run([sys.executable, "-m", "runtime", "bench", str(onnx_bundle), "--board", "host",
                                "--server", address, "--repeat", "1", "--warmup", "1", "--bandwidths", "10mbit",
                                "--profile-runs", "2", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=600, cwd=str(onnx_bundle))
        assert bench.returncode == 0, bench.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    report = json.loads((tmp_path / "report.json").read_text())
    modes = report["comparison"]["modes"]
    assert set(modes) == {"LC", "EC", "SC"}
    assert modes["SC"]["device_mflops"] == pytest.approx(250.92, abs=0.01)
    assert 0 < modes["SC"]["bytes_per_sample"] < modes["EC"]["bytes_per_sample"]
    assert np.isfinite(report["stages_ms"]["total"]["p50"])


def test_onnx_source_conflicts_are_refused(effnet_onnx, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    base = ["export", str(effnet_onnx), "--split", CUT, "-o", str(tmp_path / "b"), "--calib", "samples"]
    for extra, message in [(["--format", "onnx,tflite"], "TFLite graphs are converted from PyTorch modules"),
                           (["--exits", str(tmp_path)], "exit branches are trained on a PyTorch model"),
                           (["--split", "/blocks/blocks.5/Add_outptu_0"], "nearest valid")]:
        args = base + extra  # a second --split replaces the first
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "b").exists()

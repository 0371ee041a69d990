"""Shared fixtures: real images (the ImageNet samples beside the repo, or scikit-image's photos on a
fresh clone), the real EfficientNet-Lite0, and one exported bundle reused by several tests."""
from __future__ import annotations

import os

import pytest
import torch

from calibration.readers import default_data, read_dataset
from toolkit.sources import IMAGENET_PREPROCESS, resolve

torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def imagenet_source() -> str:
    """Real image folder (with labels) when available, else the built-in photos."""
    return default_data(IMAGENET_PREPROCESS)


@pytest.fixture(scope="session")
def effnet():
    return resolve("efficientnet-lite0")


@pytest.fixture(scope="session")
def calib_images(imagenet_source):
    return read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=16)


@pytest.fixture(scope="session")
def verify_images(imagenet_source):
    if imagenet_source == "samples":
        return read_dataset(imagenet_source, IMAGENET_PREPROCESS)
    return read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=16, offset=16)


@pytest.fixture(scope="session")
def effnet_bundle(tmp_path_factory, effnet, calib_images, verify_images):
    """EfficientNet-Lite0 split after blocks.5 (float ONNX), verified at export."""
    from toolkit.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "effnet-b5"
    report = export_bundle(effnet, ExportOptions(split=["blocks.5"], out=out, progress=False), calib_images, verify_images)
    return out, report


@pytest.fixture(scope="session")
def predictor_bundle(tmp_path_factory):
    """A Fashion-MNIST CNN (trained briefly on 8k real images) with two exits, exported to ONNX and TFLite,
    float and int8; exit thresholds calibrated; the Exit Predictor trained on the bundle's own graphs and
    exported into it. Returns (bundle dir, training report, predictor module, validation data, test data)."""
    from calibration.fashion_mnist import PREPROCESS
    from toolkit.exit_predictor_bundle import add_to_bundle, features_for, train_on_bundle
    from toolkit.exits import EarlyExitModel, build_exits, save_exits, train_exits
    from toolkit.exits_bundle import calibrate_thresholds, exit_specs
    from toolkit.export import ExportOptions, export_bundle
    from toolkit.models.small_cnn import SmallCNN
    from toolkit.sources import ModelSource
    from toolkit.train_reference import Batches, train_backbone
    from runtime.bundle import Bundle

    torch.manual_seed(0)
    train = read_dataset("fashion-mnist:train", PREPROCESS, limit=8000)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    backbone = SmallCNN()
    train_backbone(backbone, Batches(x, y, 128, seed=0), epochs=1, lr=3e-3, progress=False)
    backbone.eval()
    # global pooling: exits pooled to a size that does not divide the feature become matmuls, whose int8
    # TFLite graphs LiteRT refuses to run (per-channel quantised FULLY_CONNECTED on dimension 1)
    ee = EarlyExitModel(backbone, build_exits(backbone, ["stage1", "stage2"], x[:2], hidden=32, pool=1))
    train_exits(ee, Batches(x, y, 128, seed=1), mode="separate", epochs=1, lr=2e-3, progress=False)
    d = tmp_path_factory.mktemp("pexits")
    save_exits(d, ee, {"mode": "separate"})
    calib = read_dataset("fashion-mnist:train", PREPROCESS, limit=200, offset=20000, spread=True)
    verify = read_dataset("fashion-mnist:test", PREPROCESS, limit=32, offset=5000)
    out = tmp_path_factory.mktemp("pbundle") / "fashion"
    specs = exit_specs(d, backbone, torch.from_numpy(calib.x[:1]))
    src = ModelSource("fashion-cnn", "zoo", backbone, (1, 1, 28, 28), PREPROCESS)
    export_bundle(src, ExportOptions(split=["stage2"], out=out, exits=specs, formats=("onnx", "tflite"), int8=True,
                                     progress=False, layer_profile_graph=False), calib, verify)
    val = read_dataset("fashion-mnist:train", PREPROCESS, offset=58000, limit=2000)
    calibrate_thresholds(out, val, delta=0.03)
    pred_data = read_dataset("fashion-mnist:train", PREPROCESS, offset=30000, limit=6000)
    model, report = train_on_bundle(out, pred_data, epochs=3, progress=False)
    b = Bundle.load(out)
    report["verification"] = add_to_bundle(out, model, report, features_for(b, calib, report["input"]),
                                           features_for(b, verify, report["input"]))
    test = read_dataset("fashion-mnist:test", PREPROCESS, limit=800)
    return out, report, model, val, test


@pytest.fixture(scope="session")
def adaptive_bundle(predictor_bundle, tmp_path_factory):
    """A copy of ``predictor_bundle`` calibrated in latency-aware mode (rpi4 profile, host server, 2 ms
    round trip, int8 ONNX): (bundle dir, test data)."""
    import shutil

    from runtime.boards import load_board
    from toolkit.exits_bundle import calibrate_thresholds

    src, _, _, val, test = predictor_bundle
    out = tmp_path_factory.mktemp("padaptive") / "fashion"
    shutil.copytree(src, out)
    calibrate_thresholds(out, val, pairs=["onnx/int8"], latency={
        "board": load_board("rpi4"), "server": load_board("host"), "rtt_ms": 2.0, "budget_ms": 5.0,
        "bandwidth_mbps": 1.0, "grid_mbps": [1.0, 2.0, 5.0, 10.0, 20.0]})
    return out, test

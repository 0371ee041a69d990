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

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

"""Fashion-MNIST IDX reader on the real Debian files (dataset-fashion-mnist)."""
import gzip
import shutil

import numpy as np
import pytest

from calibration import fashion_mnist as fm

ROOT = fm.default_root()


def test_test_split_shapes_and_labels():
    x, y = fm.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    # the t10k set is balanced: 1000 images per class
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10
    assert y[:5].tolist() == [9, 2, 1, 1, 6]  # first test labels of the published set
    assert 0 < x.mean() < 255 and x.max() == 255


def test_train_split_and_preprocess():
    x, y = fm.load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    assert np.bincount(y, minlength=10).tolist() == [6000] * 10
    t = fm.to_input(x[:1000])
    assert t.shape == (1000, 1, 28, 28) and t.dtype == np.float32
    # fixed normalisation matches the training statistics
    full = fm.to_input(x)
    assert abs(float(full.mean())) < 0.01 and abs(float(full.std()) - 1.0) < 0.01
    p = fm.PREPROCESS
    assert p["kind"] == "array" and p["layout"] == "NCHW" and len(p["mean"]) == len(p["std"]) == 1


def test_env_override_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.load_fashion_mnist("test")
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(ROOT / f, tmp_path / f)
    x, _ = fm.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28)
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("val")


def _copy_with(tmp_path, name, data: bytes):
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(ROOT / f, tmp_path / f)
    with gzip.open(tmp_path / name, "wb") as g:
        g.write(data)


def test_corrupt_files(tmp_path):
    with gzip.open(ROOT / "t10k-labels-idx1-ubyte.gz") as g:
        labels = g.read()
    # images file carrying the labels' magic number
    _copy_with(tmp_path, "t10k-images-idx3-ubyte.gz", labels)
    with pytest.raises(ValueError, match="magic"):
        fm.load_fashion_mnist("test", root=tmp_path)
    # truncated payload
    _copy_with(tmp_path, "t10k-labels-idx1-ubyte.gz", labels[:-10])
    with pytest.raises(ValueError, match="need 10000 bytes"):
        fm.load_fashion_mnist("test", root=tmp_path)
    # not gzip at all
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="gzip"):
        fm.load_fashion_mnist("test", root=tmp_path)
    # label out of range
    _copy_with(tmp_path, "t10k-labels-idx1-ubyte.gz", labels[:-1] + b"\x0c")
    with pytest.raises(ValueError, match="outside 0..9"):
        fm.load_fashion_mnist("test", root=tmp_path)

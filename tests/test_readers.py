"""Calibration / evaluation data readers: real files in, garbage refused with a clear message."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from calibration.readers import DataError, check_channels, read_dataset, skimage_photo_paths
from toolkit.sources import IMAGENET_PREPROCESS

FASHION = {"kind": "array", "scale": 1 / 255, "mean": [0.286], "std": [0.353], "layout": "NCHW"}


def test_folder_with_synsets_gives_labels_and_spread_selection(imagenet_source):
    ds = read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=4, spread=True)
    assert ds.x.shape == (4, 3, 224, 224) and ds.x.dtype == np.float32
    if imagenet_source != "samples":
        assert ds.y is not None and len(set(ds.y)) == 4  # spread over a class-sorted folder: 4 classes
        rest = read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=4, exclude=ds.names)
        assert not set(rest.names) & set(ds.names)


def test_class_subfolders_are_labels(tmp_path):
    photos = skimage_photo_paths()[:4]
    for i, p in enumerate(photos):
        (tmp_path / f"class{i % 2}").mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / f"class{i % 2}" / p.name)
    ds = read_dataset(str(tmp_path), IMAGENET_PREPROCESS)
    assert sorted(ds.y.tolist()) == [0, 0, 1, 1]


def test_garbage_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        read_dataset(str(empty), IMAGENET_PREPROCESS)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="broken.jpg"):
        read_dataset(str(bad), IMAGENET_PREPROCESS)
    nan = np.zeros((3, 3, 224, 224), np.float32)
    nan[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match="1 of 3 samples contain NaN"):
        read_dataset(str(tmp_path / "nan.npy"), IMAGENET_PREPROCESS)
    with pytest.raises(DataError, match="no such file"):
        read_dataset(str(tmp_path / "missing"), IMAGENET_PREPROCESS)


def test_wrong_channel_count_is_refused(tmp_path):
    gray = tmp_path / "gray"
    gray.mkdir()
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(gray / "g.png")
    ds = read_dataset(str(gray), dict(FASHION, kind="image"))  # 1-channel spec: fine
    assert ds.x.shape[1] == 1
    with pytest.raises(DataError, match=r"expects \(3, 224, 224\)"):
        check_channels(ds, (1, 3, 224, 224))


def test_photos_of_several_sizes_for_a_model_that_does_not_resize_are_refused(tmp_path):
    """'array' preprocessing keeps each image's size: mixed sizes are a DataError naming two of the shapes."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, size in enumerate(((28, 28), (40, 30))):
        Image.fromarray(np.full(size, 100 + i, np.uint8)).save(mixed / f"{i}.png")
    with pytest.raises(DataError, match=r"2 different shapes .*\(1, 28, 28\) and \(1, 40, 30\)"):
        read_dataset(str(mixed), FASHION)
    with pytest.raises(DataError, match="fashion-mnist:train or fashion-mnist:test"):
        read_dataset("fashion-mnist:foo", FASHION)


def test_fewer_samples_than_asked_warns_with_count():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = read_dataset("samples", IMAGENET_PREPROCESS, limit=50)
    assert any(f"using {len(ds)}" in str(x.message) for x in w)


def test_fashion_mnist_reader_real_data():
    ds = read_dataset("fashion-mnist:test", FASHION, limit=10)
    assert ds.x.shape == (10, 1, 28, 28) and ds.y.tolist()[:3] == [9, 2, 1]



def test_interleaved_folds_are_disjoint_and_cover_the_source(imagenet_source):
    whole = read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=12)  # 5 on a fresh clone
    n = len(whole) // 2 + len(whole) % 2
    a = read_dataset(f"{imagenet_source}:fold=0/2", IMAGENET_PREPROCESS, limit=n)
    b = read_dataset(f"{imagenet_source}:fold=1/2", IMAGENET_PREPROCESS, limit=len(whole) - n)
    assert a.names == whole.names[0::2] and b.names == whole.names[1::2]
    assert not set(a.names) & set(b.names)
    assert a.source.endswith(":fold=0/2")
    with pytest.raises(DataError, match="fold"):
        read_dataset("samples:fold=2/2", IMAGENET_PREPROCESS)


def test_exclusions_apply_inside_a_fold(imagenet_source):
    # a fold is positions in the source's order: excluding other samples must not move images between folds
    whole = read_dataset(imagenet_source, IMAGENET_PREPROCESS, limit=8)
    fold1 = read_dataset(f"{imagenet_source}:fold=1/2", IMAGENET_PREPROCESS, limit=3)
    assert fold1.names == whole.names[1:6:2]
    fold0 = read_dataset(f"{imagenet_source}:fold=0/2", IMAGENET_PREPROCESS, limit=2)
    again = read_dataset(f"{imagenet_source}:fold=1/2", IMAGENET_PREPROCESS, limit=3, exclude=fold0.names)
    assert again.names == fold1.names  # fold-0 names excluded: fold 1 unchanged
    less = read_dataset(f"{imagenet_source}:fold=1/2", IMAGENET_PREPROCESS, limit=2, exclude=fold1.names[:1])
    assert less.names == fold1.names[1:3]

"""Ground-truth labels for input files (runtime.labels): ImageNet-style synsets.txt, labels.txt and the
bundle manifest's labels for its samples/."""
from __future__ import annotations

import pytest

from runtime.labels import LabelError, labels_for


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return [folder / n for n in names]


def test_synsets_folder(tmp_path):
    files = _touch(tmp_path / "imgs", "n01440764_tench.JPEG", "n01443537_goldfish.JPEG")
    (tmp_path / "imgs" / "synsets.txt").write_text("0\tn01440764\ttench\n1\tn01443537\tgoldfish\n")
    assert labels_for(files) == [0, 1]
    other = _touch(tmp_path / "imgs", "n99999999_unknown.JPEG")
    assert labels_for(files + other) is None  # one file without a label: no accuracy for the set


def test_labels_txt_and_manifest(tmp_path):
    files = _touch(tmp_path / "a", "x.png", "y.png")
    (tmp_path / "a" / "labels.txt").write_text("x.png\t3\ny.png\t7\n")
    assert labels_for(files) == [3, 7]
    (tmp_path / "a" / "labels.txt").write_text("x.png\tseven\n")
    with pytest.raises(LabelError, match="not an integer"):
        labels_for(files)
    samples = _touch(tmp_path / "bundle" / "samples", "s0.png", "s1.png")
    sample_labels = {"s0.png": 4, "s1.png": 2}  # the manifest's samples.labels
    assert labels_for(samples, sample_labels, tmp_path / "bundle" / "samples") == [4, 2]
    # the manifest's labels name the bundle's own samples only, not same-named files elsewhere
    elsewhere = _touch(tmp_path / "b", "s0.png")
    assert labels_for(elsewhere, sample_labels, tmp_path / "bundle" / "samples") is None
    assert labels_for(samples) is None

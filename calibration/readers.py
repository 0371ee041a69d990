"""Representative (calibration) and evaluation datasets for eetool, read from real files.

``DATA`` strings accepted by :func:`read_dataset`:
- a folder of images (recursive; non-image files skipped). Labels come from class subfolders, from a
  ``labels`` file (``file<TAB>index`` lines), or, as in ImageNet sample folders, from a ``synsets.txt``
  (``index<TAB>wnid<TAB>name``) beside files named ``<wnid>_<name>.JPEG``;
- ``file.npy`` (float32 inputs already preprocessed, ``(N, C, H, W)``) or ``file.npz`` with arrays ``x``
  (and optionally ``y``);
- ``fashion-mnist`` or ``fashion-mnist:train`` / ``fashion-mnist:test`` (the Debian package's IDX files);
- ``samples``: the colour photographs shipped inside scikit-image's wheel (no labels), so a fresh clone
  has real images without any download.

Any of these may end in ``:fold=K/N``: only the samples at positions ``i % N == K`` of the source's order
(interleaved, so every fold covers every class of a class-sorted folder). Disjoint folds keep training,
calibration and evaluation images apart, e.g. ``imagenet-samples:fold=0/2`` to distil on and
``imagenet-samples:fold=1/2`` to evaluate on.

Every reader returns float32 NCHW arrays preprocessed with the manifest's ``preprocess`` spec and refuses
garbage: empty folders, unreadable files, wrong channel counts and NaN/Inf inputs raise
:class:`DataError`; fewer samples than asked is a warning that states the count used.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.labels import LabelError, labels_table, synset_index
from runtime.manifest import Preprocess
from runtime.preprocess import PreprocessError, as_preprocess, list_images, load_image, normalize

SKIMAGE_PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png"]
#: the 800 labelled ImageNet images beside a checkout (``../shared/data/imagenet-samples``), when present
SHARED_IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"


class DataError(ValueError):
    """A dataset that cannot be used for calibration or evaluation; the message says why and what to do."""


@dataclass
class Dataset:
    """``x``: float32 ``(N, C, H, W)``; ``y``: int64 ``(N,)`` class indices or ``None``; ``names``: one
    identifier per sample (file name or ``split[i]``)."""

    x: np.ndarray
    y: np.ndarray | None
    names: list[str]
    source: str
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx) -> "Dataset":
        idx = np.asarray(idx)
        return Dataset(self.x[idx], None if self.y is None else self.y[idx], [self.names[i] for i in idx],
                       self.source, None if self.files is None else [self.files[i] for i in idx])


def skimage_photo_paths() -> list[Path]:
    """Paths of the real colour photographs inside the installed scikit-image wheel."""
    try:
        import skimage
    except ImportError as e:
        raise DataError("the built-in 'samples' need scikit-image (make install)") from e
    root = Path(skimage.__file__).parent / "data"
    return [root / n for n in SKIMAGE_PHOTOS if (root / n).is_file()]


def _folder_labels(root: Path, files: list[Path]) -> np.ndarray | None:
    syn = root / "synsets.txt"
    if syn.is_file():
        wnid_to_index = synset_index(syn)
        try:
            return np.array([wnid_to_index[f.name.split("_", 1)[0]] for f in files], np.int64)
        except KeyError as e:
            raise DataError(f"{root}: file prefix {e} not found in synsets.txt")
    labels = root / "labels.txt"
    if labels.is_file():
        try:
            table = labels_table(labels)
        except LabelError as e:
            raise DataError(str(e)) from e
        missing = [f.name for f in files if f.name not in table]
        if missing:
            raise DataError(f"{labels}: no label for {len(missing)} image(s), e.g. {missing[0]}; add "
                            f"'<file name><TAB><class index>' lines")
        return np.array([table[f.name] for f in files], np.int64)
    parents = sorted({f.parent.name for f in files})
    if len(parents) > 1 and all(f.parent.parent == root for f in files):
        index = {p: i for i, p in enumerate(parents)}
        return np.array([index[f.parent.name] for f in files], np.int64)
    return None


def default_data(preprocess: Preprocess | dict) -> str:
    """Real inputs when the user names none: Fashion-MNIST for array models; for image models the ImageNet
    samples beside the repo (or ``$EETOOL_IMAGENET_SAMPLES``) when present, else the photos in scikit-image."""
    if as_preprocess(preprocess).kind == "array":
        return "fashion-mnist:test"
    env = os.environ.get("EETOOL_IMAGENET_SAMPLES")
    if env and Path(env).is_dir():
        return env
    return str(SHARED_IMAGENET) if SHARED_IMAGENET.is_dir() else "samples"


def read_images(files: list[Path], preprocess: Preprocess | dict, source: str, labels: np.ndarray | None = None,
                progress: bool = False) -> Dataset:
    """Decode and preprocess image files; raises DataError naming the first unreadable file."""
    try:
        preprocess = as_preprocess(preprocess)
    except PreprocessError as e:
        raise DataError(str(e)) from e
    if preprocess.kind not in ("image", "array"):
        raise DataError(f"{source}: image files given but the model's preprocessing is {preprocess.kind!r}, "
                        "which takes inputs already preprocessed: pass .npy/.npz arrays in the model's layout, "
                        "or, for images, a model given --preprocess imagenet / fashion-mnist (a bundle keeps the "
                        "preprocessing it was exported with)")
    from runtime.progress import progress as bar

    it = bar(files, "reading images", "img", enabled=progress)
    try:
        arrays = [load_image(f, preprocess) for f in it]
    except PreprocessError as e:
        raise DataError(str(e)) from e
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:  # 'array' preprocessing does not resize: photos of several sizes cannot form a batch
        raise DataError(f"{source}: images of {len(shapes)} different shapes after {preprocess.kind!r} preprocessing "
                        f"(e.g. {shapes[0]} and {shapes[-1]}), which does not resize; give images of the model's "
                        "input size, or data in the model's format (e.g. fashion-mnist:train for fashion-cnn)")
    x = np.stack(arrays)
    return Dataset(x, labels, [f.name for f in files], source, list(files))


def read_dataset(data: str, preprocess: Preprocess | dict, limit: int | None = None, offset: int = 0,
                 progress: bool = False, spread: bool = False, exclude=()) -> Dataset:
    """Read ``data`` (see module doc) into a :class:`Dataset`: samples ``offset .. offset+limit`` of those
    whose name is not in ``exclude``; with ``spread``, ``limit`` samples evenly spaced over the whole
    source instead (a representative set should cover every class, and sorted folders are grouped by class).

    Raises DataError for an unknown form, an empty or unreadable source, NaN/Inf values; warns when fewer
    than ``limit`` samples exist and says how many are used."""
    exclude = set(exclude)
    data, fold = parse_fold(data)
    if fold is not None:
        k, n = fold
        # folds are positions in the source's own order: exclusions apply inside the fold, never before it
        ds = read_dataset(data, preprocess, None, 0, progress, False)
        ds = ds.subset(np.arange(k, len(ds), n))
        if not len(ds):
            raise DataError(f"{data}: fold {k}/{n} is empty ({len(ds)} samples)")
        ds.source = f"{data}:fold={k}/{n}"
        keep = _select(ds.names, offset, limit, spread, exclude, ds.source)
        return ds.subset(keep)
    if data == "samples":
        files = skimage_photo_paths()
        keep = _select([f.name for f in files], offset, limit, spread, exclude, data)
        ds = read_images([files[i] for i in keep], preprocess, data)
    elif data.startswith("fashion-mnist"):
        from .fashion_mnist import PREPROCESS, load_fashion_mnist, to_input

        try:
            spec = as_preprocess(preprocess)
        except PreprocessError as e:
            raise DataError(str(e)) from e
        if spec.kind != PREPROCESS["kind"] or list(spec.mean or []) != PREPROCESS["mean"]:
            raise DataError(f"{data}: Fashion-MNIST is read with its own preprocessing (1 x 28 x 28, "
                            f"--preprocess fashion-mnist) but the model's is {spec.kind!r}: give "
                            "data the model takes, or a Fashion-MNIST model (--preprocess fashion-mnist; a bundle keeps "
                            "the preprocessing it was exported with)")

        split = data.split(":", 1)[1] if ":" in data else "test"
        if split not in ("train", "test"):
            raise DataError(f"{data}: Fashion-MNIST has the splits 'train' and 'test'; write fashion-mnist:train "
                            "or fashion-mnist:test")
        images, labels = load_fashion_mnist(split)
        names = [f"{split}[{i}]" for i in range(len(images))]
        sel = _select(names, offset, limit, spread, exclude, data)
        ds = Dataset(to_input(images[sel]), labels[sel].astype(np.int64), [names[i] for i in sel], data)
    else:
        path = Path(data)
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise DataError(f"{path}: no image files found (looked for .jpg/.jpeg/.png/...)")
            labels = _folder_labels(path, files)
            keep = _select([f.name for f in files], offset, limit, spread, exclude, data)
            ds = read_images([files[i] for i in keep], preprocess, data,
                             None if labels is None else labels[keep], progress)
        elif path.suffix in (".npy", ".npz") and path.is_file():
            ds = _read_arrays(path, offset, limit, spread, exclude)
        elif not path.exists():
            raise DataError(f"{data}: no such file or folder (use a folder of images, .npy/.npz, "
                            f"'fashion-mnist[:train|test]' or 'samples')")
        else:
            raise DataError(f"{data}: unsupported data file; use a folder of images or .npy/.npz")
    check_finite(ds.x, ds.source)
    return ds


def image_files(data: str) -> list[Path]:
    """The image files of an image-folder source (``DIR``, ``DIR:fold=K/N`` or ``samples``) in the order
    :func:`read_dataset` reads them, without decoding any. Raises DataError for other sources."""
    data, fold = parse_fold(data)
    if data == "samples":
        files = skimage_photo_paths()
    else:
        path = Path(data)
        if not path.is_dir():
            raise DataError(f"{data}: not an image folder (augmented views need image files)")
        files = list_images(path)
    if not files:
        raise DataError(f"{data}: no image files found (looked for .jpg/.jpeg/.png/...)")
    if fold is not None:
        k, n = fold
        files = files[k::n]
        if not files:
            raise DataError(f"{data}: fold {k}/{n} is empty")
    return files


def parse_fold(data: str) -> tuple[str, tuple[int, int] | None]:
    """Split ``DATA:fold=K/N`` into ``(DATA, (K, N))``; ``(data, None)`` without the suffix. Raises DataError
    unless ``0 <= K < N``."""
    head, sep, spec = data.rpartition(":fold=")
    if not sep:
        return data, None
    k, slash, n = spec.partition("/")
    if not (slash and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise DataError(f"{data}: fold spec {spec!r}; write ':fold=K/N' with 0 <= K < N, e.g. ':fold=1/2'")
    return head, (int(k), int(n))


def _select(names: list[str], offset: int, limit: int | None, spread: bool, exclude: set, source: str) -> list[int]:
    """Indices of the chosen samples (see :func:`read_dataset`)."""
    items = [i for i, n in enumerate(names) if n not in exclude]
    if spread and limit is not None and limit < len(items):
        chosen = [items[int(j)] for j in np.linspace(0, len(items) - 1, limit).round()]
    else:
        chosen = items[offset: None if limit is None else offset + limit]
    if not chosen:
        raise DataError(f"{source}: no samples at offset {offset} (it has {len(items)} after exclusions)")
    if limit is not None and len(chosen) < limit:
        warnings.warn(f"{source}: asked for {limit} samples, only {len(chosen)} available from offset "
                      f"{offset}; using {len(chosen)}", stacklevel=3)
    return chosen


def _read_arrays(path: Path, offset: int, limit: int | None, spread: bool, exclude: set) -> Dataset:
    try:
        if path.suffix == ".npy":
            x, y = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z:
                    raise DataError(f"{path}: .npz needs an array named 'x' (and optionally 'y'); has {list(z)}")
                x, y = z["x"], z["y"] if "y" in z else None
    except (ValueError, OSError) as e:  # object arrays (never unpickled), truncated or non-NumPy files
        raise DataError(f"{path}: not a numeric NumPy array file ({e})") from None
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: dtype {x.dtype}; expected numeric preprocessed inputs")
    if x.dtype == np.uint8:
        warnings.warn(f"{path}: uint8 values are used as they are; .npy inputs must already be preprocessed "
                      f"(scaled and normalised like the model's input)", stacklevel=2)
    if x.ndim != 4:
        raise DataError(f"{path}: expected preprocessed inputs (N, C, H, W), got shape {x.shape}")
    names = [f"{path.name}[{i}]" for i in range(len(x))]
    sel = _select(names, offset, limit, spread, exclude, str(path))
    return Dataset(x[sel].astype(np.float32), None if y is None else y[sel].astype(np.int64),
                   [names[i] for i in sel], str(path))


def check_finite(x: np.ndarray, source: str) -> None:
    """Raise DataError when any sample of ``x`` (N, ...) holds NaN or Inf, naming how many samples do."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{source}: {int(bad.sum())} of {len(x)} samples contain NaN/Inf; fix or drop them")


def check_channels(ds: Dataset, input_shape, options: str = "--calib / --verify-data") -> None:
    """Raise DataError when samples do not match the model's input ``(N, C, H, W)`` (``None`` or a string:
    any size), naming the ``options`` that give the data."""
    want = tuple(input_shape[1:])
    got = tuple(ds.x.shape[1:])
    if len(got) != len(want) or any(isinstance(w, int) and w != g for w, g in zip(want, got)):
        shown = tuple(w if isinstance(w, int) else "?" for w in want)
        raise DataError(f"{ds.source}: samples have shape {got}, the model expects {shown} (C, H, W); pass real "
                        f"inputs of that shape with {options}, or check the model's --preprocess / --input-shape "
                        "(a bundle keeps those it was exported with)")


__all__ = ["Dataset", "DataError", "default_data", "read_dataset", "parse_fold", "image_files", "read_images",
           "check_finite", "check_channels", "normalize"]

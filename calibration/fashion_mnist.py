"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) reader for the IDX files shipped by Debian's
``dataset-fashion-mnist`` package, plus the fixed preprocessing the reference model uses.

numpy only (no torch), so calibration and the runtime can share it.

Files read (gzip-compressed IDX): ``{train,t10k}-images-idx3-ubyte.gz`` and
``{train,t10k}-labels-idx1-ubyte.gz`` under ``root``; ``root`` defaults to
``$EETOOL_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "EETOOL_FASHION_MNIST"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim

# Mean/std of the 60k training images after scaling to [0, 1] (computed once, fixed here so the
# exported bundle and the runtime agree bit for bit).
MEAN = 0.2860
STD = 0.3530
PREPROCESS = {"kind": "array", "scale": 1.0 / 255.0, "mean": [MEAN], "std": [STD], "layout": "NCHW"}


def default_root() -> Path:
    """``$EETOOL_FASHION_MNIST`` if set, else Debian's install location."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one gzip IDX file; returns uint8 array with the header's dims.

    Raises FileNotFoundError (naming the Debian package) when missing, ValueError when the magic number,
    dims or payload size do not match.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}. Install Debian's dataset-fashion-mnist "
            f"(apt-get install -y dataset-fashion-mnist) or point ${ENV_VAR} at a folder holding the "
            f"*-ubyte.gz files.")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable gzip IDX file ({e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: IDX magic 0x{got:08x}, expected 0x{magic:08x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n = int(np.prod(dims))
    if len(raw) - header != n:
        raise ValueError(f"{path}: IDX dims {dims} need {n} bytes of data, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60 000 samples) or ``"test"`` (10 000 samples).
        root: folder with the ``*-ubyte.gz`` files; default :func:`default_root`.

    Returns:
        ``(images, labels)``: images uint8 ``(N, 28, 28)`` (0 = background), labels int64 ``(N,)`` in 0..9
        (class names in :data:`CLASSES`).

    Raises:
        ValueError: unknown split, corrupt/mismatched files, labels outside 0..9.
        FileNotFoundError: files missing (message names the Debian package).
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    base = Path(root) if root is not None else default_root()
    stem = _FILES[split]
    images = _read_idx(base / f"{stem}-images-idx3-ubyte.gz", _IMAGES_MAGIC, 3)
    labels = _read_idx(base / f"{stem}-labels-idx1-ubyte.gz", _LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{split} images have shape {images.shape}, expected (N, 28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{split}: label {int(labels.max())} outside 0..9")
    return images.copy(), labels.astype(np.int64)


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` (or ``(N, 1, 28, 28)``) -> float32 ``(N, 1, 28, 28)`` NCHW model input:
    ``(x * scale - mean) / std`` with :data:`PREPROCESS`."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise ValueError(f"expected (N, 28, 28) or (N, 1, 28, 28) images, got {x.shape}")
    x = x.astype(np.float32) * np.float32(PREPROCESS["scale"])
    return (x - np.float32(MEAN)) / np.float32(STD)

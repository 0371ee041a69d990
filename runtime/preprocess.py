"""Turn an input (image file or array) into the model's float32 input tensor, exactly as the manifest's
``preprocess`` spec says, so that the device reproduces the export-time preprocessing.

Image spec (``kind: image``): decode with Pillow, convert to ``channels`` (RGB or L), resize the shorter
side to ``resize_shorter`` px (``interpolation``), center-crop ``crop`` (H, W), multiply by ``scale``,
subtract ``mean`` and divide by ``std`` per channel, lay out as ``layout`` (NCHW). Array spec
(``kind: array``): uint8 arrays (N, H, W) or (N, C, H, W) get the same scale/mean/std.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Union

import numpy as np

from .manifest import ManifestError, Preprocess

#: ImageNet preprocessing of the zoo models (torchvision's: shorter side 256, center crop 224, mean / std
#: normalisation), as a manifest ``preprocess`` entry (see :class:`runtime.manifest.Preprocess`).
IMAGENET_PREPROCESS = {
    "kind": "image", "channels": "RGB", "resize_shorter": 256, "interpolation": "bilinear",
    "crop": [224, 224], "scale": 1.0 / 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    "layout": "NCHW",
}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class PreprocessError(ValueError):
    """An input cannot be turned into the model's input (unreadable, wrong channel count, bad spec)."""


def as_preprocess(spec: Union[Preprocess, Dict[str, Any]]) -> Preprocess:
    """The manifest's :class:`runtime.manifest.Preprocess`, from itself or its JSON form (a dict such as
    :data:`IMAGENET_PREPROCESS`). Raises PreprocessError naming a bad field."""
    if isinstance(spec, Preprocess):
        return spec
    try:
        return Preprocess.from_json(spec, "preprocess")
    except ManifestError as e:
        raise PreprocessError(str(e))


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise PreprocessError("image inputs need Pillow: pip install pillow") from e
    return Image


def model_crop(path, spec: Union[Preprocess, Dict[str, Any]], crop_sized_as_is: bool = False):
    """The RGB (or L) Pillow image the model sees, before normalisation: decoded, converted to ``channels``,
    shorter side resized to ``resize_shorter`` px, center-cropped to ``crop`` (H, W). With
    ``crop_sized_as_is`` an image already of the crop size is taken as the crop (no resize): a device may
    send the preprocessed crop, re-encoded, instead of its original file. Raises PreprocessError."""
    spec = as_preprocess(spec)
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert(spec.channels or ("L" if len(spec.mean or [0, 0, 0]) == 1 else "RGB"))
            ch, cw = spec.crop or (im.size[1], im.size[0])
            if crop_sized_as_is and im.size == (cw, ch):
                return im
            w, h = im.size
            short = int(spec.resize_shorter or min(w, h))
            s = short / min(w, h)
            resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[
                spec.interpolation or "bilinear"]
            if (round(w * s), round(h * s)) != (w, h):
                im = im.resize((round(w * s), round(h * s)), resample)
            w, h = im.size
            left, top = (w - cw) // 2, (h - ch) // 2
            return im.crop((left, top, left + cw, top + ch))
    except (OSError, ValueError) as e:
        raise PreprocessError(f"{path}: cannot read as an image ({e})")


def load_image(path, spec: Union[Preprocess, Dict[str, Any]], crop_sized_as_is: bool = False) -> np.ndarray:
    """One image file -> float32 ``(C, H, W)`` (NCHW layout without the batch), as ``spec`` (the manifest's
    ``preprocess``) says, via :func:`model_crop`. Raises PreprocessError."""
    spec = as_preprocess(spec)
    arr = np.asarray(model_crop(path, spec, crop_sized_as_is), dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return normalize(arr.transpose(2, 0, 1), spec)


def decode_image(data: bytes, spec: Union[Preprocess, Dict[str, Any]], name: str = "image bytes") -> np.ndarray:
    """An encoded image file held in memory (JPEG, PNG, ...) -> float32 ``(C, H, W)``, as :func:`load_image`
    does for a file, except that an image already of the crop size is taken as it is (the device sent the
    preprocessed crop). Raises PreprocessError naming ``name``."""
    import io

    try:
        return load_image(io.BytesIO(bytes(data)), spec, crop_sized_as_is=True)
    except PreprocessError as e:
        raise PreprocessError("%s (%d B): %s" % (name, len(data), str(e).split(": ", 1)[-1]))


def normalize(chw: np.ndarray, spec: Union[Preprocess, Dict[str, Any]]) -> np.ndarray:
    """Apply ``scale``, ``mean``, ``std`` to a ``(C, H, W)`` or ``(N, C, H, W)`` array; float32 out."""
    spec = as_preprocess(spec)
    x = chw.astype(np.float32) * np.float32(1.0 if spec.scale is None else spec.scale)
    c_axis = -3
    mean = np.asarray([0.0] if spec.mean is None else spec.mean, np.float32)
    std = np.asarray([1.0] if spec.std is None else spec.std, np.float32)
    shape = [1] * x.ndim
    shape[c_axis] = -1
    if mean.size not in (1, x.shape[c_axis]):
        raise PreprocessError(f"input has {x.shape[c_axis]} channels, preprocessing expects {mean.size}")
    return ((x - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)


def list_images(folder) -> List[Path]:
    """Image files under ``folder`` (recursive, sorted); other files (e.g. synsets.txt) are skipped."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_inputs(paths: Iterable, spec: Union[Preprocess, Dict[str, Any]]) -> np.ndarray:
    """Image files (or ``.npy`` arrays already in model layout) -> float32 batch ``(N, C, H, W)``."""
    spec = as_preprocess(spec)
    out = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False).astype(np.float32)
            out.extend(arr if arr.ndim == 4 else arr[None])
        else:
            out.append(load_image(p, spec))
    if not out:
        raise PreprocessError("no inputs given")
    return np.stack(out)

"""Unlabelled natural photos -> augmented random crops, the training views for head network distillation.

HND needs no labels (the teacher's own features are the targets), so any natural photos will do. Two
sources are cut the same way, with different crop sizes:

- ImageNet-style photos (shorter side ~256 px): random resized crops covering ``scale`` = 25-100 % of the
  image, as in the ImageNet recipes of torchvision / sc2bench, plus the plain center crop as view 0, so the
  evaluation view is always in the training set;
- large photos (wallpapers, 2-6k px): first reduced to a shorter side of ``max_side`` px, then cut into
  crops covering 3-50 % of it, so an object fills a crop roughly as in ImageNet photos.

Each crop is flipped left-right with probability 1/2 and colour-jittered (brightness, contrast and
saturation factors drawn from ``[1 - jitter, 1 + jitter]``, as torchvision's ``ColorJitter``), resized to
the model's crop (bilinear) and normalised with the model's ``preprocess`` spec.

Every random draw comes from ``numpy.random.default_rng([seed, file_index, view])``: the same seed gives
the same crops in any order, on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from runtime.manifest import Preprocess
from runtime.preprocess import PreprocessError, as_preprocess, normalize

from .readers import DataError


@dataclass(frozen=True)
class CropSpec:
    """How to cut one view: ``scale`` (min, max) fraction of the source area, ``ratio`` (min, max) aspect
    ratio w/h (log-uniform), horizontal ``flip`` with p=1/2, colour ``jitter`` strength (0 = none), sources
    reduced first to a shorter side of at most ``max_side`` px, and ``center_first``: view 0 is the
    evaluation view (resize shorter side, center crop) instead of a random one."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.4
    max_side: int = 1024
    center_first: bool = True


#: ImageNet-sized photos (shorter side ~256 px).
IMAGENET_VIEWS = CropSpec()
#: Large photographs (desktop wallpapers): smaller crops of a reduced image, no center view.
LARGE_PHOTO_VIEWS = CropSpec(scale=(0.03, 0.5), max_side=768, center_first=False)


def _open_rgb(path: Path, max_side: int):
    from PIL import Image

    try:
        im = Image.open(path)
        if im.format == "JPEG":  # decode at reduced size straight away (4k wallpapers)
            im.draft("RGB", (max_side, max_side))
        im = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read as an image ({e})") from None
    short = min(im.size)
    if short > max_side:
        s = max_side / short
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.BILINEAR)
    return im


def _center_view(im, preprocess: Preprocess):
    from PIL import Image

    w, h = im.size
    short = int(preprocess.resize_shorter or min(w, h))
    s = short / min(w, h)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[
        preprocess.interpolation or "bilinear"]
    im = im.resize((round(w * s), round(h * s)), resample)
    ch, cw = preprocess.crop
    left, top = (im.size[0] - cw) // 2, (im.size[1] - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def _random_view(im, spec: CropSpec, size: tuple[int, int], rng: np.random.Generator):
    """torchvision's RandomResizedCrop box sampling (10 tries, then the largest centered crop that fits)."""
    from PIL import Image

    w, h = im.size
    area = w * h
    for _ in range(10):
        a = area * rng.uniform(*spec.scale)
        r = float(np.exp(rng.uniform(np.log(spec.ratio[0]), np.log(spec.ratio[1]))))
        cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    return im.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, left + cw, top + ch))


def _jitter(im, strength: float, rng: np.random.Generator):
    from PIL import ImageEnhance

    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhancer(im).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return im


def iter_views(files: list[Path], views: int, preprocess: Preprocess | dict, seed: int,
               spec: CropSpec = IMAGENET_VIEWS) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, x)`` for ``views`` augmented views of each file, file by file; ``x`` is float32
    ``(C, H, W)`` preprocessed like the model's input (``preprocess``: an image spec with ``crop``).

    Raises DataError for an unreadable file or a preprocess spec that is not an RGB image spec."""
    try:
        preprocess = as_preprocess(preprocess)
    except PreprocessError as e:
        raise DataError(str(e)) from None
    if preprocess.kind != "image" or not preprocess.crop:
        raise DataError(f"augmented crops need an image model (preprocess kind 'image' with a crop), got "
                        f"{preprocess.kind!r}")
    size = tuple(preprocess.crop)
    from PIL import Image

    for i, path in enumerate(files):
        im = _open_rgb(Path(path), spec.max_side)
        for v in range(views):
            rng = np.random.default_rng([seed, i, v])
            if v == 0 and spec.center_first:
                crop = _center_view(im, preprocess)
            else:
                crop = _random_view(im, spec, size, rng)
                if spec.flip and rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                if spec.jitter > 0:
                    crop = _jitter(crop, spec.jitter, rng)
            try:
                x = normalize(np.asarray(crop, np.float32).transpose(2, 0, 1), preprocess)
            except PreprocessError as e:
                raise DataError(f"{path}: {e}") from None
            yield f"{Path(path).name}#{v}", x


def count_views(files: list[Path], views: int) -> int:
    """Number of views :func:`iter_views` yields for ``files``."""
    return len(files) * views


__all__ = ["CropSpec", "IMAGENET_VIEWS", "LARGE_PHOTO_VIEWS", "iter_views", "count_views"]

"""``eetool bottleneck train``: photos -> augmented views -> cached teacher features -> PCA initialisation ->
head network distillation -> ``bottleneck.pt`` + ``bottleneck.json`` + ``curves.png`` in the output folder.

The data are unlabelled photos (labels, when the folder has them, are never read):

- ``data``: image folders (``DIR`` or ``DIR:fold=K/N``; see :mod:`calibration.readers`); each image gives
  ``views`` views (its center crop and random resized crops, :data:`calibration.photos.IMAGENET_VIEWS`),
  except every ``val_every``-th image, held out for validation (center crop only);
- ``photos``: large photographs, files or folders (e.g. Debian's wallpaper packages), each cut into
  ``photo_crops`` random crops (:data:`calibration.photos.LARGE_PHOTO_VIEWS`).
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from calibration.photos import IMAGENET_VIEWS, LARGE_PHOTO_VIEWS, iter_views
from calibration.readers import DataError, image_files
from runtime.preprocess import IMAGE_SUFFIXES, list_images

from . import bottleneck as B
from .distill import (DistillConfig, Objective, build_cache, cache_key, fingerprint, plot_curves, prepare_cache,
                      say, train)
from .flops import module_flops
from .sources import ModelSource


@dataclass
class TrainData:
    """Where the views come from (see the module doc)."""

    data: list[str]
    photos: list[str] = field(default_factory=list)
    views: int = 16
    photo_crops: int = 32
    val_every: int = 8

    def split_files(self) -> tuple[list[Path], list[Path], list[Path]]:
        """(training images, validation images, large photos). Raises DataError when a source is empty or
        nothing is left for training or validation."""
        if not self.data:
            raise DataError("give at least one image folder with --data")
        files = [f for d in self.data for f in image_files(d)]
        if self.val_every < 2:
            raise DataError(f"--val-every {self.val_every}: must be >= 2 (every N-th image is held out)")
        val = files[self.val_every - 1::self.val_every]
        held = set(val)
        train_files = [f for f in files if f not in held]
        if not val or not train_files:
            raise DataError(f"{len(files)} images cannot be split 1-in-{self.val_every} into training and "
                            f"validation; give more images or a smaller --val-every")
        photos = []
        for d in self.photos:
            if Path(d).is_file() and Path(d).suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{d}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}) for --photos")
            found = [Path(d)] if Path(d).is_file() else list_images(Path(d))
            if not found:
                raise DataError(f"{d}: no image files found for --photos")
            photos += found
        return train_files, val, photos


def _describe_files(files: list[Path]) -> list[list]:
    return [[str(f), f.stat().st_size] for f in files]


_KEYED_WHEN_SET = ("rate_weight", "kd_temperature")
_FLAGS = {"split": "--split", "target": "--target-layer", "channels": "--channels", "stride": "--stride",
          "tune_from": "--tune-from", "refine": "--refine"}


def warm_start_from(path: Path, source: ModelSource, spec: B.BottleneckSpec) -> tuple[dict, dict]:
    """(trainable tensors, description) of the trained bottleneck in ``path``, to continue training it
    (e.g. on more photos, on a coarser wire grid, or with a later target layer, so that the server side
    fine-tunes more of the original layers: only ``bits`` and ``target`` may differ from ``spec``; the
    description's ``target`` says which it had). Raises BottleneckError for a corrupt folder, another model or
    another layout, naming the differing fields."""
    state, cfg = B.read_state(path, source.describe().get("source"))
    theirs = asdict(B.spec_of(cfg))
    ours = asdict(spec)
    diff = [k for k in ours if k not in ("bits", "target") and theirs[k] != ours[k]]
    if diff:
        raise B.BottleneckError(f"--init-from {path} was trained with another layout: "
                                + ", ".join(f"{_FLAGS[k]} {theirs[k]} (asked: {ours[k]})" for k in diff)
                                + "; give the same options (only --bits and a later --target-layer may differ)")
    return state, {"from": str(Path(path).resolve()), "sha256": cfg["weights"]["sha256"], "bits": cfg["bits"],
                   "target": theirs["target"],
                   "epochs": cfg.get("training", {}).get("config", {}).get("epochs"),
                   "validation_agreement": cfg.get("validation_agreement")}


def train_bottleneck(source: ModelSource, spec: B.BottleneckSpec, data: TrainData, cfg: DistillConfig,
                     out: Path, cache: Path | None = None, command: str = "", init_from: Path | None = None) -> dict:
    """Build, initialise and distil a bottleneck for ``source`` and write it to ``out``; returns the
    ``bottleneck.json`` dict. ``cache`` (default ``out/cache``) holds the teacher features; runs that share
    model, split, target, tune_from, data, views and seed can share it (it does not depend on channels or
    bits). ``init_from``: start from that trained bottleneck instead of the PCA initialisation (see
    :func:`warm_start_from`). Raises DataError / BottleneckError / SplitError for bad inputs."""
    out = Path(out)
    if cfg.kd_temperature and "logits" not in cfg.match:
        raise B.BottleneckError("kd_temperature sets how the logits are matched: add 'logits' to match, or drop it")
    if init_from and Path(init_from).resolve() == out.resolve():
        raise B.BottleneckError(f"--init-from {init_from} is also -o: give another -o (training would overwrite "
                                "the bottleneck it starts from)")
    warm = warm_start_from(Path(init_from), source, spec) if init_from else None
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    train_files, val_files, photos = data.split_files()
    prep = source.preprocess
    sample = torch.zeros(source.input_shape)
    built = B.build(source.model, sample, spec)
    if warm:  # the starting weights, loaded before the teacher features: tensors that do not fit fail now
        B.load_trainable(built.model, warm[0], f"--init-from {init_from}", extend=warm[1]["target"] != spec.target)
    cache = Path(cache) if cache else out / "cache"
    teacher_parts = {"model": source.describe(), "split": spec.split, "target": spec.target,
                     "tune_from": spec.tune_from, "preprocess": prep, "seed": cfg.seed}
    n_train = len(train_files) * data.views + len(photos) * data.photo_crops
    train_views = itertools.chain(iter_views(train_files, data.views, prep, cfg.seed, IMAGENET_VIEWS),
                                  iter_views(photos, data.photo_crops, prep, cfg.seed + 1, LARGE_PHOTO_VIEWS))
    train_key = cache_key({**teacher_parts, "files": _describe_files(train_files), "views": data.views,
                           "photos": _describe_files(photos), "photo_crops": data.photo_crops,
                           "spec": [asdict(IMAGENET_VIEWS), asdict(LARGE_PHOTO_VIEWS)]})
    val_key = cache_key({**teacher_parts, "files": _describe_files(val_files), "views": 1})
    say(f"{len(train_files)} training images x {data.views} views + {len(photos)} large photos x "
        f"{data.photo_crops} crops = {n_train} views; {len(val_files)} validation images")
    train_cache = build_cache(cache / f"train-{train_key}", train_key, built, train_views, n_train)
    val_cache = build_cache(cache / f"val-{val_key}", val_key, built,
                            iter_views(val_files, 1, prep, cfg.seed, IMAGENET_VIEWS), len(val_files),
                            desc="validation features")
    parts = B.tail_parts(source.model, sample, spec.target, [m for m in cfg.match if m != "logits"])
    prepare_cache(train_cache, parts, tuple(cfg.match))
    prepare_cache(val_cache, parts, tuple(dict.fromkeys((*cfg.match, "logits"))))
    # options added later join the key only when used, so runs from before they existed still resume
    keyed = {k: v for k, v in asdict(cfg).items() if k != "threads" and (v or k not in _KEYED_WHEN_SET)}
    run_key = fingerprint({"spec": asdict(spec), "cfg": keyed,
                           "train": train_key, "val": val_key, "init": warm[1]["sha256"] if warm else "pca"})
    t0 = time.time()
    obj = Objective(built.model, parts, tuple(cfg.match), spec.bits, cfg.rec_weight, cfg.rate_weight,
                    cfg.kd_temperature)
    result = train(built, obj, train_cache, val_cache, cfg, out, run_key, warm[1] if warm else None)
    hist = result["history"]
    bm = built.model
    total = module_flops(source.model, sample) / 1e6
    device = B.device_mflops(bm, sample)
    info = {
        "model": source.describe(),
        "split_shape": list(built.split_shape), "target_shape": list(built.target_shape),
        "code_shape": list(built.code_shape),
        "device_mflops": device, "model_mflops": total, "device_fraction": device / total,
        "wire": {"bits": spec.bits, "scale": 1.0 / ((1 << spec.bits) - 1), "zero_point": 0,
                 "scheme": "per-tensor uniform on [0, 1] (the encoder ends in a clamp to [0, 1])"},
        "training": {
            "method": "head network distillation (Matsubara et al. 2019) with a reconstruction term (GHND)",
            "data": data.data, "photos": data.photos, "views_per_image": data.views,
            "crops_per_photo": data.photo_crops, "train_images": len(train_files), "large_photos": len(photos),
            "train_views": n_train, "validation_images": len(val_files),
            "validation": f"every {data.val_every}th image of --data, center crop", "labels_used": False,
            "config": asdict(cfg), "init": result["init"], "best_epoch": result["best_epoch"],
            "history": hist, "train_seconds": result["seconds"], "wall_seconds": time.time() - t0,
            "torch": torch.__version__, "command": command or None,
        },
        "validation_agreement": hist["val_agreement"][result["best_epoch"]],
    }
    config = B.save(out, bm, spec, info)
    plot_curves(hist, out / "curves.png",
                f"{source.name}: bottleneck {spec.channels} ch at {spec.split} -> {spec.target}, {spec.bits}-bit")
    say(f"wrote {out / B.WEIGHTS} (epoch {result['best_epoch']}, validation agreement "
        f"{info['validation_agreement']:.1%}), {out / B.CONFIG}, {out / 'curves.png'}; device side "
        f"{device:.1f} of {total:.1f} MFLOPs ({device / total:.1%})")
    return config


__all__ = ["TrainData", "train_bottleneck", "warm_start_from"]

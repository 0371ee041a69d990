"""``eetool export MODEL --split S --bottleneck DIR``: the model with its trained bottleneck as the source to
slice. The device graph is head + encoder, the server graph decoder + tail (the cut is the module
``encoder`` of :class:`~toolkit.bottleneck.BottleneckModel`); everything else (ONNX / TFLite, int8,
verification against PyTorch, the bundle) is the ordinary export. The manifest's ``bottleneck`` entry
(:class:`runtime.manifest.Bottleneck`) says which bottleneck it is."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from runtime.manifest import Bottleneck

from . import bottleneck as B
from .sources import ModelSource

#: the cut between device and server in a model with a bottleneck (the encoder's output tensor)
CUT = "encoder"


def manifest_section(cfg: dict, folder: Path) -> Bottleneck:
    """The manifest's ``bottleneck`` entry from a ``bottleneck.json``: where (split S, target layer T, the
    cut), how big (channels, stride, code shape), the bits the training simulated, device MFLOPs, the
    training data, and the weights' file name and sha256."""
    t = cfg.get("training", {})
    keys = ("method", "data", "photos", "views_per_image", "crops_per_photo", "train_images", "large_photos",
            "train_views", "validation_images", "labels_used", "best_epoch", "command")
    return Bottleneck.from_json({
        "split": cfg["split"], "target": cfg["target"], "cut": CUT, "channels": cfg["channels"],
        "stride": cfg["stride"], "code_shape": cfg["code_shape"], "bits": cfg["bits"],
        "tune_from": cfg.get("tune_from"), "refine": cfg.get("refine"), "split_shape": cfg["split_shape"],
        "target_shape": cfg["target_shape"], "device_mflops": cfg["device_mflops"],
        "model_mflops": cfg["model_mflops"], "validation_agreement": cfg.get("validation_agreement"),
        "training": {k: t[k] for k in keys if t.get(k) is not None},
        "weights": {"source": str(folder), **cfg["weights"]},
    }, "manifest.bottleneck")


def with_bottleneck(src: ModelSource, folder: Path, split: list[str]) -> tuple[ModelSource, list[str], dict]:
    """(source whose model is ``src``'s with the bottleneck of ``folder``, the cut list to export, the
    manifest section). Raises BottleneckError when ``split`` is not the bottleneck's split point or the
    folder does not belong to this model."""
    cfg = B.read_config(folder)
    if list(split) != [cfg["split"]]:
        raise B.BottleneckError(f"{folder} holds a bottleneck trained at --split {cfg['split']}; export it with "
                                f"--split {cfg['split']} (one split point), got {','.join(split)}")
    built, cfg = B.load(folder, src.model, torch.zeros(src.input_shape), src.name)
    return dataclasses.replace(src, model=built.model.eval()), [CUT], manifest_section(cfg, folder)


__all__ = ["CUT", "manifest_section", "with_bottleneck"]

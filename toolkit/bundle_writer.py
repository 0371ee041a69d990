"""Write the self-contained bundle directory around the exported graphs: the runtime package, board
profiles, per-board requirements, a Makefile, sample inputs, and the manifest with every file's sha256.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from runtime.bundle import sha256_file
from runtime.manifest import SCHEMA, Manifest, manifest_json

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"

# Wheels for the board side: numpy + one interpreter (+ optional codecs and Pillow). Versions with
# cp311 manylinux aarch64 wheels (Raspberry Pi OS bookworm) and cp38 ones (JetPack 5).
BOARD_REQUIREMENTS = {
    "rpi3": ["numpy==1.26.4", "ai-edge-litert==2.3.0", "onnxruntime==1.22.1", "zstandard==0.25.0", "lz4==4.4.5",
             "pillow==11.3.0"],
    "rpi4": ["numpy==1.26.4", "ai-edge-litert==2.3.0", "onnxruntime==1.22.1", "zstandard==0.25.0", "lz4==4.4.5",
             "pillow==11.3.0"],
    "rpi5": ["numpy==1.26.4", "ai-edge-litert==2.3.0", "onnxruntime==1.22.1", "zstandard==0.25.0", "lz4==4.4.5",
             "pillow==11.3.0"],
    # JetPack 5 ships Python 3.8: last numpy / onnxruntime releases for 3.8; LiteRT falls back to tflite-runtime.
    "jetson-nano": ["numpy==1.24.4", "onnxruntime==1.16.3", "zstandard==0.23.0", "lz4==4.3.3", "pillow==10.4.0"],
    "jetson-orin-nano": ["numpy==1.24.4", "onnxruntime==1.19.2", "zstandard==0.23.0", "lz4==4.3.3", "pillow==10.4.0"],
    "jetson-agx-orin": ["numpy==1.24.4", "onnxruntime==1.19.2", "zstandard==0.23.0", "lz4==4.3.3", "pillow==10.4.0"],
    "host": ["numpy==2.4.6", "onnxruntime==1.32.0", "ai-edge-litert==2.3.0", "zstandard==0.25.0", "lz4==4.4.5",
             "pillow==13.0.0"],
}


def copy_support_files(out: Path, sample_files: list[Path]) -> None:
    """Copy the runtime package, boards/, the bundle Makefile, requirements and sample inputs into ``out``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("runtime", "boards"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=ignore, dirs_exist_ok=True)
    shutil.copy(TEMPLATES / "bundle.Makefile", out / "Makefile")
    if (REPO / "docs" / "protocol.md").is_file():
        shutil.copy(REPO / "docs" / "protocol.md", out / "PROTOCOL.md")
    req = out / "requirements"
    req.mkdir(exist_ok=True)
    for board, pins in BOARD_REQUIREMENTS.items():
        (req / f"{board}.txt").write_text("# pip install -r this file on the board (wheels only)\n"
                                          + "\n".join(pins) + "\n")
    if sample_files:
        (out / "samples").mkdir(exist_ok=True)
        for f in sample_files:
            shutil.copy(f, out / "samples" / Path(f).name)


def write_array_samples(folder: Path, data, preprocess: dict, n: int = 8) -> list[Path]:
    """Write up to ``n`` samples of ``data`` (float32 NCHW, preprocessed) back as 8-bit PNG files, inverting
    the ``array`` preprocessing (scale, mean, std), so ``runtime run`` has real inputs to read. Returns the
    files written (none for image models)."""
    import numpy as np
    from PIL import Image

    if preprocess.get("kind") != "array":
        return []
    folder.mkdir(parents=True, exist_ok=True)
    mean = np.asarray(preprocess.get("mean", [0.0]), np.float32).reshape(-1, 1, 1)
    std = np.asarray(preprocess.get("std", [1.0]), np.float32).reshape(-1, 1, 1)
    files = []
    for i, x in enumerate(data.x[:n]):
        u8 = np.clip(np.rint((x * std + mean) / preprocess.get("scale", 1.0)), 0, 255).astype(np.uint8)
        label = "" if data.y is None else f"_label{int(data.y[i])}"
        files.append(folder / f"sample{i}{label}.png")
        Image.fromarray(u8[0] if u8.shape[0] == 1 else u8.transpose(1, 2, 0)).save(files[-1])
    return files


def write_manifest(out: Path, manifest: Manifest) -> None:
    """Fill ``manifest.files`` with the sha256 of every file under ``out`` (manifest.json excluded) and
    write ``manifest.json``. Raises ``runtime.manifest.ManifestError`` (naming the field) for a manifest the
    runtime would refuse, before anything is written."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts:
            files[p.relative_to(out).as_posix()] = sha256_file(p)
    manifest.schema = SCHEMA
    manifest.files = files
    (out / "manifest.json").write_text(manifest_json(manifest))

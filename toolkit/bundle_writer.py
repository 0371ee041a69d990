"""Write the self-contained bundle directory around the exported graphs: the runtime package, board
profiles, per-board requirements (from each profile's ``requirements``), a Makefile, sample inputs, and the
manifest with every file's sha256.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from runtime.boards import list_boards, load_board, requirements_text
from runtime.bundle import sha256_file
from runtime.manifest import SCHEMA, Manifest, manifest_json

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"


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
    boards = str(REPO / "boards")
    for board in list_boards(boards):  # each board's pins live in its profile (boards/NAME.json "requirements")
        (req / f"{board}.txt").write_text(requirements_text(load_board(board, boards)))
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

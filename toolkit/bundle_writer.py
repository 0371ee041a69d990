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


def check_output_dir(out: Path, inputs: tuple = ()) -> None:
    """Refuse ``out`` as a bundle folder unless writing it loses nothing: it must not exist, be empty, or
    hold an eetool bundle (a ``manifest.json`` beside ``graphs/``), which is replaced. It must not be the
    current folder or one above it, nor contain or equal any of ``inputs`` (model, data, exits paths).
    Raises ExportError naming the folder and what to do."""
    from .onnx_export import ExportError

    out = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ExportError(f"-o {out}: the bundle folder is replaced on export and this is the current folder "
                          "(or above it); give a new folder, e.g. -o out/bundle")
    for p in inputs:
        p = Path(str(p).split(":")[0]).resolve() if p else None
        if p is not None and p.exists() and (p == out or out in p.parents):
            raise ExportError(f"-o {out} holds the input {p}, and the bundle folder is replaced on export; "
                              "give a new folder for the bundle")
    if out.exists() and not out.is_dir():
        raise ExportError(f"-o {out} is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not ((out / "manifest.json").is_file() and (out / "graphs").is_dir()):
        raise ExportError(f"-o {out} is not empty and holds no eetool bundle; exporting would delete what is "
                          "there. Give a new or empty folder, or delete it yourself first")


def fresh_bundle_dir(out: Path) -> None:
    """Replace ``out`` (after :func:`check_output_dir`) by an empty bundle folder with ``graphs/``."""
    check_output_dir(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "graphs").mkdir(parents=True)


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

"""Per-layer latency of a model for ``eetool plan``: cumulative milliseconds from the input to the end of
every candidate split point, from one of three sources, in this priority:

1. a layer profile measured on the board (``runtime.profile_layers``; ``--measurements FILE``);
2. the same onnxruntime per-layer profiling run on this machine ("measured on this host"; used only when
   the board is ``host`` — a host measurement is never passed off as another board's, nor scaled);
3. an estimate, ``ms = MFLOPs / gflops_sustained`` (1 MFLOP at 1 GFLOP/s takes 1 ms) from the board
   profile's ``compute.gflops_sustained``, labelled ESTIMATE.

This is the per-layer latency part of the Neurosurgeon model (Kang et al., "Neurosurgeon: Collaborative
Intelligence Between the Cloud and Mobile Edge", ASPLOS 2017), which profiles per-layer latency and
output size and combines them with the link bandwidth to choose the split. Units: milliseconds (ms),
MFLOPs (10^6 floating-point operations, 2 per multiply-add), GFLOP/s.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from runtime.boards import load_board
from runtime.profile_layers import SCHEMA, ProfileError, load_profile, preprocess_ms, profile_onnx

from .onnx_export import export_onnx
from .slicing import INPUT_NAME, OUTPUT_NAME

SOURCE_HOST = "measured on this host"
SOURCE_ESTIMATE = "ESTIMATE from FLOPs"


def export_whole_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """The whole model as one ONNX graph (``input`` -> ``logits``), with the exporter's module-scoped node
    names that :mod:`runtime.profile_layers` maps back to module paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model.eval(), (torch.zeros(input_shape),), path, [INPUT_NAME], [OUTPUT_NAME])
    return path


def measure_host(model: torch.nn.Module, input_shape: tuple[int, ...], x: np.ndarray, files=None,
                 preprocess: dict | None = None, runs: int = 20, warmup: int = 3,
                 threads: int | None = None) -> dict:
    """Layer profile of ``model`` on this machine: export to ONNX, profile with onnxruntime on the real
    inputs ``x`` (float32 NCHW, batch 1 each) and, with image ``files``, the median preprocessing time."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_whole_onnx(model, input_shape, Path(tmp) / "model.onnx")
        prof = profile_onnx(onnx_path, [x[i: i + 1] for i in range(len(x))], runs, warmup, threads, "host",
                            source_note=SOURCE_HOST)
    if files and preprocess and preprocess.get("kind") == "image":
        prof["preprocess_ms"] = preprocess_ms(files, preprocess)
    prof["label"] = SOURCE_HOST
    return prof


def estimate_profile(table: dict, board: dict) -> dict:
    """Layer profile from :func:`toolkit.inspect_model.split_table` FLOPs and the board's sustained
    GFLOP/s: ``cumulative_ms[cut] = head_mflops / gflops`` for every row and its aliases."""
    gflops = float(board["compute"]["gflops_sustained"])
    cum = {}
    for r in table["rows"]:
        for name in [r["name"]] + list(r["aliases"]):
            cum[name] = r["head_mflops"] / gflops
    return {"schema": SCHEMA, "board": board["name"], "label": SOURCE_ESTIMATE,
            "source": "MFLOPs / %.1f GFLOP/s (boards/%s.json compute.gflops_sustained: %s)" % (
                gflops, board["name"], board.get("sources", {}).get("compute", "no source given")),
            "total_ms": table["total_mflops"] / gflops, "cumulative_ms": cum, "gflops": gflops}


def load_measurements(path) -> dict:
    """A layer profile measured on the board, labelled as such: a layer-profile JSON, or the folder a
    ``runtime bench`` run wrote (its ``layers.json``). Raises ``ProfileError``."""
    path = Path(path)
    if path.is_dir():
        if not (path / "layers.json").is_file():
            raise ProfileError(f"{path} holds no layers.json: run 'python -m runtime bench BUNDLE --out {path}' "
                               f"on the board, without --no-layer-profile, on a bundle exported without "
                               f"--no-profile-graph (its report.json says why a profile was skipped)")
        path = path / "layers.json"
    prof = load_profile(path)
    prof = dict(prof)
    prof["label"] = f"measured on {prof['board']} (file {Path(path).name})"
    prof["file"] = str(path)
    return prof


def is_layer_profile(path: str) -> bool:
    """Whether ``path`` (a ``--server-profile`` value) names a layer profile rather than a board: a bench
    folder (loading it then says what is missing), or a JSON file whose object has ``cumulative_ms``. An
    unreadable JSON file raises ProfileError (so it is not mistaken for a missing board profile)."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.suffix == ".json" and p.is_file():
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ProfileError(f"cannot read {p}: {e}")
        return isinstance(obj, dict) and "cumulative_ms" in obj
    return False


def check_architecture(profile: dict, board: dict) -> None:
    """Refuse a profile whose recorded CPU architecture (``machine``) is not the board's (e.g. a bench run
    on an x86 host with ``--board rpi4``): its times are not that board's. Raises ProfileError."""
    machine, arch = profile.get("machine"), board.get("architecture")
    if board.get("name") != "host" and machine and arch and machine != arch:  # "host" is whatever this is
        raise ProfileError(f"the layer profile says board {profile['board']!r} but was measured on {machine}; "
                           f"{board['name']} is {arch}: measure on the board itself")


def cumulative_for_rows(profile: dict, rows: list[dict]) -> list[tuple[float, str]]:
    """Head milliseconds for each split-table row (in graph order) from ``profile["cumulative_ms"]``, with
    a note: the row's name or one of its aliases; a row whose module left no node of its own in the graph
    (e.g. a BatchNorm folded into the preceding Conv by the exporter) takes the previous row's time
    ("fused into previous"). Raises ValueError when the profile covers none of the rows (another model)."""
    cum = profile["cumulative_ms"]
    known = {n for r in rows for n in [r["name"]] + list(r.get("aliases", []))}
    out: list[tuple[float, str]] = []
    prev = 0.0
    hits = 0
    for r in rows:
        names = [r["name"]] + list(r.get("aliases", []))
        found = next((n for n in names if n in cum), None)
        if found is not None:
            # a module called twice (ResNet's shared ReLU) is scoped relu, relu_1, ... by the exporter:
            # the cut after the module is after its last call
            again = [k for k in cum if k not in known and re.fullmatch(re.escape(found) + r"_\d+", k)]
            prev = max([float(cum[found])] + [float(cum[k]) for k in again])
            hits += 1
            out.append((prev, ""))
        else:
            out.append((prev, "fused into previous"))
    if rows and hits == 0:
        raise ValueError("the layer profile (%s) has no time for any split point of this model: was it measured "
                         "on another model?" % profile.get("source"))
    return out


def board_profile(name_or_path: str) -> dict:
    """The board profile (``boards/NAME.json`` or a path); raises ``runtime.boards.BoardError``."""
    return load_board(name_or_path)

"""Load and check an eetool bundle (see docs/bundle.md): the manifest (:mod:`runtime.manifest`) plus
every file's sha256."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from .manifest import (SCHEMA, ExitBranch, ExitPredictor, GraphEntry, Manifest, ManifestError, Segment, WireTensor,
                       parse_manifest)

__all__ = ["SCHEMA", "Bundle", "BundleError", "sha256_file"]


class BundleError(ValueError):
    """The bundle is missing, corrupt (checksum), or does not match this runtime's schema."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A loaded bundle: ``root`` directory and its validated :class:`runtime.manifest.Manifest`.

    Use :meth:`load`; it raises :class:`BundleError` on a missing manifest, a manifest that does not
    follow the schema (the message names the field), or any file whose sha256 differs from the manifest
    (the message names the files and says to re-copy the bundle).
    """

    def __init__(self, root: Path, manifest: Manifest, int8_target: Optional[str] = None):
        from .targets import host_target

        self.root = root
        self.manifest = manifest
        # which int8 ONNX variant this CPU runs (runtime/targets.py); None: the bundle's primary int8 graphs
        self.int8_target = int8_target or host_target()

    @classmethod
    def load(cls, path, verify: bool = True, int8_target: Optional[str] = None) -> "Bundle":
        """Read ``path``/manifest.json (checksums verified unless ``verify`` is False); ``int8_target``
        overrides the detected CPU target for int8 ONNX graph variants (runtime/targets.py)."""
        root = Path(path)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise BundleError(f"{root}: no manifest.json; is this a directory written by 'eetool export'?")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except ValueError as e:
            raise BundleError(f"{mf}: not valid JSON ({e}); re-copy the bundle")
        try:
            parsed = parse_manifest(manifest, folder=root)
        except ManifestError as e:
            raise BundleError(f"{mf}: {e}")
        bundle = cls(root, parsed, int8_target)
        if verify:
            bundle.verify()
        return bundle

    def verify(self, files: Optional[List[str]] = None) -> None:
        """Recompute sha256 of the listed files (default: all in the manifest); raise BundleError on any
        missing or mismatching file."""
        expected: Dict[str, str] = self.manifest.files
        bad = []
        for rel in files if files is not None else sorted(expected):
            p = self.root / rel
            if rel not in expected:
                bad.append(f"{rel} (not in manifest)")
            elif not p.is_file():
                bad.append(f"{rel} (missing)")
            elif sha256_file(p) != expected[rel]:
                bad.append(f"{rel} (sha256 mismatch)")
        if bad:
            raise BundleError(f"{self.root}: corrupt or mismatched bundle: {', '.join(bad)}; "
                              f"re-copy it or re-run 'eetool export'")

    # --- views on the manifest -------------------------------------------------------------
    @property
    def segments(self) -> List[Segment]:
        return self.manifest.segments

    @property
    def device_segments(self) -> List[Segment]:
        return self.manifest.device_segments

    @property
    def server_segments(self) -> List[Segment]:
        return self.manifest.server_segments

    @property
    def exits(self) -> List[ExitBranch]:
        return self.manifest.exits

    @property
    def predictor(self) -> Optional[ExitPredictor]:
        """The Exit Predictor, or None when the bundle has none."""
        return self.manifest.predictor

    @property
    def wire_tensors(self) -> List[str]:
        """Names of the tensors sent from device to server (outputs of the last device segment)."""
        return self.manifest.wire_tensors

    def tensor(self, name: str) -> WireTensor:
        """The manifest entry of a tensor crossing a cut: shape, dtype, layout, quant (scale, zero point)."""
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise BundleError(f"tensor {name!r} is not in the manifest's tensors: {sorted(self.manifest.tensors)}")

    def graph_key(self, owner: Union[Segment, ExitBranch, ExitPredictor], fmt: str, precision: str) -> str:
        """Key of ``owner``'s (segment, exit or Exit Predictor) graph in ``fmt`` (onnx|tflite) and ``precision`` (fp32|int8);
        for int8, the variant made for :attr:`int8_target` when the bundle has one (runtime/targets.py)."""
        from .targets import choose_graph

        key = owner.graphs.get(f"{fmt}/{precision}")
        if key is None:
            have = sorted(owner.graphs)
            raise BundleError(f"{owner.name} has no {fmt}/{precision} graph (bundle has: {', '.join(have)}); "
                              f"re-export with the matching --format / --int8")
        return choose_graph(self.manifest.graphs, key, self.int8_target)

    def graph(self, key: str) -> GraphEntry:
        return self.manifest.graphs[key]

    def graph_path(self, key: str) -> Path:
        return self.root / self.manifest.graphs[key].file

    def formats(self) -> List[str]:
        """Available ``fmt/precision`` pairs for every graph of the bundle (e.g. ``onnx/fp32``)."""
        return self.manifest.formats()

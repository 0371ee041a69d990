"""Inference sessions behind one interface, bound by tensor name: onnxruntime for ``.onnx`` graphs and
LiteRT (``ai_edge_litert``, fallback ``tflite_runtime``) for ``.tflite`` graphs.

Every session takes and returns float32 arrays keyed by the manifest's tensor names; quantised graph
inputs/outputs are (de)quantised inside the session from the graph's own tensor details.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


class BackendError(RuntimeError):
    """An inference package is missing, or a graph's tensors do not match the names asked for."""


class OrtSession:
    """onnxruntime session on the CPU execution provider.

    ``threads``: intra-op threads (``None`` = onnxruntime's default, one per core). Inputs and outputs
    are float32 NCHW arrays with the batch first, keyed by tensor name.
    """

    def __init__(self, path, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime") from e
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names: List[str] = [i.name for i in self.session.get_inputs()]
        self.output_names: List[str] = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run on ``feeds`` (name -> float32 array) and return name -> float32 array for every output.

        Raises BackendError when a needed input is missing."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{self.path.name}: missing inputs {missing}; got {sorted(feeds)}")
        values = self.session.run(self.output_names, {n: np.ascontiguousarray(feeds[n], dtype=np.float32)
                                                      for n in self.input_names})
        return dict(zip(self.output_names, values))


def open_session(path, fmt: str, threads: Optional[int] = None, name_map: Optional[Dict[str, str]] = None):
    """Open ``path`` with the backend for ``fmt`` (``onnx`` or ``tflite``). ``name_map`` maps our tensor
    names to the graph's own (TFLite signature) names. Raises BackendError for an unknown format."""
    if fmt == "onnx":
        return OrtSession(path, threads)
    if fmt == "tflite":
        from .backend_litert import LiteRTSession

        return LiteRTSession(path, threads=threads, name_map=name_map)
    raise BackendError(f"unknown graph format {fmt!r}: expected onnx or tflite")

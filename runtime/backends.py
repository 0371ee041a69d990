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


#: onnxruntime session config keys for the worker threads' spin-wait between runs (intra-op and inter-op pools)
SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


#: onnxruntime graph transformers every runtime session turns off. ``WeightBiasQuantization``
#: (microsoft/onnxruntime#22969; onnxruntime >= 1.21, so also the boards' 1.22) quantises, at session load
#: and per tensor, the float weights of a Conv / ConvTranspose / Gemm between a per-tensor DequantizeLinear
#: and a QuantizeLinear: the layers an int8 QDQ graph keeps float on purpose (``QuantConfig.float_nodes``,
#: ``float_first_convs``; float logits, which no QuantizeLinear follows, are not touched). Measured on
#: EfficientNet-Lite0's head (stem .. blocks.5, 400 ImageNet samples) with the stem conv kept float:
#: relative error of the head output 0.183 with it, 0.091 without it, 0.113 for the all-int8 graph. Older
#: onnxruntime ignores names it does not know.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def ort_session(model, options, providers: Optional[List[str]] = None):
    """``onnxruntime.InferenceSession`` of ``model`` (path or serialized bytes) with ``options`` and
    :data:`DISABLED_OPTIMIZERS` off: the one constructor of every runtime and bench session."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, sess_options=options,
                                providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


def session_options(threads: Optional[int] = None, allow_spinning: Optional[bool] = None):
    """The ``onnxruntime.SessionOptions`` of every runtime session (the runtime's own and the bare sessions
    the bench compares it with): ``threads`` intra-op threads and one inter-op thread (``None``:
    onnxruntime's defaults); ``allow_spinning`` False sets both :data:`SPIN_KEYS` to ``"0"`` so idle worker
    threads sleep instead of spin-waiting between inferences (less CPU time and energy per inference at a
    low request rate, slightly later wake-up), True sets ``"1"``, None keeps onnxruntime's default
    (spinning on). Raises BackendError when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime") from e
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if allow_spinning is not None:
        for key in SPIN_KEYS:
            opts.add_session_config_entry(key, "1" if allow_spinning else "0")
    opts.log_severity_level = 3
    return opts


class OrtSession:
    """onnxruntime session, on the CPU execution provider unless ``providers`` says otherwise.

    ``threads``: intra-op threads (``None`` = onnxruntime's default, one per core); ``allow_spinning``:
    see :func:`session_options`. ``providers``: execution providers in priority order (from
    :func:`runtime.providers.select_providers`); a GPU provider onnxruntime could not load raises
    :class:`runtime.providers.ProviderError` instead of silently running on the CPU. Inputs and outputs
    are float32 NCHW arrays with the batch first, keyed by tensor name. ``options`` is the SessionOptions
    it was created with; ``batch`` the graph's fixed batch (None: dynamic).
    """

    def __init__(self, path, threads: Optional[int] = None, allow_spinning: Optional[bool] = None,
                 providers: Optional[List[str]] = None):
        self.options = session_options(threads, allow_spinning)
        self.path = Path(path)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.session = ort_session(self.path, self.options, self.providers)
        if self.providers != ["CPUExecutionProvider"]:
            from .providers import check_session_providers

            check_session_providers(self.providers, self.session.get_providers(), self.path.name)
        self.input_names: List[str] = [i.name for i in self.session.get_inputs()]
        self.output_names: List[str] = [o.name for o in self.session.get_outputs()]
        dim0 = self.session.get_inputs()[0].shape[0] if self.session.get_inputs()[0].shape else None
        self.batch: Optional[int] = dim0 if isinstance(dim0, int) and dim0 > 0 else None

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run on ``feeds`` (name -> float32 array) and return name -> float32 array for every output.

        Raises BackendError when a needed input is missing."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"{self.path.name}: missing inputs {missing}; got {sorted(feeds)}")
        values = self.session.run(self.output_names, {n: np.ascontiguousarray(feeds[n], dtype=np.float32)
                                                      for n in self.input_names})
        return dict(zip(self.output_names, values))


def open_session(path, fmt: str, threads: Optional[int] = None, name_map: Optional[Dict[str, str]] = None,
                 allow_spinning: Optional[bool] = None, providers: Optional[List[str]] = None):
    """Open ``path`` with the backend for ``fmt`` (``onnx`` or ``tflite``). ``name_map`` maps our tensor
    names to the graph's own (TFLite signature) names; ``allow_spinning`` and ``providers`` apply to
    onnxruntime (see :class:`OrtSession`; LiteRT has no such settings). Raises BackendError for an unknown
    format or a GPU provider asked of a TFLite graph."""
    if fmt == "onnx":
        return OrtSession(path, threads, allow_spinning, providers)
    if fmt == "tflite":
        from .backend_litert import LiteRTSession

        if providers and list(providers) != ["CPUExecutionProvider"]:
            raise BackendError(f"{Path(path).name}: TFLite graphs run on the CPU here; use the bundle's ONNX graphs "
                               f"(--backend onnx) with {providers[0]}")
        return LiteRTSession(path, threads=threads, name_map=name_map)
    raise BackendError(f"unknown graph format {fmt!r}: expected onnx or tflite")

"""Run a bundle's graphs as a chain: segments in order, each exit branch right after the cut it sits on.

All tensors are float32, NCHW, batch first, keyed by the manifest's tensor names.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .backends import open_session
from .bundle import Bundle
from .manifest import ExitBranch, ExitPredictor, Segment


class Chain:
    """Sessions for the segments of one ``side`` (``device``, ``server`` or ``all``) and, on the device,
    the exits, in ``fmt`` (``onnx``/``tflite``) and ``precision`` (``fp32``/``int8``).

    ``threads`` and ``allow_spinning`` configure every session (:func:`runtime.backends.session_options`);
    ``providers`` are onnxruntime's execution providers (see :class:`runtime.backends.OrtSession`).
    Raises ``BundleError`` when the bundle lacks a graph in that format and precision."""

    def __init__(self, bundle: Bundle, side: str = "all", fmt: str = "onnx", precision: str = "fp32",
                 threads: Optional[int] = None, with_exits: bool = True, allow_spinning: Optional[bool] = None,
                 providers: Optional[List[str]] = None):
        self.bundle = bundle
        self.fmt, self.precision = fmt, precision
        self.allow_spinning = allow_spinning
        self.providers = providers
        segs = bundle.segments if side == "all" else [s for s in bundle.segments if s.side == side]
        self.segments: List[Tuple[Segment, object]] = [(s, self._open(s, threads)) for s in segs]
        # exits keyed by the tensor they read; only exits whose input this chain produces
        produced = {o for s, _ in self.segments for o in s.outputs}
        self.exits: Dict[str, List[Tuple[ExitBranch, object]]] = {}
        self.predictor: Optional[Tuple[ExitPredictor, object]] = None
        if with_exits:
            for e in bundle.exits:
                if e.input in produced:
                    self.exits.setdefault(e.input, []).append((e, self._open(e, threads)))
            p = bundle.predictor
            if p is not None and self.exits and (p.input in produced or p.input == bundle.manifest.input.name):
                self.predictor = (p, self._open(p, threads))

    def _open(self, owner: Union[Segment, ExitBranch, ExitPredictor], threads: Optional[int]):
        key = self.bundle.graph_key(owner, self.fmt, self.precision)
        g = self.bundle.graph(key)
        return open_session(self.bundle.graph_path(key), g.format, threads, g.name_map, self.allow_spinning,
                            self.providers)

    def run_segments(self, tensors: Dict[str, np.ndarray], timings: Optional[Dict[str, float]] = None
                     ) -> Dict[str, np.ndarray]:
        """Run every segment of the chain on ``tensors`` (must hold the first segment's inputs) and return
        all tensors produced, by name. ``timings`` (if given) receives ms per segment name."""
        values = dict(tensors)
        for spec, sess in self.segments:
            t0 = time.perf_counter()
            values.update(sess.run({n: values[n] for n in spec.inputs}))
            if timings is not None:
                timings[spec.name] = (time.perf_counter() - t0) * 1e3
        return values

    def run_exits(self, values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Logits ``(N, C)`` float32 of every exit whose input is in ``values``, keyed by exit name."""
        out = {}
        for tensor, exits in self.exits.items():
            if tensor in values:
                for spec, sess in exits:
                    out[spec.name] = sess.run({spec.input: values[tensor]})[spec.output]
        return out

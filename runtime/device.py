"""The device side of split computing with early exits.

Per input sample (float32 NCHW, batch 1): run the device segments in order; after each, run the exits
that read its output and stop when an exit's confidence passes its threshold (nothing is sent, the tail
does not run). Otherwise quantise the split tensor(s) with the manifest's scale / zero point (affine
int8), compress, send to the edge server and return its reply. When the server is unreachable the result
degrades to the most confident exit seen (or the local tail when the bundle has one loaded), marked
``degraded``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .bundle import Bundle, BundleError
from .chain import Chain
from .confidence import confidence, passes
from .quant import QuantParams


@dataclass
class Result:
    """One inference. ``logits``: float32 ``(C,)``; ``top1``: class index; ``exit``: exit name or None
    (final classifier); ``where``: ``device`` (exit), ``server``, ``local`` (tail run on the device) or
    ``degraded``; ``ms``: stage -> milliseconds; ``bytes_sent`` / ``bytes_received``: frame sizes on the
    wire (bytes); ``confidences``: exit name -> confidence."""

    logits: np.ndarray
    top1: int
    exit: Optional[str]
    where: str
    ms: Dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    confidences: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None

    def to_json(self) -> dict:
        return {"top1": self.top1, "exit": self.exit, "where": self.where,
                "ms": {k: round(v, 3) for k, v in self.ms.items()}, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "confidences": {k: round(v, 5) for k, v in self.confidences.items()},
                **({"error": self.error} if self.error else {})}


def wire_params(bundle: Bundle, wire_dtype: str = "int8") -> Dict[str, Optional[QuantParams]]:
    """Quantisation of every wire tensor from the manifest (None for each with ``wire_dtype='float32'``).
    Raises BundleError when int8 is asked and the manifest has no quantisation for a wire tensor."""
    if wire_dtype not in ("int8", "float32"):
        raise ValueError("wire dtype %r: use int8 or float32" % wire_dtype)
    out = {}  # type: Dict[str, Optional[QuantParams]]
    for name in bundle.wire_tensors:
        q = bundle.tensor(name).quant
        if wire_dtype == "int8" and q is None:
            raise BundleError("wire tensor %r has no quantisation in the manifest (a bundle sliced from .onnx by "
                              "eetool 0.1.0): send it as --wire-dtype float32, or re-export" % name)
        out[name] = q.params() if wire_dtype == "int8" else None
    return out


def wire_codec(bundle: Bundle) -> str:
    """The entropy coder the bundle's wire tensors were exported with (``zstd`` for bundles that name none)."""
    if not bundle.server_segments:
        return "zstd"
    return bundle.tensor(bundle.wire_tensors[0]).codec or "zstd"


def quantize_wire(params: Dict[str, Optional[QuantParams]], values: Dict[str, np.ndarray]):
    """Wire tensors by name and their quantisation header entries (``{name: {dtype, scale, zero_point}}``, plus
    ``bits`` / ``axis`` for n-bit codes, which the protocol bit-packs) from :func:`wire_params`; tensors whose
    params are None go as float32 (no quant entry)."""
    tensors, quant = {}, {}
    for name, p in params.items():
        x = values[name]
        if p is None:
            tensors[name] = np.ascontiguousarray(x, dtype=np.float32)
            continue
        tensors[name] = p.quantize(x)
        quant[name] = p.to_json()
    return tensors, quant


class DeviceRunner:
    """Runs a bundle's device side against an :class:`runtime.client.EdgeClient`.

    ``fmt``/``precision`` pick the graphs (``onnx``/``tflite``, ``fp32``/``int8``); ``thresholds``
    overrides the manifest's per-exit thresholds (name -> value in [0, 1]); ``exits=False`` disables
    early exiting; ``local_tail=True`` also loads the server segments to fall back on when the server is
    unreachable; ``threads`` / ``allow_spinning`` configure the sessions
    (:func:`runtime.backends.session_options`). Raises BundleError for a missing graph and ValueError for a
    threshold outside [0, 1]."""

    def __init__(self, bundle: Bundle, client=None, fmt: str = "onnx", precision: str = "fp32",
                 threads: Optional[int] = None, thresholds: Optional[Dict[str, float]] = None,
                 exits: bool = True, wire_dtype: str = "int8", local_tail: bool = False,
                 allow_spinning: Optional[bool] = None):
        self.bundle = bundle
        self.client = client
        self.wire_dtype = wire_dtype
        self.wire = wire_params(bundle, wire_dtype) if bundle.server_segments else {}
        self.chain = Chain(bundle, "device", fmt, precision, threads, with_exits=exits, allow_spinning=allow_spinning)
        self.tail = Chain(bundle, "server", fmt, precision, threads, with_exits=False,
                          allow_spinning=allow_spinning) if local_tail else None
        pair = "%s/%s" % (fmt, precision)
        # per-graph thresholds when calibrated on those graphs (int8 confidences differ from float ones)
        self.thresholds = {e.name: e.threshold_for(pair) for e in bundle.exits}
        for name, value in (thresholds or {}).items():
            if name not in self.thresholds:
                raise ValueError("unknown exit %r; the bundle has %s" % (name, sorted(self.thresholds)))
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError("threshold for %s is %s; thresholds lie in [0, 1]" % (name, value))
            self.thresholds[name] = float(value)

    def infer(self, x: np.ndarray) -> Result:
        """One sample ``x``: float32 ``(1, C, H, W)`` NCHW, preprocessed as the manifest says."""
        ms: Dict[str, float] = {}
        confs: Dict[str, float] = {}
        best = None  # (confidence rank, name, logits) of the most confident exit so far
        values = {self.bundle.manifest.input.name: x}
        for spec, sess in self.chain.segments:
            t0 = time.perf_counter()
            values.update(sess.run({n: values[n] for n in spec.inputs}))
            ms[spec.name] = (time.perf_counter() - t0) * 1e3
            for out in spec.outputs:
                for espec, esess in self.chain.exits.get(out, []):
                    if self.thresholds[espec.name] is None:  # disabled: the branch is not evaluated
                        continue
                    t0 = time.perf_counter()
                    logits = esess.run({espec.input: values[out]})[espec.output]
                    conf = float(confidence(logits, espec.rule)[0])
                    ms[espec.name] = (time.perf_counter() - t0) * 1e3
                    confs[espec.name] = conf
                    rank = conf if espec.rule == "max_softmax" else 1.0 - conf
                    if best is None or rank > best[0]:
                        best = (rank, espec.name, logits[0])
                    if passes(np.array([conf]), self.thresholds[espec.name], espec.rule)[0]:
                        return Result(logits[0], int(logits[0].argmax()), espec.name, "device", ms, 0, 0, confs)
        return self._finish(values, ms, confs, best)

    def _finish(self, values, ms, confs, best) -> Result:
        output = self.bundle.manifest.output.name
        if not self.bundle.server_segments:  # the whole model runs on the device
            logits = values[output][0]
            return Result(logits, int(logits.argmax()), None, "device", ms, 0, 0, confs)
        t0 = time.perf_counter()
        tensors, quant = quantize_wire(self.wire, values)
        ms["quantize"] = (time.perf_counter() - t0) * 1e3
        error = None
        if self.client is not None:
            from .client import EdgeClientError

            try:
                reply = self.client.infer(tensors, quant)
                ms["encode"] = reply.encode_ms
                ms["network"] = reply.network_ms - reply.tail_ms
                ms["server_tail"] = reply.tail_ms
                logits = reply.logits[0]
                return Result(logits, int(logits.argmax()), None, "server", ms, reply.bytes_sent,
                              reply.bytes_received, confs)
            except EdgeClientError as e:
                error = "%s: %s" % (type(e).__name__, e)
        where = "local" if error is None else "degraded"
        if self.tail is not None:
            t0 = time.perf_counter()
            feed = {n: tensors[n] if self.wire[n] is None else self.wire[n].dequantize(tensors[n])
                    for n in self.bundle.wire_tensors}
            logits = self.tail.run_segments(feed)[output][0]
            ms["local_tail"] = (time.perf_counter() - t0) * 1e3
            return Result(logits, int(logits.argmax()), None, where, ms, 0, 0, confs, error)
        if best is not None:
            return Result(best[2], int(best[2].argmax()), best[1], "degraded", ms, 0, 0, confs,
                          error or "no server configured")
        raise RuntimeError("server unavailable (%s) and the bundle has no exit or local tail to fall back on"
                           % (error or "no server configured"))


def percentiles(samples: List[float]) -> Dict[str, float]:
    """p50 / p90 / p99 / mean of a list of milliseconds."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {}
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}

"""LiteRT (TFLite) backend for the board runtime: numpy + ``ai_edge_litert`` (fallback ``tflite_runtime``) only.

Inputs and outputs are bound by name through the model's SignatureDef. ``name_map`` maps our tensor names
(``input``, ``blocks.5``, ``logits``) to the signature names written by ``toolkit.export_tflite`` (``blocks_5``);
without it our names are the signature names.

``run`` takes and returns float32: quantised (int8/int16) inputs are quantised with the input tensor's scale and
zero point, quantised outputs dequantised. ``run_quantized`` passes integer tensors straight through (the wire
between a head and a tail that share scale and zero point). A batch larger than the graph's batch is resized
(dynamic-batch graphs) or looped over (fixed-batch graphs, e.g. batch 1).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .quant import QuantParams

_INSTALL_HINT = (
    "the LiteRT backend needs a TFLite interpreter: `pip install ai-edge-litert` "
    "(Python >= 3.9; on older Pythons, e.g. JetPack 5 / Python 3.8: `pip install tflite-runtime`)"
)


def _load_interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore

        return Interpreter
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e


def _qparams(det: Dict[str, Any]) -> Tuple[Optional[float], int]:
    qp = det.get("quantization_parameters") or {}
    scales = qp.get("scales")
    if scales is not None and len(scales) > 1:
        raise ValueError("per-axis quantised graph inputs/outputs are not supported: %s" % det.get("name"))
    if scales is not None and len(scales) == 1 and float(scales[0]) != 0.0:
        return float(scales[0]), int(qp["zero_points"][0])
    scale, zp = det.get("quantization", (0.0, 0))
    if scale:
        return float(scale), int(zp)
    return None, 0


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: Any) -> np.ndarray:
    """``q = clip(round(x / scale) + zero_point, qmin, qmax)`` (round half to even, as TFLite's QUANTIZE), with
    :class:`runtime.quant.QuantParams` (``dtype``: int8, uint8, int16, uint16 or int32)."""
    return QuantParams(np.dtype(dtype).name, scale, zero_point).quantize(np.asarray(x, dtype=np.float32))


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """``x = (q - zero_point) * scale`` as float32 (:class:`runtime.quant.QuantParams`)."""
    q = np.asarray(q)
    return QuantParams(q.dtype.name, scale, zero_point).dequantize(q)


class _Port(object):
    """One input or output of the signature."""

    def __init__(self, ours: str, sig: str, det: Dict[str, Any]):
        self.name = ours
        self.sig = sig
        self.index = int(det["index"])
        self.dtype = np.dtype(det["dtype"])
        self.shape = [int(s) for s in det["shape"]]
        sig_shape = det.get("shape_signature")
        self.dynamic_batch = sig_shape is not None and len(sig_shape) > 0 and int(sig_shape[0]) == -1
        self.scale, self.zero_point = _qparams(det)
        # built once: run() quantises / dequantises with it on every call
        self.qparams = QuantParams(self.dtype.name, self.scale, self.zero_point) if self.quantized else None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.dtype.kind in "iu"


class LiteRTSession(object):
    """One ``.tflite`` graph, bound by name.

    Args:
        path: the ``.tflite`` file.
        threads: XNNPACK / interpreter threads (``None``: the interpreter's default).
        name_map: our tensor name -> SignatureDef name (from the manifest graph entry). Inputs and outputs not
            in the map keep their signature names.
        signature: the SignatureDef key (default: the only / first one).
    """

    def __init__(self, path: str, threads: Optional[int] = None, name_map: Optional[Dict[str, str]] = None,
                 signature: Optional[str] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError("no such TFLite model: %s" % path)
        interpreter_cls = _load_interpreter_class()
        kwargs = {"model_path": str(path)}
        if threads is not None:
            kwargs["num_threads"] = int(threads)
        self.path = str(path)
        self.threads = threads
        self._interp = interpreter_cls(**kwargs)
        sigs = self._interp.get_signature_list()
        if not sigs:
            raise ValueError("%s has no SignatureDef; re-export it with toolkit.export_tflite" % path)
        if signature is None:
            signature = "serving_default" if "serving_default" in sigs else sorted(sigs)[0]
        if signature not in sigs:
            raise KeyError("signature %r not in %s (has %s)" % (signature, path, sorted(sigs)))
        self.signature = signature
        runner = self._interp.get_signature_runner(signature)
        in_det, out_det = runner.get_input_details(), runner.get_output_details()
        # The signature runner resizes/allocates on every call; we drive the interpreter by tensor index instead,
        # on the signature's subgraph (0 for a single-signature model).
        self._subgraph = getattr(runner, "_subgraph_index", 0)
        name_map = dict(name_map or {})
        rev = {}
        for ours, sig in name_map.items():
            if sig not in in_det and sig not in out_det:
                raise KeyError("name_map binds %r to %r, which is not a signature input/output of %s (has %s)"
                               % (ours, sig, path, sorted(list(in_det) + list(out_det))))
            rev[sig] = ours
        self._inputs = [_Port(rev.get(s, s), s, d) for s, d in in_det.items()]
        self._outputs = [_Port(rev.get(s, s), s, d) for s, d in out_det.items()]
        self._by_name = dict((p.name, p) for p in self._inputs)
        # a live SignatureRunner holds a reference to the interpreter's internals, which makes the interpreter
        # refuse allocate_tensors(); keep it only where we need it (a model with several signatures)
        self._runner = runner if self._subgraph != 0 else None
        del runner
        self._batch = self._inputs[0].shape[0] if self._inputs and self._inputs[0].shape else 1
        self._dynamic = bool(self._inputs) and all(p.dynamic_batch for p in self._inputs)
        self._allocated_batch = None  # type: Optional[int]
        if self._subgraph == 0:
            self._interp.allocate_tensors()
            self._allocated_batch = self._batch

    # ------------------------------------------------------------------------------------------ description
    @property
    def input_names(self) -> List[str]:
        return [p.name for p in self._inputs]

    @property
    def output_names(self) -> List[str]:
        return [p.name for p in self._outputs]

    @property
    def batch(self) -> Optional[int]:
        """The graph's fixed batch, or ``None`` for a dynamic batch."""
        return None if self._dynamic else self._batch

    def input_quantization(self) -> Dict[str, Dict[str, Any]]:
        """``{our input name: {"dtype", "scale", "zero_point"}}`` (scale ``None`` for float)."""
        return dict((p.name, {"dtype": p.dtype.name, "scale": p.scale, "zero_point": p.zero_point})
                    for p in self._inputs)

    def output_quantization(self) -> Dict[str, Dict[str, Any]]:
        return dict((p.name, {"dtype": p.dtype.name, "scale": p.scale, "zero_point": p.zero_point})
                    for p in self._outputs)

    # ---------------------------------------------------------------------------------------------- running
    def _check_feeds(self, feeds: Dict[str, np.ndarray]) -> int:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self._by_name]
        if missing or extra:
            raise KeyError("feeds %s do not match inputs %s of %s (missing %s, unknown %s)"
                           % (sorted(feeds), self.input_names, self.path, missing, extra))
        sizes = set(int(np.shape(feeds[n])[0]) for n in self.input_names)
        if len(sizes) != 1:
            raise ValueError("inputs differ in batch size: %s" % sorted(sizes))
        return sizes.pop()

    def _invoke(self, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One invocation with raw (already typed) arrays whose batch the graph accepts."""
        if self._subgraph != 0:  # multi-signature model: let the signature runner handle allocation
            out = self._runner(**dict((self._by_name[n].sig, a) for n, a in arrays.items()))
            return dict((p.name, np.array(out[p.sig])) for p in self._outputs)
        n = int(next(iter(arrays.values())).shape[0])
        if n != self._allocated_batch:
            for p in self._inputs:
                self._interp.resize_tensor_input(p.index, [n] + p.shape[1:])
            self._interp.allocate_tensors()
            self._allocated_batch = n
        for name, a in arrays.items():
            self._interp.set_tensor(self._by_name[name].index, a)
        self._interp.invoke()
        return dict((p.name, np.array(self._interp.get_tensor(p.index))) for p in self._outputs)

    def _run_raw(self, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        n = self._check_feeds(arrays)
        for name, a in arrays.items():
            p = self._by_name[name]
            if list(a.shape[1:]) != p.shape[1:]:
                raise ValueError("input %r has shape %s, graph wants (N, %s)"
                                 % (name, list(a.shape), ", ".join(str(s) for s in p.shape[1:])))
        if self._dynamic or n == self._batch:
            return self._invoke(arrays)
        step = self._batch
        if n % step:
            raise ValueError("batch %d is not a multiple of the graph's fixed batch %d" % (n, step))
        parts = [self._invoke(dict((k, np.ascontiguousarray(v[i:i + step])) for k, v in arrays.items()))
                 for i in range(0, n, step)]
        return dict((p.name, np.concatenate([r[p.name] for r in parts], axis=0)) for p in self._outputs)

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Float32 in, float32 out (by our names); quantises inputs and dequantises outputs as the graph needs."""
        arrays = {}
        for name, x in feeds.items():
            p = self._by_name.get(name)
            if p is None:
                self._check_feeds(feeds)  # raises with the full story
            if p.quantized:
                arrays[name] = p.qparams.quantize(np.asarray(x, dtype=np.float32))
            else:
                arrays[name] = np.ascontiguousarray(x, dtype=p.dtype)
        out = self._run_raw(arrays)
        res = {}
        for p in self._outputs:
            y = out[p.name]
            res[p.name] = p.qparams.dequantize(y) if p.quantized else y.astype(np.float32, copy=False)
        return res

    def run_quantized(self, feeds_q: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Integer tensors in and out, passed straight through (no requantisation): for the wire between graphs
        that share scale and zero point. Float inputs/outputs of the graph are passed as they are."""
        arrays = {}
        for name, x in feeds_q.items():
            p = self._by_name.get(name)
            if p is None:
                self._check_feeds(feeds_q)
            x = np.asarray(x)
            if x.dtype != p.dtype:
                raise TypeError("input %r is %s but the graph takes %s; use run() for float or requantise"
                                % (name, x.dtype, p.dtype))
            arrays[name] = np.ascontiguousarray(x)
        return self._run_raw(arrays)

    def __repr__(self) -> str:
        return "LiteRTSession(%r, inputs=%s, outputs=%s, batch=%s, threads=%s)" % (
            self.path, self.input_names, self.output_names, self.batch, self.threads)

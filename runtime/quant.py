"""Affine (scale / zero point) quantisation: one parameter type, one quantise, one dequantise, one way to
compute parameters from a range. Used by the wire codec, the LiteRT backend, the export-time calibration
and the benchmarks; numpy only, Python 3.8.

    q = clip(rint(x / scale) + zero_point, qmin, qmax)      # round half to even, as TFLite / ONNX QuantizeLinear
    x ~= (q - zero_point) * scale

``[qmin, qmax]`` is the storage dtype's range (int8: -128..127, uint8: 0..255, int16, uint16) or, with
``bits`` (2..16), the narrower ``bits``-wide range inside it (signed for int dtypes, e.g. 4-bit int8:
-8..7; unsigned for uint dtypes, e.g. 4-bit uint8: 0..15). Per-channel parameters hold one scale / zero
point per index along ``axis``.

Parameters from a range follow onnxruntime's ``quant_utils.compute_scale_zp`` (asymmetric case): the range
is widened to include 0, so that 0.0 is exact (zero padding, ReLU outputs), ``scale = (hi - lo) / (qmax -
qmin)`` and ``zero_point = round(qmin - lo / scale)``; an empty range gives scale 1, zero point 0.
The ranges themselves are min / max statistics over a representative set, kept apart from the parameters
as onnxruntime's calibrators keep them (``TensorData(lowest, highest)``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["QuantError", "QuantParams", "DTYPE_RANGES", "tensor_range"]

#: full integer range ``(qmin, qmax)`` of each storage dtype.
DTYPE_RANGES: Dict[str, Tuple[int, int]] = {
    "int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
    "int32": (-(2 ** 31), 2 ** 31 - 1)}


class QuantError(ValueError):
    """Bad quantisation parameters (dtype, bits, scale, zero point, axis) or input; says which and why."""


def _is_int(v: Any) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer, float, np.floating)) \
        and float(v) == int(v)


class QuantParams(object):
    """Affine quantisation parameters of one tensor.

    Args:
        dtype: storage dtype, ``int8`` | ``uint8`` | ``int16`` | ``uint16`` | ``int32``.
        scale: real value of one step (> 0, finite); a float (per-tensor) or one per channel along ``axis``.
        zero_point: integer that represents 0.0, in ``[qmin, qmax]``; an int or one per channel.
        axis: channel axis for per-channel parameters (e.g. 1 for NCHW features); None = per-tensor.
        bits: use only a ``bits``-wide integer range inside ``dtype`` (2..16, at most the dtype's width);
            None = the dtype's full range.

    Raises:
        QuantError: naming the bad argument.
    """

    __slots__ = ("dtype", "scale", "zero_point", "axis", "bits", "qmin", "qmax")

    def __init__(self, dtype: str, scale: Union[float, Sequence[float]], zero_point: Union[int, Sequence[int]],
                 axis: Optional[int] = None, bits: Optional[int] = None):
        if dtype not in DTYPE_RANGES:
            raise QuantError("quantized dtype must be one of %s, got %r" % (sorted(DTYPE_RANGES), dtype))
        lo, hi = DTYPE_RANGES[dtype]
        width = 8 * np.dtype(dtype).itemsize
        if bits is not None:
            if not _is_int(bits) or not 2 <= int(bits) <= width:
                raise QuantError("bits must be an integer in 2..%d for %s, got %r" % (width, dtype, bits))
            bits = int(bits)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if lo < 0 else (0, (1 << bits) - 1)
        per_channel = axis is not None
        scales = np.atleast_1d(np.asarray(scale, dtype=np.float64)) if _numeric(scale) else None
        if scales is None or scales.ndim != 1 or scales.size == 0 or (not per_channel and scales.size != 1):
            raise QuantError("scale must be a number%s, got %r" % (" or one per channel" if per_channel else "", scale))
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0.0):
            raise QuantError("scale must be finite and > 0, got %r" % (scale,))
        zps = np.atleast_1d(np.asarray(zero_point, dtype=object))
        if zps.ndim != 1 or not all(_is_int(z) for z in zps):
            raise QuantError("zero_point must be an integer%s, got %r" % (" per channel" if per_channel else "", zero_point))
        zps = np.array([int(z) for z in zps], dtype=np.int64)
        if zps.size not in (1, scales.size):
            raise QuantError("%d zero points for %d scales" % (zps.size, scales.size))
        if np.any(zps < lo) or np.any(zps > hi):
            raise QuantError("zero_point %s outside the %s%s range [%d, %d]" % (
                zero_point, "%d-bit " % bits if bits else "", dtype, lo, hi))
        if per_channel and (not _is_int(axis)):
            raise QuantError("axis must be an integer or None, got %r" % (axis,))
        self.dtype, self.bits, self.qmin, self.qmax = dtype, bits, int(lo), int(hi)
        self.axis = int(axis) if per_channel else None
        if per_channel:
            self.scale = tuple(float(s) for s in scales)  # type: Union[float, Tuple[float, ...]]
            self.zero_point = tuple(int(z) for z in np.broadcast_to(zps, scales.shape))  # type: Union[int, Tuple[int, ...]]
        else:
            self.scale, self.zero_point = float(scales[0]), int(zps[0])

    # ------------------------------------------------------------------ construction from data
    @classmethod
    def from_range(cls, lo: Union[float, Sequence[float]], hi: Union[float, Sequence[float]], dtype: str = "int8",
                   bits: Optional[int] = None, axis: Optional[int] = None) -> "QuantParams":
        """Parameters covering ``[lo, hi]`` (per channel when ``axis`` is given and ``lo`` / ``hi`` are
        sequences), widened to include 0 (see the module doc). Raises QuantError for NaN / Inf bounds."""
        probe = cls(dtype, 1.0, 0, bits=bits)  # validates dtype / bits, gives qmin / qmax
        qmin, qmax = probe.qmin, probe.qmax
        lo_a = np.minimum(np.atleast_1d(np.asarray(lo, dtype=np.float64)), 0.0)
        hi_a = np.maximum(np.atleast_1d(np.asarray(hi, dtype=np.float64)), 0.0)
        if not (np.all(np.isfinite(lo_a)) and np.all(np.isfinite(hi_a))):
            raise QuantError("range bounds must be finite, got [%r, %r]" % (lo, hi))
        span = hi_a - lo_a
        scale = np.where(span > 0, span / float(qmax - qmin), 1.0)
        zp = np.where(span > 0, np.round(qmin - lo_a / scale), 0.0)
        zp = np.clip(zp, qmin, qmax).astype(np.int64)
        if axis is None:
            if scale.size != 1:
                raise QuantError("per-tensor parameters need one lo / hi, got %d; pass axis for per-channel" % scale.size)
            return cls(dtype, float(scale[0]), int(zp[0]), bits=bits)
        return cls(dtype, scale.tolist(), zp.tolist(), axis=axis, bits=bits)

    @classmethod
    def from_tensor(cls, x: np.ndarray, dtype: str = "int8", bits: Optional[int] = None,
                    axis: Optional[int] = None) -> "QuantParams":
        """Parameters from the min / max of ``x`` itself (per channel along ``axis`` when given)."""
        lo, hi = tensor_range(x, axis)
        return cls.from_range(lo, hi, dtype, bits, axis)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "QuantParams":
        """From ``{"dtype", "scale", "zero_point"[, "axis"][, "bits"]}`` (manifest / wire form); other keys
        (provenance such as ``scheme`` or ``samples``) are ignored here. Raises QuantError."""
        try:
            return cls(d["dtype"], d["scale"], d["zero_point"], d.get("axis"), d.get("bits"))
        except KeyError as e:
            raise QuantError("quantisation parameters lack %s" % e)

    def to_json(self) -> Dict[str, Any]:
        """``{"dtype", "scale", "zero_point"}`` plus ``axis`` / ``bits`` when set (lists per channel)."""
        out = {"dtype": self.dtype, "scale": list(self.scale) if self.per_channel else self.scale,
               "zero_point": list(self.zero_point) if self.per_channel else self.zero_point}  # type: Dict[str, Any]
        if self.axis is not None:
            out["axis"] = self.axis
        if self.bits is not None:
            out["bits"] = self.bits
        return out

    # ------------------------------------------------------------------ properties
    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def real_range(self) -> Tuple[float, float]:
        """``((qmin - zp) * scale, (qmax - zp) * scale)``: the real interval these parameters represent
        exactly (per-tensor only; e.g. to pin another graph's tensor to the same encoding)."""
        if self.per_channel:
            raise QuantError("real_range() is per-tensor; these parameters are per channel (axis %d)" % self.axis)
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    def _broadcast(self, ndim: int) -> Tuple[Any, Any]:
        if not self.per_channel:
            return np.float32(self.scale), np.float32(self.zero_point)
        axis = self.axis if self.axis >= 0 else self.axis + ndim
        if not 0 <= axis < ndim:
            raise QuantError("axis %d out of range for a %d-d tensor" % (self.axis, ndim))
        shape = [1] * ndim
        shape[axis] = -1
        return (np.asarray(self.scale, np.float32).reshape(shape), np.asarray(self.zero_point, np.float32).reshape(shape))

    def _check_channels(self, x: np.ndarray) -> None:
        if self.per_channel and x.shape[self.axis] != len(self.scale):
            raise QuantError("tensor has %d channels on axis %d, parameters have %d"
                             % (x.shape[self.axis], self.axis, len(self.scale)))

    # ------------------------------------------------------------------ the maths
    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float array (any shape; float16/32/64, computed in float32) -> ``dtype`` array of the same shape.
        NaN maps to ``zero_point`` (0.0); +/-inf and out-of-range values saturate at qmax / qmin. Raises
        QuantError for a non-float input or a channel count that does not match."""
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise QuantError("quantize expects a floating-point array, got dtype %s" % x.dtype)
        xf = x.astype(np.float32, copy=False)
        self._check_channels(xf)
        scale, zp = self._broadcast(xf.ndim)
        # float32 division then rint, as on the device; nan/inf handled before adding the zero point
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            q = np.rint(xf / scale)
            q = np.nan_to_num(q, nan=0.0, posinf=float(self.qmax) + 1e9, neginf=float(self.qmin) - 1e9)
            q = np.clip(q + zp, self.qmin, self.qmax)
        return q.astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Integer array of ``dtype`` -> float32 ``(q - zero_point) * scale``, same shape. Raises QuantError
        when ``q`` is not of this dtype."""
        q = np.asarray(q)
        if q.dtype.name != self.dtype:
            raise QuantError("dequantize expects %s values, got dtype %s" % (self.dtype, q.dtype))
        self._check_channels(q)
        scale, zp = self._broadcast(q.ndim)
        out = q.astype(np.float32)
        out -= zp
        out *= scale
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantParams) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return "QuantParams(%s)" % ", ".join("%s=%r" % kv for kv in self.to_json().items())


def _numeric(v: Any) -> bool:
    try:
        a = np.asarray(v)
    except (TypeError, ValueError):
        return False
    return a.dtype.kind in "iuf" and a.dtype != np.bool_


def tensor_range(x: np.ndarray, axis: Optional[int] = None) -> Tuple[Any, Any]:
    """``(min, max)`` of ``x`` over everything (floats), or per index along ``axis`` (1-d arrays)."""
    x = np.asarray(x, dtype=np.float32)
    if axis is None:
        return float(x.min()), float(x.max())
    rest = tuple(i for i in range(x.ndim) if i != (axis % x.ndim))
    return x.min(axis=rest), x.max(axis=rest)

"""Affine quantization of split tensors and byte-level compression for the wire.

Quantization follows the bundle contract (docs/bundle.md)::

    q = clip(round(x / scale) + zero_point, qmin, qmax)      # round half to even (numpy.rint)
    x ~= (q - zero_point) * scale

Compression wraps ``zstandard``, ``lz4.frame`` and ``brotli``; all are optional and imported lazily,
so this module imports with numpy and the standard library alone. Decompression always runs with
an output-size limit (decompression-bomb guard). zstd is the default; brotli (quality 11 by default)
sends 1-4 % fewer bytes of bit-packed n-bit feature codes for about 100x the encode CPU time (README,
"The feature codec": 8 ms against 0.06 ms per EfficientNet feature on an x86 core).

Python 3.8 compatible; no pickle anywhere.
"""
from __future__ import annotations

import io
from typing import Dict, List, Optional, Tuple

import numpy as np

from .quant import QuantError, QuantParams

__all__ = [
    "QUANT_RANGES",
    "CODECS",
    "CodecError",
    "CodecUnavailable",
    "DecompressionBomb",
    "quantize",
    "dequantize",
    "compress",
    "decompress",
    "available_codecs",
    "check_codec",
]

#: Integer range ``(qmin, qmax)`` of each supported quantized dtype.
QUANT_RANGES: Dict[str, Tuple[int, int]] = {"int8": (-128, 127), "uint8": (0, 255)}

#: Codec names accepted by :func:`compress` / :func:`decompress`.
CODECS: Tuple[str, ...] = ("none", "zstd", "lz4", "brotli")

_DEFAULT_LEVEL = {"zstd": 3, "lz4": 0, "brotli": 11}


class CodecError(ValueError):
    """Bad quantization parameters, unknown codec, or corrupt compressed data."""


class CodecUnavailable(CodecError, ImportError):
    """A codec was requested whose optional Python package is not installed."""


class DecompressionBomb(CodecError):
    """Decompressed output would exceed the allowed maximum size (bytes)."""


# --------------------------------------------------------------------------- quantization
# The maths lives in runtime.quant.QuantParams; these wrappers restrict it to the wire dtypes and raise
# CodecError, which the protocol and the device runtime expect.
def _params(scale: float, zero_point: int, dtype: str) -> QuantParams:
    if dtype not in QUANT_RANGES:
        raise CodecError("quantized dtype must be one of %s, got %r" % (sorted(QUANT_RANGES), dtype))
    if isinstance(zero_point, (bool, np.bool_)) or isinstance(scale, (bool, np.bool_)):
        raise CodecError("scale / zero_point must be numbers, got %r / %r" % (scale, zero_point))
    try:
        p = QuantParams(dtype, scale, zero_point)
    except QuantError as e:
        raise CodecError(str(e))
    return p


def _check_qparams(scale: float, zero_point: int, dtype: str) -> Tuple[float, int, int, int]:
    p = _params(scale, zero_point, dtype)
    return p.scale, p.zero_point, p.qmin, p.qmax


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str = "int8") -> np.ndarray:
    """Quantize a float tensor affinely: ``q = clip(rint(x / scale) + zero_point, qmin, qmax)``
    (:meth:`runtime.quant.QuantParams.quantize`, per-tensor).

    Args:
        x: float array of any shape (float16/32/64; converted to float32 first).
        scale: real value of one quantization step, finite and > 0.
        zero_point: integer in the range of ``dtype`` that represents 0.0.
        dtype: ``"int8"`` (range -128..127) or ``"uint8"`` (0..255).

    Returns:
        An array of ``dtype`` with the shape of ``x``. NaN maps to ``zero_point`` (0.0);
        +/-inf and out-of-range values saturate at qmax / qmin.

    Raises:
        CodecError: bad dtype, scale <= 0 or not finite, zero_point not an integer in range,
            or ``x`` not a floating-point array.
    """
    p = _params(scale, zero_point, dtype)
    try:
        return p.quantize(x)
    except QuantError as e:
        raise CodecError(str(e))


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Map quantized integers back to float32: ``x = (q - zero_point) * scale``.

    Args:
        q: int8 or uint8 array of any shape.
        scale: step size, finite and > 0.
        zero_point: integer in the range of ``q.dtype``.

    Returns:
        float32 array with the shape of ``q``.

    Raises:
        CodecError: ``q`` is not int8/uint8, or bad scale / zero_point.
    """
    q = np.asarray(q)
    return _params(scale, zero_point, q.dtype.name).dequantize(q)


# --------------------------------------------------------------------------- compression
def _import_codec(codec: str):
    if codec == "zstd":
        try:
            import zstandard  # noqa: WPS433 (lazy, optional)
        except ImportError as exc:  # pragma: no cover - exercised only where missing
            raise CodecUnavailable(
                "codec 'zstd' requested but the 'zstandard' package is not installed "
                "(pip install zstandard), or use codec 'lz4' / 'none'"
            ) from exc
        return zstandard
    if codec == "lz4":
        try:
            import lz4.frame as lz4frame  # noqa: WPS433
        except ImportError as exc:  # pragma: no cover
            raise CodecUnavailable(
                "codec 'lz4' requested but the 'lz4' package is not installed "
                "(pip install lz4), or use codec 'zstd' / 'none'"
            ) from exc
        return lz4frame
    if codec == "brotli":
        try:
            import brotli  # noqa: WPS433
        except ImportError as exc:  # pragma: no cover
            raise CodecUnavailable(
                "codec 'brotli' requested but the 'brotli' package is not installed "
                "(pip install brotli), or use codec 'zstd' / 'none'"
            ) from exc
        return brotli
    raise CodecError("unknown codec %r; expected one of %s" % (codec, list(CODECS)))


def check_codec(codec: str) -> None:
    """Raise :class:`CodecError` / :class:`CodecUnavailable` unless ``codec`` can be used here."""
    if codec == "none":
        return
    _import_codec(codec)


def available_codecs() -> List[str]:
    """Names of the codecs usable in this interpreter (``"none"`` always first)."""
    out = ["none"]
    for name in CODECS[1:]:
        try:
            _import_codec(name)
        except CodecUnavailable:
            continue
        out.append(name)
    return out


def compress(data: bytes, codec: str = "zstd", level: Optional[int] = None) -> bytes:
    """Compress a byte string.

    Args:
        data: bytes-like object to compress (e.g. ``q.tobytes()``).
        codec: ``"none"`` (returns the bytes unchanged), ``"zstd"`` (one zstd frame with the
            content size in its header), ``"lz4"`` (one LZ4 frame) or ``"brotli"`` (one brotli stream).
        level: codec level; default 3 for zstd (1..22, negative = fast), 0 for lz4
            (0 = fast mode, 3..16 = high compression), 11 for brotli (0..11).

    Returns:
        The compressed bytes.

    Raises:
        CodecError: unknown codec; CodecUnavailable: its package is not installed.
    """
    if codec == "none":
        return bytes(data)
    mod = _import_codec(codec)
    lvl = _DEFAULT_LEVEL[codec] if level is None else int(level)
    if codec == "zstd":
        return mod.ZstdCompressor(level=lvl, write_content_size=True).compress(data)
    if codec == "brotli":
        return mod.compress(bytes(data), quality=lvl)
    return mod.compress(data, compression_level=lvl, store_size=True)


def decompress(data: bytes, codec: str, max_output_bytes: int, expected_size: Optional[int] = None) -> bytes:
    """Decompress a byte string produced by :func:`compress`, never producing more than a limit.

    Args:
        data: the compressed bytes (exactly one frame; trailing bytes are an error).
        codec: ``"none"``, ``"zstd"``, ``"lz4"`` or ``"brotli"``.
        max_output_bytes: hard ceiling on the decompressed size in bytes (decompression-bomb
            guard). Output is produced incrementally and stops one byte past this limit.
        expected_size: if given, the decompressed size must equal it exactly (bytes).

    Returns:
        The decompressed bytes.

    Raises:
        DecompressionBomb: the output would exceed ``max_output_bytes``.
        CodecError: unknown codec, corrupt / truncated / trailing data, or size != expected_size.
        CodecUnavailable: the codec's package is not installed.
    """
    limit = int(max_output_bytes)
    if expected_size is not None:
        if expected_size > limit:
            raise DecompressionBomb("declared size %d bytes exceeds the limit of %d bytes" % (expected_size, limit))
    if codec == "none":
        out = bytes(data)
        if len(out) > limit:
            raise DecompressionBomb("data of %d bytes exceeds the limit of %d bytes" % (len(out), limit))
    else:
        mod = _import_codec(codec)
        if codec == "zstd":
            out = _zstd_bounded(mod, data, limit)
        elif codec == "brotli":
            out = _brotli_bounded(mod, data, limit)
        else:
            out = _lz4_bounded(mod, data, limit)
    if expected_size is not None and len(out) != expected_size:
        raise CodecError("decompressed %d bytes, expected %d" % (len(out), expected_size))
    return out


def _zstd_bounded(zstandard, data: bytes, limit: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError("corrupt zstd data: %s" % exc)
    if declared is not None and declared >= 0 and declared > limit:
        raise DecompressionBomb("zstd frame declares %d bytes, limit is %d bytes" % (declared, limit))
    dctx = zstandard.ZstdDecompressor()
    try:
        if declared is None or declared < 0:
            # Unknown content size: stream with bounded reads so a bomb stops at limit + 1 bytes.
            reader = dctx.stream_reader(io.BytesIO(data), read_across_frames=False)
            total = 0
            try:
                while True:
                    chunk = reader.read(min(1 << 20, limit + 1 - total))
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > limit:
                        raise DecompressionBomb("zstd output exceeds the limit of %d bytes" % limit)
            finally:
                reader.close()
        # Size is now known to be <= limit (zstd enforces a declared content size), so a
        # one-frame decode is bounded; it also tells truncation and trailing bytes apart.
        dobj = dctx.decompressobj()
        out = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise CodecError("corrupt zstd data: %s" % exc)
    if not dobj.eof:
        raise CodecError("truncated zstd frame")
    if dobj.unused_data:
        raise CodecError("%d trailing bytes after the zstd frame" % len(dobj.unused_data))
    if len(out) > limit:  # defensive; cannot happen per the checks above
        raise DecompressionBomb("zstd output exceeds the limit of %d bytes" % limit)
    return out


def _lz4_bounded(lz4frame, data: bytes, limit: int) -> bytes:
    dec = lz4frame.LZ4FrameDecompressor()
    try:
        out = dec.decompress(data, max_length=limit + 1)
    except RuntimeError as exc:
        raise CodecError("corrupt lz4 data: %s" % exc)
    if len(out) > limit:
        raise DecompressionBomb("lz4 output exceeds the limit of %d bytes" % limit)
    if not dec.eof:
        raise CodecError("truncated lz4 frame")
    if dec.unused_data:
        raise CodecError("%d trailing bytes after the lz4 frame" % len(dec.unused_data))
    return out


def _brotli_bounded(brotli, data: bytes, limit: int) -> bytes:
    dec = brotli.Decompressor()
    try:
        # the output buffer stops growing past the limit (in chunks of at most 32 KiB)
        out = dec.process(bytes(data), output_buffer_limit=limit + 1)
    except TypeError as exc:  # brotli < 1.2 cannot bound its output
        raise CodecUnavailable("brotli %s cannot bound decompressed sizes; pip install 'brotli>=1.2'"
                               % getattr(brotli, "__version__", "?")) from exc
    except brotli.error as exc:  # corrupt data, or bytes after the end of the stream
        raise CodecError("corrupt brotli data: %s" % exc)
    if len(out) > limit:
        raise DecompressionBomb("brotli output exceeds the limit of %d bytes" % limit)
    if not dec.is_finished():
        raise CodecError("truncated brotli stream")
    return out

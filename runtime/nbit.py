"""Bit-packing of n-bit codes (n = 2..8) for the wire.

The codes come from n-bit affine quantisation (:class:`runtime.quant.QuantParams` with ``dtype="uint8"`` and
``bits=n``, per tensor or per channel)::

    q = clip(rint(x / scale[c]) + zero_point[c], 0, 2**bits - 1)     # round half to even, uint8 codes
    x ~= (q - zero_point[c]) * scale[c]

Packing writes the codes in C order, ``bits`` bits each, most significant bit first, into bytes; the
last byte is padded with zero bits. 4-bit codes ``[1, 2, 3]`` pack to ``0x12 0x30``; 3-bit codes
``[1, 2, 3]`` to ``0b00101001 0b10000000``. Unpacking refuses a byte string of the wrong length or
with set padding bits, so ``unpack_bits(pack_bits(q, n), n, q.size) == q`` exactly and nothing else
decodes.

Byte-aligned packing (``aligned=True``, what the wire uses under an entropy coder) keeps every code inside
one byte: ``8 // bits`` codes per byte, MSB first, the unused low bits zero. For 2, 4 and 8 bits it is the
dense packing; 3-bit codes go two to a byte (``[1, 2, 3]`` packs to ``0b00101000 0b01100000``), 5..7-bit
codes one to a byte. It sends more raw bytes, but a byte-oriented entropy coder (zstd's Huffman literals,
brotli) then models whole codes and pairs of neighbouring codes instead of bit fields that straddle byte
boundaries: on EfficientNet-Lite0's blocks.5 feature, 3-bit codes + zstd shrink from 5.25 kB to 4.61 kB per feature
(README, "The feature codec").

numpy only (Python 3.8 compatible): this runs on the board.
"""
from __future__ import annotations

import numpy as np

__all__ = ["MIN_BITS", "MAX_BITS", "NBitError", "codes_per_byte", "packed_nbytes", "pack_bits", "unpack_bits"]

MIN_BITS, MAX_BITS = 2, 8


class NBitError(ValueError):
    """Codes out of range, bad bit width, or a packed byte string that does not decode."""


def codes_per_byte(bits: int) -> int:
    """Codes of ``bits`` bits that byte-aligned packing puts in one byte: ``8 // bits``."""
    return 8 // int(bits)


def packed_nbytes(count: int, bits: int, aligned: bool = False) -> int:
    """Bytes of ``count`` codes of ``bits`` bits packed: ``ceil(count * bits / 8)``, or byte-aligned
    ``ceil(count / (8 // bits))``."""
    if aligned:
        k = codes_per_byte(bits)
        return (int(count) + k - 1) // k
    return (int(count) * int(bits) + 7) // 8


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise NBitError("bits must be in %d..%d, got %r" % (MIN_BITS, MAX_BITS, bits))


def pack_bits(codes: np.ndarray, bits: int, aligned: bool = False) -> bytes:
    """Pack codes (C order, MSB first, zero padding) into ``packed_nbytes(codes.size, bits, aligned)`` bytes:
    densely, or byte-aligned (``8 // bits`` codes per byte) with ``aligned``.

    Raises:
        NBitError: bits outside 2..8, codes not unsigned integers or >= ``2**bits``.
    """
    _check_bits(bits)
    c = np.ascontiguousarray(codes)
    if c.dtype.kind != "u":
        raise NBitError("codes must be unsigned integers, got dtype %s" % c.dtype)
    flat = c.reshape(-1)
    if flat.size and int(flat.max()) >> bits:
        raise NBitError("code %d does not fit in %d bits" % (int(flat.max()), bits))
    flat = flat.astype(np.uint8, copy=False)
    if aligned and 8 % bits:
        k = codes_per_byte(bits)
        pad = (-flat.size) % k
        groups = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, k).astype(np.uint16)
        shifts = (8 - bits * np.arange(1, k + 1)).astype(np.uint16)
        return (groups << shifts).sum(axis=1).astype(np.uint8).tobytes()
    if bits == 8:
        return flat.tobytes()
    if bits == 4:  # the common case, without the bit-array detour
        pairs = flat if flat.size % 2 == 0 else np.append(flat, np.uint8(0))
        return ((pairs[0::2] << 4) | pairs[1::2]).astype(np.uint8).tobytes()
    bitmat = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(bitmat.reshape(-1)).tobytes()


def unpack_bits(data: bytes, bits: int, count: int, aligned: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` uint8 codes (1-D) from the packed bytes (dense or ``aligned``).

    Raises:
        NBitError: bits outside 2..8, ``len(data) != packed_nbytes(count, bits, aligned)``, or padding bits
            set (the unused low bits of each byte when aligned, or padding codes in the last byte).
    """
    _check_bits(bits)
    want = packed_nbytes(count, bits, aligned)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != want:
        raise NBitError("%d packed bytes for %d codes of %d bits; expected %d" % (buf.size, count, bits, want))
    if aligned and 8 % bits:
        k = codes_per_byte(bits)
        if (buf & ((1 << (8 - k * bits)) - 1)).any():
            raise NBitError("unused low bits of a byte-aligned code byte are not zero")
        shifts = (8 - bits * np.arange(1, k + 1)).astype(np.uint8)
        out = ((buf[:, None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).reshape(-1)
        if out[count:].any():
            raise NBitError("padding codes of the last byte are not zero")
        return out[:count]
    if bits == 8:
        return buf.copy()
    if bits == 4:
        out = np.empty(buf.size * 2, np.uint8)
        out[0::2] = buf >> 4
        out[1::2] = buf & 0x0F
        if count % 2 and out[-1]:
            raise NBitError("padding bits of the last byte are not zero")
        return out[:count]
    flat = np.unpackbits(buf)
    if flat[count * bits:].any():
        raise NBitError("padding bits of the last byte are not zero")
    bitmat = flat[:count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (bitmat * weights).sum(axis=1, dtype=np.uint16).astype(np.uint8)

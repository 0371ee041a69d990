"""runtime.nbit: n-bit affine quantisation (per tensor / per channel) and bit-packing layouts.
numpy only, runs under Python 3.8 too."""
import numpy as np
import pytest

from runtime import nbit
from runtime.nbit import NBitError
from runtime.quant import QuantParams


@pytest.mark.parametrize("bits,codes,packed", [
    (2, [0, 1, 2, 3, 3], "1bc0"),             # 00 01 10 11 | 11 000000
    (3, [1, 2, 3], "2980"),                   # 001 010 011 | 0000000
    (4, [1, 2, 3], "1230"),                   # nibbles, high first
    (5, [31, 0, 1], "f802"),                  # 11111 000 | 00 00001 0
    (6, [63, 1], "fc10"),                     # 111111 000001 | 0000
    (7, [127, 0, 85], "fe02a8"),              # 1111111 0 | 000000 10 | 101010 00
    (8, [0, 255, 7], "00ff07"),
])
def test_packing_layout_is_msb_first_with_zero_padding(bits, codes, packed):
    q = np.array(codes, np.uint8)
    out = nbit.pack_bits(q, bits)
    assert out.hex() == packed
    assert len(out) == nbit.packed_nbytes(len(codes), bits) == -(-len(codes) * bits // 8)
    np.testing.assert_array_equal(nbit.unpack_bits(out, bits, len(codes)), q)


@pytest.mark.parametrize("bits", range(2, 9))
def test_round_trip_is_exact_for_every_width_and_length(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 2, 3, 7, 8, 9, 15680, 15681):
        q = rng.integers(0, 1 << bits, n).astype(np.uint8)
        back = nbit.unpack_bits(nbit.pack_bits(q, bits), bits, n)
        assert back.dtype == np.uint8 and back.shape == (n,)
        assert back.tobytes() == q.tobytes()


@pytest.mark.parametrize("bits,codes,packed", [
    (2, [0, 1, 2, 3, 3], "1bc0"),             # four codes per byte: the dense layout
    (3, [1, 2, 3], "2860"),                   # 001 010 00 | 011 000 00: two codes per byte, low bits zero
    (3, [7, 7], "fc"),                        # 111 111 00
    (4, [1, 2, 3], "1230"),                   # the dense layout
    (5, [31, 0, 1], "f80008"),                # one code per byte, high bits first
    (6, [63, 1], "fc04"),
    (7, [127, 0, 85], "fe00aa"),
    (8, [0, 255, 7], "00ff07"),
])
def test_byte_aligned_layout_keeps_every_code_in_one_byte(bits, codes, packed):
    q = np.array(codes, np.uint8)
    out = nbit.pack_bits(q, bits, aligned=True)
    assert out.hex() == packed
    assert len(out) == nbit.packed_nbytes(len(codes), bits, aligned=True) == -(-len(codes) // (8 // bits))
    np.testing.assert_array_equal(nbit.unpack_bits(out, bits, len(codes), aligned=True), q)


@pytest.mark.parametrize("bits", range(2, 9))
def test_byte_aligned_round_trip_is_exact_for_every_width_and_length(bits):
    rng = np.random.default_rng(100 + bits)
    for n in (0, 1, 2, 3, 7, 8, 9, 15680, 15681):
        q = rng.integers(0, 1 << bits, n).astype(np.uint8)
        back = nbit.unpack_bits(nbit.pack_bits(q, bits, aligned=True), bits, n, aligned=True)
        assert back.dtype == np.uint8 and back.shape == (n,)
        assert back.tobytes() == q.tobytes()


def test_byte_aligned_unpack_refuses_set_unused_bits_padding_codes_and_wrong_length():
    good = nbit.pack_bits(np.array([1, 2, 3], np.uint8), 3, aligned=True)  # 28 60
    with pytest.raises(NBitError, match="unused low bits"):
        nbit.unpack_bits(bytes([good[0] | 0x01, good[1]]), 3, 3, aligned=True)
    with pytest.raises(NBitError, match="padding codes"):
        nbit.unpack_bits(bytes([good[0], good[1] | 0x04]), 3, 3, aligned=True)  # a 4th code in the last byte
    with pytest.raises(NBitError, match="expected 2"):
        nbit.unpack_bits(good + b"\x00", 3, 3, aligned=True)
    with pytest.raises(NBitError, match="expected 3"):  # dense bytes are not byte-aligned ones
        nbit.unpack_bits(nbit.pack_bits(np.array([1, 2, 3, 4, 5], np.uint8), 3), 3, 5, aligned=True)


def test_byte_aligned_3bit_codes_compress_smaller_than_dense_ones():
    # Smooth, peaked codes (like a CNN feature map: neighbours alike, most codes near the zero point): under
    # zstd, codes that never straddle bytes compress better although they are a third more raw bytes.
    zstandard = pytest.importorskip("zstandard")
    rng = np.random.default_rng(0)
    x = rng.laplace(size=(80, 14, 14)).astype(np.float32)
    x = (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=1)) / 2
    codes = QuantParams("uint8", 0.6, 4, bits=3).quantize(x)
    dense = nbit.pack_bits(codes, 3)
    aligned = nbit.pack_bits(codes, 3, aligned=True)
    assert len(aligned) > len(dense)
    z = zstandard.ZstdCompressor(level=3)
    assert len(z.compress(aligned)) < 0.95 * len(z.compress(dense))


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(NBitError, match="does not fit in 3 bits"):
        nbit.pack_bits(np.array([0, 8], np.uint8), 3)
    with pytest.raises(NBitError, match="unsigned"):
        nbit.pack_bits(np.array([1], np.int8), 4)
    for bits in (1, 9, 0):
        with pytest.raises(NBitError, match="bits"):
            nbit.pack_bits(np.array([0], np.uint8), bits)


def test_unpack_refuses_wrong_length_and_set_padding():
    good = nbit.pack_bits(np.array([1, 2, 3], np.uint8), 3)  # 9 bits -> 2 bytes
    with pytest.raises(NBitError, match="expected 2"):
        nbit.unpack_bits(good[:1], 3, 3)
    with pytest.raises(NBitError, match="expected 2"):
        nbit.unpack_bits(good + b"\x00", 3, 3)
    with pytest.raises(NBitError, match="padding"):
        nbit.unpack_bits(bytes([good[0], good[1] | 0x01]), 3, 3)
    with pytest.raises(NBitError, match="padding"):
        nbit.unpack_bits(bytes([0x12, 0x31]), 4, 3)


def test_nbit_codes_per_tensor_and_per_channel():
    # n-bit codes are QuantParams(uint8, bits=n): unsigned codes 0..2**n - 1, per tensor or per channel
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 5, 5)) * 3).astype(np.float32)
    q = QuantParams("uint8", 0.5, 8, bits=4)
    codes = q.quantize(x)
    np.testing.assert_array_equal(codes, np.clip(np.rint(x / np.float32(0.5)) + 8, 0, 15).astype(np.uint8))
    back = nbit.unpack_bits(nbit.pack_bits(codes, 4), 4, codes.size).reshape(codes.shape)
    assert back.tobytes() == codes.tobytes()
    x = np.zeros((1, 3, 2, 2), np.float32)
    x[0, :2] = 1.0
    x[0, 2] = -1.0
    pc = QuantParams("uint8", [0.5, 0.25, 1.0], [0, 2, 4], axis=1, bits=3)
    codes = pc.quantize(x)
    assert codes[0, :, 0, 0].tolist() == [2, 6, 3]
    np.testing.assert_array_equal(pc.dequantize(codes)[0, :, 0, 0], [1.0, 1.0, -1.0])
    assert pc.quantize(np.full((1, 3, 1, 1), 100.0, np.float32)).max() == 7  # saturates at 2**3 - 1

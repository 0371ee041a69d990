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

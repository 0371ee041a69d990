"""runtime.codec: affine quantization and bounded (de)compression. Runs under Python 3.8 too."""
import sys

import numpy as np
import pytest

from runtime import codec
from runtime.codec import CodecError, CodecUnavailable, DecompressionBomb

CODECS = codec.available_codecs()


def test_available_codecs_here():
    # the pinned venv has every optional codec (a bare Python 3.8 board venv may lack brotli)
    assert CODECS[0] == "none"
    assert {"none", "zstd", "lz4"} <= set(CODECS) <= set(codec.CODECS)
    if sys.version_info >= (3, 10):  # the pinned toolkit venv
        assert set(CODECS) == {"none", "zstd", "lz4", "brotli"}


@pytest.mark.parametrize("dtype,zp", [("int8", -128), ("int8", 0), ("uint8", 0), ("uint8", 128)])
def test_quantize_matches_contract_formula(dtype, zp):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 5, 5)) * 3).astype(np.float32)
    scale = 0.05
    q = codec.quantize(x, scale, zp, dtype)
    qmin, qmax = codec.QUANT_RANGES[dtype]
    ref = np.clip(np.rint(x / np.float32(scale)) + zp, qmin, qmax).astype(dtype)
    assert q.dtype == np.dtype(dtype) and q.shape == x.shape
    np.testing.assert_array_equal(q, ref)
    back = codec.dequantize(q, scale, zp)
    assert back.dtype == np.float32
    inside = (x >= (qmin - zp) * scale) & (x <= (qmax - zp) * scale)
    assert np.all(np.abs(back[inside] - x[inside]) <= scale / 2 + 1e-6)


def test_quantize_saturates_and_handles_nonfinite():
    x = np.array([-1e9, -np.inf, np.nan, 0.0, np.inf, 1e9, 0.26, -0.26], dtype=np.float32)
    q = codec.quantize(x, 0.1, 3, "int8")
    assert q.tolist() == [-128, -128, 3, 3, 127, 127, 6, 0]
    qu = codec.quantize(x, 0.1, 10, "uint8")
    assert qu.tolist() == [0, 0, 10, 10, 255, 255, 13, 7]


def test_quantize_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5], dtype=np.float32)
    assert codec.quantize(x, 1.0, 0, "int8").tolist() == [0, 2, 2, 0]


@pytest.mark.parametrize("scale,zp,dtype", [
    (0.0, 0, "int8"), (-1.0, 0, "int8"), (float("nan"), 0, "int8"), (float("inf"), 0, "int8"),
    (0.1, 200, "int8"), (0.1, -1, "uint8"), (0.1, 1.5, "int8"), (0.1, 0, "int16"), ("x", 0, "int8"),
])
def test_quantize_rejects_bad_params(scale, zp, dtype):
    with pytest.raises(CodecError):
        codec.quantize(np.zeros(3, np.float32), scale, zp, dtype)


def test_quantize_rejects_integer_input_and_dequantize_rejects_float():
    with pytest.raises(CodecError):
        codec.quantize(np.zeros(3, np.int32), 0.1, 0)
    with pytest.raises(CodecError):
        codec.dequantize(np.zeros(3, np.float32), 0.1, 0)


def _feature():
    # an int8 ReLU-like feature map: many zero-point values, like a real post-activation tensor
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((1, 80, 14, 14)).astype(np.float32), 0) * 2
    return codec.quantize(x, 0.03, -128, "int8")


@pytest.mark.parametrize("name", CODECS)
def test_compress_round_trip(name):
    for data in [b"", bytes(1000), _feature().tobytes(), np.random.default_rng(2).bytes(5000)]:
        c = codec.compress(data, name)
        assert codec.decompress(c, name, max_output_bytes=len(data), expected_size=len(data)) == data


@pytest.mark.parametrize("name", CODECS[1:])
def test_compress_shrinks_relu_feature(name):
    raw = _feature().tobytes()
    assert len(codec.compress(raw, name)) < len(raw)


@pytest.mark.parametrize("name", CODECS)
def test_decompression_bomb_is_refused(name):
    big = bytes(8 * 1024 * 1024)
    c = codec.compress(big, name)
    with pytest.raises(DecompressionBomb):
        codec.decompress(c, name, max_output_bytes=1024 * 1024)
    with pytest.raises(DecompressionBomb):
        codec.decompress(c, name, max_output_bytes=10 ** 9, expected_size=2 * 10 ** 9)


def test_zstd_bomb_without_content_size_is_refused():
    zstandard = pytest.importorskip("zstandard")
    c = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 * 1024 * 1024))
    with pytest.raises(DecompressionBomb):
        codec.decompress(c, "zstd", max_output_bytes=1024 * 1024)
    assert len(codec.decompress(c, "zstd", max_output_bytes=8 * 1024 * 1024)) == 8 * 1024 * 1024


@pytest.mark.parametrize("name", CODECS[1:])
def test_corrupt_truncated_trailing_and_size_mismatch(name):
    data = _feature().tobytes()
    c = codec.compress(data, name)
    for bad in [c[: len(c) // 2], c + b"\x00\x01junk", b"not a frame at all", b""]:
        with pytest.raises(CodecError):
            codec.decompress(bad, name, max_output_bytes=len(data) * 2)
    with pytest.raises(CodecError):
        codec.decompress(c, name, max_output_bytes=len(data) * 2, expected_size=len(data) - 1)


def test_unknown_codec():
    with pytest.raises(CodecError):
        codec.compress(b"x", "gzip")
    with pytest.raises(CodecError):
        codec.decompress(b"x", "gzip", 10)


def test_missing_codec_package_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` raise ImportError
    with pytest.raises(CodecUnavailable, match="pip install zstandard"):
        codec.compress(b"abc", "zstd")
    assert "zstd" not in codec.available_codecs()
    assert isinstance(CodecUnavailable("x"), ImportError)


def test_missing_brotli_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", None)
    with pytest.raises(CodecUnavailable, match="pip install brotli"):
        codec.compress(b"abc", "brotli")
    with pytest.raises(CodecUnavailable, match="pip install brotli"):
        codec.decompress(b"abc", "brotli", 10)
    assert "brotli" not in codec.available_codecs()

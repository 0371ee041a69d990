"""runtime.quant.QuantParams: the one affine quantisation used by the wire codec, the LiteRT backend, the
export-time calibration and the benchmarks. Runs under the Python 3.8 runtime venv too."""
import numpy as np
import pytest

from runtime.quant import QuantError, QuantParams


def test_range_always_includes_zero():
    """All-positive data (e.g. a feature after ReLU + bias, or unnormalised pixels): 0.0 stays exact and
    the top of the range is not clipped."""
    x = np.linspace(0.5, 2.0, 1000, dtype=np.float32)
    p = QuantParams.from_tensor(x, "int8")
    lo, hi = p.real_range()
    assert lo <= 0.0 <= hi and hi == pytest.approx(2.0, rel=1e-6)
    assert p.quantize(np.zeros(3, np.float32)).tolist() == [p.zero_point] * 3
    assert p.dequantize(p.quantize(np.zeros(1, np.float32)))[0] == 0.0
    err = np.abs(p.dequantize(p.quantize(x)) - x).max()
    assert err <= p.scale / 2 + 1e-6
    # all-negative data likewise
    q = QuantParams.from_range(-3.0, -1.0, "uint8")
    assert q.zero_point == 255 and q.real_range()[1] == pytest.approx(0.0, abs=1e-9)


def test_matches_onnxruntime_compute_scale_zp():
    qu = pytest.importorskip("onnxruntime.quantization.quant_utils")
    for lo, hi, dtype, qmin, qmax in [(-1.3, 4.2, "uint8", 0, 255), (-0.7, 0.3, "int8", -128, 127),
                                      (0.2, 5.0, "int8", -128, 127)]:
        zp, scale = qu.compute_scale_zp(np.float32(lo), np.float32(hi), np.array(qmin, np.int32),
                                        np.array(qmax, np.int32))
        p = QuantParams.from_range(np.float32(lo), np.float32(hi), dtype)
        assert p.zero_point == int(zp) and np.float32(p.scale) == np.float32(scale)


def test_empty_range_gives_scale_one():
    p = QuantParams.from_range(0.0, 0.0, "int8")
    assert (p.scale, p.zero_point) == (1.0, 0)


def test_per_channel_along_an_axis():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32) * np.array([0.1, 1.0, 10.0, 100.0], np.float32).reshape(1, 4, 1, 1)
    p = QuantParams.from_tensor(x, "int8", axis=1)
    assert p.per_channel and len(p.scale) == 4 and p.scale[3] > 100 * p.scale[0]
    err = np.abs(p.dequantize(p.quantize(x)) - x).max(axis=(0, 2, 3))
    assert np.all(err <= np.asarray(p.scale) / 2 + 1e-5)
    per_tensor = QuantParams.from_tensor(x, "int8")
    err_t = np.abs(per_tensor.dequantize(per_tensor.quantize(x)) - x).max(axis=(0, 2, 3))
    assert err[0] < err_t[0] / 100  # the small channel keeps its precision only per channel
    assert QuantParams.from_json(p.to_json()) == p
    with pytest.raises(QuantError, match="3 channels on axis 1, parameters have 4"):
        p.quantize(x[:, :3])


@pytest.mark.parametrize("dtype,bits,qmin,qmax", [("int8", 4, -8, 7), ("uint8", 4, 0, 15), ("int8", 2, -2, 1),
                                                  ("uint8", None, 0, 255), ("int16", None, -32768, 32767)])
def test_bits_narrow_the_integer_range(dtype, bits, qmin, qmax):
    p = QuantParams.from_range(-1.0, 3.0, dtype, bits=bits)
    assert (p.qmin, p.qmax) == (qmin, qmax)
    q = p.quantize(np.linspace(-5, 5, 101, dtype=np.float32))
    assert q.dtype == np.dtype(dtype) and q.min() == qmin and q.max() == qmax
    if bits:
        assert QuantParams.from_json(p.to_json()).bits == bits


@pytest.mark.parametrize("kwargs,words", [
    (dict(dtype="int4", scale=0.1, zero_point=0), "dtype"),
    (dict(dtype="int8", scale=0.1, zero_point=0, bits=9), "bits"),
    (dict(dtype="int8", scale=-0.1, zero_point=0), "scale"),
    (dict(dtype="int8", scale=0.1, zero_point=8, bits=4), "outside the 4-bit int8 range"),
    (dict(dtype="int8", scale=[0.1, 0.2], zero_point=0), "scale"),
    (dict(dtype="int8", scale=[0.1, 0.2], zero_point=[0, 0, 0], axis=1), "3 zero points for 2 scales"),
])
def test_bad_parameters_are_refused(kwargs, words):
    with pytest.raises(QuantError, match=words):
        QuantParams(**kwargs)


def test_codec_and_litert_use_the_same_maths():
    from runtime import backend_litert, codec

    x = np.random.default_rng(2).standard_normal((1, 8, 4, 4)).astype(np.float32)
    p = QuantParams.from_tensor(x, "int8")
    q = p.quantize(x)
    np.testing.assert_array_equal(codec.quantize(x, p.scale, p.zero_point, "int8"), q)
    np.testing.assert_array_equal(backend_litert.quantize(x, p.scale, p.zero_point, np.int8), q)
    np.testing.assert_array_equal(codec.dequantize(q, p.scale, p.zero_point), p.dequantize(q))
    np.testing.assert_array_equal(backend_litert.dequantize(q, p.scale, p.zero_point), p.dequantize(q))

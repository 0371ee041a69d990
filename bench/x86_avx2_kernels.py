"""Do onnxruntime's int8 kernels compute exactly on an x86 CPU without VNNI? Checked under an emulated
Haswell (AVX2, no VNNI): ``qemu-x86_64-static -cpu Haswell`` (Debian: ``apt-get install qemu-user-static``)
makes onnxruntime take its AVX2 integer kernels on any x86 host.

Each check builds a tiny graph of u8 activation codes times int8 weight codes and compares onnxruntime's
result with the exact integer product computed by numpy: MatMulInteger with 7-bit and 8-bit weights
(random and extreme codes), 1x1 QDQ convs with two 127 weights on input channels (0, 1) and (1, 2) at
activation 255 (which channels the kernel pairs in its int16 multiply-add, vpmaddubsw), and a depthwise
3x3 QDQ conv with 8-bit weights. The table gives max |error| in integer units (QDQ convs: in units of the
output scale, 512, so 254 is one rounding step) on this host and on the emulated Haswell.

    python bench/x86_avx2_kernels.py

Whole bundles run the same way: ``EETOOL_INT8_TARGET=x86-avx2 qemu-x86_64-static -cpu Haswell
.venv/bin/python .venv/bin/eetool eval BUNDLE --data DATA`` (the variable is needed: the runtime reads the
host's /proc/cpuinfo, which the emulator does not change).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np

QEMU = "qemu-x86_64-static"


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _matmul_integer(a: np.ndarray, b: np.ndarray) -> float:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, a.shape),
                           helper.make_tensor_value_info("B", TensorProto.INT8, b.shape)],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, None)])
    y = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])).run(None, {"A": a, "B": b})[0]
    return float(np.abs(y.astype(np.int64) - a.astype(np.int64) @ b.astype(np.int64)).max())


def _qdq_conv(w: np.ndarray, x: np.ndarray, group: int) -> float:
    """u8 input (scale 1, zero point 0) * int8 weights (scale 1) -> u8 output at scale 512: onnxruntime fuses
    the QDQ pattern into its integer conv; max |error| against the exact sum, in input units."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    cout, k = w.shape[0], w.shape[2]
    inits = [nh.from_array(w, "w"), nh.from_array(np.ones(cout, np.float32), "ws"), nh.from_array(np.zeros(cout, np.int8), "wz"),
             nh.from_array(np.array(1.0, np.float32), "xs"), nh.from_array(np.array(0, np.uint8), "xz"),
             nh.from_array(np.array(512.0, np.float32), "ys"), nh.from_array(np.array(0, np.uint8), "yz")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf"], ["yf"], group=group, pads=[k // 2] * 4),
             helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    y = _session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])).run(None, {"x": x})[0]
    return float(np.abs(y.astype(np.int64) * 512 - np.clip(_conv(x, w, group), 0, 255 * 512)).max())


def _conv(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """Exact integer conv (stride 1, same padding) of NCHW ``x`` by OIHW ``w``: 1x1 (group 1) or depthwise."""
    x, w = x.astype(np.int64), w.astype(np.int64)
    if group == 1:
        return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x)
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    h, wd = x.shape[2:]
    return sum(xp[:, :, i:i + h, j:j + wd] * w[None, :, 0, i, j, None, None] for i in range(k) for j in range(k))


def checks() -> dict:
    """Every check's max |error| on the CPU this process runs on."""
    rng = np.random.default_rng(0)
    out = {}
    for bits, lo, hi in ((7, -64, 64), (8, -127, 127)):
        a = rng.integers(0, 256, (64, 256), dtype=np.uint8)
        out[f"MatMulInteger, random codes, {bits}-bit weights"] = _matmul_integer(
            a, rng.integers(lo, hi + 1, (256, 96)).astype(np.int8))
        out[f"MatMulInteger, activations 255, weights {hi}"] = _matmul_integer(
            np.full((64, 256), 255, np.uint8), np.full((256, 96), hi, np.int8))
    x = np.full((1, 64, 7, 7), 255, np.uint8)
    for pair in ((0, 1), (1, 2)):
        w = np.zeros((32, 64, 1, 1), np.int8)
        w[:, list(pair)] = 127
        out[f"1x1 QDQ conv, weights 127 on input channels {pair[0]} and {pair[1]}"] = _qdq_conv(w, x, 1)
    w = np.full((64, 1, 3, 3), 127, np.int8)
    out["depthwise 3x3 QDQ conv, weights 127"] = _qdq_conv(w, x, 64)
    return out


def main() -> None:
    if "--worker" in sys.argv:
        print(json.dumps(checks()))
        return
    if shutil.which(QEMU) is None:
        raise SystemExit(f"{QEMU} not found: apt-get install qemu-user-static")
    native = checks()
    run = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, __file__, "--worker"], capture_output=True,
                         text=True, check=True)
    haswell = json.loads(run.stdout.strip().splitlines()[-1])
    print("| check | this host | emulated Haswell (AVX2, no VNNI) |\n|---|---:|---:|")
    for name, err in native.items():
        print(f"| {name} | {err:,.0f} | {haswell[name]:,.0f} |")


if __name__ == "__main__":
    main()

"""Tiny ONNX and TFLite models for the emulated board smoke test (`scripts/board_check.sh`).

Run on the HOST with the project venv:

    .venv/bin/python scripts/board_check_models.py OUTDIR

writes OUTDIR/tiny.onnx, OUTDIR/tiny.tflite, OUTDIR/input.npy and OUTDIR/expected.npz (the host's outputs
for the same input).  `scripts/board_check_smoke.py` runs both models on the board side and compares.

The ONNX model is Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, enough to go through onnxruntime's
MLAS kernels (the code paths that pick NEON/SVE/dot-product kernels from the CPU's features).  The TFLite
model is FULLY_CONNECTED -> ADD, built directly with the flatbuffer schema that ai_edge_litert ships, so no
converter (TensorFlow, torch) is needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def make_onnx(path: Path, rng: np.random.Generator) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    fw = rng.standard_normal((5, 4)).astype(np.float32)
    fb = rng.standard_normal(5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "board_check_tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (fw, "fw"), (fb, "fb"))],
    )
    # opset 13 / IR 8: old enough for any onnxruntime a board might have pinned
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def make_tflite(path: Path, rng: np.random.Generator) -> None:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    fw = rng.standard_normal((3, 4)).astype(np.float32)   # FULLY_CONNECTED weights are [out, in]
    fb = rng.standard_normal(3).astype(np.float32)
    bias2 = rng.standard_normal((1, 3)).astype(np.float32)

    def buf(data: bytes | None):
        b = s.BufferT()
        b.data = list(data) if data else None
        return b

    def tensor(name, shape, buffer):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), s.TensorType.FLOAT32, buffer
        return t

    # buffer 0 must be the empty sentinel
    buffers = [buf(None), buf(None), buf(fw.tobytes()), buf(fb.tobytes()), buf(None), buf(bias2.tobytes()), buf(None)]
    tensors = [
        tensor("x", (1, 4), 1), tensor("fw", fw.shape, 2), tensor("fb", fb.shape, 3),
        tensor("fc", (1, 3), 4), tensor("bias2", bias2.shape, 5), tensor("y", (1, 3), 6),
    ]
    codes = []
    for op in (s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.ADD):
        c = s.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = op, op, 1
        codes.append(c)
    fc = s.OperatorT()
    fc.opcodeIndex, fc.inputs, fc.outputs = 0, [0, 1, 2], [3]
    fc.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    fc.builtinOptions = s.FullyConnectedOptionsT()
    add = s.OperatorT()
    add.opcodeIndex, add.inputs, add.outputs = 1, [3, 4], [5]
    add.builtinOptionsType = s.BuiltinOptions.AddOptions
    add.builtinOptions = s.AddOptionsT()
    sg = s.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [0], [5], [fc, add], "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, codes, [sg], buffers
    model.description = "board_check_tiny"
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]).copy()


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240611)
    make_onnx(d / "tiny.onnx", rng)
    make_tflite(d / "tiny.tflite", rng)
    x_onnx = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    x_tfl = rng.standard_normal((1, 4)).astype(np.float32)
    np.savez(d / "inputs.npz", onnx=x_onnx, tflite=x_tfl)
    np.savez(d / "expected.npz", onnx=run_onnx(d / "tiny.onnx", x_onnx), tflite=run_tflite(d / "tiny.tflite", x_tfl))
    print(f"board_check_models: wrote {d}/tiny.onnx, tiny.tflite, inputs.npz, expected.npz")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: board_check_models.py OUTDIR")
    main(sys.argv[1])

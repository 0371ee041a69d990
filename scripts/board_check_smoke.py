"""Board-side smoke test, run INSIDE the emulated aarch64 root filesystem by `scripts/board_check.sh`.

    python3 board_check_smoke.py DIR

DIR holds what `scripts/board_check_models.py` wrote on the host (tiny.onnx, tiny.tflite, inputs.npz,
expected.npz).  Imports every runtime dependency the board requirements name, runs the ONNX model through
onnxruntime and the TFLite model through ai_edge_litert's interpreter, compares with the host's outputs, and
prints one JSON line.  Exit status 0 only if everything imported and both outputs agree.

No timings are printed on purpose: under qemu-user they say nothing about the board.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path


def main(d: Path) -> int:
    import numpy as np
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter
    import ai_edge_litert
    import lz4.frame
    import PIL
    import zstandard

    report: dict = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {
            "numpy": np.__version__, "onnxruntime": ort.__version__, "pillow": PIL.__version__,
            "zstandard": zstandard.__version__, "lz4": lz4.__version__,
            "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
        },
        "onnxruntime_providers": ort.get_available_providers(),
    }
    # compression round trips (the wire codecs the runtime may use)
    blob = np.arange(4096, dtype=np.float32).tobytes()
    report["zstd_ok"] = zstandard.ZstdDecompressor().decompress(zstandard.ZstdCompressor().compress(blob)) == blob
    report["lz4_ok"] = lz4.frame.decompress(lz4.frame.compress(blob)) == blob

    inputs, expected = np.load(d / "inputs.npz"), np.load(d / "expected.npz")
    sess = ort.InferenceSession(str(d / "tiny.onnx"), providers=["CPUExecutionProvider"])
    y_onnx = sess.run(["y"], {"x": inputs["onnx"]})[0]

    it = Interpreter(model_path=str(d / "tiny.tflite"))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], inputs["tflite"])
    it.invoke()
    y_tfl = it.get_tensor(it.get_output_details()[0]["index"])

    report["onnx_max_abs_diff"] = float(np.max(np.abs(y_onnx - expected["onnx"])))
    report["tflite_max_abs_diff"] = float(np.max(np.abs(y_tfl - expected["tflite"])))
    report["onnx_ok"] = bool(np.allclose(y_onnx, expected["onnx"], rtol=1e-4, atol=1e-5))
    report["tflite_ok"] = bool(np.allclose(y_tfl, expected["tflite"], rtol=1e-4, atol=1e-5))
    ok = all(report[k] for k in ("zstd_ok", "lz4_ok", "onnx_ok", "tflite_ok")) and report["machine"] == "aarch64"
    report["ok"] = ok
    print(json.dumps(report, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: board_check_smoke.py DIR")
    sys.exit(main(Path(sys.argv[1])))

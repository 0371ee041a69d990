"""Benchmark of ONNX int8 recipes (toolkit.quantize_onnx) on EfficientNet-Lite0 with real ImageNet images.

Data: a labelled image folder read by :func:`calibration.readers.read_dataset` (``--data``; default
:func:`calibration.readers.default_data`: the 800 images of ../shared/data/imagenet-samples or
$EETOOL_IMAGENET_SAMPLES, label = line of synsets.txt), preprocessed like the bundle (shorter side 256
bilinear, centre crop 224, /255, ImageNet mean/std, NCHW). Calibration on every 4th image (200, or --ncal of
them), evaluation on the others.

For each config: whole model quantized with image calibration; split chain head = stem+blocks.0..5
(output ``blocks.5``), tail = blocks.6..end, head calibrated on images, tail calibrated on the float
head's real ``blocks.5`` for the same calibration images; int8 head -> int8 tail evaluated.
Reports float top-1, int8 top-1 and top-1 agreement with float, plus 1-thread latency (information only).

    python bench/int8_recipe.py                       # all configs
    python bench/int8_recipe.py --configs recipe      # only some
    python bench/int8_recipe.py --data DIR            # another labelled image folder
    python bench/int8_recipe.py --x-npy /tmp/X.npy --y-npy /tmp/y.npy   # reuse preprocessed arrays
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.quantize_onnx import QuantConfig, quantize_graph  # noqa: E402

CONFIGS = {
    "u8s8-minmax (ORT default)": QuantConfig(activation_type="uint8", weight_type="int8"),
    "u8s8-minmax reduce_range": QuantConfig(activation_type="uint8", weight_type="int8", reduce_range=True),
    "s8s8-minmax": QuantConfig(activation_type="int8", weight_type="int8"),
    "s8s8-minmax ActivationSymmetric": QuantConfig(
        activation_type="int8", weight_type="int8", extra_options={"ActivationSymmetric": True}
    ),
    "u8u8-minmax (recipe = QuantConfig())": QuantConfig(),
    "u8u8-minmax +4 sensitive 16-bit": QuantConfig(sensitive_float=4),
    "u8u8-minmax +8 sensitive 16-bit": QuantConfig(sensitive_float=8),
    "u8u8-minmax zero-dead-channels": QuantConfig(zero_dead_channels=True),
    "u8u8-percentile": QuantConfig(method="percentile"),
    "u8u8-entropy": QuantConfig(method="entropy"),
}


def load_images(data: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labelled images (default: the ImageNet samples), preprocessed exactly as the bundle's runtime does.
    Raises DataError for a source without labels."""
    from calibration.readers import DataError, default_data, read_dataset
    from toolkit.sources import IMAGENET_PREPROCESS

    ds = read_dataset(data or default_data(IMAGENET_PREPROCESS), IMAGENET_PREPROCESS, progress=True)
    if ds.y is None:
        raise DataError(f"{ds.source}: no labels (needs synsets.txt, labels.txt or class folders) for top-1")
    return ds.x, ds.y


def export(out: Path) -> None:
    import torch
    from torch import nn

    from toolkit.models.efficientnet_lite import efficientnet_lite0

    m = efficientnet_lite0()

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.head, self.pool, self.classifier = nn.Sequential(*m.blocks[6:]), m.head, m.pool, m.classifier

        def forward(self, x):
            return self.classifier(self.pool(self.head(self.blocks(x))))

    graphs = {
        "full": (m, (1, 3, 224, 224), "input", "logits"),
        "head": (nn.Sequential(m.stem, *m.blocks[:6]).eval(), (1, 3, 224, 224), "input", "blocks.5"),
        "tail": (Tail().eval(), (1, 80, 14, 14), "blocks.5", "logits"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (mod, shape, i, o) in graphs.items():
            torch.onnx.export(mod, torch.zeros(shape), str(out / f"{name}.onnx"), dynamo=False, opset_version=17,
                              input_names=[i], output_names=[o], dynamic_axes={i: {0: "N"}, o: {0: "N"}})


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def run(path: Path, name: str, x: np.ndarray, bs: int = 50) -> np.ndarray:
    s = session(path)
    return np.concatenate([s.run(None, {name: np.ascontiguousarray(x[i : i + bs])})[0] for i in range(0, len(x), bs)])


def latency_ms(path: Path, name: str, x: np.ndarray, reps: int = 20) -> float:
    s = session(path, threads=1)
    feed = {name: np.ascontiguousarray(x[:1])}
    for _ in range(3):
        s.run(None, feed)
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        s.run(None, feed)
        t.append(time.perf_counter() - t0)
    return 1000 * float(np.median(t))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--ncal", type=int, default=200)
    ap.add_argument("--data", help="labelled image folder (default: the ImageNet samples beside the checkout)")
    ap.add_argument("--x-npy"), ap.add_argument("--y-npy")
    ap.add_argument("--out", default="bench/results/int8_recipe.jsonl")
    ap.add_argument("--no-split", action="store_true")
    ap.add_argument("--latency", action="store_true")
    args = ap.parse_args()

    X, y = (np.load(args.x_npy), np.load(args.y_npy)) if args.x_npy else load_images(args.data)
    idx = np.arange(len(y))
    cal, ev = idx[idx % 4 == 0][: args.ncal], idx[idx % 4 != 0]
    XC, XE, ye = np.ascontiguousarray(X[cal]), np.ascontiguousarray(X[ev]), y[ev]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="int8-recipe-") as tmp:
        tmp = Path(tmp)
        export(tmp)
        pf = run(tmp / "full.onnx", "input", XE).argmax(1)
        fcal = run(tmp / "head.onnx", "input", XC)  # real float-head features of the calibration images
        fl = float((pf == ye).mean())
        print(f"float top-1 on {len(ev)} held-out images: {fl:.4f}  (calibration: {len(cal)} images)")
        for name in args.configs:
            cfg = CONFIGS[name]
            row = {"config": name, "ncal": len(cal), "neval": len(ev), "float_top1": fl}
            t0 = time.time()
            info = quantize_graph(tmp / "full.onnx", tmp / "full.int8.onnx", {"input": XC}, cfg)
            row["quant_s"] = round(time.time() - t0, 1)
            p = run(tmp / "full.int8.onnx", "input", XE).argmax(1)
            row.update(full_top1=float((p == ye).mean()), full_agree=float((p == pf).mean()),
                       float_nodes=info["float_nodes"], wide_tensors=list(info["wide_tensors"]))
            if args.latency:
                row.update(lat_fp32_ms=latency_ms(tmp / "full.onnx", "input", XE),
                           lat_int8_ms=latency_ms(tmp / "full.int8.onnx", "input", XE),
                           size_fp32_mb=(tmp / "full.onnx").stat().st_size / 1e6,
                           size_int8_mb=(tmp / "full.int8.onnx").stat().st_size / 1e6)
            if not args.no_split:
                hi = quantize_graph(tmp / "head.onnx", tmp / "head.int8.onnx", {"input": XC}, cfg)
                ti = quantize_graph(tmp / "tail.onnx", tmp / "tail.int8.onnx", {"blocks.5": fcal}, cfg)
                f = run(tmp / "head.int8.onnx", "input", XE)
                p = run(tmp / "tail.int8.onnx", "blocks.5", f).argmax(1)
                row.update(split_top1=float((p == ye).mean()), split_agree=float((p == pf).mean()),
                           head_out_q=hi["io"]["blocks.5"], tail_in_q=ti["io"]["blocks.5"],
                           split_float_nodes=hi["float_nodes"] + ti["float_nodes"])
            print(json.dumps(row))
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

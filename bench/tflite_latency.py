"""TFLite benchmark (not a test): EfficientNet-Lite0 split after ``blocks.5``, float vs full-integer int8.

Exports head (stem .. blocks.5) and tail (blocks.6 .. classifier) to float TFLite, quantises each with the given
recipes (tail calibrated on the FLOAT head's outputs on the calibration images), then reports

* accuracy on the images not used for calibration: PyTorch, float TFLite chain (top-1, agreement with PyTorch,
  max |logit diff|), and per recipe the int8 chain head_int8 -> tail_int8 (int8 passed straight over the wire
  when head output and tail input share scale / zero point): top-1, agreement with float, head-only and
  tail-only int8 top-1;
* LiteRT latency per graph (median ms of batch-1 invokes) with 1 and 2 threads, float and each int8 recipe.

Prints Markdown and writes JSON to ``--out``.

    python bench/tflite_latency.py --images /tmp/X.npy --labels /tmp/y.npy --ncal 150 --out out/tflite.json
    python bench/tflite_latency.py --jpegs ../shared/data/imagenet-samples --ncal 100 --out out/tflite.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_RECIPES = [
    "static_wi8_ai8",
    "static_wi8_ai8_minmax",
    "static_wi8_ai8_minmax+a16:Sequential_10",
]


def _load_jpegs(folder):
    """A labelled image folder (None: :func:`calibration.readers.default_data`), preprocessed exactly as the
    bundle's runtime does."""
    from calibration.readers import default_data, read_dataset
    from toolkit.sources import IMAGENET_PREPROCESS

    ds = read_dataset(folder or default_data(IMAGENET_PREPROCESS), IMAGENET_PREPROCESS, progress=True)
    return ds.x, (ds.y if ds.y is not None else np.full(len(ds), -1))


def _latency(path: str, name_map, feeds, threads: int, reps: int) -> float:
    from runtime.backend_litert import LiteRTSession

    s = LiteRTSession(path, threads=threads, name_map=name_map)
    s.run(feeds)
    s.run(feeds)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", help=".npy float32 (N,3,224,224) preprocessed images")
    ap.add_argument("--labels", help=".npy int labels for --images")
    ap.add_argument("--jpegs", help="labelled image folder (default: the ImageNet samples beside the checkout or "
                                    "$EETOOL_IMAGENET_SAMPLES, else scikit-image's photos)")
    ap.add_argument("--ncal", type=int, default=150)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    ap.add_argument("--recipes", nargs="*", default=DEFAULT_RECIPES)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import torch
    from torch import nn

    from runtime.backend_litert import LiteRTSession, dequantize, quantize
    from toolkit.export_tflite import export_float, quantize_int8
    from toolkit.models.efficientnet_lite import efficientnet_lite0

    torch.set_num_threads(2)
    if a.images:
        X = np.load(a.images, mmap_mode="r")
        y = np.load(a.labels)
    else:
        X, y = _load_jpegs(a.jpegs)
    if a.limit:
        X, y = X[: a.limit], y[: a.limit]
    perm = np.random.default_rng(0).permutation(len(X))
    cal, ev = np.sort(perm[: a.ncal]), np.sort(perm[a.ncal:])
    Xc, Xe, ye = np.ascontiguousarray(X[cal]), np.ascontiguousarray(X[ev]), y[ev]
    wd = a.workdir or tempfile.mkdtemp(prefix="tflite_bench_")
    os.makedirs(wd, exist_ok=True)

    m = efficientnet_lite0()
    head = nn.Sequential(m.stem, *m.blocks[:6]).eval()
    tail = nn.Sequential(*m.blocks[6:], m.head, m.pool, m.classifier).eval()
    with torch.no_grad():
        Fc = np.concatenate([head(torch.from_numpy(Xc[i:i + 50])).numpy() for i in range(0, len(Xc), 50)])
        Fe = np.concatenate([head(torch.from_numpy(Xe[i:i + 50])).numpy() for i in range(0, len(Xe), 50)])
        Le = np.concatenate([tail(torch.from_numpy(Fe[i:i + 50])).numpy() for i in range(0, len(Fe), 50)])
    eh = export_float(head, (torch.from_numpy(Xc[:2]),), os.path.join(wd, "head.fp32.tflite"), ["input"], ["blocks.5"])
    et = export_float(tail, (torch.from_numpy(Fc[:2]),), os.path.join(wd, "tail.fp32.tflite"), ["blocks.5"], ["logits"])
    hf = LiteRTSession(eh["file"], 2, eh["name_map"])
    tf_ = LiteRTSession(et["file"], 2, et["name_map"])
    Ff = hf.run({"input": Xe})["blocks.5"]
    Lf = tf_.run({"blocks.5": Ff})["logits"]
    res = {
        "split": "blocks.5", "calibration_images": int(len(cal)), "eval_images": int(len(ev)),
        "torch_top1": float((Le.argmax(1) == ye).mean()),
        "float_tflite": {"top1": float((Lf.argmax(1) == ye).mean()),
                         "agreement_with_torch": float((Lf.argmax(1) == Le.argmax(1)).mean()),
                         "max_abs_diff_logits": float(np.abs(Lf - Le).max()),
                         "max_abs_diff_head": float(np.abs(Ff - Fe).max())},
        "int8": {}, "latency_ms": {},
    }
    feeds = {"head": (eh["name_map"], {"input": Xe[:1]}), "tail": (et["name_map"], {"blocks.5": Fe[:1]})}
    for g, e in (("head", eh), ("tail", et)):
        for th in (1, 2):
            res["latency_ms"][f"{g}/fp32/{th}t"] = _latency(e["file"], feeds[g][0], feeds[g][1], th, a.reps)

    for r in a.recipes:
        tag = r.replace("+", "_").replace(":", "_").replace("|", "_")
        tag = "".join(c for c in tag if c.isalnum() or c in "_-")[:60]
        hp, tp = os.path.join(wd, f"head.{tag}.tflite"), os.path.join(wd, f"tail.{tag}.tflite")
        t0 = time.time()
        qh = quantize_int8(eh["file"], hp, {"input": Xc}, r, name_map=eh["name_map"])
        qt = quantize_int8(et["file"], tp, {"blocks.5": Fc}, r, name_map=et["name_map"])
        qtime = time.time() - t0
        hs, ts = LiteRTSession(hp, 2, eh["name_map"]), LiteRTSession(tp, 2, et["name_map"])
        hi, ho, ti, to = qh["io"]["input"], qh["io"]["blocks.5"], qt["io"]["blocks.5"], qt["io"]["logits"]
        shared = ho["dtype"] == ti["dtype"] and ho["zero_point"] == ti["zero_point"] and \
            abs(ho["scale"] - ti["scale"]) <= 1e-6 * ho["scale"]
        wire = hs.run_quantized({"input": quantize(Xe, hi["scale"], hi["zero_point"], np.dtype(hi["dtype"]))})["blocks.5"]
        wire_f = dequantize(wire, ho["scale"], ho["zero_point"])
        if shared:
            Lq = dequantize(ts.run_quantized({"blocks.5": wire})["logits"], to["scale"], to["zero_point"])
        else:
            Lq = ts.run({"blocks.5": wire_f})["logits"]
        L_head_only = tf_.run({"blocks.5": wire_f})["logits"]
        L_tail_only = ts.run({"blocks.5": Ff})["logits"]
        res["int8"][r] = {
            "top1": float((Lq.argmax(1) == ye).mean()),
            "agreement_with_float": float((Lq.argmax(1) == Lf.argmax(1)).mean()),
            "head_only_top1": float((L_head_only.argmax(1) == ye).mean()),
            "tail_only_top1": float((L_tail_only.argmax(1) == ye).mean()),
            "wire_shared_qparams": bool(shared), "head_out": ho, "tail_in": ti, "logits_q": to,
            "quantize_s": round(qtime, 1),
        }
        for g, p in (("head", hp), ("tail", tp)):
            for th in (1, 2):
                res["latency_ms"][f"{g}/{r}/{th}t"] = _latency(p, feeds[g][0], feeds[g][1], th, a.reps)
        print(f"[{r}] top1 {res['int8'][r]['top1']:.4f} agree {res['int8'][r]['agreement_with_float']:.4f}",
              file=sys.stderr, flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    ff = res["float_tflite"]
    print(f"## TFLite, EfficientNet-Lite0 split after blocks.5 ({len(cal)} calibration / {len(ev)} eval images)\n")
    print("| model | top-1 | agreement | note |\n|---|---|---|---|")
    print(f"| PyTorch float | {res['torch_top1']:.2%} | - | |")
    print(f"| TFLite float chain | {ff['top1']:.2%} | {ff['agreement_with_torch']:.2%} vs torch | "
          f"max abs diff logits {ff['max_abs_diff_logits']:.2e} |")
    for r, v in res["int8"].items():
        print(f"| int8 `{r}` | {v['top1']:.2%} | {v['agreement_with_float']:.2%} vs float | head-only "
              f"{v['head_only_top1']:.2%}, tail-only {v['tail_only_top1']:.2%}, wire shared {v['wire_shared_qparams']} |")
    print("\n| graph | precision | 1 thread ms | 2 threads ms |\n|---|---|---|---|")
    for g in ("head", "tail"):
        for p in ["fp32"] + list(res["int8"]):
            print(f"| {g} | {p} | {res['latency_ms'][f'{g}/{p}/1t']:.2f} | {res['latency_ms'][f'{g}/{p}/2t']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

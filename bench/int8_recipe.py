"""int8 recipe search: every variant's top-1, agreement with float, size and host latency in one table.

A model is cut at ``--split`` into a head and a tail exactly as ``eetool export`` cuts it (toolkit.graph,
toolkit.slicing, toolkit.onnx_export). Each variant quantises head and tail on their own real inputs
(head: the representative images; tail: the float head's output on those images) and the int8 chain
head -> tail is scored on held-out images. Data rule: calibrate and fine-tune on ``--calib``
(default ``imagenet-samples:fold=0/2``), score on ``--eval`` (``fold=1/2``), two disjoint interleaved folds.

``--bn-stats`` first recomputes every BatchNorm layer's statistics on the --calib images and centres the
classifier's logits there (toolkit.batchnorm_stats): a randomly initialised ResNet-18 otherwise gives
nearly the same logits for every photo and predicts a handful of classes, which makes agreement trivially
high.

As in ``eetool export --int8``, ONNX tails keep their logits float (``quantize_graph(float_outputs=...)``).
TFLite variants quantise the logits to int8 unless named "(float logits)" or "(int16 logits)" (eetool export's
TFLite default: int16, ``toolkit.export_tflite.float_outputs_recipe(kind="a16")``); "(int8 logits)" ONNX
variants quantise them. "+seqBC" TFLite variants then correct the int8 graphs' biases layer by layer against
the original float TFLite graphs on 128 inputs (toolkit.bias_correction_tflite), as eetool export does. The
NNCF and AdaRound variants quantise with those tools' own rules, logits included.

Columns: top-1 on --eval (when labelled), top-1 agreement with the float chain, top-5 agreement (the float
chain's top-1 class among the int8 chain's five highest logits), agreement with only the head int8 (float
tail) and with only the tail int8 (float head), distinct classes the float chain predicts, int8 head+tail
bytes,
host latency of the int8 head and tail as a ratio to fp32 (batch 1, interleaved ABAB with the same
threads and warm-up, medians), and the target the variant's kernels suit (see toolkit/int8_targets.py).

    python bench/int8_recipe.py                                   # every variant (tens of minutes, 2 cores)
    python bench/int8_recipe.py --variants u8s8 "u8s8 +BC"          # some
    python bench/int8_recipe.py --model resnet18 --split layer2 --bn-stats --variants "u8s8 +BC" --n-calib 64 --n-eval 200
    python bench/int8_recipe.py --sensitivity "u8s8 +BC"          # per-tensor SQNR of one variant
    python bench/int8_recipe.py --ablate head                     # agreement with each head layer float in turn
    python bench/int8_recipe.py --table a.jsonl b.jsonl           # one table from several runs

Results: a markdown table on stdout and in ``--out``.md, one JSON line per variant in ``--out``.jsonl.
The aimet-onnx (CLE, AdaRound) and NNCF variants need ``pip install --no-deps -r
bench/requirements-int8-search.txt``; the others need only eetool's own dependencies.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.quantize_onnx import QuantConfig, quantize_graph, sensitivity_ranking  # noqa: E402

U8U8 = QuantConfig()
U8S8 = QuantConfig(weight_type="int8")
RR = QuantConfig(weight_type="int8", reduce_range=True)


# ------------------------------------------------------------------------------------------ variants
# name -> (kind, settings, target). kinds: "ort" (toolkit.quantize_onnx), "cle" (aimet-onnx cross-layer
# equalisation, then ort), "nncf" (NNCF 3.4 PTQ), "adaround" (aimet-onnx), "qat" (toolkit.qat weights, then ort)
VARIANTS = {
    "u8u8": ("ort", U8U8, "any (slow u8u8 kernels on x86)"),
    "u8s8": ("ort", U8S8, "arm64, x86-vnni"),
    "u8s8 reduce_range": ("ort", RR, "x86-avx2"),
    "s8s8": ("ort", QuantConfig(activation_type="int8", weight_type="int8"), "arm64, x86-vnni"),
    "u8s8 entropy": ("ort", replace(U8S8, method="entropy"),
                     "arm64, x86-vnni"),
    "u8s8 +stem float": ("ort", replace(U8S8, float_first_convs=1), "arm64, x86-vnni"),
    "u8s8 +stem float +BC": ("ort", replace(U8S8, float_first_convs=1, bias_correction=True), "arm64, x86-vnni"),
    "u8s8 +stem float +BC +seqBC": ("ort", replace(U8S8, float_first_convs=1, bias_correction=True,
                                                   sequential_bias_correction=True), "arm64, x86-vnni"),
    "u8s8 reduce_range +stem float +BC +seqBC": ("ort", replace(RR, float_first_convs=1, bias_correction=True,
                                                                sequential_bias_correction=True), "x86-avx2"),
    "u8s8 reduce_range +stem float +BC": ("ort", replace(RR, float_first_convs=1, bias_correction=True), "x86-avx2"),
    "u8s8 +4 sensitive 16-bit": ("ort", replace(U8S8, sensitive_float=4), "arm64, x86-vnni"),
    "u8s8 +BC": ("ort", replace(U8S8, bias_correction=True), "arm64, x86-vnni"),
    "u8s8 +BC (int8 logits)": ("ort", replace(U8S8, bias_correction=True), "arm64, x86-vnni"),
    "u8s8 reduce_range +BC": ("ort", replace(RR, bias_correction=True), "x86-avx2"),
    "u8s8 CLE": ("cle", U8S8, "arm64, x86-vnni"),
    "u8s8 CLE +BC": ("cle", replace(U8S8, bias_correction=True), "arm64, x86-vnni"),
    "NNCF PTQ (fast bias correction)": ("nncf", {"fast_bias_correction": True}, "arm64, x86-vnni"),
    "NNCF PTQ (bias correction)": ("nncf", {"fast_bias_correction": False}, "arm64, x86-vnni"),
    "u8s8 AdaRound": ("adaround", {"iterations": 300}, "arm64, x86-vnni"),
    "QAT u8s8": ("qat", U8S8, "arm64, x86-vnni"),
    "QAT u8s8 +BC": ("qat", replace(U8S8, bias_correction=True), "arm64, x86-vnni"),
    "QAT-7bit u8s8 reduce_range": ("qat", RR, "x86-avx2"),
    "QAT-7bit u8s8 reduce_range +BC": ("qat", replace(RR, bias_correction=True), "x86-avx2"),
    # TFLite (litert-torch + ai-edge-quantizer): int8 weights per channel, int8 activations, XNNPACK kernels
    "TFLite int8": ("tflite", {"first_float": 0, "qat": False}, "any (XNNPACK)"),
    "TFLite int8 +BC": ("tflite", {"first_float": 0, "qat": False, "bc": True}, "any (XNNPACK)"),
    "TFLite int8 first 2 convs float +BC": ("tflite", {"first_float": 2, "qat": False, "bc": True}, "any (XNNPACK)"),
    "TFLite int8 first 2 convs float": ("tflite", {"first_float": 2, "qat": False}, "any (XNNPACK)"),
    "TFLite int8 first 2 convs float +BC (float logits)": ("tflite", {"first_float": 2, "qat": False, "bc": True},
                                                           "any (XNNPACK)"),
    "TFLite int8 first 2 convs float +BC (int16 logits)": ("tflite", {"first_float": 2, "qat": False, "bc": True},
                                                           "any (XNNPACK)"),
    # eetool export's TFLite default: + layer-by-layer correction of the int8 graphs' biases
    "TFLite int8 first 2 convs float +BC +seqBC (int16 logits)": (
        "tflite", {"first_float": 2, "qat": False, "bc": True, "seqbc": True}, "any (XNNPACK)"),
    "TFLite int8 first 2 convs float +BC +seqBC": (
        "tflite", {"first_float": 2, "qat": False, "bc": True, "seqbc": True}, "any (XNNPACK)"),
    "TFLite QAT int8": ("tflite", {"first_float": 0, "qat": True}, "any (XNNPACK)"),
    "TFLite QAT int8 first 2 convs float": ("tflite", {"first_float": 2, "qat": True}, "any (XNNPACK)"),
}


# ------------------------------------------------------------------------------------------------ graphs
def load_model(name: str):
    from toolkit.sources import resolve

    return resolve(name)


def export_pair(model, sample, split: str, out: Path, tag: str, modules: dict | None = None
                ) -> tuple[Path, Path, str, str]:
    """Float ONNX head and tail of ``model`` cut at ``split``, as eetool export writes them; with
    ``modules``, also stores the head and tail ``torch.fx`` modules and sample inputs there."""
    import torch

    from toolkit.graph import TracedModel
    from toolkit.onnx_export import export_onnx
    from toolkit.slicing import order_cuts, slice_model

    traced = TracedModel(model.eval(), torch.from_numpy(sample))
    head, tail = slice_model(traced, order_cuts(traced, [split]))
    if len(head.outputs) != 1:
        raise SystemExit(f"{split}: the cut carries {len(head.outputs)} tensors; pick a single-tensor split")
    paths = out / f"{tag}.head.onnx", out / f"{tag}.tail.onnx"
    x = torch.from_numpy(sample)
    with torch.no_grad():
        mid = head.module(x)
    mid = mid[0] if isinstance(mid, tuple) else mid
    export_onnx(head.module, (x,), paths[0], head.inputs, head.outputs)
    export_onnx(tail.module, (mid,), paths[1], tail.inputs, tail.outputs)
    if modules is not None:
        modules[tag] = (head, tail, x, mid)
    return paths[0], paths[1], head.inputs[0], head.outputs[0]


class Graph:
    """A graph file with its format (``onnx``/``tflite``) and, for TFLite, our-name -> signature-name map."""

    def __init__(self, path: Path, fmt: str = "onnx", name_map: dict | None = None):
        self.path, self.fmt, self.name_map = Path(path), fmt, name_map

    def session(self, threads: int):
        from runtime.backends import open_session

        return open_session(self.path, self.fmt, threads, self.name_map)


def as_graph(g) -> Graph:
    return g if isinstance(g, Graph) else Graph(g)


def run(g, name: str, x: np.ndarray, bs: int = 32, threads: int = 2) -> np.ndarray:
    s = as_graph(g).session(threads)
    outs = [s.run({name: np.ascontiguousarray(x[i:i + bs])}) for i in range(0, len(x), bs)]
    return np.concatenate([next(iter(o.values())) for o in outs])


def latency_ratio(fp32, int8, name: str, x1: np.ndarray, threads: int, reps: int, warmup: int = 5) -> dict:
    """Interleaved ABAB batch-1 timing of the fp32 and int8 graph (same threads, same warm-up): median and
    minimum ms of each, and the median over repetitions of the ratio int8 / fp32."""
    a, b = as_graph(fp32).session(threads), as_graph(int8).session(threads)
    feed = {name: np.ascontiguousarray(x1)}
    for _ in range(warmup):
        a.run(feed)
        b.run(feed)
    ta, tb = [], []
    for _ in range(reps):
        for s, t in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            s.run(feed)
            t.append(time.perf_counter() - t0)
    # median of the per-pair ratios: each pair ran back to back, so load from other processes cancels
    ratio = float(np.median(np.asarray(tb) / np.asarray(ta)))
    return {"fp32_ms": 1000 * float(np.median(ta)), "int8_ms": 1000 * float(np.median(tb)), "ratio": ratio,
            "fp32_min_ms": 1000 * min(ta), "int8_min_ms": 1000 * min(tb)}


# ---------------------------------------------------------------------------------------- quantisers
def quantize_ort(fp32: Path, int8: Path, calib: dict, cfg: QuantConfig, first: bool, float_logits: bool = True
                 ) -> dict:
    """As ``eetool export --int8`` quantises: the tail's logits (its graph outputs) stay float unless
    ``float_logits`` is False (the variants named "(int8 logits)")."""
    import onnx

    cfg = cfg if first else replace(cfg, float_first_convs=0)
    logits = () if first or not float_logits else tuple(
        o.name for o in onnx.load(str(fp32), load_external_data=False).graph.output)
    return quantize_graph(fp32, int8, calib, cfg, progress=False, float_outputs=logits)


def equalize(fp32: Path, out: Path) -> Path:
    """Cross-layer equalisation (Nagel et al., ICCV 2019) with aimet-onnx: folds BatchNorm, replaces ReLU6
    by ReLU (scale equivariance), rescales conv pairs and folds high biases."""
    import onnx
    from aimet_onnx.cross_layer_equalization import equalize_model
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    m = onnx.load(str(pre))
    equalize_model(m)
    onnx.save(m, str(out))
    return out


def quantize_nncf(fp32: Path, int8: Path, calib: dict, opts: dict) -> dict:
    import nncf
    import onnx

    name = next(iter(calib))
    x = calib[name]
    data = nncf.Dataset([{name: x[i:i + 1]} for i in range(len(x))])
    model = onnx.load(str(fp32))
    q = nncf.quantize(model, data, subset_size=len(x), **opts)
    onnx.save(q, str(int8))
    return {"nncf": opts}


def quantize_adaround(fp32: Path, int8: Path, calib: dict, opts: dict) -> dict:
    """AdaRound (Nagel et al., ICML 2020) with aimet-onnx: weight rounding learned per layer on the
    calibration inputs, int8 per-channel weights, uint8 activations, exported as QDQ."""
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround, int8 as qint8
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = int8.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    model = onnx.load(str(pre))
    for node in model.graph.node:  # aimet-onnx 2.42's QDQ export fails on '' (omitted optional) inputs, e.g.
        while node.input and node.input[-1] == "":  # Pad's constant_value; trailing ones may be left out
            node.input.pop()
    name = next(iter(calib))
    x = calib[name]
    batches = [{name: x[i:i + 16]} for i in range(0, len(x), 16)]
    sim = QuantizationSimModel(model, param_type=qint8, activation_type=qint8, config_file=None)
    apply_adaround(sim, batches[:4], num_iterations=opts["iterations"])
    sim.compute_encodings(batches)
    onnx.save(sim.to_onnx_qdq(), str(int8))
    return {"adaround": opts}


def tflite_pair(mods, tmp: Path, tag: str, calib_x: np.ndarray, calib_mid: np.ndarray, first_float: int,
                logits: str = "int8", correct: tuple | None = None):
    """Float and int8 TFLite head and tail from the fx modules in ``mods`` (toolkit.export_tflite, as
    eetool export writes them: head calibrated on images, tail on the float head's outputs, the tail's
    input encoding pinned to the head's output encoding). ``logits`` "int8" / "int16" / "float": the tail's
    logits. ``correct``: (float head .tflite, float tail .tflite,
    samples, tail inputs) to correct the int8 graphs' biases against, layer by layer
    (toolkit.bias_correction_tflite), as eetool export does."""
    from toolkit.export_tflite import export_float, first_convs_float_recipe, float_outputs_recipe, quantize_int8

    head, tail, x, mid = mods
    out = {}
    fixed = None
    for seg, arg, calib in ((head, x, calib_x), (tail, mid, calib_mid)):
        fp = tmp / f"{tag}.{seg.name}.fp32.tflite"
        entry = export_float(seg.module, (arg,), fp, seg.inputs, seg.outputs)
        recipe = first_convs_float_recipe(fp, first_float) if (first_float and seg is head) else "static_wi8_ai8_minmax"
        if seg is tail and logits != "int8":  # the logits' FULLY_CONNECTED stays float / computes int16
            recipe = float_outputs_recipe(fp, seg.outputs, entry["name_map"], recipe,
                                          kind="a16" if logits == "int16" else "float")
        q8 = tmp / f"{tag}.{seg.name}.int8.tflite"
        q = quantize_int8(fp, q8, {seg.inputs[0]: calib}, recipe, name_map=entry["name_map"], fixed_io=fixed)
        if seg is head:
            fixed = {seg.outputs[0]: {k: q["io"][seg.outputs[0]][k] for k in ("scale", "zero_point")}}
        if correct is not None:
            from toolkit.bias_correction_tflite import correct_biases_sequential_tflite

            ref_head, ref_tail, k, ref_mid = correct
            inputs = calib_x[:k] if seg is head else ref_mid[:k]
            q["bias_correction"] = correct_biases_sequential_tflite(
                ref_head if seg is head else ref_tail, q8, {seg.inputs[0]: inputs}, entry["name_map"], progress=True)
        out[seg.name] = (Graph(fp, "tflite", entry["name_map"]), Graph(q8, "tflite", entry["name_map"]), q)
    (hf, h8, hq), (tf, t8, tq) = out[head.name], out[tail.name]
    return hf, h8, tf, t8, {"head": hq, "tail": tq}


def qat_state(model_name: str, model, calib_x: np.ndarray, reduce_range: bool, cache: Path, epochs: int, lr: float,
              data_tag: str = ""):
    """Fine-tuned (toolkit.qat) copy of ``model`` on the float32 NCHW inputs ``calib_x``, cached in ``cache``
    by settings (``data_tag`` names inputs beyond the calibration images)."""
    import torch

    from toolkit import qat

    cfg = qat.QATConfig(reduce_range=reduce_range, epochs=epochs, lr=lr)
    key = cache / (f"{model_name}-{'rr' if reduce_range else '8'}-e{cfg.epochs}-lr{cfg.lr:g}-n{len(calib_x)}"
                   f"{data_tag}.pt")
    student = qat.fold_batchnorm(model)
    if key.is_file():
        student.load_state_dict(torch.load(key, weights_only=True))
        return student.eval(), {"cached": str(key)}
    student, hist = qat.finetune(model, calib_x, cfg, progress=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), key)
    key.with_suffix(".json").write_text(json.dumps(hist))
    return student, hist


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--bn-stats", action="store_true",
                    help="recompute BatchNorm statistics and centre the logits on the --calib images first (random weights)")
    ap.add_argument("--split", default="blocks.5")
    ap.add_argument("--calib", help="calibration / fine-tuning data (default: the ImageNet samples, fold 0/2)")
    ap.add_argument("--eval", help="evaluation data (default: the ImageNet samples, fold 1/2)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--n-calib", type=int, help="use this many --calib samples (spread over the fold)")
    ap.add_argument("--n-eval", type=int, help="use this many --eval samples (spread over the fold)")
    ap.add_argument("--threads", type=int, default=1, help="latency threads (both graphs)")
    ap.add_argument("--reps", type=int, default=30, help="latency repetitions per graph")
    ap.add_argument("--qat-epochs", type=int, default=6)
    ap.add_argument("--qat-lr", type=float, default=1e-6)
    ap.add_argument("--qat-cache", default="out/qat-cache")
    ap.add_argument("--qat-photos", nargs="*", default=[], metavar="DIR",
                    help="folders of large unlabelled photos whose random crops are added to the QAT fine-tuning "
                         "inputs (not to calibration), e.g. /usr/share/backgrounds/mate/nature")
    ap.add_argument("--qat-photo-crops", type=int, default=32, help="random crops per --qat-photos image")
    ap.add_argument("--sensitivity", help="variant whose per-tensor SQNR (qdq_loss_debug) is reported")
    ap.add_argument("--ablate", choices=("head", "tail"),
                    help="one-layer-float ablation of that graph (u8s8 +BC with every layer int8, the other graph "
                         "float): agreement on "
                         "the calibration and the evaluation images with each Conv/Gemm kept float in turn")
    ap.add_argument("--ablate-base", nargs="*", default=[], metavar="NODE",
                    help="nodes kept float in every --ablate run (a greedy next step), e.g. /Conv")
    ap.add_argument("--ablate-nodes", default=".*",
                    help="regex over node names (after quant_pre_process) limiting --ablate, e.g. '^/Conv(_[0-9]+)?$'")
    ap.add_argument("--out", default="bench/results/int8_recipe")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of earlier runs' rows")
    args = ap.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for f in args.table for line in Path(f).read_text().splitlines() if line.strip()]
        print(markdown(rows))
        return
    unknown = [v for v in args.variants + ([args.sensitivity] if args.sensitivity else []) if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    from calibration.readers import default_data, read_dataset

    src = load_model(args.model)
    data = default_data(src.preprocess)  # ../shared/data/imagenet-samples or $EETOOL_IMAGENET_SAMPLES
    args.calib = args.calib or f"{data}:fold=0/2"
    args.eval = args.eval or f"{data}:fold=1/2"
    cal = read_dataset(args.calib, src.preprocess, limit=args.n_calib, spread=True, progress=True)
    ev = read_dataset(args.eval, src.preprocess, limit=args.n_eval, spread=True, progress=True)
    qat_x, qat_tag = cal.x, ""  # QAT inputs: the calibration images plus --qat-photos crops, read once
    if args.qat_photos:
        from calibration.photos import LARGE_PHOTO_VIEWS, iter_views
        from calibration.readers import image_files

        files = [f for d in args.qat_photos for f in image_files(d)]
        crops = [x for _, x in iter_views(files, args.qat_photo_crops, src.preprocess, 0, LARGE_PHOTO_VIEWS)]
        print(f"QAT inputs: {len(cal)} calibration images + {len(crops)} crops of {len(files)} photos", flush=True)
        qat_x, qat_tag = np.concatenate([cal.x, np.stack(crops)]), f"-photos{len(files)}x{args.qat_photo_crops}"
    if args.bn_stats:  # on the calibration images only: the evaluation fold stays unseen
        from toolkit.batchnorm_stats import center_logits, recompute_batchnorm_stats

        center_logits(recompute_batchnorm_stats(src.model, cal.x), cal.x)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    mods: dict = {}
    with tempfile.TemporaryDirectory(prefix="int8-recipe-") as tmp:
        tmp = Path(tmp)
        head, tail, in_name, mid_name = export_pair(src.model, cal.x[:1], args.split, tmp, "float", mods)
        float_mid = run(head, in_name, cal.x)
        ref = run(tail, mid_name, run(head, in_name, ev.x)).argmax(1)
        print(f"float chain predicts {len(np.unique(ref))} distinct classes on {len(ev)} images", flush=True)
        float_top1 = None if ev.y is None else float((ref == ev.y).mean())
        print(f"{args.model} split after {args.split}: float top-1 {float_top1} on {len(ev)} images of {ev.source}; "
              f"calibration on {len(cal)} images of {cal.source}", flush=True)
        if args.ablate:
            ablate(args.ablate, args.ablate_nodes, head, tail, in_name, mid_name, cal.x, ev.x, tmp, out,
                   tuple(args.ablate_base))
            return
        pairs = {"float": (head, tail, float_mid)}
        students: dict = {}

        def student(rr: bool):
            """The fine-tuned model's float ONNX pair, its calibration features and fx modules."""
            tag = f"qat-{int(rr)}"
            if tag not in pairs:
                st, students[tag] = qat_state(args.model, src.model, qat_x, rr, Path(args.qat_cache),
                                              args.qat_epochs, args.qat_lr, qat_tag)
                qh, qt, _, _ = export_pair(st, cal.x[:1], args.split, tmp, tag, mods)
                pairs[tag] = (qh, qt, run(qh, in_name, cal.x))
            return tag

        for name in args.variants:
            kind, opts, target = VARIANTS[name]
            t0 = time.time()
            h8, t8 = tmp / f"{len(rows)}.head.int8.onnx", tmp / f"{len(rows)}.tail.int8.onnx"
            fh, ft, mid = pairs["float"]
            ref_head, ref_tail = head, tail  # latency reference: the float graphs of the same format
            info: dict = {}
            # as eetool export: ONNX tails keep their logits float, TFLite tails do not (no measured gain there,
            # and the float classifier weighs 3.8 MB more); the suffixed variants do the other
            float_logits = name.endswith("(float logits)") or (kind != "tflite" and not name.endswith("(int8 logits)"))
            if kind == "qat":
                tag = student(bool(opts.reduce_range))
                info["qat"] = students[tag]
                fh, ft, mid = pairs[tag]
            if kind == "cle":
                if "cle" not in pairs:
                    ch, ct = equalize(head, tmp / "cle.head.onnx"), equalize(tail, tmp / "cle.tail.onnx")
                    pairs["cle"] = (ch, ct, run(ch, in_name, cal.x))
                fh, ft, mid = pairs["cle"]
            if kind in ("ort", "qat", "cle"):
                info["head"] = quantize_ort(fh, h8, {in_name: cal.x}, opts, first=True)
                info["tail"] = quantize_ort(ft, t8, {mid_name: mid}, opts, first=False, float_logits=float_logits)
            elif kind == "nncf":
                info["head"] = quantize_nncf(fh, h8, {in_name: cal.x}, opts)
                info["tail"] = quantize_nncf(ft, t8, {mid_name: mid}, opts)
            elif kind == "adaround":
                info["head"] = quantize_adaround(fh, h8, {in_name: cal.x}, opts)
                info["tail"] = quantize_adaround(ft, t8, {mid_name: mid}, opts)
            elif kind == "tflite":
                tag = student(False) if opts["qat"] else "float"
                if opts.get("bc"):  # bias correction folded into a float copy before conversion
                    from toolkit.bias_correction import bias_corrected_model

                    if "bc" not in pairs:
                        bc_model = bias_corrected_model(src.model if tag == "float" else None, cal.x)
                        bh, bt, _, _ = export_pair(bc_model, cal.x[:1], args.split, tmp, "bc", mods)
                        pairs["bc"] = (bh, bt, run(bh, in_name, cal.x))
                    tag = "bc"
                cmid = pairs[tag][2]
                correct = None
                if opts.get("seqbc"):  # against the original model's float TFLite graphs, on 128 inputs
                    if "float-tflite" not in pairs:
                        from toolkit.export_tflite import export_float

                        seg_h, seg_t, x1, mid1 = mods["float"]
                        pairs["float-tflite"] = [
                            export_float(seg.module, (arg,), tmp / f"ref.{seg.name}.fp32.tflite", seg.inputs,
                                         seg.outputs)["file"] for seg, arg in ((seg_h, x1), (seg_t, mid1))]
                    correct = (*pairs["float-tflite"], 128, float_mid)
                ref_head, h8, ref_tail, t8, info = tflite_pair(
                    mods[tag], tmp, f"{len(rows)}", cal.x, cmid, opts["first_float"],
                    "float" if float_logits else "int16" if name.endswith("(int16 logits)") else "int8", correct)
                if opts["qat"]:  # latency against the original model's float TFLite graphs
                    ref_head, _, ref_tail, _, _ = tflite_pair(mods["float"], tmp, f"{len(rows)}f", cal.x[:8],
                                                              float_mid[:8], 0)
            quant_s = time.time() - t0
            h8, t8 = as_graph(h8), as_graph(t8)
            mid8 = run(h8, in_name, ev.x)
            logits = run(t8, mid_name, mid8)
            pred = logits.argmax(1)
            # where the loss is: one graph int8, the other the original float ONNX graph
            only_head = run(tail, mid_name, mid8).argmax(1)
            only_tail = run(t8, mid_name, run(head, in_name, ev.x)).argmax(1)
            row = {
                "variant": name, "target": target, "model": args.model, "split": args.split,
                "calib": cal.source, "eval": ev.source, "n_eval": len(ev),
                "float_top1": float_top1, "top1": None if ev.y is None else float((pred == ev.y).mean()),
                "agreement": float((pred == ref).mean()),
                "agreement_top5": top5_agreement(ref, logits),
                "agreement_int8_head_only": float((only_head == ref).mean()),
                "agreement_int8_tail_only": float((only_tail == ref).mean()),
                "bn_stats": cal.source if args.bn_stats else None,
                "float_classes": int(len(np.unique(ref))),  # distinct float predictions: agreement is not trivial
                "bytes": h8.path.stat().st_size + t8.path.stat().st_size,
                "float_bytes": as_graph(ref_head).path.stat().st_size + as_graph(ref_tail).path.stat().st_size,
                "head_latency": latency_ratio(ref_head, h8, in_name, ev.x[:1], args.threads, args.reps),
                "tail_latency": latency_ratio(ref_tail, t8, mid_name, run(head, in_name, ev.x[:1]), args.threads,
                                              args.reps),
                "quant_s": round(quant_s, 1), "threads": args.threads,
                "info": _jsonable(info),
            }
            if args.sensitivity == name and kind != "tflite":
                row["sensitivity"] = {
                    "head": sensitivity_ranking(fh, h8.path, {in_name: cal.x[:8]}, tmp)[:10],
                    "tail": sensitivity_ranking(ft, t8.path, {mid_name: mid[:8]}, tmp)[:10],
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
            with out.with_suffix(".jsonl").open("a") as fh_:
                fh_.write(json.dumps(row) + "\n")
    table = markdown(rows)
    print(table)
    out.with_suffix(".md").write_text(table + "\n")


def ablate(which: str, pattern: str, head, tail, in_name: str, mid_name: str, cal_x: np.ndarray, ev_x: np.ndarray,
           tmp: Path, out: Path, base: tuple = ()) -> list[dict]:
    """One-layer-float sensitivity: quantise ``which`` graph (``u8s8 +BC``, all layers int8: for the head
    that is the recipe before ``IMAGE_GRAPH_RECIPE``, which this ablation chose) once with nothing
    and once with each Conv/Gemm whose name matches ``pattern`` kept float (``QuantConfig.float_nodes``),
    the other graph float, and report the chain's top-1 agreement with the float chain on the calibration
    images (to rank on) and on the evaluation images. ``base``: nodes kept float in every run (the layers
    an earlier round chose). Writes ``out``-ablate-<which>.jsonl."""
    import re

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph, name = (head, in_name) if which == "head" else (tail, mid_name)
    cal_mid, ev_mid = run(head, in_name, cal_x), run(head, in_name, ev_x)
    feeds = {"cal": cal_x if which == "head" else cal_mid, "ev": ev_x if which == "head" else ev_mid}
    ref = {"cal": run(tail, mid_name, cal_mid).argmax(1), "ev": run(tail, mid_name, ev_mid).argmax(1)}
    pre = tmp / f"ablate-{which}.pre.onnx"
    quant_pre_process(str(graph), str(pre))
    nodes = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in ("Conv", "Gemm")]
    rows = []
    for keep in [None] + [n for n in nodes if re.search(pattern, n) and n not in base]:
        t0 = time.time()
        q = tmp / f"ablate-{which}.int8.onnx"
        cfg = replace(U8S8, bias_correction=True, float_nodes=base + ((keep,) if keep else ()))
        quantize_ort(graph, q, {name: feeds["cal"]}, cfg, first=which == "head")
        agree = {}
        for k in ("cal", "ev"):
            if which == "head":
                logits = run(tail, mid_name, run(q, in_name, feeds[k]))
            else:
                logits = run(q, mid_name, feeds[k])
            agree[k] = float((logits.argmax(1) == ref[k]).mean())
        row = {"graph": which, "base": list(base), "float_node": keep, "agreement_calib": agree["cal"],
               "agreement_eval": agree["ev"],
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with Path(f"{out}-ablate-{which}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


def top5_agreement(ref: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of samples whose reference class ``ref`` (int, ``(N,)``) is among the five highest of
    ``logits`` (float, ``(N, C)``)."""
    top5 = np.argsort(-logits, axis=1)[:, :5]
    return float((top5 == ref[:, None]).any(1).mean())


def _jsonable(o):
    """Quantiser summaries without numpy scalars (for the JSON lines)."""
    return json.loads(json.dumps(o, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"{r0['model']} split after {r0['split']}; calibration {r0['calib']}, evaluation {r0['eval']} "
             f"({r0['n_eval']} images); float top-1 "
             + ("n/a" if r0["float_top1"] is None else f"{100 * r0['float_top1']:.2f} %")
             + (f"; BatchNorm statistics and logit means recomputed on {r0['bn_stats']}" if r0.get("bn_stats") else "")
             + (f"; the float chain predicts {r0['float_classes']} distinct classes" if "float_classes" in r0 else "")
             + f"; latency at {r0['threads']} thread(s), batch 1, int8/fp32 medians interleaved ABAB", "",
             "| variant | kernels suit | top-1 | Δ vs float | agreement | top-5 agreement | agreement, int8 head / "
             "int8 tail only | int8 bytes (head+tail) | head int8/fp32 | tail int8/fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        top1 = "n/a" if r["top1"] is None else f"{100 * r['top1']:.2f} %"
        delta = "n/a" if r["top1"] is None else f"{100 * (r['top1'] - r['float_top1']):+.2f} pt"
        top5 = f"{100 * r['agreement_top5']:.2f} %" if "agreement_top5" in r else "n/a"
        split = (f"{100 * r['agreement_int8_head_only']:.2f} / {100 * r['agreement_int8_tail_only']:.2f} %"
                 if "agreement_int8_head_only" in r else "n/a")
        lines.append(f"| {r['variant']} | {r['target']} | {top1} | {delta} | {100 * r['agreement']:.2f} % | {top5} | "
                     f"{split} | {r['bytes']:,} | {r['head_latency']['ratio']:.2f} | {r['tail_latency']['ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

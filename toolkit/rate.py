"""``eetool rate``: rate–accuracy of split computing against sending the image, on the same inputs.

For every input image, the same 224x224 center crop the model sees is

- run through each bundle's head; the split feature is quantised and entropy coded by each wire codec
  (the bundle's own, and with ``wire_bits`` others calibrated on the bundle's representative data exactly
  as ``eetool export --wire-bits`` does), framed by :func:`runtime.protocol.encode_request`, decoded by
  :func:`runtime.protocol.decode_request` as the edge server does, and run through the tail;
- encoded with Pillow as JPEG (``optimize=True``) and WebP (``method=6``) at each quality and as PNG
  (lossless), framed as the ``file`` tensor of ``serve --whole-model --input-file``, decoded there
  (:func:`runtime.preprocess.decode_image`) and run through the whole float model (array models such as
  the Fashion-MNIST CNN: the 8-bit image behind the array, encoded the same way);
- and, for reference, the original file as it is (what edge computing sends in ``runtime bench``).

Per operating point: bytes per sample on the wire (real REQUEST frames, prefix and JSON header included;
mean and p90), top-1 against the labels and top-1 agreement with the float model (the first bundle's
whole-model fp32 graphs on the uncompressed crop). A point *dominates* an image row when it sends fewer
bytes at equal or better top-1 (agreement without labels).

Units: bytes per sample, top-1 as a fraction (0..1).
"""
from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from calibration.readers import DataError, Dataset, read_dataset
from runtime import protocol
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.device import wire_codec
from runtime.manifest import WireQuant
from runtime.preprocess import as_preprocess, decode_image, model_crop

from .calibrate import WireCodec, set_wire_qparams

BATCH = 16
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class RatePoint:
    """One operating point. ``kind``: ``split`` (a bundle's wire codec), ``jpeg`` / ``webp`` (the crop
    re-encoded at ``quality``) or ``file`` (the original file). Bytes per sample on the wire (frames);
    ``payload_mean`` is the tensor or image bytes alone; ``top1`` None without labels."""

    kind: str
    label: str
    bytes_mean: float
    bytes_p90: float
    payload_mean: float
    top1: float | None
    agreement: float
    samples: int
    info: dict = field(default_factory=dict)

    def score(self) -> float:
        """top-1 against labels when known, else agreement with the float model."""
        return self.agreement if self.top1 is None else self.top1


def _stats(sizes: list[int]) -> tuple[float, float]:
    a = np.asarray(sizes, np.float64)
    return float(a.mean()), float(np.percentile(a, 90))


def _accuracy(pred: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float(np.mean(pred == labels))


def _run_chain(chain: Chain, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    outs = []
    for start in range(0, n, BATCH):
        values = chain.run_segments({k: v[start:start + BATCH] for k, v in feeds.items()})
        outs.append(values[output])
    return np.concatenate(outs)


# --------------------------------------------------------------------------- the image rows
def encode_crop(crop, fmt: str, quality: int | None = None) -> bytes:
    """The crop (Pillow image) encoded as ``jpeg`` (baseline, optimised Huffman tables, 4:2:0) or ``webp``
    (lossy, method 6) at ``quality`` (0..100), or ``png`` (lossless, optimised)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        crop.save(buf, "JPEG", quality=int(quality), optimize=True)
    elif fmt == "webp":
        crop.save(buf, "WEBP", quality=int(quality), method=6)
    elif fmt == "png":
        crop.save(buf, "PNG", optimize=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def array_crops(x: np.ndarray, spec: dict) -> list:
    """The 8-bit images behind preprocessed array inputs ``x`` (N, C, H, W) (e.g. Fashion-MNIST), recovered by
    inverting ``(u8 * scale - mean) / std``, as Pillow images (L or RGB). Raises ValueError when ``x`` is not
    such an image (it does not round-trip)."""
    from PIL import Image

    from runtime.preprocess import normalize

    spec = as_preprocess(spec)
    mean = np.asarray(spec.mean or [0.0], np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std or [1.0], np.float64).reshape(1, -1, 1, 1)
    scale = 1.0 if spec.scale is None else float(spec.scale)
    u8 = np.clip(np.rint((x.astype(np.float64) * std + mean) / scale), 0, 255).astype(np.uint8)
    if np.abs(normalize(u8, spec) - x).max() > 1e-4:
        raise ValueError("the array inputs are not 8-bit images under the bundle's preprocessing")
    if u8.shape[1] not in (1, 3):
        raise ValueError(f"{u8.shape[1]}-channel arrays have no image encoding")
    return [Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)) for a in u8]


def _decode_array_image(data: bytes, spec: dict, channels: int) -> np.ndarray:
    """An encoded image of an array model's input back to its float32 ``(C, H, W)`` input."""
    from PIL import Image

    from runtime.preprocess import normalize

    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return normalize((a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).astype(np.uint8), spec)


def image_points(crops: list, files: list[Path] | None, spec: dict, whole: Chain, float_pred: np.ndarray,
                 labels: np.ndarray | None, jpeg: list[int], webp: list[int]) -> list[RatePoint]:
    """Rows of the input image itself: JPEG / WebP of the model's crop of each input at each quality, PNG of it
    (lossless) and, with ``files``, the original file; each sent as the ``file`` tensor, decoded as the
    server's ``--input-file`` path does (array models: back to the 8-bit image, normalised), then classified
    by ``whole`` (the float whole model)."""
    channels = 1 if crops[0].mode == "L" else 3
    trials = ([("file", None)] if files else []) + [("png", None)] + [("jpeg", q) for q in jpeg] + \
        [("webp", q) for q in webp]
    points = []
    for kind, quality in trials:
        frames, payloads, xs = [], [], []
        for i, crop in enumerate(crops):
            data = Path(files[i]).read_bytes() if kind == "file" else encode_crop(crop, kind, quality)
            frame = protocol.encode_request(i, {protocol.FILE_TENSOR: np.frombuffer(data, np.uint8)}, codec="none",
                                            layout=None)
            got = protocol.decode_request(frame).tensors[protocol.FILE_TENSOR].tobytes()
            xs.append(decode_image(got, spec, "request file") if as_preprocess(spec).kind == "image"
                      else _decode_array_image(got, spec, channels))
            frames.append(len(frame))
            payloads.append(len(data))
        pred = _run_chain(whole, {whole.bundle.manifest.input.name: np.stack(xs)}, "logits").argmax(1)
        mean, p90 = _stats(frames)
        label = {"file": "original file", "png": "PNG (lossless)"}.get(kind) or f"{kind.upper()} q{quality}"
        points.append(RatePoint(kind, label, mean, p90, float(np.mean(payloads)), _accuracy(pred, labels),
                                float(np.mean(pred == float_pred)), len(crops),
                                {"quality": quality} if quality is not None else {}))
    return points


def inputs_already_compressed(files: list[Path]) -> str | None:
    """A sentence when the inputs are lossy files already (JPEG, WebP): re-encoding them is a second
    generation of compression, which loses more than a first encode of the camera's pixels, and so
    favours split computing in this comparison. None for lossless inputs."""
    from PIL import Image

    formats = []
    for f in files:
        with Image.open(f) as im:
            formats.append(im.format)
    lossy = sorted(set(formats) & {"JPEG", "WEBP", "MPO"})
    if not lossy:
        return None
    n = sum(f in lossy for f in formats)
    which = "the inputs are" if n == len(formats) else f"{n} of the {len(formats)} inputs are"
    return (f"{which} already {'/'.join(lossy)}-compressed files: the JPEG / WebP rows re-encode decoded "
            f"images (second-generation encodes), which costs them accuracy a first encode of the sensor's "
            f"pixels would not lose; this favours split computing in the comparison")


# --------------------------------------------------------------------------- the split rows
def calibration_features(bundle: Bundle, device: Chain) -> dict[str, np.ndarray]:
    """The wire tensors over the bundle's own representative set (``manifest.calibration``: source and file
    names), computed by its float device graphs. Raises DataError when that source is not readable here."""
    cal = bundle.manifest.calibration
    source, names = (cal.source, cal.names) if cal is not None else (None, [])
    if not source:
        raise DataError(f"{bundle.root}: the manifest records no calibration source; re-export it with "
                        f"--wire-bits instead of recalibrating here")
    try:
        ds = read_dataset(source, bundle.manifest.preprocess)
    except DataError as e:
        raise DataError(f"{bundle.root} was calibrated on {source}, which cannot be read here ({e}); re-export "
                        f"with --wire-bits N instead") from e
    keep = [i for i, n in enumerate(ds.names) if n in set(names)] if names else list(range(len(ds)))
    x = ds.x[keep] if keep else ds.x
    return {k: v for k, v in _device_values(device, x, bundle).items()}


def _device_values(device: Chain, x: np.ndarray, bundle: Bundle) -> dict[str, np.ndarray]:
    wire = bundle.wire_tensors
    outs: dict[str, list] = {n: [] for n in wire}
    for start in range(0, len(x), BATCH):
        values = device.run_segments({bundle.manifest.input.name: x[start:start + BATCH]})
        for n in wire:
            outs[n].append(values[n])
    return {n: np.concatenate(v) for n, v in outs.items()}


def recalibrated_quant(bundle: Bundle, wire: WireCodec, calib: dict[str, np.ndarray]) -> dict[str, WireQuant]:
    """Wire ``quant`` entries for ``wire`` computed from the bundle's representative features ``calib`` with
    the export's own code (:func:`toolkit.calibrate.set_wire_qparams`) on a copy of its manifest."""
    manifest = copy.deepcopy(bundle.manifest)
    n = len(next(iter(calib.values())))
    set_wire_qparams(manifest, {"wire": calib}, n, wire, bundle.root)
    return {name: manifest.tensors[name].quant for name in bundle.wire_tensors}


def describe_quant(q: WireQuant) -> str:
    """``int8 per-tensor`` / ``4-bit per-channel tail-kl`` / ``step 4.479 (budget 4800 B)`` from a manifest
    quant entry."""
    if q.bits is None:
        return f"{q.dtype} per-tensor"
    if q.range in ("step", "budget"):
        return f"step {q.scale:g}" + (f" (budget {q.budget} B)" if q.range == "budget" else "")
    return f"{q.bits}-bit {'per-channel' if q.axis is not None else 'per-tensor'} {q.range or ''}".strip()


def split_points(bundle: Bundle, x: np.ndarray, float_pred: np.ndarray, labels: np.ndarray | None,
                 codecs: list[tuple[str, dict[str, dict]]], entropy_coders: list[str] | None,
                 precision: str = "fp32") -> list[RatePoint]:
    """Rows of one bundle: for each ``(name, quant entries)`` of ``codecs`` the head's wire tensors quantised,
    framed and decoded as on the wire, then the tail; bytes for each entropy coder (the bundle's own when
    ``entropy_coders`` is None) on the same codes."""
    device = Chain(bundle, "device", "onnx", precision, with_exits=False)
    server = Chain(bundle, "server", "onnx", precision, with_exits=False)
    values = _device_values(device, x, bundle)
    coders = entropy_coders or [wire_codec(bundle)]
    head_mflops = sum(s.mflops or 0.0 for s in bundle.device_segments)
    points = []
    for name, quant in codecs:
        frames: dict[str, list[int]] = {c: [] for c in coders}
        payloads: dict[str, list[int]] = {c: [] for c in coders}
        decoded: dict[str, list] = {n: [] for n in bundle.wire_tensors}
        params = {n: quant[n].params() for n in bundle.wire_tensors}
        for i in range(len(x)):
            tensors = {n: params[n].quantize(values[n][i:i + 1]) for n in bundle.wire_tensors}
            qs = {n: params[n].to_json() for n in bundle.wire_tensors}
            for c in coders:
                frame = protocol.encode_request(i, tensors, qs, codec=c)
                msg = protocol.decode_request(frame)
                frames[c].append(len(frame))
                payloads[c].append(len(protocol.parse_frame(frame).payload))
            for n, v in msg.dequantized().items():
                decoded[n].append(v)
        pred = _run_chain(server, {n: np.concatenate(v) for n, v in decoded.items()}, "logits").argmax(1)
        top1, agree = _accuracy(pred, labels), float(np.mean(pred == float_pred))
        q0 = quant[bundle.wire_tensors[0]]
        for c in coders:
            mean, p90 = _stats(frames[c])
            info = {"bundle": str(bundle.root), "split": bundle.manifest.split, "codec": c, "quant": name,
                    "bits": q0.bits or 8, "per_channel": q0.axis is not None,
                    "range": q0.range, "head_mflops": head_mflops, "precision": precision}
            points.append(RatePoint("split", f"{Path(bundle.root).name}: {name} + {c}", mean, p90,
                                    float(np.mean(payloads[c])), top1, agree, len(x), info))
    return points


# --------------------------------------------------------------------------- comparison
def dominance(points: list[RatePoint]) -> list[dict]:
    """For each JPEG / WebP / PNG row: the split point with the fewest bytes among those sending fewer bytes at
    equal or better score (top-1, else agreement), or None when no split point dominates it."""
    splits = sorted((p for p in points if p.kind == "split"), key=lambda p: p.bytes_mean)
    out = []
    for r in (p for p in points if p.kind in ("jpeg", "webp", "png")):
        by = next((s for s in splits if s.bytes_mean < r.bytes_mean and s.score() >= r.score()), None)
        out.append({"image": r.label, "bytes": r.bytes_mean, "score": r.score(),
                    "dominated_by": None if by is None else by.label,
                    "by_bytes": None if by is None else by.bytes_mean, "by_score": None if by is None else by.score()})
    return out


def frontier(points: list[RatePoint], kind: str = "split") -> list[RatePoint]:
    """The Pareto frontier (fewer bytes, higher score) of the points of ``kind``, by increasing bytes."""
    best, out = -1.0, []
    for p in sorted((p for p in points if p.kind == kind), key=lambda p: (p.bytes_mean, -p.score())):
        if p.score() > best:
            out.append(p)
            best = p.score()
    return out


def run_rate(bundles: list[str], data: str, jpeg: list[int], webp: list[int], wire: list[WireCodec] | None = None,
             entropy_coders: list[str] | None = None, precision: str = "fp32", limit: int | None = None,
             progress=None) -> dict:
    """Measure every operating point on ``data`` (image files; labels make top-1) and return the JSON-ready report
    ``{"points": [...], "float": {...}, "dominance": [...], "frontier": [...], "notes": [...]}``. ``wire``: extra
    wire codecs per bundle, calibrated on its representative data. The float model and the image rows use the
    first bundle without a bottleneck (one is required). Raises DataError / ValueError with the reason."""
    say = progress or (lambda msg: None)
    loaded = [Bundle.load(b) for b in bundles]
    # The float reference (and the model the images go through) is the original model: a bundle with a
    # bottleneck holds a different, distilled model, so the first bundle without one is the reference.
    plain = [b for b in loaded if b.manifest.bottleneck is None]
    if not plain:
        raise ValueError(f"every bundle given has a bottleneck: add a bundle of the original model (e.g. 'eetool "
                         f"export {loaded[0].manifest.model.source} --split S') as the float reference the images "
                         f"are scored with")
    ref = plain[0]
    models = {b.manifest.model.source for b in loaded}
    if len(models) > 1:
        raise ValueError(f"the bundles hold different models ({sorted(map(str, models))}): compare one model's bundles")
    spec = ref.manifest.preprocess
    exclude = _calibration_names(loaded, data)
    say(f"reading {data}")
    notes = []
    try:
        ds = read_dataset(data, spec, limit=limit, exclude=exclude)
    except DataError:
        if not exclude:
            raise
        # a source too small to hold anything else (e.g. 'samples', 5 photos): measure on it, and say so
        ds = read_dataset(data, spec, limit=limit)
        notes.append(f"every input of {data} was a calibration sample of a bundle: accuracy on them is optimistic")
        exclude = []
    files, labels = ([Path(f) for f in ds.files] if ds.files else None), ds.y
    if spec.kind == "image":
        if not files:
            raise DataError(f"{data}: an image model's inputs must be image files here (they are re-encoded)")
        crops = [model_crop(f, spec) for f in files]
    else:
        crops = array_crops(ds.x, spec)
    whole = Chain(ref, "all", "onnx", "fp32", with_exits=False)
    say("float model on the uncompressed crops")
    float_pred = _run_chain(whole, {ref.manifest.input.name: ds.x}, "logits").argmax(1)
    points: list[RatePoint] = []
    for b in loaded:
        codecs = [(describe_quant(b.tensor(b.wire_tensors[0]).quant) + " (bundle)",
                   {n: b.tensor(n).quant for n in b.wire_tensors})]
        if wire:
            say(f"{b.root.name}: representative features for the extra wire codecs")
            calib = calibration_features(b, Chain(b, "device", "onnx", "fp32", with_exits=False))
            coder = (entropy_coders or [wire_codec(b)])[0]  # a byte budget is met with the coder measured
            for w in wire:
                quant = recalibrated_quant(b, replace(w, codec=coder), calib)
                codecs.append((describe_quant(quant[b.wire_tensors[0]]), quant))
        say(f"{b.root.name}: {len(codecs)} wire codecs on {len(ds)} inputs")
        points += split_points(b, ds.x, float_pred, labels, codecs, entropy_coders, precision)
    say("JPEG / WebP / PNG of the same crops")
    points += image_points(crops, files, spec, whole, float_pred, labels, jpeg, webp)
    notes += [n for n in [inputs_already_compressed(files) if files else None] if n]
    if labels is None:
        notes.append(f"{ds.source} has no labels: points are scored by top-1 agreement with the float model")
    return {
        "data": ds.source, "samples": len(ds), "excluded_calibration_samples": len(exclude),
        "float": {"top1": _accuracy(float_pred, labels), "model": ref.manifest.model.source,
                  "graphs": f"{ref.root.name}: whole model, onnx/fp32, uncompressed crop"},
        "points": [asdict(p) for p in points],
        "frontier": [p.label for p in frontier(points)],
        "dominance": dominance(points),
        "frontier_dominates_images": all(d["dominated_by"] for d in dominance(points)) if dominance(points) else None,
        "notes": notes,
        "units": {"bytes": "bytes per sample, REQUEST frame (28-byte prefix + JSON header + payload)",
                  "top1": "fraction"},
    }


def _calibration_names(bundles: list[Bundle], data: str) -> list[str]:
    """File names any bundle was calibrated on, when ``data`` is the folder it was calibrated from (folds aside)."""
    def folder(s: str) -> str:
        return str(Path(s.split(":fold=")[0]).resolve())

    out: list[str] = []
    for b in bundles:
        cal = b.manifest.calibration
        if cal is not None and cal.source and folder(cal.source) == folder(data):
            out += cal.names or []
    return sorted(set(out))


# --------------------------------------------------------------------------- output
def render(report: dict):
    """A rich Table of every point: bytes per sample (mean, p90), payload, top-1, agreement with float."""
    from rich.table import Table

    f = report["float"]
    title = (f"rate vs accuracy on {report['samples']} inputs of {report['data']}"
             + (f"; float top-1 {100 * f['top1']:.2f} %" if f["top1"] is not None else ""))
    t = Table(title=title)
    for col in ("point", "bytes/sample mean", "p90", "payload mean", "top-1", "agreement with float"):
        t.add_column(col, justify="left" if col == "point" else "right")
    dominated = {d["image"]: d["dominated_by"] for d in report["dominance"]}
    for p in report["points"]:
        mark = ""
        if p["label"] in report["frontier"]:
            mark = " [bold green]*[/]"
        elif p["kind"] in ("jpeg", "webp", "png") and dominated.get(p["label"]):
            mark = " [dim](dominated)[/]"
        t.add_row(p["label"] + mark, f"{p['bytes_mean']:,.0f}", f"{p['bytes_p90']:,.0f}", f"{p['payload_mean']:,.0f}",
                  "-" if p["top1"] is None else f"{100 * p['top1']:.2f} %", f"{100 * p['agreement']:.2f} %")
    return t


def plot(report: dict, path) -> None:
    """PNG: bytes per sample (log x) against top-1 (agreement without labels): each bundle's split points, JPEG,
    WebP, the original file, and the float model's top-1 as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [RatePoint(**p) for p in report["points"]]
    labelled = report["float"]["top1"] is not None
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[RatePoint]] = {}
    for p in pts:
        key = f"{Path(p.info['bundle']).name} ({p.info['codec']})" if p.kind == "split" else p.kind.upper()
        groups.setdefault(key, []).append(p)
    for key, ps in groups.items():
        ps.sort(key=lambda p: p.bytes_mean)
        style = "o-" if ps[0].kind == "split" else ("s--" if ps[0].kind in ("jpeg", "webp") else "D")
        ax.plot([p.bytes_mean for p in ps], [100 * p.score() for p in ps], style, label=key, markersize=4)
        for p in ps:
            tag = p.info["quant"].split(" (")[0].split()[0] if p.kind == "split" else (
                f"q{p.info['quality']}" if "quality" in p.info else p.kind)
            ax.annotate(tag, (p.bytes_mean, 100 * p.score()), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if labelled:
        ax.axhline(100 * report["float"]["top1"], color="grey", linestyle=":", label="float model")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per sample on the wire (REQUEST frame, mean; log)")
    ax.set_ylabel("top-1 (%)" if labelled else "top-1 agreement with the float model (%)")
    ax.set_title(f"{report['float']['model']}: rate vs accuracy, {report['samples']} inputs", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

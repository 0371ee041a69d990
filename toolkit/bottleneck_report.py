"""Evaluate a bottleneck operating point (a ``bottleneck train`` folder or a bundle exported with
``--bottleneck``) on labelled images and render the result: one row per way of running it."""
from __future__ import annotations

from pathlib import Path

import torch

from calibration.readers import default_data, read_dataset
from runtime.manifest import load_manifest

from . import bottleneck as B
from .bottleneck_eval import bundle_fns, measure, reference_logits, torch_fns
from .sources import resolve

BYTES_NOTE = ("bytes per sample: the runtime's REQUEST frame (n-bit codes on the trained grid, bit-packed, zstd; "
              "prefix and JSON header included)")


def _default_eval_data(preprocess) -> str:
    base = default_data(preprocess)
    return base if base == "samples" else f"{base}:fold=1/2"


def evaluate_target(target: Path, data: str | None, limit: int | None, bits: int | None, model_name: str | None,
                    weights=None, input_shape=None, preprocess=None) -> dict:
    """See ``eetool bottleneck eval``. Raises BottleneckError when ``target`` is neither kind of folder."""
    target = Path(target)
    if (target / B.CONFIG).is_file():
        cfg = B.read_config(target)
        kind = "pytorch"
    elif (target / "manifest.json").is_file():
        manifest = load_manifest(target)
        if manifest.bottleneck is None:
            raise B.BottleneckError(f"{target}: the bundle has no bottleneck (export it with --bottleneck DIR)")
        cfg = {**manifest.bottleneck.to_json(), "model": manifest.model.to_json()}
        kind = "bundle"
    else:
        raise B.BottleneckError(f"{target}: neither a 'bottleneck train' folder ({B.CONFIG}) nor a bundle")
    src = resolve(model_name or cfg["model"]["source"], weights, input_shape, preprocess)
    bits = bits or int(cfg["bits"])
    ds = read_dataset(data or _default_eval_data(src.preprocess), src.preprocess, limit=limit, progress=True)
    ref = reference_logits(src.model, ds)
    result: dict = {"target": str(target), "kind": kind, "data": ds.source, "samples": len(ds), "bits": bits,
                    "code_shape": cfg["code_shape"], "device_mflops": cfg["device_mflops"],
                    "model_mflops": cfg["model_mflops"], "bytes_note": BYTES_NOTE, "rows": []}
    if ds.y is not None:
        result["original_top1"] = float((ref.argmax(1) == ds.y).mean())

    def row(label, device, server, b, name="bottleneck"):
        m = measure(device, server, ds, b, name, ref)
        m.pop("logits")
        result["rows"].append({"run": label, "bits": b, **m})

    if kind == "pytorch":
        built, _ = B.load(target, src.model, torch.zeros(src.input_shape), src.name)
        dev, srv = torch_fns(built.model)
        row("pytorch fp32, float code", dev, srv, None)
        row(f"pytorch fp32, {bits}-bit code", dev, srv, bits)
    else:
        from runtime.bundle import Bundle

        bundle = Bundle.load(target)
        for pair in bundle.formats():
            fmt, precision = pair.split("/")
            dev, srv, name = bundle_fns(bundle, pair, pair)
            row(f"{pair} device + {pair} server", dev, srv, bits, name)
            if precision != "fp32" and f"{fmt}/fp32" in bundle.formats():
                dev, srv, name = bundle_fns(bundle, pair, f"{fmt}/fp32")
                row(f"{pair} device + {fmt}/fp32 server", dev, srv, bits, name)
    return result


def render(result: dict) -> str:
    """Plain-text table of :func:`evaluate_target`'s result."""
    lines = [f"{result['target']}: {result['samples']} samples of {result['data']}; code "
             f"{'x'.join(map(str, result['code_shape']))}; device {result['device_mflops']:.1f} of "
             f"{result['model_mflops']:.1f} MFLOPs ({result['device_mflops'] / result['model_mflops']:.1%})"]
    if "original_top1" in result:
        lines.append(f"original model (float): top-1 {result['original_top1']:.2%}")
    for r in result["rows"]:
        top1 = f"top-1 {r['top1']:.2%}" if "top1" in r else "unlabelled"
        size = f", {r['bytes_mean']:,.0f} B/sample (p90 {r['bytes_p90']:,.0f})" if "bytes_mean" in r else ""
        lines.append(f"  {r['run']:40s} {top1}, agreement with the original {r['agreement']:.2%}{size}")
    lines.append(result["bytes_note"])
    return "\n".join(lines)


__all__ = ["evaluate_target", "render"]

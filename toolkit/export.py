"""``eetool export``: model -> segment and exit graphs -> bundle -> verification report.

Steps (each in its own module): trace and cut (:mod:`toolkit.graph`, :mod:`toolkit.slicing`), export
float ONNX (:mod:`toolkit.onnx_export`) — or, for an ONNX source, cut its segments out of the model
(:mod:`toolkit.onnx_slice`) — then, the same for both: run the float graphs on real calibration inputs to
get every graph's real inputs (:mod:`toolkit.calibrate`), quantise (:mod:`toolkit.quantize_onnx`,
:mod:`toolkit.export_tflite`), write the bundle (:mod:`toolkit.bundle_writer`) and check every chain
against the source model through the runtime (:mod:`toolkit.verify`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calibration.readers import Dataset
from runtime import __version__
from runtime.manifest import (Bottleneck, Calibration, ExitBranch, GraphEntry, Manifest, ModelInfo, Preprocess,
                              ProfileGraph, Samples, Segment, TensorSpec, WireTensor, WireTransform)
from runtime.targets import DEFAULT_TARGETS

from . import calibrate
from .bundle_writer import copy_support_files, fresh_bundle_dir, write_array_samples, write_manifest
from .flops import module_flops, param_count
from .graph import SplitError, TracedModel
from .onnx_export import ExportError, export_onnx
from .slicing import INPUT_NAME, OUTPUT_NAME, order_cuts, slice_model, tensor_names
from .sources import ModelSource

VERSION = __version__
PROFILE_GRAPH = "profile/model.fp32.onnx"


@dataclass
class ExitSpec:
    """An exit branch to export: ``module`` maps the tensor at cut ``at`` (NCHW float32) to logits
    ``(N, C)``; ``rule`` is ``max_softmax`` (exit when >= threshold) or ``normalized_entropy`` (exit when
    <= threshold)."""

    name: str
    at: str
    module: torch.nn.Module
    rule: str = "max_softmax"
    threshold: float = 1.0


@dataclass
class ExportOptions:
    split: list[str]
    out: Path
    exits: list[ExitSpec] = field(default_factory=list)
    formats: tuple[str, ...] = ("onnx",)
    int8: bool = False
    quant: dict = field(default_factory=dict)  # QuantConfig fields for the ONNX quantiser
    # CPUs the int8 ONNX graphs are made for (runtime/targets.py); one graph per group of same-kernel targets
    int8_targets: tuple[str, ...] = DEFAULT_TARGETS
    # quantisation-aware fine-tuning (toolkit.qat.QATConfig) before int8 quantisation; None: post-training only
    qat: object = None
    progress: bool = True
    # the whole model as one float graph with module-scoped node names, so `runtime bench` on the board can
    # measure per-layer latency for `eetool plan --measurements` (costs one more fp32 graph in the bundle)
    layer_profile_graph: bool = True
    samples: int = 8  # verification inputs copied into samples/ (with their labels, when known)
    wire: "calibrate.WireCodec" = None  # how the device encodes the split feature (None: int8 + zstd)
    bottleneck: Bottleneck | None = None  # the injected bottleneck (toolkit.bottleneck_export)
    wire_transform: WireTransform | None = None  # the split feature's transform (toolkit.wire_transform)


def _device_boundary(traced: TracedModel, split: list[str], exits: list[ExitSpec]) -> tuple[list, object]:
    if not split:
        raise SplitError("give at least one split point (--split NAME); 'eetool inspect MODEL' lists them")
    cuts = order_cuts(traced, split + [e.at for e in exits])
    boundary = max((traced.cut(s) for s in split), key=lambda c: c.position)
    for e in exits:
        if traced.cut(e.at).position > boundary.position:
            raise SplitError(f"exit {e.name!r} at {e.at!r} comes after the split point {boundary.name!r}; "
                             f"exits run on the device, so attach them at or before the split")
        if not traced.cut(e.at).single_tensor:
            raise SplitError(f"exit {e.name!r} at {e.at!r}: the cut carries {len(traced.cut(e.at).crossing)} "
                             f"tensors; attach exits where a single tensor crosses")
        _check_threshold(e)
    return cuts, boundary


def export_bundle(source: ModelSource, opts: ExportOptions, calib: Dataset, verify_data: Dataset) -> dict:
    """Export ``source`` into the bundle directory ``opts.out`` and return the report dict.

    ``source`` is a PyTorch model or an ONNX file (:class:`toolkit.sources.ModelSource`). ``calib`` holds the
    representative inputs (float32 NCHW) used for the wire tensors' int8 ranges and, with ``opts.int8``,
    for quantisation; ``verify_data`` holds other real inputs for verification. Raises SplitError for bad
    split/exit names and ExportError when a graph misses its tolerance (the bundle and report are still
    written, for diagnosis) or for exits / TFLite asked of an ONNX source."""
    from . import verify

    out = Path(opts.out)
    segments = values = None
    if source.kind == "onnx":
        from .onnx_slice import slice_onnx

        if opts.exits or "tflite" in opts.formats:
            raise ExportError("an ONNX source is sliced as it is: exit branches (--exits) are trained on a PyTorch "
                              "model, and TFLite graphs are converted from PyTorch modules")
        manifest, reference = slice_onnx(source, list(opts.split), out, calib.x)
    else:
        manifest, segments, values = _torch_graphs(source, opts, out, calib.x)
        reference = source.model
    # which samples the bundle was calibrated on, so evaluation can leave them out
    manifest.calibration = Calibration(calib.source, len(calib), list(calib.names))

    # Real intermediate tensors from the float graphs: calibration of later graphs and wire int8 ranges.
    inputs_per_graph = calibrate.graph_inputs(out, manifest, calib.x, progress=opts.progress)
    calibrate.set_wire_qparams(manifest, inputs_per_graph, len(calib), opts.wire or calibrate.WireCodec(), out)
    report: dict = {"calibration": {"source": calib.source, "samples": len(calib)}}
    int8_segments, int8_inputs, int8_files = segments, inputs_per_graph, {}
    qat_dir = out / ".qat"
    if opts.int8 and source.kind != "onnx":
        sample = torch.from_numpy(calib.x[:1])
        if opts.qat is not None:
            int8_segments, int8_inputs, int8_files, report["qat"] = _fine_tuned_graphs(
                source.model, sample, list(manifest.cuts), opts, calib, manifest, qat_dir)
        elif "tflite" in opts.formats and {**calibrate.RECIPE, **opts.quant}.get("bias_correction"):
            # the TFLite int8 graphs are made from a copy whose float biases already absorb the weight-rounding
            # shift (the ONNX graphs get it in their int32 biases, in quantize_onnx); the layer-by-layer pass
            # then corrects the TFLite int32 biases (calibrate.export_tflite_graphs)
            from .bias_correction import bias_corrected_model

            traced_bc = TracedModel(bias_corrected_model(source.model, calib.x), sample)
            int8_segments = slice_model(traced_bc, order_cuts(traced_bc, list(manifest.cuts)))
    elif opts.int8 and opts.qat is not None:
        raise ExportError("--qat fine-tunes a PyTorch model; an ONNX source is quantised post-training")
    if opts.int8:
        report["int8"] = calibrate.quantize_onnx_graphs(out, manifest, int8_inputs, opts.quant, opts.progress,
                                                        tuple(opts.int8_targets), float_files=int8_files)
    if "tflite" in opts.formats:
        report["tflite"] = calibrate.export_tflite_graphs(
            out, manifest, segments, opts.exits, values, int8_inputs if opts.int8 else None, opts.progress,
            int8_segments=int8_segments, correction_samples=calibrate.tflite_correction_samples(opts.quant))
    shutil.rmtree(qat_dir, ignore_errors=True)
    if "onnx" not in opts.formats:
        _drop_format(out, manifest, "onnx")

    sample_files = _sample_files(verify_data, opts.samples)
    copy_support_files(out, sample_files)
    if not verify_data.files:
        sample_files = write_array_samples(out / "samples", verify_data, source.preprocess, opts.samples)
    if verify_data.y is not None and sample_files:
        # ground truth for the samples/ the bundle carries, so `runtime bench` can report accuracy
        manifest.samples = Samples({Path(f).name: int(y) for f, y in zip(sample_files, verify_data.y)})
    if opts.layer_profile_graph:
        (out / PROFILE_GRAPH).parent.mkdir(parents=True, exist_ok=True)
        if source.kind == "onnx":  # the model itself: its node names are what the per-layer profile shows
            shutil.copy(source.onnx_path, out / PROFILE_GRAPH)
        else:
            from .layer_latency import export_whole_onnx

            export_whole_onnx(source.model, tuple(source.input_shape), out / PROFILE_GRAPH)
        manifest.layer_profile_graph = ProfileGraph(PROFILE_GRAPH, manifest.input.name, manifest.output.name,
                                                    "float32", manifest.input.layout)
    (out / "report.json").write_text("{}\n")  # placeholder so the checksum list is complete; rewritten below
    write_manifest(out, manifest)
    exit_refs = _torch_exit_logits(segments, manifest, opts.exits, verify_data.x) if opts.exits else None
    report.update(verify.verify_bundle(out, reference, verify_data, exit_refs))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(out, manifest)  # report.json changed: refresh its checksum
    failures = verify.failures(report)
    if failures:
        raise ExportError("verification failed: " + "; ".join(failures) + f" (details in {out / 'report.json'})")
    return report


def _torch_exit_logits(segments: list, manifest: Manifest, exits: list[ExitSpec], x: np.ndarray,
                       batch: int = 16) -> dict:
    """The source's own exit logits on ``x`` (float32 NCHW): the float PyTorch segments up to each exit's
    input tensor, then its exit module. Returns exit name -> float32 ``(N, C)``, the reference each exported
    exit graph is verified against."""
    by_name = {e.name: e for e in manifest.exits}
    out: dict = {e.name: [] for e in exits}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            values = {INPUT_NAME: torch.from_numpy(x[i:i + batch])}
            for seg in segments:
                res = seg.module(*(values[n] for n in seg.inputs))
                values.update(zip(seg.outputs, res if isinstance(res, tuple) else (res,)))
            for e in exits:
                out[e.name].append(e.module.eval()(values[by_name[e.name].input]).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _torch_graphs(source: ModelSource, opts: ExportOptions, out: Path, x) -> tuple[Manifest, list, dict]:
    """Trace and cut the PyTorch model, write its float segment and exit graphs under ``out/graphs`` and
    describe them in a new manifest. Returns the manifest, the segments (for TFLite) and the sample tensors
    by name (batch 1, from ``x[:1]``)."""
    model = source.model
    sample = torch.from_numpy(x[:1])
    traced = TracedModel(model, sample)
    cuts, boundary = _device_boundary(traced, list(opts.split), opts.exits)
    segments = slice_model(traced, cuts)

    fresh_bundle_dir(out)

    manifest = Manifest(
        created_by=f"eetool {VERSION}",
        model=ModelInfo.from_json(source.describe(), "manifest.model"),
        input=TensorSpec(INPUT_NAME, [None, *source.input_shape[1:]], "float32", "NCHW"),
        preprocess=Preprocess.from_json(source.preprocess, "manifest.preprocess"),
        cuts=[c.name for c in cuts],
        split=boundary.name,
        bottleneck=opts.bottleneck,
        wire_transform=opts.wire_transform,
    )
    # Float graphs, with sample tensors flowing through PyTorch for shapes and FLOPs.
    values = {INPUT_NAME: sample}
    device = True
    for seg in segments:
        args = tuple(values[n] for n in seg.inputs)
        with torch.no_grad():
            res = seg.module(*args)
        values.update(zip(seg.outputs, res if isinstance(res, tuple) else (res,)))
        key = f"{seg.name}.onnx.fp32"
        entry = export_onnx(seg.module, args, out / "graphs" / f"{seg.name}.fp32.onnx", seg.inputs, seg.outputs)
        manifest.graphs[key] = GraphEntry.from_json({"file": f"graphs/{seg.name}.fp32.onnx", "format": "onnx",
                                                     "precision": "fp32", **entry}, f"manifest.graphs[{key!r}]")
        manifest.segments.append(Segment(
            name=seg.name, side="device" if device else "server", after=seg.after, until=seg.until,
            inputs=list(seg.inputs), outputs=list(seg.outputs),
            mflops=module_flops(seg.module, *args) / 1e6, params=param_count(seg.module), graphs={"onnx/fp32": key},
        ))
        if seg.until == boundary.name:
            device = False
        for name in seg.outputs:
            if seg.until is not None:
                manifest.tensors[name] = WireTensor([None, *values[name].shape[1:]], "float32",
                                                    "NCHW" if values[name].dim() == 4 else None)
    public = tensor_names(traced, cuts)
    for e in opts.exits:
        name = public[traced.cut(e.at).crossing[0]]
        key = f"{e.name}.onnx.fp32"
        e.module.eval()
        entry = export_onnx(e.module, (values[name],), out / "graphs" / f"{e.name}.fp32.onnx", [name],
                            [f"{e.name}.logits"])
        manifest.graphs[key] = GraphEntry.from_json({"file": f"graphs/{e.name}.fp32.onnx", "format": "onnx",
                                                     "precision": "fp32", **entry}, f"manifest.graphs[{key!r}]")
        manifest.exits.append(ExitBranch(name=e.name, at=e.at, input=name, output=f"{e.name}.logits",
                                         mflops=module_flops(e.module, values[name]) / 1e6, rule=e.rule,
                                         threshold=float(e.threshold), graphs={"onnx/fp32": key}))
    manifest.output = TensorSpec(OUTPUT_NAME, [None, *values[OUTPUT_NAME].shape[1:]], "float32")
    return manifest, segments, values


def _fine_tuned_graphs(model, sample, cut_names: list[str], opts: ExportOptions, calib: Dataset, manifest: Manifest,
                       work: Path):
    """Quantisation-aware fine-tuning (toolkit.qat) of ``model`` on the representative inputs, sliced at the
    same cuts: returns the fine-tuned segments (fx modules), every graph's real inputs as the fine-tuned
    float graphs produce them, their float ONNX files in ``work`` by segment name (the int8 graphs are
    quantised from these; the bundle's float graphs stay the original model's), and the training history."""
    import copy

    from . import calibrate
    from .qat import finetune

    student, history = finetune(model, calib.x, opts.qat, progress=opts.progress)
    traced = TracedModel(student, sample)
    segments = slice_model(traced, order_cuts(traced, cut_names))
    work.mkdir(parents=True, exist_ok=True)
    shadow = copy.deepcopy(manifest)
    values = {INPUT_NAME: sample}
    files = {}
    for seg in segments:
        args = tuple(values[n] for n in seg.inputs)
        with torch.no_grad():
            res = seg.module(*args)
        values.update(zip(seg.outputs, res if isinstance(res, tuple) else (res,)))
        files[seg.name] = work / f"{seg.name}.fp32.onnx"
        export_onnx(seg.module, args, files[seg.name], seg.inputs, seg.outputs)
        key = shadow.segment(seg.name).graphs["onnx/fp32"]
        shadow.graphs[key].file = str(files[seg.name].relative_to(work.parent))
    inputs = calibrate.graph_inputs(work.parent, shadow, calib.x, progress=opts.progress)
    return segments, inputs, files, history


def _check_threshold(e: ExitSpec) -> None:
    if not 0.0 <= float(e.threshold) <= 1.0:
        raise SplitError(f"exit {e.name!r}: threshold {e.threshold} outside [0, 1]")
    if e.rule not in ("max_softmax", "normalized_entropy"):
        raise SplitError(f"exit {e.name!r}: rule {e.rule!r}; use max_softmax or normalized_entropy")


def _drop_format(out: Path, manifest: Manifest, fmt: str) -> None:
    """Remove ``fmt`` graphs (the float ONNX graphs are the calibration reference; drop them last)."""
    for key in [k for k, g in manifest.graphs.items() if g.format == fmt]:
        (out / manifest.graphs.pop(key).file).unlink()
    for owner in manifest.owners:
        owner.graphs = {k: v for k, v in owner.graphs.items() if not k.startswith(fmt + "/")}


def _sample_files(data: Dataset, n: int = 8) -> list[Path]:
    """Up to ``n`` real input files from ``data`` for the bundle's ``samples/`` (image datasets only)."""
    return [Path(f) for f in (data.files or [])[:n]]

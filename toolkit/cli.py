"""The ``eetool`` command line: inspect, export, eval, rate (toolkit side) and serve, run, bench (runtime side)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import click
import numpy as np

from calibration.readers import DataError, check_channels, default_data, read_dataset
from runtime import __version__
from runtime.boards import BoardError
from runtime.bundle import Bundle, BundleError
from runtime.codec import CodecError
from runtime.manifest import load_manifest
from runtime.profile_layers import ProfileError
from runtime.targets import DEFAULT_TARGETS, TargetError, check_targets

from .bottleneck import BottleneckError
from .graph import SplitError, TracingError
from .onnx_export import ExportError
from .plan import PlanError
from .sources import ModelSourceError, resolve

USER_ERRORS = (SplitError, ExportError, ModelSourceError, DataError, BundleError, FileNotFoundError, PlanError,
               ProfileError, BoardError, CodecError, TracingError,
               BottleneckError)


class _Group(click.Group):
    """Turns the toolkit's user errors into one clear line and exit code 2, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except ValueError as e:
            # a value the library refused (thresholds, exit points, predictor inputs ...): the message says
            # what is wrong; EETOOL_DEBUG=1 keeps the traceback for a bug report
            if os.environ.get("EETOOL_DEBUG"):
                raise
            click.echo(f"error: {e} (EETOOL_DEBUG=1 shows where)", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="eetool")
def main():
    """eetool: split computing and early exiting for DNNs on edge boards."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # our warnings are messages for the user (sample counts, calibration size), not code locations
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"


model_options = [
    click.option("--weights", help="state dict (.pt/.pth) to load, with torch.load(weights_only=True)"),
    click.option("--input-shape", help="model input shape, e.g. 1,3,224,224 (default: the model's)"),
    click.option("--preprocess", type=click.Choice(["imagenet", "fashion-mnist", "none"]),
                 help="input preprocessing stored in the bundle (default: the model's)"),
]


def with_model_options(fn):
    for opt in reversed(model_options):
        fn = opt(fn)
    return fn


def given(ctx: click.Context, *names: str) -> list[str]:
    """The options among ``names`` (parameter names) that the user set, as ``--option`` strings: an option
    left at its default must not count as a choice when checking for conflicts."""
    from click.core import ParameterSource

    def flag(p) -> str:  # the one typed: a --x/--no-x pair's second form when its value is False
        opts = p.secondary_opts if getattr(p, "secondary_opts", None) and ctx.params.get(p.name) is False else p.opts
        return max(opts, key=len)

    flags = {p.name: flag(p) for p in ctx.command.params}
    return [flags[n] for n in names
            if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)]


def refuse(options: list[str], reason: str) -> None:
    """Refuse ``options`` (the user set them) with ``reason``: an option that cannot apply is an error,
    never silently ignored. ``{it}``, ``{s}`` and ``{ies}`` in ``reason`` agree with one or several options
    ("drop {it}", "set{s}", "appl{ies}")."""
    if options:
        one = len(options) == 1
        for key, (single, plural) in {"{it}": ("it", "them"), "{s}": ("s", ""), "{ies}": ("ies", "y")}.items():
            reason = reason.replace(key, single if one else plural)
        raise click.UsageError(f"{', '.join(options)}: {reason}")


@main.command()
@click.argument("model")
@with_model_options
@click.option("--depth", default=2, show_default=True, type=click.IntRange(min=1),
              help="list cuts after modules up to this nesting depth (PyTorch models)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.pass_context
def inspect(ctx, model, weights, input_shape, preprocess, depth, as_json):
    """List every candidate split point of MODEL: output shape, bytes per sample (fp32/int8), head and tail
    MFLOPs, head parameters, and whether a single tensor crosses the cut."""
    from .inspect_model import render_table, split_table

    src = resolve(model, weights, input_shape, preprocess)
    if src.kind == "onnx":
        refuse(given(ctx, "depth"), "module nesting depth applies to PyTorch models; an ONNX model lists a cut "
                                    "after every node")
        from .onnx_slice import onnx_split_table

        table = onnx_split_table(src.onnx_path, src.input_shape)
    else:
        table = split_table(src.model, src.input_shape, depth)
    if as_json:
        click.echo(json.dumps(table, indent=2))
    else:
        from rich.console import Console

        Console(width=max(120, int(os.environ.get("COLUMNS", 160)))).print(render_table(table, src.name))


@main.command()
@click.argument("model")
@with_model_options
@click.option("--split", "split", required=True, help="split point(s), comma-separated module paths (e.g. blocks.5)")
@click.option("--exits", "exits_dir", type=click.Path(exists=True, file_okay=False),
              help="trained exit branches (a directory written by 'eetool exits train')")
@click.option("--format", "formats", default="onnx", show_default=True, help="onnx, tflite or onnx,tflite")
@click.option("--int8", is_flag=True, help="also write int8 graphs, calibrated on --calib")
@click.option("--calib", help="representative dataset: image folder, .npy/.npz, fashion-mnist[:split], samples")
@click.option("--calib-samples", default=100, show_default=True, type=click.IntRange(min=1),
              help="number of calibration samples")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]),
              help="activation range method for ONNX int8 (default: eetool's recipe)")
@click.option("--int8-targets", default=",".join(DEFAULT_TARGETS), show_default=True,
              help="CPUs the int8 ONNX graphs are made for: arm64 and x86-vnni share U8S8 graphs, x86-avx2 (no "
                   "VNNI) gets 7-bit weights; the runtime picks the graph made for its CPU")
@click.option("--int8-weights", type=click.Choice(["uint8", "int8"]),
              help="force one ONNX int8 weight type for every target instead: uint8 (exact everywhere, slow "
                   "on x86) or int8 with reduce_range")
@click.option("--float-stem/--int8-stem", default=True, show_default=True,
              help="ONNX int8: the graph that reads the image keeps its stem conv float (measured on "
                   "EfficientNet-Lite0: +1.5 pt agreement for the int8 head; README 'Recipe search') or quantises it too")
@click.option("--qat", is_flag=True,
              help="quantisation-aware fine-tuning before int8: the int8 graphs come from a copy of the model "
                   "distilled from the float model through the int8 simulation on the --calib images (toolkit/qat.py; "
                   "minutes on a CPU); the float graphs stay the original's")
@click.option("--qat-epochs", default=6, show_default=True, help="fine-tuning passes over the --calib samples")
@click.option("--verify-data", help="real inputs for verification (default: the calibration source, after "
                                    "the calibration samples)")
@click.option("--verify-samples", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--samples", "n_samples", default=8, show_default=True, type=click.IntRange(min=0),
              help="verification inputs copied into the bundle's samples/ (labels go in the manifest)")
@click.option("--no-profile-graph", is_flag=True,
              help="leave out profile/model.fp32.onnx (the whole model, for per-layer latency in 'runtime bench')")
@click.option("--wire-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="bits per split-feature value on the wire: 8 = int8 (the int8 head's own encoding with --int8); "
                   "2..7 = n-bit codes, bit-packed")
@click.option("--wire-per-channel", is_flag=True,
              help="one scale / zero point per channel (n-bit codes; costs about 10 header bytes per channel and frame)")
@click.option("--wire-range", type=click.Choice(["tail-kl", "minmax", "mse"]), default="tail-kl", show_default=True,
              help="n-bit range: tail-kl = the clipping whose codes keep the tail's output closest to float; "
                   "minmax = nothing clipped; mse = least squared quantisation error")
@click.option("--wire-codec", type=click.Choice(["zstd", "brotli", "lz4", "none"]), default="zstd", show_default=True,
              help="entropy coder of the (bit-packed) codes; the runtime uses it unless run with --codec")
@click.option("--wire-step", type=float,
              help="quantise the split feature with this step (its units), one step for all values, as many "
                   "levels as the data needs (8-bit codes unless --wire-bits), entropy coded: rate set by the step")
@click.option("--wire-budget", type=click.IntRange(min=1),
              help="rate control: the finest step whose REQUEST frames average at most this many bytes over the "
                   "representative data (as --wire-step, the step chosen for you)")
@click.option("--wire-transform", type=click.Choice(["none", "klt"]), default="none", show_default=True,
              help="klt: rotate the split feature's channels by their Karhunen-Loeve transform (PCA of the "
                   "representative data) before quantising; baked into the head and tail graphs")
@click.option("--bottleneck", "bottleneck_dir", type=click.Path(exists=True, file_okay=False),
              help="a trained bottleneck ('eetool bottleneck train' folder) inserted at --split: the device runs "
                   "head + encoder, the server decoder + tail")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="bundle directory to write")
@click.pass_context
def export(ctx, model, weights, input_shape, preprocess, split, exits_dir, formats, int8, calib, calib_samples,
           calib_method, int8_targets, int8_weights, float_stem, qat, qat_epochs, verify_data, verify_samples, n_samples,
           no_profile_graph, wire_bits, wire_per_channel, wire_range, wire_codec, wire_step, wire_budget,
           wire_transform, bottleneck_dir, out):
    """Slice MODEL at --split into head (device) and tail (server) graphs, with exit branches, export them
    to ONNX / TFLite (float, and int8 with --int8), verify every graph against PyTorch on real inputs, and
    write a self-contained bundle to --out."""
    from .export import ExportOptions

    fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
    unknown = set(fmts) - {"onnx", "tflite"}
    if unknown or not fmts:
        raise click.BadParameter(f"unknown format(s) {sorted(unknown)}; use onnx and/or tflite", param_hint="--format")
    onnx_int8 = given(ctx, "calib_method", "int8_weights", "int8_targets", "float_stem")
    if not int8:
        refuse(onnx_int8, "choose{s} how --int8 quantises the ONNX graphs; add --int8 or drop {it}")
        refuse(given(ctx, "qat", "qat_epochs"), "fine-tune{s} the model for the int8 graphs; add --int8 or drop {it}")
    if "onnx" not in fmts:
        refuse(onnx_int8, "appl{ies} to ONNX int8 graphs only (TFLite int8 uses ai-edge-quantizer's recipe); "
                          "add onnx to --format or drop {it}")
    if n_samples > verify_samples:
        refuse(given(ctx, "n_samples", "verify_samples") or ["--samples"],
               f"the bundle's {n_samples} samples are taken from the {verify_samples} verification inputs; "
               f"raise --verify-samples to at least {n_samples} or lower --samples")
    wire = _wire_codec(ctx, wire_bits, wire_per_channel, wire_range, wire_codec, wire_step, wire_budget)
    if wire_transform != "none":
        refuse(given(ctx, "exits_dir"), "exit branches are not exported with --wire-transform; drop one of the two")
        refuse(given(ctx, "bottleneck_dir"), "a bottleneck already reshapes the split feature; drop one of --wire-transform "
                                             "and {it}")
    if bottleneck_dir:
        refuse(given(ctx, "exits_dir"), "exit branches are not exported with a bottleneck; export them without "
                                        "--bottleneck, or drop {it}")
        refuse(given(ctx, "qat", "qat_epochs"), "fine-tune{s} the original model, not the model with a bottleneck; "
                                                "drop {it}")
    from .bundle_writer import check_output_dir

    check_output_dir(Path(out), (model, weights, calib, verify_data, exits_dir, bottleneck_dir))
    src = resolve(model, weights, input_shape, preprocess)
    if src.kind == "onnx":
        refuse(given(ctx, "exits_dir"), "exit branches are trained on a PyTorch model ('eetool exits train'); an "
                                        "ONNX model is sliced as it is")
        refuse(given(ctx, "bottleneck_dir"), "a bottleneck is inserted into the PyTorch model it was trained on, not "
                                             "an .onnx file; give that model or drop {it}")
        if wire_transform != "none":
            refuse(["--wire-transform"], "the transform is baked into PyTorch graphs; an ONNX model is sliced as it "
                                         "is, so drop {it}")
        if "tflite" in fmts:
            refuse(["--format"], "TFLite graphs are converted from PyTorch modules (litert-torch); for an ONNX "
                                 "model use --format onnx")
        from .onnx_slice import check_split

        check_split(src.onnx_path, [s for s in split.split(",") if s])  # names first, before any data is read
    elif not bottleneck_dir:  # (a bottleneck's split is checked against its folder below)
        import torch

        from .graph import TracedModel

        traced = TracedModel(src.model, torch.zeros(src.input_shape))  # names first, before any data is read
        for s in (s for s in split.split(",") if s):
            cut = traced.cut(s)
            if wire_budget is not None and not cut.single_tensor and s == split.split(",")[-1]:
                refuse(["--wire-budget"], f"bounds the frame of a single split tensor, and {len(cut.crossing)} tensors "
                                          f"cross {s!r}; choose a single-tensor split ('eetool inspect' marks them) or "
                                          f"give --wire-step")
    data_name = calib or default_data(src.preprocess)
    calib_ds = read_dataset(data_name, src.preprocess, limit=calib_samples, progress=True, spread=True)
    check_channels(calib_ds, src.input_shape)
    if verify_data:
        verify_ds = read_dataset(verify_data, src.preprocess, limit=verify_samples)
        check_channels(verify_ds, src.input_shape, "--verify-data")
    else:  # verify on samples not used for calibration when the source has any
        verify_ds = read_dataset(data_name, src.preprocess, limit=verify_samples, exclude=calib_ds.names) \
            if _has_more(data_name, src.preprocess, calib_ds.names) else calib_ds
    exits = []
    if exits_dir:
        from .exits_bundle import exit_specs

        import torch

        exits = exit_specs(exits_dir, src.model, torch.from_numpy(calib_ds.x[:1]))
    quant = {"method": calib_method} if calib_method else {}
    if int8_weights == "int8":  # u8s8 saturates 16-bit intermediates without VNNI unless ranges are reduced
        quant.update(weight_type="int8", reduce_range=True)
    elif int8_weights == "uint8":
        quant.update(weight_type="uint8")
    if not float_stem:  # calibrate.IMAGE_GRAPH_RECIPE keeps it float otherwise
        quant.update(float_first_convs=0)
    try:
        targets = tuple(check_targets(t.strip() for t in int8_targets.split(",") if t.strip()))
    except TargetError as e:
        raise click.BadParameter(str(e), param_hint="--int8-targets")
    from runtime.codec import check_codec

    check_codec(wire_codec)
    splits, section, transform = [s for s in split.split(",") if s], None, None
    if bottleneck_dir:
        from .bottleneck_export import with_bottleneck

        src, splits, section = with_bottleneck(src, Path(bottleneck_dir), splits)
    if wire_transform == "klt":
        from .wire_transform import with_klt

        src, splits, transform = with_klt(src, splits, calib_ds.x)
    report = _export_or_clean(src, ExportOptions(split=splits, out=Path(out), exits=exits, formats=fmts, int8=int8,
                                                 quant=quant, int8_targets=targets, qat=_qat_config(qat, qat_epochs),
                                                 layer_profile_graph=not no_profile_graph, samples=n_samples,
                                                 wire=wire, bottleneck=section, wire_transform=transform),
                              calib_ds, verify_ds)
    if exits_dir and (Path(exits_dir) / "predictor.json").is_file():  # trained with 'eetool exits predictor train'
        from .exit_predictor import load_predictor
        from .exit_predictor_bundle import add_to_bundle, features_for

        predictor, meta = load_predictor(exits_dir)
        b = Bundle.load(out)
        report["predictor"] = add_to_bundle(out, predictor, meta, features_for(b, calib_ds, meta["input"]),
                                            features_for(b, verify_ds, meta["input"]))
    _print_export_summary(Path(out), report)


def _export_or_clean(src, opts, calib_ds, verify_ds) -> dict:
    """export_bundle, and on failure no half-written folder left behind (a manifest is written last, so a
    folder without one is this run's; the bundle it replaced was removed when the export began)."""
    from .export import export_bundle

    try:
        return export_bundle(src, opts, calib_ds, verify_ds)
    except BaseException:
        if opts.out.is_dir() and not (opts.out / "manifest.json").exists():
            shutil.rmtree(opts.out, ignore_errors=True)
        raise


def _wire_codec(ctx, bits: int, per_channel: bool, range_: str, codec: str, step: float | None,
                budget: int | None):
    """The WireCodec of export's --wire-* options; --wire-step / --wire-budget are range methods of their own."""
    from .calibrate import WireCodec

    chosen = given(ctx, "wire_step", "wire_budget")
    if len(chosen) > 1:
        refuse(chosen, "set{s} the quantiser step two ways; give one of {it}")
    if chosen:
        refuse(given(ctx, "wire_range", "wire_per_channel"), f"{chosen[0]} chooses the range (one step for every "
                                                              f"value); drop {{it}}")
        range_ = "step" if step is not None else "budget"
    try:
        return WireCodec(bits, per_channel, range_, codec, step=step, budget=budget)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=chosen[0] if chosen else "--wire-range")


def _qat_config(enabled: bool, epochs: int):
    if not enabled:
        return None
    from .qat import QATConfig, QATError

    try:
        return QATConfig(epochs=epochs)
    except QATError as e:
        raise click.BadParameter(str(e), param_hint="--qat-epochs")


def _has_more(data: str, preprocess: dict, exclude: list[str]) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_dataset(data, preprocess, limit=1, exclude=exclude)
        return True
    except DataError:
        return False


def _print_export_summary(out: Path, report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    manifest = load_manifest(out)
    t = Table(title=f"bundle {out}  (split after {manifest.split})")
    for col in ("chain", "samples", "max |diff|", "top-1 agreement", "cosine", "top-1"):
        t.add_column(col)
    ver = report["verification"]
    for pair, e in ver["chains"].items():
        c = e["batch_n"]
        t.add_row(pair, str(ver["samples"]), f"{c['max_abs_diff']:.2e}", f"{c['top1_agreement']:.1%}",
                  f"{c['cosine']:.5f}", f"{e['top1']:.1%}" if "top1" in e else "-")
    Console().print(t)
    for seg in manifest.segments:
        click.echo(f"  {seg.name:6s} {seg.side:6s} {', '.join(seg.inputs)} -> {', '.join(seg.outputs)}"
                   f"  {seg.mflops or 0.0:.1f} MFLOPs")
    for e in manifest.exits:
        click.echo(f"  {e.name:6s} exit   at {e.at}  {e.mflops or 0.0:.2f} MFLOPs  {e.rule} threshold "
                   + ("off" if e.threshold is None else f"{e.threshold:.3f}"))
        checked = {pair: c["exits"][e.name]["vs_source"] for pair, c in ver["chains"].items()
                   if "vs_source" in c.get("exits", {}).get(e.name, {})}
        if checked:
            click.echo("         vs the source's exit branch: " + ", ".join(
                f"{pair} {v['top1_agreement']:.1%} (max |diff| {v['max_abs_diff']:.1e})" for pair, v in checked.items()))
    from .verify import warnings

    for w in warnings(report):
        click.echo(f"warning: {w}; check the representative data (--calib) or keep this graph float", err=True)
    p = manifest.predictor
    if p is not None:
        click.echo(f"  {p.name} Exit Predictor on {p.input} for {', '.join(p.exits)}  {p.mflops or 0.0:.4f} MFLOPs  "
                   "(prediction thresholds: 'eetool exits calibrate')")


@main.command(name="eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="labelled real data (image folder with synsets.txt / class subfolders / labels.txt, "
                             ".npz with x,y, fashion-mnist:test); default: as at export")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0), help="skip this many samples")
@click.option("--limit", type=click.IntRange(min=1), help="evaluate at most this many samples")
@click.option("--include-calibration", is_flag=True,
              help="also evaluate on the samples the bundle was calibrated on (excluded by default)")
@click.option("--json", "as_json", is_flag=True)
def eval_(bundle, data, offset, limit, include_calibration, as_json):
    """Top-1 of every chain of BUNDLE (float and int8, ONNX and TFLite) and of each exit, on real data."""
    from .evaluate import evaluate_bundle

    b = Bundle.load(bundle)
    source = data or default_data(b.manifest.preprocess)
    cal = b.manifest.calibration
    same = Path(source).resolve() == Path(cal.source).resolve() if cal else False
    skip = [] if include_calibration or not same else b.manifest.calibration_names
    ds = read_dataset(source, b.manifest.preprocess, limit=limit, offset=offset, progress=True, exclude=skip)
    check_channels(ds, b.manifest.input.shape or ds.x.shape, "--data")
    result = evaluate_bundle(b, ds)
    result["excluded_calibration_samples"] = len(skip)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['samples']} samples from {result['source']} "
               f"({result['excluded_calibration_samples']} calibration samples excluded)")
    for pair, e in result["chains"].items():
        top1 = f"top-1 {e['top1']:.2%}" if "top1" in e else "unlabelled"
        agree = (f"  agreement with {e['agreement_reference']} {e['agreement_with_fp32']:.2%}"
                 if "agreement_with_fp32" in e and e["agreement_reference"] != pair else "")
        click.echo(f"  {pair:12s} {top1}{agree}")
        for name, x in e.get("exits", {}).items():
            click.echo(f"    {name}: " + ", ".join(f"{k} {v:.2%}" for k, v in x.items()))
        if "early_exit" in e:
            ee = e["early_exit"]
            click.echo(f"    early exits (runtime, thresholds from the manifest): top-1 {ee['accuracy']:.2%}, "
                       f"{ee['mflops_per_sample']:.2f} MFLOPs/sample, exit rates "
                       + ", ".join(f"{k} {v:.1%}" for k, v in ee["exit_rates"].items()))
            sim = ee.get("offline_simulation")
            if sim:
                click.echo(f"    offline simulation on the same data: top-1 {sim['accuracy']:.2%}, "
                           f"{sim['mflops_per_sample']:.2f} MFLOPs/sample, exit rates "
                           + ", ".join(f"{k} {v:.1%}" for k, v in sim["exit_rates"].items()))


@main.group()
def exits():
    """Early-exit branches: train them on a backbone, calibrate their confidence thresholds on a bundle."""


@exits.command(name="train")
@click.argument("model")
@with_model_options
@click.option("--exits", "names", required=True, help="attach points, comma-separated module paths (e.g. stage1,stage2)")
@click.option("--data", default=None, help="labelled training data (default: fashion-mnist:train for array models)")
@click.option("--limit", type=click.IntRange(min=1), help="use at most this many training samples")
@click.option("--mode", type=click.Choice(["separate", "joint"]), default="separate", show_default=True,
              help="separate: backbone frozen; joint: backbone and exits trained together")
@click.option("--loss", type=click.Choice(["ce", "distill"]), default="ce", show_default=True,
              help="ce: labels; distill: the backbone's own final output (no labels needed)")
@click.option("--weights-per-exit", "loss_weights", help="joint loss weights, e.g. 0.2,0.3,0.5 (exits then final)")
@click.option("--epochs", default=2, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--hidden", default=64, show_default=True, help="hidden units of each branch's FC (0: linear)")
@click.option("--conv", is_flag=True, help="put a 1x1 conv before pooling in each branch")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.pass_context
def exits_train(ctx, model, weights, input_shape, preprocess, names, data, limit, mode, loss, loss_weights, epochs,
                lr, hidden, conv, out):
    """Attach exit branches to MODEL at --exits and train them; writes exits.pt (state dict) + exits.json."""
    import torch

    from .exits import EarlyExitModel, build_exits, save_exits, train_exits
    from .train_reference import Batches

    names_l = [n for n in names.split(",") if n]
    w = None
    if loss_weights:
        if mode != "joint":
            refuse(["--weights-per-exit"], "loss weights combine the exits' losses in --mode joint; separate "
                                           "training trains each exit on its own loss")
        try:
            w = [float(v) for v in loss_weights.split(",")]
        except ValueError:
            raise click.BadParameter(f"{loss_weights!r}: comma-separated numbers, e.g. 0.2,0.3,0.5",
                                     param_hint="--weights-per-exit")
        if len(w) != len(names_l) + 1 or min(w) < 0:
            raise click.BadParameter(f"{len(w)} weight(s) given; joint training needs {len(names_l) + 1} "
                                     f"non-negative ones, one per exit ({', '.join(names_l)}) and the final output",
                                     param_hint="--weights-per-exit")
    src = resolve(model, weights, input_shape, preprocess)
    if src.model is None:
        raise ModelSourceError("exit branches are trained on a PyTorch model, not an .onnx file")
    ds = read_dataset(data or default_data(src.preprocess).replace(":test", ":train"), src.preprocess, limit=limit)
    if ds.y is None and loss == "ce":
        raise DataError(f"{ds.source} has no labels: use --loss distill or labelled data")
    x = torch.from_numpy(ds.x)
    y = torch.from_numpy(ds.y if ds.y is not None else np.zeros(len(ds), np.int64))
    ee = EarlyExitModel(src.model, build_exits(src.model, names_l, x[:2], hidden=hidden or None, conv=conv))
    cfg = train_exits(ee, Batches(x, y, 128), mode=mode, loss=loss, weights=w, epochs=epochs, lr=lr)
    save_exits(out, ee, {**cfg, "model": src.describe(), "data": ds.source})
    if mode == "joint":
        torch.save(src.model.state_dict(), Path(out) / "backbone.pt")
        click.echo(f"joint training changed the backbone: export with --weights {Path(out) / 'backbone.pt'}")
    click.echo(f"wrote {out}/exits.pt and exits.json; next: eetool export ... --exits {out}, then eetool exits calibrate")


@exits.command(name="calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="labelled validation data not used for training (e.g. an image folder, "
                             "fashion-mnist:train with --offset 55000)")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--limit", type=click.IntRange(min=1))
@click.option("--delta", default=0.005, show_default=True, help="allowed top-1 drop versus the final exit (0.005 = 0.5 pt)")
@click.option("--rule", type=click.Choice(["max_softmax", "normalized_entropy"]), default="max_softmax", show_default=True)
@click.option("--curve", type=click.Path(dir_okay=False), help="write the accuracy vs expected MFLOPs curve (PNG)")
@click.option("--board", help="optimise expected end-to-end latency on this board profile instead of device MFLOPs")
@click.option("--server-board", default="host", show_default=True, help="edge server profile for the latency objective")
@click.option("--bandwidth", default="10mbit", show_default=True,
              help="uplink for the latency objective; several (1,2,5,10,20mbit) with --budget-ms: latency-aware "
                   "thresholds, regressed on bandwidth for 'runtime run --adaptive'")
@click.option("--rtt", default="0ms", show_default=True)
@click.option("--budget-ms", type=float, help="with --board: most accurate thresholds whose expected latency fits")
@click.option("--budget-mflops", type=float,
              help="most accurate thresholds whose expected device MFLOPs per sample fit (instead of --delta); "
                   "a value <= 1 is a share of the backbone's MFLOPs")
@click.option("--no-predictor", is_flag=True, help="choose confidence thresholds only; the Exit Predictor does not run")
@click.option("--layers", type=click.Path(exists=True),
              help="with --board: measured layer latencies (a 'runtime bench' folder or its layers.json) "
                   "instead of the board profile's FLOPs estimate")
@click.option("--regression", type=click.Choice(["piecewise-linear", "polynomial"]), default="piecewise-linear",
              show_default=True, help="latency-aware mode: the bandwidth -> threshold model")
@click.pass_context
def exits_calibrate(ctx, bundle, data, offset, limit, delta, rule, curve, board, server_board, bandwidth, rtt,
                    budget_ms, budget_mflops, no_predictor, layers, regression):
    """Choose per-exit confidence thresholds on BUNDLE's own graphs (float and int8) for the least expected
    device compute with a top-1 drop <= --delta, and store them in the manifest.

    With an Exit Predictor in the bundle its prediction thresholds are chosen jointly (Dong, Mao & Zhang).
    With --board, several --bandwidth values and --budget-ms: latency-aware mode, the most accurate thresholds
    within the budget at each bandwidth and a regression from bandwidth to thresholds, stored in the manifest
    for the runtime's adaptive mode ('python -m runtime run --adaptive')."""
    from calibration import thresholds as T

    from .exits_bundle import bundle_profile, calibrate_thresholds
    from .plan import parse_bandwidths

    if not 0.0 <= delta <= 1.0:
        raise click.BadParameter(f"{delta} is outside [0, 1]", param_hint="--delta")
    if not board:
        refuse(given(ctx, "server_board", "bandwidth", "rtt", "budget_ms", "layers", "regression"),
               "describe{s} the latency objective, which --board DEVICE_BOARD selects; add --board or drop {it}")
    from runtime.link import parse_duration

    try:  # before any work: a typo in the link must not cost a calibration run
        bandwidths, rtt_ms = parse_bandwidths(bandwidth), parse_duration(rtt)
    except (ValueError, PlanError) as e:
        raise click.BadParameter(str(e), param_hint="--bandwidth / --rtt")
    b = Bundle.load(bundle)
    if not b.exits:
        raise BundleError(f"{bundle}: the bundle has no exit branches to calibrate; export it with --exits DIR "
                          "(trained with 'eetool exits train')")
    ds = read_dataset(data or default_data(b.manifest.preprocess).replace(":test", ":train"),
                      b.manifest.preprocess, limit=limit, offset=offset)
    check_channels(ds, b.manifest.input.shape or ds.x.shape, "--data")
    if ds.y is None:
        raise DataError(f"{ds.source} has no labels: threshold calibration compares each exit's prediction with "
                        "the ground truth (a folder with synsets.txt / labels.txt / class subfolders, .npz with y, "
                        "fashion-mnist)")
    if budget_mflops is not None and budget_mflops <= 1.0:
        budget_mflops *= sum(s.mflops or 0.0 for s in b.segments)
    latency = None
    if board:
        from runtime.boards import load_board

        latency = {"board": load_board(board), "server": load_board(server_board), "bandwidth_mbps": bandwidths[0],
                   "rtt_ms": rtt_ms, "budget_ms": budget_ms, "kind": regression}
        if len(bandwidths) > 1:
            latency["grid_mbps"] = bandwidths
        if layers:
            from runtime.profile_layers import load_profile

            p = Path(layers)
            latency["layers"] = load_profile(p / "layers.json" if p.is_dir() else p)
    results = calibrate_thresholds(bundle, ds, delta, rule, latency=latency, budget_mflops=budget_mflops,
                                   use_predictor=not no_predictor)
    for pair, r in results.items():
        th = ", ".join("off" if t is None else f"{t:.4f}" for t in r["thresholds"])
        rates = ", ".join(f"{v:.1%}" for v in r["exit_rates"])
        gates = ""
        if "prediction_thresholds" in r:
            g = r["prediction_thresholds"]
            gates = "  predictor " + ("not used" if g is None else
                                      "[" + ", ".join("-" if v is None else f"{v:.3f}" for v in g) + "]")
        click.echo(f"{pair:12s} thresholds [{th}]{gates}  accuracy {r['accuracy']:.2%} (final {r['final_accuracy']:.2%})"
                   f"  exit rates [{rates}]  {r['expected_mflops']:.2f} MFLOPs/sample = {r['mflops_ratio']:.2f}x backbone"
                   + (f"  expected {r['expected_ms']:.2f} ms ({r['latency_model']})" if "expected_ms" in r else "")
                   + (f"  UNREACHABLE: {', '.join(r['unreachable'])}" if r["unreachable"] else ""))
    adapt = Bundle.load(bundle).manifest.latency_adaptation
    if adapt is not None:
        for pair, reg in adapt.models.items():
            click.echo(f"{pair:12s} latency-aware ({reg.kind}, budget {adapt.budget_ms:g} ms, "
                       f"{'met' if reg.budget_met else 'NOT met'} at every checked bandwidth): "
                       + "; ".join(f"{f['bandwidth_mbps']:.3g} Mbit/s {f['accuracy']:.2%} {f['expected_ms']:.2f} ms"
                                   for f in reg.grid))
    if curve:
        fmt, precision = next(iter(results)).split("/")
        T.plot_curve([T.curve(bundle_profile(Bundle.load(bundle), ds, fmt, precision), rule)], curve,
                     title=f"{Path(bundle).name}: accuracy vs expected device MFLOPs")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers, e.g. 10,25,50", param_hint=what)


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="labelled image files (folder, :fold=K/N allowed; default: as eetool eval); images a "
                             "bundle was calibrated on are left out")
@click.option("--limit", type=int, help="use at most this many inputs")
@click.option("--jpeg", default="10,25,50,75,90", show_default=True, help="JPEG qualities of the crop ('' for none)")
@click.option("--webp", default="10,25,50,75,90", show_default=True, help="WebP qualities of the crop ('' for none)")
@click.option("--wire-bits", help="also measure these wire bit depths, e.g. 8,6,4,3,2, each calibrated on the "
                                  "bundle's own representative data as export --wire-bits N does")
@click.option("--wire-per-channel", is_flag=True, help="with --wire-bits: per-channel scales / zero points")
@click.option("--wire-range", type=click.Choice(["tail-kl", "minmax", "mse"]), default="tail-kl", show_default=True,
              help="with --wire-bits: the range method")
@click.option("--wire-step", help="also measure these quantiser steps, e.g. 3,4.5,6 (8-bit codes, as export "
                                  "--wire-step)")
@click.option("--wire-budget", help="also measure these byte budgets, e.g. 4000,5000, each step chosen on the "
                                    "bundle's representative data as export --wire-budget does")
@click.option("--codecs", help="entropy coders to measure on the same codes, e.g. zstd,brotli (default: each "
                               "bundle's own)")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="head and tail graphs (ONNX) of the split rows")
@click.option("-o", "--out", "plot_path", default="rate.png", show_default=True, help="plot (PNG); the JSON beside it")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def rate(bundles, data, limit, jpeg, webp, wire_bits, wire_per_channel, wire_range, wire_step, wire_budget, codecs,
         precision, plot_path, as_json):
    """Rate vs accuracy on the same images: every BUNDLE's split feature as its wire codec encodes it (and with
    --wire-bits, other bit depths), against JPEG and WebP of the same 224x224 crop and the original file, each
    sent as a real frame and decoded as the edge server does. Bytes per sample (mean, p90, framing included),
    top-1 against labels and agreement with the float model; plot with bytes on a log axis."""
    from runtime.codec import check_codec

    from .calibrate import WireCodec
    from .rate import plot, render, run_rate

    coders = [c for c in (codecs or "").split(",") if c] or None
    for c in coders or []:
        check_codec(c)
    bits = _int_list(wire_bits, "--wire-bits")
    if any(not 2 <= b <= 8 for b in bits):
        raise click.BadParameter(f"{wire_bits}: bits are 2..8", param_hint="--wire-bits")
    wire = [WireCodec(b, wire_per_channel, wire_range) for b in bits]
    try:
        steps = [float(v) for v in (wire_step or "").split(",") if v.strip()]
        wire += [WireCodec(8, False, "step", step=s) for s in steps]
    except ValueError as e:
        raise click.BadParameter(f"{wire_step}: {e}", param_hint="--wire-step")
    try:
        wire += [WireCodec(8, False, "budget", budget=b) for b in _int_list(wire_budget, "--wire-budget")]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--wire-budget")
    first = Bundle.load(bundles[0])
    source = data or default_data(first.manifest.preprocess)
    say = None if as_json else (lambda msg: click.echo(f"... {msg}", err=True))
    try:
        report = run_rate(list(bundles), source, _int_list(jpeg, "--jpeg"), _int_list(webp, "--webp"), wire, coders,
                          precision, limit, say)
    except ValueError as e:  # bundles that cannot be compared (different models, no float reference)
        raise click.UsageError(str(e))
    plot(report, plot_path)
    report["plot"] = str(plot_path)
    json_path = Path(plot_path).with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console

    Console(width=max(120, int(os.environ.get("COLUMNS", 160)))).print(render(report))
    for d in report["dominance"]:
        click.echo(f"{d['image']}: " + (f"dominated by {d['dominated_by']} ({d['by_bytes']:,.0f} B)" if d["dominated_by"]
                                        else "NOT dominated by any split point"))
    for note in report["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"plot: {plot_path}; JSON: {json_path}")


@exits.group(name="predictor")
def exits_predictor():
    """The Exit Predictor (Dong, Mao & Zhang): a small network before the first exit that sends "hard" samples
    past the exit branches."""


@exits_predictor.command(name="train")
@click.argument("target")
@with_model_options
@click.option("--exits", "exits_dir", type=click.Path(exists=True, file_okay=False),
              help="MODEL only: its trained exits (a directory from 'eetool exits train', with calibration.json or "
                   "--label-thresholds); the predictor is saved there for 'eetool export --exits'")
@click.option("--data", help="real inputs (labels not needed; with labels the report has accuracy), e.g. "
                             "fashion-mnist:train or an image folder (default: as for exits train)")
@click.option("--offset", default=0, show_default=True)
@click.option("--limit", type=int)
@click.option("--at", help="tensor it reads: 'input' or a device tensor before the first exit "
                           "(default: the first device segment's output)")
@click.option("--pair", default="onnx/fp32", show_default=True,
              help="BUNDLE: graphs whose confidences and calibrated thresholds give the labels")
@click.option("--label-thresholds", help="one confidence threshold per exit instead of the calibrated ones, e.g. 0.9,0.8")
@click.option("--pool", type=int, help="pooled spatial size (default: the largest <= 7 dividing the feature's)")
@click.option("--hidden", default=0, show_default=True, help="hidden FC units (0: one linear layer)")
@click.option("--conv", "conv_channels", default=0, show_default=True, help="channels of a first 1x1 conv (0: none)")
@click.option("--epochs", default=8, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--holdout", default=0.1, show_default=True, help="share of --data kept out of training for the report")
@click.option("--calib-samples", default=256, show_default=True, help="BUNDLE: inputs for the int8 predictor graphs")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def exits_predictor_train(ctx, target, weights, input_shape, preprocess, exits_dir, data, offset, limit, at, pair,
                          label_thresholds, pool, hidden, conv_channels, epochs, lr, holdout, calib_samples, as_json):
    """Train the Exit Predictor for TARGET: a bundle (trained on its own device graphs, then exported into it
    as ONNX / TFLite float and int8 graphs, verified by value) or a MODEL with --exits DIR (saved into DIR for
    'eetool export --exits DIR'). Labels: whether each exit's confidence passes its threshold. Reports the
    predictor's MFLOPs, accuracy, recall of "hard" samples and its effect on held-out data; then run
    'eetool exits calibrate' to choose its prediction thresholds with the exits' thresholds."""
    arch = {"pool": pool, "hidden": hidden, "conv_channels": conv_channels}
    th = None
    if label_thresholds:
        th = [None if v.strip() in ("off", "none") else float(v) for v in label_thresholds.split(",")]
    is_bundle = (Path(target) / "manifest.json").is_file()
    if is_bundle:
        refuse(given(ctx, "weights", "input_shape", "preprocess", "exits_dir"),
               "appl{ies} to a MODEL; a bundle carries its own graphs, exits and preprocessing; drop {it}")
    else:
        refuse(given(ctx, "pair", "calib_samples"), "appl{ies} to a bundle TARGET (its graphs); drop {it} for a MODEL")
    if is_bundle:
        from .exit_predictor_bundle import add_to_bundle, features_for, train_on_bundle

        b = Bundle.load(target)
        source = data or default_data(b.manifest.preprocess).replace(":test", ":train")
        ds = read_dataset(source, b.manifest.preprocess, limit=limit, offset=offset, progress=True)
        model, report = train_on_bundle(target, ds, at, pair, th, holdout, epochs, lr, **arch)
        cal = b.manifest.calibration
        calib_ds = read_dataset(cal.source if cal is not None else source, b.manifest.preprocess, limit=calib_samples,
                                spread=True)
        n_val = max(1, int(round(len(ds) * holdout))) if holdout > 0 else min(len(ds), 64)
        verify_x = features_for(b, ds.subset(np.arange(len(ds) - min(n_val, 256), len(ds))), report["input"])
        report["verification"] = add_to_bundle(target, model, report, features_for(b, calib_ds, report["input"]), verify_x)
    else:
        from .exit_predictor import save_predictor
        from .exit_predictor_model import train_on_model

        src = resolve(target, weights, input_shape, preprocess)  # first: a wrong MODEL is named as such
        if not exits_dir:
            raise click.BadParameter("a MODEL needs --exits DIR (its trained exit branches)", param_hint="--exits")
        if src.model is None:
            raise ModelSourceError("the Exit Predictor is trained on a PyTorch model or a bundle, not an .onnx file")
        ds = read_dataset(data or default_data(src.preprocess).replace(":test", ":train"), src.preprocess,
                          limit=limit, offset=offset, progress=True)
        model, report = train_on_model(src.model, exits_dir, ds, at, th, holdout, epochs, lr, **arch)
        save_predictor(exits_dir, model, report)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    _print_predictor_report(report)


def _print_predictor_report(r: dict) -> None:
    click.echo(f"Exit Predictor on {r['input']!r} for exits {', '.join(r['exits'])}: {r['mflops']:.4f} MFLOPs per sample, "
               f"labels = confidence passes [{', '.join('off' if t is None else f'{t:.4f}' for t in r['label_thresholds'])}]"
               f" ({r['rule']})")
    h = r.get("holdout")
    if h:
        per = "; ".join(f"{n}: accuracy {e['accuracy']:.1%}, recall {e['recall']:.1%}, fires {e['fires']:.1%}"
                        for n, e in zip(r["exits"], h["exits"]))
        click.echo(f"  held-out {h['samples']} samples, prediction threshold 0.5: {per}")
        click.echo(f"  \"hard\" (no exit fires): {h['hard_rate']:.1%} of samples; recall {h['hard_recall']:.1%}, "
                   f"precision {h['hard_precision']:.1%}; easy samples routed past every exit {h['easy_routed']:.1%}")
    e = r.get("effect")
    if e:
        a, p = e["exits_alone"], e["with_predictor"]
        click.echo(f"  effect at the label thresholds: top-1 {a['accuracy']:.2%} -> {p['accuracy']:.2%}, device MFLOPs "
                   f"{a['expected_mflops']:.3f} -> {p['expected_mflops']:.3f} per sample ({a['mflops_ratio']:.3f}x -> "
                   f"{p['mflops_ratio']:.3f}x backbone), branches run {', '.join(f'{v:.0%}' for v in a['branch_rates'])}"
                   f" -> {', '.join(f'{v:.0%}' for v in p['branch_rates'])}")
    v = r.get("verification")
    if v:
        click.echo("  graphs verified against PyTorch: " + "; ".join(
            f"{pair} max |diff| {c['max_abs_diff']:.1e}, decisions {c['decision_agreement']:.1%}" for pair, c in v.items()))


@exits.command(name="curve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--val-data", help="labelled validation data the operating points are chosen on "
                                 "(default: fashion-mnist:train with --val-offset 55000 for array models)")
@click.option("--val-offset", default=None, type=int)
@click.option("--val-limit", type=int)
@click.option("--data", help="labelled test data (default: fashion-mnist:test for array models)")
@click.option("--limit", type=int)
@click.option("--pair", help="graphs, e.g. onnx/int8 (default: int8 ONNX when present)")
@click.option("--deltas", help="top-1 drops in pt for the operating points, e.g. 0,0.25,0.5,1,2")
@click.option("--bandwidth", "bandwidths", default="1,5,20mbit", show_default=True,
              help="bandwidths for accuracy vs bandwidth (needs a latency-aware calibration)")
@click.option("--link-schedule", default="1mbit:80,20mbit:80,5mbit:80", show_default=True,
              help="after a latency-aware calibration: emulated RATE:REQUESTS phases of one adaptive run against a "
                   "local edge server (empty: skip)")
@click.option("--no-runtime", is_flag=True, help="offline simulation only (no runtime pass per point)")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
def exits_curve(bundle, val_data, val_offset, val_limit, data, limit, pair, deltas, bandwidths, link_schedule,
                no_runtime, out):
    """Accuracy vs device MFLOPs for exits alone, with the Exit Predictor and the backbone alone, and (after a
    latency-aware calibration) accuracy vs bandwidth under the latency budget for fixed vs adaptive
    thresholds: chosen on validation data, measured on test data through the runtime. Writes curve.json,
    curve.md and plots to --out."""
    from .exits_curve import DELTAS, compute_curve, latency_curve, link_run, write
    from .plan import parse_bandwidths

    b = Bundle.load(bundle)
    spec = b.manifest.preprocess
    array = spec.kind == "array"
    if not b.exits:
        raise click.BadParameter(f"{bundle} has no exits", param_hint="BUNDLE")
    val_source = val_data or ("fashion-mnist:train" if array else default_data(spec))
    offset = val_offset if val_offset is not None else (55000 if val_data is None and array else 0)
    val = read_dataset(val_source, spec, limit=val_limit, offset=offset, progress=True)
    test = read_dataset(data or default_data(spec), spec, limit=limit, progress=True)
    if val.y is None or test.y is None:
        raise DataError("the curve needs labels on both --val-data and --data")
    pair = pair or ("onnx/int8" if "onnx/int8" in b.formats() else b.formats()[0])
    ds = tuple(float(v) / 100 for v in deltas.split(",")) if deltas else DELTAS
    curve = {"bundle": str(bundle), "compute": compute_curve(b, val, test, pair, ds, runtime=not no_runtime,
                                                              progress=lambda m: click.echo(m, err=True))}
    if b.manifest.latency_adaptation is not None:
        curve["latency"] = latency_curve(b, test, pair, parse_bandwidths(bandwidths), runtime=not no_runtime,
                                         progress=lambda m: click.echo(m, err=True))
        if link_schedule and not no_runtime and b.server_segments:
            click.echo(f"{pair}: adaptive run over an emulated link ({link_schedule})", err=True)
            curve["link"] = link_run(b, test, pair, link_schedule)
    write(curve, Path(out))
    click.echo((Path(out) / "curve.md").read_text())


@main.group()
def bottleneck():
    """Bottleneck injection: an encoder on the device and a decoder on the server, trained by head network
    distillation (no labels needed); export with 'eetool export MODEL --bottleneck DIR'."""


@bottleneck.command(name="train")
@click.argument("model")
@with_model_options
@click.option("--split", required=True, help="split point S: the encoder reads this layer's output (e.g. blocks.3)")
@click.option("--channels", required=True, type=int, help="bottleneck channels C (what is sent: C x H/s x W/s)")
@click.option("--target-layer", help="layer T whose output the decoder reproduces (default: the first layer after "
                                     "S at the bottleneck's resolution)")
@click.option("--tune-from", help="also fine-tune the original layers between this cut and S (device side)")
@click.option("--stride", default=2, show_default=True, help="encoder stride s")
@click.option("--bits", default=4, show_default=True, type=click.IntRange(2, 8), help="wire quantisation the training simulates (bits per value)")
@click.option("--refine", default=0, show_default=True, help="residual blocks in the decoder (server side)")
@click.option("--data", "data", multiple=True,
              help="image folder(s), DIR or DIR:fold=K/N (default: the ImageNet samples' fold 0/2, else 'samples')")
@click.option("--photos", multiple=True, type=click.Path(exists=True),
              help="large photos (files or folders) cut into random crops (e.g. /usr/share/backgrounds/mate/nature)")
@click.option("--views", default=16, show_default=True, help="augmented views per --data image (the first: center crop)")
@click.option("--photo-crops", default=32, show_default=True, help="random crops per --photos image")
@click.option("--val-every", default=8, show_default=True, help="hold out every N-th --data image for validation")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--rec-weight", default=0.1, show_default=True, help="weight of the split-feature reconstruction loss")
@click.option("--rate-weight", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="weight of the code's entropy (per bit per value) in the loss: > 0 trains for fewer bytes "
                   "(rate-distortion)")
@click.option("--kd-temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="with --match logits: match the logits by KL divergence at this temperature (knowledge "
                   "distillation) instead of MSE; 0 = MSE")
@click.option("--match", default="", help="later layers (after --target-layer; 'logits' for the output) whose outputs "
                                          "also enter the loss, comma-separated (generalised HND)")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch CPU threads")
@click.option("--cache", type=click.Path(file_okay=False),
              help="teacher feature cache (default: OUT/cache); share it between runs that differ only in C or bits")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False),
              help="start from this trained bottleneck (same layout; --bits may differ) instead of the PCA "
                   "initialisation: continue training on more photos or epochs (-o must be another folder; "
                   "--cache DIR/cache reuses its teacher features when the data are the same)")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
def bottleneck_train(model, weights, input_shape, preprocess, split, channels, target_layer, tune_from, stride, bits,
                     refine, data, photos, views, photo_crops, val_every, epochs, batch, lr, rec_weight, rate_weight,
                     kd_temperature, match, seed, threads, cache, init_from, out):
    """Insert a bottleneck into MODEL after --split and train it by head network distillation: the student's
    output at --target-layer must reproduce the frozen original's. Writes bottleneck.pt (tensors only),
    bottleneck.json, curves.png and a resumable checkpoint.pt to --out."""
    if kd_temperature and "logits" not in match.split(","):
        raise click.UsageError("--kd-temperature sets how the logits are matched: add --match logits, or drop it")
    from .bottleneck import BottleneckSpec, default_target
    from .bottleneck_train import TrainData, train_bottleneck
    from .distill import DistillConfig

    src = resolve(model, weights, input_shape, preprocess)
    if src.model is None:
        raise ModelSourceError("a bottleneck is trained into a PyTorch model, not an .onnx file")
    if not data:
        base = default_data(src.preprocess)
        data = (base if base == "samples" else f"{base}:fold=0/2",)
    import torch

    target = target_layer or default_target(src.model, torch.zeros(src.input_shape), split, stride)
    spec = BottleneckSpec(split=split, target=target, channels=channels, stride=stride, bits=bits, tune_from=tune_from,
                          refine=refine)
    cfg = DistillConfig(epochs=epochs, batch=batch, lr=lr, rec_weight=rec_weight, rate_weight=rate_weight,
                        kd_temperature=kd_temperature, seed=seed, threads=threads,
                        match=tuple(m for m in match.split(",") if m))
    command = "eetool bottleneck train " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else ""
    train_bottleneck(src, spec, TrainData(list(data), list(photos), views, photo_crops, val_every), cfg, Path(out),
                     Path(cache) if cache else None, command=command, init_from=init_from)


@bottleneck.command(name="eval")
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_name", help="MODEL the bottleneck belongs to (default: the one it records)")
@with_model_options
@click.option("--data", help="labelled images never used for training or calibration (default: the ImageNet "
                             "samples' fold 1/2, else 'samples')")
@click.option("--limit", type=int, help="evaluate at most this many samples")
@click.option("--bits", type=click.IntRange(2, 8), help="wire bits (default: the bits the bottleneck was trained for)")
@click.option("--json", "as_json", is_flag=True)
def bottleneck_eval(target, model_name, weights, input_shape, preprocess, data, limit, bits, as_json):
    """Top-1 (against labels and against the original model) and framed bytes per sample of TARGET: a
    'bottleneck train' folder (PyTorch) or a bundle exported with --bottleneck (every format and precision,
    int8 device graphs also with the float server graphs). Bytes are the runtime's REQUEST frames (the code on
    the grid the training simulated, bit-packed, zstd), decoded as the edge server does. For the bundle's own
    wire codec and other --wire-bits against JPEG / WebP, use 'eetool rate'."""
    from .bottleneck_report import evaluate_target, render

    result = evaluate_target(Path(target), data, limit, bits, model_name, weights, input_shape, preprocess)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


def _runtime_passthrough(name: str, help_text: str):
    @main.command(name=name, help=help_text, add_help_option=False,
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def command(ctx):
        from runtime.__main__ import main as runtime_main

        sys.exit(runtime_main([name] + ctx.args))

    return command


_runtime_passthrough("serve", "Run a bundle's tail as an edge server (same as 'python -m runtime serve'; --help for options).")
_runtime_passthrough("run", "Run inputs on the device side of a bundle (same as 'python -m runtime run').")
_runtime_passthrough("bench", "Measure a bundle: latency per stage, bytes, energy (same as 'python -m runtime bench').")

from .cli_plan import plan  # noqa: E402  (registered after main exists)

main.add_command(plan)

if __name__ == "__main__":
    main()

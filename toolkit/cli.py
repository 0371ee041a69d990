"""The ``eetool`` command line: inspect, export, eval (toolkit side) and serve, run, bench (runtime side)."""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from calibration.readers import DataError, check_channels, read_dataset
from runtime.bundle import Bundle, BundleError

from .graph import SplitError
from .onnx_export import ExportError
from .sources import ModelSourceError, resolve

SHARED_IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"
USER_ERRORS = (SplitError, ExportError, ModelSourceError, DataError, BundleError, FileNotFoundError)


def default_data(preprocess: dict) -> str:
    """Real inputs when the user names none: Fashion-MNIST for array models; for image models the ImageNet
    samples beside the repo (or ``$EETOOL_IMAGENET_SAMPLES``) when present, else the photos in scikit-image."""
    if preprocess.get("kind") == "array":
        return "fashion-mnist:test"
    env = os.environ.get("EETOOL_IMAGENET_SAMPLES")
    if env and Path(env).is_dir():
        return env
    return str(SHARED_IMAGENET) if SHARED_IMAGENET.is_dir() else "samples"


class _Group(click.Group):
    """Turns the toolkit's user errors into one clear line and exit code 2, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option("0.1.0", prog_name="eetool")
def main():
    """eetool: split computing and early exiting for DNNs on edge boards."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)


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


@main.command()
@click.argument("model")
@with_model_options
@click.option("--depth", default=2, show_default=True, help="list cuts after modules up to this nesting depth")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def inspect(model, weights, input_shape, preprocess, depth, as_json):
    """List every candidate split point of MODEL: output shape, bytes per sample (fp32/int8), head and tail
    MFLOPs, head parameters, and whether a single tensor crosses the cut."""
    from .inspect_model import render_table, split_table

    src = resolve(model, weights, input_shape, preprocess)
    if src.kind == "onnx":
        from .onnx_slice import onnx_split_table

        table = onnx_split_table(src.onnx_path)
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
@click.option("--calib-samples", default=100, show_default=True, help="number of calibration samples")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]),
              help="activation range method for ONNX int8 (default: eetool's recipe)")
@click.option("--verify-data", help="real inputs for verification (default: the calibration source, after "
                                    "the calibration samples)")
@click.option("--verify-samples", default=32, show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="bundle directory to write")
def export(model, weights, input_shape, preprocess, split, exits_dir, formats, int8, calib, calib_samples,
           calib_method, verify_data, verify_samples, out):
    """Slice MODEL at --split into head (device) and tail (server) graphs, with exit branches, export them
    to ONNX / TFLite (float, and int8 with --int8), verify every graph against PyTorch on real inputs, and
    write a self-contained bundle to --out."""
    from .export import ExportOptions, export_bundle

    src = resolve(model, weights, input_shape, preprocess)
    if src.kind == "onnx":
        from .onnx_slice import export_onnx_bundle

        data = read_dataset(verify_data, src.preprocess, limit=verify_samples).x if verify_data else None
        report = export_onnx_bundle(src.onnx_path, [s for s in split.split(",") if s], Path(out), data)
        click.echo(json.dumps(report["verification"], indent=2))
        return
    fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
    unknown = set(fmts) - {"onnx", "tflite"}
    if unknown:
        raise click.BadParameter(f"unknown format(s) {sorted(unknown)}; use onnx and/or tflite", param_hint="--format")
    data_name = calib or default_data(src.preprocess)
    calib_ds = read_dataset(data_name, src.preprocess, limit=calib_samples, progress=True)
    check_channels(calib_ds, src.input_shape)
    if verify_data:
        verify_ds = read_dataset(verify_data, src.preprocess, limit=verify_samples)
    else:
        verify_ds = read_dataset(data_name, src.preprocess, limit=verify_samples, offset=len(calib_ds)) \
            if _has_more(data_name, src.preprocess, len(calib_ds)) else calib_ds
    exits = []
    if exits_dir:
        from .exits_bundle import exit_specs

        exits = exit_specs(exits_dir, src.model)
    quant = {"method": calib_method} if calib_method else {}
    report = export_bundle(src, ExportOptions(split=[s for s in split.split(",") if s], out=Path(out),
                                              exits=exits, formats=fmts, int8=int8, quant=quant), calib_ds, verify_ds)
    _print_export_summary(Path(out), report)


def _has_more(data: str, preprocess: dict, offset: int) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_dataset(data, preprocess, limit=1, offset=offset)
        return True
    except DataError:
        return False


def _print_export_summary(out: Path, report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    manifest = json.loads((out / "manifest.json").read_text())
    t = Table(title=f"bundle {out}  (split after {manifest['split']})")
    for col in ("chain", "samples", "max |diff|", "top-1 agreement", "cosine", "top-1"):
        t.add_column(col)
    ver = report["verification"]
    for pair, e in ver["chains"].items():
        c = e["batch_n"]
        t.add_row(pair, str(ver["samples"]), f"{c['max_abs_diff']:.2e}", f"{c['top1_agreement']:.1%}",
                  f"{c['cosine']:.5f}", f"{e['top1']:.1%}" if "top1" in e else "-")
    Console().print(t)
    for seg in manifest["segments"]:
        click.echo(f"  {seg['name']:6s} {seg['side']:6s} {', '.join(seg['inputs'])} -> {', '.join(seg['outputs'])}"
                   f"  {seg['mflops']:.1f} MFLOPs")
    for e in manifest["exits"]:
        click.echo(f"  {e['name']:6s} exit   at {e['at']}  {e['mflops']:.2f} MFLOPs  {e['rule']} threshold {e['threshold']:.3f}")


@main.command(name="eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="labelled real data (image folder with synsets.txt / class subfolders / labels.txt, "
                             ".npz with x,y, fashion-mnist:test); default: as at export")
@click.option("--offset", default=0, show_default=True, help="skip this many samples (e.g. the calibration ones)")
@click.option("--limit", type=int, help="evaluate at most this many samples")
@click.option("--json", "as_json", is_flag=True)
def eval_(bundle, data, offset, limit, as_json):
    """Top-1 of every chain of BUNDLE (float and int8, ONNX and TFLite) and of each exit, on real data."""
    from .evaluate import evaluate_bundle

    b = Bundle.load(bundle)
    ds = read_dataset(data or default_data(b.manifest["preprocess"]), b.manifest["preprocess"], limit=limit,
                      offset=offset, progress=True)
    result = evaluate_bundle(b, ds)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['samples']} samples from {result['source']}")
    for pair, e in result["chains"].items():
        top1 = f"top-1 {e['top1']:.2%}" if "top1" in e else "unlabelled"
        agree = f"  agreement with onnx/fp32 {e['agreement_with_fp32']:.2%}" if "agreement_with_fp32" in e else ""
        click.echo(f"  {pair:12s} {top1}{agree}")
        for name, x in e.get("exits", {}).items():
            click.echo(f"    {name}: " + ", ".join(f"{k} {v:.2%}" for k, v in x.items()))


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

"""The ``eetool plan`` command (registered in :mod:`toolkit.cli` with ``main.add_command(plan)``).

Neurosurgeon-style split choice (Kang et al., ASPLOS 2017): per split point, device latency + bytes on the
wire / bandwidth + server latency, from measurements on real inputs. See :mod:`toolkit.plan`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click


@click.command()
@click.argument("model")
@click.option("--weights", help="state dict (.pt/.pth) to load, with torch.load(weights_only=True)")
@click.option("--input-shape", help="model input shape, e.g. 1,3,224,224 (default: the model's)")
@click.option("--preprocess", type=click.Choice(["imagenet", "fashion-mnist", "none"]),
              help="input preprocessing (default: the model's)")
@click.option("--board", default="host", show_default=True, help="device board profile (boards/NAME.json or a path)")
@click.option("--bandwidth", "bandwidth", default="1,10,100mbit", show_default=True,
              help="uplink bandwidths, comma-separated: b = bit, B = byte, k/M/G decimal, /s or ps optional "
                   "(10mbit, 500kB/s, 1Gbps); bare numbers take the last item's unit, else Mbit/s")
@click.option("--downlink", help="downlink bandwidth for the reply (default: same as the uplink)")
@click.option("--rtt", default="0ms", show_default=True, help="network round trip added to every offloaded request")
@click.option("--server-profile", default="host", show_default=True,
              help="edge server: 'host' (measured on this machine), a board name (FLOPs estimate), a layer-profile "
                   "JSON measured on the server or a bench folder holding one")
@click.option("--measurements", type=click.Path(exists=True),
              help="layer profile measured on the board: the folder 'python -m runtime bench' wrote there (its "
                   "layers.json) or a profile JSON (python -m runtime.profile_layers); default: this host's "
                   "measurement for --board host, else a FLOPs estimate")
@click.option("--data", help="real inputs (image folder, .npy/.npz, samples; default: as eetool export)")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(min=1),
              help="real inputs used to measure bytes on the wire")
@click.option("--codec", type=click.Choice(["zstd", "brotli", "lz4", "none"]), default="zstd", show_default=True,
              help="entropy coder of the split feature")
@click.option("--wire-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="split feature on the wire as n-bit codes (as export --wire-bits N); 8 = int8")
@click.option("--wire-per-channel", is_flag=True, help="with --wire-bits: per-channel scales / zero points")
@click.option("--wire-range", type=click.Choice(["tail-kl", "minmax", "mse"]), default="tail-kl", show_default=True,
              help="with --wire-bits: range method (tail-kl runs the model once per cut and candidate range)")
@click.option("--bottleneck", "bottleneck_dir", type=click.Path(exists=True, file_okay=False),
              help="plan MODEL with this trained bottleneck ('eetool bottleneck train' folder) inserted: the split "
                   "candidate is its encoder output (head + encoder on the device), as export --bottleneck slices it")
@click.option("--hmac", is_flag=True, help="count the 32-byte HMAC tag of an authenticated link")
@click.option("--depth", default=2, show_default=True, type=click.IntRange(min=1), help="candidate cuts after modules up to this nesting depth")
@click.option("--candidates", help="only these split points (comma-separated), e.g. blocks.2,blocks.5")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=1),
              help="profiled runs on this host (after --warmup)")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", type=int, help="onnxruntime threads for this host's measurement (default: its own)")
@click.option("--exit-rates", help='early exits: JSON {"CUT": rate, ...} or {"CUT": {"rate": r, "mflops": m}}; '
                                   'rate = fraction of all samples that stop there')
@click.option("--exits-from", type=click.Path(exists=True, file_okay=False),
              help="read exits (at, mflops, expected_exit_rate) from this bundle's manifest.json")
@click.option("--save-measurements", type=click.Path(dir_okay=False),
              help="write this host's layer profile (the --measurements format) here")
@click.option("--export-onnx", type=click.Path(dir_okay=False),
              help="only write the whole model as ONNX for profiling on a board, and print the board command")
@click.option("--plot", "plot_path", help="PNG plot path (default: out/plan-MODEL-BOARD.png)")
@click.option("--no-plot", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.pass_context
def plan(ctx, model, weights, input_shape, preprocess, board, bandwidth, downlink, rtt, server_profile, measurements,
         data, samples, codec, wire_bits, wire_per_channel, wire_range, bottleneck_dir, hmac, depth, candidates, runs,
         warmup, threads, exit_rates, exits_from, save_measurements, export_onnx, plot_path, no_plot, as_json):
    """Choose where to split MODEL between --board and the edge server, Neurosurgeon-style (Kang et al.,
    ASPLOS 2017): for every single-tensor split point, "local only" and "full offload (JPEG)", end-to-end
    latency (ms) = device ms + encode ms + bytes*8/bandwidth + rtt + server ms, with bytes measured on real
    inputs (int8 split feature, compressed, framed) and per-layer latency measured (board file or this host)
    or estimated from FLOPs. Prints a table, the best option per bandwidth (Mbit/s) and writes a plot."""
    from runtime.link import parse_bandwidth, parse_duration
    from runtime.manifest import load_manifest

    from .calibrate import WireCodec
    from .cli import given, refuse
    from .plan import PlanError, PlanRequest, exits_from_manifest, make_plan, parse_bandwidths, parse_exit_rates
    from .sources import resolve

    if export_onnx:
        refuse(given(ctx, "bandwidth", "downlink", "rtt", "server_profile", "measurements", "data", "samples",
                     "codec", "hmac", "depth", "candidates", "runs", "warmup", "threads", "exit_rates",
                     "exits_from", "save_measurements", "plot_path", "no_plot", "as_json"),
               "--export-onnx only writes the model for profiling on the board; plan with {it} afterwards")
    if no_plot:
        refuse(given(ctx, "plot_path"), "--no-plot writes no plot; drop one of the two")
    # this host's latency is measured only for a device or server side that is neither measured elsewhere
    # nor estimated (or to save it)
    measures_here = (board == "host" and not measurements) or server_profile == "host" or save_measurements
    if not measures_here and not export_onnx:
        refuse(given(ctx, "runs", "warmup", "threads"),
               "set{s} this host's latency measurement, and this plan measures nothing here (device: "
               + ("--measurements" if measurements else f"{board} estimate") + f", server: {server_profile}); "
               "drop {it}")
    try:  # the link first: a typo there must not cost a model load and measurements
        bandwidths_mbps, rtt_ms = parse_bandwidths(bandwidth), parse_duration(rtt)
        downlink_mbps = parse_bandwidth(downlink) if downlink else None
    except ValueError as e:
        raise click.BadParameter(str(e))
    src = resolve(model, weights, input_shape, preprocess)
    if bottleneck_dir:
        from . import bottleneck as B
        from .bottleneck_export import with_bottleneck

        if export_onnx or candidates:
            refuse(given(ctx, "export_onnx", "candidates"), "--bottleneck plans its own cut (the encoder output); "
                                                            "drop {it}")
        src, cuts, _ = with_bottleneck(src, Path(bottleneck_dir), [B.read_config(Path(bottleneck_dir))["split"]])
        candidates = ",".join(cuts)
    if export_onnx:
        from .layer_latency import export_whole_onnx

        path = export_whole_onnx(src.model, src.input_shape, Path(export_onnx))
        click.echo(f"wrote {path}; on the board run:\n  python -m runtime.profile_layers {path.name} --board {board} "
                   f"--out {board}-layers.json IMAGES...\nthen: eetool plan {model} --board {board} "
                   f"--measurements {board}-layers.json")
        return
    try:
        exits = []
        if exit_rates:
            exits += parse_exit_rates(exit_rates)
        if exits_from:
            exits += exits_from_manifest(load_manifest(exits_from))
        req = PlanRequest(
            board=board, bandwidths_mbps=bandwidths_mbps, rtt_ms=rtt_ms,
            downlink_mbps=downlink_mbps, server_profile=server_profile,
            measurements=measurements, data=data, samples=samples, codec=codec,
            wire=WireCodec(wire_bits, wire_per_channel, wire_range, codec),
            candidates=[c for c in (candidates or "").split(",") if c] or None, depth=depth, runs=runs,
            warmup=warmup, threads=threads, exits=exits, hmac=hmac)
    except ValueError as e:
        raise click.BadParameter(str(e))
    say = None if as_json else (lambda msg: click.echo(f"... {msg}", err=True))
    options, results, exit_costs, report = make_plan(src, req, say)  # user errors: one line, exit 2 (cli.py)
    if save_measurements:
        _save_host_measurement(report, src, req, save_measurements)
    if not no_plot:
        from .plan import plot

        plot_path = plot_path or os.path.join("out", f"plan-{_safe(src.name)}-{_safe(board)}.png")
        title = (f"{src.name}: device {report['board']}, server {server_profile}, {report['wire']}, "
                 f"rtt {req.rtt_ms:g} ms")
        plot(options, results, plot_path, title)
        report["plot"] = plot_path
    if as_json:
        click.echo(json.dumps(report, indent=2, default=float))
        return
    from rich.console import Console

    from .plan import render

    console = Console(width=max(120, int(os.environ.get("COLUMNS", 160))))
    title = (f"{src.name} on {report['board']} -> server {server_profile} ({report['wire']}, rtt {req.rtt_ms:g} ms, "
             f"{report['samples']} real inputs)")
    console.print(render(options, results, title, exit_costs))
    click.echo(f"device latency ({report['device_label']}): {report['device_source']}")
    click.echo(f"server latency ({report['server_label']}): {report['server_source']}")
    click.echo(f"bytes/sample: request frame ({report['wire']} split feature + protocol header), measured on "
               f"{report['data']}; full offload sends the JPEG file; reply {report['reply_bytes']:.0f} B (top-5)")
    dp, sp = report["device_preprocess"], report["server_preprocess"]
    click.echo(f"image preprocessing (decode, resize, normalise): device {dp['ms']:.2f} ms {dp['source']}, "
               f"server (full offload) {sp['ms']:.2f} ms {sp['source']}")
    if report.get("jpeg"):
        j = report["jpeg"]
        click.echo(f"full offload: JPEG files {j['file_bytes_mean']:,.0f} B mean ({j['file_bytes_min']:,}-"
                   f"{j['file_bytes_max']:,}); the same images at 224 px, JPEG q90: {j['jpeg_224_q90_bytes_mean']:,.0f} B; "
                   f"raw input int8 {report['input_bytes_int8']:,} B, fp32 {report['input_bytes_fp32']:,} B")
    if report["skipped_multi_tensor_cuts"]:
        click.echo(f"skipped (several tensors cross): {', '.join(report['skipped_multi_tensor_cuts'])}")
    for line in report["explanation"]:
        click.echo(line)
    if "plot" in report:
        click.echo(f"plot: {report['plot']}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name)


def _save_host_measurement(report: dict, src, req, path: str) -> None:
    """Write the layer profile this plan measured on this host (or measure it now, when the plan used a
    board file or an estimate for both sides)."""
    from runtime.profile_layers import save_profile

    from calibration.readers import default_data, read_dataset

    from . import layer_latency as LL
    prof = report.get("host_measurement")
    if prof is None:
        ds = read_dataset(req.data or default_data(src.preprocess), src.preprocess, limit=min(req.samples, 8))
        prof = LL.measure_host(src.model, src.input_shape, ds.x, ds.files, src.preprocess, req.runs, req.warmup,
                               req.threads)
        prof.pop("label", None)
    save_profile(prof, path)
    click.echo(f"layer profile of this host written to {path}", err=True)

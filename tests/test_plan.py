"""``eetool plan``: the Neurosurgeon-style cost model on hand-made numbers, bytes on the wire measured on
real images, the layer-profile file round trip, and one CLI run on the real EfficientNet-Lite0.

No assertion depends on wall-clock speed: latencies are only checked for structure and consistency."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from runtime.profile_layers import (ProfileError, cumulative_from_nodes, load_profile, node_scopes, parse_profile,
                                    profile_onnx, save_profile, validate_profile)
from toolkit.cli_plan import plan
from toolkit.layer_latency import cumulative_for_rows, estimate_profile, export_whole_onnx
from toolkit.plan import (LOCAL, OFFLOAD, ExitCost, Option, PlanError, best_by_bandwidth, capture_cut_features, choose,
                          exits_from_manifest, explain, feature_wire_bytes, jpeg_wire_bytes, option_latency, parse_bandwidths, parse_exit_rates,
                          transmit_ms)


# --------------------------------------------------------------------------- arithmetic on a hand-made table
def _options(reply: float = 0.0) -> list[Option]:
    """A slow device (local 100 ms) and a fast server (whole model 10 ms, decode 2 ms)."""
    return [
        Option(OFFLOAD, "offload", -1, device_ms=0.0, server_ms=12.0, request_bytes=100_000, reply_bytes=reply),
        Option("early", "split", 0, device_ms=20.0, server_ms=8.0, request_bytes=50_000, reply_bytes=reply),
        Option("late", "split", 1, device_ms=50.0, server_ms=2.0, request_bytes=5_000, reply_bytes=reply),
        Option(LOCAL, "local", 2, device_ms=100.0, server_ms=0.0),
    ]


def test_transmit_time_units():
    # 125,000 B = 1 Mbit: 1000 ms at 1 Mbit/s, 10 ms at 100 Mbit/s; plus the reply and one rtt
    assert transmit_ms(125_000, 0, 1.0, 0.0) == pytest.approx(1000.0)
    assert transmit_ms(125_000, 12_500, 100.0, 20.0) == pytest.approx(10.0 + 1.0 + 20.0)
    assert transmit_ms(125_000, 12_500, 100.0, 0.0, downlink_mbps=10.0) == pytest.approx(10.0 + 10.0)
    assert transmit_ms(0, 0, 1.0, 50.0) == 0.0  # nothing sent: no link time at all


def test_best_split_moves_with_bandwidth():
    opts = _options()
    res = {r["mbps"]: r for r in choose(opts, [0.1, 1.0, 10.0, 100.0, 1000.0])}
    # 0.1 Mbit/s: late = 50 + 2 + 400 = 452 > local 100
    assert res[0.1]["best"] == LOCAL
    # 1 Mbit/s: late = 52 + 40 = 92 < local 100 < early 28 + 400
    assert res[1.0]["best"] == "late" and res[1.0]["best_ms"] == pytest.approx(92.0)
    # 10 Mbit/s: late 56, early 68, offload 92
    assert res[10.0]["best"] == "late"
    assert res[10.0]["rows"]["early"]["total_ms"] == pytest.approx(68.0)
    # 100 Mbit/s: offload 12 + 8 = 20 beats early 32 and late 52.4: the fast server wins
    assert res[100.0]["best"] == OFFLOAD and res[100.0]["best_ms"] == pytest.approx(20.0)
    assert res[1000.0]["best"] == OFFLOAD
    sweep = best_by_bandwidth(opts, lo=0.01, hi=10000.0)
    # the split moves towards the input as bandwidth grows: local, late, early, full offload
    assert [s["best"] for s in sweep] == [LOCAL, "late", "early", OFFLOAD]
    # crossovers: local -> late at 52 + 40/B = 100 (B = 0.833), late -> early at 52 + 40/B = 28 + 400/B
    # (B = 15), early -> offload at 28 + 400/B = 12 + 800/B (B = 25 Mbit/s)
    assert sweep[0]["to_mbps"] < 0.8334 < sweep[1]["from_mbps"]
    assert sweep[1]["to_mbps"] < 15.0 < sweep[2]["from_mbps"]
    assert sweep[2]["to_mbps"] < 25.0 < sweep[3]["from_mbps"]


def test_rtt_and_reply_shift_the_choice_to_local():
    opts = _options(reply=1_250)  # 10 kbit reply
    r = option_latency(opts[2], 10.0, rtt_ms=30.0)
    assert r["tx_ms"] == pytest.approx(4.0 + 1.0 + 30.0) and r["total_ms"] == pytest.approx(52.0 + 35.0)
    # with a 60 ms round trip nothing beats local at 10 Mbit/s
    assert choose(opts, [10.0], rtt_ms=60.0)[0]["best"] == LOCAL


def test_explain_names_why_local_wins_everywhere():
    # a fast server but a 200 ms round trip: offloading computes faster, the link makes it lose
    opts = _options()
    sweep = best_by_bandwidth(opts, rtt_ms=200.0)
    lines = explain(choose(opts, [1.0, 100.0], rtt_ms=200.0), sweep, opts, rtt_ms=200.0)
    assert [s["best"] for s in sweep] == [LOCAL]
    assert "200 ms round trip" in lines[-1] and "too cheap" in lines[-1]
    # a server no faster than the device: splitting only adds work, whatever the link
    same = [Option(OFFLOAD, "offload", -1, 0.0, 100.0, 100_000), Option("mid", "split", 0, 50.0, 50.0, 5_000),
            Option(LOCAL, "local", 1, 100.0, 0.0)]
    lines = explain(choose(same, [1.0, 100.0]), best_by_bandwidth(same), same)
    assert "server is not faster than the device" in lines[-1]


def test_expected_latency_with_exits():
    opts = _options()
    ex = [ExitCost("exit0", "early", 0, rate=0.5, device_ms=20.0, branch_ms=1.0)]
    res = choose(opts, [10.0], exits=ex)[0]["rows"]
    # late (after the exit): 0.5 * (20 + 1) + 0.5 * (56 + 1)
    assert res["late"]["expected_ms"] == pytest.approx(0.5 * 21 + 0.5 * 57)
    assert res["late"]["exit_rate"] == pytest.approx(0.5)
    # local: 0.5 * 21 + 0.5 * (100 + 1)
    assert res[LOCAL]["expected_ms"] == pytest.approx(0.5 * 21 + 0.5 * 101)
    # full offload cannot use a device exit
    assert res[OFFLOAD]["expected_ms"] == res[OFFLOAD]["total_ms"] and res[OFFLOAD]["exit_rate"] == 0.0
    with pytest.raises(PlanError, match="sum"):
        choose(opts, [1.0], exits=ex + [ExitCost("exit1", "late", 1, 0.6, 50.0, 1.0)])


def test_parsers():
    assert parse_bandwidths("1,10,100mbit") == pytest.approx([1.0, 10.0, 100.0])
    assert parse_bandwidths("500,2000kbit") == pytest.approx([0.5, 2.0])
    assert parse_bandwidths("1mbit,1gbit") == pytest.approx([1.0, 1000.0])
    with pytest.raises(PlanError):
        parse_bandwidths("fast")
    assert parse_bandwidths("10MBps,500kB/s,1Gb/s") == pytest.approx([80.0, 4.0, 1000.0])  # runtime.link's grammar
    ex = parse_exit_rates('{"blocks.2": 0.3, "blocks.5": {"rate": 0.2, "mflops": 0.5}}')
    assert [(e["at"], e["rate"], e["mflops"]) for e in ex] == [("blocks.2", 0.3, 0.0), ("blocks.5", 0.2, 0.5)]
    with pytest.raises(PlanError):
        parse_exit_rates("[1, 2]")
    from runtime.manifest import ExitBranch, Manifest

    branch = dict(name="exit0", at="blocks.2", input="blocks.2", output="exit0.logits", mflops=0.2)
    manifest = Manifest(exits=[ExitBranch(**branch, expected_exit_rate={"onnx/int8": 0.5, "onnx/fp32": 0.4})])
    assert exits_from_manifest(manifest) == [{"name": "exit0", "at": "blocks.2", "rate": 0.4, "mflops": 0.2}]
    with pytest.raises(PlanError, match="calibrate"):
        exits_from_manifest(Manifest(exits=[ExitBranch(**branch)]))


# --------------------------------------------------------------------------- bytes measured on real images
def test_wire_bytes_on_real_images(effnet, calib_images):
    x = calib_images.x[:8]
    n = len(x)  # 5 photos on a fresh clone, 8 ImageNet samples beside the repo
    assert n >= 5
    feats = capture_cut_features(effnet.model, x, ["blocks.2", "blocks.5"])
    assert feats["blocks.5"].shape == (n, 80, 14, 14)
    with torch.no_grad():  # the captured tensor is the real head output
        head = effnet.model.blocks[:6](effnet.model.stem(torch.from_numpy(x[:2])))
    np.testing.assert_allclose(feats["blocks.5"][:2], head.numpy(), rtol=1e-4, atol=1e-4)
    for name, f in feats.items():
        w = feature_wire_bytes(name, f, "zstd")
        assert 0 < w["payload_bytes"] <= w["int8_bytes"] < w["fp32_bytes"]
        assert w["frame_overhead_bytes"] > 28  # 28-byte prefix + the JSON header
        assert w["request_bytes"] < w["fp32_bytes"]
        assert w["qparams"]["scale"] > 0
    b5 = feature_wire_bytes("blocks.5", feats["blocks.5"], "zstd")
    none = feature_wire_bytes("blocks.5", feats["blocks.5"], "none")
    assert none["payload_bytes"] == 80 * 14 * 14 and b5["request_bytes"] <= none["request_bytes"]
    jpegs = [f for f in (calib_images.files or [])[:8] if f.suffix.lower() in (".jpg", ".jpeg")]
    if jpegs:
        j = jpeg_wire_bytes(jpegs)
        assert j["request_bytes"] > j["file_bytes_mean"] > 0
        # the qualitative claim: an int8 mid-network feature is smaller on the wire than the JPEG image
        assert b5["request_bytes"] < j["request_bytes"]


def test_nbit_wire_bytes_and_tail_kl_ranges(effnet, calib_images):
    from runtime.quant import QuantParams
    from toolkit.calibrate import WireCodec
    from toolkit.plan import tail_kl_qparams

    x = calib_images.x[:4]
    feats = capture_cut_features(effnet.model, x, ["blocks.5"])
    int8 = feature_wire_bytes("blocks.5", feats["blocks.5"], "zstd")
    four = feature_wire_bytes("blocks.5", feats["blocks.5"], "zstd", wire=WireCodec(4, False, "minmax"))
    assert four["qparams"]["bits"] == 4 and four["request_bytes"] < 0.6 * int8["request_bytes"]
    # the payload is the compressed packed codes: at most the packed size
    assert four["payload_bytes"] <= 80 * 14 * 14 * 4 / 8
    q = tail_kl_qparams(effnet.model, x, ["blocks.5"], feats, WireCodec(3, False, "tail-kl"), alphas=(1.0, 0.6))
    assert q["blocks.5"]["alpha"] in (1.0, 0.6) and q["blocks.5"]["range"] == "tail-kl"
    minmax = feature_wire_bytes("blocks.5", feats["blocks.5"], "zstd", wire=WireCodec(3, False, "minmax"))["qparams"]
    shrunk = QuantParams.from_json(q["blocks.5"])
    assert shrunk.bits == 3 and shrunk.scale <= minmax["scale"] * (1 + 1e-3)


# --------------------------------------------------------------------------- layer profiles
def test_parse_profile_on_synthetic_events():
    def run(ts, durs):
        names = ["/a/a.0/Conv", "ReorderInput", "/a/a.1/Clip", "/b/Gemm"]
        ev = [{"cat": "Session", "name": "model_run", "ts": ts, "dur": sum(durs) + 10}]
        t = ts + 1
        for n, d in zip(names, durs):
            ev.append({"cat": "Node", "name": n + "_kernel_time", "ts": t, "dur": d, "args": {"op_name": "X"}})
            t += d
        return ev

    events = run(0, [9000, 9000, 9000, 9000]) + run(100_000, [1000, 2000, 3000, 4000]) \
        + run(200_000, [1000, 2000, 3000, 4000]) + run(300_000, [3000, 2000, 1000, 4000])
    p = parse_profile(events, warmup=1)  # the first (slow) run is dropped
    assert p["runs"] == 3
    assert [n["name"] for n in p["nodes"]] == ["/a/a.0/Conv", "ReorderInput", "/a/a.1/Clip", "/b/Gemm"]
    assert p["cumulative_kernel_ms"]["a.0"] == pytest.approx(1.0)   # median of 1, 1, 3
    assert p["cumulative_kernel_ms"]["a"] == pytest.approx(6.0)     # includes the unscoped reorder node
    assert p["cumulative_kernel_ms"]["b"] == pytest.approx(10.0) == p["kernel_total_ms"]
    assert node_scopes("/blocks/blocks.5/expand/expand.2/Clip_output_0_nchwc") == \
        ["blocks", "blocks.5", "blocks.5.expand", "blocks.5.expand.2"]
    assert node_scopes("ReorderOutput_token_3") == []
    assert cumulative_from_nodes([{"name": "/a/X", "ms": 1.0}, {"name": "/b/Y", "ms": 3.0}], 8.0) == {"a": 2.0, "b": 8.0}


def test_measurement_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict([
        ("conv1", torch.nn.Conv2d(3, 8, 3, padding=1)), ("act1", torch.nn.ReLU()),
        ("conv2", torch.nn.Conv2d(8, 8, 3, padding=1)), ("pool", torch.nn.AdaptiveAvgPool2d(1)),
        ("flat", torch.nn.Flatten()), ("fc", torch.nn.Linear(8, 4))])).eval()
    onnx_path = export_whole_onnx(model, (1, 3, 32, 32), tmp_path / "tiny.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    prof = profile_onnx(onnx_path, [x[:1], x[1:]], runs=3, warmup=1, threads=1, board="rpi4")
    assert prof["schema"] == "eetool.layer_profile/1" and prof["board"] == "rpi4" and prof["runs"] == 3
    assert {"conv1", "conv2", "fc"} <= set(prof["cumulative_ms"])
    assert prof["cumulative_ms"]["conv1"] <= prof["cumulative_ms"]["conv2"] <= prof["cumulative_ms"]["fc"]
    assert prof["cumulative_ms"]["fc"] == pytest.approx(prof["total_ms"], rel=1e-6)
    path = tmp_path / "rpi4-layers.json"
    save_profile(prof, path)
    back = load_profile(path)
    assert back == json.loads(json.dumps(prof))
    rows = [{"name": "conv1", "aliases": []}, {"name": "act1", "aliases": []}, {"name": "conv2", "aliases": []}]
    got = cumulative_for_rows(back, rows)
    # act1 (ReLU) may be fused into conv1 by onnxruntime: then it takes conv1's time, labelled
    assert got[0][0] == back["cumulative_ms"]["conv1"] and got[2][0] == back["cumulative_ms"]["conv2"]
    assert got[1][0] in (back["cumulative_ms"].get("act1"), got[0][0])
    with pytest.raises(ValueError, match="another model"):
        cumulative_for_rows(back, [{"name": "blocks.5", "aliases": []}])
    # a hand-written file needs only board, source, cumulative_ms, total_ms
    assert validate_profile({"board": "rpi4", "source": "by hand", "cumulative_ms": {"conv1": 1.5}, "total_ms": 4})
    for bad in ({"board": "rpi4", "source": "x", "cumulative_ms": {"conv1": -1}, "total_ms": 4},
                {"board": "rpi4", "source": "x", "cumulative_ms": {}, "total_ms": 4},
                {"board": "rpi4", "cumulative_ms": {"conv1": 1}, "total_ms": 4}):
        with pytest.raises(ProfileError):
            validate_profile(bad)


def test_flops_estimate_profile():
    table = {"total_mflops": 600.0, "rows": [{"name": "blocks.5", "aliases": ["b5"], "head_mflops": 240.0}]}
    board = {"name": "rpi4", "compute": {"gflops_sustained": 12.0}, "sources": {"compute": "estimate"}}
    est = estimate_profile(table, board)
    assert est["cumulative_ms"] == {"blocks.5": 20.0, "b5": 20.0} and est["total_ms"] == pytest.approx(50.0)
    assert est["label"] == "ESTIMATE from FLOPs" and "GFLOP/s" in est["source"]


# --------------------------------------------------------------------------- the CLI on the real model
def test_plan_cli_json_on_efficientnet(tmp_path, imagenet_source):
    png, saved = tmp_path / "plan.png", tmp_path / "host-layers.json"
    res = CliRunner().invoke(plan, [
        "efficientnet-lite0", "--board", "host", "--bandwidth", "1,100mbit", "--rtt", "5ms",
        "--candidates", "blocks.2,blocks.5", "--samples", "4", "--runs", "3", "--warmup", "1", "--threads", "1",
        "--data", imagenet_source, "--json", "--plot", str(png), "--save-measurements", str(saved),
        "--exit-rates", '{"blocks.2": 0.25}'])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    names = [o["name"] for o in report["options"]]
    assert names[1:3] == ["blocks.2", "blocks.5"] and names[-1] == LOCAL
    assert report["units"]["bandwidth"].startswith("Mbit/s") and report["rtt_ms"] == 5.0
    assert [b["mbps"] for b in report["bandwidths"]] == [1.0, 100.0]
    for o in report["options"]:
        if o["kind"] == "split":
            assert 0 < o["request_bytes"] < o["info"]["wire"]["fp32_bytes"]
            assert "measured on this host" in o["device_source"] and o["server_source"] == "measured on this host"
            assert o["device_ms"] > 0 and o["server_ms"] > 0
    for b in report["bandwidths"]:
        assert b["best"] in names
        assert b["best_ms"] == pytest.approx(min(r["expected_ms"] for r in b["rows"].values()))
    assert report["exits"][0]["at"] == "blocks.2" and report["exits"][0]["order"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prof = load_profile(saved)
    assert prof["board"] == "host" and {"blocks.2", "blocks.5"} <= set(prof["cumulative_ms"])
    # the same plan on the bench report's page: one row per option, the claim follows the plan's choices
    from runtime.report import plan_claim, render_summary

    page = render_summary([], [report], "t")
    assert all(("| %s |" % n) in page for n in names)
    moves = len(set(report["best"].values())) > 1
    assert plan_claim(report).startswith("the best split moves" if moves else "the best split does NOT move")


def test_plan_refuses_measurements_of_another_model_or_machine(tmp_path, effnet):
    """A layer profile names its model, input shape and CPU: plan refuses one from another model (module
    names like pool.0 can coincide) or one measured on x86 but labelled rpi4, before reading any input."""
    from toolkit.plan import PlanError, PlanRequest, make_plan

    base = {"schema": "eetool.layer_profile/1", "source": "t", "total_ms": 2.0, "cumulative_ms": {"pool.0": 1.0}}
    cases = [({**base, "board": "host", "input_shape": [1, 1, 28, 28]}, "host", "input"),
             ({**base, "board": "host", "input_shape": [1, 3, 224, 224], "model_source": "fashion-cnn"}, "host",
              "fashion-cnn"),
             ({**base, "board": "rpi4", "machine": "x86_64"}, "rpi4", "measure on the board itself"),
             ({**base, "board": "host"}, "rpi4", "--board host")]
    for i, (prof, board, msg) in enumerate(cases):
        f = tmp_path / f"p{i}.json"
        f.write_text(json.dumps(prof))
        with pytest.raises((PlanError, ProfileError), match=msg):
            make_plan(effnet, PlanRequest(board=board, measurements=str(f), data="/nonexistent/never/read"))
    with pytest.raises(ProfileError, match="no layers.json"):  # a bench folder without a profile
        make_plan(effnet, PlanRequest(board="host", server_profile=str(tmp_path), data="/nonexistent"))


def test_report_refuses_the_wrong_kind_of_json(tmp_path):
    from argparse import Namespace

    from runtime.report import run

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "report.json").write_text(json.dumps({"best": {}}))
    (tmp_path / "plan.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{not json")
    for a, msg in ((Namespace(out=str(tmp_path / "p.md"), bench=[str(bench)], plan=[], title="t"), "not a bench report"),
                   (Namespace(out=str(tmp_path / "p.md"), bench=[], plan=[str(tmp_path / "plan.json")], title="t"),
                    "not a plan"),
                   (Namespace(out=str(tmp_path / "p.md"), bench=[], plan=[str(tmp_path / "broken.json")], title="t"),
                    "broken.json: cannot read as JSON"),
                   (Namespace(out=str(tmp_path / "no" / "p.md"), bench=[], plan=[], title="t"), "does not exist")):
        with pytest.raises(ValueError, match=msg):
            run(a)



def test_toolkit_commands_refuse_an_ambiguous_link_before_any_work(tmp_path):
    """eetool plan / exits calibrate read the link first: '10m' is refused with both spellings before a
    model or bundle is loaded (the bundle here is an empty folder)."""
    from click.testing import CliRunner

    from toolkit.cli import main

    for argv in (["plan", "efficientnet-lite0", "--bandwidth", "1,10m"],
                 ["exits", "calibrate", str(tmp_path), "--board", "rpi4", "--bandwidth", "10m"]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 2 and "10Mbit (10 Mbit/s) or 10MB/s (80 Mbit/s)" in r.output, r.output

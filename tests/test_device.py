"""Device side against a real edge server process over loopback, on a real EfficientNet-Lite0 bundle."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from runtime import codec
from runtime.bench import start_server
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.client import EdgeClient
from runtime.device import DeviceRunner


@pytest.fixture(scope="module")
def server(effnet_bundle):
    out, _ = effnet_bundle
    proc, address = start_server(str(out), [])
    yield address
    proc.terminate()
    assert proc.wait(timeout=10) == 0  # SIGTERM is a clean shutdown


def _client(address, **kw):
    host, port = address.rsplit(":", 1)
    return EdgeClient(host, int(port), **kw)


def test_split_over_tcp_equals_local_chain(effnet_bundle, server, verify_images):
    bundle = Bundle.load(effnet_bundle[0])
    local = Chain(bundle, "all")
    exact = DeviceRunner(bundle, _client(server), wire_dtype="float32")
    quant = DeviceRunner(bundle, _client(server, codec="lz4"))
    tail = Chain(bundle, "server")
    q = bundle.tensor("blocks.5").quant
    agree = 0
    n = min(8, len(verify_images))  # 5 photos on a fresh clone, 16 ImageNet samples beside the repo
    assert n >= 5
    for i in range(n):
        x = verify_images.x[i:i + 1]
        values = local.run_segments({"input": x})
        r = exact.infer(x)
        assert r.where == "server" and r.exit is None
        assert r.top1 == int(values["logits"][0].argmax())
        assert np.abs(r.logits - values["logits"][0]).max() < 1e-3
        # int8 wire: the server's answer equals the tail on the same quantised-dequantised feature
        rq = quant.infer(x)
        deq = codec.dequantize(codec.quantize(values["blocks.5"], q.scale, q.zero_point, "int8"), q.scale, q.zero_point)
        ref = tail.run_segments({"blocks.5": deq})["logits"][0]
        assert np.abs(rq.logits - ref).max() < 1e-3
        assert 0 < rq.bytes_sent < r.bytes_sent / 3  # int8 frame vs the float32 frame of the same feature
        assert {"seg0", "quantize", "encode", "network", "server_tail"} <= set(rq.ms)
        agree += rq.top1 == r.top1
    assert agree >= n - 1


def test_unreachable_server_degrades_to_local_tail(effnet_bundle, verify_images):
    bundle = Bundle.load(effnet_bundle[0])
    runner = DeviceRunner(bundle, EdgeClient("127.0.0.1", 1, timeout_s=0.5), local_tail=True)
    r = runner.infer(verify_images.x[:1])
    assert r.where == "degraded" and "ServerUnavailable" in r.error
    ref = Chain(bundle, "all").run_segments({"input": verify_images.x[:1]})["logits"][0]
    assert r.top1 == int(ref.argmax())
    with pytest.raises(RuntimeError, match="no exit or local tail"):
        DeviceRunner(bundle, EdgeClient("127.0.0.1", 1, timeout_s=0.5)).infer(verify_images.x[:1])


def test_runtime_cli_run_json(effnet_bundle, server):
    out, _ = effnet_bundle
    samples = sorted(str(p) for p in (out / "samples").iterdir())[:2]
    proc = subprocess.run([sys.executable, "-m", "runtime", "run", str(out), "--server", server, "--json"] + samples,
                          capture_output=True, text=True, timeout=120, cwd=str(out))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] == "onnx" and info["machine"] and len(info["results"]) == 2
    assert all(r["where"] == "server" and r["bytes_sent"] > 0 for r in info["results"])


def test_bench_report(effnet_bundle, server, tmp_path):
    out, _ = effnet_bundle
    proc = subprocess.run([sys.executable, "-m", "runtime", "bench", str(out), "--board", "host", "--server", server,
                           "--repeat", "1", "--warmup", "1", "--bandwidths", "1mbit,100mbit", "--profile-runs", "3",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    # per-layer profile of the whole model on this board, in the format eetool plan --measurements reads
    from runtime.profile_layers import load_profile
    from toolkit.layer_latency import cumulative_for_rows, load_measurements

    prof = load_profile(tmp_path / "layers.json")
    assert report["layer_profile"]["file"] == "layers.json" and prof["board"] == "host"
    assert 0 < prof["cumulative_ms"]["blocks.2"] < prof["cumulative_ms"]["blocks.5"] <= prof["total_ms"] * (1 + 1e-9)
    fed = load_measurements(tmp_path)  # the bench folder itself is accepted
    assert fed["cumulative_ms"] == prof["cumulative_ms"] and "measured on host" in fed["label"]
    assert prof["model_source"] == "efficientnet-lite0" and prof["input_shape"] == [1, 3, 224, 224]
    rows = [{"name": "blocks.2", "aliases": []}, {"name": "blocks.5", "aliases": []}]
    assert [ms for ms, _ in cumulative_for_rows(fed, rows)] == [prof["cumulative_ms"]["blocks.2"],
                                                                prof["cumulative_ms"]["blocks.5"]]
    # ground truth travels with the bundle's samples when the export data had labels
    samples = Bundle.load(out).manifest.samples
    labels = samples.labels if samples else None
    assert report["labelled_inputs"] == (len(labels) if labels else 0)
    for m in report["comparison"]["modes"].values():
        assert ("top1_accuracy" in m) == bool(labels)
        if labels:
            assert m["top1_accuracy"] == pytest.approx(np.mean([
                t == labels[name] for t, name in zip(m["top1"], sorted(labels))]))
    assert report["energy"]["label"] in ("estimated", "measured")
    assert report["energy"]["estimated"] == (report["energy"]["label"] == "estimated")
    assert {"seg0", "network", "server_tail", "total"} <= set(report["stages_ms"])
    assert [row["mbps"] for row in report["bandwidth_sweep"]] == [1.0, 100.0]
    assert [row["bandwidth"] for row in report["bandwidth_sweep"]] == ["1 Mbit/s", "100 Mbit/s"]
    o = report["runtime_vs_bare_onnxruntime"]
    assert o["pairs"] == report["inputs"] == len(o["pairs_ms"])  # --repeat 1: one interleaved pair per input
    assert o["overhead_ratio"] == pytest.approx(np.median([a / b for a, b in o["pairs_ms"]]), rel=1e-3)
    assert o["allow_spinning"] is False and o["threads"] == report["threads"]
    # CPU time next to latency: the run's and every mode's; host's profile turns spinning off
    assert report["allow_spinning"] is False and report["cpu_ms_per_inference"] > 0
    assert all(m["cpu_ms_per_inference"] > 0 for m in report["comparison"]["modes"].values())
    md = (tmp_path / "report.md").read_text()
    assert "CPU time %.2f ms per inference" % report["cpu_ms_per_inference"] in md and "spinning off" in md
    assert "%d interleaved pairs: median ratio %.3f" % (o["pairs"], o["overhead_ratio"]) in md
    assert (tmp_path / "report.md").read_text().startswith("# eetool bench")
    assert (tmp_path / "latency_breakdown.png").stat().st_size > 1000
    assert set(report["graph_latency"]) == {"onnx/fp32@1", "onnx/fp32@2"}
    assert any("input file" in f for f in report["findings"]) and "## Findings" in (tmp_path / "report.md").read_text()
    assert set(report["graph_latency"]["onnx/fp32@1"]) == {"seg0", "seg1"}
    modes = report["comparison"]["modes"]
    assert set(modes) == {"LC", "EC", "SC"}  # no exits in this bundle
    assert modes["LC"]["bytes_per_sample"] == 0 < modes["SC"]["bytes_per_sample"] < modes["EC"]["bytes_per_sample"]
    assert modes["SC"]["top1_agreement_with_LC"] >= 0.5 and (tmp_path / "comparison.png").is_file()
    segs = Bundle.load(out).segments
    assert modes["LC"]["device_mflops"] == pytest.approx(sum(sg.mflops for sg in segs))
    assert modes["SC"]["device_mflops"] == pytest.approx(segs[0].mflops) and modes["EC"]["device_mflops"] == 0


def test_device_side_runs_on_python38_with_only_numpy_and_onnxruntime(effnet_bundle, server):
    """JetPack 5 ships Python 3.8: the bundle's own runtime copy runs there (3.8 venv with numpy 1.24 and
    onnxruntime 1.19, no torch) and answers like the 3.11 device side."""
    import os
    from pathlib import Path

    py38 = Path(os.environ.get("EETOOL_PY38_VENV", Path(__file__).resolve().parents[1] / "build" / "py38")) / "bin" / "python"
    have38 = py38.exists()
    if not have38:
        assert os.environ.get("CI") != "true", ".ci/run must create the 3.8 venv"
        import warnings

        warnings.warn(f"no Python 3.8 venv at {py38}: ran the 3.11 device side only (see .ci/run)")
        py38 = Path(sys.executable)
    out, _ = effnet_bundle
    samples = sorted(str(p) for p in (out / "samples").iterdir())[:2]
    cmd = ["-m", "runtime", "run", ".", "--server", server, "--json"] + samples
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    old = subprocess.run([str(py38)] + cmd, capture_output=True, text=True, timeout=120, cwd=str(out), env=env)
    assert old.returncode == 0, old.stderr
    new = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, timeout=120, cwd=str(out), env=env)
    a, b = json.loads(old.stdout), json.loads(new.stdout)
    assert [r["top1"] for r in a["results"]] == [r["top1"] for r in b["results"]]
    if have38:
        assert a["python"].startswith("3.8")


def test_bench_inputs_leave_out_calibration_samples(effnet_bundle, calib_images, verify_images):
    """Accuracy is never measured on the images the bundle was calibrated on: a folder or file list that
    holds them loses them (and says so), unless asked; --max-inputs spreads over the rest."""
    from argparse import Namespace

    from runtime.bench import select_inputs

    bundle = Bundle.load(effnet_bundle[0])
    calib = set(bundle.manifest.calibration.names)
    files = [str(f) for f in calib_images.files + verify_images.files]
    args = Namespace(inputs=files, include_calibration=False, max_inputs=None)
    others = [f for f in files if f.rsplit("/", 1)[-1] not in calib]
    if not others:  # a fresh clone: the built-in photos are all calibration samples
        with pytest.raises(ValueError, match="calibration samples"):
            select_inputs(args, bundle)
        return
    kept, note = select_inputs(args, bundle)
    assert kept == others and "%d calibration samples left out" % (len(files) - len(others)) in note
    args.include_calibration = True
    assert select_inputs(args, bundle)[0] == files
    args.max_inputs = 3
    kept, note = select_inputs(args, bundle)
    positions = [files.index(f) for f in kept]
    assert len(kept) == 3 and positions == sorted(positions) and kept[0] == files[0] and kept[-1] == files[-1]
    assert "3 spread evenly" in note


def test_bench_keeps_own_samples_that_are_all_calibration_images(effnet_bundle):
    """A bundle exported from a source too small for anything else (scikit-image's 5 photos) carries its
    calibration images as samples: bench measures on them and flags the accuracy as optimistic."""
    from argparse import Namespace

    from runtime.bench import select_inputs

    bundle = Bundle.load(effnet_bundle[0])
    args = Namespace(inputs=None, include_calibration=False, max_inputs=None)
    own = sorted(p.name for p in (bundle.root / "samples").iterdir())
    bundle.manifest.calibration.names = own
    kept, note = select_inputs(args, bundle)
    assert [k.rsplit("/", 1)[-1] for k in kept] == own and "optimistic" in note


def test_layer_profile_failure_leaves_the_report_standing(effnet_bundle, tmp_path, monkeypatch):
    """A board that cannot profile (no onnxruntime beside LiteRT) gets the reason in the report, not a crash;
    a bundle without the profile graph says how it was exported."""
    from argparse import Namespace

    from runtime import profile_layers
    from runtime.bench import layer_profile

    bundle = Bundle.load(effnet_bundle[0])
    args = Namespace(profile_runs=1, warmup=0, threads=1)

    def no_ort(*a, **k):
        raise profile_layers.ProfileError("onnxruntime is not installed: pip install onnxruntime")

    monkeypatch.setattr(profile_layers, "profile_onnx", no_ort)
    got = layer_profile(args, bundle, {"name": "rpi4"}, [], [], tmp_path)
    assert got == {"skipped": "onnxruntime is not installed: pip install onnxruntime"}
    assert not (tmp_path / "layers.json").exists()
    bundle.manifest.layer_profile_graph = None
    assert "--no-profile-graph" in layer_profile(args, bundle, {"name": "rpi4"}, [], [], tmp_path)["skipped"]


def test_edge_computing_server_decodes_image_files(effnet_bundle, verify_images):
    """EC as deployed: the device sends its JPEG/PNG file as it is, the server decodes it with the manifest's
    preprocessing and runs the whole model; a file that is not an image gets an error reply and the server
    keeps serving."""
    from runtime.client import ServerError
    from runtime.preprocess import load_image

    out, _ = effnet_bundle
    bundle = Bundle.load(out)
    local = Chain(bundle, "all")
    proc, address = start_server(str(out), ["--whole-model", "--input-file"])
    try:
        client = _client(address, codec="none")
        files = verify_images.files[:3]
        for f in files:
            data = open(f, "rb").read()
            reply = client.infer({"file": np.frombuffer(data, np.uint8)}, {})
            want = local.run_segments({"input": load_image(f, bundle.manifest.preprocess)[None]})["logits"]
            assert reply.bytes_sent > len(data) and np.abs(reply.logits - want).max() < 1e-4
        with pytest.raises(ServerError, match="request file"):
            client.infer({"file": np.frombuffer(b"not an image at all", np.uint8)}, {})
        with pytest.raises(ServerError, match="wrong_inputs"):
            client.infer({"input": np.zeros((1, 3, 224, 224), np.float32)}, {})
        with pytest.raises(ServerError, match="wrong_dtype"):
            client.infer({"file": np.zeros(16, np.float32)}, {})
        reply = client.infer({"file": np.frombuffer(open(files[0], "rb").read(), np.uint8)}, {})
        assert reply.logits.shape == (1, 1000)  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bench_refuses_bad_counts_and_clears_stale_outputs(effnet_bundle, tmp_path):
    """Counts below 1 are refused with the option named; a rerun into the same folder that does not
    profile leaves no layers.json from before (plan would read it as this run's)."""
    out, _ = effnet_bundle
    stale = tmp_path / "layers.json"
    stale.write_text("{}")
    for bad in (["--repeat", "0"], ["--max-inputs", "0"]):
        proc = subprocess.run([sys.executable, "-m", "runtime", "bench", str(out), "--out", str(tmp_path)] + bad,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "must be >= 1" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "runtime", "bench", str(out), "--board", "host", "--repeat", "1",
                           "--warmup", "0", "--bandwidths", "", "--no-compare", "--no-layer-profile",
                           "--max-inputs", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and json.loads((tmp_path / "report.json").read_text())["requests"] == 2


def _other_board():
    """A board profile whose architecture this machine does not have."""
    import platform

    return "rpi3" if platform.machine() in ("x86_64", "AMD64") else "host"


def test_bundle_make_bench_for_another_board_refuses_at_once(effnet_bundle, tmp_path):
    """The bundle's own `make bench BOARD=X` on a machine that is not an X: refused before any work, with
    what to run instead; FORCE_BOARD cannot make another CPU architecture the board."""
    import os

    board = _other_board()
    bundle, _ = effnet_bundle
    out = tmp_path / "report"
    env = dict(os.environ)
    env.pop("MAKEFLAGS", None)
    for force in ([], ["FORCE_BOARD=1"]):
        p = subprocess.run(["make", "-s", "bench", "BOARD=%s" % board, "PYTHON=%s" % sys.executable,
                            "ARGS=--out %s" % out] + force, cwd=str(bundle), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=120)
        assert p.returncode != 0 and "does not describe this machine" in p.stderr
        assert "scp -r %s" % bundle in p.stderr and "make bench BOARD=host" in p.stderr
        assert not out.exists()

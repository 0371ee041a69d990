"""The Exit Predictor on real Fashion-MNIST: training labels, its graphs in every format checked by value, the
runtime skipping exactly the gated branches, joint calibration against the runtime, latency-aware thresholds
in the manifest, and the model path (exits directory -> export)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from calibration.fashion_mnist import PREPROCESS
from calibration.readers import read_dataset
from runtime.adaptive import thresholds_for
from runtime.backends import open_session
from runtime.bundle import Bundle
from runtime.confidence import sigmoid
from runtime.device import DeviceRunner
from toolkit import exit_predictor as EP
from toolkit.exit_predictor_bundle import features_for, predictor_inputs
from toolkit.exits_bundle import calibrate_thresholds, manifest_gates, measure_early_exit, simulate_early_exit


def test_exit_labels_and_metrics_by_hand():
    conf = np.array([[0.95, 0.5, 0.2], [0.99, 0.9, 0.3]])  # (M=2, N=3)
    labels = EP.exit_labels(conf, [0.9, 0.85], "max_softmax")
    assert labels.tolist() == [[True, True], [False, True], [False, False]]
    assert EP.exit_labels(conf, [None, 0.85], "max_softmax")[:, 0].tolist() == [False, False, False]
    scores = np.array([[0.8, 0.2, 0.1], [0.7, 0.3, 0.2]])  # sample 1 wrongly routed past every exit
    m = EP.metrics(scores, labels, 0.5)
    assert m["hard_rate"] == pytest.approx(1 / 3) and m["hard_recall"] == 1.0
    assert m["easy_routed"] == 0.5 and m["hard_precision"] == 0.5
    assert m["exits"][1]["recall"] == 0.5
    with pytest.raises(ValueError, match="3 thresholds"):
        EP.exit_labels(conf, [0.9, 0.8, 0.7], "max_softmax")
    with pytest.raises(ValueError, match="nothing to predict"):
        EP.train_predictor(np.zeros((4, 1, 2, 2), np.float32), np.zeros((4, 1), bool), epochs=1)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def test_predictor_trained_on_bundle_ranks_its_labels(predictor_bundle):
    from runtime.confidence import confidence
    from toolkit.exit_predictor_bundle import model_tensors

    out, report, model, _, test = predictor_bundle
    assert report["input"] == "stage1" and report["exits"] == ["exit0", "exit1"]
    b = Bundle.load(out)
    assert report["input"] in predictor_inputs(b) and "stage2" not in predictor_inputs(b)
    assert 0 < report["mflops"] < sum(e.mflops for e in b.exits)
    feats, logits = model_tensors(b, test, "stage1")
    conf = np.stack([confidence(logits[n], "max_softmax") for n in report["exits"]])
    labels = EP.exit_labels(conf, report["label_thresholds"], "max_softmax")
    scores = EP.predict(model, feats)
    for m in range(2):  # on unseen test images, samples whose exit fires score higher than those whose does not
        assert _auc(scores[m], labels[:, m]) > 0.75
    h = report["holdout"]
    assert 0.0 < h["hard_rate"] < 1.0 and h["hard_recall"] > 0.3
    eff = report["effect"]
    # at the label thresholds, gating runs fewer branches
    assert sum(eff["with_predictor"]["branch_rates"]) < sum(eff["exits_alone"]["branch_rates"])


def test_predictor_graphs_match_pytorch_in_every_format(predictor_bundle):
    out, report, model, _, test = predictor_bundle
    b = Bundle.load(out)
    spec = b.predictor
    assert set(spec.graphs) == {"onnx/fp32", "onnx/int8", "tflite/fp32", "tflite/int8"}
    ver = json.loads((out / "report.json").read_text())["predictor"]["verification"]
    assert set(ver) == set(spec.graphs)
    # independently of the export's own check: each graph, bound by name, on other real inputs
    x = features_for(b, test.subset(np.arange(200, 328)), spec.input)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for pair, key in spec.graphs.items():
        g = b.graph(key)
        got = open_session(b.graph_path(key), g.format, None, g.name_map).run({spec.input: x})[spec.output]
        agree = ((sigmoid(got) >= 0.5) == (sigmoid(ref) >= 0.5)).mean()
        if pair.endswith("fp32"):
            assert np.abs(got - ref).max() <= 1e-4 * np.ptp(ref) and agree == 1.0
            assert ver[pair]["rel_diff"] <= 1e-4
        else:
            assert agree >= 0.9 and np.abs(sigmoid(got) - sigmoid(ref)).max() < 0.2


@pytest.mark.parametrize("pair", ["onnx/int8", "tflite/int8"])
def test_runtime_skips_exactly_the_gated_branches(predictor_bundle, pair):
    out, _, _, _, test = predictor_bundle
    b = Bundle.load(out)
    fmt, precision = pair.split("/")
    runner = DeviceRunner(b, None, fmt, precision, local_tail=True, thresholds={"exit0": 0.9, "exit1": 0.9},
                          gates={"exit0": 0.5, "exit1": 0.5})
    skipped = 0
    for i in range(120):
        r = runner.infer(test.x[i:i + 1])
        assert set(r.predictor) == {"exit0", "exit1"} and "predictor" in r.ms
        for name in ("exit0", "exit1"):
            reached = name == "exit0" or r.exit != "exit0"
            ran = reached and r.predictor[name] >= 0.5
            assert (name in r.ms) == ran and (name in r.confidences) == ran
            skipped += reached and not ran
        assert r.to_json()["prediction_thresholds"] == {"exit0": 0.5, "exit1": 0.5}
    assert skipped > 0
    plain = DeviceRunner(b, None, fmt, precision, local_tail=True, predictor=False)
    r = plain.infer(test.x[:1])
    assert "predictor" not in r.ms and r.gates is None


def test_joint_calibration_runtime_matches_simulation(predictor_bundle, tmp_path):
    src, _, _, val, test = predictor_bundle
    out = tmp_path / "b"
    shutil.copytree(src, out)
    bb = sum(s.mflops for s in Bundle.load(out).segments)
    res = calibrate_thresholds(out, val, budget_mflops=0.45 * bb)
    b = Bundle.load(out)  # checksums refreshed
    for pair, r in res.items():
        assert r["expected_mflops"] <= 0.45 * bb + 1e-9
        stored = b.predictor.thresholds[pair]
        assert (stored is None) == (r["prediction_thresholds"] is None)
        assert manifest_gates(b, pair) == r["prediction_thresholds"]
    for pair in ("onnx/int8", "tflite/int8"):
        fmt, precision = pair.split("/")
        got = measure_early_exit(b, test, fmt, precision)
        sim = simulate_early_exit(b, test, fmt, precision)
        assert abs(got["accuracy"] - sim["accuracy"]) <= 0.005
        assert got["mflops_per_sample"] == pytest.approx(sim["mflops_per_sample"], rel=0.01)
        for k, v in sim["exit_rates"].items():
            assert abs(got["exit_rates"].get(k, 0.0) - v) <= 0.005


def test_latency_adaptation_in_manifest_drives_the_runtime(adaptive_bundle):
    out, test = adaptive_bundle
    b = Bundle.load(out)
    la = b.manifest.latency_adaptation
    reg = la.models["onnx/int8"].to_json()
    assert la.budget_ms == 5.0 and la.board == "rpi4" and reg["budget_met"]
    assert all(f["expected_ms"] <= 5.0 + 1e-9 for f in reg["fit"])
    offloaded = []
    for bw in (1.0, 5.0, 20.0):
        runner = DeviceRunner(b, None, "onnx", "int8", local_tail=True, adaptive=True, bandwidth_mbps=bw)
        rows = [runner.infer(test.x[i:i + 1]) for i in range(150)]
        th, gates = thresholds_for(reg, bw)
        assert all(r.thresholds == th and r.bandwidth_mbps == bw for r in rows)
        offloaded.append(np.mean([r.exit is None for r in rows]))
    assert offloaded[0] < offloaded[-1]  # a slow link keeps more samples on the device
    with pytest.raises(ValueError, match="latency adaptation"):
        DeviceRunner(b, None, "tflite", "int8", adaptive=True, bandwidth_mbps=1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        DeviceRunner(b, None, "onnx", "int8", adaptive=True)


def test_model_path_trains_beside_the_exits(tmp_path):
    from toolkit.exit_predictor_model import train_on_model
    from toolkit.exits import EarlyExitModel, build_exits, save_exits
    from toolkit.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    data = read_dataset("fashion-mnist:train", PREPROCESS, limit=600)
    backbone = SmallCNN().eval()
    ee = EarlyExitModel(backbone, build_exits(backbone, ["stage1", "stage2"], torch.from_numpy(data.x[:2])))
    save_exits(tmp_path, ee, {})
    with pytest.raises(ValueError, match="calibration.json"):
        train_on_model(backbone, tmp_path, data)
    from toolkit.exits import collect_logits
    from runtime.confidence import max_softmax

    logits = collect_logits(ee, data.x)
    th = [float(np.median(max_softmax(logits[c]))) for c in ("stage1", "stage2")]  # half the samples "exit"
    model, report = train_on_model(backbone, tmp_path, data, thresholds=th, epochs=1)
    assert report["input"] == "stage1" and report["exits"] == ["exit0", "exit1"]
    EP.save_predictor(tmp_path, model, report)
    again, meta = EP.load_predictor(tmp_path)
    x = torch.randn(3, 16, 14, 14)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert meta["label_thresholds"] == th
    with pytest.raises(ValueError, match="before the first exit"):
        train_on_model(backbone, tmp_path, data, at="stage3", thresholds=th)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def exchange_ms(nbytes: float, mbps: float, rtt_ms: float) -> float:
    return rtt_ms + nbytes * 8 / (mbps * 1e3)


class FakeShaper:
    def __init__(self, mbps):
        self.bandwidth_mbps = mbps


class ModelClient:
    """Stands in for EdgeClient: answers with the logits of a local tail and exchange times from the link
    model (rate ``shaper.bandwidth_mbps``, round trip ``rtt_ms``), advancing the injected clock."""

    def __init__(self, tail, clock, rtt_ms):
        self.tail, self.clock, self.rtt_ms = tail, clock, rtt_ms
        self.shaper = FakeShaper(1.0)
        self.last_ping_bytes = 0
        self.pings = 0

    def _ms(self, nbytes):
        ms = exchange_ms(nbytes, self.shaper.bandwidth_mbps, self.rtt_ms)
        self.clock.t += ms / 1e3
        return ms

    def ping(self, pad_bytes=0):
        self.pings += 1
        self.last_ping_bytes = 60 + pad_bytes
        return self._ms(self.last_ping_bytes)

    def infer(self, tensors, quant):
        from runtime import codec
        from runtime.client import Reply

        name = next(iter(tensors))
        x = codec.dequantize(tensors[name], quant[name]["scale"], quant[name]["zero_point"])
        logits = self.tail.run_segments({name: x})["logits"]
        sent = 40 + tensors[name].nbytes
        ms = self._ms(sent + 100)
        return Reply(1, logits, np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32), 0.0, ms, 0.0, sent, 100)


def test_runner_thresholds_follow_the_link(adaptive_bundle):
    """Adaptive mode end to end, without sockets: the estimate tracks the emulated rate after a change, and
    every request's thresholds are the regression's at the estimate it records."""
    from runtime.bandwidth import BandwidthEstimator
    from runtime.chain import Chain

    out, test = adaptive_bundle
    bundle = Bundle.load(out)
    reg = bundle.manifest.latency_adaptation.models["onnx/int8"].to_json()
    clock = Clock()
    client = ModelClient(Chain(bundle, "server", "onnx", "int8", with_exits=False), clock,
                         bundle.manifest.latency_adaptation.rtt_ms)
    est = BandwidthEstimator(window=6, idle_s=0.5, clock=clock)
    runner = DeviceRunner(bundle, client, "onnx", "int8", adaptive=True, estimator=est)
    phases = []
    for mbps in (1.0, 20.0):
        client.shaper.bandwidth_mbps = mbps
        rows = [runner.infer(test.x[i:i + 1]) for i in range(60)]
        phases.append(rows)
        for r in rows:
            th, gates = thresholds_for(reg, r.bandwidth_mbps)
            assert r.thresholds == th
    assert client.pings >= 2  # the first request found no measurement and probed
    last1 = [r.bandwidth_mbps for r in phases[0][-10:]]
    last2 = [r.bandwidth_mbps for r in phases[1][-10:]]
    assert np.median(last1) == pytest.approx(1.0, rel=0.1)
    assert np.median(last2) == pytest.approx(20.0, rel=0.1)
    off1 = np.mean([r.where == "server" for r in phases[0][-30:]])
    off2 = np.mean([r.where == "server" for r in phases[1][-30:]])
    assert off2 > off1  # a faster link: more samples go to the server
    assert phases[0][-1].thresholds != phases[1][-1].thresholds
    assert all(r.to_json()["bandwidth_estimate_mbps"] > 0 for r in phases[1])


def test_adaptive_link_over_a_real_server(adaptive_bundle):
    """The bench's adaptive run (runtime.bench.adaptive_link): a real edge server over TCP, the shaper switched
    from 1 to 20 Mbit/s mid-run. The device's estimate rises with the emulated rate, every request's
    thresholds are the regression's at the estimate it recorded, and the fast phase offloads more. (Exact
    tracking is tested with a fake clock above; here a 2 ms round trip and scheduling jitter on a loaded
    machine move a ~0.5 ms transfer by tens of percent, so the bounds are loose.)"""
    from runtime.bench import adaptive_link, start_server

    out, test = adaptive_bundle
    bundle = Bundle.load(out)
    reg = bundle.manifest.latency_adaptation.models["onnx/int8"].to_json()
    names = [e.name for e in bundle.exits]
    proc, address = start_server(str(out), [])
    try:
        r = adaptive_link(bundle, address, "onnx", "int8", "1mbit:40,20mbit:40",
                          [test.x[i:i + 1] for i in range(80)], threads=1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    slow, fast = r["phases"]
    assert 0.5 <= slow["estimate_mbps"] <= 2.0
    assert fast["estimate_mbps"] > 5 * slow["estimate_mbps"]
    checked = 0
    for row in r["trace"]:
        if row["estimate_mbps"] is not None:
            th, _ = thresholds_for(reg, row["estimate_mbps"])
            assert row["thresholds"] == [th.get(n) for n in names]
            checked += 1
    assert checked >= 70
    assert fast["offloaded"] > slow["offloaded"]

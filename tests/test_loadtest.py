"""python -m runtime loadtest end to end on 127.0.0.1, kept short (2 client processes, 1 s per cell):
every reply is checked against the local tail, nothing is lost or wrong, both servers are measured, the
ceiling is measured in the same run, and the JSON / Markdown / plot are written. Throughput numbers are
not asserted (benchmarks, not tests)."""
import json
from types import SimpleNamespace

import numpy as np

from runtime.bundle import Bundle
from runtime.loadtest import prepare_requests, run_loadtest, summarize, targets


def test_prepare_requests_are_what_a_device_sends(effnet_bundle):
    bundle = Bundle.load(effnet_bundle[0])
    req = prepare_requests(bundle, "onnx", "fp32", limit=2, threads=1)
    name = bundle.wire_tensors[0]
    assert len(req["tensors"]) == len(req["reference"]) >= 1
    t = req["tensors"][0][name]
    assert t.dtype == np.int8 and t.shape[0] == 1 and list(t.shape[1:]) == list(bundle.tensor(name).shape[1:])
    assert req["quant"][name]["scale"] == bundle.tensor(name).quant.scale
    assert req["reference"][0].shape == (1, 1000)


def test_summarize_counts_and_percentiles():
    res = [{"sent": 3, "ok": 2, "wrong": 1, "lost": 0, "retried": 0, "errors": {"busy": 1}, "latency_ms": [1.0, 2.0, 3.0],
            "batches": [1, 3]},
           {"sent": 2, "ok": 1, "wrong": 0, "lost": 1, "retried": 1, "errors": {}, "latency_ms": [4.0]}]
    s = summarize(res, 2.0)
    assert (s["sent"], s["replies"], s["ok"], s["wrong"], s["lost"], s["retried"]) == (5, 4, 3, 1, 1, 1)
    assert s["errors"] == {"busy": 1} and s["req_per_s"] == 2.0 and s["p50_ms"] == 2.5 and s["mean_batch"] == 2.0


def test_loadtest_command_end_to_end(effnet_bundle, tmp_path):
    out = tmp_path / "lt"
    args = SimpleNamespace(bundle=str(effnet_bundle[0]), server=None, clients="1,2", duration=2.0, rounds=2,
                           max_requests=200, timeout=30.0, no_baseline=False, serve_args="--threads 1",
                           backend="auto", precision="fp32", samples=3, ceiling_seconds=0.3, ceiling_batches="1,2",
                           secret=None, out=str(out), json=False)
    assert run_loadtest(args) == 0
    r = json.loads((out / "loadtest.json").read_text())
    assert [lv["clients"] for lv in r["levels"]] == [1, 2]
    for lv in r["levels"]:
        for label in ("batching", "no batching"):
            c = lv[label]
            assert c["clients"] == lv["clients"] and c["replies"] > 0 and c["replies"] == c["ok"]
            assert c["wrong"] == 0 and c["lost"] == 0 and c["errors"] == {}
    assert r["levels"][0]["batching"]["mean_batch"] == 1.0  # a lone device runs alone
    assert r["servers"]["batching"]["plan"]["batching"] and not r["servers"]["no batching"]["plan"]["batching"]
    assert r["servers"]["batching"]["plan"]["threads"] == 1  # --serve-args reached the server
    pts = r["ceiling"]["points"]
    assert {p["batch"] for p in pts} == {1, 2} and r["ceiling"]["best"] in pts
    t = r["targets"]
    assert t["wrong_answers"] == 0 and t["lost_replies"] == 0
    assert set(t) >= {"throughput_vs_ceiling", "p99_over_p50", "lone_device_p50_vs_no_batching"}
    assert t == targets(r)
    md = (out / "loadtest.md").read_text()
    assert "| serve (batching) | 2 |" in md and "Ceiling" in md and "max-batch" in md
    assert (out / "loadtest.png").stat().st_size > 1000

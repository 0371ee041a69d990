"""python -m runtime loadtest end to end on 127.0.0.1, kept short (2 client processes, 1 s per cell):
every reply is checked against the local tail, nothing is lost or wrong, both servers are measured, the
in-process cells (bare batched ceiling, bare batch-1 tail) run in the same rounds with the server's
sessions and answer what the server answers, and the JSON / Markdown / plot are written. Throughput
numbers are not asserted (benchmarks, not tests)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.client import EdgeClient
from runtime.loadtest import (bare_batches, bare_cell, inprocess_config, prepare_requests, run_loadtest, start_server,
                              stop_server, summarize, targets)


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


def test_bare_batches_concatenate_requests_in_turn():
    feeds = [{"x": np.full((1, 2), i, np.float32)} for i in range(3)]
    got = bare_batches(feeds, 2)
    assert [idx for _, idx in got] == [[0, 1], [1, 2], [2, 0]]  # every request in every row position here
    for f, idx in got:
        assert f["x"].shape == (2, 2) and list(f["x"][:, 0]) == idx
    assert len(bare_batches(feeds * 10, 4, max_rows=32)) == 8 and len(bare_batches(feeds, 64, max_rows=32)) == 1


def test_inprocess_config_follows_the_server_plan():
    plan = {"workers": 2, "threads": 3, "max_batch": 8, "allow_spinning": False, "providers": ["CPUExecutionProvider"]}
    assert inprocess_config(plan, 16) == {"sessions": 2, "threads": 3, "batch": 8, "spinning": False,
                                          "providers": ["CPUExecutionProvider"]}
    ray = {"engine": "ray", "replicas": 3, "workers": 3, "threads": 1, "max_batch": 16}
    assert inprocess_config(ray, 4)["sessions"] == 3 and inprocess_config(ray, 4)["spinning"] is None
    assert inprocess_config({"workers": 1, "batching": False}, 4)["threads"] == 4  # no threads given: all cores


def test_bare_ceiling_answers_what_the_server_answers(effnet_bundle, tmp_path):
    """The ceiling cell runs the server's sessions on the real requests' tail inputs: each answer equals by
    value the server's reply to the same request, and every sample of every batch is counted and checked."""
    bundle = Bundle.load(effnet_bundle[0])
    req = prepare_requests(bundle, "onnx", "fp32", limit=3, threads=1)
    proc, addr, plan = start_server(str(bundle.root), ["--backend", "onnx", "--precision", "fp32", "--threads", "1",
                                                       "--max-batch", "2"], tmp_path / "serve.log")
    try:
        host, _, port = addr.rpartition(":")
        cli = EdgeClient(host, int(port), timeout_s=60)
        served = [cli.infer(t, req["quant"]).logits for t in req["tensors"]]
        cli.close()
    finally:
        stop_server(proc)
    cfg = inprocess_config(plan, 1)
    assert (cfg["sessions"], cfg["threads"], cfg["batch"], cfg["spinning"]) == (2, 1, 2, False)
    chains = [Chain(bundle, "server", "onnx", "fp32", cfg["threads"], with_exits=False, allow_spinning=cfg["spinning"])
              for _ in range(cfg["sessions"])]
    out_name = bundle.manifest.output.name
    batches = bare_batches(req["feeds"], cfg["batch"])
    c = bare_cell(chains, out_name, batches, req["reference"], 0.0, keep_answers=True, runs=3)
    assert c["runs"] == 2 * 3 and c["samples"] == 2 * 3 * cfg["batch"] == c["ok"] and c["wrong"] == 0
    assert len(c["latency_ms"]) == c["runs"] and c["seconds"] > 0
    assert sorted(c["answers"]) == [0, 1, 2]
    for k, logits in c["answers"].items():
        ref = served[k]
        assert logits.shape == ref.shape == (1, 1000) and int(logits.argmax()) == int(ref.argmax())
        np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-3 * (1 + float(np.abs(ref).max())))
    # the check is live: answers against other references are counted wrong, row by row
    wrong = bare_cell(chains[:1], out_name, bare_batches(req["feeds"], 1), [-r for r in req["reference"]], 0.0, runs=4)
    assert (wrong["samples"], wrong["ok"], wrong["wrong"]) == (4, 0, 4)


def test_targets_are_per_round_ratios_with_quartiles():
    def srv(rates, p50s, p99s):
        return {"req_per_s": float(np.mean(rates)), "p50_ms": float(np.mean(p50s)), "p99_ms": float(np.mean(p99s)),
                "wrong": 0, "lost": 0, "per_round": [{"req_per_s": a, "p50_ms": b, "p99_ms": c}
                                                     for a, b, c in zip(rates, p50s, p99s)]}

    r = {"rounds": 3, "levels": [
        {"clients": 1, "batching": srv([10, 10, 10], [10.0, 12.0, 20.0], [30, 30, 30]),
         "no batching": srv([9, 9, 9], [10.0, 10.0, 10.0], [30, 30, 30])},
        {"clients": 64, "batching": srv([80, 90, 50], [100.0, 100.0, 100.0], [200.0, 400.0, 250.0]),
         "no batching": srv([40, 40, 40], [300.0, 300.0, 300.0], [900, 900, 900])}],
         "ceiling": {"samples_per_s": 100.0, "wrong": 0, "per_round": [{"samples_per_s": 100.0}, {"samples_per_s": 100.0},
                                                                      {"samples_per_s": 50.0}]},
         "bare_batch1": {"p50_ms": 5.0, "wrong": 1, "per_round": [{"p50_ms": 5.0}, {"p50_ms": 6.0}, {"p50_ms": 10.0}]}}
    t = targets(r)
    x = t["throughput_vs_ceiling"]
    assert x["per_round"] == [0.8, 0.9, 1.0] and x["ratio"] == pytest.approx(0.9)
    assert (x["q25"], x["q75"]) == pytest.approx((0.85, 0.95))
    assert x["met"] and x["clients"] == 64
    y = t["p99_over_p50"]
    assert y["per_round"] == [2.0, 4.0, 2.5] and y["ratio"] == pytest.approx(2.5) and y["met"]
    z = t["lone_device_vs_batch1_path"]
    assert z["per_round"] == [1.0, 1.2, 2.0] and z["ratio"] == pytest.approx(1.2) and not z["met"]
    assert z["clients"] == 1
    w = t["lone_device_vs_bare_batch1"]
    assert w["per_round"] == [2.0, 2.0, 2.0] and w["target"] is None and "met" not in w
    assert t["wrong_answers"] == 1 and t["lost_replies"] == 0  # the in-process cells count too


def test_loadtest_command_end_to_end(effnet_bundle, tmp_path):
    out = tmp_path / "lt"
    args = SimpleNamespace(bundle=str(effnet_bundle[0]), server=None, clients="1,2", duration=2.0, rounds=2,
                           max_requests=200, timeout=30.0, no_baseline=False, serve_args="--threads 1", baseline_args="",
                           backend="auto", precision="fp32", samples=3, warmup=0.2, no_bare=False, sweep_seconds=0.3,
                           sweep_batches="1,2", secret=None, out=str(out), json=False)
    assert run_loadtest(args) == 0
    r = json.loads((out / "loadtest.json").read_text())
    assert [lv["clients"] for lv in r["levels"]] == [1, 2]
    for lv in r["levels"]:
        for label in ("batching", "no batching"):
            c = lv[label]
            assert c["clients"] == lv["clients"] and c["replies"] > 0 and c["replies"] == c["ok"]
            assert c["wrong"] == 0 and c["lost"] == 0 and c["errors"] == {}
            assert len(c["per_round"]) == 2 and sum(p["replies"] for p in c["per_round"]) == c["replies"]
    assert r["levels"][0]["batching"]["mean_batch"] == 1.0  # a lone device runs alone
    plan, base = r["servers"]["batching"]["plan"], r["servers"]["no batching"]["plan"]
    assert plan["batching"] and not base["batching"]
    assert plan["threads"] == 1  # --serve-args reached the server
    # the batch-1 path runs with a batching worker's session options
    assert (base["threads"], base["allow_spinning"]) == (plan["threads"], plan["allow_spinning"]) == (1, False)
    ceil, one = r["ceiling"], r["bare_batch1"]
    assert (ceil["sessions"], ceil["threads"], ceil["batch"], ceil["spinning"]) == (
        plan["workers"], plan["threads"], plan["max_batch"], plan["allow_spinning"])
    assert (one["sessions"], one["batch"]) == (1, 1)
    for c in (ceil, one):
        assert len(c["per_round"]) == 2 and c["samples"] > 0 and c["ok"] == c["samples"] and c["wrong"] == 0
        assert c["samples"] == c["runs"] * c["batch"]
    assert set(r["warmup"]) == {"batching", "no batching", "ceiling", "batch1"}
    assert len(r["load_average"]["cells_1min"]) == 2 * (2 * 2 + 2)  # rounds x (servers x client counts + 2 bare)
    pts = r["batch_sweep"]["points"]
    assert {p["batch"] for p in pts} >= {1, 2} and r["batch_sweep"]["best"] in pts
    t = r["targets"]
    assert t["wrong_answers"] == 0 and t["lost_replies"] == 0
    for key in ("throughput_vs_ceiling", "p99_over_p50", "lone_device_vs_batch1_path", "lone_device_vs_bare_batch1"):
        assert len(t[key]["per_round"]) == 2 and t[key]["q25"] <= t[key]["ratio"] <= t[key]["q75"]
    assert t == targets(r)
    md = (out / "loadtest.md").read_text()
    assert "| serve (batching) | 2 |" in md and "bare batched ceiling" in md and "max-batch" in md
    assert "median" in md and "Batch-size sweep" in md
    assert (out / "loadtest.png").stat().st_size > 1000

"""serve's machine defaults and GPU provider selection (run on the CPU: the selection logic, the errors a
machine without a usable GPU gets, and the real bundle's tail graphs accepting a batch dimension)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from runtime import providers as PV
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.serving import build_workers, choose_max_batch, fixed_batch_graphs, probe_batches, probe_sample

CPU, CUDA, TRT = PV.CPU, PV.CUDA, PV.TENSORRT


# ------------------------------------------------------------------ provider selection
def test_select_providers_cpu_and_cuda():
    assert PV.select_providers("cpu", available=[CPU]) == [CPU]
    assert PV.select_providers("cuda", available=[CUDA, CPU], tensorrt=False) == [CUDA, CPU]
    # TensorRT first only where its runtime is installed: onnxruntime-gpu lists it either way
    assert PV.select_providers("cuda", available=[TRT, CUDA, CPU], tensorrt=True) == [TRT, CUDA, CPU]
    assert PV.select_providers("cuda", available=[TRT, CUDA, CPU], tensorrt=False) == [CUDA, CPU]
    assert PV.select_providers("cpu", provider=CUDA, available=[CUDA, CPU]) == [CUDA, CPU]


def test_cuda_without_the_gpu_build_says_what_to_install():
    with pytest.raises(PV.ProviderError) as ei:
        PV.select_providers("cuda", available=["AzureExecutionProvider", CPU])
    msg = str(ei.value)
    assert "no CUDAExecutionProvider" in msg and "onnxruntime-gpu==" in msg and "Jetson" in msg and "JetPack" in msg
    with pytest.raises(PV.ProviderError, match="not in this onnxruntime build.*onnxruntime-gpu"):
        PV.select_providers("cpu", provider=TRT, available=[CPU])
    with pytest.raises(PV.ProviderError, match="expected one of cpu, cuda"):
        PV.select_providers("tpu", available=[CPU])


def test_a_gpu_provider_that_failed_to_load_is_an_error_not_a_cpu_fallback():
    with pytest.raises(PV.ProviderError, match="could not load CUDAExecutionProvider.*fell back to CPUExecutionProvider"):
        PV.check_session_providers([CUDA, CPU], [CPU], "seg1.onnx")
    assert PV.check_session_providers([TRT, CUDA, CPU], [CUDA, CPU], "seg1.onnx") == [TRT]  # CUDA still runs it
    assert PV.check_session_providers([CUDA, CPU], [CUDA, CPU], "seg1.onnx") == []


def test_real_session_asked_for_cuda_on_a_cpu_build_refuses(effnet_bundle):
    from runtime.backends import OrtSession

    import onnxruntime as ort

    bundle = Bundle.load(effnet_bundle[0])
    key = bundle.graph_key(bundle.server_segments[0], "onnx", "fp32")
    if CUDA in ort.get_available_providers():  # a GPU build: CUDA runs the graph, or its fallback is refused
        try:
            sess = OrtSession(bundle.graph_path(key), providers=[CUDA, CPU])
        except PV.ProviderError as e:
            assert "could not load CUDAExecutionProvider" in str(e)
        else:
            assert CUDA in sess.session.get_providers()
        return
    with pytest.raises(PV.ProviderError, match="could not load CUDAExecutionProvider"):
        OrtSession(bundle.graph_path(key), providers=[CUDA, CPU])


def test_serve_device_cuda_exits_with_the_install_hint(effnet_bundle, capsys, monkeypatch):
    from runtime.__main__ import main

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])  # what a CPU-only build offers
    assert main(["serve", str(effnet_bundle[0]), "--device", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "pip install onnxruntime-gpu" in err


def test_cpu_path_imports_no_gpu_package():
    code = ("import sys; sys.path.insert(0, '.'); from runtime import providers, serving, server, batching; "
            "providers.select_providers('cpu'); "
            "print([m for m in ('tensorrt', 'torch', 'cupy', 'pycuda') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "[]"


# ------------------------------------------------------------------ defaults
def test_choose_max_batch_and_probe_budget():
    assert choose_max_batch({1: 10.0, 2: 12.0, 4: 22.0, 8: 38.0, 16: 76.0}) == 8  # 4.75 ms/sample; batch 4: 5.5
    assert choose_max_batch({1: 10.0, 2: 20.0}) == 1
    calls = []

    def fake(feeds):
        b = len(feeds["x"])
        calls.append(b)
        time_ms = b * 40.0  # pretend: 40 ms per sample
        return time_ms

    out = probe_batches(fake, {"x": np.zeros((1, 3), np.float32)}, batches=(1, 2, 4, 8, 16, 32), budget_s=1e9)
    assert sorted(out) == [1, 2, 4, 8, 16, 32] and set(calls) == {1, 2, 4, 8, 16, 32}


def test_build_workers_defaults_from_the_machine(effnet_bundle):
    bundle = Bundle.load(effnet_bundle[0])
    sample = probe_sample(bundle, whole_model=False)
    assert list(sample) == bundle.wire_tensors and sample[bundle.wire_tensors[0]].shape[0] == 1
    chains, plan = build_workers(bundle, "server", "onnx", "fp32", sample=sample, cores=2)
    assert (plan.workers, plan.threads, len(chains)) == (2, 2, 2)
    assert chains[0] is not chains[1] and chains[0].segments[0][1] is not chains[1].segments[0][1]  # own sessions
    probed = sorted(plan.probe_ms)
    assert probed[:2] == [1, 2] and plan.max_batch == choose_max_batch(plan.probe_ms)
    assert plan.max_wait_ms == pytest.approx(min(20.0, max(0.2, plan.probe_ms[1] / 2)), abs=0.01)
    assert plan.max_queue >= 16 and plan.looped == []
    text = "\n".join(plan.reasons)
    for word in ("workers 2", "threads 2 per worker", "max-batch %d" % plan.max_batch, "max-wait-ms", "max-queue"):
        assert word in text
    json.dumps(plan.to_json())
    # given values are kept and not re-derived
    chains, plan = build_workers(bundle, "server", "onnx", "fp32", workers=1, threads=1, max_batch=4, max_wait_ms=1.5,
                                 max_queue=20, sample=sample)
    assert (plan.workers, plan.threads, plan.max_batch, plan.max_wait_ms, plan.max_queue) == (1, 1, 4, 1.5, 20)
    assert plan.reasons == [] and plan.probe_ms == {}
    with pytest.raises(ValueError, match="--workers 0"):
        build_workers(bundle, "server", "onnx", "fp32", workers=0)


def test_every_tail_graph_accepts_a_batch(effnet_bundle):
    """A batch of 3 through each server graph the bundle ships equals 3 runs at batch 1."""
    bundle = Bundle.load(effnet_bundle[0])
    x = np.random.default_rng(3).standard_normal([3] + list(bundle.tensor(bundle.wire_tensors[0]).shape[1:]))
    x = x.astype(np.float32)
    pairs = [p for p in bundle.formats() if p.startswith("onnx/")]
    assert pairs
    for pair in pairs:
        chain = Chain(bundle, "server", "onnx", pair.split("/")[1], 1, with_exits=False)
        assert fixed_batch_graphs(chain) == []
        name = bundle.wire_tensors[0]
        batched = chain.run_segments({name: x})["logits"]
        single = np.concatenate([chain.run_segments({name: x[i:i + 1]})["logits"] for i in range(3)])
        assert batched.shape == (3, single.shape[1])
        np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)

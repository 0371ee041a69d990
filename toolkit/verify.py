"""Verify a written bundle against the source model (PyTorch, or the whole ONNX model), through the runtime (so what is checked is what runs
on the board): every chain (format x precision) on real inputs at batch 1 and batch N, outputs bound by
name and compared by value.

Exit branches are checked the same way against the source model's own exit modules (PyTorch, on the same
inputs), not only against the final output: an exit graph that loads but computes something else fails.

Tolerances (fp32 graphs, final output and every exit): max |diff| <= 1e-4 x (output range) and 100 % top-1
agreement. int8 chains and exits are measured (agreement, cosine similarity, accuracy) and flagged below 95 %
agreement (:func:`warnings`), not failed.
"""
from __future__ import annotations

import numpy as np
import torch

from calibration.readers import Dataset
from runtime.bundle import Bundle
from runtime.chain import Chain

FP32_REL_TOL = 1e-4
INT8_MIN_AGREEMENT = 0.95
BATCH = 16


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Agreement of ``got`` with ``ref`` (both float32 (N, C) logits or (N, ...) features).

    ``max_abs_diff``, ``rel_diff`` (max |diff| / range of ``ref``), mean ``cosine`` similarity per sample,
    and ``top1_agreement`` (fraction, for 2-D outputs)."""
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    got = got.reshape(len(got), -1).astype(np.float64)
    diff = float(np.abs(ref - got).max())
    span = float(ref.max() - ref.min()) or 1.0
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    out = {"max_abs_diff": diff, "rel_diff": diff / span, "cosine": float(cos.mean())}
    out["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    return out


def _torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + BATCH])).numpy() for i in range(0, len(x), BATCH)])


def _chain_logits(chain: Chain, x: np.ndarray, batch: int) -> tuple[np.ndarray, dict]:
    inp, out = chain.bundle.manifest.input.name, chain.bundle.manifest.output.name
    finals, exits = [], {}
    for i in range(0, len(x), batch):
        values = chain.run_segments({inp: x[i:i + batch]})
        finals.append(values[out])
        for name, logits in chain.run_exits(values).items():
            exits.setdefault(name, []).append(logits)
    return np.concatenate(finals), {k: np.concatenate(v) for k, v in exits.items()}


def onnx_reference(path) -> "callable":
    """The whole ONNX model at ``path`` as the reference of a bundle sliced from it: float32 NCHW batch in,
    its single output out (onnxruntime, CPU)."""
    from runtime.backends import OrtSession

    sess = OrtSession(path)
    return lambda x: sess.run({sess.input_names[0]: x})[sess.output_names[0]]


def verify_bundle(path, model, data: Dataset, exit_refs: dict | None = None) -> dict:
    """Run every chain of the bundle at ``path`` on ``data`` and compare with ``model`` (a PyTorch module
    in eval mode, or for ONNX sources a function from a float32 batch to the output, see
    :func:`onnx_reference`); returns the ``verification`` section of report.json.

    ``exit_refs`` maps exit name -> the source's float32 ``(N, C)`` exit logits on ``data.x``; each chain's
    exit outputs are compared with them by value (``vs_source``). Without it exits are only compared with
    the final output."""
    bundle = Bundle.load(path)
    if isinstance(model, torch.nn.Module):
        ref = _torch_logits(model.eval(), data.x)
    else:
        ref = np.concatenate([model(data.x[i:i + BATCH]) for i in range(0, len(data.x), BATCH)])
    result: dict = {"samples": len(data), "source": data.source, "chains": {}}
    result["reference"] = "PyTorch model" if isinstance(model, torch.nn.Module) else "whole ONNX model"
    if data.y is not None:
        result["float_reference_top1"] = float((ref.argmax(1) == data.y).mean())
    for pair in bundle.formats():
        fmt, precision = pair.split("/")
        chain = Chain(bundle, "all", fmt, precision)
        got_n, exits = _chain_logits(chain, data.x, BATCH)
        got_1, _ = _chain_logits(chain, data.x[:4], 1)
        entry = {"batch_n": compare(ref, got_n), "batch_1": compare(ref[:4], got_1)}
        if data.y is not None:
            entry["top1"] = float((got_n.argmax(1) == data.y).mean())
        if exits:
            entry["exits"] = {k: {"top1_agreement_with_final": float((v.argmax(1) == ref.argmax(1)).mean()),
                                  **({"top1": float((v.argmax(1) == data.y).mean())} if data.y is not None else {}),
                                  **({"vs_source": compare(exit_refs[k], v)} if exit_refs and k in exit_refs else {})}
                              for k, v in exits.items()}
        result["chains"][pair] = entry
    return {"verification": result}


def failures(report: dict) -> list[str]:
    """Human-readable tolerance misses in a report (empty when every fp32 chain is exact enough)."""
    bad = []
    for pair, entry in report.get("verification", {}).get("chains", {}).items():
        for batch in ("batch_1", "batch_n"):
            c = entry[batch]
            if pair.endswith("fp32") and (c["rel_diff"] > FP32_REL_TOL or c["top1_agreement"] < 1.0):
                bad.append(f"{pair} {batch}: rel diff {c['rel_diff']:.2e} (tol {FP32_REL_TOL:g}), "
                           f"top-1 agreement {c['top1_agreement']:.1%}")
        for name, e in entry.get("exits", {}).items():
            c = e.get("vs_source")
            if c and pair.endswith("fp32") and (c["rel_diff"] > FP32_REL_TOL or c["top1_agreement"] < 1.0):
                bad.append(f"{pair} exit {name}: rel diff {c['rel_diff']:.2e} (tol {FP32_REL_TOL:g}), "
                           f"top-1 agreement {c['top1_agreement']:.1%} with the source's exit branch")
    return bad


def warnings(report: dict) -> list[str]:
    """int8 chains and exits whose top-1 agreement with the source is below ``INT8_MIN_AGREEMENT`` (a lossy
    graph is allowed, a broken one should be noticed: e.g. an exit whose every output saturates)."""
    low = []
    for pair, entry in report.get("verification", {}).get("chains", {}).items():
        if pair.endswith("fp32"):
            continue
        checks = [("", entry["batch_n"])] + [(f" exit {k}", e["vs_source"]) for k, e in entry.get("exits", {}).items()
                                              if "vs_source" in e]
        for what, c in checks:
            if c["top1_agreement"] < INT8_MIN_AGREEMENT:
                low.append(f"{pair}{what}: top-1 agreement with the source {c['top1_agreement']:.1%} "
                           f"(< {INT8_MIN_AGREEMENT:.0%})")
    return low

"""int8 kernel targets: which int8 ONNX graph runs fast *and* exact on which CPU, and which one this CPU is.

onnxruntime's CPU int8 kernels depend on the instruction set, as its quantisation guide documents
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html, sections "Data type
selection", "When and why do I need to try U8U8?" and the FAQ "When to use reduce-range and per-channel
quantization?"):

* x86-64 with AVX2 / AVX512 but **without VNNI**: U8S8 (uint8 activations, int8 weights) uses
  ``VPMADDUBSW``, whose 16-bit intermediate sums can saturate; the documented remedies are
  ``reduce_range`` (7-bit weights, "designed for the U8S8 format on AVX2 and AVX512 (non-VNNI)
  machines") or U8U8. U8U8 is exact but runs on slow kernels (measured on an x86 host: EfficientNet-Lite0
  head 34 ms int8 U8U8 vs 4.6 ms fp32, see ``bench/int8_recipe.py``), so this target gets U8S8 with
  ``reduce_range``.
* x86-64 **with VNNI** (AVX512-VNNI or AVX-VNNI): "There is no such issue on other CPU architectures
  (x64 with VNNI and ARM)" and reduce-range "is not needed on machines supporting VNNI": U8S8, 8-bit.
* ARM64: "U8S8 can be faster than U8U8 for low end ARM64 and no difference on accuracy": U8S8, 8-bit.

A bundle's int8 ONNX graph lists the targets it was made for (``targets``) and, where another target
needs another graph, the key of that graph (``variants``); :func:`choose_graph` picks for this CPU.
Python 3.8 compatible, standard library only (this module runs on the board).
"""
from __future__ import annotations

import os
import platform
from typing import Dict, Iterable, List, Optional

DOC = "https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html"

# target -> onnxruntime QDQ types (toolkit.quantize_onnx.QuantConfig fields)
TARGETS: Dict[str, Dict[str, object]] = {
    "arm64": {"activation_type": "uint8", "weight_type": "int8", "reduce_range": False},
    "x86-vnni": {"activation_type": "uint8", "weight_type": "int8", "reduce_range": False},
    "x86-avx2": {"activation_type": "uint8", "weight_type": "int8", "reduce_range": True},
}
DEFAULT_TARGETS = ("arm64", "x86-vnni", "x86-avx2")
ENV = "EETOOL_INT8_TARGET"  # overrides detection (e.g. to evaluate the x86-avx2 graphs on a VNNI host)


class TargetError(ValueError):
    """An unknown int8 target name; the message lists the known ones."""


def check_targets(names: Iterable[str]) -> List[str]:
    """Validate target names; returns them as a list. Raises :class:`TargetError` naming the valid ones."""
    names = list(names)
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise TargetError("unknown int8 target(s) %s; choose from %s" % (bad or names, ", ".join(TARGETS)))
    return names


def group_targets(names: Iterable[str]) -> List[List[str]]:
    """Targets that share one graph (same QDQ types), in the given order: arm64 and x86-vnni share one,
    x86-avx2 (7-bit weights) gets its own."""
    groups: List[List[str]] = []
    for n in check_targets(names):
        for g in groups:
            if TARGETS[g[0]] == TARGETS[n]:
                g.append(n)
                break
        else:
            groups.append([n])
    return groups


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_target(machine: Optional[str] = None, flags: Optional[set] = None) -> Optional[str]:
    """This CPU's int8 target: ``arm64``, ``x86-vnni``, ``x86-avx2``; ``None`` when unknown (other
    architectures, or x86 without AVX2). ``$EETOOL_INT8_TARGET`` overrides the detection."""
    forced = os.environ.get(ENV)
    if forced:
        return check_targets([forced])[0]
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    if machine in ("x86_64", "amd64"):
        flags = _cpu_flags() if flags is None else flags
        if flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"}:
            return "x86-vnni"
        if "avx2" in flags:
            return "x86-avx2"
    return None


def choose_graph(graphs: Dict[str, object], key: str, target: Optional[str]) -> str:
    """The graph key to run instead of ``key`` on ``target``: the variant the entry's ``variants`` names
    for it, else ``key`` itself (float graphs, TFLite graphs and bundles without variants). Entries are
    ``runtime.manifest.GraphEntry`` objects or their JSON dicts."""
    entry = graphs.get(key)
    variants = (entry.get("variants") if isinstance(entry, dict) else getattr(entry, "variants", None)) or {}
    if target in variants and variants[target] in graphs:
        return variants[target]
    return key

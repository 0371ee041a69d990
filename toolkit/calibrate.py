"""Real intermediate tensors for calibration, wire-tensor ranges (int8 or n-bit codes), and the quantisation of
every graph.

Graphs after the first are calibrated on the tensors that the *float* graphs before them produce on the
representative inputs — never on images or random data — so each graph sees the distribution it will
see at run time.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from runtime.backends import OrtSession
from runtime.manifest import GraphEntry, IOQuant, Manifest, WireQuant
from runtime.quant import QuantParams
from runtime.targets import DEFAULT_TARGETS, TARGETS, group_targets

BATCH = 16
# eetool's ONNX int8 recipe (QuantConfig fields on top of each target's types), the best post-training
# variant of bench/int8_recipe.py: MinMax ranges, per-channel weights, bias correction of weight rounding,
# then the empirical layer-by-layer pass (toolkit/bias_correction.py: correct_biases_sequential; on
# EfficientNet-Lite0 after blocks.5, all-int8 agreement 96.25 -> 97.25 % on held-out images, README)
RECIPE: dict = {"bias_correction": True, "sequential_bias_correction": True}
# on top of RECIPE for the graph that reads the image: its stem conv stays float (--int8-stem: int8 too).
# A one-layer-float ablation of 8 of EfficientNet-Lite0's 18 head convs (split after blocks.5, bench/
# int8_recipe.py --ablate head) ranked it first on the calibration images: int8 head + float tail agreement
# 96.00 -> 97.75 % there, 96.25 -> 97.75 % on the held-out images. It is 22 of the head's 251 MFLOPs.
IMAGE_GRAPH_RECIPE: dict = {"float_first_convs": 1}


def graph_inputs(out: Path, manifest: Manifest, x: np.ndarray, progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Run the float ONNX segments in order on ``x`` (float32 NCHW) and return, per graph key prefix
    (segment or exit name), its inputs by tensor name: ``{"seg1": {"blocks.5": (N, 80, 14, 14)}, ...}``."""
    from runtime.progress import progress as bar

    sessions = [(s, OrtSession(out / manifest.graphs[s.graphs["onnx/fp32"]].file)) for s in manifest.segments]
    collected: dict[str, list[np.ndarray]] = {}
    batches = range(0, len(x), BATCH)
    for start in bar(batches, "calibration tensors", "batch", enabled=progress):
        values = {manifest.input.name: x[start: start + BATCH]}
        for spec, sess in sessions:
            for name in spec.inputs:
                collected.setdefault(name, []).append(values[name])
            values.update(sess.run({n: values[n] for n in spec.inputs}))
    tensors = {k: np.concatenate(v) for k, v in collected.items()}
    return {o.name: {n: tensors[n] for n in o.inputs} for o in manifest.owners}


@dataclasses.dataclass(frozen=True)
class WireCodec:
    """How the device encodes split tensors: ``bits`` 2..8 (8 per tensor = int8 as before, the int8 head's
    own output encoding when the bundle has one), per-channel parameters along axis 1 or one pair per
    tensor, the range method of n-bit codes (``minmax``; ``mse``: the clipping range of least squared
    quantisation error; ``tail-kl``: the clipping range whose codes keep the tail's output closest to the
    float model's, :func:`tail_kl_alpha`; ``step``: the quantiser step ``step`` given in the feature's units,
    the zero point placed so the codes cover the observed range; ``budget``: the finest step whose frames
    average at most ``budget`` bytes over the representative set, :func:`budget_step`) and the entropy coder
    applied to the (bit-packed) codes.

    ``step`` and ``budget`` make an entropy-constrained scalar quantiser: one step for all values and as many
    levels as the data needs (``bits`` is only the code container; 8 leaves room), so the entropy coder, not
    the bit depth, sets the rate. At high rate a uniform quantiser followed by an ideal entropy coder is within
    0.255 bit per value of the rate-distortion bound (Gish & Pierce, IEEE Trans. Inf. Theory 1968).

    Raises ValueError for an unknown range method, a step that is not > 0, a budget below 1 byte, ``step`` /
    ``budget`` without their range method, or per-channel parameters with either."""

    bits: int = 8
    per_channel: bool = False
    range: str = "tail-kl"
    codec: str = "zstd"
    step: float | None = None
    budget: int | None = None

    def __post_init__(self):
        if self.range not in RANGE_METHODS:
            raise ValueError(f"wire range method must be one of {', '.join(RANGE_METHODS)}, got {self.range!r}")
        if (self.range == "step") != (self.step is not None) or (self.range == "budget") != (self.budget is not None):
            raise ValueError("give a step with range 'step' and a byte budget with range 'budget', and neither "
                             "with other range methods")
        if self.step is not None and not (math.isfinite(self.step) and self.step > 0):
            raise ValueError(f"the quantiser step must be a finite number > 0, got {self.step}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"the byte budget must be >= 1, got {self.budget}")
        if self.budget is not None and self.codec == "none":
            raise ValueError("a byte budget needs an entropy coder: without one every step sends the same bytes; "
                             "choose a wire codec (zstd, brotli, lz4)")
        if self.per_channel and self.range in ("step", "budget"):
            raise ValueError(f"a {self.range} quantiser uses one step for every channel; drop per-channel")

    @property
    def nbit(self) -> bool:
        """True when the wire carries n-bit codes (uint8, bit-packed) rather than int8 bytes."""
        return self.bits < 8 or self.per_channel or self.range in ("step", "budget")

    def label(self) -> str:
        """Short name of this operating point, e.g. ``4-bit per-tensor tail-kl + zstd``."""
        if not self.nbit:
            return f"int8 + {self.codec}"
        if self.range == "step":
            return f"step {self.step:g} ({self.bits}-bit codes) + {self.codec}"
        if self.range == "budget":
            return f"budget {self.budget} B ({self.bits}-bit codes) + {self.codec}"
        return f"{self.bits}-bit {'per-channel' if self.per_channel else 'per-tensor'} {self.range} + {self.codec}"


RANGE_METHODS = ("minmax", "mse", "tail-kl", "step", "budget")
TAIL_KL_ALPHAS = tuple(float(a) for a in np.round(np.linspace(1.0, 0.4, 13), 3))


def step_qparams(x: np.ndarray, bits: int, step: float) -> dict:
    """Per-tensor n-bit parameters of a quantiser with the given ``step`` (scale, in the units of ``x``, 4
    significant digits): the zero point makes 0.0 exact and centres the ``2**bits`` codes on the observed
    range ``[min(x, 0), max(x, 0)]``, which they hold when it spans at most ``2**bits - 1`` steps (else its
    ends clip). Centred 8-bit codes lie around 128, where brotli's signed-byte contexts fit them: 1-2 % fewer
    bytes than codes starting at 0 (EfficientNet-Lite0's KLT coefficients after blocks.5). Returns the
    :class:`runtime.quant.QuantParams` JSON, as :func:`nbit_qparams`. Raises ValueError for bits outside 2..8
    or a step that is not > 0."""
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"wire bits must be 2..8, got {bits}")
    if not step > 0:
        raise ValueError(f"the quantiser step must be > 0, got {step}")
    qmax = (1 << int(bits)) - 1
    scale = float(f"{float(step):.4g}")
    lo, hi = min(float(np.min(x)), 0.0), max(float(np.max(x)), 0.0)
    zp = np.round(qmax / 2 - (lo + hi) / (2 * scale))
    return QuantParams("uint8", scale, int(np.clip(zp, 0, qmax)), bits=int(bits)).to_json()


def step_bounds(x: np.ndarray, bits: int) -> tuple[float, float]:
    """``(finest, coarsest)`` useful steps for the values ``x`` with ``2**bits`` codes: below ``finest``
    (range / (2**bits - 1)) the codes no longer hold the observed range ``[min(x, 0), max(x, 0)]`` and its
    ends clip; above ``coarsest`` (range / 2) fewer than three levels are left."""
    span = (max(float(np.max(x)), 0.0) - min(float(np.min(x)), 0.0)) or 1.0
    return span / ((1 << int(bits)) - 1), span / 2


def check_step(name: str, x: np.ndarray, bits: int, step: float) -> None:
    """Refuse a user's quantiser ``step`` outside :func:`step_bounds` for the representative values ``x``,
    saying which steps work. Raises ValueError."""
    finest, coarsest = step_bounds(x, bits)
    if step < finest * (1 - 1e-3):
        raise ValueError(f"{name}: --wire-step {step:g} is finer than {bits}-bit codes can cover: the representative "
                         f"values span {finest * ((1 << int(bits)) - 1):.4g}, so steps below {finest:.4g} clip them; "
                         f"give a step of at least {finest:.4g}" + (" or more --wire-bits" if bits < 8 else ""))
    if step > coarsest:
        raise ValueError(f"{name}: --wire-step {step:g} is coarser than half the representative values' range "
                         f"({coarsest:.4g}): fewer than three levels would be left; give a step of at most {coarsest:.4g}")


def frame_bytes(name: str, x: np.ndarray, q: dict, codec: str) -> float:
    """Mean size in bytes of the REQUEST frames (prefix, JSON header and entropy-coded payload, as
    :func:`runtime.protocol.encode_request` builds them) that send each sample of ``x`` ``(N, ...)`` as tensor
    ``name`` with the n-bit parameters ``q`` and entropy coder ``codec``."""
    from runtime import protocol

    p = QuantParams.from_json(q)
    meta = {name: p.to_json()}
    return float(np.mean([len(protocol.encode_request(0, {name: p.quantize(x[i:i + 1])}, meta, codec=codec))
                          for i in range(len(x))]))


def budget_step(name: str, x: np.ndarray, bits: int, budget: int, codec: str, samples: int = 64,
                iters: int = 14) -> tuple[float, float]:
    """Rate control: the finest quantiser step (:func:`step_qparams`) whose frames (:func:`frame_bytes`) over
    the first ``samples`` representative values ``x`` ``(N, ...)`` average at most ``budget`` bytes (the zero
    point from all of ``x``), by bisection on log(step) between the finest step that clips nothing with
    ``bits`` and half the range (three levels); bytes fall as the step grows. Returns ``(step, mean frame
    bytes)``; a budget the finest step already meets returns that step. Raises ValueError when even three
    levels exceed the budget, saying how many bytes they take."""
    fine, coarse = step_bounds(x, bits)
    first = np.asarray(x[:samples], np.float32)

    def cost(step: float) -> tuple[float, float]:
        q = step_qparams(x, bits, step)
        return q["scale"], frame_bytes(name, first, q, codec)

    best = cost(fine)
    if best[1] <= budget:
        return best
    worst = cost(coarse)
    if worst[1] > budget:
        raise ValueError(f"{name}: --wire-budget {budget} bytes per frame is out of reach with {codec}: even three "
                         f"levels (step {worst[0]:.4g}) take {worst[1]:,.0f} bytes; raise the budget")
    a, b, best = np.log(fine), np.log(coarse), worst
    for _ in range(iters):
        mid = (a + b) / 2
        step, size = cost(float(np.exp(mid)))
        if size <= budget:
            b, best = mid, (step, size)
        else:
            a = mid
    return best


def nbit_qparams(x: np.ndarray, bits: int, per_channel: bool = False, method: str = "minmax",
                 max_values: int = 1 << 20, alpha: float = 1.0) -> dict:
    """n-bit affine parameters for the real values ``x`` (N, C, ...) (the split feature over the representative
    set): unsigned codes ``0..2**bits - 1``, the range widened to include 0 so that 0.0 is exact, per channel
    (axis 1) or per tensor. ``method``: ``minmax`` (the whole observed range, nothing clipped) or ``mse``
    (the range ``alpha * [lo, hi]``, alpha in 1.0..0.2, with the least mean squared quantisation error,
    found by grid search on at most ``max_values`` values per tensor / channel; cf. the MSE calibrators of
    TensorRT and onnxruntime); ``alpha`` < 1 shrinks the min/max range by that factor (``tail-kl`` picks it,
    :func:`tail_kl_alpha`). Scales keep 4 significant digits (they travel in every frame's header).

    Returns the :class:`runtime.quant.QuantParams` JSON ``{"dtype": "uint8", "scale", "zero_point", "bits"[,
    "axis"]}`` with numbers (per tensor) or lists of length C (per channel, axis 1). Raises ValueError for bits
    outside 2..8 or an unknown method."""
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"wire bits must be 2..8, got {bits}")
    if method not in ("minmax", "mse"):
        raise ValueError(f"wire range method must be minmax or mse here, got {method!r}")
    qmax = (1 << int(bits)) - 1
    x = np.asarray(x, np.float32)
    rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) if per_channel else x.reshape(1, -1)
    rows = rows[:, ::max(1, rows.shape[1] // max_values)]
    lo, hi = np.minimum(rows.min(axis=1), 0.0) * alpha, np.maximum(rows.max(axis=1), 0.0) * alpha
    if method == "mse":
        alphas = np.linspace(1.0, 0.2, 33)
        errs = np.stack([_quant_mse(rows, a * lo, a * hi, qmax) for a in alphas])  # (alphas, C)
        best = alphas[np.argmin(errs, axis=0)]
        lo, hi = best * lo, best * hi
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0)
    scale = np.array([float(f"{v:.4g}") for v in scale])
    zero_point = np.clip(np.round(-lo / scale), 0, qmax).astype(int)
    if per_channel:
        q = QuantParams("uint8", scale.tolist(), zero_point.tolist(), axis=1, bits=int(bits))
    else:
        q = QuantParams("uint8", float(scale[0]), int(zero_point[0]), bits=int(bits))
    return q.to_json()


def _quant_mse(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, qmax: int) -> np.ndarray:
    """Mean squared error per row of quantising ``rows`` (C, M) on the grid of ``[lo, hi]`` (C,) with ``qmax+1`` codes."""
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0)[:, None].astype(np.float32)
    zp = np.clip(np.round(-lo[:, None] / scale), 0, qmax)
    back = (np.clip(np.rint(rows / scale) + zp, 0, qmax) - zp) * scale
    return ((back - rows) ** 2).mean(axis=1)


def tail_kl_alpha(out: Path, manifest: Manifest, name: str, values: dict[str, np.ndarray], bits: int,
                  per_channel: bool, samples: int = 128, alphas=TAIL_KL_ALPHAS) -> tuple[float, list]:
    """The range of the n-bit wire codes of tensor ``name`` that loses least of the model's output: for each
    ``alpha`` the min/max range shrunk by it (:func:`nbit_qparams`), the feature quantised, dequantised and
    run through the bundle's float server graphs (the other wire tensors stay float), and the mean
    KL divergence ``KL(softmax(float logits) || softmax(logits))`` over at most ``samples`` representative
    inputs; the least wins. Clipping rare outliers buys finer steps; clipping too much loses them: the tail
    says which matters (a task-aware counterpart of the MSE range; cf. the KL calibration of TensorRT, which
    compares activation histograms instead). Returns ``(alpha, [[alpha, kl], ...])``."""
    server = [(s, OrtSession(out / manifest.graphs[s.graphs["onnx/fp32"]].file))
              for s in manifest.segments if s.side == "server"]
    feeds = {n: v[:samples] for n, v in values.items()}
    ref = _log_softmax(_run(server, feeds, manifest.output.name))
    curve = []
    for a in alphas:
        q = QuantParams.from_json(nbit_qparams(values[name], bits, per_channel, "minmax", alpha=float(a)))
        trial = {**feeds, name: q.dequantize(q.quantize(feeds[name]))}
        logp = _log_softmax(_run(server, trial, manifest.output.name))
        curve.append([float(a), float((np.exp(ref) * (ref - logp)).sum(axis=1).mean())])
    best = min(curve, key=lambda c: c[1])
    return best[0], curve


def _run(sessions, feeds: dict, output: str) -> np.ndarray:
    outs = []
    n = len(next(iter(feeds.values())))
    for start in range(0, n, BATCH):
        values = {k: v[start: start + BATCH] for k, v in feeds.items()}
        for spec, sess in sessions:
            values.update(sess.run({i: values[i] for i in spec.inputs}))
        outs.append(values[output])
    return np.concatenate(outs).astype(np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def set_wire_qparams(manifest: Manifest, per_graph: dict, samples: int, wire: WireCodec = WireCodec(),
                     out: Path | None = None) -> None:
    """Give every tensor crossing a cut its wire quantisation from its real values over the representative
    set: int8 min/max per tensor (``wire.bits == 8`` per tensor), else n-bit codes as :func:`nbit_qparams`
    computes them (range ``tail-kl`` with :func:`tail_kl_alpha`, which needs the bundle directory ``out``
    holding the float graphs); and the entropy coder (``tensors[name].codec``). The device quantises the
    split feature with these parameters before sending."""
    seen = {}
    for graph_inputs_ in per_graph.values():
        seen.update(graph_inputs_)
    device = [s for s in manifest.segments if s.side == "device"]
    wire_names = [n for n in (device[-1].outputs if device else []) if n in seen]  # device -> server
    for name, spec in manifest.tensors.items():
        if name not in seen:
            continue
        spec.codec = wire.codec
        if not wire.nbit:
            q = QuantParams.from_tensor(seen[name], "int8").to_json()
            spec.quant = WireQuant(**q, scheme="per-tensor affine", range="minmax", samples=samples)
            continue
        extra: dict = {}
        if wire.range in ("step", "budget"):
            if wire.range == "budget":
                if len(wire_names) > 1:  # one frame carries them all: a per-tensor budget would not bound it
                    raise ValueError(f"--wire-budget bounds the frame of a single split tensor, and "
                                     f"{len(wire_names)} tensors cross this cut ({', '.join(wire_names)}); choose a "
                                     f"single-tensor split ('eetool inspect' marks them) or give --wire-step")
                step, size = budget_step(name, seen[name], wire.bits, wire.budget, wire.codec)
                extra = {"budget": wire.budget, "frame_bytes": round(size, 1)}
            else:
                step = wire.step
                check_step(name, seen[name], wire.bits, step)
            q = step_qparams(seen[name], wire.bits, step)
            extra.setdefault("frame_bytes", round(frame_bytes(name, seen[name][:64], q, wire.codec), 1))
            spec.quant = WireQuant(**q, scheme=f"per-tensor affine, step {q['scale']:g}, {wire.bits}-bit codes",
                                   range=wire.range, **extra, samples=samples)
            continue
        if wire.range == "tail-kl" and out is not None and name in wire_names:
            alpha, curve = tail_kl_alpha(out, manifest, name, {n: seen[n] for n in wire_names}, wire.bits,
                                         wire.per_channel)
            q = nbit_qparams(seen[name], wire.bits, wire.per_channel, "minmax", alpha=alpha)
            extra = {"alpha": alpha, "kl_curve": curve}
        else:  # tail-kl needs the float server graphs: min/max without them
            q = nbit_qparams(seen[name], wire.bits, wire.per_channel, "minmax" if wire.range == "tail-kl" else wire.range)
        scheme = f"{'per-channel' if wire.per_channel else 'per-tensor'} affine, {wire.bits}-bit"
        used = wire.range if extra or wire.range != "tail-kl" else "minmax"
        spec.quant = WireQuant(**q, scheme=scheme, range=used, **extra, samples=samples)


def quantize_onnx_graphs(out: Path, manifest: Manifest, per_graph: dict, quant: dict, progress: bool,
                         targets: tuple[str, ...] = DEFAULT_TARGETS, float_files: dict | None = None) -> dict:
    """Quantise every ONNX float graph (segments and exits) to int8 QDQ with onnxruntime, each on its own
    real inputs, once per group of int8 ``targets`` that need different kernels (runtime/targets.py:
    arm64 and x86-vnni share U8S8 8-bit graphs, x86-avx2 gets 7-bit weights). The first group's graphs
    are the owner's ``onnx/int8`` graphs; each lists its ``targets`` and, in ``variants``, the keys of the
    other groups' graphs, from which the runtime picks the one made for its CPU. All variants of a graph
    share the encoding of its inputs and outputs (pinned to the first group's), so the wire tensors take
    the int8 head's output scale / zero point and every variant sends exactly what it computed.
    ``quant`` (QuantConfig fields) overrides :data:`RECIPE`; explicit ``activation_type`` / ``weight_type``
    / ``reduce_range`` there make one graph for all ``targets``. ``float_files`` (owner name -> float ONNX
    path) quantises other float graphs than the bundle's (a fine-tuned model's, toolkit.qat); the int8
    entries keep the bundle graph's names and shapes. Returns per-graph quantisation summaries."""
    from .quantize_onnx import QuantConfig, quantize_graph

    typed = {"activation_type", "weight_type", "reduce_range"} & set(quant)
    groups = [list(targets)] if typed else group_targets(targets)
    summary = {}
    for owner in manifest.owners:
        name = owner.name
        fp32 = manifest.graphs[owner.graphs["onnx/fp32"]]
        logits = [o for o in owner.outputs if o not in manifest.tensors]
        keys, pinned = [], {}
        for i, group in enumerate(groups):
            types = {} if typed else TARGETS[group[0]]
            image = IMAGE_GRAPH_RECIPE if manifest.input.name in owner.inputs else {}
            config = QuantConfig(**{**RECIPE, **image, **types, **quant})
            if i == 0:  # n-bit wire tensors on the wire's grid; later variants copy the first one's io
                grid = wire_grid_pins(manifest, list(owner.inputs) + list(owner.outputs), config.activation_type)
                pinned = {t: [{"scale": np.array(p["scale"], np.float32),
                               "zero_point": _np_int({**p, "dtype": config.activation_type})}] for t, p in grid.items()}
            if pinned:  # same wire / io encoding as the first variant
                config.extra_options = {**config.extra_options, "TensorQuantOverrides": {
                    **config.extra_options.get("TensorQuantOverrides", {}), **pinned}}
            suffix = "" if i == 0 else f".{group[0]}"
            rel = f"graphs/{name}.int8{suffix}.onnx"
            src = (float_files or {}).get(name, out / fp32.file)
            q = quantize_graph(src, out / rel, per_graph[name], config, progress=progress,
                               float_outputs=tuple(logits))
            if i == 0:
                pinned = {t: [{"scale": np.array(p["scale"], np.float32), "zero_point": _np_int(p)}]
                          for t, p in q["io"].items()}
            key = f"{name}.onnx.int8{suffix}"
            manifest.graphs[key] = GraphEntry.from_json({**fp32.to_json(), "file": rel, "precision": "int8",
                                                         "quantization": q, "targets": group},
                                                        f"manifest.graphs[{key!r}]")
            keys.append(key)
            summary[name if i == 0 else f"{name}@{group[0]}"] = {k: v for k, v in q.items() if k != "io"}
        if len(keys) > 1:
            manifest.graphs[keys[0]].variants = {t: k for k, g in zip(keys[1:], groups[1:]) for t in g}
        owner.graphs["onnx/int8"] = keys[0]
    for seg in manifest.segments:
        graph = manifest.graphs.get(seg.graphs.get("onnx/int8", ""))
        io = graph.quantization.io if graph is not None and graph.quantization is not None else {}
        for name in seg.outputs:
            wq = manifest.tensors[name].quant if name in manifest.tensors else None
            if wq is not None and wq.bits is not None:
                continue  # n-bit wire codes are calibrated on the float feature; the device requantises
            if name in manifest.tensors and name in io:
                manifest.tensors[name].quant = _as_int8(manifest.tensors[name].quant, io[name])
    return summary


def wire_grid_pins(manifest: Manifest, names, activation_type: str) -> dict:
    """Encodings that put int8 graph tensors crossing the wire as n-bit codes on the wire's own grid:
    ``{name: {"scale", "zero_point"}}`` for every tensor in ``names`` whose wire quantisation is n-bit and
    per tensor, with the zero point shifted into ``activation_type`` (``uint8`` as is, ``int8`` minus 128).
    A device graph that ends on this grid hands the wire values that requantise exactly, and a server graph
    that starts on it takes the decoded codes exactly: the feature is rounded once, not three times. The
    grid's 256 int8 levels cover the n-bit range and more, so nothing is clipped that the wire keeps."""
    pins = {}
    for name in names:
        wq = manifest.tensors[name].quant if name in manifest.tensors else None
        if wq is None or wq.bits is None or wq.axis is not None:
            continue
        zp = int(wq.zero_point) - (128 if activation_type == "int8" else 0)
        pins[name] = {"scale": float(wq.scale), "zero_point": zp}
    return pins


def _np_int(p: dict):
    return np.array(p["zero_point"], np.uint8 if p["dtype"] == "uint8" else np.int8)


def _as_int8(wire: WireQuant, io: IOQuant) -> WireQuant:
    """The int8 head's own output encoding ``io`` for the wire, uint8 expressed as int8 (same scale, zero
    point shifted by 128): the wire always carries int8."""
    dtype, zero_point = io.dtype, io.zero_point
    if dtype == "uint8":
        dtype, zero_point = "int8", int(zero_point) - 128
    return dataclasses.replace(wire, dtype=dtype, scale=io.scale, zero_point=zero_point, range="int8 head output")


def tflite_correction_samples(quant: dict) -> int:
    """Calibration samples for the layer-by-layer bias correction of TFLite int8 graphs under
    :data:`RECIPE` + ``quant`` (QuantConfig fields: ``sequential_bias_correction``,
    ``bias_correction_samples``, as for ONNX); 0 when it is off."""
    from .quantize_onnx import QuantConfig

    cfg = {**RECIPE, **quant}
    if not cfg.get("sequential_bias_correction"):
        return 0
    return int(cfg.get("bias_correction_samples", QuantConfig.bias_correction_samples))


def export_tflite_graphs(out, manifest, segments, exits, values, per_graph, progress, int8_segments=None,
                         correction_samples: int = 0):
    """Float (and with ``per_graph``, full-integer int8) TFLite graphs for every segment and exit, converted
    with litert-torch and quantised with ai-edge-quantizer on the same real per-graph inputs as ONNX.
    A tail's input scale / zero point are pinned to its head's output ones, so the int8 split feature
    passes from head to tail without requantisation. ``int8_segments`` (same names as ``segments``: a
    fine-tuned or bias-corrected copy of the model) are the modules the int8 graphs are made from.
    Graph outputs that no other graph reads (logits) get int16 activations: int8 logits tie the top
    classes (toolkit.export_tflite.float_outputs_recipe). With ``correction_samples``, every int8 graph's
    biases are then corrected layer by layer against the original float graph on that many of its inputs
    (toolkit.bias_correction_tflite)."""
    from runtime.progress import progress as bar

    summary = {}
    int8_mods = {seg.name: seg.module for seg in (int8_segments or segments)}
    owners = [(manifest.segment(seg.name), seg.module, tuple(values[n] for n in seg.inputs), int8_mods[seg.name])
              for seg in segments]
    for e in exits:
        owner = manifest.exit_branch(e.name)
        owners.append((owner, e.module, (values[owner.input],), e.module))
    fixed: dict = {}  # int8 encoding of every tensor produced so far, by our name
    for owner, module, args, int8_module in bar(owners, "TFLite graphs", "graph", enabled=progress):
        _tflite_pair(out, manifest, owner, module, args, per_graph, summary, fixed, int8_module,
                     correction_samples, progress)
    return summary


def _tflite_pair(out, manifest, owner, module, args, per_graph, summary, fixed, int8_module=None,
                 correction_samples: int = 0, progress: bool = False):
    import tempfile

    from .export_tflite import (describe_tflite, export_float, first_convs_float_recipe, float_outputs_recipe,
                                quantize_int8)

    name, inputs, outputs = owner.name, owner.inputs, owner.outputs
    rel = f"graphs/{name}.fp32.tflite"
    entry = export_float(module, tuple(a[:1] for a in args), out / rel, inputs, outputs)
    entry.update(file=rel, format="tflite", precision="fp32", quantization=None)
    manifest.graphs[f"{name}.tflite.fp32"] = GraphEntry.from_json(entry, f"manifest.graphs['{name}.tflite.fp32']")
    owner.graphs["tflite/fp32"] = f"{name}.tflite.fp32"
    if per_graph is None:
        return
    rel8 = f"graphs/{name}.int8.tflite"
    pinned = {n: fixed[n] for n in inputs if n in fixed}  # a tail input takes its head's output encoding
    grid = wire_grid_pins(manifest, list(inputs) + list(outputs), "int8")  # TFLite activations are int8
    with tempfile.TemporaryDirectory(prefix="eetool-tflite-") as tmp:
        src = out / rel
        if int8_module is not None and int8_module is not module:  # a modified copy: its own float graph
            src = Path(tmp) / f"{name}.fp32.tflite"
            export_float(int8_module, tuple(a[:1] for a in args), src, inputs, outputs)
        # the graph reading the image keeps its first two convolutions float (see first_convs_float_recipe)
        recipe = first_convs_float_recipe(src) if manifest.input.name in inputs else "static_wi8_ai8_minmax"
        logits = [o for o in outputs if o not in manifest.tensors]
        if logits:  # int16 logits: 0.25-wide int8 steps tied the top two classes of 1 % of the images
            recipe = float_outputs_recipe(src, logits, entry.get("name_map"), recipe, kind="a16")
        q = quantize_int8(src, out / rel8, per_graph[name], recipe, name_map=entry.get("name_map"),
                          fixed_io=pinned or None, preferred_io=grid or None)
        if correction_samples:
            from .bias_correction_tflite import correct_biases_sequential_tflite

            feeds = {k: v[:correction_samples] for k, v in per_graph[name].items()}
            q["bias_correction"] = {"sequential": correct_biases_sequential_tflite(
                out / rel, out / rel8, feeds, entry.get("name_map"), progress=progress),
                "samples": min(len(v) for v in feeds.values())}
    for n in outputs:
        if n in q.get("io", {}):
            fixed[n] = {"scale": q["io"][n]["scale"], "zero_point": q["io"][n]["zero_point"]}
    entry8 = describe_tflite(str(out / rel8), entry.get("name_map"))
    entry8.update(file=rel8, format="tflite", precision="int8", quantization=q, name_map=entry.get("name_map"),
                  batch=entry.get("batch"))
    manifest.graphs[f"{name}.tflite.int8"] = GraphEntry.from_json(entry8, f"manifest.graphs['{name}.tflite.int8']")
    owner.graphs["tflite/int8"] = f"{name}.tflite.int8"
    summary[name] = {k: v for k, v in q.items() if k != "io"}

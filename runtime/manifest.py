"""The bundle manifest (``manifest.json``): the one contract between the toolkit, which writes bundles, and
the runtime, which reads them, as typed, versioned standard-library dataclasses (Python 3.8; numpy only to
check quantisation parameters).

How it works (the shape follows ExecuTorch's ``bundled_program`` schema: plain dataclasses plus a schema
version constant that is bumped whenever the schema changes):

- Every field is declared here with its type and a description. ``docs/bundle.md`` is generated from these
  declarations (``python -m runtime.manifest --write-doc docs/bundle.md``) and a test keeps the two equal.
- :func:`parse_manifest` / :func:`load_manifest` check every field's type and allowed values, every cross
  reference (segment -> graph, exit -> tensor, wire tensor -> quantisation) and refuse the first problem
  with a :class:`ManifestError` naming the field path, e.g. ``manifest.segments[1].side``.
- Unknown fields are refused, never ignored: a field this runtime does not know may change what the bundle
  means (a feature codec, an exit predictor). Data for other tools goes under the top-level ``extensions``
  object (``{"your-tool": {...}}``), which eetool keeps and never interprets.
- Versions: ``schema`` is ``eetool.bundle/<N>``. Older manifests are migrated on load (:data:`MIGRATIONS`),
  newer ones are refused with a message saying to use the runtime shipped inside that bundle, and ones too
  old to migrate are refused with "re-export with eetool >= X".

Adding a field: declare it on its dataclass with ``doc(...)`` and a default (``None`` or an empty
container), so older manifests still load; regenerate docs/bundle.md. Bump :data:`SCHEMA_VERSION` (and add
a migration) only when a change is not an optional addition: a rename, a new required field, a changed
meaning. A new optional field that an older runtime must not ignore is refused by that runtime anyway,
because unknown fields are refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

SCHEMA_NAME = "eetool.bundle"
#: version of the manifest schema this runtime writes and reads (older ones are migrated on load).
SCHEMA_VERSION = 2
SCHEMA = "%s/%d" % (SCHEMA_NAME, SCHEMA_VERSION)
#: first eetool release that wrote each schema version.
WRITTEN_SINCE = {1: "0.1.0", 2: "0.2.0"}

FORMATS = ("onnx", "tflite")
PRECISIONS = ("fp32", "int8")
SIDES = ("device", "server")
EXIT_RULES = ("max_softmax", "normalized_entropy")


class ManifestError(ValueError):
    """A manifest that does not follow the schema. ``path`` is the offending field (``manifest.exits[0].rule``)."""

    def __init__(self, path: str, problem: str):
        super().__init__("%s: %s" % (path, problem))
        self.path = path
        self.problem = problem


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, required: bool = False,
        choices: Optional[Tuple[str, ...]] = None, null: bool = False) -> Any:
    """A documented schema field. ``required`` fields must be present in the JSON (a default still lets
    writers fill the object step by step); ``choices`` restricts a string field; ``null`` writes a None
    value as null instead of leaving the field out."""
    meta = {"doc": text, "required": required, "choices": choices, "null": null}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=None if default is dataclasses.MISSING else default, metadata=meta)


class _Node(object):
    """Base of every manifest dataclass: (de)serialisation from the declared field types."""

    @classmethod
    def from_json(cls, data: Any, path: str = "") -> Any:
        """Validate ``data`` (parsed JSON) and build the object; raises ManifestError naming the field."""
        return _parse(cls, data, path or cls.__name__)

    def to_json(self) -> Dict[str, Any]:
        """JSON-ready dict; fields whose value is None and whose default is None are left out."""
        return _dump(self)

    def _check(self, path: str) -> None:
        """Cross-field rules (overridden); raise ManifestError naming the field."""


class _OneInOneOut(object):
    """For graph owners with one ``input`` and one ``output`` tensor name (exit branches, the Exit Predictor):
    the list views :attr:`Segment.inputs` / :attr:`Segment.outputs` give, for code that handles any owner."""

    @property
    def inputs(self) -> List[str]:
        """``[input]``."""
        return [self.input]  # type: ignore[attr-defined]

    @property
    def outputs(self) -> List[str]:
        """``[output]``."""
        return [self.output]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- the schema
@dataclass
class ModelInfo(_Node):
    """The model the bundle was exported from."""

    source: str = doc("model name or file as given to `eetool export` (zoo name, file.py:factory, model.onnx)",
                      required=True)
    kind: str = doc("how the source was resolved", required=True, choices=("zoo", "python", "onnx"))
    weights: Optional[str] = doc("state dict loaded into the model (path as given), when one was")


@dataclass
class TensorSpec(_Node):
    """A named tensor at the model's boundary (the bundle's `input` or `output`)."""

    name: str = doc("tensor name; graphs bind inputs and outputs by this name", required=True)
    shape: Optional[List[Optional[int]]] = doc("shape with null for the batch (and any other dynamic) dimension")
    dtype: str = doc("element type, e.g. float32", default="float32", required=True)
    layout: Optional[str] = doc("dimension order of 4-d tensors, e.g. NCHW")


@dataclass
class Preprocess(_Node):
    """How the runtime turns an input file into `input` (runtime/preprocess.py); the same spec is used at
    export for the representative (calibration) dataset."""

    kind: str = doc("`image`: decode an image file; `array`: uint8 arrays (N, H, W) or (N, C, H, W); "
                    "`none`: arrays fed as they are", required=True, choices=("image", "array", "none"))
    channels: Optional[str] = doc("colour mode after decoding (default: L for one mean, else RGB)", choices=("RGB", "L"))
    resize_shorter: Optional[int] = doc("resize the shorter side to this many pixels (default: keep)")
    interpolation: Optional[str] = doc("resampling filter of the resize (default bilinear)",
                                       choices=("bilinear", "bicubic", "nearest"))
    crop: Optional[List[int]] = doc("centre crop [H, W] after the resize (default: none)")
    scale: Optional[float] = doc("multiply pixel values by this first (default 1), e.g. 1/255")
    mean: Optional[List[float]] = doc("per-channel mean subtracted after scaling (default 0)")
    std: Optional[List[float]] = doc("per-channel standard deviation divided by (default 1)")
    layout: Optional[str] = doc("layout of the produced tensor (NCHW)")


@dataclass
class Calibration(_Node):
    """The representative dataset the bundle was calibrated on (wire ranges, int8 graphs), so evaluation
    and benchmarks can leave those inputs out."""

    source: str = doc("dataset string as given to --calib (folder, .npy/.npz, fashion-mnist:train, samples)",
                      required=True)
    samples: int = doc("number of calibration inputs", required=True)
    names: List[str] = doc("identifier of each calibration input (file name or split[i])", factory=list)


@dataclass
class Segment(_Node):
    """One graph of the backbone between two cuts; segments run in order."""

    name: str = doc("segment name (seg0, seg1, ...)", required=True)
    side: str = doc("where it runs: segments up to the split run on the device, the rest on the edge server",
                    required=True, choices=SIDES)
    after: Optional[str] = doc("cut it starts after (null: the model input)", null=True)
    until: Optional[str] = doc("cut it ends at (null: the model output)", null=True)
    inputs: List[str] = doc("names of the tensors it reads", factory=list, required=True)
    outputs: List[str] = doc("names of the tensors it produces", factory=list, required=True)
    mflops: Optional[float] = doc("MFLOPs per sample (multiply-adds x 2), for cost models")
    params: Optional[int] = doc("parameter count")
    graphs: Dict[str, str] = doc("`<format>/<precision>` (onnx/fp32, tflite/int8, ...) -> key in `graphs`",
                                 factory=dict, required=True)


@dataclass
class ExitBranch(_OneInOneOut, _Node):
    """An early-exit branch: a small classifier on a cut's tensor, run on the device right after the segment
    that produces it; the sample stops there when the branch's confidence passes its threshold."""

    name: str = doc("exit name (exit0, ...)", required=True)
    at: str = doc("cut (module path) it is attached at", required=True)
    input: str = doc("tensor it reads (a device segment's output)", required=True)
    output: str = doc("its logits tensor, `<name>.logits`, shape (N, classes)", required=True)
    mflops: Optional[float] = doc("MFLOPs per sample of the branch")
    rule: str = doc("confidence rule: `max_softmax` exits when confidence >= threshold, `normalized_entropy` "
                    "when entropy / log(classes) <= threshold", default="max_softmax", required=True,
                    choices=EXIT_RULES)
    threshold: Optional[float] = doc("default confidence threshold in [0, 1] (after `eetool exits calibrate`: the "
                                     "onnx/fp32 one); null: the exit is off unless `thresholds` has the graphs' format",
                                     null=True)
    thresholds: Dict[str, Optional[float]] = doc(
        "threshold per graph format `<format>/<precision>`, calibrated on those very graphs (int8 confidences "
        "differ from float ones); null: off for that format. Takes precedence over `threshold`", factory=dict)
    expected_exit_rate: Dict[str, float] = doc(
        "fraction of all samples expected to stop at this exit, per graph format, measured at calibration",
        factory=dict)
    graphs: Dict[str, str] = doc("`<format>/<precision>` -> key in `graphs`", factory=dict, required=True)

    def threshold_for(self, pair: str) -> Optional[float]:
        """The threshold for graphs ``pair`` (``onnx/int8``): calibrated for that format, else the default."""
        return self.thresholds[pair] if pair in self.thresholds else self.threshold

    def exit_rate_for(self, pair: str) -> Optional[float]:
        """Expected exit rate for ``pair``, else for onnx/fp32, else any calibrated one (None: not calibrated)."""
        for key in (pair, "onnx/fp32"):
            if key in self.expected_exit_rate:
                return self.expected_exit_rate[key]
        return next(iter(self.expected_exit_rate.values()), None)

    def _check(self, path: str) -> None:
        for where, th in [("threshold", self.threshold)] + [("thresholds[%r]" % k, v) for k, v in self.thresholds.items()]:
            if th is not None and not 0.0 <= th <= 1.0:
                raise ManifestError("%s.%s" % (path, where), "%r is outside [0, 1]" % th)
        for k in list(self.thresholds) + list(self.expected_exit_rate):
            _check_pair(k, "%s: key" % path)
        for k, v in self.expected_exit_rate.items():
            if not 0.0 <= v <= 1.0:
                raise ManifestError("%s.expected_exit_rate[%r]" % (path, k), "%r is outside [0, 1]" % v)


@dataclass
class ExitPredictor(_OneInOneOut, _Node):
    """The Exit Predictor (Dong, Mao & Zhang, "Resource-Constrained Edge AI with Early Exit Prediction", 2022):
    a small network run on the device before the first exit; for every exit it scores the probability that
    the exit's confidence passes its threshold, and an exit whose score is below its prediction threshold is
    skipped (its branch does not run), so "hard" samples pay for no branch."""

    name: str = doc("graph owner name (`predictor`)", required=True)
    input: str = doc("tensor it reads: the model input or a device tensor produced no later than the first exit's",
                     required=True)
    output: str = doc("its logits tensor, `<name>.logits`, shape (N, exits); sigmoid gives each exit's score",
                      required=True)
    exits: List[str] = doc("the exit scored by each output column, in column order", factory=list, required=True)
    mflops: Optional[float] = doc("MFLOPs per sample (every sample pays them while the predictor is used)")
    rule: str = doc("confidence rule of the exits its training labels came from", default="max_softmax",
                    choices=EXIT_RULES)
    label_thresholds: List[Optional[float]] = doc(
        "confidence threshold per exit that defined its training labels (1: the exit's confidence passes it)",
        factory=list)
    architecture: Dict[str, Any] = doc("toolkit.exit_predictor.ExitPredictor configuration", factory=dict)
    thresholds: Dict[str, Optional[List[Optional[float]]]] = doc(
        "prediction thresholds per graph format `<format>/<precision>`, one per entry of `exits` in [0, 1]: the "
        "exit's branch runs only when its score >= the value (null entry: not gated); null or absent: the "
        "predictor does not run with that format", factory=dict)
    graphs: Dict[str, str] = doc("`<format>/<precision>` -> key in `graphs`", factory=dict, required=True)

    def gates_for(self, pair: str) -> Optional[Dict[str, Optional[float]]]:
        """``{exit name: prediction threshold or None}`` for graphs ``pair``; None: not used with them."""
        values = self.thresholds.get(pair)
        return None if values is None else dict(zip(self.exits, values))

    def _check(self, path: str) -> None:
        for pair, values in self.thresholds.items():
            _check_pair(pair, "%s.thresholds: key" % path)
            if values is None:
                continue
            if len(values) != len(self.exits):
                raise ManifestError("%s.thresholds[%r]" % (path, pair), "%d values for %d exits" % (len(values), len(self.exits)))
            for v in values:
                if v is not None and not 0.0 <= v <= 1.0:
                    raise ManifestError("%s.thresholds[%r]" % (path, pair), "%r is outside [0, 1]" % v)
        if self.label_thresholds and len(self.label_thresholds) != len(self.exits):
            raise ManifestError(path + ".label_thresholds", "%d values for %d exits"
                                % (len(self.label_thresholds), len(self.exits)))


@dataclass
class WireQuant(_Node):
    """Affine quantisation of a tensor sent from device to server (runtime/quant.py):
    `q = clip(round(x / scale) + zero_point, qmin, qmax)`, `x ~= (q - zero_point) * scale`."""

    dtype: str = doc("integer type on the wire", required=True, choices=("int8", "uint8"))
    scale: Union[float, List[float]] = doc("real value of one step (> 0); one per channel with `axis`", required=True)
    zero_point: Union[int, List[int]] = doc("integer that represents 0.0; one per channel with `axis`", required=True)
    axis: Optional[int] = doc("channel axis of per-channel parameters (1 for NCHW; null: per tensor)")
    bits: Optional[int] = doc("n-bit codes: `uint8` codes in `0..2^bits - 1` (2..8), bit-packed on the wire "
                              "(docs/protocol.md); null: whole bytes")
    scheme: Optional[str] = doc("description, e.g. `per-tensor affine` or `per-tensor affine, 4-bit`")
    range: Optional[str] = doc("where the range came from: `minmax` over the calibration set, `int8 head output` "
                               "(the int8 head graph's own output encoding, sent without requantisation), `mse` "
                               "(least squared quantisation error) or `tail-kl` (the min/max range shrunk by `alpha`, "
                               "whose codes keep the float tail's output closest to the float model's), `step` "
                               "(`scale` is a quantiser step chosen by the user) or `budget` (`scale` is the finest "
                               "step whose frames average at most `budget` bytes over the calibration set)")
    alpha: Optional[float] = doc("with `tail-kl`: the factor (0..1] the min/max range was shrunk by")
    kl_curve: Optional[List[List[float]]] = doc("with `tail-kl`: `[alpha, mean KL divergence]` for each factor tried")
    budget: Optional[int] = doc("with `budget`: the mean REQUEST frame size asked for, bytes")
    frame_bytes: Optional[float] = doc("with `step` / `budget`: mean size of REQUEST frames carrying this tensor "
                                       "alone over (at most 64 of) the calibration inputs at this step, bytes")
    samples: Optional[int] = doc("calibration inputs the range was measured on")

    def params(self) -> Any:
        """The :class:`runtime.quant.QuantParams` for quantising and dequantising this tensor."""
        from .quant import QuantParams

        return QuantParams(self.dtype, self.scale, self.zero_point, self.axis, self.bits)

    def _check(self, path: str) -> None:
        from .quant import QuantError

        try:
            self.params()
        except QuantError as e:
            raise ManifestError(path, str(e))
        if self.axis is not None and self.bits is None:
            raise ManifestError(path + ".bits", "per-channel wire codes travel as n-bit codes: give `bits` (2..8)")
        if self.bits is not None and self.dtype != "uint8":
            raise ManifestError(path + ".dtype", "n-bit wire codes are uint8, got %r" % self.dtype)
        if self.range == "budget" and (self.budget is None or self.budget < 1):
            raise ManifestError(path + ".budget", "range `budget` needs the budget in bytes (>= 1), got %r"
                                % (self.budget,))
        if self.frame_bytes is not None and not self.frame_bytes > 0:
            raise ManifestError(path + ".frame_bytes", "must be > 0, got %r" % (self.frame_bytes,))


@dataclass
class WireTensor(_Node):
    """A tensor that crosses a cut: the wire contract between device and server."""

    shape: List[Optional[int]] = doc("shape with null for the batch", factory=list, required=True)
    dtype: str = doc("element type before quantisation (float32)", default="float32", required=True)
    layout: Optional[str] = doc("NCHW for 4-d feature maps")
    quant: Optional[WireQuant] = doc("how the device quantises it before sending (absent in bundles written "
                                     "by eetool 0.1.0 from .onnx models: send it as float32 then)")
    codec: Optional[str] = doc("entropy coder of its (bit-packed) codes on the wire (`eetool export --wire-codec`; "
                               "runtime `--codec` overrides; null: zstd)", choices=("zstd", "lz4", "brotli", "none"))


@dataclass
class IOQuant(_Node):
    """The encoding of one graph input or output inside a quantised graph."""

    dtype: str = doc("element type in the graph (int8, uint8, int16, float32, ...)", required=True)
    scale: Optional[float] = doc("scale (null for a float tensor)")
    zero_point: Optional[int] = doc("zero point (null for a float tensor)")


@dataclass
class GraphQuantization(_Node):
    """How an int8 graph was quantised: written by toolkit/quantize_onnx.py (ONNX, onnxruntime QDQ) or
    toolkit/export_tflite.py (TFLite, ai-edge-quantizer)."""

    scheme: str = doc("`QDQ` (ONNX), `full-integer` or `mixed` (TFLite)", required=True)
    activations: Optional[str] = doc("activation type / encoding")
    weights: Optional[str] = doc("weight type / encoding")
    per_channel: Optional[bool] = doc("per-channel weight scales (ONNX)")
    reduce_range: Optional[bool] = doc("7-bit weights (ONNX, for x86 CPUs without VNNI)")
    calibration: Optional[str] = doc("range method: minmax, entropy, percentile (ONNX); minmax or moving average (TFLite)")
    samples: Optional[int] = doc("calibration inputs (the graph's own real inputs)")
    recipe: Optional[str] = doc("ai-edge-quantizer recipe (TFLite)")
    float_nodes: Optional[List[str]] = doc("nodes kept in float or 16-bit (ONNX)")
    clipped_biases: Optional[List[str]] = doc("biases onnxruntime clipped to int32 (ONNX)")
    wide_tensors: Optional[Dict[str, str]] = doc("tensors quantised to 16 bits (ONNX)")
    io: Dict[str, IOQuant] = doc("encoding of every graph input / output, by our tensor name", factory=dict)
    config: Optional[Dict[str, Any]] = doc("the quantiser's configuration (toolkit.quantize_onnx.QuantConfig)")
    bias_correction: Optional[Dict[str, Any]] = doc("int32 biases corrected for the mean output shift of "
                                                    "quantisation (toolkit/bias_correction.py, ONNX; "
                                                    "toolkit/bias_correction_tflite.py, TFLite): layers, "
                                                    "mean |shift| removed and left")
    sensitivity: Optional[List[List[Any]]] = doc("ONNX: [tensor, SQNR dB] of the most quantisation-sensitive "
                                                 "activations (onnxruntime qdq_loss_debug), when ranked")


@dataclass
class GraphTensor(_Node):
    """One input or output of a graph file."""

    name: str = doc("our tensor name (as in `segments` / `tensors`)", required=True)
    shape: Optional[List[Optional[int]]] = doc("shape, null for dynamic dimensions")
    dtype: Optional[str] = doc("element type in the graph")
    layout: Optional[str] = doc("NCHW (or NHWC for a channels-last TFLite graph)")
    tflite_name: Optional[str] = doc("TFLite: the SignatureDef input / output name bound to `name`")
    tflite_tensor: Optional[str] = doc("TFLite: the tensor's name inside the flatbuffer")
    scale: Optional[float] = doc("TFLite: the tensor's quantisation scale, when quantised")
    zero_point: Optional[int] = doc("TFLite: the tensor's zero point, when quantised")


@dataclass
class GraphEntry(_Node):
    """One graph file; key `<owner>.<format>.<precision>` (seg0.onnx.fp32, exit0.tflite.int8, ...)."""

    file: str = doc("path inside the bundle (graphs/seg0.fp32.onnx)", required=True)
    format: str = doc("`onnx` (onnxruntime) or `tflite` (LiteRT)", required=True, choices=FORMATS)
    precision: str = doc("`fp32` or `int8`", required=True, choices=PRECISIONS)
    inputs: List[GraphTensor] = doc("graph inputs, bound by name", factory=list)
    outputs: List[GraphTensor] = doc("graph outputs, bound by name", factory=list)
    quantization: Optional[GraphQuantization] = doc("null for float graphs", null=True)
    signature: Optional[str] = doc("TFLite: the SignatureDef key the runtime calls (serving_default)")
    batch: Optional[int] = doc("TFLite: the graph's fixed batch size (null: dynamic batch); the runtime loops "
                               "over larger batches")
    name_map: Optional[Dict[str, str]] = doc("TFLite: our tensor name -> SignatureDef name (TFLite names cannot "
                                             "hold dots: blocks.5 -> blocks_5)")
    max_abs_diff: Optional[float] = doc("TFLite: largest |difference| from PyTorch on the sample input at conversion")
    targets: Optional[List[str]] = doc("int8: the CPUs this graph was made for (runtime/targets.py: arm64, x86-vnni, "
                                       "x86-avx2)")
    variants: Optional[Dict[str, str]] = doc("int8: target -> key of the graph made for that CPU instead of this one; "
                                             "the runtime runs the variant for its own CPU")


@dataclass
class Samples(_Node):
    """Ground truth of the inputs in the bundle's samples/ folder, for accuracy in `runtime bench`."""

    labels: Dict[str, int] = doc("file name in samples/ -> class index", factory=dict)


@dataclass
class ProfileGraph(_Node):
    """The whole model as one float ONNX graph with module-scoped node names, so `runtime bench` can measure
    per-layer latency on the board for `eetool plan --measurements` (absent with `export --no-profile-graph`)."""

    file: str = doc("path inside the bundle (profile/model.fp32.onnx)", required=True)
    input: str = doc("its input tensor name", required=True)
    output: str = doc("its output tensor name", required=True)
    dtype: str = doc("input element type", default="float32", required=True)
    layout: Optional[str] = doc("input layout (NCHW)")


@dataclass
class CalibrationResult(_Node):
    """Threshold calibration of one graph format, measured on labelled validation data."""

    thresholds: List[Optional[float]] = doc("chosen threshold per exit (null: exit off)", factory=list, required=True)
    exit_rates: List[float] = doc("fraction of samples stopping at each exit", factory=list, required=True)
    accuracy: float = doc("top-1 with these thresholds", required=True)
    final_accuracy: float = doc("top-1 of the final classifier alone", required=True)
    expected_mflops: float = doc("expected device MFLOPs per sample", required=True)
    mflops_ratio: float = doc("expected_mflops / backbone MFLOPs", required=True)
    samples: int = doc("validation inputs", required=True)
    source: str = doc("validation dataset", required=True)
    unreachable: List[str] = doc("exits whose threshold no confidence reached (they never fire)", factory=list)
    exit_accuracy: Dict[str, float] = doc("top-1 of every exit and of the final classifier, no exiting", factory=dict)
    expected_ms: Optional[float] = doc("expected end-to-end latency (latency objective; with several bandwidths "
                                       "the slowest one's)")
    latency_model: Optional[str] = doc("where the latency estimate comes from (latency objective)")
    prediction_thresholds: Optional[List[Optional[float]]] = doc(
        "the Exit Predictor's prediction threshold per exit (bundle exit order; null entry: not gated); null: "
        "predictor not used")
    branch_rates: List[float] = doc("fraction of samples whose exit branch ran, per exit", factory=list)
    bypass_rate: Optional[float] = doc("fraction of samples the predictor sent past every exit branch")


@dataclass
class ExitCalibration(_Node):
    """How `eetool exits calibrate` chose the thresholds (Scardapane et al.; latency objective after Dong,
    Mao & Zhang 2022)."""

    delta: float = doc("allowed top-1 drop versus the final classifier", required=True)
    rule: str = doc("confidence rule of every exit", required=True, choices=EXIT_RULES)
    objective: str = doc("`compute` (least expected device MFLOPs) or `latency`", required=True,
                         choices=("compute", "latency"))
    results: Dict[str, CalibrationResult] = doc("per graph format `<format>/<precision>`", factory=dict)
    bandwidth_mbps: Optional[float] = doc("uplink assumed by the latency objective (Mbit/s)")
    rtt_ms: Optional[float] = doc("round trip assumed by the latency objective (ms)")
    board: Optional[str] = doc("device board profile of the latency objective")
    budget_ms: Optional[float] = doc("latency budget (ms): most accurate thresholds that fit")
    budget_mflops: Optional[float] = doc("compute budget (expected device MFLOPs per sample): most accurate "
                                         "thresholds that fit")
    bandwidths_mbps: Optional[List[float]] = doc("latency-aware calibration: the grid of bandwidths the thresholds "
                                                 "were chosen for; the stored ones meet the budget at every one")


@dataclass
class LatencyModel(_Node):
    """Latencies of device-edge co-inference the latency-aware thresholds were chosen with (ms per sample)."""

    segments_ms: List[float] = doc("device backbone from one exit to the next (one per exit), then up to the split",
                                   factory=list, required=True)
    exits_ms: List[float] = doc("each exit branch", factory=list, required=True)
    predictor_ms: float = doc("the Exit Predictor", default=0.0)
    server_ms: float = doc("the edge server's part of the model", required=True)
    bytes_per_sample: float = doc("bytes sent per offloaded sample", required=True)
    rtt_ms: float = doc("network round trip", default=0.0)
    source: str = doc("where the latencies come from (board profile estimate or measured layer latencies)",
                      default="")


@dataclass
class AdaptationModel(_Node):
    """Bandwidth -> thresholds regression of one graph format (runtime/adaptive.py): one function of
    `x = log10(bandwidth in Mbit/s)` per threshold, `x` clamped to `bandwidth_range_mbps`. Values outside a
    threshold's range switch it: confidence > 1 (max_softmax) or < 0 (normalized_entropy): exit off;
    prediction threshold <= 0: not gated."""

    rule: str = doc("confidence rule of the exits", required=True, choices=EXIT_RULES)
    kind: str = doc("`piecewise-linear` (straight lines through `knots`) or `polynomial` (coefficients, lowest "
                    "order first)", required=True, choices=("piecewise-linear", "polynomial"))
    bandwidth_range_mbps: List[float] = doc("[lowest, highest] bandwidth fitted (Mbit/s)", factory=list, required=True)
    knots: Optional[List[float]] = doc("piecewise-linear: x of every grid point, ascending")
    degree: Optional[int] = doc("polynomial: its degree")
    exits: Dict[str, List[float]] = doc("exit name -> confidence threshold model (knot values or coefficients)",
                                        factory=dict, required=True)
    gates: Dict[str, List[float]] = doc("exit name -> prediction threshold model (with the Exit Predictor)",
                                        factory=dict)
    budget_ms: float = doc("latency budget the thresholds were chosen for (ms)", required=True)
    budget_met: bool = doc("whether the regression's thresholds meet the budget at every checked bandwidth "
                           "(grid points and between them) on the validation data", default=False)
    grid: List[Dict[str, Any]] = doc("the choice at every grid bandwidth (thresholds, accuracy, expected ms)",
                                     factory=list)
    fit: List[Dict[str, Any]] = doc("the regression's thresholds simulated at every checked bandwidth", factory=list)

    def _check(self, path: str) -> None:
        if len(self.bandwidth_range_mbps) != 2 or not 0 < self.bandwidth_range_mbps[0] <= self.bandwidth_range_mbps[1]:
            raise ManifestError(path + ".bandwidth_range_mbps", "needs [lowest, highest] > 0")
        n = len(self.knots or []) if self.kind == "piecewise-linear" else None
        if self.kind == "piecewise-linear" and (not n or list(self.knots) != sorted(self.knots)):
            raise ManifestError(path + ".knots", "piecewise-linear needs ascending knots")
        for field_name, models in (("exits", self.exits), ("gates", self.gates)):
            for name, values in models.items():
                if not values or (n is not None and len(values) != n):
                    raise ManifestError("%s.%s[%r]" % (path, field_name, name), "%d values for %s knots"
                                        % (len(values), n if n is not None else "a polynomial's"))


@dataclass
class LatencyAdaptation(_Node):
    """Latency-aware thresholds (Dong, Mao & Zhang 2022): chosen for the most accuracy within a latency budget
    at a grid of bandwidths, then regressed on bandwidth; `runtime run --adaptive` evaluates the regression
    at the bandwidth the device measures from its own transfers."""

    budget_ms: float = doc("latency budget (ms)", required=True)
    rtt_ms: float = doc("round trip assumed (ms)", default=0.0)
    board: Optional[str] = doc("device board profile of the latency model")
    server: Optional[str] = doc("edge server profile of the latency model")
    grid_mbps: List[float] = doc("bandwidths the thresholds were chosen for (Mbit/s)", factory=list)
    latency_model: LatencyModel = doc("the latencies used", required=True)
    models: Dict[str, AdaptationModel] = doc("per graph format `<format>/<precision>`", factory=dict)


@dataclass
class BottleneckTraining(_Node):
    """What the bottleneck was trained on and how (`eetool bottleneck train`, head network distillation)."""

    method: str = doc("training method (head network distillation, with its loss terms)", required=True)
    data: List[str] = doc("image folders the views were cut from (`DIR` or `DIR:fold=K/N`)", factory=list,
                          required=True)
    photos: List[str] = doc("folders of large photos cut into random crops", factory=list)
    views_per_image: Optional[int] = doc("augmented views per `data` image (the first: the centre crop)")
    crops_per_photo: Optional[int] = doc("random crops per large photo")
    train_images: Optional[int] = doc("`data` images trained on")
    large_photos: Optional[int] = doc("large photos trained on")
    train_views: Optional[int] = doc("views trained on (images x views + photos x crops)")
    validation_images: Optional[int] = doc("`data` images held out for validation (centre crops)")
    labels_used: bool = doc("whether labels were read (HND needs none)", default=False, required=True)
    best_epoch: Optional[int] = doc("epoch whose weights were kept (lowest validation loss; 0 = the PCA "
                                    "initialisation)")
    command: Optional[str] = doc("the command that trained it")


@dataclass
class BottleneckWeights(_Node):
    """The trained tensors the bundle's graphs were exported from."""

    source: str = doc("folder given to `export --bottleneck`", required=True)
    file: str = doc("weights file in that folder (tensors only)", required=True)
    sha256: str = doc("sha256 of the weights file", required=True)
    bytes: Optional[int] = doc("size of the weights file")


@dataclass
class Bottleneck(_Node):
    """A bottleneck injected at the split (`eetool export --bottleneck`): the device runs the head up to
    `split` and an encoder that cuts the feature to `channels` channels at 1/`stride` resolution, clamped to
    [0, 1]; the server runs a decoder that reproduces the original model's output at `target`, then the
    original tail. The decoder was trained on codes quantised to `bits` bits (scale 1 / (2**bits - 1), zero
    point 0); `tensors[cut].quant` is the 8-bit wire encoding, as for any cut."""

    split: str = doc("module path of the original model the encoder reads (the split point S)", required=True)
    target: str = doc("module path whose output the decoder reproduces (the target layer T)", required=True)
    cut: str = doc("the device / server cut in this bundle: the encoder's output (equals `split` of the manifest)",
                   required=True)
    channels: int = doc("bottleneck channels C", required=True)
    stride: int = doc("encoder stride s", required=True)
    code_shape: List[int] = doc("shape of the code sent per sample [C, H/s, W/s]", factory=list, required=True)
    bits: int = doc("bits per value the training simulated (the wire grid: scale 1 / (2**bits - 1), zero point 0)",
                    required=True)
    tune_from: Optional[str] = doc("original layers between this cut and `split` were fine-tuned (device side)")
    refine: Optional[int] = doc("residual blocks in the decoder")
    split_shape: Optional[List[int]] = doc("shape of the original feature at `split` [C, H, W]")
    target_shape: Optional[List[int]] = doc("shape of the original feature at `target` [C, H, W]")
    device_mflops: Optional[float] = doc("MFLOPs of the device side (head + encoder) per sample")
    model_mflops: Optional[float] = doc("MFLOPs of the original model per sample")
    validation_agreement: Optional[float] = doc("top-1 agreement with the original model on the held-out "
                                                "validation images, with the code quantised to `bits`")
    training: Optional[BottleneckTraining] = doc("training data and method")
    weights: BottleneckWeights = doc("the trained tensors and their sha256", required=True)


@dataclass
class WireTransform(_Node):
    """A transform of the split feature baked into the graphs (`eetool export --wire-transform`): the device
    graph ends with `y = V^T (x - mean)` over the channels and the server graph begins with its inverse
    `x = V y + mean`, so the wire carries `y` (tensor `cut`). `klt`: V holds the eigenvectors of the channel
    covariance of the feature at `split` over the representative data, by decreasing variance (the
    Karhunen-Loeve transform; toolkit/wire_transform.py)."""

    kind: str = doc("the transform", required=True, choices=("klt",))
    split: str = doc("module path of the original model whose output is transformed (the split point S)",
                     required=True)
    cut: str = doc("the device / server cut in this bundle: the transform's output (equals `split` of the manifest)",
                   required=True)
    shape: List[int] = doc("feature shape [C, H, W] (unchanged by the transform)", factory=list, required=True)
    samples: int = doc("representative inputs the transform was computed from", required=True)
    variance: List[float] = doc("variance of each component over them, in order", factory=list)
    explained: List[float] = doc("cumulative share of the total variance of the first 1..C components",
                                 factory=list)

    def _check(self, path: str) -> None:
        if len(self.shape) != 3 or any(not isinstance(d, int) or d < 1 for d in self.shape):
            raise ManifestError(path + ".shape", "[C, H, W] of positive integers, got %r" % (self.shape,))
        if self.samples < 1:
            raise ManifestError(path + ".samples", "must be >= 1, got %r" % self.samples)
        for name in ("variance", "explained"):
            values = getattr(self, name)
            if values and len(values) != self.shape[0]:
                raise ManifestError("%s.%s" % (path, name), "one value per channel (%d), got %d"
                                    % (self.shape[0], len(values)))
        if any(v < 0 for v in self.variance):
            raise ManifestError(path + ".variance", "variances are >= 0")
        e = self.explained
        if any(not 0 <= v <= 1.001 for v in e) or any(b < a for a, b in zip(e, e[1:])):
            raise ManifestError(path + ".explained", "cumulative shares rise from 0 to 1")


@dataclass
class Manifest(_Node):
    """`manifest.json`, the root object."""

    schema: str = doc("`eetool.bundle/<version>`", default=SCHEMA, required=True)
    created_by: str = doc("`eetool <version>` that wrote the bundle", required=True)
    model: ModelInfo = doc("the source model", required=True)
    input: TensorSpec = doc("the model input the device feeds (float32, preprocessed)", required=True)
    output: TensorSpec = doc("the final classifier's logits", required=True)
    preprocess: Preprocess = doc("input file -> `input`", required=True)
    cuts: List[str] = doc("ordered cut points (`after module X`); segment i ends at cuts[i]", factory=list,
                          required=True)
    split: str = doc("the device / server cut: segments up to it run on the device", required=True)
    calibration: Optional[Calibration] = doc("the representative dataset (absent in bundles eetool 0.1.0 sliced "
                                                 "from .onnx)")
    segments: List[Segment] = doc("backbone graphs in order", factory=list, required=True)
    exits: List[ExitBranch] = doc("early-exit branches, in backbone order", factory=list)
    tensors: Dict[str, WireTensor] = doc("every tensor crossing a cut, by name: the wire contract", factory=dict)
    graphs: Dict[str, GraphEntry] = doc("every graph file, by key", factory=dict, required=True)
    samples: Optional[Samples] = doc("labels of samples/ (when the export data had labels)")
    layer_profile_graph: Optional[ProfileGraph] = doc("whole-model graph for per-layer latency on the board")
    exit_calibration: Optional[ExitCalibration] = doc("written by `eetool exits calibrate`")
    predictor: Optional[ExitPredictor] = doc("the Exit Predictor (`eetool exits predictor train`)")
    latency_adaptation: Optional[LatencyAdaptation] = doc(
        "bandwidth -> thresholds regression (`eetool exits calibrate --board B --budget-ms X --bandwidth B1,B2,..`)")
    bottleneck: Optional[Bottleneck] = doc("the injected bottleneck, for bundles exported with --bottleneck")
    wire_transform: Optional[WireTransform] = doc("the transform of the split feature, for bundles exported with "
                                                  "--wire-transform")
    extensions: Dict[str, Any] = doc("data of other tools, by tool name; eetool keeps it and never reads it",
                                     factory=dict)
    files: Dict[str, str] = doc("sha256 of every file in the bundle except manifest.json; loading refuses a "
                                "missing or changed file", factory=dict)

    #: schema version the manifest was migrated from on load (None: written with this schema)
    migrated_from = None  # type: Optional[int]

    # -------------------------------------------------------------- views
    @property
    def device_segments(self) -> List[Segment]:
        return [s for s in self.segments if s.side == "device"]

    @property
    def server_segments(self) -> List[Segment]:
        return [s for s in self.segments if s.side == "server"]

    @property
    def wire_tensors(self) -> List[str]:
        """Names of the tensors sent from device to server (outputs of the last device segment)."""
        dev = self.device_segments
        return list(dev[-1].outputs) if dev else [self.input.name]

    @property
    def owners(self) -> List[Union[Segment, ExitBranch]]:
        """Segments then exits: everything that owns graphs."""
        return list(self.segments) + list(self.exits)

    def segment(self, name: str) -> Segment:
        """The segment called ``name``; raises ManifestError listing the names."""
        return _named(self.segments, name, "manifest.segments")

    def exit_branch(self, name: str) -> ExitBranch:
        """The exit branch called ``name``; raises ManifestError listing the names."""
        return _named(self.exits, name, "manifest.exits")

    @property
    def num_classes(self) -> Optional[int]:
        """Classes of the final output (last dimension of `output.shape`), when known."""
        shape = self.output.shape or []
        return shape[-1] if shape and shape[-1] else None

    @property
    def calibration_names(self) -> List[str]:
        return list(self.calibration.names) if self.calibration else []

    def formats(self) -> List[str]:
        """``fmt/precision`` pairs that every segment and exit has a graph for (e.g. ``onnx/fp32``)."""
        pairs = None
        for owner in self.owners:
            have = set(owner.graphs)
            pairs = have if pairs is None else pairs & have
        return sorted(pairs or [])

    # -------------------------------------------------------------- cross-field rules
    def _check(self, path: str) -> None:
        if self.schema != SCHEMA:
            raise ManifestError(path + ".schema", "%r, expected %r" % (self.schema, SCHEMA))
        if not self.segments:
            raise ManifestError(path + ".segments", "empty: a bundle has at least one segment")
        seen = set()
        for i, o in enumerate(self.owners):
            kind = "segments[%d]" % i if i < len(self.segments) else "exits[%d]" % (i - len(self.segments))
            if o.name in seen:
                raise ManifestError("%s.%s.name" % (path, kind), "%r is used twice" % o.name)
            seen.add(o.name)
            for pair, key in o.graphs.items():
                where = "%s.%s.graphs[%r]" % (path, kind, pair)
                fmt, precision = _check_pair(pair, where)
                if key not in self.graphs:
                    raise ManifestError(where, "graph %r is not in `graphs`" % key)
                g = self.graphs[key]
                if (g.format, g.precision) != (fmt, precision):
                    raise ManifestError(where, "graph %r is %s/%s" % (key, g.format, g.precision))
                for target, alt in (g.variants or {}).items():
                    other = self.graphs.get(alt)
                    if other is None or (other.format, other.precision) != (g.format, g.precision):
                        raise ManifestError("%s.graphs[%r].variants[%r]" % (path, key, target),
                                            "%r is not a %s/%s graph in `graphs`" % (alt, g.format, g.precision))
        sides = [s.side for s in self.segments]
        if sides != sorted(sides):  # "device" < "server"
            raise ManifestError(path + ".segments", "device segments must come before server ones: %s" % sides)
        if self.input.name not in self.segments[0].inputs:
            raise ManifestError(path + ".input.name", "%r is not an input of %s" % (self.input.name, self.segments[0].name))
        if self.output.name not in self.segments[-1].outputs:
            raise ManifestError(path + ".output.name", "%r is not an output of %s" % (self.output.name, self.segments[-1].name))
        if self.cuts and self.split not in self.cuts:
            raise ManifestError(path + ".split", "%r is not one of the cuts %s" % (self.split, self.cuts))
        if self.bottleneck is not None and self.bottleneck.cut != self.split:
            raise ManifestError(path + ".bottleneck.cut", "%r is not the split %r" % (self.bottleneck.cut, self.split))
        t = self.wire_transform
        if t is not None and t.cut != self.split:
            raise ManifestError(path + ".wire_transform.cut", "%r is not the split %r" % (t.cut, self.split))
        if t is not None and t.cut in self.tensors and list(self.tensors[t.cut].shape[1:]) != list(t.shape):
            raise ManifestError(path + ".wire_transform.shape", "%r is not the shape of tensor %r, %r"
                                % (t.shape, t.cut, self.tensors[t.cut].shape[1:]))
        device_out = {t for s in self.device_segments for t in s.outputs}
        for i, e in enumerate(self.exits):
            if e.input not in device_out:
                raise ManifestError("%s.exits[%d].input" % (path, i),
                                    "%r is not produced by a device segment (%s)" % (e.input, sorted(device_out)))
        if self.server_segments:
            for name in self.wire_tensors:
                if name not in self.tensors:
                    raise ManifestError(path + ".tensors", "wire tensor %r (sent to the server) is missing" % name)
        if self.predictor is not None:
            p = self.predictor
            names = {e.name for e in self.exits}
            unknown = [n for n in p.exits if n not in names]
            if unknown:
                raise ManifestError(path + ".predictor.exits", "%s are not exits of the bundle (%s)"
                                    % (unknown, sorted(names)))
            first = min((k for k, s in enumerate(self.device_segments) for e in self.exits if e.input in s.outputs),
                        default=len(self.device_segments) - 1)
            readable = [self.input.name] + [t for s in self.device_segments[:first + 1] for t in s.outputs]
            if p.input not in readable:
                raise ManifestError(path + ".predictor.input", "%r: the predictor must read the input or a device "
                                    "tensor no later than the first exit's (%s)" % (p.input, readable))
            for pair, key in p.graphs.items():
                where = "%s.predictor.graphs[%r]" % (path, pair)
                fmt, precision = _check_pair(pair, where)
                if key not in self.graphs or (self.graphs[key].format, self.graphs[key].precision) != (fmt, precision):
                    raise ManifestError(where, "graph %r is not a %s graph in `graphs`" % (key, pair))
        if self.latency_adaptation is not None:
            exits = {e.name for e in self.exits}
            for pair, m in self.latency_adaptation.models.items():
                _check_pair(pair, "%s.latency_adaptation.models: key" % path)
                if set(m.exits) != exits:
                    raise ManifestError("%s.latency_adaptation.models[%r].exits" % (path, pair),
                                        "models %s, the bundle's exits are %s" % (sorted(m.exits), sorted(exits)))


MIGRATIONS = {}  # type: Dict[int, Callable[[Dict[str, Any]], Dict[str, Any]]]


def _v1_to_v2(data: Dict[str, Any]) -> Dict[str, Any]:
    """eetool 0.1.0 wrote the same fields without validation; v2 readers refuse unknown fields, and every
    wire tensor of a v2 bundle carries its quantisation (v1 bundles sliced from .onnx had none)."""
    out = dict(data)
    out["schema"] = "%s/2" % SCHEMA_NAME
    return out


MIGRATIONS[1] = _v1_to_v2


def schema_version(data: Any, where: str = "manifest") -> int:
    """The version number in ``data["schema"]``; raises ManifestError for anything that is not an
    ``eetool.bundle/<N>`` manifest."""
    tag = data.get("schema") if isinstance(data, dict) else None
    m = re.match(r"^%s/(\d+)$" % re.escape(SCHEMA_NAME), tag) if isinstance(tag, str) else None
    if m is None:
        raise ManifestError(where + ".schema", "%r is not an eetool bundle schema; re-export with eetool >= %s"
                            % (tag, WRITTEN_SINCE[SCHEMA_VERSION]))
    return int(m.group(1))


def _is_this_runtimes_bundle(folder: Optional[Path]) -> bool:
    """Whether ``folder`` is the bundle this runtime/ package was copied into."""
    if folder is None:
        return False
    here = Path(__file__).resolve().parent.parent
    return (here / "manifest.json").is_file() and Path(folder).resolve() == here


def parse_manifest(data: Any, where: str = "manifest", folder: Optional[Path] = None) -> Manifest:
    """Validate parsed ``manifest.json`` ``data``, migrating older schema versions, and return the
    :class:`Manifest`. Raises ManifestError naming the first bad field; a newer schema is refused with advice
    on which runtime reads it (``folder``: the bundle the manifest belongs to, when known, so that a bundle's
    own runtime/ does not send the user to itself); one older than any migration is refused with
    "re-export with eetool >= X"."""
    if not isinstance(data, dict):
        raise ManifestError(where, "must be a JSON object")
    version = schema_version(data, where)
    if version > SCHEMA_VERSION:
        # a bundle's own runtime/ reading that bundle: "run the bundle's runtime" would point at itself
        fix = ("replace this bundle's runtime/ with the one of the eetool that wrote the manifest, or re-export "
               "the bundle with this one" if _is_this_runtimes_bundle(folder)
               else "run the runtime/ copied inside that bundle, or update eetool")
        raise ManifestError(where + ".schema", "%s is newer than this runtime reads (%s, from %s): %s"
                            % (data["schema"], SCHEMA, data.get("created_by"), fix))
    first = min(MIGRATIONS) if MIGRATIONS else SCHEMA_VERSION
    if version < first:
        raise ManifestError(where + ".schema", "%s is too old to read; re-export with eetool >= %s"
                            % (data["schema"], WRITTEN_SINCE[SCHEMA_VERSION]))
    migrated = version
    while migrated < SCHEMA_VERSION:
        data = MIGRATIONS[migrated](data)
        migrated += 1
    manifest = _parse(Manifest, data, where)
    manifest.migrated_from = version if version != SCHEMA_VERSION else None
    return manifest


def load_manifest(path) -> Manifest:
    """Read and validate ``path`` (a ``manifest.json`` or a bundle directory). Raises ManifestError
    (message prefixed with the file) for invalid JSON or schema problems, FileNotFoundError for no file."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ManifestError(str(p), "not valid JSON (%s)" % e)
    return parse_manifest(data, folder=p.parent)


def manifest_json(manifest: Manifest) -> str:
    """The text of ``manifest.json`` for ``manifest`` (validated first: a writer cannot produce a bundle
    this runtime refuses)."""
    checked = parse_manifest(manifest.to_json())
    return json.dumps(checked.to_json(), indent=2) + "\n"


# ---------------------------------------------------------------------------------------------- machinery
def _check_pair(pair: str, where: str) -> Tuple[str, str]:
    fmt, _, precision = pair.partition("/")
    if fmt not in FORMATS or precision not in PRECISIONS:
        raise ManifestError(where, "%r is not <format>/<precision> with format in %s and precision in %s"
                            % (pair, FORMATS, PRECISIONS))
    return fmt, precision


def _named(items, name: str, where: str):
    for x in items:
        if x.name == name:
            return x
    raise ManifestError(where, "no %r (have: %s)" % (name, ", ".join(x.name for x in items) or "none"))


_HINTS = {}  # type: Dict[type, Dict[str, Any]]


def _hints(cls: type) -> Dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, vars(sys.modules[__name__]))
    return _HINTS[cls]


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool %r" % v
    if isinstance(v, (int, float)):
        return "number %r" % v
    if isinstance(v, str):
        return "string %r" % (v if len(v) < 40 else v[:37] + "...")
    return {"list": "a list", "dict": "an object"}.get(type(v).__name__, type(v).__name__)


def _type_name(tp: Any, nested: bool = False) -> str:
    origin, args = getattr(tp, "__origin__", None), getattr(tp, "__args__", ())
    if tp is Any:
        return "any JSON"
    if origin is Union:
        names = [_type_name(a, True) for a in args if a is not type(None)] + (["null"] if type(None) in args else [])
        return ("(%s)" if nested else "%s") % " or ".join(names)
    if origin in (list, List):
        return "list of %s" % _type_name(args[0], True)
    if origin in (dict, Dict):
        return "object of %s" % _type_name(args[1], True)
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return {str: "string", int: "integer", float: "number", bool: "bool"}.get(tp, str(tp))


def _parse(tp: Any, value: Any, path: str) -> Any:
    origin, args = getattr(tp, "__origin__", None), getattr(tp, "__args__", ())
    if tp is Any:
        return value
    if origin is Union:
        if value is None:
            if type(None) in args:
                return None
            raise ManifestError(path, "null, expected %s" % _type_name(tp))
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _parse(options[0], value, path)
        for a in options:
            try:
                return _parse(a, value, path)
            except ManifestError:
                continue
        raise ManifestError(path, "%s, expected %s" % (_jtype(value), _type_name(tp)))
    if origin in (list, List):
        if not isinstance(value, list):
            raise ManifestError(path, "%s, expected %s" % (_jtype(value), _type_name(tp)))
        return [_parse(args[0], v, "%s[%d]" % (path, i)) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ManifestError(path, "%s, expected %s" % (_jtype(value), _type_name(tp)))
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ManifestError(path, "key %r is not a string" % (k,))
            out[k] = _parse(args[1], v, "%s[%r]" % (path, k))
        return out
    if dataclasses.is_dataclass(tp):
        return _parse_node(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ManifestError(path, "%r, expected a finite number" % value)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError("unsupported schema type %r at %s" % (tp, path))
    raise ManifestError(path, "%s, expected %s" % (_jtype(value), _type_name(tp)))


def _parse_node(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, _Node):  # an object built in code: validate its JSON form
        value = value.to_json()
    if not isinstance(value, dict):
        raise ManifestError(path, "%s, expected an object (%s)" % (_jtype(value), cls.__name__))
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ManifestError("%s.%s" % (path, unknown[0]),
                            "unknown field (%s has: %s); data of other tools goes under the top-level "
                            "'extensions'" % (cls.__name__, ", ".join(known)))
    hints = _hints(cls)
    kwargs = {}
    for f in fields:
        where = "%s.%s" % (path, f.name)
        if f.name not in value:
            if f.metadata.get("required"):
                raise ManifestError(where, "missing (required)")
            continue
        v = _parse(hints[f.name], value[f.name], where)
        choices = f.metadata.get("choices")
        if choices and v is not None and v not in choices:
            raise ManifestError(where, "%r is not one of %s" % (v, ", ".join(choices)))
        kwargs[f.name] = v
    obj = cls(**kwargs)
    obj._check(path)
    return obj


def _dump(v: Any) -> Any:
    if isinstance(v, _Node):
        out = {}
        for f in dataclasses.fields(v):
            x = getattr(v, f.name)
            if x is None and f.default is None and not f.metadata.get("null"):
                continue
            out[f.name] = _dump(x)
        return out
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------------------------- docs
DOC_BEGIN = "<!-- fields: generated from runtime/manifest.py by `python -m runtime.manifest --write-doc docs/bundle.md` -->"
DOC_END = "<!-- end of generated fields -->"


def _node_types(tp: Any) -> List[type]:
    origin, args = getattr(tp, "__origin__", None), getattr(tp, "__args__", ())
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [t for a in (args if origin else ()) for t in _node_types(a)]


def schema_markdown() -> str:
    """The field reference of docs/bundle.md: one table per object, in the order a reader meets them."""
    order, where = [Manifest], {Manifest: ["manifest.json"]}
    i = 0
    while i < len(order):
        cls = order[i]
        for f in dataclasses.fields(cls):
            for t in _node_types(_hints(cls)[f.name]):
                tp = _hints(cls)[f.name]
                suffix = "{name}" if getattr(tp, "__origin__", None) in (dict, Dict) else (
                    "[]" if getattr(tp, "__origin__", None) in (list, List) else "")
                place = "%s%s" % (f.name, suffix) if cls is Manifest else "%s.%s%s" % (where[cls][0], f.name, suffix)
                if t not in where:
                    where[t] = []
                    order.append(t)
                if place not in where[t]:
                    where[t].append(place)
        i += 1
    lines = ["Schema `%s` (`runtime.manifest.SCHEMA_VERSION = %d`). *Required* fields must be present; the others "
             "may be left out (or null). Any other field is refused." % (SCHEMA, SCHEMA_VERSION), ""]
    for cls in order:
        lines.append("### %s" % cls.__name__)
        lines.append("")
        lines.append("At: %s. %s" % (", ".join("`%s`" % w for w in where[cls]), " ".join((cls.__doc__ or "").split())))
        lines.append("")
        lines.append("| field | type | | meaning |")
        lines.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            tp = _type_name(_hints(cls)[f.name])
            for t in _node_types(_hints(cls)[f.name]):
                tp = tp.replace(t.__name__, "[%s](#%s)" % (t.__name__, t.__name__.lower()))
            meaning = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                meaning += " (one of: %s)" % ", ".join("`%s`" % c for c in f.metadata["choices"])
            lines.append("| `%s` | %s | %s | %s |" % (f.name, tp, "required" if f.metadata.get("required") else "",
                                                     meaning.replace("|", "\\|")))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def doc_with_fields(text: str) -> str:
    """``text`` (docs/bundle.md) with the part between the markers replaced by :func:`schema_markdown`.
    Raises ValueError when the markers are missing."""
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError("docs/bundle.md lacks the markers %r ... %r" % (DOC_BEGIN, DOC_END))
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    return head + DOC_BEGIN + "\n\n" + schema_markdown() + "\n" + DOC_END + tail


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m runtime.manifest",
                                 description="Check a bundle's manifest.json, or regenerate docs/bundle.md's field reference.")
    ap.add_argument("manifest", nargs="?", help="manifest.json or bundle directory to validate")
    ap.add_argument("--write-doc", metavar="BUNDLE_MD", help="rewrite the generated part of this file (docs/bundle.md)")
    a = ap.parse_args(argv)
    if a.write_doc:
        p = Path(a.write_doc)
        p.write_text(doc_with_fields(p.read_text(encoding="utf-8")), encoding="utf-8")
        print("wrote %s" % p)
    if a.manifest:
        try:
            m = load_manifest(a.manifest)
        except (ManifestError, OSError) as e:
            print("error: %s" % e, file=sys.stderr)
            return 2
        print("%s: valid %s%s, %d segments, %d exits, graphs %s" % (
            a.manifest, SCHEMA, " (migrated from version %d)" % m.migrated_from if m.migrated_from else "",
            len(m.segments), len(m.exits), ", ".join(m.formats())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

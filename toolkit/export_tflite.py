"""TFLite export of one graph (head, tail, segment or exit branch): float with ``litert_torch`` and full-integer
int8 with ``ai_edge_quantizer``.

Naming. A TFLite SignatureDef binds inputs and outputs by name, but its names must be Python identifiers
(``litert_torch`` traces a wrapper whose keyword arguments are the input names and whose returned dict keys are
the output names), so our tensor names (``input``, ``blocks.5``, ``exit0.logits``) are mapped to identifiers with
:func:`tflite_name` (``blocks.5`` -> ``blocks_5``). The graph entry records the pair for every tensor
(``name`` = ours, ``tflite_name`` = the signature name); the runtime binds by these names, never by position.

Layout. The graph keeps the PyTorch layout at its boundary (NCHW): the converter works in NHWC internally and adds
TRANSPOSE ops at the inputs and outputs. ``channels_last=True`` moves the boundary to NHWC instead (no boundary
transposes, for a wire between two TFLite graphs); the entry's ``layout`` says which one was produced.

Batch. Graphs are exported with batch 1 (recorded as ``"batch": 1``); the runtime loops over a larger batch.
litert-torch 0.10.0 can trace a dynamic batch (``torch.export.Dim``) but its lowerings fail on EfficientNet-Lite
(``F.pad``: "Dimension size after padding is not at least 0"; the residual ``add``: "incompatible shapes for
broadcasting"), and where a dynamic export succeeds the output shape signature keeps the trace batch.
``dynamic_batch=True`` still tries it and falls back to batch 1 with a warning.

Quantisation (:func:`quantize_int8`): static int8 weights (per channel) and int8 activations (per tensor,
asymmetric), int8 inputs and outputs (no float boundary), calibrated on real data. Recipes: ``static_wi8_ai8`` (the
quantizer's), ``static_wi8_ai8_minmax`` (global min/max ranges instead of the quantizer's moving average), and
mixed ``..+a16:<regex>`` recipes that keep the matching ops at int16 activations.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from runtime.quant import QuantParams

SIGNATURE = "serving_default"
log = logging.getLogger(__name__)


class TFLiteConversionError(RuntimeError):
    """A graph could not be converted to TFLite; the message names the op and the module path when known."""


# ----------------------------------------------------------------------------------------------------- naming
def tflite_name(name: str) -> str:
    """SignatureDef name for one of our tensor names: non-identifier characters become ``_``, a leading digit
    gets a ``t_`` prefix. Deterministic, so :func:`quantize_int8` and tests can recompute the mapping."""
    out = re.sub(r"\W", "_", name)
    if not out or out[0].isdigit():
        out = "t_" + out
    return out


def _name_map(names: Sequence[str]) -> Dict[str, str]:
    mapped: Dict[str, str] = {}
    taken = set()
    for n in names:
        t = tflite_name(n)
        base, k = t, 1
        while t in taken:
            t = f"{base}_{k}"
            k += 1
        taken.add(t)
        mapped[n] = t
    return mapped


class _NamedIOBase(nn.Module):
    def __init__(self, module: nn.Module, in_names: Sequence[str], out_names: Sequence[str]):
        super().__init__()
        self.mod = module
        self.in_names = list(in_names)
        self.out_names = list(out_names)

    def _call(self, *args: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.mod(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        out = tuple(out)
        if len(out) != len(self.out_names):
            raise ValueError(f"graph returns {len(out)} tensors but {len(self.out_names)} output names were given")
        return dict(zip(self.out_names, out))


def _NamedIO(module: nn.Module, in_names: Sequence[str], out_names: Sequence[str]) -> nn.Module:
    """Wrap a graph so that its forward has one named parameter per input and returns a dict keyed by output
    names (TFLite names, i.e. identifiers): litert_torch names the SignatureDef inputs after the keyword
    arguments and the outputs after the dict keys. (A ``**kwargs`` forward breaks a dynamic-batch export.)"""
    params = ", ".join(in_names)
    ns: Dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self._call({params},)\n", ns)  # noqa: S102 - names are identifiers
    cls = type("NamedIO", (_NamedIOBase,), {"forward": ns["forward"]})
    return cls(module, in_names, out_names)


class _DictOut(nn.Module):
    """Turns a dict-returning graph into a tuple-returning one in the order of ``keys``."""

    def __init__(self, module: nn.Module, keys: Sequence[str]):
        super().__init__()
        self.mod = module
        self.keys = list(keys)

    def forward(self, *args: torch.Tensor):
        out = self.mod(*args)
        return tuple(out[k] for k in self.keys)


# ------------------------------------------------------------------------------------------ error diagnosis
def _module_path(node: Any) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path = list(stack.values())[-1][0]
    # strip the wrapper prefixes (_NamedIO.mod, _DictOut.mod)
    path = re.sub(r"^(L__self__[._])?", "", str(path))
    parts = [p for p in re.split(r"[.]", path) if p]
    while parts and parts[0] == "mod":
        parts.pop(0)
    return ".".join(parts) or "<top level>"


def _diagnose(wrapped: nn.Module, kwargs: Dict[str, torch.Tensor], err: BaseException) -> str:
    """Find the first op of the exported graph that has no TFLite lowering and name it with its module path."""
    try:
        from litert_torch import fx_infra
        from litert_torch.backend import lowerings

        ep = torch.export.export(wrapped, (), kwargs, strict=False)
        ep = fx_infra.safe_run_decompositions(ep, fx_infra.decomp.pre_convert_decomp(), can_skip=False)
        import operator

        for node in ep.graph.nodes:
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            if lowerings.lookup(node.target) is None:
                return f"op {node.target} (node {node.name}) in module '{_module_path(node)}' has no TFLite lowering"
    except Exception as e2:  # noqa: BLE001 - diagnosis is best effort; the export error itself is shown
        m = re.search(r"aten\.\w+(\.\w+)?", str(e2))
        return f"torch.export failed: {type(e2).__name__}: {str(e2).splitlines()[0] if str(e2) else ''}" + (
            f" (op {m.group(0)})" if m else ""
        )
    return "op not identified"


# ------------------------------------------------------------------------------------------------ float export
@contextlib.contextmanager
def _quiet():
    """Silence the converter's / quantizer's progress output (stdout and the tqdm bars on stderr)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _tensor_entry(our: str, tfl: str, det: Dict[str, Any], layout: Optional[str], dynamic: bool) -> Dict[str, Any]:
    shape = [int(s) for s in det["shape_signature"]]
    if dynamic and shape:
        shape[0] = None  # type: ignore[call-overload]
    ent: Dict[str, Any] = {
        "name": our,
        "tflite_name": tfl,
        "tflite_tensor": det["name"],
        "shape": shape,
        "dtype": np.dtype(det["dtype"]).name,
    }
    if layout is not None:
        ent["layout"] = layout
    q = det.get("quantization_parameters") or {}
    scales = q.get("scales")
    if scales is not None and len(scales):
        ent["scale"] = float(scales[0])
        ent["zero_point"] = int(q["zero_points"][0])
    return ent


def describe_tflite(path: str, name_map: Optional[Dict[str, str]] = None, layout: Optional[Dict[str, str]] = None,
                    dynamic: Optional[bool] = None) -> Dict[str, Any]:
    """Graph entry fields (inputs/outputs with our and TFLite names, shapes, dtypes, qparams) read from a file."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    runner = it.get_signature_runner(SIGNATURE)
    ins, outs = runner.get_input_details(), runner.get_output_details()
    rev = {v: k for k, v in (name_map or {}).items()}
    if dynamic is None:
        dynamic = all(int(d["shape_signature"][0]) == -1 for d in ins.values())
    layout = layout or {}
    entry = {
        "format": "tflite",
        "signature": SIGNATURE,
        "batch": None if dynamic else int(next(iter(ins.values()))["shape"][0]),
        "inputs": [_tensor_entry(rev.get(k, k), k, d, layout.get(rev.get(k, k)), dynamic) for k, d in ins.items()],
        "outputs": [_tensor_entry(rev.get(k, k), k, d, layout.get(rev.get(k, k)), dynamic) for k, d in outs.items()],
    }
    return entry


def export_float(
    module: nn.Module,
    sample_inputs: Tuple[torch.Tensor, ...],
    path: Union[str, os.PathLike],
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    dynamic_batch: bool = False,
    channels_last: bool = False,
    verify: bool = True,
) -> Dict[str, Any]:
    """Convert one graph to a float32 ``.tflite`` at ``path`` with ``litert_torch``.

    ``module`` takes ``sample_inputs`` positionally (in the order of ``input_names``) and returns a tensor, a
    tuple/list (in the order of ``output_names``) or a dict keyed by ``output_names``. Returns the manifest graph
    entry fields: ``file``, ``format``, ``precision``, ``signature``, ``batch`` (``None`` = dynamic),
    ``inputs``/``outputs`` (``name`` ours, ``tflite_name`` signature name, ``tflite_tensor``, ``shape`` with
    ``None`` for a dynamic batch, ``dtype``, ``layout``), ``name_map`` and, when ``verify``, ``max_abs_diff`` of the
    TFLite graph against PyTorch on ``sample_inputs``. Raises :class:`TFLiteConversionError` naming the op and
    module path that the converter cannot lower.
    """
    import litert_torch

    path = str(path)
    input_names, output_names = list(input_names), list(output_names)
    if isinstance(sample_inputs, torch.Tensor):
        sample_inputs = (sample_inputs,)
    sample_inputs = tuple(sample_inputs)
    if len(sample_inputs) != len(input_names):
        raise ValueError(f"{len(sample_inputs)} sample inputs but {len(input_names)} input names")
    module = module.eval()
    with torch.no_grad():
        ref = module(*sample_inputs)
    if isinstance(ref, Mapping):
        missing = [n for n in output_names if n not in ref]
        if missing:
            raise ValueError(f"graph output dict lacks {missing}")
        module = _DictOut(module, output_names)
        ref = tuple(ref[k] for k in output_names)
    elif isinstance(ref, torch.Tensor):
        ref = (ref,)
    ref = [r.detach().numpy() for r in ref]

    names = _name_map(input_names + output_names)
    tin = [names[n] for n in input_names]
    tout = [names[n] for n in output_names]
    graph: nn.Module = module
    layout_in = ["NCHW" if x.ndim == 4 else None for x in sample_inputs]
    layout_out = ["NCHW" if r.ndim == 4 else None for r in ref]
    if channels_last:
        cl_in = [i for i, x in enumerate(sample_inputs) if x.ndim >= 3]
        cl_out = [i for i, r in enumerate(ref) if r.ndim >= 3]
        graph = litert_torch.to_channel_last_io(module, args=cl_in, outputs=cl_out)
        layout_in = ["NHWC" if i in cl_in else None for i in range(len(sample_inputs))]
        layout_out = ["NHWC" if i in cl_out else None for i in range(len(ref))]
        sample_inputs = tuple(
            x.permute(0, *range(2, x.ndim), 1).contiguous() if i in cl_in else x for i, x in enumerate(sample_inputs)
        )
    wrapped = _NamedIO(graph, tin, tout).eval()

    def _kwargs(batch: int) -> Dict[str, torch.Tensor]:
        out = {}
        for n, x in zip(tin, sample_inputs):
            if x.shape[0] != batch:
                reps = (batch + x.shape[0] - 1) // x.shape[0]
                x = x.repeat(reps, *([1] * (x.ndim - 1)))[:batch]
            out[n] = x
        return out

    edge = None
    dynamic = False
    first_err: Optional[BaseException] = None
    if dynamic_batch:
        # torch.export specialises size-1 dims, so trace with batch >= 2
        b = max(2, int(sample_inputs[0].shape[0]))
        batch = torch.export.Dim("batch", min=1, max=1024)
        try:
            with _quiet():
                edge = litert_torch.convert(wrapped, (), _kwargs(b), dynamic_shapes={n: {0: batch} for n in tin})
            dynamic = True
        except Exception as e:  # noqa: BLE001 - fall back to a static batch, diagnosed below if that fails too
            first_err = e
            log.warning("dynamic-batch TFLite export failed (%s: %s); exporting batch 1", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
    if edge is None:
        try:
            with _quiet():
                edge = litert_torch.convert(wrapped, (), _kwargs(1))
        except Exception as e:  # noqa: BLE001
            raise TFLiteConversionError(
                f"TFLite conversion failed: {_diagnose(wrapped, _kwargs(1), e)}; "
                f"converter said: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from (first_err or e)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _quiet():
        edge.export(path)

    layouts = {**dict(zip(input_names, layout_in)), **dict(zip(output_names, layout_out))}
    entry = describe_tflite(path, names, layouts, dynamic)
    entry.update({"file": path, "precision": "fp32", "quantization": None,
                  "name_map": {n: names[n] for n in input_names + output_names}})
    # keep our order for inputs/outputs
    entry["inputs"] = sorted(entry["inputs"], key=lambda e: input_names.index(e["name"]))
    entry["outputs"] = sorted(entry["outputs"], key=lambda e: output_names.index(e["name"]))
    if verify:
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=path).get_signature_runner(SIGNATURE)
        feeds = {t: x.detach().numpy() for t, x in zip(tin, sample_inputs)}
        if not dynamic:
            feeds = {t: x[: int(entry["batch"])] for t, x in feeds.items()}
        got = runner(**feeds)
        diffs = []
        for t, r in zip(tout, ref):
            g = got[t]
            if channels_last and g.ndim >= 3:
                g = np.moveaxis(g, -1, 1)
            diffs.append(float(np.abs(g - r[: g.shape[0]]).max()))
        entry["max_abs_diff"] = max(diffs) if diffs else 0.0
    return entry


# --------------------------------------------------------------------------------------------- quantisation
RECIPES = ("static_wi8_ai8", "static_wi8_ai8_minmax", "static_wi8_ai16")


def _recipe_rules(recipe: str) -> Tuple[List[Dict[str, Any]], str]:
    """Recipe name -> (ai_edge_quantizer recipe list, range aggregation).

    ``static_wi8_ai8``           the quantizer's static recipe (moving-average min/max over calibration batches)
    ``static_wi8_ai8_minmax``    same, global min/max over all calibration samples
    ``static_wi8_ai16``          int16 activations everywhere (IO int16)
    ``<base>+a16:<regex>``       <base>, with int16 activations for ops whose output tensor name matches regex
    ``<base>+float:<regex>``     <base>, with the matching ops left in float (not full-integer any more)

    The quantizer matches a regex against an op's output tensor names joined by ``;`` plus a trailing
    ``;``: anchor a full name as ``^name;$`` (``name$`` never matches).
    """
    from ai_edge_quantizer import recipe_manager
    from ai_edge_quantizer.qtyping import QuantGranularity, TFLOperationName

    parts = re.split(r"\+(?=(?:a16|float):)", recipe)
    base = parts[0]
    if base not in RECIPES:
        raise ValueError(f"unknown recipe {base!r}; known: {RECIPES} with optional +a16:<regex> / +float:<regex>")
    agg = "minmax" if base.endswith("_minmax") else "moving_average"
    rm = recipe_manager.RecipeManager()
    a_bits = 16 if base == "static_wi8_ai16" else 8
    rm.add_static_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED,
                         activation_num_bits=a_bits, weight_num_bits=8)
    # TFLite's int8 BATCH_MATMUL takes one scale per operand. With the quantizer's default (per-channel
    # constants) an exit's pooling matmuls either broke a FULLY_CONNECTED sharing the constant (refused at
    # load: "quantized_dimension != 0") or, with both as BATCH_MATMUL, saturated every output to -128
    rm.add_static_config(regex=".*", operation_name=TFLOperationName.BATCH_MATMUL, activation_num_bits=a_bits,
                         weight_num_bits=8, weight_granularity=QuantGranularity.TENSORWISE)
    for p in parts[1:]:
        kind, _, regex = p.partition(":")
        if kind == "a16":
            rm.add_static_config(regex=regex, operation_name=TFLOperationName.ALL_SUPPORTED,
                                 activation_num_bits=16, weight_num_bits=8)
        elif kind == "float":
            rm.add_quantization_config(regex=regex, operation_name=TFLOperationName.ALL_SUPPORTED,
                                       algorithm_key="no_quantize")
        else:
            raise ValueError(f"unknown recipe modifier {p!r}")
    return rm.get_quantization_recipe(), agg


def _calib_list(calib: Union[Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]]], batch: int
                ) -> List[Dict[str, np.ndarray]]:
    if isinstance(calib, Mapping):
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in calib.items()}
        n = {len(v) for v in arrays.values()}
        if len(n) != 1:
            raise ValueError(f"calibration arrays differ in length: { {k: len(v) for k, v in arrays.items()} }")
        total = n.pop()
        return [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in arrays.items()} for i in range(0, total, batch)]
    return [{k: np.asarray(v, dtype=np.float32) for k, v in d.items()} for d in calib]


def first_convs_float_recipe(float_path: Union[str, os.PathLike], n: int = 2,
                             base: str = "static_wi8_ai8_minmax") -> str:
    """Recipe keeping the first ``n`` convolutions (CONV_2D / DEPTHWISE_CONV_2D, in graph order) of
    ``float_path`` in float and everything else full-integer.

    For the graph that reads the image: the stem's 3-channel conv and the first depthwise conv are the
    most quantisation-sensitive layers of EfficientNet-Lite0 (measured: int8 head -> float tail agrees
    95.3 % with float, float head -> int8 tail 96.3 %), and the 3-channel conv gains nothing from int8
    kernels. On the 600 held-out ImageNet samples this took the int8 chain from 94.3 % to 95.2 % top-1
    agreement with float, with the head no slower."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(float_path))
    tensors = {t["index"]: t["name"] for t in it.get_tensor_details()}
    names = [";".join(tensors[i] for i in op["outputs"]) for op in it._get_ops_details()
             if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")][:n]
    if not names:
        return base
    return base + "+float:^(?:" + "|".join(re.escape(nm) for nm in names) + ");$"


_LAYOUT_OPS = ("TRANSPOSE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS")
# TFLite's int8 specification: these ops' outputs share their (first) input's scale and zero point
_SAME_ENCODING_OPS = _LAYOUT_OPS + ("MAX_POOL_2D", "AVERAGE_POOL_2D", "PAD", "MAXIMUM", "MINIMUM")


def _signature_name(ours: str, name_map: Optional[Dict[str, str]], signature_names) -> str:
    """Signature name of our tensor name: from ``name_map``, as it is when the signature has it, else
    :func:`tflite_name`."""
    if name_map and ours in name_map:
        return name_map[ours]
    return ours if ours in signature_names else tflite_name(ours)


def float_outputs_recipe(float_path: Union[str, os.PathLike], outputs: Iterable[str],
                         name_map: Optional[Dict[str, str]] = None, base: str = "static_wi8_ai8_minmax",
                         kind: str = "float") -> str:
    """``base`` plus a ``+float:`` rule (``kind="a16"``: a ``+a16:`` rule, int16 activations) for the ops that
    compute the graph outputs ``outputs`` (our names): the producing op and the layout ops (transpose /
    reshape) between it and the output.

    For classifier logits, as ``toolkit.quantize_onnx.quantize_graph(float_outputs=...)`` does for ONNX: the
    int8 input of the final FULLY_CONNECTED is dequantised before it, and it computes in float (under 1 % of
    the FLOPs, but its weights stay float: +3.8 MB for EfficientNet-Lite0's 1280x1000 classifier). eetool
    export takes ``kind="a16"`` for logits instead: int8 weights, int16 output. Int8 logits of
    EfficientNet-Lite0 move in 0.25 steps, which tied the two top classes of 4 of 400 held-out images (3 of
    them then disagreed with float); int16 ties none and costs the tail 0.4 ms (0.42 -> 0.46x fp32).
    Raises ValueError for an output the graph does not have."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(float_path))
    tensors = {t["index"]: t["name"] for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    producer = {i: op for op in ops for i in op["outputs"]}
    sig_out = it.get_signature_runner(SIGNATURE).get_output_details()
    names = []
    for ours in outputs:
        sig = _signature_name(ours, name_map, sig_out)
        if sig not in sig_out:
            raise ValueError(f"{float_path}: no output {ours!r} (signature outputs: {sorted(sig_out)})")
        op = producer.get(int(sig_out[sig]["index"]))
        while op is not None:
            names.append(";".join(tensors[i] for i in op["outputs"]))
            if op["op_name"] not in _LAYOUT_OPS:
                break
            op = producer.get(int(op["inputs"][0]))
    if not names:
        return base
    return base + f"+{kind}:^(?:" + "|".join(re.escape(nm) for nm in names) + ");$"  # rules add up


def quantize_int8(
    float_path: Union[str, os.PathLike],
    int8_path: Union[str, os.PathLike],
    calib: Union[Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]]],
    recipe: str = "static_wi8_ai8_minmax",
    *,
    name_map: Optional[Dict[str, str]] = None,
    calib_batch: int = 1,
    fixed_io: Optional[Dict[str, Dict[str, float]]] = None,
    preferred_io: Optional[Dict[str, Dict[str, float]]] = None,
    num_threads: int = 2,
) -> Dict[str, Any]:
    """Full-integer quantisation of a float ``.tflite`` with ``ai_edge_quantizer``.

    ``calib``: ``{our_input_name: array (N, ...)}`` or a list of such feeds (one per calibration step) of REAL
    data; for a tail, the float head's outputs on real images. ``name_map`` maps our names to signature names
    (default: :func:`tflite_name`). ``calib_batch`` samples per calibration step for a dict ``calib`` (on a
    dynamic-batch graph; ranges are per step, aggregated by the recipe). ``fixed_io`` pins the quantisation of
    named boundary tensors (``{name: {"scale": s, "zero_point": z}}``) to that of another graph, so that a head
    output and a tail input share their int8 encoding on the wire; RuntimeError when one cannot be pinned.
    ``preferred_io`` asks the same for tensors whose encoding is worth having but not required (the n-bit
    wire's grid): the result, pinned or not, is in ``io``. An output's pin goes back through the ops whose
    int8 kernels keep their input's encoding (pooling, padding, min/max, layout ops).

    Returns the manifest ``quantization`` dict: ``scheme``, ``recipe``, ``samples``, ``weights``, ``activations``,
    ``io`` (per our tensor name: ``dtype``, ``scale``, ``zero_point``).
    """
    from ai_edge_quantizer import calibrator, quantizer
    from ai_edge_quantizer.utils import qsv_utils
    from ai_edge_litert.interpreter import Interpreter

    float_path, int8_path = str(float_path), str(int8_path)
    rules, agg = _recipe_rules(recipe)
    fit = Interpreter(model_path=float_path)
    runner = fit.get_signature_runner(SIGNATURE)
    sig_in = runner.get_input_details()
    sig_out = runner.get_output_details()
    dynamic = all(int(d["shape_signature"][0]) == -1 for d in sig_in.values())
    static_batch = None if dynamic else int(next(iter(sig_in.values()))["shape"][0])
    steps = _calib_list(calib, calib_batch if dynamic else (static_batch or 1))
    if not steps:
        raise ValueError("no calibration data")

    def to_sig(n: str) -> str:
        return _signature_name(n, name_map, {**sig_in, **sig_out})

    feeds = []
    for d in steps:
        f = {to_sig(k): v for k, v in d.items()}
        unknown = set(f) - set(sig_in)
        if unknown or set(f) != set(sig_in):
            raise ValueError(f"calibration feeds {sorted(d)} do not match graph inputs {sorted(sig_in)} "
                             f"(name_map {name_map})")
        if static_batch is not None:
            # a static graph takes exactly its batch; split larger steps
            for i in range(0, len(next(iter(f.values()))), static_batch):
                feeds.append({k: v[i:i + static_batch] for k, v in f.items()})
        else:
            feeds.append(f)
    samples = sum(len(next(iter(f.values()))) for f in feeds)

    q = quantizer.Quantizer(float_path)
    q.load_quantization_recipe(rules)
    update = qsv_utils.min_max_update if agg == "minmax" else qsv_utils.moving_average_update
    cal = calibrator.Calibrator(float_path, num_threads=num_threads, qsv_update_func=update)
    with _quiet():
        cal.calibrate({SIGNATURE: feeds}, q._recipe_manager)  # noqa: SLF001 - the public calibrate() hides update
    qsvs = dict(cal.get_model_qsvs())

    # pin boundary tensors to given scale / zero point: the range that reproduces them exactly
    pins = {**(preferred_io or {}), **(fixed_io or {})}
    rev = {to_sig(k): k for k in pins}
    if pins:
        tensors = {t["index"]: t["name"] for t in fit.get_tensor_details()}
        producer = {i: op for op in fit._get_ops_details() for i in op["outputs"]}  # noqa: SLF001
        for sig_name, det in list(sig_in.items()) + list(sig_out.items()):
            if sig_name in rev:
                pin = pins[rev[sig_name]]
                lo, hi = QuantParams("int8", float(pin["scale"]), int(pin["zero_point"])).real_range()
                rng = {"min": np.array(lo, dtype=np.float32), "max": np.array(hi, dtype=np.float32)}
                qsvs[det["name"]] = rng
                # ops whose int8 kernels keep their input's encoding: pin an output back to the op computing it
                op = producer.get(int(det["index"])) if sig_name in sig_out else None
                while op is not None and op["op_name"] in _SAME_ENCODING_OPS:
                    qsvs[tensors[int(op["inputs"][0])]] = rng
                    op = producer.get(int(op["inputs"][0]))
    with _quiet():
        res = q.quantize(qsvs, enable_progress_report=False)
    os.makedirs(os.path.dirname(os.path.abspath(int8_path)), exist_ok=True)
    res.export_model(int8_path, overwrite=True)

    it = Interpreter(model_path=int8_path).get_signature_runner(SIGNATURE)
    revmap = {to_sig(n): n for n in (name_map or {})}
    io_q: Dict[str, Dict[str, Any]] = {}
    for sig_name, det in list(it.get_input_details().items()) + list(it.get_output_details().items()):
        qp = det["quantization_parameters"]
        io_q[revmap.get(sig_name, sig_name)] = {
            "dtype": np.dtype(det["dtype"]).name,
            "scale": float(qp["scales"][0]) if len(qp["scales"]) else None,
            "zero_point": int(qp["zero_points"][0]) if len(qp["zero_points"]) else None,
        }
    if fixed_io:
        for n, want in fixed_io.items():
            got = io_q.get(n)
            if got and (abs(got["scale"] - float(want["scale"])) > 1e-6 * abs(float(want["scale"]))
                        or got["zero_point"] != int(want["zero_point"])):
                raise RuntimeError(f"could not pin quantisation of {n}: wanted {want}, got {got}")
    full_int = all(v["dtype"] in ("int8", "int16") for v in io_q.values())
    return {
        "scheme": "full-integer" if full_int and "+float:" not in recipe else "mixed",
        "recipe": recipe,
        "calibration": agg,
        "samples": int(samples),
        "weights": "int8 per-channel symmetric",
        "activations": "int16 (selected ops) / int8 per-tensor asymmetric" if "+a16:" in recipe else
        ("int16 per-tensor symmetric" if recipe.startswith("static_wi8_ai16") else "int8 per-tensor asymmetric"),
        "io": io_q,
    }

"""Graph-level operations on a plain ONNX model for slicing it by tensor name: which tensors cross a cut,
the type and shape of every tensor that crosses one, and the extraction of one segment as a model.

Two things ``onnx.utils.extract_model`` does not handle, and why this module exists:

* nodes with subgraphs (``If`` / ``Loop`` / ``Scan`` bodies) read tensors of the enclosing graph without
  listing them as inputs. They are uses all the same: such a tensor crosses a cut between its producer
  and the node, and a segment holding the node needs its producer (or carries it as an input) and the
  initializers its bodies read. Here every node's inputs include these implicit ones.
* a tensor made by an operator ONNX's shape inference does not know (a ``com.microsoft`` contrib op such
  as ``Gelu``, a custom domain) has no type or shape, and nothing after it has one either. The missing
  types and shapes of the tensors that cross a cut are measured by a probe run in onnxruntime at batch 1
  and 2 (the dimensions that follow the batch are the symbolic ones).

Model-local functions are carried whole: a segment holds every function its nodes (and their bodies)
call. A cut names a tensor of the main graph; a tensor inside a subgraph or a function is not a cut.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .graph import SplitError

BATCH_DIM = "batch"


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` (a subgraph body) reads from enclosing scopes."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    refs: set[str] = set()
    for node in graph.node:
        refs.update(t for t in node_inputs(node) if t and t not in local)
        local.update(node.output)
    return refs


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs: the listed ones, then (sorted) the enclosing-graph tensors its subgraphs read."""
    implicit = set()
    for g in _subgraphs(node):
        implicit |= _outer_refs(g)
    return [t for t in node.input if t] + sorted(implicit - set(node.input))


@dataclass
class Order:
    """The main graph in node order: ``inputs`` (not initializers), where each tensor is produced
    (graph inputs at -1) and last used (graph outputs at ``len(nodes)``)."""

    inputs: list[str]
    produced_at: dict[str, int]
    last_use: dict[str, int]
    inner: dict[str, str]  # tensor made inside a subgraph -> the main-graph node that owns the subgraph

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "Order":
        g = model.graph
        inits = {i.name for i in g.initializer}
        inputs = [i.name for i in g.input if i.name not in inits]
        produced_at = {n: -1 for n in inputs}
        last_use: dict[str, int] = {}
        inner: dict[str, str] = {}
        for i, node in enumerate(g.node):
            for t in node_inputs(node):
                if t in produced_at:
                    last_use[t] = i
            for t in node.output:
                if t:
                    produced_at[t] = i
            for sub in _subgraphs(node):
                for t in _produced_within(sub):
                    inner.setdefault(t, node.name or node.output[0])
        for o in g.output:
            last_use[o.name] = len(g.node)
        return cls(inputs, produced_at, last_use, inner)

    def crossing(self, tensor: str) -> list[str]:
        """Tensors crossing the cut right after the node that produces ``tensor``, in graph order.

        Raises SplitError for a tensor that is not a node output of the main graph, listing the nearest
        valid names (or naming the node whose subgraph computes it)."""
        if tensor in self.inner and tensor not in self.produced_at:
            raise SplitError(f"split tensor {tensor!r} is computed inside a subgraph (If/Loop/Scan body) of node "
                             f"{self.inner[tensor]!r}: a cut runs through the main graph; cut before or after "
                             "that node (its outputs are valid split tensors)")
        if tensor not in self.produced_at or tensor in self.inputs:
            names = [t for t in self.produced_at if t not in self.inputs]
            near = difflib.get_close_matches(tensor, names, n=5, cutoff=0.0)
            raise SplitError(f"unknown split tensor {tensor!r}; nearest valid: {', '.join(near)} "
                             "('eetool inspect MODEL.onnx' lists them all)")
        pos = self.produced_at[tensor]
        return [t for t, p in self.produced_at.items() if p <= pos and self.last_use.get(t, -1) > pos]


def _produced_within(graph: onnx.GraphProto) -> set[str]:
    out = set()
    for node in graph.node:
        out.update(t for t in node.output if t)
        for sub in _subgraphs(node):
            out |= _produced_within(sub)
    return out


# ---------------------------------------------------------------------------------- types and shapes
def _complete(vi: onnx.ValueInfoProto | None) -> bool:
    """A known element type and every dimension after the first (the batch) fixed: what a cut needs to
    size the wire. (A size symbolic beyond the batch, e.g. after a dynamically computed Pad, is probed.)"""
    if vi is None or not vi.type.HasField("tensor_type"):
        return False
    tt = vi.type.tensor_type
    return tt.elem_type != 0 and tt.HasField("shape") and all(
        d.HasField("dim_value") and d.dim_value > 0 for d in tt.shape.dim[1:])


def _inferred(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError:  # an unknown op makes strict inference fail: keep what is declared
        pass
    g = model.graph
    return {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}


def probe_inputs(model: onnx.ModelProto, input_shape: tuple | None, data: np.ndarray | None,
                 batch: int) -> dict[str, np.ndarray]:
    """Inputs for a probe run at ``batch``: the first samples of ``data`` when given, else zeros of the
    model's declared input shape (``input_shape`` fills dimensions the model leaves symbolic).

    Raises SplitError when a dimension other than the batch is unknown."""
    order = Order.of(model)
    vi = {v.name: v for v in model.graph.input}
    name = order.inputs[0]
    if data is not None and len(data) >= batch:
        return {name: np.ascontiguousarray(data[:batch])}
    dims = vi[name].type.tensor_type.shape.dim
    shape = []
    for k, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value if k else batch)
        elif k == 0:
            shape.append(batch)
        elif input_shape is not None and len(input_shape) == len(dims):
            shape.append(int(input_shape[k]))
        else:
            raise SplitError(f"input {name!r} has an unknown dimension {k} ({d.dim_param or '?'}): give the "
                             "model's input size with --input-shape (e.g. 1,3,224,224)")
    elem = vi[name].type.tensor_type.elem_type
    return {name: np.zeros(shape, helper.tensor_dtype_to_np_dtype(elem))}


def tensor_infos(model: onnx.ModelProto, names: list[str], input_shape: tuple | None = None,
                 data: np.ndarray | None = None) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape (batch dimension symbolic, ``"batch"``) of each tensor in ``names``: ONNX shape
    inference where it knows them, else a probe run of the whole model in onnxruntime at batch 1 and 2
    on ``data`` (float32 in the model's layout) or zeros of the input shape.

    Raises SplitError naming the tensors when the probe cannot run."""
    known = _inferred(model)
    out = {n: known[n] for n in names if _complete(known.get(n))}
    missing = [n for n in names if n not in out]
    if not missing:
        return out
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in missing if n not in declared)
    batches = (1, 2)
    first = probe_inputs(model, input_shape, data, 1)
    fixed_batch = first[next(iter(first))].shape[0] != 1 or _fixed_batch(model)
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        runs = [sess.run(missing, first)]
        if not fixed_batch:
            runs.append(sess.run(missing, probe_inputs(model, input_shape, data, batches[1])))
    except Exception as e:  # onnxruntime raises its own types; the message is what matters here
        raise SplitError(f"the type and shape of {', '.join(missing)} are not in the model (ONNX shape inference "
                         f"does not know the operator that makes {'it' if len(missing) == 1 else 'them'}) and a "
                         f"probe run in onnxruntime failed: {str(e).strip().splitlines()[0]}") from None
    for k, name in enumerate(missing):
        a = runs[0][k]
        if not isinstance(a, np.ndarray):
            raise SplitError(f"tensor {name!r} is a {type(a).__name__}, not a tensor: a cut carries tensors only")
        dims = list(a.shape)
        if len(runs) > 1:
            dims = [BATCH_DIM if d1 != d2 else d1 for d1, d2 in zip(a.shape, runs[1][k].shape)]
        out[name] = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), dims)
    return out


def _fixed_batch(model: onnx.ModelProto) -> bool:
    vi = {v.name: v for v in model.graph.input}
    dims = vi[Order.of(model).inputs[0]].type.tensor_type.shape.dim
    return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0


def value_shape(vi: onnx.ValueInfoProto) -> list:
    """Shape of a value info: ints, ``None`` for symbolic dimensions."""
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def value_dtype(vi: onnx.ValueInfoProto) -> str:
    return helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name


# ----------------------------------------------------------------------------------------------- cost
def node_flops(model: onnx.ModelProto, infos: dict[str, onnx.ValueInfoProto]) -> list[int]:
    """FLOPs of each main-graph node for one sample, by PyTorch's ``FlopCounterMode`` convention (so an
    ONNX export and its PyTorch model count the same): 2 per multiply-accumulate of Conv, ConvTranspose,
    Gemm and MatMul, bias and element-wise ops not counted. Symbolic dimensions count as 1 (the batch)."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}

    def shape(t):
        if t in inits:
            return inits[t]
        return [d or 1 for d in value_shape(infos[t])] if t in infos else None

    out = []
    for node in model.graph.node:
        flops = 0
        ins = [shape(t) for t in node.input[:2]] if len(node.input) >= 2 else []
        y = shape(node.output[0]) if node.output else None
        if len(ins) == 2 and None not in ins and y is not None:
            a, w = ins
            if node.op_type == "Conv":
                flops = 2 * int(np.prod(y[1:])) * int(np.prod(w[1:]))
            elif node.op_type == "ConvTranspose":
                flops = 2 * int(np.prod(a[1:])) * int(np.prod(w[1:]))
            elif node.op_type == "Gemm":
                trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
                flops = 2 * int(np.prod(y)) * int(a[0] if trans_a else a[-1])
            elif node.op_type == "MatMul":
                flops = 2 * int(np.prod(y)) * int(a[-1])
        out.append(flops)
    return out


# ---------------------------------------------------------------------------------------- extraction
def _functions_called(model: onnx.ModelProto, nodes) -> list[onnx.FunctionProto]:
    table = {(f.domain, f.name): f for f in model.functions}
    found: dict = {}
    queue = list(nodes)
    while queue:
        node = queue.pop()
        for sub in _subgraphs(node):
            queue.extend(sub.node)
        f = table.get((node.domain, node.op_type))
        if f is not None and (f.domain, f.name) not in found:
            found[(f.domain, f.name)] = f
            queue.extend(f.node)
    return [f for key, f in table.items() if key in found]  # the model's order


def extract_segment(model: onnx.ModelProto, inputs: list[str], outputs: list[str],
                    infos: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs``: the nodes they need (following
    subgraph reads too), the initializers those nodes and their bodies read, the local functions they
    call, and ``infos`` (type and shape) for every input and output. An output may also be an input
    (a tensor passed through to a later segment).

    Raises SplitError when the segment needs a tensor that is neither an input nor computed in it."""
    g = model.graph
    producer = {t: i for i, n in enumerate(g.node) for t in n.output if t}
    keep: set[int] = set()
    stack, seen = list(outputs), set(inputs)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in producer and producer[t] not in keep:
            keep.add(producer[t])
            stack.extend(node_inputs(g.node[producer[t]]))
    nodes = [g.node[i] for i in sorted(keep)]
    made = {t for n in nodes for t in n.output}
    read = {t for n in nodes for t in node_inputs(n)}
    inits = [i for i in g.initializer if i.name in read and i.name not in inputs]
    lacking = sorted(read - set(inputs) - made - {i.name for i in inits})
    if lacking:
        raise SplitError(f"segment {name} needs {', '.join(lacking)}, which neither crosses the cut nor is "
                         "computed in it")
    inner = [infos[t] for t in sorted(made) if t in infos and t not in outputs]
    graph = helper.make_graph(nodes, name, [infos[t] for t in inputs], [infos[t] for t in outputs], inits,
                              value_info=inner)
    seg = helper.make_model(graph, opset_imports=list(model.opset_import),
                            functions=_functions_called(model, nodes), ir_version=model.ir_version,
                            producer_name="eetool")
    onnx.checker.check_model(seg)
    return seg

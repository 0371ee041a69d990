"""Slice a traced model at an ordered list of cuts into a chain of segment modules.

Segment ``k`` computes the graph nodes after cut ``k-1`` up to and including cut ``k``. Its inputs are the
tensors crossing cut ``k-1`` (the model input for the first segment), its outputs the tensors crossing
cut ``k`` (the model output for the last). Tensors are named so that a graph output and the next graph's
input share one name: a single-tensor cut's tensor takes the cut name (``blocks.5``); other crossing
tensors keep their traced node name (``layer3_0_relu``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .graph import Cut, SplitError, TracedModel

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class Segment:
    """One graph of the chain: ``module`` maps ``inputs`` (tensor names, in argument order) to a tuple of
    ``outputs`` (tensor names, in result order). ``until`` is the cut it ends at (``None`` for the last)."""

    name: str
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    after: str | None
    until: str | None


def order_cuts(traced: TracedModel, names: list[str]) -> list[Cut]:
    """Resolve cut names to :class:`Cut` objects in graph order; duplicates (names for one position) fold.

    Raises :class:`SplitError` for unknown names (listing the nearest valid ones)."""
    cuts: dict[int, Cut] = {}
    for name in names:
        cut = traced.cut(name)
        cuts.setdefault(cut.position, cut)
    return [cuts[p] for p in sorted(cuts)]


def tensor_names(traced: TracedModel, cuts: list[Cut]) -> dict[str, str]:
    """fx node name -> public tensor name for every tensor crossing any cut, plus input and output."""
    names = {traced.placeholders[0].name: INPUT_NAME}
    for cut in cuts:
        for node in cut.crossing:
            names.setdefault(node, node)
        if cut.single_tensor:
            # nn.Sequential children are named "0", "1", ...: a bare number is not a usable tensor name
            names[cut.crossing[0]] = cut.name if not cut.name.isdigit() else f"out_{cut.name}"
    return names


def slice_model(traced: TracedModel, cuts: list[Cut]) -> list[Segment]:
    """Build ``len(cuts) + 1`` segments. Raises :class:`SplitError` when the model has several inputs or
    outputs (eetool slices single-input, single-output classifiers)."""
    if len(traced.placeholders) != 1:
        raise SplitError(f"the model takes {len(traced.placeholders)} inputs; eetool slices single-input models")
    out_args = traced.output_node.args[0]
    if not isinstance(out_args, fx.Node):
        raise SplitError("the model returns several values; export a wrapper that returns one logits tensor")
    public = tensor_names(traced, cuts)
    bounds = [-1] + [c.position for c in cuts] + [len(traced.nodes) - 1]
    segments = []
    for k in range(len(bounds) - 1):
        inputs = [traced.placeholders[0].name] if k == 0 else cuts[k - 1].crossing
        outputs = [out_args.name] if k == len(cuts) else cuts[k].crossing
        gm = _build(traced, inputs, outputs, bounds[k] + 1, bounds[k + 1], public)
        segments.append(Segment(
            name=f"seg{k}", module=gm,
            inputs=[public[n] for n in inputs],
            outputs=[public[n] for n in outputs] if k < len(cuts) else [OUTPUT_NAME],
            after=cuts[k - 1].name if k > 0 else None,
            until=cuts[k].name if k < len(cuts) else None,
        ))
    return segments


def _build(traced: TracedModel, inputs: list[str], outputs: list[str], start: int, stop: int,
           public: dict[str, str]) -> fx.GraphModule:
    """Copy nodes ``start..stop`` (inclusive) into a new graph with ``inputs`` as placeholders."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in inputs:
        env[name] = graph.placeholder(_identifier(public.get(name, name)))
    src = {n.name: n for n in traced.gm.graph.nodes}

    def arg(node: fx.Node) -> fx.Node:
        if node.name not in env:
            if node.op != "get_attr":
                raise SplitError(f"segment needs tensor {node.name!r} that does not cross its input cut")
            env[node.name] = graph.node_copy(node, arg)
        return env[node.name]

    for node in traced.nodes[start: stop + 1]:
        if node.op == "placeholder":
            continue
        env[node.name] = graph.node_copy(node, arg)
    results = []
    for name in outputs:
        value = arg(src[name])
        if value.op == "placeholder":  # a tensor passing straight through this segment
            value = graph.call_function(torch.clone, (value,))
        results.append(value)
    graph.output(tuple(results) if len(results) > 1 else results[0])
    graph.lint()
    return fx.GraphModule(traced.gm, graph).eval()


def _identifier(name: str) -> str:
    return "t_" + "".join(ch if ch.isalnum() else "_" for ch in name)

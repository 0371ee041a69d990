"""``eetool inspect``: every candidate split point of a model with what crossing it costs.

Per cut: output shape, bytes per sample on the wire in fp32 and int8, cumulative head MFLOPs and
parameters, tail MFLOPs, and whether a single tensor crosses (else which tensors do).
"""
from __future__ import annotations

import torch
from torch import fx

from .flops import node_flops
from .graph import TracedModel


def _params_by_position(traced: TracedModel) -> list[int]:
    """Parameter/buffer scalars first used at each node position (each counted once)."""
    gm = traced.gm
    seen: set[str] = set()
    per = []
    for n in traced.nodes:
        count = 0
        refs = []
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            refs = [(f"{n.target}.{k}", v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())]
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                refs.append((a.target, _attr(gm, a.target)))
        for key, value in refs:
            if key not in seen and isinstance(value, torch.Tensor):
                seen.add(key)
                count += value.numel()
        per.append(count)
    return per


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def split_table(model: torch.nn.Module, input_shape: tuple[int, ...], depth: int = 2) -> dict:
    """Rows for every candidate cut of ``model`` on a zero input of ``input_shape`` (NCHW, batch 1).

    Returns ``{"input_shape", "total_mflops", "total_params", "input_bytes_fp32", "rows": [...]}`` with per
    row: ``name``, ``aliases``, ``shape`` (list, batch 1), ``bytes_fp32``, ``bytes_int8`` (per sample),
    ``head_mflops``, ``head_params``, ``tail_mflops``, ``single_tensor``, ``crossing`` (tensor names)."""
    sample = torch.zeros(input_shape)
    traced = TracedModel(model, sample)
    flops = node_flops(traced.gm, sample)
    per_pos_flops = [flops.get(n.name, 0) for n in traced.nodes]
    per_pos_params = _params_by_position(traced)
    total_f, total_p = sum(per_pos_flops), sum(per_pos_params)
    rows = []
    for cut in traced.candidates(depth):
        head_f = sum(per_pos_flops[: cut.position + 1])
        elems = cut.elements_per_sample()
        rows.append({
            "name": cut.name, "aliases": cut.aliases,
            "shape": list(cut.shapes[0]) if cut.single_tensor else [list(s) for s in cut.shapes],
            "bytes_fp32": 4 * elems, "bytes_int8": elems,
            "head_mflops": head_f / 1e6, "head_params": sum(per_pos_params[: cut.position + 1]),
            "tail_mflops": (total_f - head_f) / 1e6,
            "single_tensor": cut.single_tensor, "crossing": cut.crossing,
        })
    n_in = 1
    for d in input_shape[1:]:
        n_in *= d
    return {"input_shape": list(input_shape), "total_mflops": total_f / 1e6, "total_params": total_p,
            "input_bytes_fp32": 4 * n_in, "rows": rows}


def render_table(table: dict, title: str):
    """A rich Table of :func:`split_table`'s rows."""
    from rich.table import Table

    t = Table(title=f"{title}: split points (input {tuple(table['input_shape'])}, "
                    f"{table['total_mflops']:.1f} MFLOPs, {table['total_params'] / 1e6:.2f} M params)")
    for col, just in [("split point", "left"), ("output shape", "left"), ("fp32 B/sample", "right"),
                      ("int8 B/sample", "right"), ("head MFLOPs", "right"), ("head params", "right"),
                      ("tail MFLOPs", "right"), ("single tensor", "left")]:
        t.add_column(col, justify=just)
    for r in table["rows"]:
        name = r["name"] + (f" (= {', '.join(r['aliases'])})" if r["aliases"] else "")
        shape = "x".join(map(str, r["shape"][1:])) if r["single_tensor"] else f"{len(r['crossing'])} tensors"
        single = "yes" if r["single_tensor"] else "no: " + ", ".join(r["crossing"])
        t.add_row(name, shape, f"{r['bytes_fp32']:,}", f"{r['bytes_int8']:,}", f"{r['head_mflops']:.1f}",
                  f"{r['head_params']:,}", f"{r['tail_mflops']:.1f}", single)
    return t

"""Compute cost per graph node, counted by ``torch.utils.flop_counter.FlopCounterMode``.

FLOPs follow PyTorch's counter: 2 per multiply-accumulate for convolutions and matmuls; element-wise ops
(activations, additions, batch norm at inference) are not counted, as in the EfficientNet and Neurosurgeon
papers' cost models.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode


class _FlopInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.flops[n.name] = counter.get_total_flops()
        return result


def node_flops(gm: fx.GraphModule, sample: torch.Tensor) -> dict[str, int]:
    """FLOPs per fx node name for one forward pass on ``sample`` (batch 1 recommended)."""
    interp = _FlopInterpreter(gm)
    with torch.no_grad():
        interp.run(sample)
    return interp.flops


def module_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Total FLOPs of ``module(*inputs)`` (one forward pass, no grad)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


def param_count(gm: fx.GraphModule) -> int:
    """Number of parameter and buffer scalars a (segment) graph module holds, batch-norm stats included."""
    return sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers())

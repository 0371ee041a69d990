"""Recompute BatchNorm running statistics, and centre a classifier's logits, on real inputs.

A randomly initialised network keeps BatchNorm's initial statistics (mean 0, variance 1), which do not
match its own activations: the signal grows or collapses from block to block and the logits of every
image end up nearly alike (a random ResNet-18 predicts a handful of classes on any photo set). Replacing
the running mean and variance by the statistics of the network's own activations on real images, layer
by layer in forward order, gives a network whose outputs vary with the image, which makes agreement
between a float graph and its int8 version a meaningful measure without trained weights. The procedure
is AdaBN's (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016: statistics
re-estimated on the target data), applied to a random network; weights and BatchNorm's affine parameters
are not touched. :func:`center_logits` does the same for the classifier's output, which has no BatchNorm.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def recompute_batchnorm_stats(model: nn.Module, x: np.ndarray, batch: int = 32) -> nn.Module:
    """Set every BatchNorm layer's ``running_mean`` / ``running_var`` to the statistics of its input on
    ``x``, in place.

    ``x``: float32 model inputs, e.g. NCHW ``(N, 3, H, W)`` preprocessed images; ``N >= 2``. Each layer's
    statistics are the average over the batches of the batch's per-channel mean and unbiased variance
    (BatchNorm's cumulative average, ``momentum=None``); with ``batch >= N`` they are exactly the mean and
    unbiased variance over all of ``x``. Returns ``model`` in eval mode with its original momenta. Raises ValueError when ``x`` has fewer than 2 samples or the
    model has no BatchNorm layer.
    """
    if len(x) < 2:
        raise ValueError(f"BatchNorm statistics need at least 2 samples, got {len(x)}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("the model has no BatchNorm layer whose statistics could be recomputed")
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    model.train()
    try:
        with torch.no_grad():
            # batches of at least 2 (a 1-sample batch has no variance); the last batch absorbs a remainder of 1
            starts = list(range(0, len(x), batch))
            if len(x) - starts[-1] < 2 and len(starts) > 1:
                starts.pop()
            for i, s in enumerate(starts):
                end = starts[i + 1] if i + 1 < len(starts) else len(x)
                model(torch.from_numpy(np.ascontiguousarray(x[s:end], dtype=np.float32)))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return model


def center_logits(model: nn.Module, x: np.ndarray, batch: int = 32) -> nn.Module:
    """Shift the bias of ``model``'s last ``nn.Linear`` layer (the classifier) so that every logit has mean 0
    over ``x``, in place; returns ``model`` in eval mode.

    A random classifier on the non-negative pooled features of a ReLU network adds the same large
    component ``W @ mean(feature)`` to the logits of every image, so one or two classes win everywhere;
    removing the mean leaves logits driven by how each image differs from the others (the mean-only
    analogue of recomputing BatchNorm statistics). ``x``: float32 model inputs, ``(N, ...)``, ``N >= 1``.
    Raises ValueError when the model has no ``nn.Linear`` layer or it has no bias.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ValueError("center_logits needs a final nn.Linear layer with a bias (the classifier)")
    fc, outs = linears[-1], []
    handle = fc.register_forward_hook(lambda _m, _a, out: outs.append(out.reshape(-1, out.shape[-1])))
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch):
                model(torch.from_numpy(np.ascontiguousarray(x[s:s + batch], dtype=np.float32)))
            fc.bias -= torch.cat(outs).mean(0)
    finally:
        handle.remove()
    return model


__all__ = ["center_logits", "recompute_batchnorm_stats"]

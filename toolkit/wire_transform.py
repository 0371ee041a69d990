"""Transform coding of the split feature (``eetool export --wire-transform klt``).

The Karhunen-Loeve transform (KLT: the PCA rotation across channels, computed in closed form from the
split feature over the representative data, no training) decorrelates the C channels of the NCHW feature
and sorts the variance into the first components. A quantiser with one step for every component then
spends few codes on the weak components, and the entropy coder fewer bytes on them (transform coding:
Huang & Schultheiss, IEEE Trans. Commun. Syst. 1963; Goyal, "Theoretical foundations of transform
coding", IEEE Signal Processing Magazine 2001: at high rate an orthonormal transform lowers the rate by
half the log ratio of the arithmetic to the geometric mean of the component variances).

The rotation is baked into the graphs: the device graph ends with ``y = V^T (x - mean)`` (a 1x1
convolution over the channels) and the server graph begins with its exact inverse ``x = V y + mean``, so
the runtime, the wire codec and the protocol see an ordinary feature map (named ``klt``) and nothing in
them changes. It costs ``2 C^2 H W`` FLOPs on each side (2.5 MFLOPs per sample for EfficientNet-Lite0's
80x14x14 feature after ``blocks.5``, 1 % of its head).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from runtime.manifest import WireTransform

from .graph import TracedModel
from .slicing import order_cuts, slice_model
from .sources import ModelSource

#: the cut between device and server in a model with the transform (the forward transform's output)
CUT = "klt"
_BATCH = 32


class WireTransformError(ValueError):
    """The transform cannot be used at this split (several tensors cross it, not NCHW, not enough data)."""


def klt_basis(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The KLT of the channels of ``features``, float32 ``(N, C, H, W)`` (every pixel of every sample is one
    C-vector). Returns ``(mean (C,), basis (C, C), variances (C,))``, float64: the columns of ``basis`` are
    orthonormal eigenvectors of the channel covariance, in order of decreasing variance (``variances``);
    each sign is fixed so that the column's largest entry is positive (a deterministic result).

    Memory: the sums are accumulated one sample at a time in float64, so only one sample's rows are copied.

    Raises WireTransformError for a tensor that is not 4-D or has no more vectors than channels."""
    x = np.asarray(features)
    if x.ndim != 4:
        raise WireTransformError(f"the KLT needs an NCHW feature map, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n * h * w <= c:
        need = c // (h * w) + 1
        raise WireTransformError(f"{n} samples of {h}x{w} give {n * h * w} feature vectors, too few to estimate a "
                                 f"{c}x{c} covariance; give --calib-samples {need} or more")
    total, outer = np.zeros(c), np.zeros((c, c))
    for sample in x:
        rows = sample.reshape(c, -1).astype(np.float64)  # (C, H*W)
        total += rows.sum(axis=1)
        outer += rows @ rows.T
    count = n * h * w
    mean = total / count
    cov = (outer - count * np.outer(mean, mean)) / (count - 1)
    variances, basis = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(variances)[::-1]
    variances, basis = np.clip(variances[order], 0.0, None), basis[:, order]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(c)])
    return mean, basis * np.where(signs == 0, 1.0, signs), variances


class ChannelAffine(nn.Module):
    """``y = W x + b`` over the channels of an NCHW float32 tensor (a 1x1 convolution with fixed weights):
    ``W`` (C_out, C_in), ``b`` (C_out,). Input ``(N, C_in, H, W)``, output ``(N, C_out, H, W)``."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        w = torch.as_tensor(np.asarray(weight, np.float32))
        self.conv = nn.Conv2d(w.shape[1], w.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(w[:, :, None, None])
            self.conv.bias.copy_(torch.as_tensor(np.asarray(bias, np.float32)))
        self.conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def forward_transform(mean: np.ndarray, basis: np.ndarray) -> ChannelAffine:
    """``y = V^T (x - mean)``: the KLT coefficients of an NCHW feature (``basis`` V from :func:`klt_basis`)."""
    return ChannelAffine(basis.T, -basis.T @ mean)


def inverse_transform(mean: np.ndarray, basis: np.ndarray) -> ChannelAffine:
    """``x = V y + mean``: the feature back from its KLT coefficients (exact up to float rounding)."""
    return ChannelAffine(basis, mean)


class TransformModel(nn.Module):
    """The original model cut at the split with the transform in between: ``head`` -> ``klt`` (device side)
    -> ``inverse`` -> ``tail`` (server side). Input float32 ``(N, C, H, W)`` as the original model's; output
    its logits, equal to the original's up to float rounding. The split point for export is ``klt``."""

    def __init__(self, head: nn.Module, klt: ChannelAffine, inverse: ChannelAffine, tail: nn.Module):
        super().__init__()
        self.head, self.klt, self.inverse, self.tail = head, klt, inverse, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.inverse(self.klt(self.head(x))))


def _head_tail(src: ModelSource, split: str) -> tuple[nn.Module, nn.Module, tuple]:
    traced = TracedModel(src.model.eval(), torch.zeros(src.input_shape))
    cut = traced.cut(split)  # SplitError (listing valid names) for an unknown one
    problem = cut.nchw_problem()
    if problem:
        raise WireTransformError(f"--wire-transform: split point {split!r} {problem}; the KLT rotates the channels "
                                 f"of one NCHW feature map")
    head, tail = slice_model(traced, order_cuts(traced, [split]))
    return head.module.eval(), tail.module.eval(), tuple(cut.shapes[0][1:])


def with_klt(src: ModelSource, split: list[str], calib_x: np.ndarray) -> tuple[ModelSource, list[str], WireTransform]:
    """(source whose model is ``src``'s with the KLT at the split, the cut list to export, the manifest's
    ``wire_transform`` entry). ``calib_x``: the representative inputs, float32 ``(N, C, H, W)``; the basis is
    computed from the head's output over them.

    Raises WireTransformError for more than one split point or an unusable cut, SplitError for an unknown
    name."""
    if len(split) != 1:
        raise WireTransformError(f"--wire-transform works at one split point, got {','.join(split)}")
    head, tail, shape = _head_tail(src, split[0])
    with torch.no_grad():
        feats = np.concatenate([head(torch.from_numpy(calib_x[i:i + _BATCH])).numpy()
                                for i in range(0, len(calib_x), _BATCH)])
    mean, basis, variances = klt_basis(feats)
    model = TransformModel(head, forward_transform(mean, basis), inverse_transform(mean, basis), tail).eval()
    total = float(variances.sum()) or 1.0
    section = WireTransform(kind="klt", split=split[0], cut=CUT, shape=list(shape), samples=int(len(calib_x)),
                            variance=[float(f"{v:.4g}") for v in variances],
                            explained=[float(f"{v:.4g}") for v in np.cumsum(variances) / total])
    return dataclasses.replace(src, model=model), [CUT], section


__all__ = ["CUT", "WireTransformError", "klt_basis", "ChannelAffine", "forward_transform",
           "inverse_transform", "TransformModel", "with_klt"]

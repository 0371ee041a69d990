"""Exit confidence rules (numpy only, shared by the runtime and threshold calibration).

* ``max_softmax``: confidence = max softmax probability; exit when ``conf >= threshold``.
* ``normalized_entropy``: softmax entropy / log(C) in [0, 1]; exit when ``ent <= threshold``
  (BranchyNet, Teerapittayanon, McDanel & Kung, ICPR 2016, sec. III-B).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

RULES = ("max_softmax", "normalized_entropy")


def _check_logits(logits) -> np.ndarray:
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError("logits must be (N, C) with C >= 2, got shape %s" % (z.shape,))
    bad = ~np.isfinite(z)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise ValueError("logits contain %d NaN/inf values in %d of %d rows" % (int(bad.sum()), rows, z.shape[0]))
    return z.astype(np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)  # stable: largest exponent is 0
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def max_softmax(logits) -> np.ndarray:
    """Max softmax probability. float32 ``(N, C)`` logits -> float32 ``(N,)`` in [1/C, 1].

    Raises ValueError for non-2-D input, C < 2, or NaN/inf logits (message gives the count)."""
    z = _check_logits(logits)
    z = z - z.max(axis=1, keepdims=True)
    return (1.0 / np.exp(z).sum(axis=1)).astype(np.float32)


def normalized_entropy(logits) -> np.ndarray:
    """Softmax entropy divided by log(C). float32 ``(N, C)`` -> float32 ``(N,)`` in [0, 1]; uniform
    logits give 1.0, a one-hot-like output ~0. Exit when <= threshold (BranchyNet, 2016).

    Raises ValueError like :func:`max_softmax`."""
    z = _check_logits(logits)
    logp = _log_softmax(z)
    h = -(np.exp(logp) * logp).sum(axis=1) / math.log(z.shape[1])
    return np.clip(h, 0.0, 1.0).astype(np.float32)


def confidence(logits, rule: str) -> np.ndarray:
    """:func:`max_softmax` or :func:`normalized_entropy` by name; ValueError for another name."""
    if rule == "max_softmax":
        return max_softmax(logits)
    if rule == "normalized_entropy":
        return normalized_entropy(logits)
    raise ValueError("rule must be one of %s, got %r" % (RULES, rule))


def passes(conf: np.ndarray, threshold: Optional[float], rule: str) -> np.ndarray:
    """Boolean ``(N,)``: which samples exit at ``threshold`` under ``rule`` (None: none)."""
    if threshold is None:
        return np.zeros(np.shape(conf), dtype=bool)
    return conf >= threshold if rule == "max_softmax" else conf <= threshold


def sigmoid(logits) -> np.ndarray:
    """Logistic function, float32 in and out, any shape (numerically stable for large |x|): the Exit
    Predictor's logits -> probabilities in [0, 1]."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)

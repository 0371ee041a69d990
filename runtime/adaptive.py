"""Thresholds as a function of bandwidth: the regression models of latency-aware early exiting, evaluated
on the device (numpy only, Python 3.8).

Dong, Mao & Zhang, "Resource-Constrained Edge AI with Early Exit Prediction" (arXiv:2206.07269, 2022),
latency-aware inference: offline, the Exit Predictor's prediction thresholds and the exits' confidence
thresholds are chosen for a grid of bandwidths (most accurate under a latency budget, eq. 3 and 11);
simple regression models fitted to those choices give the thresholds for any bandwidth at run time,
without a search on the device.

The model stored in the manifest (``latency_adaptation``, written by :mod:`calibration.predictor_thresholds`)
holds, per graph format ``<format>/<precision>``, one regression per threshold in ``x = log10(bandwidth in
Mbit/s)``, ``x`` clamped to the fitted bandwidth range (no extrapolation), of one of two kinds:

* ``polynomial``: ``value(x) = sum_i coefficients[i] * x**i`` (least squares over the grid);
* ``piecewise-linear``: straight lines between the grid's choices (``knots`` = the grid's x values), exact
  at every grid bandwidth.

Values outside the meaningful range encode "off", so that the same regression can switch an exit or the
gate off:

* confidence threshold of an exit (``exits``): ``max_softmax`` exits when confidence >= value; a value
  > 1 switches the exit off. ``normalized_entropy`` exits when entropy <= value; a value < 0 switches it
  off. In range, the value is used as it is.
* prediction threshold of an exit (``gates``): the exit's branch runs only when the predictor's score
  (probability, in [0, 1]) >= value; a value <= 0 means "not gated" (the branch always runs). When no exit
  is gated the predictor does not run at all.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

#: encoded value of "exit off" per rule (outside every confidence's range)
OFF = {"max_softmax": 1.05, "normalized_entropy": -0.05}


def encode_threshold(value: Optional[float], rule: str) -> float:
    """Confidence threshold (None = exit off) -> regression target."""
    return OFF[rule] if value is None else float(value)


def decode_threshold(value: float, rule: str) -> Optional[float]:
    """Regression output -> confidence threshold in [0, 1] or None (exit off); see the module docstring."""
    if rule == "max_softmax":
        return None if value > 1.0 else max(0.0, float(value))
    if rule == "normalized_entropy":
        return None if value < 0.0 else min(1.0, float(value))
    raise ValueError("rule must be max_softmax or normalized_entropy, got %r" % (rule,))


def encode_gate(value: Optional[float]) -> float:
    """Prediction threshold (None = not gated) -> regression target."""
    return 0.0 if value is None else float(value)


def decode_gate(value: float) -> Optional[float]:
    """Regression output -> prediction threshold in (0, 1] or None (not gated)."""
    return None if value <= 0.0 else min(1.0, float(value))


def polyval(coefficients: Sequence[float], x: float) -> float:
    """``sum_i coefficients[i] * x**i`` (lowest order first)."""
    return float(sum(float(c) * x ** i for i, c in enumerate(coefficients)))


def thresholds_for(model: dict, bandwidth_mbps: float) -> Tuple[Dict[str, Optional[float]], Dict[str, Optional[float]]]:
    """Confidence thresholds and prediction thresholds for ``bandwidth_mbps`` (Mbit/s, > 0) from one graph
    format's regression ``model`` (``{"rule", "bandwidth_range_mbps": [lo, hi], "exits": {name: coefs},
    "gates": {name: coefs}}``). The bandwidth is clamped to the fitted range (no extrapolation).

    Returns ``({exit name: threshold or None}, {exit name: prediction threshold or None})``.
    Raises ValueError for a bandwidth <= 0 or a malformed model."""
    if not bandwidth_mbps > 0 or math.isinf(bandwidth_mbps):
        raise ValueError("bandwidth must be > 0 Mbit/s and finite, got %r" % (bandwidth_mbps,))
    try:
        lo, hi = (float(v) for v in model["bandwidth_range_mbps"])
        rule = model["rule"]
        exits = model["exits"]
        gates = model.get("gates") or {}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError("malformed latency adaptation model (%s): needs rule, bandwidth_range_mbps, exits" % e)
    x = math.log10(min(max(float(bandwidth_mbps), lo), hi))
    kind = model.get("kind", "polynomial")
    if kind == "polynomial":
        value = lambda c: polyval(c, x)  # noqa: E731
    elif kind == "piecewise-linear":
        knots = [float(k) for k in model["knots"]]
        value = lambda c: interpolate(knots, c, x)  # noqa: E731
    else:
        raise ValueError("unknown regression kind %r (polynomial or piecewise-linear)" % (kind,))
    th = {name: decode_threshold(value(c), rule) for name, c in exits.items()}
    gt = {name: decode_gate(value(c)) for name, c in gates.items()}
    return th, gt


def interpolate(knots: Sequence[float], values: Sequence[float], x: float) -> float:
    """Straight lines between ``(knots[i], values[i])`` (knots ascending); constant beyond the ends."""
    if len(knots) != len(values) or not knots:
        raise ValueError("piecewise-linear model: %d knots for %d values" % (len(knots), len(values)))
    if x <= knots[0]:
        return float(values[0])
    for (x0, y0), (x1, y1) in zip(zip(knots, values), zip(knots[1:], values[1:])):
        if x <= x1:
            return float(y0) + (float(y1) - float(y0)) * (x - x0) / ((x1 - x0) or 1.0)
    return float(values[-1])


def fit_polynomial(xs: Sequence[float], ys: Sequence[float], degree: int) -> List[float]:
    """Least-squares polynomial (lowest order first) of degree ``min(degree, len(xs) - 1)``."""
    import numpy as np

    deg = max(0, min(int(degree), len(xs) - 1))
    return [float(c) for c in np.polynomial.polynomial.polyfit(np.asarray(xs, float), np.asarray(ys, float), deg)]

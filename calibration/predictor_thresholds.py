"""Early exiting with the Exit Predictor: offline simulation, joint choice of the prediction and confidence
thresholds, and the latency-aware regression from bandwidth to thresholds. numpy only.

Dong, Mao & Zhang, "Resource-Constrained Edge AI with Early Exit Prediction" (arXiv:2206.07269, 2022):

* **Exit Predictor.** A low-complexity network runs on the device before the first exit and gives, for
  every early exit m, a score ``p_m`` in [0, 1]: the predicted probability that exit m's confidence passes
  its threshold (its training labels, :func:`toolkit.exit_predictor.exit_labels`). Exit m's branch is
  evaluated only when ``p_m >= gamma_m`` (the *prediction threshold*); a sample scored below every
  ``gamma_m`` is "hard" and bypasses every branch, so it no longer pays for exits it would pass anyway.
  A sample leaves at the first evaluated exit whose confidence passes its threshold ``tau_m``.
* **Expected cost** (their eq. 3, extended by the predictor): per sample, predictor + backbone up to the
  exit taken + the branches actually evaluated on the way; the mean over a validation set is the expected
  device MFLOPs.
* **Objective.** The thresholds ``(tau, gamma)`` are chosen jointly for the highest accuracy under a
  device-computation budget (MFLOPs per sample) or a latency budget (expected end-to-end latency, eq. 11),
  or for the least cost at an accuracy drop <= delta.
* **Latency-aware inference.** The choice is repeated for a grid of bandwidths and simple regression
  models (here polynomials in log10 bandwidth, :mod:`runtime.adaptive`) map bandwidth to every threshold,
  so the device adapts without searching.

Notation: M early exits plus the final classifier (K = M + 1 outputs). Confidence thresholds: a float in
[0, 1] or None (exit off). Prediction thresholds ("gates"): None (predictor not used: it does not run
and costs nothing) or a list of M entries, each a float in [0, 1] or None (that exit not gated).

Search: the joint problem is combinatorial; thresholds are taken from observed confidences / scores
(quantiles) and found by greedy coordinate descent on a Lagrangian ``cost - lambda * accuracy`` for a
range of lambda, every configuration visited is kept, and the best one meeting the constraint is polished
by constrained coordinate descent. Optimal per coordinate, not necessarily globally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from runtime.adaptive import encode_gate, encode_threshold, fit_polynomial, thresholds_for

from . import thresholds as T
from .thresholds import ExitProfile, passes

#: Lagrange multipliers (accuracy points traded per unit of normalised cost) swept to find candidates
LAMBDAS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.35, 0.6, 1.0, 2.0, 5.0, 1e3)


@dataclass
class PredictorProfile:
    """Exits plus Exit Predictor scores on a labelled validation set.

    Attributes:
        exits: the exits' :class:`calibration.thresholds.ExitProfile` (confidences, correctness, MFLOPs).
        scores: float ``(M, N)`` predictor probabilities in [0, 1], one row per early exit, or None
            (no predictor: only plain exits can be simulated).
        predictor_mflops: MFLOPs per sample of the predictor (paid by every sample when it runs).
    """

    exits: ExitProfile
    scores: Optional[np.ndarray] = None
    predictor_mflops: float = 0.0

    def __post_init__(self):
        if self.scores is not None:
            s = np.asarray(self.scores, dtype=np.float64)
            n = self.exits.correct.shape[1]
            if s.shape != (self.exits.num_exits, n):
                raise ValueError(f"predictor scores have shape {s.shape}, expected ({self.exits.num_exits}, {n}): "
                                 f"one row per early exit, one column per sample")
            if not np.isfinite(s).all() or s.min() < 0 or s.max() > 1:
                raise ValueError("predictor scores must be probabilities in [0, 1] (apply the sigmoid to its logits)")
            self.scores = s
        if self.predictor_mflops < 0:
            raise ValueError("predictor_mflops must be >= 0")

    @property
    def num_exits(self) -> int:
        return self.exits.num_exits

    @property
    def backbone_mflops(self) -> float:
        return self.exits.backbone_mflops


def _check_gates(profile: PredictorProfile, gates) -> list | None:
    if gates is None:
        return None
    if profile.scores is None:
        raise ValueError("prediction thresholds given but the profile has no predictor scores")
    g = list(gates)
    if len(g) != profile.num_exits:
        raise ValueError(f"need {profile.num_exits} prediction thresholds (one per early exit), got {len(g)}")
    for i, v in enumerate(g):
        if v is not None and not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"prediction threshold {i} = {v!r} is outside [0, 1]")
    return [None if v is None else float(v) for v in g]


@dataclass
class _Run:
    """Per-sample outcome of one simulation: exit index (M = final) and which branches were evaluated."""

    where: np.ndarray  # (N,) int
    evaluated: np.ndarray  # (M, N) bool, up to and including the exit taken
    result: dict = field(default_factory=dict)


def _run(profile: PredictorProfile, thresholds, gates, rule: str) -> _Run:
    ep = profile.exits
    th = T._check_thresholds(ep, thresholds, rule)
    g = _check_gates(profile, gates)
    m, n = ep.num_exits, ep.correct.shape[1]
    where = np.full(n, m, dtype=np.int64)
    left = np.ones(n, dtype=bool)
    evaluated = np.zeros((m, n), dtype=bool)
    for k, t in enumerate(th):
        if t is None:
            continue
        ev = left.copy()
        if g is not None and g[k] is not None:
            ev &= profile.scores[k] >= g[k]
        evaluated[k] = ev
        go = ev & passes(ep.conf[rule][k], t, rule)
        where[go] = k
        left &= ~go
    picked = ep.correct[where, np.arange(n)]
    seg_cum = np.cumsum(ep.segment_mflops)
    cost = seg_cum[where] + (evaluated * ep.branch_mflops[:m, None]).sum(0)
    if g is not None:
        cost = cost + profile.predictor_mflops
    counts = np.bincount(where, minlength=m + 1)
    hits = np.bincount(where, weights=picked, minlength=m + 1)
    enabled = np.array([t is not None for t in th])
    reached_enabled = enabled.any()
    bypass = float((~evaluated.any(0)).mean()) if (g is not None and reached_enabled) else 0.0
    expected = float(cost.mean())
    result = {"thresholds": th, "gates": g, "accuracy": float(picked.mean()),
              "exit_rates": (counts / n).tolist(),
              "exit_accuracy": [float(h / c) if c else None for h, c in zip(hits, counts)],
              "branch_rates": evaluated.mean(1).tolist(), "bypass_rate": bypass,
              "expected_mflops": expected, "mflops_ratio": expected / ep.backbone_mflops,
              "predictor_mflops": profile.predictor_mflops if g is not None else 0.0}
    return _Run(where, evaluated, result)


def simulate(profile: PredictorProfile, thresholds: Sequence[float | None], gates: Sequence[float | None] | None = None,
             rule: str = "max_softmax") -> dict:
    """Sequential early exiting with (``gates`` given) or without (``gates=None``) the Exit Predictor.

    Returns ``{"accuracy", "exit_rates": [K, sum 1], "exit_accuracy": [K or None], "branch_rates": [M:
    fraction of samples whose branch m ran], "bypass_rate": fraction of samples that evaluated no branch
    because the predictor routed them past every enabled exit they reached, "expected_mflops": mean
    device MFLOPs per sample (predictor + backbone up to the exit taken + evaluated branches; the final
    output counts the whole backbone, as when the device runs the tail itself), "mflops_ratio": versus the
    backbone alone, "predictor_mflops", "thresholds", "gates"}``.

    Raises ValueError for a wrong number of thresholds, values outside [0, 1], an unknown rule or gates
    without predictor scores.
    """
    return _run(profile, thresholds, gates, rule).result


# ------------------------------------------------------------------------------------------- latency

@dataclass
class LatencyModel:
    """Latencies (ms per sample) of device-edge co-inference with early exits and the Exit Predictor.

    Attributes:
        segments_ms: device backbone latency from one exit point to the next (M entries), optionally a
            last entry for the device compute after the last exit up to the split (M + 1 entries).
        exits_ms: latency of each exit branch (M entries).
        predictor_ms: latency of the predictor.
        server_ms: edge-server latency of the rest of the model.
        bytes_per_sample: bytes sent at the split per offloaded sample.
        rtt_ms: network round trip.
        source: where the latencies come from (board profile estimate or measured layer latencies).
    """

    segments_ms: list
    exits_ms: list
    predictor_ms: float
    server_ms: float
    bytes_per_sample: float
    rtt_ms: float = 0.0
    source: str = ""

    def tx_ms(self, bandwidth_mbps: float) -> float:
        """Round trip plus uplink serialisation of one sample's split tensor: ``rtt + bytes*8/bandwidth``."""
        if not bandwidth_mbps > 0:
            raise ValueError(f"bandwidth must be > 0 Mbit/s, got {bandwidth_mbps}")
        return self.rtt_ms + self.bytes_per_sample * 8.0 / (bandwidth_mbps * 1e3)

    def to_json(self) -> dict:
        return {"segments_ms": list(self.segments_ms), "exits_ms": list(self.exits_ms),
                "predictor_ms": self.predictor_ms, "server_ms": self.server_ms,
                "bytes_per_sample": self.bytes_per_sample, "rtt_ms": self.rtt_ms, "source": self.source}


def _latency_parts(profile: PredictorProfile, run: _Run, model: LatencyModel) -> tuple[float, float]:
    """``(a, p)`` with ``E[T](B) = a + p * (rtt + bytes*8/B)``: ``a`` the mean device time (+ server time of
    offloaded samples), ``p`` the offloaded share. Neither depends on the bandwidth."""
    m = profile.num_exits
    seg = np.asarray(model.segments_ms, dtype=np.float64)
    ex = np.asarray(model.exits_ms, dtype=np.float64)
    if ex.size != m or seg.size not in (m, m + 1):
        raise ValueError(f"latency model needs {m} exit and {m} or {m + 1} segment latencies, got {ex.size} and {seg.size}")
    cum = np.concatenate([np.cumsum(seg[:m]), [float(seg.sum())]])
    dev = cum[run.where] + (run.evaluated * ex[:, None]).sum(0)
    if run.result["gates"] is not None:
        dev = dev + model.predictor_ms
    p = float((run.where == m).mean())
    return float(dev.mean()) + p * model.server_ms, p


def expected_latency_ms(profile: PredictorProfile, run: _Run, model: LatencyModel, bandwidth_mbps: float) -> float:
    """Expected end-to-end latency (ms) of one simulated run, Dong, Mao & Zhang 2022, eq. (3) and (11)
    with the predictor added to every sample's device time::

        T_i = T_pred + sum_{j <= exit_i} T_seg(j) + sum_{j <= exit_i, evaluated} T_exit(j)       (leaves at an exit)
        T_i = T_pred + T_head + sum_{j evaluated} T_exit(j) + rtt + bytes*8/B + T_server         (offloaded)
        E[T] = mean_i T_i
    """
    a, p = _latency_parts(profile, run, model)
    return a + p * model.tx_ms(bandwidth_mbps)


# -------------------------------------------------------------------------------------------- search

def _conf_candidates(conf: np.ndarray, n: int) -> list:
    vals = np.unique(conf.astype(np.float64))
    if vals.size > n:
        vals = np.unique(np.quantile(vals, np.linspace(0.0, 1.0, n)))
    return [None] + [float(v) for v in np.clip(vals, 0.0, 1.0)]


@dataclass(frozen=True)
class _Stats:
    accuracy: float
    mflops: float
    lat_a: float  # see _latency_parts
    lat_p: float


class _Search:
    """Coordinate search over ``(tau_0..tau_{M-1}[, gamma_0..gamma_{M-1}])``; every configuration's accuracy
    and bandwidth-independent costs are cached, so one search serves every budget and bandwidth."""

    def __init__(self, profile: PredictorProfile, rule: str, max_candidates: int, model: LatencyModel | None = None):
        if rule not in T.RULES:
            raise ValueError(f"rule must be one of {T.RULES}, got {rule!r}")
        self.profile, self.rule, self.model = profile, rule, model
        m = profile.num_exits
        self.exit_cands = [_conf_candidates(profile.exits.conf[rule][k], max_candidates) for k in range(m)]
        self.gate_cands = ([_conf_candidates(profile.scores[k], max_candidates) for k in range(m)]
                           if profile.scores is not None else None)
        self.cache: dict[tuple, _Stats] = {}  # (use_predictor, x) -> stats

    def split(self, use_pred: bool, x: tuple):
        m = self.profile.num_exits
        return list(x[:m]), (list(x[m:]) if use_pred else None)

    def stats(self, use_pred: bool, x: tuple) -> _Stats:
        key = (use_pred, x)
        if key not in self.cache:
            th, g = self.split(use_pred, x)
            run = _run(self.profile, th, g, self.rule)
            a, p = _latency_parts(self.profile, run, self.model) if self.model is not None else (0.0, 0.0)
            self.cache[key] = _Stats(run.result["accuracy"], run.result["expected_mflops"], a, p)
        return self.cache[key]

    def descend(self, use_pred: bool, x0: tuple, score, feasible=lambda st: True, max_passes: int = 8) -> tuple:
        """Greedy coordinate descent minimising ``score(stats)`` over feasible configurations."""
        cands = self.exit_cands + (self.gate_cands if use_pred else [])
        x = tuple(x0)
        st = self.stats(use_pred, x)
        best = score(st) if feasible(st) else math.inf
        for _ in range(max_passes):
            changed = False
            for k in range(len(x)):
                for c in cands[k]:
                    if c == x[k]:
                        continue
                    trial = x[:k] + (c,) + x[k + 1:]
                    st = self.stats(use_pred, trial)
                    if not feasible(st):
                        continue
                    v = score(st)
                    if v < best - 1e-12:
                        x, best, changed = trial, v, True
            if not changed:
                break
        return x

    def explore(self, use_pred: bool, cost, scale: float, starts: Sequence[tuple] = ()) -> None:
        """Lagrangian descents ``cost/scale - lambda * 100 * accuracy`` for every lambda in :data:`LAMBDAS`,
        from "everything off" and from ``starts``; every configuration visited stays in the cache."""
        m = self.profile.num_exits
        off = (None,) * (2 * m if use_pred else m)
        for x0 in [off, *starts]:
            for lam in LAMBDAS:
                self.descend(use_pred, x0, lambda st, lam=lam: cost(st) / scale - lam * 100.0 * st.accuracy)

    def encode(self, use_pred: bool, x: tuple) -> np.ndarray:
        """The configuration as numbers (:mod:`runtime.adaptive` encoding), for distances between choices."""
        m = self.profile.num_exits
        th, g = self.split(use_pred, x)
        g = g or [None] * m
        return np.array([encode_threshold(t, self.rule) for t in th] + [encode_gate(v) for v in g])


def choose(profile: PredictorProfile, rule: str = "max_softmax", use_predictor: bool = True,
           budget: float | None = None, delta: float | None = None, latency: tuple | None = None,
           max_candidates: int = 60, near: np.ndarray | None = None, tie_tol: float = 0.0,
           search: _Search | None = None) -> dict:
    """Jointly choose confidence and prediction thresholds on the profile.

    Cost: expected device MFLOPs per sample, or with ``latency=(LatencyModel, bandwidths)`` the expected
    latency in ms (:func:`expected_latency_ms`; with several bandwidths the worst of them, i.e. fixed
    thresholds that must fit every one).

    * ``budget``: the highest accuracy whose cost fits the budget (MFLOPs or ms; the paper's objective);
    * ``delta``: the least cost at an accuracy >= final accuracy - delta.

    ``use_predictor=False`` chooses confidence thresholds only (plain early exits, predictor not run);
    with ``True`` the predictor may still end up unused (``gates`` None) when that is better. ``near`` and
    ``tie_tol``: among choices within ``tie_tol`` of the best accuracy (budget) or cost (delta), take the
    one closest to the encoded configuration ``near`` (smooth thresholds along a bandwidth grid).
    ``search``: a :class:`_Search` to reuse (its cache) across calls on the same profile.

    Returns :func:`simulate`'s dict plus ``rule``, ``final_accuracy``, ``use_predictor``, ``budget``,
    ``delta``, ``encoded`` and, with ``latency``, ``expected_ms`` (one per bandwidth) and ``bandwidth_mbps``.
    Raises ValueError: neither or both constraints, a budget no configuration meets, bad arguments.
    """
    if (budget is None) == (delta is None):
        raise ValueError("give exactly one of budget and delta")
    if delta is not None and not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    model = latency[0] if latency is not None else None
    search = search or _Search(profile, rule, max_candidates, model)
    if search.profile is not profile or search.rule != rule or search.model is not model:
        raise ValueError("the search given was made for another profile, rule or latency model")
    if latency is None:
        cost = lambda st: st.mflops  # noqa: E731
        scale, unit = profile.backbone_mflops, "MFLOPs per sample"
    else:
        bws = [float(latency[1])] if np.ndim(latency[1]) == 0 else [float(b) for b in latency[1]]
        txs = [model.tx_ms(b) for b in bws]
        cost = lambda st: max(st.lat_a + st.lat_p * tx for tx in txs)  # noqa: E731
        scale, unit = budget or (max(txs) + model.server_ms + sum(model.segments_ms)), "ms"
    modes = [False] + ([True] if use_predictor and profile.scores is not None else [])
    target = float(profile.exits.correct[-1].mean()) - (delta or 0.0)
    if budget is not None:
        feasible = lambda st: cost(st) <= budget + 1e-9  # noqa: E731
        key = lambda st: (st.accuracy, -cost(st))  # noqa: E731
        score = lambda st: -st.accuracy + 1e-9 * cost(st) / scale  # noqa: E731
        close = lambda st, b: st.accuracy >= b.accuracy - tie_tol  # noqa: E731
    else:
        feasible = lambda st: st.accuracy >= target - 1e-12  # noqa: E731
        key = lambda st: (-cost(st), st.accuracy)  # noqa: E731
        score = lambda st: cost(st) / scale - 1e-9 * st.accuracy  # noqa: E731
        close = lambda st, b: cost(st) <= cost(b) + tie_tol * scale  # noqa: E731

    def best_of(use_pred):
        ok = [(key(st), x) for (u, x), st in search.cache.items() if u == use_pred and feasible(st)]
        return max(ok, key=lambda t: t[0])[1] if ok else None

    m = profile.num_exits
    for use_pred in modes:
        plain = best_of(False) if use_pred else None
        starts = [plain + (None,) * m] if plain is not None else []  # the plain exits' choice, not gated
        search.explore(use_pred, cost, scale, starts)
        x = best_of(use_pred)
        if x is not None:
            search.descend(use_pred, x, score, feasible)
    pool = [(u, x, st) for (u, x), st in search.cache.items() if u in modes and feasible(st)]
    if not pool:
        cheapest = min(cost(st) for (u, _), st in search.cache.items() if u in modes)
        raise ValueError(f"no thresholds meet the budget of {budget} {unit} (the cheapest setting found: {cheapest:.4g})")
    u, x, st = max(pool, key=lambda t: key(t[2]))
    if near is not None and tie_tol > 0:
        ties = [(uu, xx) for uu, xx, s2 in pool if close(s2, st)]
        u, x = min(ties, key=lambda t: float(np.abs(search.encode(*t) - near).sum()))
    th, g = search.split(u, x)
    run = _run(profile, th, g, rule)
    out = dict(run.result)
    out.update(rule=rule, final_accuracy=float(profile.exits.correct[-1].mean()), use_predictor=u,
               budget=budget, delta=delta, encoded=search.encode(u, x).tolist())
    if latency is not None:
        ms = [expected_latency_ms(profile, run, model, b) for b in bws]
        out.update(expected_ms=ms[0] if len(ms) == 1 else ms, bandwidth_mbps=bws[0] if len(bws) == 1 else bws)
    return out


def choose_gates(profile: PredictorProfile, thresholds: Sequence[float | None], rule: str = "max_softmax",
                 max_loss: float = 0.0, max_candidates: int = 60, max_passes: int = 8) -> dict:
    """The Exit Predictor added to exits whose confidence thresholds are given: the prediction thresholds
    with the least expected device MFLOPs whose accuracy is at least that of the exits alone minus
    ``max_loss`` (the predictor's first use in Dong, Mao & Zhang: cut the device cost of the exits without
    changing what they decide). Greedy coordinate descent over candidate prediction thresholds (None plus
    quantiles of the observed scores). Returns :func:`simulate`'s dict (``gates`` None when no gating saves
    compute) plus ``baseline``: the exits alone."""
    if profile.scores is None:
        raise ValueError("choose_gates needs a profile with predictor scores")
    th = T._check_thresholds(profile.exits, thresholds, rule)
    base = simulate(profile, th, None, rule)
    target = base["accuracy"] - max_loss
    m = profile.num_exits
    cands = [[None] + (_conf_candidates(profile.scores[k], max_candidates)[1:] if th[k] is not None else [])
             for k in range(m)]
    gates = [None] * m
    best = base
    for _ in range(max_passes):
        changed = False
        for k in range(m):
            for c in cands[k]:
                trial = gates[:k] + [c] + gates[k + 1:]
                r = simulate(profile, th, None if all(v is None for v in trial) else trial, rule)
                if r["accuracy"] >= target - 1e-12 and r["expected_mflops"] < best["expected_mflops"] - 1e-12:
                    gates, best, changed = trial, r, True
        if not changed:
            break
    return {**best, "baseline": base, "rule": rule, "max_loss": max_loss}


def frontier(profile: PredictorProfile, rule: str = "max_softmax", use_predictor: bool = True,
             max_candidates: int = 60) -> list[dict]:
    """Accuracy vs expected device MFLOPs: the Pareto-optimal configurations found by the search (no other
    found configuration is at least as accurate and cheaper), cheapest first, each as :func:`simulate`'s dict."""
    s = _Search(profile, rule, max_candidates)
    u = use_predictor and profile.scores is not None
    s.explore(u, lambda st: st.mflops, profile.backbone_mflops)
    pts = sorted(((x, st) for (uu, x), st in s.cache.items() if uu == u), key=lambda t: (t[1].mflops, -t[1].accuracy))
    out, best_acc = [], -1.0
    for x, st in pts:
        if st.accuracy > best_acc + 1e-12:
            best_acc = st.accuracy
            th, g = s.split(u, x)
            out.append(simulate(profile, th, g, rule))
    return out


def choose_latency(profile: PredictorProfile, model: LatencyModel, bandwidth_mbps: float | Sequence[float],
                   budget_ms: float, rule: str = "max_softmax", use_predictor: bool = True,
                   max_candidates: int = 40, search: _Search | None = None, **kw) -> dict:
    """The most accurate thresholds whose expected latency is within ``budget_ms`` at ``bandwidth_mbps``
    (or at every bandwidth of a list: fixed thresholds); :func:`choose` with a latency cost."""
    return choose(profile, rule, use_predictor, budget=budget_ms, latency=(model, bandwidth_mbps),
                  max_candidates=max_candidates, search=search, **kw)


def evaluate_latency(profile: PredictorProfile, thresholds, gates, model: LatencyModel, bandwidth_mbps: float,
                     rule: str = "max_softmax") -> dict:
    """:func:`simulate` plus ``expected_ms`` at ``bandwidth_mbps`` for given thresholds."""
    run = _run(profile, thresholds, gates, rule)
    return {**run.result, "expected_ms": expected_latency_ms(profile, run, model, bandwidth_mbps),
            "bandwidth_mbps": bandwidth_mbps}


# ----------------------------------------------------------------------------------------- regression

KINDS = ("polynomial", "piecewise-linear")


def check_points(grid: Sequence[float]) -> list[float]:
    """The grid bandwidths and the geometric midpoint of every neighbouring pair: where a fitted regression
    is checked against the budget."""
    g = sorted(float(b) for b in grid)
    return sorted(g + [math.sqrt(a * b) for a, b in zip(g, g[1:])])


def _fit(kind: str, xs: list, ys: list, degree: int) -> list:
    return fit_polynomial(xs, ys, degree) if kind == "polynomial" else [float(v) for v in ys]


def fit_latency_adaptation(profile: PredictorProfile, model: LatencyModel, budget_ms: float,
                           grid_mbps: Sequence[float], names: Sequence[str], rule: str = "max_softmax",
                           use_predictor: bool = True, kind: str = "piecewise-linear", degree: int = 3,
                           max_candidates: int = 40, tie_tol: float = 0.001, iterations: int = 12,
                           search: _Search | None = None) -> dict:
    """Latency-aware thresholds (Dong, Mao & Zhang 2022): the most accurate thresholds within the budget at
    every bandwidth of ``grid_mbps`` (:func:`choose_latency`), then one regression in ``log10(bandwidth)``
    per threshold (:mod:`runtime.adaptive`: ``piecewise-linear`` through the grid's choices, or a
    ``polynomial`` of ``degree`` by least squares; "off" / "not gated" are encoded as values outside the
    thresholds' range, so the same regression switches an exit or its gate off).

    Choices along the grid are kept smooth: among those within ``tie_tol`` accuracy of the best at a
    bandwidth, the one closest to the previous bandwidth's is taken. A regression only approximates the
    choices, so it is checked against the budget at every grid bandwidth and between them
    (:func:`check_points`). Where it misses: a piecewise-linear model gets a new grid point there (while
    neighbours are more than 5 % apart); otherwise the budget of the neighbouring grid choices is tightened
    by the overshoot ratio; then the fit is repeated (up to ``iterations`` times). ``budget_met`` says
    whether the final regression fits the budget at every check point. ``search``: a :class:`_Search` made
    with the same profile, rule and model to reuse (e.g. the one that chose fixed thresholds to compare with).

    Returns the per-format ``latency_adaptation`` model (:func:`runtime.adaptive.thresholds_for`):
    ``{"rule", "kind", "degree" | "knots", "bandwidth_range_mbps", "exits": {name: parameters}, "gates":
    {...} (with the predictor), "budget_ms", "budget_met", "grid": [choice per bandwidth, with the budget it
    was made for], "fit": [the regression's thresholds simulated at every check point]}``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    grid = sorted(float(b) for b in grid_mbps)
    if len(grid) < 2 or grid[0] <= 0:
        raise ValueError(f"need at least 2 bandwidths > 0 for the regression, got {grid_mbps}")
    names = list(names)
    m = len(names)
    with_pred = use_predictor and profile.scores is not None
    search = search or _Search(profile, rule, max_candidates, model)
    budgets = {b: float(budget_ms) for b in grid}
    chosen: dict[float, dict] = {}
    for _ in range(iterations):
        near = None
        for b in grid:
            if b not in chosen or chosen[b]["budget"] != budgets[b]:
                chosen[b] = choose(profile, rule, with_pred, budget=budgets[b], latency=(model, b), near=near,
                                   tie_tol=tie_tol, search=search)
            near = np.asarray(chosen[b]["encoded"])
        xs = [math.log10(b) for b in grid]
        reg = {"rule": rule, "kind": kind, "bandwidth_range_mbps": [grid[0], grid[-1]], "budget_ms": budget_ms,
               **({"degree": degree} if kind == "polynomial" else {"knots": xs}),
               "exits": {n: _fit(kind, xs, [chosen[b]["encoded"][k] for b in grid], degree)
                         for k, n in enumerate(names)}}
        if with_pred:
            reg["gates"] = {n: _fit(kind, xs, [chosen[b]["encoded"][m + k] for b in grid], degree)
                            for k, n in enumerate(names)}
        checks = check_points(grid)
        fit = [adaptive_point(profile, reg, model, b, names) for b in checks]
        over = [(b, f["expected_ms"] / budget_ms) for b, f in zip(checks, fit) if f["expected_ms"] > budget_ms + 1e-9]
        reg["budget_met"] = not over
        if not over:
            break
        for b, ratio in over:
            i = next(i for i, g in enumerate(grid) if g >= b)  # grid[i - 1] < b <= grid[i]
            if grid[i] == b:
                budgets[b] /= ratio
            elif kind == "piecewise-linear" and grid[i] / grid[i - 1] > 1.05:
                grid.insert(i, b)
                budgets[b] = float(budget_ms)
            else:
                for g in (grid[i - 1], grid[i]):
                    budgets[g] /= ratio
    keys = ("thresholds", "gates", "accuracy", "expected_ms", "expected_mflops")
    reg["grid"] = [{"bandwidth_mbps": b, "chosen_for_budget_ms": budgets[b], **{k: chosen[b][k] for k in keys}}
                   for b in grid]
    reg["fit"] = [{"bandwidth_mbps": b, **{k: f[k] for k in keys}} for b, f in zip(checks, fit)]
    return reg


def adaptive_point(profile: PredictorProfile, reg: dict, model: LatencyModel, bandwidth_mbps: float,
                   names: Sequence[str]) -> dict:
    """The regression's thresholds at ``bandwidth_mbps`` (as the runtime computes them,
    :func:`runtime.adaptive.thresholds_for`) simulated on the profile, with expected latency."""
    th, gates = thresholds_for(reg, bandwidth_mbps)
    t = [th[n] for n in names]
    g = [gates[n] for n in names] if gates else None
    if g is not None and all(v is None for v in g):
        g = None  # nothing gated: the runtime does not run the predictor
    return evaluate_latency(profile, t, g, model, bandwidth_mbps, reg["rule"])

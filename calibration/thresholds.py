"""Exit confidence rules, early-exit simulation and threshold calibration. numpy only (no torch), so
the runtime can reuse it.

Terminology: a model has K outputs, exits ``0..K-2`` on the device plus the final classifier ``K-1``.
A sample runs the backbone segment by segment, evaluates each enabled exit in order and leaves at the
first whose confidence passes its threshold; samples no exit takes get the final prediction.

Rules (``rule=``):

* ``"max_softmax"``: confidence = max softmax probability; exit when ``conf >= threshold``.
* ``"normalized_entropy"``: entropy of the softmax / log(C), in [0, 1]; exit when ``ent <= threshold``
  (the entropy criterion of BranchyNet, Teerapittayanon, McDanel & Kung, ICPR 2016).

A threshold is a float in [0, 1] or ``None`` (exit disabled: its branch is not evaluated either).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

# The rules live in the runtime (numpy only) so the device computes confidences exactly as calibrated.
from runtime.confidence import RULES, _check_logits, confidence, max_softmax, normalized_entropy, passes  # noqa: E402,F401


# ------------------------------------------------------------------------------------------- profile

@dataclass
class ExitProfile:
    """Per-exit behaviour of a model on a labelled validation set.

    Attributes:
        names: K output names, early exits in order then the final one (e.g. ``["stage1", "stage2",
            "final"]``).
        conf: ``{rule: float32 (K, N)}`` confidences for both rules.
        correct: bool ``(K, N)``: exit k's argmax equals the label.
        segment_mflops: ``(K,)`` backbone MFLOPs per sample from the previous exit point to exit k's
            cut (for the final output: the rest of the backbone).
        branch_mflops: ``(K,)`` MFLOPs per sample of exit k's branch (0 for the final output).

    The device cost of leaving at exit k is ``sum_{j<=k} segment_mflops[j]`` plus the branch cost of
    every *enabled* exit ``j <= k`` (they were all evaluated); see :func:`simulate`.
    """

    names: list[str]
    conf: dict[str, np.ndarray]
    correct: np.ndarray
    segment_mflops: np.ndarray
    branch_mflops: np.ndarray
    labels: np.ndarray = field(repr=False, default=None)

    @classmethod
    def from_logits(cls, logits: Mapping[str, np.ndarray] | Sequence[np.ndarray], labels,
                    segment_mflops: Sequence[float], branch_mflops: Sequence[float],
                    names: Sequence[str] | None = None) -> "ExitProfile":
        """Build from per-output logits (float32 ``(N, C)`` each, early exits first, final last; a dict
        keeps its order) and int labels ``(N,)``.

        ``branch_mflops`` may have K-1 entries (the final output has no branch).

        Raises ValueError: NaN/inf logits (with count), mismatched sizes, a single-class label set
        (accuracy deltas would be meaningless), negative costs.
        """
        if isinstance(logits, Mapping):
            names = list(names or logits.keys())
            logits = list(logits.values())
        logits = [np.asarray(z) for z in logits]
        k = len(logits)
        names = list(names) if names is not None else [f"exit{i}" for i in range(k - 1)] + ["final"]
        y = np.asarray(labels)
        if y.ndim != 1 or y.size == 0:
            raise ValueError(f"labels must be a non-empty (N,) array, got shape {y.shape}")
        if np.unique(y).size < 2:
            raise ValueError(f"validation labels contain a single class ({y.flat[0]}); need at least 2")
        if len(names) != k or k < 1:
            raise ValueError(f"{len(names)} names for {k} outputs")
        for n, z in zip(names, logits):
            if z.ndim != 2 or z.shape[0] != y.size:
                raise ValueError(f"output {n!r}: logits shape {z.shape}, expected ({y.size}, C)")
            try:
                _check_logits(z)
            except ValueError as e:
                raise ValueError(f"output {n!r}: {e}") from None
        seg = np.asarray(segment_mflops, dtype=np.float64)
        br = np.asarray(branch_mflops, dtype=np.float64)
        if br.size == k - 1:
            br = np.append(br, 0.0)
        if seg.shape != (k,) or br.shape != (k,):
            raise ValueError(f"need {k} segment costs and {k - 1} or {k} branch costs, "
                             f"got {seg.size} and {br.size}")
        if (seg < 0).any() or (br < 0).any():
            raise ValueError("costs must be >= 0")
        conf = {r: np.stack([confidence(z, r) for z in logits]) for r in RULES}
        correct = np.stack([z.argmax(axis=1) == y for z in logits])
        return cls(names, conf, correct, seg, br, y)

    @property
    def num_exits(self) -> int:
        """Number of early exits (K - 1)."""
        return len(self.names) - 1

    @property
    def backbone_mflops(self) -> float:
        """MFLOPs per sample of the backbone alone (no exit branches)."""
        return float(self.segment_mflops.sum())

    def accuracy(self) -> dict[str, float]:
        """Accuracy of every output on all samples (no exiting)."""
        return {n: float(c.mean()) for n, c in zip(self.names, self.correct)}


# ---------------------------------------------------------------------------------------- simulation

def _check_thresholds(profile: ExitProfile, thresholds, rule: str) -> list[float | None]:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    th = list(thresholds)
    if len(th) != profile.num_exits:
        raise ValueError(f"need {profile.num_exits} thresholds (one per early exit), got {len(th)}")
    for i, t in enumerate(th):
        if t is None:
            continue
        if not isinstance(t, (int, float, np.floating, np.integer)) or not (0.0 <= float(t) <= 1.0):
            raise ValueError(f"threshold {i} ({profile.names[i]}) = {t!r} is outside [0, 1]")
    return [None if t is None else float(t) for t in th]


def _exit_index(profile: ExitProfile, th: list[float | None], rule: str) -> np.ndarray:
    """(N,) index of the output each sample leaves at."""
    n = profile.correct.shape[1]
    where = np.full(n, profile.num_exits, dtype=np.int64)
    left = np.ones(n, dtype=bool)
    for k, t in enumerate(th):
        go = left & passes(profile.conf[rule][k], t, rule)
        where[go] = k
        left &= ~go
    return where


def _exit_costs(profile: ExitProfile, th: list[float | None]) -> np.ndarray:
    """(K,) device MFLOPs of leaving at output k: backbone up to k + branches of enabled exits <= k."""
    enabled = np.array([t is not None for t in th] + [False])
    per = profile.segment_mflops + np.where(enabled, profile.branch_mflops, 0.0)
    return np.cumsum(per)


def simulate(profile: ExitProfile, thresholds: Sequence[float | None], rule: str = "max_softmax") -> dict:
    """Sequential early exiting on the profile's samples.

    Returns ``{"accuracy": float, "exit_rates": [K floats, sum 1], "exit_accuracy": [K floats or None:
    accuracy of the samples leaving there], "expected_mflops": float (per sample, device + server
    backbone compute, branches of every enabled exit evaluated up to the exit taken),
    "mflops_ratio": expected_mflops / backbone-only MFLOPs, "thresholds": [...]}``.

    Raises ValueError: wrong number of thresholds, threshold outside [0, 1], unknown rule.
    """
    th = _check_thresholds(profile, thresholds, rule)
    where = _exit_index(profile, th, rule)
    k = len(profile.names)
    n = where.size
    picked = profile.correct[where, np.arange(n)]
    counts = np.bincount(where, minlength=k)
    hits = np.bincount(where, weights=picked, minlength=k)
    cost = _exit_costs(profile, th)
    expected = float((counts * cost).sum() / n)
    return {"thresholds": th, "accuracy": float(picked.mean()),
            "exit_rates": (counts / n).tolist(),
            "exit_accuracy": [float(h / c) if c else None for h, c in zip(hits, counts)],
            "expected_mflops": expected, "mflops_ratio": expected / profile.backbone_mflops}


def _candidates(conf: np.ndarray, rule: str, max_candidates: int) -> list[float | None]:
    """Candidate thresholds for one exit: None plus observed confidences (quantiles when many)."""
    vals = np.unique(conf.astype(np.float64))
    if vals.size > max_candidates:
        vals = np.unique(np.quantile(vals, np.linspace(0.0, 1.0, max_candidates)))
    vals = np.clip(vals, 0.0, 1.0)
    return [None] + [float(v) for v in vals]


def _coordinate_search(profile: ExitProfile, rule: str, objective, feasible, max_candidates: int,
                       max_passes: int = 10, start: list[float | None] | None = None) -> list[float | None]:
    """Greedy coordinate descent: start with every exit disabled (feasible for accuracy constraints:
    final accuracy, backbone cost) or at ``start``, then repeatedly re-pick each exit's threshold,
    shallow to deep, as the feasible candidate with the lowest objective (ties: higher accuracy)
    holding the others fixed; stop when a full pass changes nothing. Candidates come from observed confidences, so the result is optimal
    per coordinate but not necessarily globally."""
    th: list[float | None] = list(start) if start is not None else [None] * profile.num_exits
    cands = [_candidates(profile.conf[rule][k], rule, max_candidates) for k in range(profile.num_exits)]
    best = simulate(profile, th, rule)
    for _ in range(max_passes):
        changed = False
        for k in range(profile.num_exits):
            for c in cands[k]:
                trial = th.copy()
                trial[k] = c
                r = simulate(profile, trial, rule)
                if not feasible(r):
                    continue
                o, bo = objective(r), objective(best)
                if o < bo - 1e-12 or (abs(o - bo) <= 1e-12 and r["accuracy"] > best["accuracy"] + 1e-12):
                    th, best, changed = trial, r, True
        if not changed:
            break
    return th


def choose_thresholds_accuracy(profile: ExitProfile, delta: float = 0.005, rule: str = "max_softmax",
                               max_candidates: int = 200) -> dict:
    """Thresholds minimising expected device MFLOPs per sample subject to
    ``accuracy >= accuracy(final) - delta`` on the profile.

    Method: greedy coordinate descent over candidate thresholds taken from the observed confidences
    (up to ``max_candidates`` quantiles per exit, plus "disabled"); see :func:`_coordinate_search`.
    The constraint is checked on exactly these samples, so it holds on the profile by construction; on
    new data it holds only statistically.

    Returns :func:`simulate`'s dict for the chosen thresholds plus ``"delta"``, ``"rule"``,
    ``"final_accuracy"``. Raises ValueError for delta outside [0, 1] or an unknown rule.
    """
    if not (0.0 <= delta <= 1.0):
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    target = float(profile.correct[-1].mean()) - delta
    th = _coordinate_search(profile, rule, lambda r: r["expected_mflops"],
                            lambda r: r["accuracy"] >= target - 1e-12, max_candidates)
    out = simulate(profile, th, rule)
    out.update(delta=delta, rule=rule, final_accuracy=float(profile.correct[-1].mean()))
    return out


def expected_latency_ms(profile: ExitProfile, thresholds: Sequence[float | None], rule: str,
                        board_latency_ms: Mapping[str, Sequence[float]], bandwidth_mbps: float,
                        bytes_per_sample: float, server_ms: float, rtt_ms: float = 0.0) -> dict:
    """Expected end-to-end latency of device-edge co-inference with early exits, following Dong, Mao &
    Zhang, "Resource-Constrained Edge AI with Early Exit Prediction" (arXiv:2206.07269, 2022),
    eq. (3) (expected cost as exit probabilities times cost to reach each exit) and eq. (11)
    (end-to-end latency with offloading)::

        E[T] = sum_k P(exit at k) * T_dev(k) + P(no exit) * (T_dev(head) + T_tx + T_server)
        T_dev(k) = sum_{j<=k} (segment_ms[j] + exit_ms[j] if exit j enabled)
        T_tx = rtt_ms + bytes_per_sample * 8 / (bandwidth_mbps * 1e6) * 1e3

    where ``P`` are the empirical exit rates of :func:`simulate` on the profile.

    Args:
        board_latency_ms: ``{"segments": [...], "exits": [...]}`` measured on the board, ms per sample.
            ``segments``: K-1 entries (device head ends at the last exit's cut) or K entries (the last
            is device compute after the last exit, up to the split). ``exits``: K-1 branch latencies.
        bandwidth_mbps: uplink, megabit/s (> 0). bytes_per_sample: payload sent at the split.
        server_ms: edge-server time for the rest of the model. rtt_ms: network round trip.

    Returns ``{"expected_ms", "exit_rates", "accuracy", "offload_ms", "device_ms_per_exit"}``.
    """
    sim = simulate(profile, thresholds, rule)
    th = sim["thresholds"]
    seg = [float(v) for v in board_latency_ms["segments"]]
    ex = [float(v) for v in board_latency_ms["exits"]]
    k1 = profile.num_exits
    if len(ex) != k1 or len(seg) not in (k1, k1 + 1):
        raise ValueError(f"board_latency_ms needs {k1} exit and {k1} or {k1 + 1} segment latencies, "
                         f"got {len(ex)} and {len(seg)}")
    if bandwidth_mbps <= 0:
        raise ValueError(f"bandwidth_mbps must be > 0, got {bandwidth_mbps}")
    if min(seg + ex + [server_ms, rtt_ms, bytes_per_sample]) < 0:
        raise ValueError("latencies and sizes must be >= 0")
    per = [s + (e if t is not None else 0.0) for s, e, t in zip(seg, ex, th)]
    dev = np.cumsum(per).tolist()  # T_dev(k) for the early exits
    head = (dev[-1] if dev else 0.0) + (seg[k1] if len(seg) > k1 else 0.0)
    tx = rtt_ms + bytes_per_sample * 8.0 / (bandwidth_mbps * 1e6) * 1e3
    offload = head + tx + server_ms
    rates = sim["exit_rates"]
    expected = sum(r * d for r, d in zip(rates[:-1], dev)) + rates[-1] * offload
    return {"expected_ms": float(expected), "exit_rates": rates, "accuracy": sim["accuracy"],
            "offload_ms": float(offload), "device_ms_per_exit": dev, "thresholds": th}


def choose_thresholds_latency(profile: ExitProfile, board_latency_ms: Mapping[str, Sequence[float]],
                              bandwidth_mbps: float, bytes_per_sample: float, server_ms: float,
                              rtt_ms: float = 0.0, budget_ms: float | None = None, delta: float = 0.005,
                              rule: str = "max_softmax", max_candidates: int = 200) -> dict:
    """Thresholds for co-inference latency (model: :func:`expected_latency_ms`, Dong, Mao & Zhang
    2022, eq. 3 and 11).

    * ``budget_ms=None`` (minimise): least expected latency subject to accuracy drop <= ``delta`` vs
      the final exit.
    * ``budget_ms`` given: highest accuracy subject to expected latency <= budget; raises ValueError
      if even the fastest setting found misses the budget.

    Same greedy coordinate search as :func:`choose_thresholds_accuracy`. Returns
    :func:`expected_latency_ms`'s dict plus ``expected_mflops``, ``rule``, ``delta``/``budget_ms``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    lat_args = dict(board_latency_ms=board_latency_ms, bandwidth_mbps=bandwidth_mbps,
                    bytes_per_sample=bytes_per_sample, server_ms=server_ms, rtt_ms=rtt_ms)
    cache: dict[tuple, float] = {}

    def latency(r: dict) -> float:
        key = tuple(r["thresholds"])
        if key not in cache:
            cache[key] = expected_latency_ms(profile, r["thresholds"], rule, **lat_args)["expected_ms"]
        return cache[key]

    if budget_ms is None:
        if not (0.0 <= delta <= 1.0):
            raise ValueError(f"delta must be in [0, 1], got {delta}")
        target = float(profile.correct[-1].mean()) - delta
        th = _coordinate_search(profile, rule, latency, lambda r: r["accuracy"] >= target - 1e-12,
                                max_candidates)
    else:
        fastest = _coordinate_search(profile, rule, latency, lambda r: True, max_candidates)
        if latency(simulate(profile, fastest, rule)) > budget_ms:
            raise ValueError(f"budget {budget_ms} ms unreachable: fastest expected latency found is "
                             f"{latency(simulate(profile, fastest, rule)):.3f} ms")
        # start from the fastest (feasible) setting, then trade latency back for accuracy
        th = _coordinate_search(profile, rule, lambda r: -r["accuracy"],
                                lambda r: latency(r) <= budget_ms, max_candidates, start=fastest)
    out = expected_latency_ms(profile, th, rule, **lat_args)
    sim = simulate(profile, th, rule)
    out.update(expected_mflops=sim["expected_mflops"], exit_accuracy=sim["exit_accuracy"], rule=rule,
               delta=delta if budget_ms is None else None, budget_ms=budget_ms)
    return out


# ------------------------------------------------------------------------------------------- curves

def curve(profile: ExitProfile, rule: str = "max_softmax", num: int = 41) -> dict:
    """Sweep one threshold shared by all early exits over ``num`` values in [0, 1] (ascending).

    Returns ``{"rule", "thresholds": [num], "accuracy": [num], "expected_mflops": [num],
    "mflops_ratio": [num], "exit_rates": [num x K], "final_accuracy", "backbone_mflops"}``.
    """
    if num < 2:
        raise ValueError("num must be >= 2")
    ts = np.linspace(0.0, 1.0, num)
    rows = [simulate(profile, [float(t)] * profile.num_exits, rule) for t in ts]
    return {"rule": rule, "thresholds": ts.tolist(), "accuracy": [r["accuracy"] for r in rows],
            "expected_mflops": [r["expected_mflops"] for r in rows],
            "mflops_ratio": [r["mflops_ratio"] for r in rows],
            "exit_rates": [r["exit_rates"] for r in rows], "names": list(profile.names),
            "final_accuracy": float(profile.correct[-1].mean()),
            "backbone_mflops": profile.backbone_mflops}


def plot_curve(curves: dict | Sequence[dict], png_path, chosen: Sequence[dict] = (), title: str = "") -> None:
    """Plot accuracy vs expected MFLOPs/sample for one or more :func:`curve` results (matplotlib,
    Agg backend) to ``png_path``; ``chosen`` are :func:`simulate`-style dicts marked as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(curves, dict):
        curves = [curves]
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        ax.plot(c["expected_mflops"], np.asarray(c["accuracy"]) * 100, marker=".", label=c["rule"])
    if curves:
        c = curves[0]
        ax.scatter([c["backbone_mflops"]], [c["final_accuracy"] * 100], marker="*", s=120, color="k",
                   label="backbone only", zorder=3)
    for r in chosen:
        ax.scatter([r["expected_mflops"]], [r["accuracy"] * 100], marker="o", s=60, zorder=3,
                   label=f"chosen ({r.get('rule', '')})")
    ax.set_xlabel("expected MFLOPs per sample (device + server backbone, incl. exit branches)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

"""The device side of split computing with early exits.

Per input sample (float32 NCHW, batch 1): run the device segments in order; after each, run the exits
that read its output and stop when an exit's confidence passes its threshold (nothing is sent, the tail
does not run). Otherwise quantise the split tensor(s) with the manifest's scale / zero point (affine
int8), compress, send to the edge server and return its reply. When the server is unreachable the result
degrades to the most confident exit seen (or the local tail when the bundle has one loaded), marked
``degraded``.

With an Exit Predictor in the bundle (Dong, Mao & Zhang 2022) and prediction thresholds for the graphs'
format, the predictor runs as soon as the tensor it reads exists (before the first exit); an exit whose
predictor score is below its prediction threshold is skipped (its branch does not run), so "hard" samples
pay for no branch. With a latency adaptation model in the manifest (``adaptive=True``), the confidence and
prediction thresholds of every request come from the regression at the current bandwidth estimate
(:mod:`runtime.adaptive`, :mod:`runtime.bandwidth`); each result records the estimate and the thresholds
it used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .bundle import Bundle, BundleError
from .chain import Chain
from .confidence import confidence, passes, sigmoid
from .quant import QuantParams


@dataclass
class Result:
    """One inference. ``logits``: float32 ``(C,)``; ``top1``: class index; ``exit``: exit name or None
    (final classifier); ``where``: ``device`` (exit), ``server``, ``local`` (tail run on the device) or
    ``degraded``; ``ms``: stage -> milliseconds; ``bytes_sent`` / ``bytes_received``: frame sizes on the
    wire (bytes); ``confidences``: exit name -> confidence (exits evaluated only); ``predictor``: exit name ->
    predictor score in [0, 1] (when it ran); ``thresholds`` / ``gates``: the confidence and prediction
    thresholds this request used (``gates`` None: no predictor); ``bandwidth_mbps``: the bandwidth estimate
    they were chosen for (adaptive mode)."""

    logits: np.ndarray
    top1: int
    exit: Optional[str]
    where: str
    ms: Dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    confidences: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    predictor: Dict[str, float] = field(default_factory=dict)
    thresholds: Dict[str, Optional[float]] = field(default_factory=dict)
    gates: Optional[Dict[str, Optional[float]]] = None
    bandwidth_mbps: Optional[float] = None

    def to_json(self) -> dict:
        out = {"top1": self.top1, "exit": self.exit, "where": self.where,
               "ms": {k: round(v, 3) for k, v in self.ms.items()}, "bytes_sent": self.bytes_sent,
               "bytes_received": self.bytes_received,
               "confidences": {k: round(v, 5) for k, v in self.confidences.items()},
               "thresholds": {k: (None if v is None else round(v, 5)) for k, v in self.thresholds.items()},
               **({"error": self.error} if self.error else {})}
        if self.gates is not None:
            out["prediction_thresholds"] = {k: (None if v is None else round(v, 5)) for k, v in self.gates.items()}
            out["predictor"] = {k: round(v, 5) for k, v in self.predictor.items()}
        if self.bandwidth_mbps is not None:
            out["bandwidth_estimate_mbps"] = round(self.bandwidth_mbps, 4)
        return out


def wire_params(bundle: Bundle, wire_dtype: str = "int8") -> Dict[str, Optional[QuantParams]]:
    """Quantisation of every wire tensor from the manifest (None for each with ``wire_dtype='float32'``).
    Raises BundleError when int8 is asked and the manifest has no quantisation for a wire tensor."""
    if wire_dtype not in ("int8", "float32"):
        raise ValueError("wire dtype %r: use int8 or float32" % wire_dtype)
    out = {}  # type: Dict[str, Optional[QuantParams]]
    for name in bundle.wire_tensors:
        q = bundle.tensor(name).quant
        if wire_dtype == "int8" and q is None:
            raise BundleError("wire tensor %r has no quantisation in the manifest (a bundle sliced from .onnx by "
                              "eetool 0.1.0): send it as --wire-dtype float32, or re-export" % name)
        out[name] = q.params() if wire_dtype == "int8" else None
    return out


def wire_codec(bundle: Bundle) -> str:
    """The entropy coder the bundle's wire tensors were exported with (``zstd`` for bundles that name none)."""
    if not bundle.server_segments:
        return "zstd"
    return bundle.tensor(bundle.wire_tensors[0]).codec or "zstd"


def quantize_wire(params: Dict[str, Optional[QuantParams]], values: Dict[str, np.ndarray]):
    """Wire tensors by name and their quantisation header entries (``{name: {dtype, scale, zero_point}}``, plus
    ``bits`` / ``axis`` for n-bit codes, which the protocol bit-packs) from :func:`wire_params`; tensors whose
    params are None go as float32 (no quant entry)."""
    tensors, quant = {}, {}
    for name, p in params.items():
        x = values[name]
        if p is None:
            tensors[name] = np.ascontiguousarray(x, dtype=np.float32)
            continue
        tensors[name] = p.quantize(x)
        quant[name] = p.to_json()
    return tensors, quant


class DeviceRunner:
    """Runs a bundle's device side against an :class:`runtime.client.EdgeClient`.

    ``fmt``/``precision`` pick the graphs (``onnx``/``tflite``, ``fp32``/``int8``); ``thresholds``
    overrides the manifest's per-exit thresholds (name -> value in [0, 1], or None: exit off);
    ``exits=False`` disables early exiting; ``local_tail=True`` also loads the server segments to fall back
    on when the server is unreachable; ``threads`` / ``allow_spinning`` configure the sessions
    (:func:`runtime.backends.session_options`).

    Exit Predictor: ``gates`` overrides the prediction thresholds (name -> value in [0, 1] or None for "not
    gated"); ``predictor=False`` runs without it (every enabled exit evaluated). By default the manifest's
    prediction thresholds for the graphs' format are used; without any the predictor does not run.

    Latency-aware mode (``adaptive=True``, needs ``manifest.latency_adaptation`` for the graphs' format):
    before every request the thresholds come from the regression at ``bandwidth_mbps`` when given (an
    assumed link), else at the estimate of ``estimator`` (a :class:`runtime.bandwidth.BandwidthEstimator`
    fed by this runner's own transfers and by pings when idle; created by default when there is a client).

    Raises BundleError for a missing graph and ValueError for a threshold outside [0, 1], an unknown exit or
    adaptive mode without a model or a way to know the bandwidth."""

    def __init__(self, bundle: Bundle, client=None, fmt: str = "onnx", precision: str = "fp32",
                 threads: Optional[int] = None, thresholds: Optional[Dict[str, Optional[float]]] = None,
                 exits: bool = True, wire_dtype: str = "int8", local_tail: bool = False,
                 allow_spinning: Optional[bool] = None, gates: Optional[Dict[str, Optional[float]]] = None,
                 predictor: bool = True, adaptive: bool = False, bandwidth_mbps: Optional[float] = None,
                 estimator=None):
        self.bundle = bundle
        self.client = client
        self.wire_dtype = wire_dtype
        self.wire = wire_params(bundle, wire_dtype) if bundle.server_segments else {}
        self.chain = Chain(bundle, "device", fmt, precision, threads, with_exits=exits, allow_spinning=allow_spinning)
        self.tail = Chain(bundle, "server", fmt, precision, threads, with_exits=False,
                          allow_spinning=allow_spinning) if local_tail else None
        pair = "%s/%s" % (fmt, precision)
        self.pair = pair
        # per-graph thresholds when calibrated on those graphs (int8 confidences differ from float ones)
        self.thresholds = {e.name: e.threshold_for(pair) for e in bundle.exits}  # type: Dict[str, Optional[float]]
        for name, value in (thresholds or {}).items():
            self._check_name(name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError("threshold for %s is %s; thresholds lie in [0, 1]" % (name, value))
            self.thresholds[name] = None if value is None else float(value)
        self.gates = None  # type: Optional[Dict[str, Optional[float]]]
        if predictor and self.chain.predictor is not None:
            self.gates = bundle.predictor.gates_for(pair)
            if gates is not None:
                self.gates = dict(self.gates or {n: None for n in bundle.predictor.exits})
                for name, value in gates.items():
                    self._check_name(name)
                    if value is not None and not 0.0 <= float(value) <= 1.0:
                        raise ValueError("prediction threshold for %s is %s; they lie in [0, 1]" % (name, value))
                    self.gates[name] = None if value is None else float(value)
        elif gates:
            raise ValueError("prediction thresholds given but the bundle has no Exit Predictor for %s (or exits are "
                             "off)" % pair)
        self.adaptation = None  # type: Optional[dict]
        self.bandwidth_mbps = bandwidth_mbps
        self.estimator = estimator
        if adaptive:
            la = bundle.manifest.latency_adaptation
            models = la.models if la is not None else {}
            if pair not in models:
                raise ValueError("no latency adaptation model for %s in the manifest (has: %s); run 'eetool exits "
                                 "calibrate BUNDLE --board B --budget-ms X --bandwidth B1,B2,...'"
                                 % (pair, ", ".join(sorted(models)) or "none"))
            self.adaptation = models[pair].to_json()
            if bandwidth_mbps is None and estimator is None:
                if client is None:
                    raise ValueError("adaptive thresholds need the bandwidth: a server to measure it, or an assumed one")
                from .bandwidth import BandwidthEstimator

                self.estimator = BandwidthEstimator()
        self._used_bw = None  # type: Optional[float]
        self._reply = None  # the last server reply, for the bandwidth estimator

    def _check_name(self, name: str) -> None:
        if name not in self.thresholds:
            raise ValueError("unknown exit %r; the bundle has %s" % (name, sorted(self.thresholds)))

    # -- latency-aware thresholds ------------------------------------------------------------
    def current_bandwidth(self) -> Optional[float]:
        """The bandwidth (Mbit/s) the next request's thresholds are chosen for: the assumed one, else the
        estimator's (probing the server first when the link has been idle)."""
        if self.bandwidth_mbps is not None:
            return self.bandwidth_mbps
        if self.estimator is None:
            return None
        if self.estimator.needs_probe() and self.client is not None:
            self.probe()
        est = self.estimator.estimate_mbps()
        # before any measurement: the slowest bandwidth the model was fitted for (the cautious thresholds)
        return est if est is not None else float(self.adaptation["bandwidth_range_mbps"][0])

    def probe(self) -> None:
        """The estimator's ``probe_pings`` empty pings and as many padded to its ``probe_bytes``, alternating
        (the quickest of each size give the round trip and the rate, robust to scheduling delays:
        :meth:`runtime.bandwidth.BandwidthEstimator.observe_probe`); failures are ignored (the request that
        follows reports the server's state)."""
        from .client import EdgeClientError

        try:
            if not self.estimator.observations:
                self.client.ping()  # connect first: the connection's set-up is no part of the round trip
            small_ms = big_ms = float("inf")
            for _ in range(self.estimator.probe_pings):
                small_ms = min(small_ms, self.client.ping())
                small = self.client.last_ping_bytes
                big_ms = min(big_ms, self.client.ping(self.estimator.probe_bytes))
            self.estimator.observe_probe(small, small_ms, self.client.last_ping_bytes, big_ms)
        except EdgeClientError:
            pass

    def _apply_adaptation(self) -> None:
        from .adaptive import thresholds_for

        bw = self.current_bandwidth()
        th, gates = thresholds_for(self.adaptation, bw)
        self.thresholds.update(th)
        if self.chain.predictor is not None and gates:
            self.gates = gates if any(v is not None for v in gates.values()) else None
        self._used_bw = bw

    # -- inference ---------------------------------------------------------------------------
    def infer(self, x: np.ndarray) -> Result:
        """One sample ``x``: float32 ``(1, C, H, W)`` NCHW, preprocessed as the manifest says."""
        if self.adaptation is not None:
            self._apply_adaptation()
        ms: Dict[str, float] = {}
        confs: Dict[str, float] = {}
        scores: Dict[str, float] = {}
        best = None  # (confidence rank, name, logits) of the most confident exit so far
        values = {self.bundle.manifest.input.name: x}
        pred = self.chain.predictor if self.gates is not None else None
        if pred is not None and pred[0].input in values:
            self._run_predictor(pred, values, ms, scores)
        for spec, sess in self.chain.segments:
            t0 = time.perf_counter()
            values.update(sess.run({n: values[n] for n in spec.inputs}))
            ms[spec.name] = (time.perf_counter() - t0) * 1e3
            for out in spec.outputs:
                if pred is not None and out == pred[0].input:
                    self._run_predictor(pred, values, ms, scores)
                for espec, esess in self.chain.exits.get(out, []):
                    name = espec.name
                    if self.thresholds[name] is None:  # disabled: the branch is not evaluated
                        continue
                    gate = self.gates.get(name) if pred is not None else None
                    if gate is not None and scores.get(name, 0.0) < gate:  # predicted not to exit here
                        continue
                    t0 = time.perf_counter()
                    logits = esess.run({espec.input: values[out]})[espec.output]
                    conf = float(confidence(logits, espec.rule)[0])
                    ms[name] = (time.perf_counter() - t0) * 1e3
                    confs[name] = conf
                    rank = conf if espec.rule == "max_softmax" else 1.0 - conf
                    if best is None or rank > best[0]:
                        best = (rank, name, logits[0])
                    if passes(np.array([conf]), self.thresholds[name], espec.rule)[0]:
                        return self._stamp(Result(logits[0], int(logits[0].argmax()), name, "device", ms, 0, 0,
                                                  confs), scores, pred)
        return self._stamp(self._finish(values, ms, confs, best), scores, pred)

    def _run_predictor(self, pred, values, ms, scores) -> None:
        spec, sess = pred
        t0 = time.perf_counter()
        logits = sess.run({spec.input: values[spec.input]})[spec.output]
        ms[spec.name] = (time.perf_counter() - t0) * 1e3
        scores.update(zip(spec.exits, (float(v) for v in sigmoid(logits)[0])))

    def _stamp(self, r: Result, scores, pred) -> Result:
        r.thresholds = dict(self.thresholds)
        if pred is not None:
            r.gates = dict(self.gates)
            r.predictor = scores
        r.bandwidth_mbps = self._used_bw
        if self.estimator is not None and r.where == "server" and self._reply is not None:
            self.estimator.observe(self._reply.bytes_sent + self._reply.bytes_received, self._reply.wire_ms)
        self._reply = None
        return r

    def _finish(self, values, ms, confs, best) -> Result:
        output = self.bundle.manifest.output.name
        if not self.bundle.server_segments:  # the whole model runs on the device
            logits = values[output][0]
            return Result(logits, int(logits.argmax()), None, "device", ms, 0, 0, confs)
        t0 = time.perf_counter()
        tensors, quant = quantize_wire(self.wire, values)
        ms["quantize"] = (time.perf_counter() - t0) * 1e3
        error = None
        if self.client is not None:
            from .client import EdgeClientError

            try:
                reply = self.client.infer(tensors, quant)
                self._reply = reply
                ms["encode"] = reply.encode_ms
                ms["network"] = reply.network_ms - reply.tail_ms
                ms["server_tail"] = reply.tail_ms
                logits = reply.logits[0]
                return Result(logits, int(logits.argmax()), None, "server", ms, reply.bytes_sent,
                              reply.bytes_received, confs)
            except EdgeClientError as e:
                error = "%s: %s" % (type(e).__name__, e)
        where = "local" if error is None else "degraded"
        if self.tail is not None:
            t0 = time.perf_counter()
            feed = {n: tensors[n] if self.wire[n] is None else self.wire[n].dequantize(tensors[n])
                    for n in self.bundle.wire_tensors}
            logits = self.tail.run_segments(feed)[output][0]
            ms["local_tail"] = (time.perf_counter() - t0) * 1e3
            return Result(logits, int(logits.argmax()), None, where, ms, 0, 0, confs, error)
        if best is not None:
            return Result(best[2], int(best[2].argmax()), best[1], "degraded", ms, 0, 0, confs,
                          error or "no server configured")
        raise RuntimeError("server unavailable (%s) and the bundle has no exit or local tail to fall back on"
                           % (error or "no server configured"))


def percentiles(samples: List[float]) -> Dict[str, float]:
    """p50 / p90 / p99 / mean of a list of milliseconds."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {}
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}

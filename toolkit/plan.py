"""``eetool plan``: choose the split point from measured per-layer latency, bytes on the wire and bandwidth.

The cost model is Neurosurgeon's (Kang et al., "Neurosurgeon: Collaborative Intelligence Between the Cloud
and Mobile Edge", ASPLOS 2017): for each candidate partition point, end-to-end latency is the device's
latency up to that layer, plus the time to send that layer's output over the link, plus the server's
latency for the remaining layers; the best point is the one with the smallest sum, and it moves with the
bandwidth. Here, per option and bandwidth ``B``::

    total_ms = device_ms + encode_ms + tx_ms + server_ms
    tx_ms    = request_bytes * 8 / (B * 1e3) + reply_bytes * 8 / (B_down * 1e3) + rtt_ms   (B in Mbit/s)

Options: every single-tensor split point (device runs the head, sends the int8 split feature), "local
only" (the whole model on the device: nothing sent, tx_ms = 0) and "full offload" (the device sends the
JPEG file as it is; the server decodes it and runs the whole model).

What is measured, and on what:

- ``request_bytes``: MEASURED on real images — the model's head output at each cut, quantised to int8
  with the affine min/max parameters of :meth:`runtime.quant.QuantParams.from_range` (range over the same
  real images, as ``eetool export`` does over its calibration set), or with ``--wire-bits N`` to n-bit
  codes, bit-packed, ranged as ``export --wire-bits N`` ranges them (:func:`tail_kl_qparams`), compressed with
  :func:`runtime.codec.compress` and framed by :func:`runtime.protocol.encode_request` exactly as the
  device runtime sends it (prefix, JSON header, payload; + 32 B HMAC tag with ``hmac=True``); mean over the
  images. For full offload: the real JPEG files' sizes framed as one uint8 tensor (codec none). The
  runtime's server has no JPEG-input path today: that row is the what-if of an image-offloading server.
- ``reply_bytes``: a real REPLY frame with the server's default top-5 indices and scores.
- ``encode_ms``: quantise + compress + frame, measured on this host (median over the images).
- ``device_ms`` / ``server_ms``: from :mod:`toolkit.layer_latency` (board measurement file, this host's
  measurement, or a FLOPs estimate) plus image preprocessing (decode, resize, normalise) on the side that
  does it; each option says which source it used.

Units: milliseconds (ms), bytes (B) per sample, bandwidth in Mbit/s (10^6 bit/s).

With early exits (rates from calibration), the expected latency of an option follows Dong, Mao & Zhang
(arXiv:2206.07269) as :func:`calibration.thresholds.expected_latency_ms` does: exits at or before the
split run on the device; a fraction ``r_k`` of all samples stops at exit ``k``::

    E[T] = sum_k r_k * (device_ms(at_k) + branches_ms(<= k)) + (1 - sum_k r_k) * (total_ms + branches_ms(all usable))
"""
from __future__ import annotations

import io
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime import codec as wire_codec
from runtime import protocol
from runtime.manifest import Manifest
from runtime.quant import QuantParams

LOCAL = "local only"
OFFLOAD = "full offload (JPEG)"


class PlanError(ValueError):
    """Inputs the planner cannot use (bad bandwidths, exit rates, empty candidate set); says why."""


# --------------------------------------------------------------------------- the cost model
@dataclass
class Option:
    """One way to run the model. ``order``: position in the network (full offload -1, cuts 0..n-1 in graph
    order, local only n); exits attached at or before it are usable. Times in ms, sizes in bytes/sample."""

    name: str
    kind: str  # "split" | "local" | "offload"
    order: int
    device_ms: float
    server_ms: float
    request_bytes: float = 0.0
    reply_bytes: float = 0.0
    encode_ms: float = 0.0
    device_source: str = ""
    server_source: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class ExitCost:
    """An early exit at cut ``at`` (graph position ``order``): ``rate`` is the fraction of *all* samples
    that stop there (calibrated), ``device_ms`` the device time to reach its cut (preprocessing + head, ms)
    and ``branch_ms`` the exit branch's own time (ms)."""

    name: str
    at: str
    order: int
    rate: float
    device_ms: float
    branch_ms: float


def transmit_ms(request_bytes: float, reply_bytes: float, uplink_mbps: float, rtt_ms: float,
                downlink_mbps: float | None = None) -> float:
    """Link time of one request (ms): serialisation of the request at ``uplink_mbps`` and of the reply at
    ``downlink_mbps`` (default: the uplink's) plus one round trip. Nothing sent: 0."""
    if request_bytes <= 0:
        return 0.0
    down = downlink_mbps or uplink_mbps
    return request_bytes * 8.0 / (uplink_mbps * 1e3) + reply_bytes * 8.0 / (down * 1e3) + rtt_ms


def option_latency(opt: Option, uplink_mbps: float, rtt_ms: float = 0.0, exits: list[ExitCost] | None = None,
                   downlink_mbps: float | None = None) -> dict:
    """End-to-end latency (ms) of ``opt`` at a link: ``{"total_ms", "tx_ms", "expected_ms"}``; ``expected_ms``
    weighs in the usable early exits (equal to ``total_ms`` without exits)."""
    tx = transmit_ms(opt.request_bytes, opt.reply_bytes, uplink_mbps, rtt_ms, downlink_mbps)
    total = opt.device_ms + opt.encode_ms + tx + opt.server_ms
    usable = sorted((e for e in (exits or []) if opt.kind != "offload" and e.order <= opt.order), key=lambda e: e.order)
    expected, branches, remaining = 0.0, 0.0, 1.0
    for e in usable:
        branches += e.branch_ms
        expected += e.rate * (e.device_ms + branches)
        remaining -= e.rate
    expected += max(remaining, 0.0) * (total + branches)
    return {"total_ms": total, "tx_ms": tx, "expected_ms": expected,
            "exit_rate": 1.0 - max(remaining, 0.0) if usable else 0.0}


def choose(options: list[Option], bandwidths_mbps: list[float], rtt_ms: float = 0.0,
           exits: list[ExitCost] | None = None, downlink_mbps: float | None = None) -> list[dict]:
    """Per bandwidth (Mbit/s): every option's latency and the best one (smallest expected latency; a tie
    goes to local only, then to the option earlier in ``options``). Returns ``[{"mbps", "rows": {name: option_latency}, "best",
    "best_ms"}]``."""
    if not options:
        raise PlanError("no options to choose from")
    _check_exits(exits or [])
    out = []
    for bw in bandwidths_mbps:
        if not (bw > 0 and math.isfinite(bw)):
            raise PlanError(f"bandwidth must be > 0 Mbit/s, got {bw}")
        rows = {o.name: option_latency(o, bw, rtt_ms, exits, downlink_mbps) for o in options}
        best = min(options, key=lambda o: (rows[o.name]["expected_ms"], o.kind != "local")).name
        out.append({"mbps": bw, "rows": rows, "best": best, "best_ms": rows[best]["expected_ms"]})
    return out


def best_by_bandwidth(options: list[Option], rtt_ms: float = 0.0, exits: list[ExitCost] | None = None,
                      lo: float = 0.1, hi: float = 10000.0, points: int = 161) -> list[dict]:
    """The best option over a log-spaced bandwidth sweep ``lo..hi`` Mbit/s, as intervals
    ``[{"from_mbps", "to_mbps", "best"}]``: where the choice changes, and why one choice may win
    at every bandwidth asked for."""
    grid = np.logspace(math.log10(lo), math.log10(hi), points).tolist()
    runs: list[dict] = []
    for entry in choose(options, grid, rtt_ms, exits):
        if runs and runs[-1]["best"] == entry["best"]:
            runs[-1]["to_mbps"] = entry["mbps"]
        else:
            runs.append({"from_mbps": entry["mbps"], "to_mbps": entry["mbps"], "best": entry["best"]})
    return runs


def _check_exits(exits: list[ExitCost]) -> None:
    for e in exits:
        if not 0.0 <= e.rate <= 1.0:
            raise PlanError(f"exit {e.name} at {e.at}: rate {e.rate} outside [0, 1]")
    if sum(e.rate for e in exits) > 1.0 + 1e-9:
        raise PlanError(f"exit rates sum to {sum(e.rate for e in exits):.3f} > 1: give the fraction of all "
                        f"samples that stop at each exit")


# --------------------------------------------------------------------------- measurements on real data
def capture_cut_features(model, x: np.ndarray, cut_names: list[str]) -> dict[str, np.ndarray]:
    """The tensor crossing each (single-tensor) cut when ``model`` runs on ``x`` (float32 NCHW), computed
    in one PyTorch pass over the fx-traced model: ``{cut name: (N, ...) float32}``."""
    import torch
    from torch import fx

    from .graph import TracedModel

    traced = TracedModel(model, torch.from_numpy(x[:1]))
    want = {}
    for name in cut_names:
        cut = traced.cut(name)
        if not cut.single_tensor:
            raise PlanError(f"cut {name!r} carries {len(cut.crossing)} tensors; the planner uses single-tensor cuts")
        want[cut.crossing[0]] = name
    got: dict[str, np.ndarray] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in want:
                got[want[n.name]] = value.detach().numpy().astype(np.float32, copy=True)
            return value

    with torch.no_grad():
        _Capture(traced.gm).run(torch.from_numpy(x))
    return got


def feature_wire_bytes(name: str, feats: np.ndarray, codec: str = "zstd", hmac: bool = False,
                       wire=None, qparams: dict | None = None) -> dict:
    """Bytes on the wire per sample for the split feature ``feats`` (N, ...) at cut ``name``, quantised as the
    device would (``wire``, a :class:`toolkit.calibrate.WireCodec`: int8 affine min/max over the N samples by
    default, else n-bit codes, bit-packed, with ``qparams`` when given, e.g. a tail-kl range from
    :func:`tail_kl_qparams`), ``codec`` compression, one REQUEST frame per sample.

    Returns ``{"request_bytes" (mean frame bytes), "min", "max", "payload_bytes" (mean compressed
    tensor bytes), "frame_overhead_bytes" (mean), "int8_bytes", "fp32_bytes", "encode_ms" (median,
    quantise + compress + frame on this host), "qparams"}``."""
    from .calibrate import nbit_qparams

    if qparams is not None:
        q = qparams
    elif wire is not None and wire.nbit:
        q = nbit_qparams(feats, wire.bits, wire.per_channel, "minmax" if wire.range == "tail-kl" else wire.range)
    else:
        q = QuantParams.from_tensor(feats, "int8").to_json()
    params = QuantParams.from_json(q)
    secret = b"plan" if hmac else None
    sizes, payloads, times = [], [], []
    for i in range(len(feats)):
        t0 = time.perf_counter()
        qi = params.quantize(feats[i: i + 1])
        frame = protocol.encode_request(i, {name: qi}, {name: params.to_json()}, codec=codec, secret=secret)
        times.append((time.perf_counter() - t0) * 1e3)
        sizes.append(len(frame))
        payloads.append(protocol.parse_frame(frame, secret=secret).header["tensors"][0]["wire_nbytes"])
    elems = int(np.prod(feats.shape[1:]))
    return {"request_bytes": float(np.mean(sizes)), "min": int(min(sizes)), "max": int(max(sizes)),
            "payload_bytes": float(np.mean(payloads)), "frame_overhead_bytes": float(np.mean(sizes) - np.mean(payloads)),
            "int8_bytes": elems, "fp32_bytes": 4 * elems, "encode_ms": float(statistics.median(times)), "qparams": q}


def tail_kl_qparams(model, x: np.ndarray, cut_names: list[str], feats: dict[str, np.ndarray], wire,
                    alphas=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)) -> dict[str, dict]:
    """Per cut, the n-bit parameters of ``wire`` whose clipping range keeps the model's output closest to float
    (least mean KL divergence of the softmax over ``x``), as ``eetool export --wire-range tail-kl`` chooses
    them (:func:`toolkit.calibrate.tail_kl_alpha`, on a coarser grid of ``alphas``): the model runs with the
    cut's value replaced by its quantised-dequantised self. ``{cut name: quant entry}``."""
    import torch
    from torch import fx

    from .calibrate import _log_softmax, nbit_qparams
    from .graph import TracedModel

    traced = TracedModel(model, torch.from_numpy(x[:1]))
    node_of = {name: traced.cut(name).crossing[0] for name in cut_names}

    class _Replace(fx.Interpreter):
        def __init__(self, gm, node, value):
            super().__init__(gm)
            self.node, self.value = node, value

        def run_node(self, n):
            out = super().run_node(n)
            return self.value if n.name == self.node else out

    with torch.no_grad():
        ref = _log_softmax(traced.gm(torch.from_numpy(x)).numpy().astype(np.float64))
        out = {}
        for name in cut_names:
            best = None
            for a in alphas:
                q = nbit_qparams(feats[name], wire.bits, wire.per_channel, "minmax", alpha=float(a))
                nq = QuantParams.from_json(q)
                value = torch.from_numpy(nq.dequantize(nq.quantize(feats[name])))
                logp = _log_softmax(_Replace(traced.gm, node_of[name], value).run(torch.from_numpy(x))
                                    .numpy().astype(np.float64))
                kl = float((np.exp(ref) * (ref - logp)).sum(axis=1).mean())
                if best is None or kl < best[0]:
                    best = (kl, {**q, "range": "tail-kl", "alpha": float(a)})
            out[name] = best[1]
    return out


def jpeg_wire_bytes(files: list, hmac: bool = False, crop: int = 224) -> dict:
    """Bytes on the wire per sample when the device sends the JPEG file as it is (one uint8 tensor, codec
    none: JPEG does not compress further), and, for reference, the size of the same image resized and
    center-cropped to ``crop`` px and re-encoded at JPEG quality 90."""
    from PIL import Image

    secret = b"plan" if hmac else None
    sizes, frames, small = [], [], []
    for i, f in enumerate(files):
        data = Path(f).read_bytes()
        sizes.append(len(data))
        frames.append(len(protocol.encode_request(i, {"image": np.frombuffer(data, np.uint8)}, codec="none",
                                                  layout=None, secret=secret)))
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
            w, h = im.size
            im = im.crop(((w - crop) // 2, (h - crop) // 2, (w - crop) // 2 + crop, (h - crop) // 2 + crop))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            small.append(buf.tell())
    return {"request_bytes": float(np.mean(frames)), "file_bytes_mean": float(np.mean(sizes)),
            "file_bytes_min": int(min(sizes)), "file_bytes_max": int(max(sizes)),
            "frame_overhead_bytes": float(np.mean(frames) - np.mean(sizes)),
            "jpeg_224_q90_bytes_mean": float(np.mean(small)), "files": len(sizes)}


def reply_bytes(num_classes: int = 1000, topk: int = 5, hmac: bool = False) -> int:
    """Size of the server's default REPLY frame (top-``topk`` indices and scores, no logits)."""
    from runtime.server import topk_softmax

    idx, scores = topk_softmax(np.zeros((1, num_classes), np.float32), topk)
    return len(protocol.encode_reply(0, {"topk_indices": idx, "topk_scores": scores}, 1.0,
                                     secret=b"plan" if hmac else None))


# --------------------------------------------------------------------------- building the options
def build_options(table: dict, rows: list[dict], device: dict, server: dict, wire: dict, jpeg: dict | None,
                  reply: float, device_pre: tuple[float, str], server_pre: tuple[float, str]) -> list[Option]:
    """Options from the split table ``rows`` (graph order), the device and server layer profiles
    (:mod:`toolkit.layer_latency`), measured bytes ``wire`` (per cut, :func:`feature_wire_bytes`) and
    ``jpeg`` (:func:`jpeg_wire_bytes`; None: no full-offload option), the reply size, and preprocessing
    ``(ms, source)`` on the device (local and split options) and on the server (full offload)."""
    from .layer_latency import cumulative_for_rows

    dev = cumulative_for_rows(device, rows)
    srv = cumulative_for_rows(server, rows)
    d_total, s_total = float(device["total_ms"]), float(server["total_ms"])
    d_src, s_src = device["label"], server["label"]
    pre_note = f"preprocess {device_pre[0]:.2f} ms {device_pre[1]}"
    options = []
    if jpeg is not None:
        options.append(Option(OFFLOAD, "offload", -1, 0.0, server_pre[0] + s_total, jpeg["request_bytes"], reply, 0.0,
                              "-", f"{s_src}; decode+preprocess {server_pre[0]:.2f} ms {server_pre[1]}",
                              {"jpeg": jpeg, "tail_ms": s_total}))
    for i, r in enumerate(rows):
        w = wire[r["name"]]
        (dms, dnote), (sms, snote) = dev[i], srv[i]
        options.append(Option(
            r["name"], "split", i, device_pre[0] + dms, max(s_total - sms, 0.0), w["request_bytes"], reply,
            w["encode_ms"], d_src + (f" ({dnote})" if dnote else "") + f"; {pre_note}", s_src,
            {"shape": r["shape"], "head_mflops": r["head_mflops"], "tail_mflops": r["tail_mflops"],
             "wire": {k: v for k, v in w.items() if k != "qparams"}, "qparams": w["qparams"],
             "head_ms": dms, "tail_ms": max(s_total - sms, 0.0)}))
    options.append(Option(LOCAL, "local", len(rows), device_pre[0] + d_total, 0.0, 0.0, 0.0, 0.0,
                          f"{d_src}; {pre_note}", "-", {"head_ms": d_total, "total_mflops": table["total_mflops"]}))
    return options


def exits_from_manifest(manifest: Manifest) -> list[dict]:
    """``[{"name", "at", "rate", "mflops"}]`` from a bundle manifest's exits, with the rate calibrated on
    the float ONNX graphs (else on any format: ``expected_exit_rate``, as 'eetool exits calibrate' writes
    it). Raises PlanError when an exit has no rate."""
    out = []
    for e in manifest.exits:
        rate = e.exit_rate_for("onnx/fp32")
        if rate is None:
            raise PlanError(f"exit {e.name} at {e.at} has no expected_exit_rate in the manifest: "
                            f"calibrate the exits first, or pass --exit-rates")
        out.append({"name": e.name, "at": e.at, "rate": float(rate), "mflops": float(e.mflops or 0.0)})
    return out


def parse_exit_rates(text: str) -> list[dict]:
    """``--exit-rates`` JSON: ``{"blocks.2": 0.3, "blocks.5": {"rate": 0.2, "mflops": 0.1}}`` (cut -> fraction
    of all samples that stop there, optionally with the branch's MFLOPs) -> exit dicts."""
    import json

    try:
        data = json.loads(text)
    except ValueError as e:
        raise PlanError(f"--exit-rates is not JSON: {e}")
    if not isinstance(data, dict):
        raise PlanError('--exit-rates must be a JSON object such as {"blocks.2": 0.3}')
    out = []
    for i, (at, v) in enumerate(data.items()):
        spec = v if isinstance(v, dict) else {"rate": v}
        try:
            out.append({"name": f"exit{i}", "at": at, "rate": float(spec["rate"]), "mflops": float(spec.get("mflops", 0.0))})
        except (KeyError, TypeError, ValueError):
            raise PlanError(f"--exit-rates: bad entry for {at!r}: {v!r}")
    return out


def exit_costs(exits: list[dict], all_rows: list[dict], device: dict, device_pre_ms: float,
               plan_rows: list[dict], device_gflops: float) -> list[ExitCost]:
    """Cost of each exit on the device: time to reach its cut (from the device profile, via the full split
    table ``all_rows``), its branch time ``mflops / device_gflops`` and its order relative to the planned
    cuts ``plan_rows`` (an exit is usable by every split at or after its cut)."""
    from .layer_latency import cumulative_for_rows

    cum = cumulative_for_rows(device, all_rows)
    pos = {}
    for i, r in enumerate(all_rows):
        for n in [r["name"]] + list(r["aliases"]):
            pos[n] = i
    plan_pos = [pos[r["name"]] for r in plan_rows]
    out = []
    for e in exits:
        if e["at"] not in pos:
            raise PlanError(f"exit {e['name']} at {e['at']!r}: not a split point of this model (see 'eetool inspect')")
        p = pos[e["at"]]
        # order among planned options: the index of the first planned cut at or after the exit's cut
        order = next((i for i, q in enumerate(plan_pos) if q >= p), len(plan_rows))
        out.append(ExitCost(e["name"], e["at"], order, e["rate"], device_pre_ms + cum[p][0], e["mflops"] / device_gflops))
    return out


def parse_bandwidths(text: str) -> list[float]:
    """``"1,10,100mbit"`` -> ``[1.0, 10.0, 100.0]`` Mbit/s: :func:`runtime.link.parse_bandwidths` (the one
    bandwidth grammar of every eetool option), its errors as PlanError."""
    from runtime.link import parse_bandwidths as parse

    try:
        return parse(text)
    except ValueError as e:
        raise PlanError(f"--bandwidth: {e}") from None


# --------------------------------------------------------------------------- output
def to_json(options: list[Option], results: list[dict], context: dict, sweep: list[dict],
            exits: list[ExitCost]) -> dict:
    return {**context, "options": [asdict(o) for o in options], "exits": [asdict(e) for e in exits],
            "bandwidths": results, "best_by_bandwidth": sweep,
            "best": {_fmt_bw(r["mbps"]): r["best"] for r in results},
            "units": {"time": "ms", "size": "bytes per sample", "bandwidth": "Mbit/s (10^6 bit/s)"}}


def _fmt_bw(mbps: float) -> str:
    return f"{mbps:g} Mbit/s"


def render(options: list[Option], results: list[dict], title: str, exits: list[ExitCost]):
    """A rich Table: one row per option, end-to-end (expected) ms per bandwidth, the best marked ``*``."""
    from rich.table import Table

    t = Table(title=title)
    for col, just in [("option", "left"), ("device ms", "right"), ("encode ms", "right"), ("bytes/sample", "right"),
                      ("server ms", "right")]:
        t.add_column(col, justify=just)
    for r in results:
        t.add_column(f"{'E[ms]' if exits else 'total ms'} @ {_fmt_bw(r['mbps'])}", justify="right")
    for o in options:
        cells = [o.name, f"{o.device_ms:.2f}", f"{o.encode_ms:.2f}" if o.kind == "split" else "-",
                 f"{o.request_bytes:,.0f}" if o.request_bytes else "0", f"{o.server_ms:.2f}" if o.server_ms else "-"]
        for r in results:
            ms = r["rows"][o.name]["expected_ms"]
            cells.append(f"[bold green]*{ms:.1f}[/]" if r["best"] == o.name else f"{ms:.1f}")
        t.add_row(*cells)
    return t


def plot(options: list[Option], results: list[dict], path, title: str) -> None:
    """PNG of end-to-end (expected) latency vs split point, one line per bandwidth, the best marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [o.name for o in options]
    xs = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.38 * len(names) + 3), 4.2))
    for r in results:
        ys = [r["rows"][n]["expected_ms"] for n in names]
        line, = ax.plot(xs, ys, marker="o", markersize=3, label=f"{_fmt_bw(r['mbps'])}")
        b = names.index(r["best"])
        ax.plot([b], [ys[b]], marker="*", markersize=16, color=line.get_color(), markeredgecolor="black")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("end-to-end latency per sample (ms, log)")
    ax.set_xlabel("split point (device runs everything up to it); * = best at that bandwidth")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="uplink", fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def explain(results: list[dict], sweep: list[dict], options: list[Option] | None = None,
            rtt_ms: float = 0.0) -> list[str]:
    """Plain lines: the best option per bandwidth, and where along a 0.1..10^4 Mbit/s sweep it changes
    (or why one option wins everywhere asked: the server is no faster than the device, or the round trip
    ``rtt_ms`` costs more than offloading saves)."""
    lines = [f"best at {_fmt_bw(r['mbps'])}: {r['best']} ({r['best_ms']:.1f} ms)" for r in results]
    lines.append("best over a bandwidth sweep: " + "; ".join(
        f"{s['best']} from {s['from_mbps']:.3g} to {s['to_mbps']:.3g} Mbit/s" for s in sweep))
    if len({r["best"] for r in results}) == 1 and len(results) > 1:
        lines.append(f"the same option ({results[0]['best']}) wins at every bandwidth asked for: see the sweep "
                     f"above for where the choice changes")
    if options and all(s["best"] == LOCAL for s in sweep):
        local = next(o for o in options if o.kind == "local")
        others = [o for o in options if o.kind != "local"]
        if others:
            o = min(others, key=lambda o: o.device_ms + o.encode_ms + o.server_ms)
            compute = o.device_ms + o.encode_ms + o.server_ms
            head = (f"why local wins at every bandwidth: even with a free link, the cheapest offloading option "
                    f"({o.name}: device {o.device_ms:.1f} + encode {o.encode_ms:.1f} + server {o.server_ms:.1f} = "
                    f"{compute:.1f} ms")
            if compute >= local.device_ms:
                lines.append(f"{head}) is no faster than running everything on the device ({local.device_ms:.1f} "
                             f"ms): the server is not faster than the device (same machine or same speed), so "
                             f"splitting only adds work and transmission")
            else:
                lines.append(f"{head}, plus the {rtt_ms:g} ms round trip) is no faster than running everything on "
                             f"the device ({local.device_ms:.1f} ms): the model is too cheap on this device for the "
                             f"round trip to pay off")
    return lines


# --------------------------------------------------------------------------- end to end
@dataclass
class PlanRequest:
    """What ``eetool plan`` was asked (see the CLI for each field)."""

    board: str = "host"
    bandwidths_mbps: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0])
    rtt_ms: float = 0.0
    downlink_mbps: float | None = None
    server_profile: str = "host"
    measurements: str | None = None
    data: str | None = None
    samples: int = 16
    codec: str = "zstd"
    wire: object = None  # toolkit.calibrate.WireCodec; None: int8 per tensor
    candidates: list[str] | None = None
    depth: int = 2
    runs: int = 20
    warmup: int = 3
    threads: int | None = None
    exits: list[dict] = field(default_factory=list)
    hmac: bool = False


def make_plan(src, req: PlanRequest, progress=None) -> tuple[list[Option], list[dict], list[ExitCost], dict]:
    """Measure and plan for the resolved model ``src`` (:class:`toolkit.sources.ModelSource`). Returns
    ``(options, results, exits, report)`` where ``report`` is the JSON-ready plan."""
    from calibration.readers import default_data, read_dataset
    from runtime.profile_layers import preprocess_ms as measure_preprocess

    from . import layer_latency as LL
    from .inspect_model import split_table

    say = progress or (lambda msg: None)
    if src.kind == "onnx":
        raise PlanError("eetool plan needs a PyTorch model (zoo name or file.py:factory), not an ONNX file")
    board = LL.board_profile(req.board)
    wire_codec.check_codec(req.codec)

    say("split table (FLOPs per cut)")
    table = split_table(src.model, src.input_shape, req.depth)
    rows = [r for r in table["rows"] if r["single_tensor"]]
    skipped = [r["name"] for r in table["rows"] if not r["single_tensor"]]
    if req.candidates:
        known = {n: r for r in rows for n in [r["name"]] + list(r["aliases"])}
        missing = [c for c in req.candidates if c not in known]
        if missing:
            raise PlanError(f"--candidates: {missing} are not single-tensor split points at depth {req.depth}; "
                            f"valid: {', '.join(r['name'] for r in rows)}")
        chosen = {known[c]["name"] for c in req.candidates}
        rows = [r for r in rows if r["name"] in chosen]
    if not rows:
        raise PlanError("no single-tensor split point to plan for")
    all_rows = table["rows"]
    exit_ats = {e["at"] for e in req.exits}
    if exit_ats - {n for r in all_rows for n in [r["name"]] + list(r["aliases"])}:
        deeper = max(a.count(".") + 1 for a in exit_ats)
        all_rows = split_table(src.model, src.input_shape, max(deeper, req.depth))["rows"]

    # measurement files first: a wrong file fails before any input is read
    device_file = _measured(req.measurements, src, "--measurements") if req.measurements else None
    if device_file is not None and device_file["board"] != board["name"]:
        raise PlanError(f"--measurements {req.measurements} was measured on {device_file['board']!r}, not on "
                        f"--board {board['name']!r}: pass --board {device_file['board']}, or the bench folder "
                        f"from a {board['name']} board")
    if device_file is not None:
        LL.check_architecture(device_file, board)
    sp = req.server_profile
    server_file = _measured(sp, src, "--server-profile") if LL.is_layer_profile(sp) else None

    data = req.data or default_data(src.preprocess)
    say(f"reading {req.samples} real inputs from {data}")
    ds = read_dataset(data, src.preprocess, limit=req.samples)
    files = [Path(f) for f in (ds.files or [])]
    image_files = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg")]

    nbit_wire = req.wire is not None and req.wire.nbit
    say(f"{req.wire.label() if nbit_wire else 'int8'} split features on real inputs: bytes on the wire")
    feats = capture_cut_features(src.model, ds.x, [r["name"] for r in rows])
    qparams = {}
    if nbit_wire and req.wire.range == "tail-kl":
        say("tail-kl wire ranges per cut (the model run with each quantised feature)")
        qparams = tail_kl_qparams(src.model, ds.x, list(feats), feats, req.wire)
    wire = {name: feature_wire_bytes(name, f, req.codec, req.hmac, req.wire, qparams.get(name))
            for name, f in feats.items()}
    del feats
    jpeg = jpeg_wire_bytes(image_files, req.hmac) if image_files else None
    reply = float(reply_bytes(_num_classes(src), hmac=req.hmac))

    host = None

    def host_profile():
        nonlocal host
        if host is None:
            say("per-layer latency on this host (onnxruntime profiling)")
            host = LL.measure_host(src.model, src.input_shape, ds.x[: min(len(ds.x), 8)], files[:8] or None,
                                   src.preprocess, req.runs, req.warmup, req.threads)
        return host

    if device_file is not None:
        device = device_file
    elif board["name"] == "host":
        device = host_profile()
    else:
        device = LL.estimate_profile(table, board)
    if server_file is not None:
        server = server_file
    elif sp == "host":
        server = host_profile()
    else:
        server = LL.estimate_profile(table, LL.board_profile(sp))

    host_pre = None
    if image_files and src.preprocess.get("kind") == "image":
        host_pre = (host or {}).get("preprocess_ms") or measure_preprocess(image_files[:8], src.preprocess)

    def pre_for(profile: dict) -> tuple[float, str]:
        if profile.get("preprocess_ms") is not None and profile["label"] != LL.SOURCE_ESTIMATE:
            return float(profile["preprocess_ms"]), f"({profile['label']})"
        if host_pre is not None:
            return float(host_pre), "(measured on this host)"
        return 0.0, "(array inputs: none)"

    device_pre, server_pre = pre_for(device), pre_for(server)
    options = build_options(table, rows, device, server, wire, jpeg, reply, device_pre, server_pre)
    if device["label"] == LL.SOURCE_ESTIMATE:
        gflops = float(device["gflops"])
    else:
        gflops = table["total_mflops"] / float(device["total_ms"])  # effective GFLOP/s of the measured run
    exits = exit_costs(req.exits, all_rows, device, device_pre[0], rows, gflops) if req.exits else []
    results = choose(options, req.bandwidths_mbps, req.rtt_ms, exits, req.downlink_mbps)
    sweep = best_by_bandwidth(options, req.rtt_ms, exits)
    context = {
        "model": src.name, "board": board["name"], "server_profile": sp, "codec": req.codec, "rtt_ms": req.rtt_ms,
        "wire": req.wire.label() if nbit_wire else f"int8 + {req.codec}",
        "downlink_mbps": req.downlink_mbps, "hmac": req.hmac, "data": ds.source, "samples": len(ds),
        "device_source": device["source"], "server_source": server["source"],
        "device_label": device["label"], "server_label": server["label"],
        "total_mflops": table["total_mflops"], "input_bytes_fp32": table["input_bytes_fp32"],
        "input_bytes_int8": table["input_bytes_fp32"] // 4, "reply_bytes": reply,
        "device_preprocess": {"ms": device_pre[0], "source": device_pre[1]},
        "server_preprocess": {"ms": server_pre[0], "source": server_pre[1]},
        "jpeg": jpeg, "skipped_multi_tensor_cuts": skipped, "device_total_ms": device["total_ms"], "server_total_ms": server["total_ms"],
        "citation": "Kang et al., Neurosurgeon: Collaborative Intelligence Between the Cloud and Mobile Edge, ASPLOS 2017",
    }
    report = to_json(options, results, context, sweep, exits)
    report["explanation"] = explain(results, sweep, options, req.rtt_ms)
    report["host_measurement"] = {k: v for k, v in host.items() if k != "label"} if host else None
    return options, results, exits, report


def _measured(path: str, src, option: str) -> dict:
    """A layer profile for ``src`` from ``path`` (file or bench folder); refuses one measured on another
    model (its recorded model name or input shape differ), which would otherwise pass whenever module
    names happen to coincide."""
    from . import layer_latency as LL

    prof = LL.load_measurements(path)
    shape = prof.get("input_shape")
    if shape and [int(d) for d in shape[1:]] != [int(d) for d in src.input_shape[1:]]:
        raise PlanError(f"{option} {path}: measured with input {shape}, but {src.name} takes "
                        f"{list(src.input_shape)}: it profiles another model")
    name = prof.get("model_source")
    if name and name != src.name:
        raise PlanError(f"{option} {path}: measured on model {name!r}, not {src.name!r}")
    return prof


def _num_classes(src) -> int:
    import torch

    with torch.no_grad():
        return int(src.model(torch.zeros(src.input_shape)).shape[-1])

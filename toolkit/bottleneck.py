"""Bottleneck injection for split computing: an encoder on the device that cuts the split feature to a few
channels at a coarser grid, a decoder on the server that restores the features the original tail expects.

Layout of a model with a bottleneck (:class:`BottleneckModel`), for split point ``S`` and target layer ``T``:

    input -> head (original layers up to S; the last ones optionally fine-tuned)
          -> encoder (device):  (N, C_s, H, W) -> (N, C, H/s, W/s) in [0, 1]       <- sent over the wire
          -> decoder (server):  1x1 conv + depth-to-space back to (N, C_s, H, W), then a trainable copy of the
                                original layers between S and T -> (N, C_t, H_t, W_t) ~ the original's output at T
          -> tail (original layers after T, frozen) -> logits

This is the structure of Matsubara et al.'s head network distillation (HND: "Distilled Split Deep Neural
Networks for Edge-Assisted Real-Time Systems", HotEdgeVideo 2019; "Head Network Distillation", IEEE Access
2020): a small encoder/decoder pair with a narrow bottleneck replaces the layers around the split and is
trained to reproduce the original model's features at a later layer, so no labels are needed and the tail
is reused unchanged. Choices taken from the field:

- a stride-2 encoder and few channels (sc2bench's ``larger_resnet_bottleneck`` and FrankenSplit's encoders
  downsample before the bottleneck; C = 1..24 in sc2bench's ``ghnd-bq`` configs for ResNet-50);
- the encoder ends in a bounded output (``clamp`` to [0, 1]) so that one fixed n-bit grid, ``scale =
  1 / (2**n - 1)`` and ``zero_point = 0``, quantises every channel; the encoder's weights learn each channel's
  range. Training simulates that quantisation (straight-through rounding, :func:`fake_quant`), as sc2bench
  and FrankenSplit train against the quantiser they deploy;
- the decoder begins with the exact inverse of a closed-form initialisation (:func:`pca_init`: PCA of the
  split feature's s x s patches over representative data) and continues with the original model's own
  layers, so training starts from "PCA + original tail" instead of from scratch.

Tensors are float32 NCHW throughout. Weights are saved as tensors only (:func:`save`, loaded with
``torch.load(weights_only=True)``); everything else is JSON.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .flops import module_flops
from .graph import SplitError, TracedModel
from .slicing import order_cuts, slice_model

SCHEMA = "eetool.bottleneck/1"
WEIGHTS = "bottleneck.pt"
CONFIG = "bottleneck.json"


class BottleneckError(ValueError):
    """A bottleneck that cannot be built, loaded or used with this model; the message says why."""


def fake_quant(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``z`` (values in [0, 1]) to the ``bits``-bit grid ``k / (2**bits - 1)`` in the forward pass and
    pass the gradient straight through (Bengio et al. 2013's straight-through estimator)."""
    levels = (1 << int(bits)) - 1
    return z + (torch.round(z * levels) / levels - z).detach()


def code_entropy_bits(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Differentiable estimate of the order-0 entropy, in bits per value, of the ``bits``-bit codes
    ``round(z * (2**bits - 1))`` pooled over every value of ``z`` (float32, any shape, values in [0, 1]).

    Linear-interpolation soft histogram: a value between grid levels k and k+1 counts ``1 - f`` towards k and
    ``f`` towards k+1 (``f`` its fractional position), ``p`` is the normalised histogram and the estimate is
    ``-sum_k p_k log2 p_k``; after the soft-assignment entropy estimate of Agustsson et al., "Soft-to-Hard
    Vector Quantization for End-to-End Learning Compressible Representations" (NeurIPS 2017, section 3.2),
    which assigns by a softmax over distances instead. Its gradient moves
    each value towards the more frequent of its two neighbouring levels, so minimising it concentrates the
    codes on fewer levels. Pooled over channels and positions because the wire's entropy coders (zstd's
    Huffman literals, brotli) code the byte stream of the whole tensor with one model. Returns a 0-d tensor."""
    levels = (1 << int(bits)) - 1
    t = z.clamp(0.0, 1.0).reshape(-1) * levels
    lo = t.detach().floor().clamp(max=levels - 1)
    frac = t - lo
    idx = lo.long()
    hist = torch.zeros(levels + 1, dtype=z.dtype, device=z.device)
    hist = hist.index_add(0, idx, 1.0 - frac).index_add(0, idx + 1, frac)
    p = hist / max(1, t.numel())
    return -(p * torch.log2(p.clamp_min(1e-12))).sum()


def histogram_entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per value of codes with histogram ``counts`` (``counts[k]``: how many codes
    equal k): what an ideal coder of the pooled histogram spends; zstd / brotli frames of a bottleneck code
    come within a few percent of it, plus framing."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / max(1.0, counts.sum())
    return float(-(p * np.log2(p)).sum())


class Encoder(nn.Module):
    """Device side of the bottleneck: a ``stride`` x ``stride`` convolution with stride ``stride`` (a linear
    map of each non-overlapping patch, initialised by :func:`pca_init`) and a clamp to [0, 1].

    Input float32 ``(N, in_channels, H, W)``; output float32 ``(N, channels, H / stride, W / stride)`` in
    [0, 1]. H and W must be multiples of ``stride``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.conv(x), 0.0, 1.0)


class Refine(nn.Module):
    """A residual inverted-bottleneck block (1x1 expand, 3x3 depthwise, 1x1 project, ReLU6, as in
    MobileNetV2 / EfficientNet-Lite) whose projection starts at zero, so it starts as the identity and
    learns a nonlinear correction. ``(N, C, H, W)`` -> ``(N, C, H, W)``, float32."""

    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        mid = channels * expand
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid), nn.ReLU6(),
            nn.Conv2d(mid, channels, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Decoder(nn.Module):
    """Server side of the bottleneck: ``expand`` (1x1 conv, ``channels`` -> ``in_channels * stride**2``),
    ``refine`` (``refine`` residual :class:`Refine` blocks at the code's resolution, identity at the start)
    and depth-to-space rebuild the split feature ``(N, in_channels, H, W)``; ``trunk`` (a trainable copy of
    the original layers between the split point and the target layer) maps it to the target layer's tensor.

    Input float32 ``(N, channels, H / stride, W / stride)``; output float32, the target layer's shape."""

    def __init__(self, channels: int, in_channels: int, stride: int, trunk: nn.Module, refine: int = 0):
        super().__init__()
        self.expand = nn.Conv2d(channels, in_channels * stride * stride, 1)
        self.refine = nn.Sequential(*[Refine(in_channels * stride * stride) for _ in range(refine)])
        self.shuffle = nn.PixelShuffle(stride)
        self.trunk = trunk

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's estimate of the split feature, ``(N, in_channels, H, W)``."""
        return self.shuffle(self.refine(self.expand(z)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.reconstruct(z))


class BottleneckModel(nn.Module):
    """The original classifier with a bottleneck: ``head`` -> ``encoder`` -> [``wire_bits``-bit quantisation]
    -> ``decoder`` -> ``tail``. ``head`` is ``nn.Sequential(frozen, tuned)`` (``tuned`` may be empty).

    ``wire_bits`` (None by default) simulates the wire's n-bit quantisation in ``forward``; exported graphs
    are traced with it off, because the runtime's codec quantises between the device and server graphs.
    Input float32 ``(N, 3, H, W)``; output float32 logits ``(N, classes)``. The split point for export is
    the module ``encoder``."""

    def __init__(self, head: nn.Sequential, encoder: Encoder, decoder: Decoder, tail: nn.Module):
        super().__init__()
        self.head, self.encoder, self.decoder, self.tail = head, encoder, decoder, tail
        self.wire_bits: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self.head(x))
        if self.wire_bits is not None:
            z = fake_quant(z, self.wire_bits)
        return self.tail(self.decoder(z))

    def trainable(self) -> dict[str, nn.Module]:
        """The parts distillation trains, by the prefix of their keys in the saved state dict."""
        return {"head.1": self.head[1], "encoder": self.encoder, "decoder": self.decoder}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor (parameters and BN buffers), keyed ``head.1.*``, ``encoder.*``, ``decoder.*``."""
        return {f"{p}.{k}": v.detach().contiguous().clone()
                for p, m in self.trainable().items() for k, v in m.state_dict().items()}


@dataclass
class BottleneckSpec:
    """Where and how big: ``split`` S and ``target`` T are module paths of the original model (single-tensor
    cuts, S before T); ``tune_from`` (optional, before S) makes the original layers between it and S
    trainable too; ``channels`` C and ``stride`` s size the bottleneck; ``bits`` is the wire quantisation
    the training simulates; ``refine`` residual blocks in the decoder add nonlinear capacity on the server."""

    split: str
    target: str
    channels: int
    stride: int = 2
    bits: int = 4
    tune_from: str | None = None
    refine: int = 0

    def check(self) -> None:
        if self.channels < 1:
            raise BottleneckError(f"--channels {self.channels}: give at least 1 channel")
        if self.stride < 1:
            raise BottleneckError(f"stride {self.stride}: must be >= 1")
        if not 1 <= self.bits <= 8:
            raise BottleneckError(f"--bits {self.bits}: the wire quantisation takes 1..8 bits")


@dataclass
class Built:
    """A :class:`BottleneckModel` plus the shapes (batch dim excluded) it was sized from."""

    model: BottleneckModel
    split_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    code_shape: tuple[int, ...]
    #: the original (teacher) layers the trainable copies started from: ``tuned`` (tune_from -> S, or
    #: identity) and ``between`` (S -> T); frozen, shared with the original model
    teacher: dict[str, nn.Module] = field(default_factory=dict)


def _single(traced: TracedModel, name: str, role: str):
    cut = traced.cut(name)
    problem = cut.nchw_problem()
    if problem:
        raise BottleneckError(f"{role} {name!r} {problem}; a bottleneck needs one NCHW feature map")
    return cut


def build(model: nn.Module, sample: torch.Tensor, spec: BottleneckSpec) -> Built:
    """Insert a bottleneck into ``model`` (left untouched: the head's frozen layers and the tail are shared,
    the trainable parts are copies). ``sample``: one real input, float32 ``(1, C, H, W)``.

    Raises SplitError for unknown layer names and BottleneckError for unusable cuts (several tensors, not
    4-D, S not before T, H or W not a multiple of the stride)."""
    spec.check()
    traced = TracedModel(model.eval(), sample)
    s_cut = _single(traced, spec.split, "split point")
    t_cut = _single(traced, spec.target, "target layer")
    if t_cut.position <= s_cut.position:
        raise BottleneckError(f"target layer {spec.target!r} must come after the split point {spec.split!r}: "
                              f"the decoder replaces the layers between them")
    names = [spec.split, spec.target]
    if spec.tune_from:
        f_cut = _single(traced, spec.tune_from, "--tune-from")
        if f_cut.position >= s_cut.position:
            raise BottleneckError(f"--tune-from {spec.tune_from!r} must come before the split point {spec.split!r}")
        names.insert(0, spec.tune_from)
    segments = slice_model(traced, order_cuts(traced, names))
    split_shape, target_shape = tuple(s_cut.shapes[0][1:]), tuple(t_cut.shapes[0][1:])
    c, h, w = split_shape
    if h % spec.stride or w % spec.stride:
        raise BottleneckError(f"split feature {c}x{h}x{w} is not divisible by stride {spec.stride}")
    if spec.tune_from:
        frozen, original_tuned, between, tail = segments
        original_tuned = original_tuned.module
    else:
        frozen, between, tail = segments
        original_tuned = nn.Identity()
    tuned = copy.deepcopy(original_tuned)
    head = nn.Sequential(frozen.module, tuned)
    encoder = Encoder(c, spec.channels, spec.stride)
    decoder = Decoder(spec.channels, c, spec.stride, copy.deepcopy(between.module), spec.refine)
    bm = BottleneckModel(head, encoder, decoder, tail.module)
    for p in bm.head[0].parameters():
        p.requires_grad_(False)
    for p in bm.tail.parameters():
        p.requires_grad_(False)
    code = (spec.channels, h // spec.stride, w // spec.stride)
    return Built(bm.eval(), split_shape, target_shape, code,
                 teacher={"tuned": original_tuned.eval(), "between": between.module.eval()})


def tail_parts(model: nn.Module, sample: torch.Tensor, target: str, points: list[str]) -> list[tuple[str, nn.Module]]:
    """The frozen original layers after ``target`` cut at ``points`` (module paths after T, single-tensor
    cuts): ``[(points[0], T -> points[0]), ..., ("logits", last point -> output)]``, for losses that match
    later layers too (GHND). Raises SplitError / BottleneckError for unusable points."""
    traced = TracedModel(model.eval(), sample)
    t_pos = traced.cut(target).position
    for name in points:
        if _single(traced, name, "loss point").position <= t_pos:
            raise BottleneckError(f"loss point {name!r} must come after the target layer {target!r}")
    segments = slice_model(traced, order_cuts(traced, [target, *points]))[1:]
    return [(seg.until or "logits", seg.module.eval()) for seg in segments]


def default_target(model: nn.Module, sample: torch.Tensor, split: str, stride: int) -> str:
    """The default target layer T for a bottleneck after ``split``: the first single-tensor cut after it whose
    spatial size is the bottleneck's (split size / ``stride``), so the decoder replaces the layers that
    downsample anyway. Raises SplitError / BottleneckError when there is none."""
    traced = TracedModel(model.eval(), sample)
    s_cut = _single(traced, split, "split point")
    want = tuple(d // stride for d in s_cut.shapes[0][2:])
    for cut in traced.candidates(max_depth=split.count(".") + 1):
        if cut.position > s_cut.position and cut.single_tensor and tuple(cut.shapes[0][2:]) == want:
            return cut.name
    raise BottleneckError(f"no layer after {split!r} has the bottleneck's spatial size {want}; give --target-layer")


@torch.no_grad()
def pca_init(encoder: Encoder, decoder: Decoder, features: torch.Tensor, percentiles=(0.1, 99.9)) -> dict:
    """Closed-form initialisation of the encoder/decoder pair from real split features ``(N, C_s, H, W)``.

    Each non-overlapping s x s patch is a vector of D = C_s * s * s values. With its mean ``mu`` and the
    top-C eigenvectors ``V`` (D, C) of its covariance, the encoder computes the C principal components,
    mapped affinely so that the ``percentiles`` of each land at 0 and 1; the decoder's ``expand`` computes
    the least-squares reconstruction ``mu + V z`` and depth-to-space puts the patches back. Returns
    ``{"explained_variance": fraction of patch variance the C components keep, "relative_mse": the
    reconstruction's MSE over the mean per-channel variance of the features, after the clamp, without
    quantisation}``."""
    s = encoder.conv.stride[0]
    patches = F.pixel_unshuffle(features.float(), s)  # (N, D, h, w), channel order (c, dy, dx) = conv weight order
    d = patches.shape[1]
    x = patches.permute(0, 2, 3, 1).reshape(-1, d).double()
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / max(1, len(x) - 1)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    c = encoder.conv.out_channels
    if c > d:
        raise BottleneckError(f"{c} channels exceed the {d} values of a {s}x{s} patch of the split feature")
    v = evecs[:, order[:c]]
    v = v * torch.sign(v.sum(0, keepdim=True) + 1e-30)  # sign convention: deterministic across LAPACKs
    z = (x - mu) @ v
    lo = torch.quantile(z.float(), percentiles[0] / 100, dim=0).double()
    hi = torch.quantile(z.float(), percentiles[1] / 100, dim=0).double()
    span = (hi - lo).clamp_min(1e-6)
    encoder.conv.weight.copy_((v / span).T.reshape(c, -1, s, s).float())
    encoder.conv.bias.copy_(((-(mu @ v) - lo) / span).float())
    decoder.expand.weight.copy_((v * span).reshape(d, c, 1, 1).float())
    decoder.expand.bias.copy_((mu + v @ lo).float())
    rec = decoder.reconstruct(encoder(features.float()))
    rel = float(((rec - features) ** 2).mean() / features.var(dim=(0, 2, 3)).mean())
    return {"explained_variance": float(evals[order[:c]].sum() / evals.sum()), "relative_mse": rel}


def device_mflops(bm: BottleneckModel, sample: torch.Tensor) -> float:
    """MFLOPs of the device side (head + encoder) for one input (2 FLOPs per multiply-add)."""
    return module_flops(nn.Sequential(bm.head, bm.encoder), sample) / 1e6


# ----------------------------------------------------------------------------------------------- files
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(out: Path, bm: BottleneckModel, spec: BottleneckSpec, info: dict) -> dict:
    """Write ``bottleneck.pt`` (the trained tensors only) and ``bottleneck.json`` (spec, ``info``: model,
    training data and results, and the weights' sha256) into ``out``; returns the JSON dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    torch.save(bm.trainable_state(), tmp)
    tmp.replace(out / WEIGHTS)
    config = {"schema": SCHEMA, **asdict(spec), **info,
              "weights": {"file": WEIGHTS, "sha256": sha256_bytes((out / WEIGHTS).read_bytes()),
                          "bytes": (out / WEIGHTS).stat().st_size}}
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config


def read_config(path: Path) -> dict:
    """Read and check ``bottleneck.json`` of the directory ``path``. Raises BottleneckError."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise BottleneckError(f"{path}: no {CONFIG}; give a directory written by 'eetool bottleneck train'")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BottleneckError(f"{cfg_file}: not valid JSON ({e})") from None
    if cfg.get("schema") != SCHEMA:
        raise BottleneckError(f"{cfg_file}: schema {cfg.get('schema')!r}, expected {SCHEMA!r}")
    return cfg


def spec_of(cfg: dict) -> BottleneckSpec:
    return BottleneckSpec(split=cfg["split"], target=cfg["target"], channels=int(cfg["channels"]),
                          stride=int(cfg["stride"]), bits=int(cfg["bits"]), tune_from=cfg.get("tune_from"),
                          refine=int(cfg.get("refine", 0)))


def load(path: Path, model: nn.Module, sample: torch.Tensor, model_name: str | None = None) -> tuple[Built, dict]:
    """Rebuild the bottleneck model saved in ``path`` around ``model`` and load its tensors
    (``weights_only=True``), after checking the sha256 recorded in ``bottleneck.json``.

    Raises BottleneckError for a missing or corrupt file, another model, or tensors that do not fit."""
    state, cfg = read_state(path, model_name)
    built = build(model, sample, spec_of(cfg))
    load_trainable(built.model, state, str(Path(path) / cfg["weights"]["file"]))
    return built, cfg


def read_state(path: Path, model_name: str | None = None) -> tuple[dict, dict]:
    """(trainable tensors, ``bottleneck.json``) of the directory ``path``, loaded with ``weights_only=True``
    after checking the recorded sha256. Raises BottleneckError for a missing or corrupt file or another
    model."""
    cfg = read_config(path)
    if model_name and cfg.get("model", {}).get("source") not in (None, model_name):
        raise BottleneckError(f"{path} was trained for model {cfg['model']['source']!r}, not {model_name!r}")
    wfile = Path(path) / cfg["weights"]["file"]
    if not wfile.is_file():
        raise BottleneckError(f"{wfile}: missing")
    data = wfile.read_bytes()
    if sha256_bytes(data) != cfg["weights"]["sha256"]:
        raise BottleneckError(f"{wfile}: sha256 differs from {CONFIG} (corrupt or replaced file)")
    try:
        return torch.load(wfile, map_location="cpu", weights_only=True), cfg
    except Exception as e:  # truncated or not a torch file, though its sha256 matches a hand-edited json
        raise BottleneckError(f"{wfile}: cannot be read as tensors ({type(e).__name__}: {e}); retrain or restore "
                              f"it") from None


def load_trainable(bm: BottleneckModel, state: dict, where: str = "state", extend: bool = False) -> None:
    """Load ``state`` (keys from :meth:`BottleneckModel.trainable_state`) strictly; with ``extend``, ``state``
    may come from a bottleneck with an earlier target layer: the decoder's trunk layers it lacks keep their
    current weights (copies of the original model's). Raises BottleneckError."""
    for prefix, module in bm.trainable().items():
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if extend and prefix == "decoder":
            own = module.state_dict()
            bad = [k for k, v in part.items() if k not in own or own[k].shape != v.shape]
            lacking = [k for k in own if k not in part and not k.startswith("trunk.")]
            if bad or lacking:
                raise BottleneckError(f"{where} does not fit this bottleneck: "
                                      + (f"tensors {bad[:3]} are not in its decoder (is its target layer later "
                                         f"than this one?)" if bad else f"it lacks {lacking[:3]}"))
            part = {**own, **part}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise BottleneckError(f"{where} does not fit this bottleneck ({' '.join(lines[:3])[:300]})") from None
    known = tuple(p + "." for p in bm.trainable())
    extra = [k for k in state if not k.startswith(known)]
    if extra:
        raise BottleneckError(f"{where}: unexpected tensors {extra[:3]}")

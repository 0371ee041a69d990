"""The Exit Predictor: a low-complexity network that runs on the device before the first early exit and
predicts, for every exit, whether the exit's confidence will pass its threshold; "hard" samples (no exit
predicted) skip the exit branches.

Dong, Mao & Zhang, "Resource-Constrained Edge AI with Early Exit Prediction" (arXiv:2206.07269, 2022).
As there, the predictor's training labels come from the early-exit network itself: label ``(i, m)`` is 1
when exit m's confidence on sample i passes exit m's threshold (:func:`exit_labels`), so no ground truth
is needed; it is trained as M binary classifiers (sigmoid outputs, binary cross-entropy, each output
weighted for its class balance, since "exits here" is rare at deep exits and common at shallow ones). The
prediction thresholds are chosen later, jointly with the exits' confidence thresholds
(:mod:`calibration.predictor_thresholds`).

Files (:func:`save_predictor`): ``predictor.pt`` (tensor state dict, loaded with ``weights_only=True``) and
``predictor.json`` (architecture, where it reads, which exits it scores, label thresholds, metrics).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from calibration.thresholds import passes

from .exits import json_default, pooled_classifier

PREDICTOR_SCHEMA = "eetool.exit-predictor/1"


class ExitPredictor(nn.Module):
    """Exit Predictor for an NCHW tensor (the model input or the first device segment's feature).

    Layers: [1x1 conv ``conv_channels`` + BN + ReLU] -> adaptive average pool to ``pool`` x ``pool`` ->
    flatten -> [linear ``hidden`` + ReLU] -> linear ``num_exits``.

    Args:
        in_channels: C of the input.
        num_exits: M, one output per early exit it scores (>= 1).
        pool: pooled spatial size (1 = global average).
        hidden: hidden FC width (0: none).
        conv_channels: channels of an optional first 1x1 conv (0: none).

    Input float32 ``(N, C, H, W)``; output float32 logits ``(N, M)``; ``sigmoid(logits)[:, m]`` is the
    predicted probability that exit m fires.
    """

    def __init__(self, in_channels: int, num_exits: int, pool: int = 2, hidden: int = 0, conv_channels: int = 0):
        super().__init__()
        if in_channels < 1 or num_exits < 1 or pool < 1 or hidden < 0 or conv_channels < 0:
            raise ValueError(f"bad ExitPredictor sizes: in_channels={in_channels}, num_exits={num_exits}, "
                             f"pool={pool}, hidden={hidden}, conv_channels={conv_channels}")
        layers: list[nn.Module] = []
        c = in_channels
        if conv_channels:
            layers += [nn.Conv2d(c, conv_channels, 1, bias=False), nn.BatchNorm2d(conv_channels), nn.ReLU(inplace=True)]
            c = conv_channels
        self.net = nn.Sequential(*layers, *pooled_classifier(c, pool, hidden, num_exits))
        self.config = {"in_channels": in_channels, "num_exits": num_exits, "pool": pool, "hidden": hidden,
                       "conv_channels": conv_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ExitPredictor expects an NCHW tensor, got shape {tuple(x.shape)}")
        return self.net(x)


def exit_labels(conf: np.ndarray, thresholds: Sequence[float | None], rule: str) -> np.ndarray:
    """Training labels: bool ``(N, M)``, ``[i, m]`` true when exit m's confidence on sample i passes its
    threshold (``conf``: float ``(M, N)`` confidences of the M early exits under ``rule``). An exit whose
    threshold is None (off) is labelled 0 everywhere. A sample with no true label is "hard".

    Raises ValueError when the number of thresholds differs from M."""
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != len(thresholds):
        raise ValueError(f"{len(thresholds)} thresholds for confidences of shape {conf.shape} (expected (M, N))")
    return np.stack([passes(conf[m], t, rule) for m, t in enumerate(thresholds)], axis=1)


def default_pool(h: int, w: int, largest: int = 7) -> int:
    """The largest pooled size <= ``largest`` that divides both ``h`` and ``w`` (adaptive pooling to a size
    that does not divide the input exports to neither ONNX nor TFLite as a pooling op)."""
    return next(p for p in range(min(largest, h, w), 0, -1) if h % p == 0 and w % p == 0)


def train_predictor(features: np.ndarray, labels: np.ndarray, epochs: int = 8, lr: float = 3e-3,
                    batch_size: int = 128, balanced: bool = True, seed: int = 0, progress: bool = False,
                    **arch) -> tuple[ExitPredictor, dict]:
    """Train an :class:`ExitPredictor` on ``features`` (float32 ``(N, C, H, W)``) and ``labels`` (bool
    ``(N, M)``, :func:`exit_labels`): Adam with a one-cycle learning rate, binary cross-entropy per exit,
    positives weighted by ``negatives / positives`` of that exit when ``balanced``.

    ``arch``: :class:`ExitPredictor` options (pool, hidden, conv_channels); ``pool`` None or absent:
    :func:`default_pool` of the feature's size. Returns ``(model in eval
    mode, {"epochs", "lr", "history", "pos_weight", "positives"})``. Raises ValueError for mismatched
    sizes or an exit with no positive or no negative label (nothing to learn: calibrate the exits first
    or use other label thresholds)."""
    from runtime.progress import progress as bar

    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    if x.dim() != 4 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(f"features {tuple(x.shape)} and labels {tuple(y.shape)}: need (N, C, H, W) and (N, M)")
    pos = y.sum(0)
    flat = [m for m in range(y.shape[1]) if pos[m] == 0 or pos[m] == len(y)]
    if flat:
        raise ValueError(f"exit(s) {flat}: every label is {'0' if pos[flat[0]] == 0 else '1'} at these thresholds; "
                         f"nothing to predict (calibrate the exits first, or give other label thresholds)")
    torch.manual_seed(seed)
    if arch.get("pool") is None:
        arch = {**arch, "pool": default_pool(int(x.shape[2]), int(x.shape[3]))}
    model = ExitPredictor(int(x.shape[1]), int(y.shape[1]), **arch)
    pos_weight = ((len(y) - pos) / pos) if balanced else torch.ones_like(pos)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for ep in range(epochs):
        model.train()
        idx = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in bar(range(0, len(x), batch_size), f"predictor epoch {ep + 1}/{epochs}", "batch", enabled=progress):
            j = idx[i:i + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(x[j]), y[j], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(j)
        history.append(total / len(x))
    model.eval()
    return model, {"epochs": epochs, "lr": lr, "batch_size": batch_size, "history": history,
                   "pos_weight": pos_weight.tolist(), "positives": (pos / len(y)).tolist(), "seed": seed}


@torch.no_grad()
def predict(model: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Predictor probabilities ``sigmoid(logits)``: float32 ``(M, N)`` (one row per exit) for ``features``
    float32 ``(N, C, H, W)``."""
    model.eval()
    x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    out = [torch.sigmoid(model(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().T.copy()


def metrics(scores: np.ndarray, labels: np.ndarray, gates: Sequence[float] | float = 0.5) -> dict:
    """How well the predictor predicts its labels at prediction thresholds ``gates`` (one per exit, or one
    for all).

    ``scores``: float ``(M, N)`` probabilities; ``labels``: bool ``(N, M)``. Returns per exit ``accuracy``
    and ``recall`` / ``precision`` of "fires", and for "hard" samples (no exit fires) ``hard_rate`` (share of
    samples that are hard), ``hard_recall`` (hard samples the predictor routes past every exit),
    ``hard_precision`` (routed samples that are hard) and ``easy_routed`` (non-hard samples wrongly routed
    past every exit)."""
    s = np.asarray(scores)
    y = np.asarray(labels, dtype=bool).T  # (M, N)
    g = np.broadcast_to(np.asarray(gates, dtype=np.float64), (s.shape[0],))
    pred = s >= g[:, None]
    out = {"exits": []}
    for m in range(s.shape[0]):
        tp = int((pred[m] & y[m]).sum())
        out["exits"].append({"accuracy": float((pred[m] == y[m]).mean()),
                             "recall": tp / max(1, int(y[m].sum())), "precision": tp / max(1, int(pred[m].sum())),
                             "fires": float(y[m].mean())})
    hard, routed = ~y.any(0), ~pred.any(0)
    out.update(hard_rate=float(hard.mean()), routed_rate=float(routed.mean()),
               hard_recall=float((hard & routed).sum() / max(1, hard.sum())),
               hard_precision=float((hard & routed).sum() / max(1, routed.sum())),
               easy_routed=float((~hard & routed).sum() / max(1, (~hard).sum())),
               accuracy=float((pred == y).all(0).mean()), gates=g.tolist())
    return out


def predictor_mflops(model: nn.Module, input_shape: Sequence[int]) -> float:
    """MFLOPs of one predictor evaluation for one sample of ``input_shape`` ((C, H, W) or (N, C, H, W)):
    the same count as the rest of the bundle (2 per multiply-add, convolutions and matmuls)."""
    from .exits import exit_flops

    return exit_flops(model, input_shape)


def save_predictor(path_dir, model: ExitPredictor, meta: dict) -> Path:
    """Write ``predictor.pt`` (state dict) and ``predictor.json`` (``{"schema", "architecture", **meta}``; meta
    holds ``input`` (tensor it reads), ``exits`` (names, in output order), ``rule``, ``label_thresholds``)."""
    d = Path(path_dir)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, d / "predictor.pt")
    (d / "predictor.json").write_text(json.dumps({"schema": PREDICTOR_SCHEMA, "architecture": model.config, **meta},
                                                 indent=2, default=json_default) + "\n")
    return d


def load_predictor(path_dir) -> tuple[ExitPredictor, dict]:
    """The predictor saved by :func:`save_predictor` (eval mode) and its metadata. Raises
    FileNotFoundError when a file is missing, ValueError for another schema."""
    d = Path(path_dir)
    meta = json.loads((d / "predictor.json").read_text())
    if meta.get("schema") != PREDICTOR_SCHEMA:
        raise ValueError(f"{d / 'predictor.json'}: schema {meta.get('schema')!r}, expected {PREDICTOR_SCHEMA!r}")
    model = ExitPredictor(**meta["architecture"])
    model.load_state_dict(torch.load(d / "predictor.pt", map_location="cpu", weights_only=True), strict=True)
    model.eval()
    return model, meta


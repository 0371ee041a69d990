"""Head network distillation (HND) of a bottleneck: train the encoder, the decoder and optionally the last
head layers so that the student's features at the target layer reproduce the frozen original model's.

Matsubara, Baidya, Callegaro, Levorato & Singh, "Distilled Split Deep Neural Networks for Edge-Assisted
Real-Time Systems" (HotEdgeVideo 2019), eq. 1: minimise || f_T(x) - g_T(x) ||^2 between the teacher's
and the student's output at the target layer T, over unlabelled inputs x. Following the generalised form
(GHND: Matsubara & Levorato, "Neural Compression and Filtering for Edge-assisted Real-time Object
Detection in Challenged Networks", ICPR 2020; sc2bench's ``ghnd-bq`` configs), the loss also matches an
earlier point, here the decoder's reconstruction of the split feature:

    L = || g_T(x) - f_T(x) ||^2 / Var(f_T) + w_rec * || rec(x) - f_S(x) ||^2 / Var(f_S)

(mean squared errors, each over the teacher's variance so the two terms are scale-free). The bottleneck is
quantised during training exactly as on the wire (``bits`` bits, straight-through rounding). With
``rate_weight`` > 0 the loss also prices the bytes the code will cost, rate-distortion style as in learned
feature compression (Singh et al., "End-to-end Learning of Compressible Features", ICIP 2020; Matsubara et
al.'s Entropic Student, WACV 2022):

    L += w_rate * H(codes)      (bits per value, :func:`toolkit.bottleneck.code_entropy_bits`)

so the encoder learns to concentrate its codes on few levels, which the wire's entropy coder turns into
fewer bytes.

Because the layers before the trainable part are frozen, their outputs never change: every augmented view
is pushed through the teacher once and its tensors are cached on disk (float16, ``--cache``), and all
epochs (and every operating point trained with the same cache) read them back. Validation measures the
top-1 agreement of the whole student (bottleneck quantised, original tail) with the original model on
held-out photos, and the validation loss picks the saved epoch.

Runs on CPU, seeded: the views, their order in every epoch and the initialisation follow from ``seed``,
so two runs with the same arguments give identical weights. Checkpoints (tensors only, ``weights_only``)
after every epoch make an interrupted run resumable.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from runtime.progress import is_terminal, progress

from .bottleneck import (BottleneckError, BottleneckModel, Built, code_entropy_bits, fake_quant,
                         histogram_entropy_bits, load_trainable, pca_init)

CHECKPOINT = "checkpoint.pt"
CACHE_VERSION = 1


@dataclass
class DistillConfig:
    """Training hyper-parameters. ``epochs`` over the cached views, ``batch`` views per step, Adam with
    ``lr`` reached after a linear warm-up over 5 % of the steps and decayed by a cosine to 0 (Loshchilov &
    Hutter, SGDR), ``rec_weight`` = w_rec above, ``match``
    later layers (after T; ``logits`` for the output) whose outputs also enter the loss, ``rate_weight`` =
    w_rate (per bit per value of code entropy; 0 = no rate term), ``kd_temperature`` T > 0 matches the
    logits by knowledge distillation's KL divergence at temperature T instead of their MSE (Hinton, Vinyals
    & Dean, "Distilling the Knowledge in a Neural Network", 2015: KL(softmax(t/T) || softmax(s/T)) x T^2),
    ``threads`` torch CPU threads, ``pca_samples`` views used for the PCA initialisation."""

    epochs: int = 10
    batch: int = 32
    lr: float = 1e-3
    rec_weight: float = 0.1
    match: tuple[str, ...] = ()
    seed: int = 0
    threads: int = 2
    pca_samples: int = 512
    rate_weight: float = 0.0
    kd_temperature: float = 0.0


# --------------------------------------------------------------------------------------------- progress
def _bar(iterable, desc: str, unit: str, total: int | None = None):
    """A tqdm bar on a terminal (runtime.progress); elsewhere nothing, because every stage here ends with
    its own summary line (:func:`say`): one line per stage in logs."""
    return progress(iterable, desc, unit, enabled=is_terminal(sys.stderr), total=total)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ cache
class FeatureCache:
    """Teacher tensors of every view, float16 ``.npy`` files in ``root``: ``inputs`` (what the trainable
    part reads), ``split`` (the teacher's split feature; absent when it equals ``inputs``), ``target`` (the
    teacher at T) and derived arrays added by :meth:`ensure` (the teacher at later layers, its logits)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.arrays = {k: np.load(self.root / f"{k}.npy", mmap_mode="r") for k in self.meta["arrays"]}

    def __len__(self) -> int:
        return int(self.meta["count"])

    def get(self, key: str, idx) -> torch.Tensor:
        key = "inputs" if key == "split" and "split" not in self.arrays else key
        return torch.from_numpy(np.ascontiguousarray(self.arrays[key][idx], dtype=np.float32))

    def variance(self, key: str) -> float:
        return float(self.meta["variance"][key if key in self.meta["variance"] else "inputs"])

    @torch.no_grad()
    def ensure(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], batch: int = 32) -> None:
        """Add array ``name`` = ``fn(target)`` for every view (the frozen teacher layers after T applied to
        the cached target), unless the cache has it already."""
        if name in self.arrays:
            return
        t0 = time.time()
        n, arr, stats = len(self), None, _Moments()
        for i in _bar(range(0, n, batch), f"teacher {name}", "batch"):
            v = fn(_cl(self.get("target", np.arange(i, min(n, i + batch))))).float().contiguous().numpy()
            if arr is None:
                arr = np.lib.format.open_memmap(self.root / f"{name}.npy", "w+", np.float16, (n, *v.shape[1:]))
            arr[i:i + len(v)] = v
            stats.add(v)
        arr.flush()
        self.meta["arrays"] = sorted({*self.meta["arrays"], name})
        self.meta["variance"][name] = stats.variance()
        (self.root / "meta.json").write_text(json.dumps(self.meta) + "\n")
        self.arrays[name] = np.load(self.root / f"{name}.npy", mmap_mode="r")
        say(f"teacher {name}: {n} views added to {self.root} ({time.time() - t0:.0f} s)")


class _Moments:
    def __init__(self):
        self.s, self.s2, self.n = 0.0, 0.0, 0

    def add(self, v: np.ndarray) -> None:
        v = v.astype(np.float64)
        self.s, self.s2, self.n = self.s + float(v.sum()), self.s2 + float((v ** 2).sum()), self.n + v.size

    def variance(self) -> float:
        return self.s2 / self.n - (self.s / self.n) ** 2


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({**parts, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def build_cache(root: Path, key: str, built: Built, views: Iterator[tuple[str, np.ndarray]], count: int,
                batch: int = 32, desc: str = "teacher features") -> FeatureCache:
    """Run the teacher on ``count`` views from ``views`` and write a :class:`FeatureCache` to ``root``
    (reused when ``root/meta.json`` holds the same ``key``)."""
    root = Path(root)
    meta_file = root / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("key") == key:
        return FeatureCache(root)
    root.mkdir(parents=True, exist_ok=True)
    meta_file.unlink(missing_ok=True)
    frozen, t_tuned, t_between = built.model.head[0], built.teacher["tuned"], built.teacher["between"]
    tuned = not isinstance(t_tuned, nn.Identity)
    arrays: dict[str, np.ndarray] = {}
    moments: dict[str, _Moments] = {}
    names: list[str] = []
    t0 = time.time()

    def flush(xs: list[np.ndarray]):
        x = torch.from_numpy(np.stack(xs)).contiguous(memory_format=torch.channels_last)
        out = {"inputs": frozen(x)}
        split = t_tuned(out["inputs"]) if tuned else out["inputs"]
        if tuned:
            out["split"] = split
        out["target"] = t_between(split)
        start = len(names) - len(xs)
        for k, v in out.items():
            v = v.float().contiguous().numpy()
            if k not in arrays:
                arrays[k] = np.lib.format.open_memmap(root / f"{k}.npy", "w+", np.float16, (count, *v.shape[1:]))
            arrays[k][start:start + len(v)] = v
            moments.setdefault(k, _Moments()).add(v)

    pending: list[np.ndarray] = []
    for name, x in _bar(views, desc, "view", total=count):
        names.append(name)
        pending.append(x)
        if len(pending) == batch:
            flush(pending)
            pending = []
        if len(names) == count:
            break
    if pending:
        flush(pending)
    if len(names) != count:
        raise BottleneckError(f"expected {count} views, got {len(names)}")
    for a in arrays.values():
        a.flush()
    meta_file.write_text(json.dumps({"key": key, "count": count, "arrays": sorted(arrays), "names": names,
                                     "variance": {k: m.variance() for k, m in moments.items()},
                                     "seconds": time.time() - t0}) + "\n")
    say(f"{desc}: {count} views cached in {root} ({time.time() - t0:.0f} s)")
    return FeatureCache(root)


# --------------------------------------------------------------------------------------------- training
class Objective:
    """The HND loss over cached teacher tensors. ``parts`` are the frozen layers after T cut at the matched
    points (:func:`toolkit.bottleneck.tail_parts`); ``match`` names the points whose outputs also enter
    the loss (module paths after T, or ``logits``), each with weight 1 like the target (GHND); with
    ``rate_weight`` the code's estimated entropy (bits per value) is added with that weight; with
    ``kd_temperature`` the logits enter as a KL divergence instead of an MSE (see :class:`DistillConfig`)."""

    def __init__(self, bm: BottleneckModel, parts: list[tuple[str, nn.Module]], match: tuple[str, ...],
                 bits: int, rec_weight: float, rate_weight: float = 0.0, kd_temperature: float = 0.0):
        self.bm, self.parts, self.match, self.bits, self.rec_weight = bm, parts, tuple(match), bits, rec_weight
        self.rate_weight, self.kd_temperature = float(rate_weight), float(kd_temperature)

    def outputs(self, inputs: torch.Tensor, logits: bool = False) -> dict[str, torch.Tensor]:
        """The student's tensors for cached ``inputs``: ``split`` (the decoder's reconstruction), ``target``
        (its output at T), every matched point and, with ``logits``, the logits; code quantised at ``bits``
        (``code``: the encoder's output before rounding, in [0, 1])."""
        bm = self.bm
        code = bm.encoder(bm.head[1](inputs))
        z = fake_quant(code, self.bits)
        out = {"code": code, "split": bm.decoder.reconstruct(z)}
        out["target"] = x = bm.decoder.trunk(out["split"])
        if self.match or logits:
            for name, module in self.parts:
                x = module(x)
                if name in self.match or (logits and name == "logits"):
                    out[name] = x
                if not logits and all(m in out for m in self.match):
                    break
        return out

    def weights(self) -> dict[str, float]:
        return {"split": self.rec_weight, "target": 1.0, **{m: 1.0 for m in self.match}}

    def loss(self, out: dict[str, torch.Tensor], cache: "FeatureCache", idx) -> torch.Tensor:
        total = 0.0
        for key, w in self.weights().items():
            if not w:
                continue
            teacher = _cl(cache.get(_array(key), idx))
            if key == "logits" and self.kd_temperature:
                t = self.kd_temperature
                total = total + w * t * t * F.kl_div(F.log_softmax(out[key] / t, 1), F.log_softmax(teacher / t, 1),
                                                     reduction="batchmean", log_target=True)
            else:
                total = total + w * F.mse_loss(out[key], teacher) / cache.variance(_array(key))
        if self.rate_weight:
            total = total + self.rate_weight * code_entropy_bits(out["code"], self.bits)
        return total


def _array(point: str) -> str:
    """Cache array name of a tensor the loss compares."""
    return point if point in ("split", "target", "logits") else f"match_{point}"


def _cl(t: torch.Tensor) -> torch.Tensor:
    # channels-last: PyTorch's CPU convolution backward is ~10x faster in NHWC for depthwise layers
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def prepare_cache(cache: "FeatureCache", parts: list[tuple[str, nn.Module]], points: tuple[str, ...]) -> None:
    """Add the teacher's outputs at ``points`` (matched layers, ``logits``) to ``cache``, computed from its
    cached target with the frozen ``parts``."""
    for point in points:
        chain = []
        for name, module in parts:
            chain.append(module)
            if name == point:
                break
        else:
            raise BottleneckError(f"no layer {point!r} after the target layer")
        cache.ensure(_array(point), nn.Sequential(*chain).eval())


@torch.no_grad()
def validate(obj: Objective, cache: FeatureCache, batch: int = 32) -> dict:
    """HND loss of the student (bottleneck quantised) over the cached views, the order-0 entropy of its
    codes (``code_entropy``: bits per value, pooled over every view) and, when the cache holds the teacher's logits,
    its top-1 ``agreement`` with the teacher (else None)."""
    total, agree, n = 0.0, 0, len(cache)
    has_logits = "logits" in cache.arrays
    levels = (1 << int(obj.bits)) - 1
    counts = np.zeros(levels + 1, dtype=np.int64)
    for i in range(0, n, batch):
        idx = np.arange(i, min(n, i + batch))
        out = obj.outputs(_cl(cache.get("inputs", idx)), logits=has_logits)
        total += float(obj.loss(out, cache, idx)) * len(idx)
        counts += np.bincount(torch.round(out["code"] * levels).to(torch.int64).reshape(-1).numpy(),
                              minlength=levels + 1)
        if has_logits:
            agree += int((out["logits"].argmax(1) == cache.get("logits", idx).argmax(1)).sum())
    return {"loss": total / n, "agreement": agree / n if has_logits else None,
            "code_entropy": histogram_entropy_bits(counts)}


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(built: Built, obj: Objective, train_cache: FeatureCache, val_cache: FeatureCache, cfg: DistillConfig,
          out: Path, run_key: str, warm_start: dict | None = None) -> dict:
    """PCA-initialise (or, with ``warm_start``, the description of the trained bottleneck whose weights
    ``built.model`` already holds, start from those) and then distil ``built.model``'s trainable parts on the cached views; checkpoint to
    ``out/checkpoint.pt`` after every epoch and resume from it when ``run_key`` matches. Returns
    ``{"history", "best_epoch", "init", "seconds"}``; the model holds the best epoch's weights (lowest
    validation loss; epoch 0 is the initialisation, so a warm start never ends worse than it began)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    bm = built.model.eval()  # BN statistics stay frozen (small batches, few images); weights train
    bm.to(memory_format=torch.channels_last)
    ckpt_file = Path(out) / CHECKPOINT
    params = [p for m in bm.trainable().values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_cache) / cfg.batch)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, total // 20)  # linear warm-up over the first 5 % of steps: Adam's first steps are full-size

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(s - warm, total - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    state = None
    if ckpt_file.is_file():
        state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        if state.get("key") != run_key:
            raise BottleneckError(f"{ckpt_file} belongs to a run with other arguments; delete it or pick another -o")
    if state is None:
        if warm_start is not None:
            init = dict(warm_start)
        else:
            n_pca = min(len(train_cache), cfg.pca_samples)
            idx = np.linspace(0, len(train_cache) - 1, n_pca).round().astype(int)
            with torch.no_grad():
                feats = torch.cat([bm.head[1](_cl(train_cache.get("inputs", idx[i:i + 64])))
                                   for i in range(0, n_pca, 64)])
            init = pca_init(bm.encoder, bm.decoder, feats)
        v = validate(obj, val_cache)
        history = {"epoch": [0], "train_loss": [None], "val_loss": [v["loss"]],
                   "val_agreement": [v["agreement"]], "val_code_entropy": [v["code_entropy"]], "seconds": [0.0],
                   "lr": [cfg.lr]}
        best = {"epoch": 0, "val_loss": v["loss"], "state": bm.trainable_state()}
        start_epoch, elapsed = 1, 0.0
        if warm_start is not None:
            say(f"warm start from {init['from']}: validation loss {v['loss']:.4f}, agreement {v['agreement']:.1%}, "
                f"code entropy {v['code_entropy']:.2f} bits/value")
        else:
            say(f"PCA init: {init['explained_variance']:.1%} of patch variance kept, relative MSE "
                f"{init['relative_mse']:.3f}; validation loss {v['loss']:.4f}, agreement {v['agreement']:.1%}")
    else:
        load_trainable(bm, state["state"], str(ckpt_file))
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        history, init, elapsed = state["history"], state["init"], state["seconds"]
        best = state["best"]
        start_epoch = int(state["epoch"]) + 1
        say(f"resuming {ckpt_file} after epoch {state['epoch']}")

    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_cache), generator=gen).numpy()
        total_loss = 0.0
        steps = _bar(range(steps_per_epoch), f"epoch {epoch}/{cfg.epochs}", "batch")
        for b in steps:
            idx = np.sort(order[b * cfg.batch:(b + 1) * cfg.batch])  # sorted: sequential reads from the memmap
            loss = obj.loss(obj.outputs(_cl(train_cache.get("inputs", idx))), train_cache, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            total_loss += value * len(idx)
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{value:.4f}")
        v = validate(obj, val_cache)
        secs = time.time() - t0
        elapsed += secs
        for k, val in (("epoch", epoch), ("train_loss", total_loss / len(train_cache)), ("val_loss", v["loss"]),
                       ("val_agreement", v["agreement"]), ("val_code_entropy", v["code_entropy"]), ("seconds", secs),
                       ("lr", sched.get_last_lr()[0])):
            history.setdefault(k, []).append(val)
        if v["loss"] < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": v["loss"], "state": bm.trainable_state()}
        tmp = ckpt_file.with_suffix(".tmp")
        torch.save({"key": run_key, "epoch": epoch, "state": bm.trainable_state(), "optim": opt.state_dict(),
                    "sched": sched.state_dict(), "history": history, "init": init, "best": best,
                    "seconds": elapsed}, tmp)
        tmp.replace(ckpt_file)
        say(f"epoch {epoch}/{cfg.epochs}: train loss {history['train_loss'][-1]:.4f}, validation loss "
            f"{v['loss']:.4f}, agreement {v['agreement']:.1%}, code entropy {v['code_entropy']:.2f} bits/value ({secs:.0f} s)")
    load_trainable(bm, best["state"])
    bm.to(memory_format=torch.contiguous_format)
    for p in params:
        p.requires_grad_(False)
    return {"history": history, "best_epoch": best["epoch"], "init": init, "seconds": elapsed}


def plot_curves(history: dict, path: Path, title: str) -> None:
    """Training and validation loss (log scale), validation top-1 agreement and, when recorded, the codes'
    entropy (bits per value) per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ep = history["epoch"]
    a.plot(ep[1:], history["train_loss"][1:], "o-", label="train")
    a.plot(ep, history["val_loss"], "s-", label="validation")
    a.set_yscale("log")
    a.set_xlabel("epoch (0 = initialisation: PCA or --init-from)")
    a.set_ylabel("HND loss (normalised MSE)")
    a.legend()
    b.plot(ep, [100 * v for v in history["val_agreement"]], "s-", color="C2")
    b.set_xlabel("epoch (0 = initialisation: PCA or --init-from)")
    b.set_ylabel("top-1 agreement with the original model (%)")
    if history.get("val_code_entropy"):
        c = b.twinx()
        c.plot(ep[-len(history["val_code_entropy"]):], history["val_code_entropy"], "^--", color="C3")
        c.set_ylabel("code entropy (bits per value)", color="C3")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DistillConfig", "FeatureCache", "Objective", "build_cache", "cache_key", "prepare_cache", "train",
           "validate", "plot_curves", "fingerprint", "say"]

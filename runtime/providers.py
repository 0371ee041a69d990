"""Which onnxruntime execution providers run the tail: CPU, or a GPU through onnxruntime-gpu's CUDA
execution provider (TensorRT's first where TensorRT is installed).

Nothing here imports a GPU package: the CPU path only reads ``onnxruntime.get_available_providers()``,
and the TensorRT check looks for the library without loading it. A device or provider that is asked for
but not usable is an error that says what to install, never a silent fall-back to the CPU.

Python 3.8 compatible; stdlib only (onnxruntime is imported by the caller).
"""
from __future__ import annotations

import ctypes.util
import importlib.util
from typing import Iterable, List, Optional, Sequence

__all__ = ["ProviderError", "DEVICES", "select_providers", "check_session_providers", "INSTALL_HINT"]

DEVICES = ("cpu", "cuda")
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"

INSTALL_HINT = (
    "install onnxruntime's GPU build in place of the CPU one: on an x86_64 server with CUDA 12 and cuDNN 9, "
    "`pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1` (both provide the onnxruntime module, "
    "so only one may be installed); on a Jetson, the onnxruntime-gpu wheel NVIDIA builds for your JetPack release "
    "(JetPack 6: CUDA 12; JetPack 5: Python 3.8, onnxruntime-gpu 1.16-1.18), not the PyPI one. "
    "Add TensorRT (pip install tensorrt, or JetPack's) to use TensorrtExecutionProvider")


class ProviderError(RuntimeError):
    """The asked device or execution provider cannot run here; the message says what to install."""


def tensorrt_installed() -> bool:
    """Whether TensorRT's runtime library can be found (Python package or libnvinfer), without loading it."""
    if importlib.util.find_spec("tensorrt") is not None:
        return True
    return ctypes.util.find_library("nvinfer") is not None


def select_providers(device: str = "cpu", provider: Optional[str] = None,
                     available: Optional[Sequence[str]] = None, tensorrt: Optional[bool] = None) -> List[str]:
    """The execution providers for a session, in onnxruntime's priority order.

    Args:
        device: ``cpu`` or ``cuda``.
        provider: an explicit provider name (e.g. ``CUDAExecutionProvider``); overrides ``device``.
        available: providers this onnxruntime build offers (default: ``onnxruntime.get_available_providers()``).
        tensorrt: whether TensorRT is installed (default: :func:`tensorrt_installed`, checked only for cuda).

    Returns:
        e.g. ``["CPUExecutionProvider"]``, ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` or
        ``["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]`` (CPU last, for
        the few operators a GPU provider does not cover).

    Raises:
        ProviderError: unknown device; the CUDA provider (or the named one) is not in this onnxruntime build.
    """
    if device not in DEVICES:
        raise ProviderError("device %r: expected one of %s" % (device, ", ".join(DEVICES)))
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    have = list(available)
    if provider:
        if provider not in have:
            hint = (" To get it, " + INSTALL_HINT) if provider in (CUDA, TENSORRT) else ""
            raise ProviderError("execution provider %r is not in this onnxruntime build (it has: %s).%s"
                                % (provider, ", ".join(have), hint))
        return [provider] + ([CPU] if provider != CPU and CPU in have else [])
    if device == "cpu":
        return [CPU]
    if CUDA not in have:
        raise ProviderError("--device cuda: this onnxruntime build has no CUDAExecutionProvider (it has: %s). To run "
                            "the tail on a GPU, %s" % (", ".join(have), INSTALL_HINT))
    use_trt = TENSORRT in have and (tensorrt_installed() if tensorrt is None else tensorrt)
    return ([TENSORRT] if use_trt else []) + [CUDA, CPU]


def check_session_providers(asked: Iterable[str], got: Iterable[str], graph: str) -> List[str]:
    """onnxruntime drops a GPU provider whose libraries fail to load and runs on the CPU; refuse that.

    Args:
        asked: providers the session was created with; got: ``session.get_providers()``.

    Returns:
        the providers asked for but dropped (TensorRT alone may be: CUDA then runs the graph).

    Raises:
        ProviderError: a GPU provider asked for is missing from the session.
    """
    got = list(got)
    lost = [p for p in asked if p in (CUDA, TENSORRT) and p not in got]
    if CUDA in lost or (lost and not any(p in got for p in (CUDA, TENSORRT))):
        raise ProviderError("%s: onnxruntime could not load %s (the session fell back to %s): the CUDA 12 / cuDNN 9 "
                            "libraries onnxruntime-gpu needs are missing or do not match the driver; check `nvidia-smi` "
                            "and %s" % (graph, ", ".join(lost), ", ".join(got), INSTALL_HINT))
    return lost

"""What ``python -m runtime serve`` runs (through :func:`runtime.session.make_server`): one tail session per batching worker, and the defaults this
machine gets (workers, threads per worker, largest batch, longest wait), each with the reason it was chosen.

Defaults, when not given on the command line:

- ``workers``: 2 on a CPU: while one worker's batch runs, the other gathers and hands out the next one, so
  the cores do not idle between batches; 1 on a GPU (one session keeps it busy with large batches);
- ``threads``: every usable core for each worker's session, with intra-op spinning off so the two
  sessions yield the cores to each other instead of spinning: a lone device's request runs on all the
  cores, as it would in a server without batching, and under load the two batches share them;
- ``max_batch``: measured at start-up on worker 0's session: the tail is timed at batch 1, 2, 4, ... and the
  smallest batch within 10 % of the best time per sample is taken (a larger batch only adds latency; on a
  small CPU whose caches hold one sample's activations, batch 1 can be the fastest per sample);
- ``max_wait_ms``: half of the measured batch-1 tail time, so that a batch gathering requests under load
  costs a request at most half a tail run. A lone device never waits (see runtime.batching);
- ``max_queue``: about 2 s of work at the measured rate, at least 16: beyond it a request is answered
  ``busy`` at once, which lets a device fall back to its exit well before its own timeout (5 s by default).

Python 3.8 compatible; numpy + stdlib (onnxruntime or a TFLite interpreter for the sessions).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .bundle import Bundle
from .chain import Chain

__all__ = ["ServePlan", "usable_cores", "build_workers", "probe_batches", "choose_max_batch", "tail_inputs",
           "probe_sample"]

log = logging.getLogger("eetool.server")

#: batch sizes tried at start-up (stopped early once a batch takes longer than PROBE_BUDGET_S)
PROBE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GPU_PROBE_BATCHES = PROBE_BATCHES + (128, 256)
PROBE_BUDGET_S = 0.5


def usable_cores() -> int:
    """Cores this process may run on: the scheduler affinity where the OS has one (containers, taskset),
    physical cores when psutil knows them (hyper-threads add little to convolution throughput)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
        total = psutil.cpu_count(logical=True) or logical
        # affinity-limited share of the physical cores
        return max(1, min(logical, int(round(physical * logical / float(total)))))
    except ImportError:
        return max(1, logical)


@dataclass
class ServePlan:
    """The serving configuration and why: ``reasons`` holds one line per default chosen by this module."""

    workers: int
    threads: Optional[int]
    max_batch: int
    max_wait_ms: float
    max_queue: int = 256
    device: str = "cpu"
    providers: List[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    looped: List[str] = field(default_factory=list)  # graphs with a fixed batch, run once per sample
    probe_ms: Dict[int, float] = field(default_factory=dict)  # batch -> ms per batch (worker 0, start-up)
    reasons: List[str] = field(default_factory=list)
    allow_spinning: Optional[bool] = None  # onnxruntime's worker spin-wait (None: its default, on)

    def to_json(self) -> dict:
        return {"workers": self.workers, "threads": self.threads, "max_batch": self.max_batch,
                "max_wait_ms": round(self.max_wait_ms, 3), "max_queue": self.max_queue, "device": self.device, "providers": self.providers,
                "looped": self.looped, "allow_spinning": self.allow_spinning, "probe_ms": {str(k): round(v, 3) for k, v in self.probe_ms.items()},
                "reasons": self.reasons}


def fixed_batch_graphs(chain: Chain) -> List[str]:
    """Names of the chain's segments whose graph has a fixed batch (a TFLite graph exported at batch 1):
    they accept any batch by running once per slice of their batch, not as one batch."""
    return [spec.name for spec, sess in chain.segments if getattr(sess, "batch", None) is not None]


def probe_batches(run: Callable[[Dict[str, np.ndarray]], object], sample: Dict[str, np.ndarray],
                  batches=PROBE_BATCHES, budget_s: float = PROBE_BUDGET_S, repeat: int = 3) -> Dict[int, float]:
    """Best-of-``repeat`` ms per batch of ``run`` at each batch size (``sample``: name -> (1, ...) array),
    after one warm-up run; stops before a batch size whose predicted run exceeds ``budget_s``."""
    out: Dict[int, float] = {}
    for b in batches:
        if out:
            last_b = max(out)
            if out[last_b] * b / last_b / 1e3 > budget_s:
                break
        feeds = {k: np.ascontiguousarray(np.repeat(v, b, axis=0)) for k, v in sample.items()}
        run(feeds)  # warm-up: allocations for this shape
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            run(feeds)
            best = min(best, (time.perf_counter() - t0) * 1e3)
        out[b] = best
    return out


def choose_max_batch(probe_ms: Dict[int, float], within: float = 1.10) -> int:
    """Smallest batch whose time per sample is within ``within`` x the best measured."""
    per = {b: ms / b for b, ms in probe_ms.items()}
    best = min(per.values())
    return min(b for b, v in per.items() if v <= best * within)


def build_workers(bundle: Bundle, side: str, fmt: str, precision: str, workers: Optional[int] = None,
                  threads: Optional[int] = None, max_batch: Optional[int] = None, max_wait_ms: Optional[float] = None,
                  max_queue: Optional[int] = None, allow_spinning: Optional[bool] = None, device: str = "cpu", provider: Optional[str] = None, sample: Optional[Dict[str, np.ndarray]] = None,
                  cores: Optional[int] = None, probe: bool = True) -> Tuple[List[Chain], ServePlan]:
    """One :class:`Chain` of ``side`` (``server`` or ``all``) per worker, and the plan they run under.

    Args:
        bundle, side, fmt, precision: which graphs.
        workers, threads, max_batch, max_wait_ms, max_queue: given values are kept; None = chosen here (module doc).
        allow_spinning: onnxruntime's worker spin-wait (``--spinning``); None: off with several workers (they
            share the cores), onnxruntime's default (on) with one.
        device, provider: see :func:`runtime.providers.select_providers`.
        sample: name -> (1, ...) float32 tail input used to time batch sizes at start-up (needed when
            ``max_batch`` or ``max_wait_ms`` is None and ``probe``).
        cores: usable cores (default :func:`usable_cores`).
        probe: time the tail at start-up; False keeps fixed fall-backs (max_batch 32, max_wait 2 ms, max_queue 256).

    Raises:
        ValueError: a value below 1 (0 for max_wait_ms).
        runtime.providers.ProviderError: the device / provider cannot run here.
        BundleError: the bundle lacks the graphs.
    """
    from .providers import select_providers

    for name, v in (("workers", workers), ("threads", threads), ("max_batch", max_batch), ("max_queue", max_queue)):
        if v is not None and v < 1:
            raise ValueError("--%s %d: must be at least 1" % (name.replace("_", "-"), v))
    if max_wait_ms is not None and max_wait_ms < 0:
        raise ValueError("--max-wait-ms %s: must be >= 0" % max_wait_ms)
    providers = select_providers(device, provider) if (device != "cpu" or provider) else ["CPUExecutionProvider"]
    gpu = providers[0] != "CPUExecutionProvider"
    cores = cores or usable_cores()
    reasons = []
    if workers is None:
        workers = 1 if gpu else 2
        reasons.append("workers %d: %s" % (workers, "one session keeps a GPU busy" if gpu else
                                             "one batch runs while the other worker gathers the next"))
    if threads is None and not gpu:
        threads = cores
        reasons.append("threads %d per worker: all %d usable cores (a lone request runs on every core; spinning is "
                       "off so %d sessions share them)" % (threads, cores, workers) if workers > 1 else
                       "threads %d: all %d usable cores" % (threads, cores))
    spin = allow_spinning if allow_spinning is not None else (False if workers > 1 else None)
    chains = [Chain(bundle, side, fmt, precision, threads, with_exits=False, allow_spinning=spin, providers=providers)
              for _ in range(workers)]
    plan = ServePlan(workers, threads, max_batch or 32, 2.0 if max_wait_ms is None else float(max_wait_ms),
                     max_queue or 0, "gpu" if gpu else "cpu", providers, fixed_batch_graphs(chains[0]), reasons=reasons,
                     allow_spinning=spin)
    if (max_batch is None or max_wait_ms is None or max_queue is None) and probe and sample is not None:
        plan.probe_ms = probe_batches(chains[0].run_segments, sample, GPU_PROBE_BATCHES if gpu else PROBE_BATCHES)
        table = ", ".join("%d: %.2f" % (b, ms / b) for b, ms in sorted(plan.probe_ms.items()))
        if max_batch is None:
            plan.max_batch = choose_max_batch(plan.probe_ms)
            reasons.append("max-batch %d: smallest batch within 10 %% of the best tail time per sample measured at "
                           "start-up (ms per sample by batch: %s)" % (plan.max_batch, table))
        if max_wait_ms is None:
            plan.max_wait_ms = round(min(20.0, max(0.2, plan.probe_ms[1] / 2)), 2)
            reasons.append("max-wait-ms %.2f: half the batch-1 tail time (%.2f ms); a lone device never waits"
                           % (plan.max_wait_ms, plan.probe_ms[1]))
        if max_queue is None:
            b = max(k for k in plan.probe_ms if k <= plan.max_batch)
            rate = workers * b / plan.probe_ms[b] * 1e3  # samples/s, as if workers did not share cores
            plan.max_queue = max(16, int(2.0 * rate))
            reasons.append("max-queue %d: about 2 s of work at %.0f samples/s; beyond it a request is answered busy at "
                           "once (a device's default timeout is 5 s)" % (plan.max_queue, rate))
    else:
        if max_batch is None or max_wait_ms is None:
            reasons.append("max-batch %d, max-wait-ms %.1f: fixed fall-backs (no start-up timing)"
                           % (plan.max_batch, plan.max_wait_ms))
        if max_queue is None:
            plan.max_queue = 256
    if plan.looped:
        reasons.append("graphs with a fixed batch run once per sample of a batch: %s (re-export them with a "
                       "dynamic batch to batch them)" % ", ".join(plan.looped))
    return chains, plan


def tail_inputs(bundle: Bundle, whole_model: bool, input_file: bool) -> Dict[str, Dict[str, object]]:
    """What a request carries: name -> {"shape", "dtype"} (None = any size): the wire tensors of the split,
    the model input (``whole_model``), or an encoded image file (``input_file``)."""
    from .protocol import FILE_TENSOR

    inp = bundle.manifest.input
    if input_file:
        return {FILE_TENSOR: {"shape": [None], "dtype": "uint8"}}
    if whole_model:
        return {inp.name: {"shape": list(inp.shape), "dtype": "float32"}}
    return {n: {"shape": list(bundle.tensor(n).shape), "dtype": "float32"} for n in bundle.wire_tensors}


def probe_sample(bundle: Bundle, whole_model: bool) -> Dict[str, np.ndarray]:
    """name -> (1, ...) float32 random tail input, for timing batch sizes (a CNN's time does not depend on values)."""
    rng = np.random.default_rng(0)
    if whole_model:
        inp = bundle.manifest.input
        shapes = {inp.name: inp.shape}
    else:
        shapes = {n: bundle.tensor(n).shape for n in bundle.wire_tensors}
    return {n: rng.standard_normal([1] + [int(d) for d in s[1:]]).astype(np.float32) for n, s in shapes.items()}

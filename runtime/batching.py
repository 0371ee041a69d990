"""Dynamic batching for the edge server: requests from every connection go into one bounded queue, and
each worker takes what is there (up to ``max_batch`` samples, waiting at most ``max_wait_ms`` for more)
and runs it through its own tail session as one batch.

A batch closes at the first of:

- ``max_batch`` samples collected (a request of more samples than that runs alone);
- ``max_wait_ms`` after its first request arrived (so a request that already waited in the queue
  waits no longer);
- nothing more can arrive: every open connection already has a request queued or running (devices send
  one request at a time, so waiting would only tax them). A lone device therefore never waits.
- the next queued request has other per-sample shapes (it starts the next batch; order is FIFO).

Every request gets exactly one outcome: its slice of the batch's outputs, or a :class:`BatchError`
(the tail raised or returned a bad batch: only that batch's requests fail; queue full: ``busy``;
stopping: ``shutting_down``). Workers never touch sockets, so a slow or vanished client costs only its
own reply.

Python 3.8 compatible; numpy + stdlib only.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["Batcher", "BatchError", "Pending"]

log = logging.getLogger("eetool.server")

#: one worker's tail: name -> (B, ...) array to name -> (B, ...) array
BatchFn = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


class BatchError(Exception):
    """A request that got no result. ``code``: ``busy`` (queue full), ``tail_failed`` (its batch failed),
    ``shutting_down`` (the server stopped first); ``message``: human-readable detail."""

    def __init__(self, code: str, message: str):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


class Pending(object):
    """One submitted request: ``inputs`` (name -> (n, ...) array) and, once done, its outputs or error.

    Timing fields (``time.perf_counter`` seconds): ``t_submit``, ``t_start`` (its batch started),
    ``t_done``; ``batch`` is the number of samples in its batch."""

    __slots__ = ("inputs", "n", "key", "t_submit", "t_start", "t_done", "batch", "_event", "_outputs", "_error")

    def __init__(self, inputs: Dict[str, np.ndarray]):
        self.inputs = inputs
        sizes = set(int(a.shape[0]) for a in inputs.values())
        if len(sizes) != 1:
            raise ValueError("inputs differ in batch size: %s" % sorted(sizes))
        self.n = sizes.pop()
        # requests batch together only when everything but the batch dimension agrees
        self.key = tuple(sorted((k, a.shape[1:], a.dtype.str) for k, a in inputs.items()))
        self.t_submit = time.perf_counter()
        self.t_start = self.t_done = 0.0
        self.batch = 0
        self._event = threading.Event()
        self._outputs = None  # type: Optional[Dict[str, np.ndarray]]
        self._error = None  # type: Optional[BatchError]

    def _finish(self, outputs: Optional[Dict[str, np.ndarray]], error: Optional[BatchError]) -> None:
        self._outputs, self._error = outputs, error
        self.t_done = time.perf_counter()
        self._event.set()

    @property
    def queue_ms(self) -> float:
        """Time from submit to its batch's start (ms)."""
        return max(0.0, (self.t_start - self.t_submit) * 1e3) if self.t_start else 0.0

    @property
    def run_ms(self) -> float:
        """Time its batch spent in the tail (ms)."""
        return max(0.0, (self.t_done - self.t_start) * 1e3) if self.t_start else 0.0

    def wait(self, timeout: Optional[float] = None) -> Dict[str, np.ndarray]:
        """Block until done; return name -> (n, ...) array (this request's rows of every batched output).

        Raises:
            BatchError: the request failed (see the class doc), or ``timeout`` seconds passed
                (code ``timeout``).
        """
        if not self._event.wait(timeout):
            raise BatchError("timeout", "no result within %.1f s" % (timeout or 0))
        if self._error is not None:
            raise self._error
        return self._outputs  # type: ignore[return-value]


class Batcher(object):
    """A bounded request queue and ``len(runners)`` worker threads, one per tail session.

    Args:
        runners: one batch function per worker (its own session; name -> (B, ...) float32 array in and out).
        max_batch: most samples in one batch (>= 1).
        max_wait_ms: longest a batch waits for more requests after its first arrived (ms, >= 0).
        max_queue: most requests waiting; beyond it :meth:`submit` raises ``BatchError("busy")`` at once.
        sources: number of connections that could send a request (the server's open connections); with
            it a batch closes as soon as every source has a request queued or running. None: wait the
            full ``max_wait_ms``.
        name: thread name prefix.

    Raises:
        ValueError: no runners or a bad limit.
    """

    def __init__(self, runners: Sequence[BatchFn], max_batch: int = 32, max_wait_ms: float = 2.0, max_queue: int = 256,
                 sources: Optional[Callable[[], int]] = None, name: str = "eetool-batch"):
        if not runners:
            raise ValueError("need at least one runner (worker)")
        if int(max_batch) < 1 or float(max_wait_ms) < 0 or int(max_queue) < 1:
            raise ValueError("max_batch >= 1, max_wait_ms >= 0 and max_queue >= 1 required, got %r, %r, %r"
                             % (max_batch, max_wait_ms, max_queue))
        self.runners = list(runners)
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.max_queue = int(max_queue)
        self._sources = sources
        self._queue = collections.deque()  # type: Deque[Pending]
        self._cond = threading.Condition()
        self._collect = threading.Lock()  # one worker gathers a batch at a time; the others wait their turn
        self._outstanding = 0  # submitted and not finished (queued + running)
        self._stop = False
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True, name="%s-%d" % (name, i))
                         for i in range(len(self.runners))]
        self.stats = {"batches": 0, "samples": 0, "requests": 0, "failed_batches": 0, "busy": 0}
        self.batch_sizes = collections.Counter()  # type: collections.Counter
        for t in self._threads:
            t.start()

    @property
    def outstanding(self) -> int:
        """Requests queued or running."""
        with self._cond:
            return self._outstanding

    def submit(self, inputs: Dict[str, np.ndarray]) -> Pending:
        """Queue one request (name -> (n, ...) array, n >= 1) and return its :class:`Pending`.

        Raises:
            BatchError: ``busy`` when ``max_queue`` requests are already waiting, ``shutting_down``
                after :meth:`close`.
            ValueError: inputs of different batch sizes.
        """
        item = Pending(inputs)
        with self._cond:
            if self._stop:
                raise BatchError("shutting_down", "the server is stopping")
            if len(self._queue) >= self.max_queue:
                self.stats["busy"] += 1
                raise BatchError("busy", "server busy: %d requests queued (max %d)" % (len(self._queue), self.max_queue))
            self._queue.append(item)
            self._outstanding += 1
            self._cond.notify_all()
        return item

    # ------------------------------------------------------------------ workers
    def _may_grow(self) -> bool:
        """Whether a request may still arrive for the batch being gathered (call under ``_cond``)."""
        if self._sources is None:
            return True
        return self._sources() > self._outstanding

    def _gather(self) -> List[Pending]:
        """The next batch (empty when stopping)."""
        with self._collect, self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return []
            first = self._queue.popleft()
            batch, n = [first], first.n
            deadline = first.t_submit + self.max_wait_s
            while n < self.max_batch:
                if self._queue:
                    nxt = self._queue[0]
                    if nxt.key != first.key or n + nxt.n > self.max_batch:
                        break
                    batch.append(self._queue.popleft())
                    n += nxt.n
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stop or not self._may_grow():
                    break
                self._cond.wait(remaining)
            return batch

    def _work(self, index: int) -> None:
        run = self.runners[index]
        while True:
            batch = self._gather()
            if not batch:
                return
            try:
                self._run(run, batch)
            except BaseException as exc:  # never leave a request without an outcome
                for item in batch:
                    if not item._event.is_set():
                        item._finish(None, BatchError("internal", "%s: %s" % (type(exc).__name__, exc)))
                log.exception("batch worker %d: unexpected error", index)
            finally:
                with self._cond:
                    self._outstanding -= len(batch)
                    self._cond.notify_all()

    def _run(self, run: BatchFn, batch: List[Pending]) -> None:
        total = sum(item.n for item in batch)
        t0 = time.perf_counter()
        for item in batch:
            item.t_start, item.batch = t0, total
        if len(batch) == 1:
            feeds = batch[0].inputs
        else:
            feeds = {k: np.concatenate([item.inputs[k] for item in batch], axis=0) for k in batch[0].inputs}
        try:
            outputs = run(feeds)
            if not isinstance(outputs, dict) or not outputs:
                raise TypeError("tail must return a non-empty dict of arrays, got %s" % type(outputs).__name__)
            outputs = {k: np.asarray(v) for k, v in outputs.items()}
            bad = ["%s %s" % (k, v.shape) for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != total]
            if bad:
                raise ValueError("outputs %s do not have the batch's %d rows first" % (", ".join(bad), total))
        except Exception as exc:
            log.exception("tail raised on a batch of %d requests (%d samples)", len(batch), total)
            err = BatchError("tail_failed", "tail raised %s: %s (batch of %d requests)"
                             % (type(exc).__name__, exc, len(batch)))
            with self._cond:
                self.stats["failed_batches"] += 1
            for item in batch:
                item._finish(None, err)
            return
        with self._cond:
            self.stats["batches"] += 1
            self.stats["samples"] += total
            self.stats["requests"] += len(batch)
            self.batch_sizes[total] += 1
        start = 0
        for item in batch:
            item._finish({k: v[start:start + item.n] for k, v in outputs.items()}, None)
            start += item.n

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking requests, fail every queued one with ``shutting_down``, let running batches finish
        (up to ``timeout_s``) and join the workers."""
        with self._cond:
            self._stop = True
            left = list(self._queue)
            self._queue.clear()
            self._outstanding -= len(left)
            self._cond.notify_all()
        for item in left:
            item._finish(None, BatchError("shutting_down", "the server is stopping"))
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def describe(self) -> Dict[str, Any]:
        """Counters and the batch-size histogram (samples per batch -> batches)."""
        with self._cond:
            return dict(self.stats, outstanding=self._outstanding, batch_sizes=dict(sorted(self.batch_sizes.items())))


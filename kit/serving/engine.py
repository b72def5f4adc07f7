"""The inference thread of an ASGI worker: a queue of forward passes, batched.

The event loop never runs a forward pass. A handler calls :meth:`InferenceEngine.submit`, which queues
the request's numpy arrays and returns an asyncio future; the engine's thread takes the oldest request and
every queued request that can share its forward pass -- same model version (the same ``forward``
callable) and the same shape past the batch dimension and dtype for every input, so requests whose
dynamic dims (e.g. ``seq``) differ are never concatenated -- up to ``max_batch`` rows, runs them as one
forward pass, splits the outputs by rows and resolves the futures on their loop, one wake-up per batch.
Requests that arrive while a forward pass runs are therefore batched: concurrency turns into batch
size. A lone request runs at once (``max_wait_ms = 0``, the default); ``max_wait_ms > 0`` makes the
thread wait that long for more rows first (throughput over latency).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

Forward = Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]
Result = tuple[tuple[np.ndarray, ...], int]  # (a request's outputs, rows in the forward pass it joined)
_Resolved = tuple[asyncio.Future[Result], Result | None, BaseException | None]  # (future, result, or error)


class _Job:
    __slots__ = ("forward", "inputs", "rows", "limit", "key", "future", "loop")

    def __init__(self, forward: Forward, inputs: tuple[np.ndarray, ...], limit: int, future: asyncio.Future[Result],
                 loop: asyncio.AbstractEventLoop):
        self.forward = forward
        self.limit = limit
        self.inputs = inputs
        self.rows = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
        # what must match to share a forward pass: the version and everything but the batch dim
        self.key = (id(forward), tuple((a.shape[1:], a.dtype) for a in inputs))
        self.future = future
        self.loop = loop


def _resolve(results: list[_Resolved]) -> None:
    """On the event loop: hand each waiting handler its outputs (or the forward pass's error)."""
    for fut, value, error in results:
        if fut.done():  # the handler was cancelled (client gone, shutdown)
            continue
        if error is not None:
            fut.set_exception(error)
        elif value is not None:  # always, without an error
            fut.set_result(value)


class InferenceEngine:
    """One worker's forward passes, run on one inference thread fed by a queue."""

    def __init__(self, *, max_batch: int = 64, max_wait_ms: float = 0.0, torch_threads: int = 0,
                 name: str = "kit-infer"):
        self.max_batch = max(1, int(max_batch))
        self.torch_threads = torch_threads
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._cv = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-0", daemon=True)
        self._thread.start()

    def submit(self, forward: Forward, inputs: tuple[np.ndarray, ...], max_rows: int | None = None
               ) -> asyncio.Future[Result]:
        """Queue one request's inputs; the future resolves to (outputs, rows in its forward pass).

        Call it on the event loop. ``forward`` takes and returns a tuple of batched numpy arrays; ``max_rows``
        caps the rows of any forward pass this request joins (the version's own batch limit).
        """
        loop = asyncio.get_running_loop()
        limit = min(self.max_batch, max_rows or self.max_batch)
        job = _Job(forward, inputs, limit, loop.create_future(), loop)
        with self._cv:
            if self._stopping:
                raise RuntimeError("the inference engine is stopped")
            self._pending.append(job)
            self._cv.notify()
        return job.future

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- the inference thread
    def _run(self) -> None:
        if self.torch_threads:
            # OpenMP's thread count is per thread: a new thread would use a team of one thread per core
            # whatever the worker set, and on a shared machine that team's spinning costs ~50 ms a call.
            import torch

            torch.set_num_threads(self.torch_threads)
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._pending:
                if self._stopping:
                    return None
                self._cv.wait()
            if self.max_wait and self._rows() < self.max_batch:
                deadline = time.monotonic() + self.max_wait
                while self._rows() < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._cv.wait(left)
            first = self._pending.popleft()
            batch, rows, limit = [first], first.rows, first.limit
            if limit > 1 and self._pending:
                rest: deque[_Job] = deque()
                while self._pending:
                    job = self._pending.popleft()
                    if job.key == first.key and rows + job.rows <= min(limit, job.limit):
                        batch.append(job)
                        rows += job.rows
                        limit = min(limit, job.limit)
                    else:
                        rest.append(job)
                self._pending = rest
            return batch

    def _rows(self) -> int:
        return sum(j.rows for j in self._pending)

    def _execute(self, batch: list[_Job]) -> None:
        rows = sum(j.rows for j in batch)
        results: list[_Resolved]
        try:
            if len(batch) == 1:
                outs = batch[0].forward(batch[0].inputs)
                results = [(batch[0].future, (outs, rows), None)]
            else:
                n = len(batch[0].inputs)
                joined = tuple(np.concatenate([j.inputs[i] for j in batch]) for i in range(n))
                outs = batch[0].forward(joined)
                cuts = list(itertools.accumulate(j.rows for j in batch[:-1]))
                parts = [np.split(o, cuts) for o in outs]
                results = [(j.future, (tuple(p[k] for p in parts), rows), None) for k, j in enumerate(batch)]
        except Exception as exc:  # every request in the batch gets the failure (a 500 with its id)
            results = [(j.future, None, exc) for j in batch]
        loops: dict[int, tuple[asyncio.AbstractEventLoop, list[_Resolved]]] = {}
        for job, res in zip(batch, results):
            loops.setdefault(id(job.loop), (job.loop, []))[1].append(res)
        for loop, items in loops.values():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # that loop is closed (worker shutting down): nobody is waiting
                log.debug("dropped %d results for a closed event loop", len(items))

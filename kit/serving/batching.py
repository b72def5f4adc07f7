"""Dynamic batching inside one worker, with no extra thread and no added latency when idle.

Requests that arrive while a forward pass runs queue up; when it finishes, the first waiting request
thread becomes the leader and runs everything queued (up to ``max_batch`` rows) as one forward pass.
A lone request runs at once in its own thread (``max_wait_ms = 0``, the default), so batching costs
nothing at concurrency 1 and amortises the forward pass under load. ``max_wait_ms > 0`` makes the
leader wait that long for more rows first (throughput over latency).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

Forward = Callable[[tuple[Any, ...]], tuple[Any, ...]]


class _Item:
    __slots__ = ("inputs", "rows", "outputs", "error", "done", "batch")

    def __init__(self, inputs: tuple[Any, ...]):
        self.inputs = inputs
        self.rows = int(inputs[0].shape[0])
        self.outputs: tuple[Any, ...] | None = None
        self.error: BaseException | None = None
        self.done = False
        self.batch = 0


class Batcher:
    """Call ``forward`` on concatenated inputs of concurrent callers; split the outputs back.

    ``forward`` takes a tuple of batched tensors and returns a tuple of batched tensors.
    """

    def __init__(self, forward: Forward, *, max_batch: int = 64, max_wait_ms: float = 0.0):
        self.forward = forward
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._cv = threading.Condition()
        self._pending: list[_Item] = []
        self._busy = False

    def __call__(self, inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], int]:
        """Run ``inputs`` (possibly batched with others); returns (outputs, rows in the forward pass)."""
        item = _Item(inputs)
        with self._cv:
            self._pending.append(item)
            while not item.done and self._busy:
                self._cv.wait()
            if not item.done:
                self._busy = True
        if not item.done:
            try:
                while not item.done:
                    self._run_one_batch()
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        if item.error is not None:
            raise item.error
        assert item.outputs is not None
        return item.outputs, item.batch

    def _take(self) -> list[_Item]:
        with self._cv:
            if self.max_wait and self._rows() < self.max_batch:
                deadline = time.monotonic() + self.max_wait
                while self._rows() < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._cv.wait(left)
            first = self._pending[0]
            shapes = [t.shape[1:] for t in first.inputs]
            batch: list[_Item] = []
            rest: list[_Item] = []
            rows = 0
            for it in self._pending:
                same = [t.shape[1:] for t in it.inputs] == shapes
                if same and (not batch or rows + it.rows <= self.max_batch):
                    batch.append(it)
                    rows += it.rows
                else:
                    rest.append(it)
            self._pending = rest
            return batch

    def _rows(self) -> int:
        return sum(it.rows for it in self._pending)

    def _run_one_batch(self) -> None:
        batch = self._take()
        rows = sum(it.rows for it in batch)
        try:
            if len(batch) == 1:
                outs = self.forward(batch[0].inputs)
                results: Sequence[tuple[Any, ...]] = [outs]
            else:
                import torch

                joined = tuple(torch.cat([it.inputs[i] for it in batch]) for i in range(len(batch[0].inputs)))
                outs = self.forward(joined)
                sizes = [it.rows for it in batch]
                parts = [torch.split(o, sizes) for o in outs]
                results = [tuple(p[j] for p in parts) for j in range(len(batch))]
            for it, res in zip(batch, results):
                it.outputs, it.batch = res, rows
        except BaseException as exc:  # every caller in the batch sees the failure
            for it in batch:
                it.error = exc
        with self._cv:
            for it in batch:
                it.done = True
            self._cv.notify_all()

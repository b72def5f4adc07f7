"""What happens after an inference request, beside the log line and the metrics: the canary guard
(:mod:`kit.serving.guard`) and traffic capture (:mod:`kit.serving.recorder`).

:func:`kit.serving.handlers.log_request` (the one place a request is recorded) calls
:meth:`RequestHooks.finished` once per finished inference request; it costs a few dictionary operations (the guard's counters, the capture's sample draw
and a queue put) and never does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kit._types import JSONObject
from kit.serving.guard import CanaryGuard, make_guard
from kit.serving.recorder import Recorder, make_recorder

if TYPE_CHECKING:
    import numpy as np

    from kit.registry import Registry
    from kit.serving.config import ServiceConfig
    from kit.serving.metrics import Metrics
    from kit.serving.slots import ModelSlots
    from kit.signature import Signature


@dataclass
class RequestHooks:
    guard: CanaryGuard | None = None
    recorder: Recorder | None = None

    def finished(self, rid: str, version: int | None, status: int, seconds: float, signature: Signature | None = None,
                 inputs: Sequence[np.ndarray] | None = None, outputs: Sequence[np.ndarray] | None = None) -> None:
        if self.guard is not None:
            self.guard.observe(version, status, seconds)
        if self.recorder is not None:
            self.recorder.record(rid, version, status, seconds, signature, inputs, outputs)

    def guard_status(self) -> JSONObject:
        """``/readyz``'s ``canary_guard``: the window and the last decision, or ``{"enabled": false}``."""
        return self.guard.status() if self.guard is not None else {"enabled": False}

    def close(self) -> None:
        if self.guard is not None:
            self.guard.stop()
        if self.recorder is not None:
            self.recorder.close()


def make_hooks(config: ServiceConfig, registry: Registry, slots: ModelSlots, metrics: Metrics, *,
               start: bool = True) -> RequestHooks:
    """The hooks of one worker from its :class:`kit.serving.config.ServiceConfig`."""
    return RequestHooks(
        guard=make_guard(getattr(config, "canary_guard", None), registry, config.model, slots, metrics, start=start,
                         service_dir=config.service_dir),  # the service's guard key (kit.guard_key)
        recorder=make_recorder(getattr(config, "capture", None), config.model, config.service_dir),
    )


__all__ = ["RequestHooks", "make_hooks"]

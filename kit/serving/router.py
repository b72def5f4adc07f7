"""Choosing the version that serves a request: override header, sticky user hash, weighted random."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from kit.errors import ServingError
from kit.serving.protocol import RequestError

if TYPE_CHECKING:
    from kit.serving.slots import ServingState, Slot


class RouteError(ServingError):
    """The request names a model, version or endpoint this service does not serve (a 404)."""


def user_bucket(model: str, user: str) -> float:
    """A stable number in [0, 1) for (model, user): the same user always lands in the same bucket.

    Buckets are uniform, and a user below weight w is also below any larger weight, so raising a
    canary's weight only adds users to it.
    """
    h = hashlib.blake2b(f"{model}\0{user}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def choose(state: ServingState, *, model: str, override: str | None = None, user: str | None = None,
           rand: Callable[[], float] = random.random) -> tuple[Slot, str]:
    """Return ``(slot, reason)``; reason is one of override, production, sticky, random.

    ``state`` has ``production`` and ``canary`` slots (each with ``.version``) and ``weight``.
    """
    prod, canary, weight = state.production, state.canary, state.weight
    if prod is None:  # the handlers answer 503 before routing a state that is not ready
        raise RouteError(f"Model {model!r} has no production version loaded: nothing to route to.")
    if override:
        want = override.strip().lower()
        served = ", ".join(f"{n} {s.version}" for n, s in (("production", prod), ("canary", canary)) if s)
        if want == "production":
            return prod, "override"
        if want == "canary":
            if canary is None:
                raise RouteError(f"No canary is running for {model!r} (serving {served or 'nothing'}).")
            return canary, "override"
        if want.isascii() and want.isdigit() and len(want) <= 9:  # "²".isdigit() is True; int() refuses it
            for s in (prod, canary):
                if s is not None and s.version == int(want):
                    return s, "override"
            raise RouteError(f"Version {want} of {model!r} is not served here (serving {served or 'nothing'}). "
                             "Ask for 'production', 'canary' or one of those versions.")
        raise RequestError(f"Version override {override[:40]!r} is not 'production', 'canary' or a version "
                           "number.")
    if canary is None or weight <= 0.0:
        return prod, "production"
    if user:
        return (canary, "sticky") if user_bucket(model, user) < weight else (prod, "sticky")
    return (canary, "random") if rand() < weight else (prod, "random")

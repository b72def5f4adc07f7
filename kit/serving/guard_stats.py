"""The canary guard's judgement, without threads or files: ``[canary_guard]`` settings, the latency
histogram's buckets, one side's window (:class:`SideStats`), summing workers' windows (:func:`merge`) and
the decision (:func:`decide`). :mod:`kit.serving.guard` runs it in every worker."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kit import service_settings as settings
from kit._types import JSONObject
from kit.errors import ServiceError

SIDES = ("production", "canary")


def _d(key: str) -> Any:
    return settings.default("canary_guard", key)

_RATIO = 1.2  # latency histogram buckets grow by 20%: a p95 is known to within 20%
_BASE = 1e-4  # seconds: bucket 0 holds everything up to 0.1 ms
_TOP = 80  # buckets: the last one holds everything above ~200 s


@dataclass(frozen=True)
class GuardSettings:
    """``[canary_guard]`` in service.toml."""

    enabled: bool = False  # off when the section is absent (services generated before the guard)
    min_requests: int = _d("min_requests")  # per side, inside the window, before anything is decided
    window_s: float = _d("window_s")  # seconds of traffic compared
    max_error_rate_increase: float = _d("max_error_rate_increase")  # canary 5xx rate minus production's
    max_p95_ratio: float = _d("max_p95_ratio")  # canary p95 over production p95
    min_p95_delta_ms: float = _d("min_p95_delta_ms")  # ... and at least this much slower (tiny p95s jitter)
    interval_s: float = _d("interval_s")  # how often a worker shares its counts and judges
    steps: tuple[float, ...] = _d("steps")  # progressive promotion: canary weights in percent, e.g. (5, 25, 50, 100)
    hold_s: float = _d("hold_s")  # seconds a step must stay healthy (with min_requests a side) before the next


def parse_guard_settings(table: Mapping[str, Any], where: str) -> GuardSettings:
    """Check a ``[canary_guard]`` table (``where`` names the file in errors): the declared types and ranges
    (:mod:`kit.service_settings`), then the steps."""
    values = settings.check_section("canary_guard", table, where)
    if "steps" in values:
        steps = values["steps"]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 100 for x in steps) \
                or list(steps) != sorted(set(steps)):
            raise ServiceError(f"{where}: [canary_guard] steps = {steps!r} must be increasing percentages in "
                               "(0, 100], e.g. [5, 25, 50, 100] (100 promotes the canary).")
    return GuardSettings(**values)


def bucket_of(seconds: float) -> int:
    """The latency histogram bucket of a duration (log-spaced by ``_RATIO``)."""
    if seconds <= _BASE:
        return 0
    return min(_TOP, 1 + int(math.log(seconds / _BASE, _RATIO)))


def bucket_upper(index: int) -> float:
    """The upper bound of a bucket, in seconds (what a percentile reports)."""
    return float(_BASE * _RATIO ** index)


@dataclass(frozen=True)
class SideStats:
    """One side's window, summed over every worker."""

    requests: int = 0
    errors: int = 0
    hist: tuple[tuple[int, int], ...] = ()  # (bucket, count), sorted

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p95(self) -> float | None:
        """The 95th percentile latency in seconds (a bucket's upper bound), None without requests."""
        total = sum(c for _, c in self.hist)
        if not total:
            return None
        need, seen = math.ceil(0.95 * total), 0
        for b, c in self.hist:
            seen += c
            if seen >= need:
                return bucket_upper(b)
        return bucket_upper(self.hist[-1][0])

    def describe(self) -> JSONObject:
        p95 = self.p95()
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p95_ms": round(p95 * 1000, 3) if p95 is not None else None}


@dataclass(frozen=True)
class Verdict:
    """Why a canary is to be ended: ``reason`` is "errors" or "latency"; ``evidence`` goes into the audit."""

    reason: str
    detail: str
    evidence: JSONObject


def decide(prod: SideStats, canary: SideStats, s: GuardSettings) -> Verdict | None:
    """End the canary? Only with ``min_requests`` on both sides; errors are judged before latency."""
    if prod.requests < s.min_requests or canary.requests < s.min_requests:
        return None
    evidence = {"production": prod.describe(), "canary": canary.describe(), "window_s": s.window_s,
                "thresholds": {"max_error_rate_increase": s.max_error_rate_increase,
                               "max_p95_ratio": s.max_p95_ratio, "min_p95_delta_ms": s.min_p95_delta_ms,
                               "min_requests": s.min_requests}}
    if canary.error_rate - prod.error_rate > s.max_error_rate_increase:
        return Verdict("errors", f"canary 5xx rate {canary.error_rate:.1%} against production's "
                       f"{prod.error_rate:.1%} (over +{s.max_error_rate_increase:.0%})", evidence)
    pp, cp = prod.p95(), canary.p95()
    if pp is not None and cp is not None and cp > pp * s.max_p95_ratio and (cp - pp) * 1000 > s.min_p95_delta_ms:
        return Verdict("latency", f"canary p95 {cp * 1000:.1f} ms against production's {pp * 1000:.1f} ms "
                       f"(over {s.max_p95_ratio:g}x and +{s.min_p95_delta_ms:g} ms)", evidence)
    return None


def merge(windows: list[Mapping[str, Any]], since: float) -> dict[str, SideStats]:
    """Sum the slots ``(sec, n, err, ((bucket, count), ...))`` per side of workers' windows (this worker's and
    the verified files') that lie at or after ``since`` (unix seconds)."""
    n = {s: 0 for s in SIDES}
    err = {s: 0 for s in SIDES}
    hist: dict[str, dict[int, int]] = {s: {} for s in SIDES}
    for win in windows:
        for side in SIDES:
            for sec, count, errors, buckets in win.get(side, ()):
                if sec < since:
                    continue
                n[side] += count
                err[side] += errors
                for b, c in buckets:
                    hist[side][b] = hist[side].get(b, 0) + c
    return {s: SideStats(n[s], err[s], tuple(sorted(hist[s].items()))) for s in SIDES}

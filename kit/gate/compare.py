"""Checks that judge a candidate against the model's production version: same machine, same run.

A gate on a shared machine cannot judge latency in milliseconds: the same model passes or fails with the
load. So the default gate compares. The runner resolves production (a different version, verified, with
the backend's artifact) and the notebook loads it beside the candidate through the same verified path;
these checks then hold the candidate to production:

- **signature**: the same inputs and outputs (names, dtypes, dims), else clients break;
- **output agreement**: on inputs made from the candidate's example (or the user's ``data``), argmax
  agreement for classification-shaped outputs (a float output whose last dim has more than one class),
  equality for integer and bool outputs, else the largest deviation relative to production's scale;
- **latency**: candidate and production called alternately in rounds (A B, then B A), so load hits both
  alike; the candidate's fastest call may take at most ``max_ratio`` times production's fastest, or (so
  that sub-millisecond models are not failed by noise) at most that plus ``slack_ms``; load only adds
  time, so the fastest of many calls is each side's own cost. The median of the per-round ratios is the
  second estimate: a breach counts only when both see it. On a breach up to 3 more sets of rounds join
  the sample (within the check's budget) and the verdict is on them all;
- **quality** (with ``data``): accuracy, or the user's metric, no worse than production's by ``margin``;
- **memory**: the size of the served artifact (``model.pt2`` or ``model.onnx``: weights and graph) as a
  ratio of production's.

The pure functions (:func:`interleave`, :func:`compare_latency`, :func:`agreement`, :func:`memory_ratio`)
take plain values, so they are tested with deterministic inputs; the recording functions take two loaded
models and record one :func:`kit.gate.check` each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit._types import Array
from kit.gate import metrics, suite
from kit.gate.record import Deadline, check, step
from kit.registry.loaded import LoadedModel, as_numpy
from kit.signature import TensorSpec

MAX_LATENCY_RATIO = 1.25
LATENCY_SLACK_MS = 0.25
MIN_AGREEMENT = 0.95
MAX_DEVIATION = 0.05
ACCURACY_MARGIN = 0.01
MAX_MEMORY_RATIO = 1.5
_WARMUP = 3
_MIN_ROUNDS = 5
_EXTENSIONS = 3  # a latency breach is measured with up to this many more sets of rounds, in the same sample


# --------------------------------------------------------------------------- pure functions


def interleave(call_a: Callable[[], object], call_b: Callable[[], object], rounds: int,
               deadline: Deadline | None = None) -> tuple[list[float], list[float]]:
    """Milliseconds of ``rounds`` calls of each, alternated A B, B A, ... so drifting load hits both alike.
    Stops early (after at least one round) when ``deadline`` is spent; its step then reports the overrun."""
    a_ms: list[float] = []
    b_ms: list[float] = []
    for i in range(max(1, int(rounds))):
        order = ((call_a, a_ms), (call_b, b_ms)) if i % 2 == 0 else ((call_b, b_ms), (call_a, a_ms))
        for fn, out in order:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000.0)
        if deadline is not None and deadline.left() <= 0:
            deadline.stopped = True
            break
    return a_ms, b_ms


@dataclass(frozen=True)
class LatencyComparison:
    """Candidate vs production latency at one batch size, from interleaved calls."""

    batch: int
    candidate_ms: tuple[float, ...]
    production_ms: tuple[float, ...]
    max_ratio: float
    slack_ms: float

    @property
    def rounds(self) -> int:
        return min(len(self.candidate_ms), len(self.production_ms))

    def median(self, which: str) -> float:
        return float(np.median(self.candidate_ms if which == "candidate" else self.production_ms))

    def p95(self, which: str) -> float:
        return float(np.percentile(self.candidate_ms if which == "candidate" else self.production_ms, 95))

    def _pairs(self) -> list[tuple[float, float]]:
        return list(zip(self.candidate_ms, self.production_ms))

    def fastest(self, which: str) -> float:
        return float(min(self.candidate_ms if which == "candidate" else self.production_ms))

    @property
    def ratio(self) -> float:
        """Candidate's fastest call / production's fastest call. A busy machine only adds time to a call, so
        each side's fastest of many interleaved calls is its own cost (benchmarks/gate_under_load.py: steadier
        under load than the median of per-round ratios, which one preempted thread of a round moves)."""
        p = self.fastest("production")
        return self.fastest("candidate") / p if p > 0 else float("inf")

    @property
    def round_ratio(self) -> float:
        """The median over rounds of candidate / production: each round's two calls ran back to back."""
        return float(np.median([c / p if p > 0 else float("inf") for c, p in self._pairs()]))

    @property
    def excess_ms(self) -> float:
        """Candidate's fastest - ``max_ratio`` x production's fastest (ms): what the slack bounds."""
        return self.fastest("candidate") - self.max_ratio * self.fastest("production")

    @property
    def round_excess_ms(self) -> float:
        """The median over rounds of candidate - ``max_ratio`` x production (ms)."""
        return float(np.median([c - self.max_ratio * p for c, p in self._pairs()]))

    @property
    def fastest_passed(self) -> bool:
        return self.ratio <= self.max_ratio or self.excess_ms <= self.slack_ms

    @property
    def rounds_passed(self) -> bool:
        return self.round_ratio <= self.max_ratio or self.round_excess_ms <= self.slack_ms

    @property
    def passed(self) -> bool:
        """A breach is one only when both estimates see it, each within the ratio or (sub-millisecond models,
        whose ratios are noise) the slack. Noise fools each in its own way: one preempted thread moves the
        median round's ratio (a busy runner), and on a crowded one where a quiet moment is rare, which side's
        fastest call caught one is luck. A real slowdown moves both (benchmarks/gate_under_load.py)."""
        return self.fastest_passed or self.rounds_passed

    def detail(self) -> str:
        return (f"fastest call {self.fastest('candidate'):.3f} ms vs production {self.fastest('production'):.3f} ms "
                f"(median {self.median('candidate'):.3f} vs {self.median('production'):.3f}, p95 "
                f"{self.p95('candidate'):.3f} vs {self.p95('production'):.3f}), {self.rounds} interleaved rounds, "
                f"median round ratio {self.round_ratio:.3f}; passes within {self.max_ratio:g}x, or when the candidate "
                f"- {self.max_ratio:g}x production ({self.excess_ms:.3f} ms fastest, {self.round_excess_ms:.3f} ms "
                f"median round) is within {self.slack_ms:g} ms, by either the fastest calls or the median round")


def compare_latency(candidate_ms: Sequence[float], production_ms: Sequence[float], *, batch: int = 1,
                    max_ratio: float = MAX_LATENCY_RATIO, slack_ms: float = LATENCY_SLACK_MS) -> LatencyComparison:
    if not candidate_ms or not production_ms:
        raise ValueError("compare_latency needs at least one timing of each model.")
    return LatencyComparison(batch, tuple(map(float, candidate_ms)), tuple(map(float, production_ms)),
                             float(max_ratio), float(slack_ms))


@dataclass(frozen=True)
class Agreement:
    """How closely the candidate's outputs follow production's on the same inputs."""

    kind: str  # "argmax" | "equal" | "deviation" | "shape"
    value: float  # agreement fraction (argmax, equal) or relative deviation (deviation); inf for shape
    threshold: float
    passed: bool
    detail: str


def _classes(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" and x.ndim >= 2 and x.shape[-1] > 1


def agreement(candidate: Sequence[Array], production: Sequence[Array], *, min_agreement: float = MIN_AGREEMENT,
              max_deviation: float = MAX_DEVIATION) -> Agreement:
    """The worst output's agreement. Classification-shaped outputs: the fraction of rows whose argmax over
    the last dim is the same; integer/bool outputs: the fraction of equal elements; other float outputs:
    max |candidate - production| over max |production| (1 when production is all zeros)."""
    if len(candidate) != len(production):
        return Agreement("shape", float("inf"), 0.0, False,
                         f"{len(candidate)} outputs vs production's {len(production)}")
    worst: Agreement | None = None
    for i, (c, p) in enumerate(zip(map(as_numpy, candidate), map(as_numpy, production))):
        if c.shape != p.shape:
            return Agreement("shape", float("inf"), 0.0, False,
                             f"output {i} has shape {tuple(c.shape)}, production's {tuple(p.shape)}")
        if _classes(p):
            frac = float((c.argmax(-1) == p.argmax(-1)).mean()) if c.size else 1.0
            a = Agreement("argmax", frac, min_agreement, frac >= min_agreement,
                          f"output {i}: same argmax on {frac:.2%} of {int(np.prod(p.shape[:-1]))} rows")
        elif p.dtype.kind in "iub":
            frac = float((c == p).mean()) if c.size else 1.0
            a = Agreement("equal", frac, min_agreement, frac >= min_agreement,
                          f"output {i}: {frac:.2%} of {p.size} values equal")
        else:
            c64, p64 = c.astype(np.float64), p.astype(np.float64)
            scale = float(np.abs(p64).max()) if p64.size else 0.0
            dev = float(np.abs(c64 - p64).max() / (scale or 1.0)) if p64.size else 0.0
            ok = bool(np.isfinite(dev)) and dev <= max_deviation
            a = Agreement("deviation", dev, max_deviation, ok,
                          f"output {i}: max |candidate - production| / max |production| = {dev:.3g} "
                          f"(scale {scale:.3g})")
        if worst is None or (worst.passed and not a.passed):
            worst = a
    return worst or Agreement("equal", 1.0, min_agreement, True, "no outputs")


def memory_ratio(candidate_bytes: int, production_bytes: int, max_ratio: float = MAX_MEMORY_RATIO
                 ) -> tuple[float, bool]:
    """(candidate / production size, within ``max_ratio``)."""
    ratio = candidate_bytes / production_bytes if production_bytes > 0 else float("inf")
    return ratio, ratio <= max_ratio


def no_worse(candidate: float, production: float, margin: float, higher_is_better: bool = True) -> bool:
    """The candidate's score is at most ``margin`` worse than production's."""
    if not (np.isfinite(candidate) and np.isfinite(production)):
        return False
    return candidate >= production - margin if higher_is_better else candidate <= production + margin


# --------------------------------------------------------------------------- the recorded checks


def _spec(s: TensorSpec) -> str:
    return str(s.describe()) if hasattr(s, "describe") else str(s)


def signature(model: LoadedModel, production: LoadedModel) -> bool:
    """The candidate takes and returns what production does (names, dtypes, dims): clients keep working."""
    with step("signature vs production"):
        mine = [_spec(s) for s in (*model.signature.inputs, *model.signature.outputs)]
        theirs = [_spec(s) for s in (*production.signature.inputs, *production.signature.outputs)]
        diff = [f"{a or '-'} (production {b or '-'})" for a, b in
                zip(mine + [""] * len(theirs), theirs + [""] * len(mine)) if a != b]
        same = not diff
        check("same signature as production", passed=same, value=production.version.ref,
              detail="inputs and outputs: " + (", ".join(mine) if same else "; ".join(diff[:4])))
    return same


def outputs_agree(model: LoadedModel, production: LoadedModel, *, rows: int = 64, data: str | Path | None = None,
                  base: str | Path | None = None, min_agreement: float = MIN_AGREEMENT,
                  max_deviation: float = MAX_DEVIATION) -> Agreement | None:
    """Candidate and production on the same inputs (``data`` when given, else rows made from the example)."""
    result = None
    with step("output agreement vs production") as d:
        if data:
            inputs, _ = suite.load_data(model, data, base)
            n = int(inputs[0].shape[0])
            where = f"{n} rows of {Path(data).name}"
        else:
            n = max(1, min(rows, int(model.signature.max_batch)))
            inputs = suite.make_inputs(model, n, seed=8)
            where = f"{n} rows made from the example"
        step_rows = max(1, min(256, int(model.signature.max_batch)))
        cand: list[tuple[Array, ...]] = []
        prod: list[tuple[Array, ...]] = []
        for i in range(0, n, step_rows):
            chunk = tuple(t[i:i + step_rows] for t in inputs)
            cand.append(suite.run(model, chunk))
            prod.append(suite.run(production, chunk))
            d.tick()
        joined = [tuple(np.concatenate([as_numpy(o[k]) for o in outs]) for k in range(len(outs[0])))
                  for outs in (cand, prod)]
        result = agreement(joined[0], joined[1], min_agreement=min_agreement, max_deviation=max_deviation)
        check(f"output agreement vs production ({result.kind})", passed=result.passed,
              value=round(result.value, 6) if np.isfinite(result.value) else str(result.value),
              threshold=result.threshold, detail=f"{result.detail}; {where}, vs {production.version.ref}")
    return result


def _rounds_that_fit(call: Callable[[], object], want: int, d: Deadline) -> int:
    """Rounds of two calls that fit in about half of what is left of the budget (at least a few)."""
    t = time.perf_counter()
    for _ in range(_WARMUP):  # warm-up, as a service does before it takes traffic
        call()
    per_call = max((time.perf_counter() - t) / _WARMUP, 1e-6)
    return max(_MIN_ROUNDS, min(int(want), int(d.left() * 0.5 / (2 * per_call))))


def _measure(cand: Callable[[], object], prod: Callable[[], object], k: int, d: Deadline, rows: int, max_ratio: float,
             slack_ms: float) -> LatencyComparison:
    """``k`` interleaved rounds; a breach must hold up: up to ``_EXTENSIONS`` times ``k`` more rounds join the
    same sample while the budget allows. More calls only bring each side's fastest closer to its own cost, so a
    busy spell that hid both floors clears, and a real slowdown stays (its fastest calls keep their ratio)."""
    c_ms, p_ms = interleave(cand, prod, k, d)
    cmp = compare_latency(c_ms, p_ms, batch=rows, max_ratio=max_ratio, slack_ms=slack_ms)
    for _ in range(_EXTENSIONS):
        if cmp.passed or d.stopped or d.left() < d.elapsed() / 2:
            break
        more_c, more_p = interleave(cand, prod, k, d)
        c_ms, p_ms = c_ms + more_c, p_ms + more_p
        cmp = compare_latency(c_ms, p_ms, batch=rows, max_ratio=max_ratio, slack_ms=slack_ms)
    return cmp


def latency(model: LoadedModel, production: LoadedModel, *, batch_n: int = 64, rounds: int = 50,
            max_ratio: float = MAX_LATENCY_RATIO, slack_ms: float = LATENCY_SLACK_MS) -> list[LatencyComparison]:
    """Candidate vs production, interleaved, at batch 1 and at batch ``batch_n`` (capped by the max batch)."""
    n = max(1, min(int(batch_n), int(model.signature.max_batch))) if "batch" in suite.dim_ranges(model) else 1
    out: list[LatencyComparison] = []
    for rows, seed in ((1, 4), (n, 5)) if n > 1 else ((1, 4),):
        with step(f"latency vs production, batch {rows}") as d:
            x_c = suite.make_inputs(model, rows, seed=seed)
            x_p = suite.native(production, [as_numpy(t) for t in x_c])

            def cand(x: tuple[Array, ...] = x_c) -> object:
                return model(*x)

            def prod(x: tuple[Array, ...] = x_p) -> object:
                return production(*x)

            _rounds_that_fit(prod, rounds, d)  # production's warm-up
            k = _rounds_that_fit(cand, rounds, d)  # the slower side's estimate is the candidate's, usually
            cmp = _measure(cand, prod, k, d, rows, max_ratio, slack_ms)
            out.append(cmp)
            extended = cmp.rounds > k
            check(f"latency vs production, batch {rows}", passed=cmp.passed, value=round(cmp.ratio, 3),
                  threshold=max_ratio, detail=f"candidate/production, fastest calls; {cmp.detail()}"
                  + (f"; rounds added after a breach ({k} first)" if extended else "")
                  + f"; backend {suite.backend_of(model)}, {suite._threads(model)}")
    return out


def _score(model: LoadedModel, inputs: Sequence[Array], labels: np.ndarray | None, metric: str,
           output: str | int | None, base: str | Path | None) -> float | None:
    out = suite.predict(model, inputs, output)
    if metric:
        return float(metrics.resolve_metric(metric, base)(out, labels))
    return None if labels is None else metrics.accuracy(out, labels)


def quality(model: LoadedModel, production: LoadedModel, data: str | Path, *, metric: str = "", output: str | int | None = None,
            margin: float = ACCURACY_MARGIN, lower_is_better: bool = False,
            base: str | Path | None = None) -> tuple[float, float] | None:
    """Accuracy (or ``metric``) on ``data`` no worse than production's by more than ``margin``."""
    scores = None
    with step("quality vs production"):
        inputs, labels = suite.load_data(model, data, base)
        mine = _score(model, inputs, labels, metric, output, base)
        theirs = _score(production, inputs, labels, metric, output, base)
        if mine is None or theirs is None:
            print(f"{Path(data).name} has no labels and no metric is named: no quality comparison.")
            return None
        name = metric.rpartition(":")[2] if metric else "accuracy"
        ok = no_worse(mine, theirs, margin, higher_is_better=not lower_is_better)
        check(f"{name} vs production", passed=ok, value=round(mine, 6),
              threshold=round(theirs + margin if lower_is_better else theirs - margin, 6),
              detail=f"candidate {mine:.4g} vs production {production.version.ref} {theirs:.4g} on "
                     f"{len(inputs[0])} rows of {Path(data).name}; "
                     f"{'higher' if lower_is_better else 'lower'} by at most {margin:g}")
        scores = (mine, theirs)
    return scores


def artifact_bytes(model: LoadedModel) -> int:
    """Bytes of the file that serves (``model.onnx`` on onnxruntime, else ``model.pt2``), as loaded."""
    from kit.version_files import MODEL_FILE, ONNX_DATA_FILE, ONNX_FILE

    folder = Path(model.files_dir or model.version.path)
    names = (ONNX_FILE, ONNX_DATA_FILE) if suite.backend_of(model) == "onnxruntime" else (MODEL_FILE,)
    return sum((folder / f).stat().st_size for f in names if (folder / f).is_file())


def memory(model: LoadedModel, production: LoadedModel, *, max_ratio: float = MAX_MEMORY_RATIO) -> float:
    """The served artifact's size (weights and graph) as a ratio of production's."""
    ratio = float("inf")
    with step("memory vs production"):
        mine, theirs = artifact_bytes(model), artifact_bytes(production)
        ratio, ok = memory_ratio(mine, theirs, max_ratio)
        check("artifact size vs production", passed=ok, value=round(ratio, 3), threshold=max_ratio,
              detail=f"{mine:,} bytes vs production {production.version.ref} {theirs:,} bytes (the served "
                     f"{'model.onnx' if suite.backend_of(model) == 'onnxruntime' else 'model.pt2'}: weights "
                     "and graph)")
    return ratio


def against(model: LoadedModel, production: LoadedModel | None, *, data: str | Path | None = None, batch_n: int = 64,
            rounds: int = 50, max_latency_ratio: float = MAX_LATENCY_RATIO, latency_slack_ms: float = LATENCY_SLACK_MS,
            min_agreement: float = MIN_AGREEMENT, max_deviation: float = MAX_DEVIATION,
            accuracy_margin: float = ACCURACY_MARGIN, max_memory_ratio: float = MAX_MEMORY_RATIO,
            metric: str = "", output: str | int | None = None, lower_is_better: bool = False,
            base: str | Path | None = None) -> bool:
    """Every comparison of the default notebook, in its order. Returns False (and records nothing) when
    there is no production to compare: the candidate is judged on its own checks."""
    if production is None:
        print("No production version to compare: judged on its own checks.")
        return False
    if not signature(model, production):
        print("The signature differs from production's: outputs and latency are not compared.")
        memory(model, production, max_ratio=max_memory_ratio)
        return True
    outputs_agree(model, production, rows=batch_n, data=data, base=base, min_agreement=min_agreement,
                  max_deviation=max_deviation)
    latency(model, production, batch_n=batch_n, rounds=rounds, max_ratio=max_latency_ratio, slack_ms=latency_slack_ms)
    if data:
        quality(model, production, data, metric=metric, output=output, margin=accuracy_margin,
                lower_is_better=lower_is_better, base=base)
    memory(model, production, max_ratio=max_memory_ratio)
    return True

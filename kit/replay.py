"""Replay captured production traffic through a candidate version, in-process, and compare.

A service with ``[capture] enabled = true`` (:mod:`kit.serving.recorder`) writes a sample of the requests it
answered -- inputs, the version that served them, its outputs, the request's latency -- as JSONL.
:func:`replay` loads a candidate (``Registry.load``: signature, sha256, environment), runs every captured
request through it as it arrived (same rows, same batch), and compares with what production answered:

- **agreement**: for a classifier (first output float of shape ``[batch, C]``, C >= 2) the share of rows
  whose argmax is the same; otherwise the share of records whose outputs all match what was recorded by
  :func:`kit.backends.parity.compare` (``atol + rtol * |recorded|``, NaN only where NaN was recorded);
- **deviation**: the largest and the mean absolute difference over every output element;
- **latency**: the candidate's in-process call time (p50, p95) beside the recorded request latency (the
  service's whole request: parsing, queueing, the forward pass) -- a guide, not like for like;
- **errors**: calls that raised, with the first messages.

Records whose inputs were dropped for privacy (``drop_inputs``), whose model is another, or whose inputs do
not fit the candidate's signature are skipped and counted. ``kit replay`` and the replay gate notebook
(``kit/notebooks/validation/replay.ipynb``) call :func:`replay`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from kit._types import JSONObject
from kit.backends.parity import compare
from kit.errors import NotFoundError

if TYPE_CHECKING:
    import torch

    from kit.registry import Registry

# the replay gate notebook, package data beside the default one: run_gate(..., notebooks=[REPLAY_NOTEBOOK])
REPLAY_NOTEBOOK = Path(__file__).resolve().parent / "notebooks" / "validation" / "replay.ipynb"


@dataclass(frozen=True)
class ReplayReport:
    """What :func:`replay` found. ``to_dict()`` is the JSON form (``kit replay --json``)."""

    model: str
    version: int
    capture: str
    mode: str  # "argmax" (a classifier) or "tolerance"
    replayed: int = 0
    rows: int = 0
    agreeing: int = 0  # rows (argmax) or records (tolerance) that agree
    errors: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records
    served: dict[str, int] = field(default_factory=dict)  # version that answered in production -> records
    max_deviation: float | None = None
    mean_deviation: float | None = None
    candidate_ms: dict[str, float] = field(default_factory=dict)  # p50, p95 of the in-process call
    recorded_ms: dict[str, float] = field(default_factory=dict)  # p50, p95 of the captured requests
    error_examples: tuple[str, ...] = ()

    @property
    def agreement(self) -> float | None:
        """Share of rows (argmax) or records (tolerance) that agree; None when nothing was compared."""
        total = self.rows if self.mode == "argmax" else self.replayed - self.errors
        return self.agreeing / total if total > 0 else None

    @property
    def error_rate(self) -> float:
        return self.errors / self.replayed if self.replayed else 0.0

    def to_dict(self) -> JSONObject:
        d = asdict(self)
        d["error_examples"] = list(self.error_examples)
        d.update(agreement=self.agreement, error_rate=self.error_rate)
        return d


def capture_records(folder: Path | str, model: str | None = None) -> Iterator[JSONObject]:
    """The records of a capture folder, oldest file first (rotated files sort before the current one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"No capture folder {folder}. Turn capture on in the service's service.toml "
                            "([capture] enabled = true) and point at its folder.")
    # per worker file prefix: its rotated files (<prefix>.<seq>.jsonl) in order, then the current one
    files = sorted(folder.glob("*.jsonl"), key=lambda p: (p.name.split(".")[0], p.name.count(".") == 1, p.name))
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a crash: skip it
                    continue
                if isinstance(rec, dict) and (model is None or rec.get("model") == model):
                    yield rec


def replay(registry: Registry, name: str, version: int | str | None, capture: Path | str, *, limit: int | None = None,
           atol: float = 1e-4, rtol: float = 1e-3, check_env: bool = True) -> ReplayReport:
    """Run the captured requests of ``name`` in ``capture`` through ``name@version``; see the module doc.

    Raises :class:`kit.errors.NotFoundError` when the folder is missing or holds no record of ``name``.
    """
    import torch

    loaded = registry.load(name, version, check_env=check_env)
    sig = loaded.signature
    in_names = [s.name for s in sig.inputs]
    out_names = [s.name for s in sig.outputs]
    first = sig.outputs[0] if sig.outputs else None
    classifier = (first is not None and first.dtype.startswith(("float", "bfloat")) and len(first.shape) == 2
                  and isinstance(first.shape[1], int) and first.shape[1] >= 2)
    acc = _Tally()
    seen_any = False
    for rec in capture_records(capture, name):
        seen_any = True
        if limit is not None and acc.replayed >= limit:
            break
        inputs = _inputs(rec, in_names, torch)
        if isinstance(inputs, str):
            acc.skipped[inputs] += 1
            continue
        acc.served[str(rec.get("version"))] += 1
        acc.recorded.append(float(rec.get("latency_ms", 0.0)))
        acc.replayed += 1
        t0 = time.perf_counter()
        try:
            out = loaded(*inputs)
        except Exception as exc:  # the candidate fails on real traffic: that is the finding
            acc.errors += 1
            if len(acc.examples) < 3:
                acc.examples.append(f"{rec.get('request_id')}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        acc.candidate.append((time.perf_counter() - t0) * 1000)
        acc.compare(_flat(out, out_names), rec.get("outputs") or {}, out_names, classifier, atol, rtol, torch)
    if not seen_any:
        raise NotFoundError(f"{capture} holds no captured requests of model {name!r}. Send traffic to a service "
                            "with [capture] enabled = true (sample_rate > 0) first.")
    mv = loaded.version
    return acc.report(name, mv.version, str(capture), "argmax" if classifier else "tolerance")


def _inputs(rec: JSONObject, names: list[str], torch: ModuleType) -> tuple[torch.Tensor, ...] | str:
    """The record's inputs as tensors in signature order, or the reason it is skipped."""
    docs = rec.get("inputs") or {}
    if list(docs) != names:
        return "inputs differ from the candidate's signature"
    if any(d is None for d in docs.values()):
        return "inputs dropped at capture (drop_inputs)"
    try:
        return tuple(torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])
                     for d in docs.values())
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
        return "unreadable inputs"


def _flat(out: object, names: list[str]) -> tuple[torch.Tensor, ...]:
    from kit.signature import flatten_outputs

    return flatten_outputs(out, names)


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {"p50": round(v[len(v) // 2], 3), "p95": round(v[min(len(v) - 1, int(0.95 * len(v)))], 3)}


class _Tally:
    def __init__(self) -> None:
        self.replayed = self.rows = self.agreeing = self.errors = 0
        self.skipped: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.recorded: list[float] = []
        self.candidate: list[float] = []
        self.examples: list[str] = []
        self.max_dev: float | None = None
        self.dev_sum = 0.0
        self.dev_n = 0

    def compare(self, outs: tuple[torch.Tensor, ...], recorded: JSONObject, names: list[str], classifier: bool,
                atol: float, rtol: float, torch: ModuleType) -> None:
        docs = [recorded.get(n) for n in names] if all(n in recorded for n in names) else list(recorded.values())
        within = True
        for i, (o, d) in enumerate(zip(outs, docs)):
            if not isinstance(d, dict):
                within = False
                continue
            ref = torch.tensor(d["data"], dtype=o.dtype).reshape(d["shape"])
            if ref.shape != o.shape:
                within = False
                continue
            diff = (o.double() - ref.double()).abs()
            if diff.numel():
                m = float(diff.max())
                self.max_dev = m if self.max_dev is None else max(self.max_dev, m)
                self.dev_sum += float(diff.sum())
                self.dev_n += diff.numel()
            within = within and compare([o.double().numpy()], [ref.double().numpy()], atol=atol, rtol=rtol,
                                        dtypes=[str(o.dtype)]).ok
            if i == 0 and classifier and o.dim() == 2:
                self.rows += int(o.shape[0])
                self.agreeing += int((o.argmax(1) == ref.argmax(1)).sum())
        if not classifier:
            self.agreeing += within

    def report(self, name: str, version: int, capture: str, mode: str) -> ReplayReport:
        return ReplayReport(
            model=name, version=version, capture=capture, mode=mode, replayed=self.replayed, rows=self.rows,
            agreeing=self.agreeing, errors=self.errors, skipped=dict(self.skipped), served=dict(self.served),
            max_deviation=self.max_dev, mean_deviation=self.dev_sum / self.dev_n if self.dev_n else None,
            candidate_ms=_pct(self.candidate), recorded_ms=_pct(self.recorded), error_examples=tuple(self.examples))


__all__ = ["REPLAY_NOTEBOOK", "ReplayReport", "capture_records", "replay"]

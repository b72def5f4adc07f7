"""Gate evidence as the registry reads it: where a version's gate runs live and what makes one a pass.

Core: it imports the standard library only, so the registry (and through it every serving worker) can use
it without loading the gate's runner, kernel or recorder (:mod:`kit.gate` writes the evidence and imports
this module; never the reverse)::

    <registry>/<name>/versions/<n>/gates/<run-id>/
        result.json       the verdict, written last by the gate process (the only file the gate rule reads)
        result.json.sig   the gate's signature of result.json's exact bytes (with a keyring)
        report.html       verdict, model card, checks, then every executed notebook
        <notebook>.ipynb  the executed notebooks (evidence for people; never read back to decide)

A result passes for a version when it says ``"passed": true`` and names the version's ``artifact_sha256``
(and, when asked, the backend it judged). Which results count at all (signed by a trusted key, with a
keyring) is the registry's rule: :meth:`kit.registry.Registry.passing_gate`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from kit._types import JSONObject

log = logging.getLogger(__name__)

SCHEMA = 1
GATES_DIR = "gates"
RESULT_FILE = "result.json"
REPORT_FILE = "report.html"


def gates_dir(version_dir: Path) -> Path:
    """``versions/<n>/gates``: one folder per gate run of that version."""
    return Path(version_dir) / GATES_DIR


def read_results(version_dir: Path) -> list[JSONObject]:
    """Every readable ``result.json`` of a version, oldest run first (run ids sort by time). Unsigned:
    what people are shown; the gate rule reads only signed ones when the registry has a keyring."""
    root = gates_dir(version_dir)
    out: list[JSONObject] = []
    if root.is_dir():
        for p in sorted(root.glob(f"*/{RESULT_FILE}")):
            try:
                d = json.loads(p.read_bytes())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                log.warning("unreadable gate result %s", p)
                continue
            if isinstance(d, dict):
                out.append(d)
            else:
                log.warning("gate result %s is not a JSON object", p)
    return out


def result_backend(result: Mapping[str, object]) -> str:
    """The backend a result judged (results written before backends: torch)."""
    return str(result.get("backend") or "torch")


def on_backend(results: Sequence[Mapping[str, object]], backend: str | None) -> list[Mapping[str, object]]:
    """``results`` judged on ``backend`` (all of them when None)."""
    return list(results) if backend is None else [r for r in results if result_backend(r) == backend]


def passing_result(results: Sequence[Mapping[str, object]], artifact_sha256: str,
                   backend: str | None = None) -> JSONObject | None:
    """The newest result that passed for exactly this artifact (on ``backend``, when given), if any."""
    ok = [dict(r) for r in on_backend(results, backend)
          if r.get("passed") is True and r.get("artifact_sha256") == artifact_sha256]
    return ok[-1] if ok else None


def verdict(results: Sequence[Mapping[str, object]], artifact_sha256: str,
            backend: str | None = None) -> tuple[str, JSONObject | None]:
    """("passed" | "failed" | "stale" | "-", the deciding result), among the results on ``backend`` when
    given. "stale": the newest result was recorded for another artifact sha256."""
    results = on_backend(results, backend)
    if not results:
        return "-", None
    passing = passing_result(results, artifact_sha256)
    if passing is not None:
        return "passed", passing
    last = dict(results[-1])
    return ("stale" if last.get("artifact_sha256") != artifact_sha256 else "failed"), last


def report_path(registry_root: Path, version_dir: Path, result: Mapping[str, object]) -> Path | None:
    """The ``report.html`` of ``result``: beside its result.json, or the path it recorded."""
    run_id = str(result.get("run_id", ""))
    if run_id and "/" not in run_id and not run_id.startswith("."):
        p = gates_dir(version_dir) / run_id / REPORT_FILE
        if p.is_file():
            return p
    rec = result.get("report")
    if isinstance(rec, str) and rec:
        p = Path(rec)
        for cand in (p, Path(registry_root) / p, gates_dir(version_dir) / p):
            if cand.is_file():
                return cand.resolve()
    return None


def _one_line(v: object, limit: int = 80) -> str:
    """A value from a stored result as a short single line (a result is shown, never trusted, here)."""
    s = " ".join(str(v).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def failed_checks_text(result: Mapping[str, object], limit: int = 6) -> str:
    """``"latency vs production, batch 64 = 3.1 (threshold 1.25); accuracy = 0.8 (threshold 0.9)"``: the
    failed checks of a stored result with their figures (its error when no check failed)."""
    checks = result.get("checks")
    failed = [c for c in checks if isinstance(c, Mapping) and c.get("passed") is not True] \
        if isinstance(checks, list) else []
    parts = []
    for c in failed[:limit]:
        s = _one_line(c.get("name"))
        if c.get("value") is not None:
            s += f" = {_one_line(c.get('value'), 40)}"
        if c.get("threshold") is not None:
            s += f" (threshold {_one_line(c.get('threshold'), 40)})"
        parts.append(s)
    if len(failed) > limit:
        parts.append(f"{len(failed) - limit} more")
    if not parts and result.get("error"):
        parts.append(_one_line(result.get("error"), 300))
    return "; ".join(parts)


def refusal_detail(registry_root: Path, version_dir: Path, results: Sequence[Mapping[str, object]],
                   artifact_sha256: str) -> str:
    """What a refused promotion adds after "no passing gate": the newest gate of this artifact, its failed
    checks with their figures and its report ("" when the artifact was never gated)."""
    mine = [r for r in results if r.get("artifact_sha256") == artifact_sha256]
    if not mine:
        return ""
    last = mine[-1]
    what = failed_checks_text(last)
    report = report_path(Path(registry_root), Path(version_dir), last)
    return (f" Its last gate (run {_one_line(last.get('run_id'), 60)}, backend {result_backend(last)}) "
            + ("failed: " + what if what else "did not pass") + (f"; report: {report}." if report else "."))

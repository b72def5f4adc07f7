"""What every face shows, written once: tables, alias badges, version summaries, gate verdict lines.

The CLI and the magics print the text forms; the registry panel shows the HTML forms. Nothing here
imports IPython, ipywidgets or click: a face parses its input, calls the library and renders with these.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kit._types import JSONObject

if TYPE_CHECKING:
    from kit.gate import GateResult
    from kit.gate.evidence import Check
    from kit.registry import Aliases, ModelVersion, Registry
    from kit.replay import ReplayReport


# --------------------------------------------------------------------------- plain text


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A plain aligned text table (what a person reads in a terminal)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def metric_value(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metrics_text(metrics: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={metric_value(v)}" for k, v in metrics.items()) or "-"


def badges(a: Aliases, version: int) -> list[tuple[str, str]]:
    """The alias badges of ``version`` as (kind, text): production, canary with its weight, previous."""
    out = []
    if a.production == version:
        out.append(("production", "production"))
    if a.canary == version:
        out.append(("canary", f"canary {a.canary_weight:.0%}"))
    if version in a.previous and a.production != version:
        out.append(("previous", "previous"))
    return out


def badges_text(a: Aliases, version: int) -> str:
    return ", ".join(text for _, text in badges(a, version))


def aliases_line(name: str, a: Aliases) -> str:
    """``digits: production=3, canary=4 at 10%``: where a model's traffic goes."""
    s = f"{name}: production={a.production if a.production is not None else '-'}"
    if a.canary is not None:
        s += f", canary={a.canary} at {a.canary_weight:.0%}"
    return s


def guard_note(reg: Registry, name: str) -> str | None:
    """``canary guard ended v3 at 2026-11-28 18:26 UTC: canary 5xx rate 22.7% ...`` when the canary guard made
    the last traffic move of ``name`` (kit.serving.guard), else None."""
    last = None
    for ev in reg.history(name):
        if "aliases" in ev:  # events that moved traffic carry the alias snapshot
            last = ev
    if last is None or last.get("event") != "canary_guard":
        return None
    detail = (last.get("evidence") or {}).get("detail", "worse than production")
    return f"canary guard ended v{last.get('version')} at {str(last.get('ts', ''))[:16].replace('T', ' ')} UTC: {detail}"


def model_rows(reg: Registry) -> list[JSONObject]:
    """One summary per model (what ``kit models`` and ``%models`` list, also as JSON)."""
    rows = []
    for n in reg.models():
        vs = reg.versions(n)
        a = reg.aliases(n)
        rows.append({"name": n, "versions": len(vs), "latest": vs[-1].version if vs else None,
                     "production": a.production, "canary": a.canary, "canary_weight": a.canary_weight})
    return rows


def models_text(rows: Sequence[Mapping[str, object]]) -> str:
    return table([[r["name"], r["versions"], r["latest"], r["production"] or "-",
                   f"{r['canary']} ({r['canary_weight']:.0%})" if r["canary"] else "-"] for r in rows],
                 ["MODEL", "VERSIONS", "LATEST", "PRODUCTION", "CANARY"])


def versions_text(reg: Registry, name: str) -> str:
    """One model's versions, oldest first: sha256, created, size, metrics, gate verdict, alias badges."""
    a = reg.aliases(name)
    rows = [[mv.version, mv.short_sha, mv.created[:19].replace("T", " "), f"{mv.size_bytes / 1024:.0f} KiB",
             metrics_text(mv.metrics), ",".join(mv.backends), reg.gate_verdict(mv)[0], badges_text(a, mv.version)]
            for mv in reg.versions(name)]
    return f"{aliases_line(name, a)}   ({reg.location})\n" + table(
        rows, ["VERSION", "SHA256", "CREATED (UTC)", "SIZE", "METRICS", "BACKENDS", "GATE", "ALIASES"])


def gate_summary(result: GateResult) -> str:
    """One line for a gate run (a :class:`kit.gate.GateResult`): the verdict, the checks, why it failed."""
    checks = list(getattr(result, "checks", ()))
    n_ok = sum(1 for c in checks if getattr(c, "passed", False))
    if result.passed:
        return f"{result.ref} passed validation ({n_ok}/{len(checks)} checks, {result.seconds:.1f}s)"
    failed = [c for c in checks if not getattr(c, "passed", False)]
    why = result.error or "; ".join(_check_text(c) for c in failed[:3]) or "the gate did not pass"
    return f"{result.ref} FAILED validation ({n_ok}/{len(checks)} checks passed): {why}"


def _check_text(check: Check) -> str:
    if callable(getattr(check, "line", None)):
        return str(check.line())
    name = getattr(check, "name", "check")
    detail = getattr(check, "detail", None) or getattr(check, "message", None) or ""
    return f"{name}: {detail}" if detail else str(name)


# --------------------------------------------------------------------------- HTML (the registry panel)

CSS = """
<style>
.kit-table {border-collapse: collapse; font-size: 13px; font-family: var(--jp-ui-font-family, sans-serif);
            margin: 4px 0; min-width: 640px}
.kit-table th {text-align: left; padding: 5px 10px; border-bottom: 2px solid #c8ccd0; color: #57606a;
               font-weight: 600; background: #f6f8fa}
.kit-table td {padding: 5px 10px; border-bottom: 1px solid #e4e7ea; vertical-align: middle}
.kit-table tr.kit-prod td {background: #f0faf2}
.kit-table tr.kit-canary td {background: #fff8ec}
.kit-sha {font-family: var(--jp-code-font-family, monospace); color: #57606a}
.kit-badge {display: inline-block; padding: 1px 8px; margin-right: 4px; border-radius: 10px; font-size: 11px;
            font-weight: 600; color: #fff; line-height: 17px}
.kit-b-production {background: #1a7f37} .kit-b-canary {background: #bc4c00} .kit-b-previous {background: #8c959f}
.kit-pass {color: #1a7f37; font-weight: 600} .kit-fail {color: #cf222e; font-weight: 600}
.kit-none {color: #8c959f}
.kit-table a, .kit-status a {color: #0969da; text-decoration: underline}
.kit-metric {font-family: var(--jp-code-font-family, monospace); font-size: 12px}
</style>
"""


def gate_cell(reg: Registry, mv: ModelVersion) -> tuple[str, Path | None]:
    """(verdict, report path): ``passed`` (a passing gate for this exact artifact), ``failed``, ``stale``, ``-``."""
    from kit.evidence import report_path

    verdict, result = reg.gate_verdict(mv)
    return verdict, (report_path(reg.root, mv.path, result) if result else None)


def report_link(report: Path) -> str:
    return (f'<a href="{html.escape(report.as_uri())}" target="_blank" '
            f'title="{html.escape(str(report))}">report</a>')


def badges_html(a: Aliases, version: int) -> str:
    return "".join(f'<span class="kit-badge kit-b-{kind}">{html.escape(text)}</span>'
                   for kind, text in badges(a, version))


def _gate_html(verdict: str, report: Path | None) -> str:
    if verdict == "passed":
        gate = '<span class="kit-pass">&#10003; passed</span>'
    elif verdict in ("failed", "stale", "unsigned"):  # unsigned: a pass no trusted key signed
        gate = f'<span class="kit-fail">&#10007; {verdict}</span>'
    else:
        gate = '<span class="kit-none">not validated</span>'
    return gate + (f" &middot; {report_link(report)}" if report is not None else "")


def versions_html(reg: Registry, name: str) -> str:
    """The versions table as HTML (badges, verdicts with report links). Newest version first."""
    a = reg.aliases(name)
    rows = []
    for mv in reversed(reg.versions(name)):
        metrics = " ".join(f'<span class="kit-metric">{html.escape(f"{k}={metric_value(v)}")}</span>'
                           for k, v in mv.metrics.items()) or '<span class="kit-none">-</span>'
        cls = "kit-prod" if a.production == mv.version else "kit-canary" if a.canary == mv.version else ""
        rows.append(
            f'<tr class="{cls}" data-version="{mv.version}"><td><b>v{mv.version}</b></td>'
            f'<td class="kit-sha" title="{mv.artifact_sha256}">{mv.short_sha}</td>'
            f'<td>{html.escape(mv.created[:16].replace("T", " "))} UTC</td><td>{metrics}</td>'
            f"<td>{_gate_html(*gate_cell(reg, mv))}</td><td>{badges_html(a, mv.version)}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("version", "sha256", "created", "metrics", "gate", "aliases"))
    return f'{CSS}<table class="kit-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def replay_text(report: ReplayReport) -> str:
    """``kit replay``'s table: a :class:`kit.replay.ReplayReport` as one row per figure."""
    def ms(d: Mapping[str, float]) -> str:
        return f"p50 {d['p50']:.3f} ms, p95 {d['p95']:.3f} ms" if d else "-"

    agree = report.agreement
    unit = "rows, argmax" if report.mode == "argmax" else "records within tolerance"
    rows = [
        ["candidate", f"{report.model}@{report.version}"],
        ["replayed", f"{report.replayed} request(s) from {report.capture}"],
        ["served by", ", ".join(f"v{v}: {n}" for v, n in sorted(report.served.items())) or "-"],
        ["agreement", f"{agree:.2%} ({report.agreeing} of {report.rows if report.mode == 'argmax' else report.replayed - report.errors} {unit})"
         if agree is not None else "-"],
        ["max deviation", f"{report.max_deviation:.3g}" if report.max_deviation is not None else "-"],
        ["mean deviation", f"{report.mean_deviation:.3g}" if report.mean_deviation is not None else "-"],
        ["errors", f"{report.errors} ({report.error_rate:.1%})"],
        ["latency, candidate", ms(report.candidate_ms) + " (in-process call)"],
        ["latency, recorded", ms(report.recorded_ms) + " (whole request in the service)"],
    ]
    rows += [["skipped", f"{n}: {why}"] for why, n in sorted(report.skipped.items())]
    rows += [["error", e] for e in report.error_examples]
    return table(rows, ["REPLAY", ""])


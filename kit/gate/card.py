"""The model card that opens a gate's report.html: what the registry knows about the version judged.

Made from the version's ``meta.json`` as the gate verified it before the run (``run_gate`` passes it; read
beside a run folder, ``versions/<n>/gates/<run-id>/``, when not given) and the run itself: the signature, the
lineage (notebook or script, git commit and whether the tree was dirty), the environment it was captured in,
its metrics, the data the gate was given, and each check with its verdict. Standard library only.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kit._types import JSONObject

_TD = "padding:2px 10px;vertical-align:top"
DATA_PARAMS = ("data", "capture", "metric", "output")  # parameters that name what the gate looked at


def _table(rows: Iterable[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th style='{_TD};text-align:left;color:#57606a;font-weight:normal'>{html.escape(k)}</th>"
                   f"<td style='{_TD}'>{v}</td></tr>" for k, v in rows)
    return f"<table style='border-collapse:collapse;font-family:sans-serif;margin:0 0 8px 0'>{body}</table>"


def _esc(v: object) -> str:
    return "-" if v is None or v == "" else html.escape(str(v))


def _specs(specs: Iterable[Mapping[str, Any]]) -> str:
    return "<br>".join(f"<code>{_esc(s.get('name'))}</code> {_esc(s.get('dtype'))} "
                       f"[{', '.join(str(d) for d in s.get('shape', []))}]" for s in specs) or "-"


def _onnx(rec: object) -> str:
    """capture.onnx in words: exported (opset, parity) or why not."""
    if not isinstance(rec, Mapping):
        return "not recorded (registered before Kit exported ONNX)"
    if rec.get("exported"):
        return (f"<code>{_esc(rec.get('file'))}</code>, opset {_esc(rec.get('opset'))}, onnxruntime "
                f"{_esc(rec.get('onnxruntime'))} parity max |diff| {_esc((rec.get('parity') or {}).get('max_abs_diff'))}")
    return f"not exported: {_esc(rec.get('reason'))}"


def read_meta(run_dir: Path) -> JSONObject | None:
    """The version's meta.json for a run folder (``versions/<n>/gates/<run-id>``), None if unreadable."""
    try:
        meta = json.loads((Path(run_dir).parent.parent / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def model_card_html(result: Any, meta: Mapping[str, Any] | None = None) -> str:
    """The card for a :class:`kit.gate.evidence.GateResult` (``meta``: its version's meta.json, read if None)."""
    meta = read_meta(result.run_dir) if meta is None else meta
    if meta is None:
        return "<h2>Model card</h2><p>The version's meta.json could not be read.</p>"
    sig = meta.get("signature") or {}
    dims = sig.get("dims") or {}
    src = meta.get("source") or {}
    env = meta.get("env") or {}
    cap = meta.get("capture") or {}
    commit = src.get("git_commit")
    lineage = [("source", f"{_esc(src.get('kind'))}: <code>{_esc(src.get('path'))}</code>"),
               ("git commit", f"<code>{_esc(commit)}</code>" + (" (uncommitted changes)" if src.get("git_dirty") else "")
                if commit else "not in a git repository"),
               ("captured", f"{_esc(meta.get('created'))} from {_esc(cap.get('model_class'))} "
                            f"({_esc(cap.get('format'))}, parity max |diff| {_esc((cap.get('parity') or {}).get('max_abs_diff'))})"),
               ("ONNX", _onnx(cap.get("onnx")))]
    environment = [("python", f"{_esc(env.get('python'))} ({_esc(env.get('implementation'))})"),
                   ("torch", _esc(env.get("torch")) + (f", CUDA {_esc(env.get('cuda'))}" if env.get("cuda") else ", CPU")),
                   ("onnxruntime", _esc(env.get("onnxruntime"))),
                   ("platform", f"{_esc(env.get('platform'))}, {_esc(env.get('libc'))}"),
                   ("environment", f"conda {_esc(env.get('conda_name'))}" if env.get("conda_prefix")
                    else f"<code>{_esc(env.get('prefix'))}</code>"),
                   ("lock", f"<code>{_esc(env.get('lock_sha256'))}</code>" if env.get("lock_sha256") else "none")]
    signature = [("inputs", _specs(sig.get("inputs", []))), ("outputs", f"{_specs(sig.get('outputs', []))} "
                  f"({_esc(sig.get('output_kind', 'tuple'))})"),
                 ("dims", ", ".join(f"{_esc(k)} {_esc(v.get('min'))}..{_esc(v.get('max'))}" for k, v in dims.items()
                                    if isinstance(v, Mapping)) or "-")]
    metrics = [(str(k), _esc(v)) for k, v in (meta.get("metrics") or {}).items()] or [("metrics", "none recorded")]
    params = result.params or {}
    data = [(k, f"<code>{_esc(params[k])}</code>") for k in DATA_PARAMS if params.get(k)]
    data = data or [("data", "none given (checks ran on the stored example)")]
    data += [("notebooks", ", ".join(_esc(Path(r.notebook).name) for r in result.notebooks) or "-")]
    checks = [(c.name, ("<span style='color:#1b7f3b'>&#10003; pass</span>" if c.passed
                        else "<span style='color:#b00020'>&#10007; FAIL</span>")
               + (f" &nbsp;{_esc(c.value)}" if c.value is not None else "")
               + (f" (threshold {_esc(c.threshold)})" if c.threshold is not None else "")) for c in result.checks]
    verdict = "passed" if result.passed else "failed"
    parts = [f"<h2>Model card: {html.escape(result.ref)}</h2>",
             _table([("artifact", f"<code>{_esc(meta.get('artifact_sha256'))}</code>"),
                     ("gate", f"{verdict} ({len(result.checks) - len(result.failed_checks)} of {len(result.checks)} "
                              "checks)"),
                     ("backend", f"<code>{_esc(getattr(result, 'backend', 'torch'))}</code> (what the checks ran on)")]),
             "<h3>Signature</h3>", _table(signature), "<h3>Lineage</h3>", _table(lineage),
             "<h3>Environment</h3>", _table(environment), "<h3>Metrics</h3>", _table(metrics),
             "<h3>Data used by the gate</h3>", _table(data),
             "<h3>Checks and verdicts</h3>", _table(checks or [("checks", "none recorded")]), "<hr>"]
    return "\n".join(parts)


__all__ = ["DATA_PARAMS", "model_card_html", "read_meta"]

"""ipywidgets panels, thin over :mod:`kit.registry` and :mod:`kit.gate`.

:class:`RegistryPanel` shows one model's versions (version, sha256, created, metrics, gate verdict with a
link to its report, alias badges) with Validate / Promote / Rollback buttons and a canary weight slider
that writes ``aliases.json`` (running services follow it within seconds). Every rule lives in the
library: Promote goes through :meth:`kit.registry.Registry.promote` and its gate rule, never ``force``.

Every callback runs inside the panel's Output area and catches its own errors, so a failure shows up
red in the panel instead of vanishing into JupyterLab's log (see tqdm.notebook and the ipywidgets docs).
"""

from __future__ import annotations

import html
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from kit.errors import KitError
from kit.registry import Aliases, ModelVersion, Registry

log = logging.getLogger(__name__)

_CSS = """
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


# --------------------------------------------------------------------------- the versions table


def _badges(a: Aliases, version: int) -> list[tuple[str, str]]:
    out = []
    if a.production == version:
        out.append(("production", "production"))
    if a.canary == version:
        out.append(("canary", f"canary {a.canary_weight:.0%}"))
    if version in a.previous and a.production != version:
        out.append(("previous", "previous"))
    return out


def _report_path(reg: Registry, mv: ModelVersion, result: Mapping[str, Any]) -> Path | None:
    """The gate report of ``result`` (where :mod:`kit.gate.evidence` says it lies)."""
    from kit.gate.evidence import report_path

    return report_path(reg.root, reg.version_dir(mv.name, mv.version), result)


def gate_cell(reg: Registry, mv: ModelVersion) -> tuple[str, Path | None]:
    """(verdict, report path): ``passed`` (a passing gate for this exact artifact), ``failed``, or ``-``."""

    verdict, result = reg.gate_verdict(mv)
    return verdict, (_report_path(reg, mv, result) if result else None)


def versions_html(reg: Registry, name: str) -> str:
    """The versions table as HTML (badges, verdicts with report links). Newest version first."""
    a = reg.aliases(name)
    rows = []
    for mv in reversed(reg.versions(name)):
        verdict, report = gate_cell(reg, mv)
        if verdict == "passed":
            gate = '<span class="kit-pass">&#10003; passed</span>'
        elif verdict in ("failed", "stale"):
            gate = f'<span class="kit-fail">&#10007; {verdict}</span>'
        else:
            gate = '<span class="kit-none">not validated</span>'
        if report is not None:
            gate += (f' &middot; <a href="{html.escape(report.as_uri())}" target="_blank" '
                     f'title="{html.escape(str(report))}">report</a>')
        metrics = " ".join(
            f'<span class="kit-metric">{html.escape(str(k))}={html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))}</span>'
            for k, v in mv.metrics.items()
        ) or '<span class="kit-none">-</span>'
        badges = "".join(f'<span class="kit-badge kit-b-{cls}">{html.escape(text)}</span>'
                         for cls, text in _badges(a, mv.version))
        cls = "kit-prod" if a.production == mv.version else "kit-canary" if a.canary == mv.version else ""
        rows.append(
            f'<tr class="{cls}" data-version="{mv.version}"><td><b>v{mv.version}</b></td>'
            f'<td class="kit-sha" title="{mv.artifact_sha256}">{mv.short_sha}</td>'
            f'<td>{html.escape(mv.created[:16].replace("T", " "))} UTC</td><td>{metrics}</td>'
            f"<td>{gate}</td><td>{badges}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("version", "sha256", "created", "metrics", "gate", "aliases"))
    return f'{_CSS}<table class="kit-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


# --------------------------------------------------------------------------- the panel


class RegistryPanel(widgets.VBox):
    """One model's versions and alias controls. ``display(panel)`` or return it from a cell.

    Parameters
    ----------
    registry, name : the registry and the model name shown.
    notebooks, params : what Validate runs (default: kit.gate's default validation notebook).
    run_gate : the gate function (default :func:`kit.gate.run_gate`).
    """

    def __init__(
        self,
        registry: Registry,
        name: str,
        *,
        notebooks: Sequence[str | Path] | None = None,
        params: Mapping[str, Any] | None = None,
        gate_timeout: float = 600.0,
        user: str | None = None,
        run_gate: Callable[..., Any] | None = None,
    ):
        self.registry = registry
        self.name = name
        self.notebooks = list(notebooks) if notebooks else None
        self.params = dict(params) if params else None
        self.gate_timeout = gate_timeout
        self.user = user
        self._run_gate = run_gate
        self._syncing = False
        self._known: list[int] = []
        self.last_gate: Any = None
        registry.versions(name)  # fail now, with the registry's message, if the model is missing

        self.header = widgets.HTML()
        self.table = widgets.HTML()
        self.version = widgets.Dropdown(description="version", layout=widgets.Layout(width="190px"),
                                        style={"description_width": "56px"})
        self.validate_button = widgets.Button(description="Validate", icon="check", button_style="info",
                                              tooltip="Run the validation notebooks on the selected version")
        self.promote_button = widgets.Button(description="Promote", icon="arrow-up", button_style="success",
                                             tooltip="Make the selected version production (needs a passing gate)")
        self.rollback_button = widgets.Button(description="Rollback", icon="undo", button_style="warning",
                                              tooltip="Production back to the previous version; ends any canary")
        self.report_button = widgets.Button(description="Report", icon="file-text-o",
                                            tooltip="Show the selected version's newest gate report here")
        self.refresh_button = widgets.Button(description="", icon="refresh", tooltip="Re-read the registry",
                                             layout=widgets.Layout(width="40px"))
        self.canary = widgets.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, readout_format=".0%",
                                          continuous_update=False, description="canary",
                                          style={"description_width": "56px"}, layout=widgets.Layout(width="420px"))
        self.canary_label = widgets.HTML()
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="240px",
                                                                                         visibility="hidden"))
        self.progress_label = widgets.Label()
        self.status = widgets.HTML()
        self.out = widgets.Output(layout=widgets.Layout(max_height="520px", overflow="auto"))

        self.validate_button.on_click(self._guarded("Validate", self._on_validate))
        self.promote_button.on_click(self._guarded("Promote", self._on_promote))
        self.rollback_button.on_click(self._guarded("Rollback", self._on_rollback))
        self.report_button.on_click(self._guarded("Report", self._on_report))
        self.refresh_button.on_click(self._guarded("Refresh", lambda _b: self.refresh()))
        self.canary.observe(self._guarded("Canary", self._on_canary), names="value")

        super().__init__(children=[
            self.header,
            self.table,
            widgets.HBox([self.version, self.validate_button, self.promote_button, self.rollback_button,
                          self.report_button, self.refresh_button]),
            widgets.HBox([self.canary, self.canary_label]),
            widgets.HBox([self.progress, self.progress_label]),
            self.status,
            self.out,
        ], layout=widgets.Layout(border="1px solid #d0d7de", padding="8px 12px", width="auto"))
        self.add_class("kit-registry-panel")
        self.refresh()

    @classmethod
    def from_config(cls, name: str, config: Any = None, **kwargs: Any) -> "RegistryPanel":
        """A panel over the configured registry (:func:`kit.config.load_config`, resolved here once)."""
        from kit.config import load_config

        cfg = config or load_config()
        kwargs.setdefault("gate_timeout", cfg.gate_timeout)
        kwargs.setdefault("user", cfg.user)
        return cls(Registry.from_config(cfg), name, **kwargs)

    # ---- rendering
    @property
    def selected(self) -> int:
        if self.version.value is None:
            raise KitError(f"Model {self.name!r} has no versions to act on.")
        return int(self.version.value)

    def refresh(self) -> None:
        """Re-read the registry and redraw (keeps the selected version when it still exists)."""
        reg, name = self.registry, self.name
        a = reg.aliases(name)
        versions = reg.versions(name)
        prod = f"v{a.production}" if a.production is not None else "none"
        canary = f"v{a.canary} at {a.canary_weight:.0%}" if a.canary is not None else "none"
        self.header.value = (
            f'<div style="font-size:15px"><b>{html.escape(name)}</b> '
            f'<span style="color:#57606a">&middot; {len(versions)} version(s) &middot; production {prod} '
            f'&middot; canary {canary}</span></div>'
            f'<div style="color:#8c959f;font-size:11px">{html.escape(str(reg.root))} &middot; aliases.json serial '
            f"{a.serial}</div>"
        )
        self.table.value = versions_html(reg, name)
        self._syncing = True
        try:
            keep = self.version.value
            self.version.options = [(self._option_label(a, mv), mv.version) for mv in reversed(versions)]
            nums = [mv.version for mv in versions]
            if keep in nums and nums == self._known:
                self.version.value = keep
            elif nums:
                # New versions (or first draw): select the newest that is not production, the one a
                # person acts on next.
                others = [v for v in nums if v != a.production]
                self.version.value = (others or nums)[-1]
            self._known = nums
            self.canary.value = a.canary_weight if a.canary is not None else 0.0
        finally:
            self._syncing = False
        if a.canary is not None:
            self.canary_label.value = (f"v{a.canary} gets {a.canary_weight:.0%} of traffic, "
                                       f"production v{a.production} the rest (0% ends the canary)")
        elif a.production is None:
            self.canary_label.value = '<span style="color:#8c959f">no production yet: promote a version first</span>'
        else:
            self.canary_label.value = ('<span style="color:#8c959f">no canary: select a version and move the '
                                       "slider to start one</span>")

    @staticmethod
    def _option_label(a: Aliases, mv: ModelVersion) -> str:
        tag = " (production)" if a.production == mv.version else " (canary)" if a.canary == mv.version else ""
        return f"v{mv.version}{tag}"

    def _say(self, text: str, *, error: bool = False) -> None:
        color = "#cf222e" if error else "#1a7f37"
        icon = "&#10007;" if error else "&#10003;"
        self.status.value = (f'<div class="kit-status{" kit-error" if error else ""}" '
                             f'style="color:{color};padding:4px 0">{icon} {text}</div>')
        log.info("registry panel %s: %s", self.name, html.unescape(text))

    def _guarded(self, label: str, fn: Callable[..., None]) -> Callable[..., None]:
        """Run a callback inside the Output area; any error is shown red in the panel, never lost."""

        @wraps(fn)
        def run(*args: Any) -> None:
            if label == "Canary" and self._syncing:
                return
            with self.out:
                try:
                    fn(*args)
                except KitError as exc:
                    self._say(f"{label} failed: {html.escape(str(exc))}", error=True)
                    self._safe_refresh()
                except Exception as exc:  # a bug, or a library we call: show it, with its traceback
                    self._say(f"{label} failed unexpectedly: {type(exc).__name__}: {html.escape(str(exc))}",
                              error=True)
                    self.out.append_stderr(traceback.format_exc())  # the details, in the panel too
                    self._safe_refresh()

        return run

    def _safe_refresh(self) -> None:
        try:
            self.refresh()
        except Exception:  # the registry itself is unreadable: the status line already says why
            log.exception("registry panel refresh failed")

    # ---- actions (each calls one library function)
    def _on_validate(self, _button: Any = None) -> None:
        if self._run_gate is not None:
            run_gate = self._run_gate
        else:
            from kit.gate import run_gate
        v = self.selected
        started = time.perf_counter()
        self.progress.layout.visibility = "visible"
        self.progress.bar_style = "info"
        self.progress.value, self.progress.max = 0, 2
        self.progress_label.value = f"validating {self.name}@{v} ..."
        self._say(f"Validating {self.name}@{v} ...")

        def progress(msg: str) -> None:
            self.progress.value = min(self.progress.value + 1, 10_000)
            self.progress.max = max(self.progress.max, self.progress.value + 1)
            self.progress_label.value = f"{time.perf_counter() - started:5.1f}s  {msg.strip()[:120]}"

        self.validate_button.disabled = True
        try:
            result = run_gate(self.registry, self.name, v, notebooks=self.notebooks, params=self.params,
                              timeout=self.gate_timeout, progress=progress)
        except BaseException:
            self.progress.bar_style = "danger"
            self.progress_label.value = f"{time.perf_counter() - started:5.1f}s  the gate could not run"
            raise
        finally:
            self.validate_button.disabled = False
        self.last_gate = result
        self.progress.value = self.progress.max
        self.progress.bar_style = "success" if result.passed else "danger"
        self.progress_label.value = f"{result.seconds:5.1f}s  {'passed' if result.passed else 'FAILED'}"
        link = (f'<a href="{html.escape(Path(result.report).as_uri())}" target="_blank" '
                f'title="{html.escape(str(result.report))}">report</a>')
        n_ok = sum(1 for c in result.checks if getattr(c, "passed", False))
        if result.passed:
            self._say(f"{self.name}@{v} passed validation ({n_ok}/{len(result.checks)} checks, "
                      f"{result.seconds:.1f}s) &middot; {link}")
        else:
            why = html.escape(result.error or "see the report")
            self._say(f"{self.name}@{v} FAILED validation ({n_ok}/{len(result.checks)} checks passed): {why} "
                      f"&middot; {link}", error=True)
        self.refresh()

    def _on_promote(self, _button: Any = None) -> None:
        v = self.selected
        a = self.registry.promote(self.name, v, user=self.user, why="registry panel")
        self.refresh()
        self._say(f"{self.name}: production is now v{a.production}")

    def _on_rollback(self, _button: Any = None) -> None:
        a = self.registry.rollback(self.name, user=self.user, why="registry panel")
        self.refresh()
        self._say(f"{self.name}: rolled back, production is now v{a.production}")

    def _on_canary(self, change: Mapping[str, Any]) -> None:
        weight = float(change["new"])
        a = self.registry.aliases(self.name)
        if weight <= 0.0:
            if a.canary is None:
                return
            self.registry.end_canary(self.name, user=self.user, why="registry panel")
            self.refresh()
            self._say(f"{self.name}: canary ended, all traffic to production v{a.production}")
            return
        if a.canary is not None:
            new = self.registry.set_canary_weight(self.name, weight, user=self.user, why="registry panel")
        else:
            new = self.registry.set_canary(self.name, self.selected, weight, user=self.user, why="registry panel")
        self.refresh()
        self._say(f"{self.name}: canary v{new.canary} at {new.canary_weight:.0%} "
                  f"(aliases.json serial {new.serial}; running services follow within seconds)")

    def _on_report(self, _button: Any = None) -> None:
        from IPython.display import HTML, display

        mv = self.registry.get(self.name, self.selected)
        verdict, report = gate_cell(self.registry, mv)
        if report is None:
            raise KitError(f"{mv.ref} has no gate report yet. Click Validate to run the gate.")
        self.out.clear_output()
        doc = report.read_text(encoding="utf-8", errors="replace")
        display(HTML(f'<div style="color:#57606a;font-size:12px">{html.escape(str(report))}</div>'
                     f'<iframe srcdoc="{html.escape(doc, quote=True)}" '
                     'style="width:100%;height:480px;border:1px solid #d0d7de"></iframe>'))
        self._say(f"{mv.ref}: gate {verdict}, report shown below")

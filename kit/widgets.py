"""ipywidgets panels, thin over :mod:`kit.registry` and :mod:`kit.gate`.

:class:`RegistryPanel` shows one model's versions (version, sha256, created, metrics, gate verdict with a
link to its report, alias badges) with Validate / Promote / Rollback buttons, a canary weight slider and
an End canary button that write ``aliases.json`` (running services follow it within seconds). Every rule
lives in the library: Promote goes through :meth:`kit.registry.Registry.promote` and its gate rule, never
``force``; the slider gives the selected version its share through :func:`kit.traffic.set_traffic`, and
the line under it says beforehand what a move would do (start, re-weight, or replace the running canary).
The tables and badges are :mod:`kit.render`'s.

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
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from kit.errors import KitError
from kit.registry import Aliases, ModelVersion, Registry
from kit.render import gate_cell, gate_summary, guard_note, report_link, versions_html
from kit.traffic import TrafficChange, plan_traffic, set_traffic, stop_traffic

if TYPE_CHECKING:
    from kit.config import KitConfig
    from kit.gate import GateResult

__all__ = ["RegistryPanel", "gate_cell", "versions_html"]

log = logging.getLogger(__name__)

# The panel's own words for a library error's remedy (kit.errors.KitError.remedy).
_HINTS = {
    "validate": "The Validate button runs the gate (the panel never forces).",
    "promote": "Promote a version first.",
    "start_canary": "Select a version and move the slider.",
    "refresh": "The panel now shows the current split.",
}


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
        run_gate: Callable[..., GateResult] | None = None,
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
        self._shown: Aliases | None = None
        self.last_gate: GateResult | None = None
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
        self.stop_button = widgets.Button(description="End canary", icon="stop",
                                          tooltip="End the canary: all traffic back to production")
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
        self.stop_button.on_click(self._guarded("End canary", self._on_stop))
        self.canary.observe(self._guarded("Canary", self._on_canary), names="value")
        self.version.observe(self._guarded("Select", lambda _c: self._sync_canary()), names="value")

        super().__init__(children=[
            self.header,
            self.table,
            widgets.HBox([self.version, self.validate_button, self.promote_button, self.rollback_button,
                          self.report_button, self.refresh_button]),
            widgets.HBox([self.canary, self.stop_button]),
            self.canary_label,
            widgets.HBox([self.progress, self.progress_label]),
            self.status,
            self.out,
        ], layout=widgets.Layout(border="1px solid #d0d7de", padding="8px 12px", width="auto"))
        self.add_class("kit-registry-panel")
        self.refresh()

    @classmethod
    def from_config(cls, name: str, config: KitConfig | None = None, **kwargs: Any) -> RegistryPanel:
        """A panel over the configured registry (:func:`kit.config.load_config`, resolved here once)."""
        from kit.config import load_config

        cfg = config or load_config()
        kwargs.setdefault("gate_timeout", cfg.gate_timeout)
        kwargs.setdefault("user", cfg.user)
        kwargs.setdefault("notebooks", list(cfg.validation) or None)
        kwargs.setdefault("params", dict(cfg.gate) or None)  # kit.toml's [gate], as kit validate and %deploy
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
            f'<div style="color:#8c959f;font-size:11px">{html.escape(reg.location)} &middot; aliases.json serial '
            f"{a.serial}</div>"
        )
        note = guard_note(reg, name)
        if note is not None:
            self.header.value += f'<div style="color:#cf222e;font-size:12px">&#9888; {html.escape(note)}</div>'
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
        finally:
            self._syncing = False
        self._sync_canary(a)

    def _sync_canary(self, a: Aliases | None = None) -> None:
        """The slider shows the selected version's share of traffic; the label says what moving it does.

        The rule is :mod:`kit.traffic`'s: another version than the running canary replaces it, and the
        label says so before the slider is moved.
        """
        a = a or self.registry.aliases(self.name)
        self._shown = a  # what the person sees; a move is refused if the split changed since
        sel = self.version.value
        self._syncing = True
        try:
            self.canary.value = a.canary_weight if sel is not None and sel == a.canary else 0.0
            self.canary.disabled = sel is None or sel == a.production or a.production is None
            self.stop_button.disabled = a.canary is None
        finally:
            self._syncing = False
        self.canary_label.value = self._canary_text(a, sel)

    def _canary_text(self, a: Aliases, sel: int | None) -> str:
        grey = '<span style="color:#57606a">{}</span>'
        now = (f"canary v{a.canary} gets {a.canary_weight:.0%} of traffic, production v{a.production} the rest. "
               if a.canary is not None else "")
        if a.production is None:
            return grey.format("no production yet: promote a version first")
        if sel is None or sel == a.production:
            return grey.format(html.escape(now + "Select another version to give it a share of traffic."))
        try:
            plan = plan_traffic(self.registry, self.name, sel, 0.1)
        except KitError as exc:
            return grey.format(html.escape(now + str(exc)))
        gate = ("" if self.registry.passing_gate(self.registry.get(self.name, sel)) is not None
                else f" It needs a passing gate first: click Validate on v{sel}.")
        if plan.action == "replace":
            return ('<span style="color:#bc4c00">' + html.escape(now) + f"<b>Moving the slider replaces canary "
                    f"v{a.canary} with v{sel}</b>: v{a.canary} then gets no traffic.{gate}</span>")
        if plan.action == "start":
            return grey.format(f"no canary: moving the slider starts one with v{sel}.{gate}")
        return grey.format(html.escape(now + "Move the slider to re-weight it; 0% or End canary ends it."))

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
        def run(*args: object) -> None:
            if label in ("Canary", "Select") and self._syncing:
                return
            with self.out:
                try:
                    fn(*args)
                except KitError as exc:
                    hint = _HINTS.get(exc.remedy or "")
                    self._say(f"{label} failed: {html.escape(str(exc) + (' ' + hint if hint else ''))}", error=True)
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
    def _on_validate(self, _button: object = None) -> None:
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
        self._say(f"{html.escape(gate_summary(result))} &middot; {report_link(Path(result.report))}",
                  error=not result.passed)
        self.refresh()

    def _on_promote(self, _button: object = None) -> None:
        v = self.selected
        a = self.registry.promote(self.name, v, user=self.user, why="registry panel")
        self.refresh()
        self._say(f"{self.name}: production is now v{a.production}")

    def _on_rollback(self, _button: object = None) -> None:
        a = self.registry.rollback(self.name, user=self.user, why="registry panel")
        self.refresh()
        self._say(f"{self.name}: rolled back, production is now v{a.production}")

    def _on_canary(self, change: Mapping[str, Any]) -> None:
        """The slider gives the selected version its share of traffic: :func:`kit.traffic.set_traffic`."""
        self._show_change(set_traffic(self.registry, self.name, self.selected, float(change["new"]),
                                      user=self.user, why="registry panel", shown=self._shown))

    def _on_stop(self, _button: object = None) -> None:
        self._show_change(stop_traffic(self.registry, self.name, user=self.user, why="registry panel",
                                       shown=self._shown))

    def _show_change(self, change: TrafficChange) -> None:
        self.refresh()
        a = change.aliases
        serial = f" (aliases.json serial {a.serial}; running services follow within seconds)" if a else ""
        self._say(html.escape(f"{self.name}: {change.describe()}") + serial)

    def _on_report(self, _button: object = None) -> None:
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

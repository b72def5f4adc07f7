"""The registry panel, driven the way a person drives it: set values, click buttons; check the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kit_testing import write_validation_notebook

from kit.widgets import RegistryPanel, versions_html

MODEL = "demo-digits"


@pytest.fixture
def validation_nb(tmp_path: Path) -> Path:
    return write_validation_notebook(tmp_path / "validate_accuracy.ipynb")


def is_error(panel: RegistryPanel) -> bool:
    return "kit-error" in panel.status.value and "#cf222e" in panel.status.value


def row_of(panel: RegistryPanel, version: int) -> str:
    html = panel.table.value
    start = html.index(f'data-version="{version}"')
    return html[start:html.index("</tr>", start)]


def test_panel_validate_promote_canary_rollback(registered, validation_nb, digits_model):
    registry, mv1 = registered
    panel = RegistryPanel(registry, MODEL, notebooks=[validation_nb], gate_timeout=120, user="tester")
    assert panel.version.value == 1
    assert "not validated" in row_of(panel, 1) and mv1.short_sha in row_of(panel, 1)
    assert "accuracy=" in row_of(panel, 1)

    # Promote goes through the gate rule: refused, shown red in the panel, nothing moves.
    panel.promote_button.click()
    assert is_error(panel) and "no passing gate" in panel.status.value
    assert registry.aliases(MODEL).production is None

    # Validate runs the real gate; progress is shown while it runs; the verdict lands in the table.
    panel.validate_button.click()
    assert not is_error(panel), panel.status.value
    assert "passed validation" in panel.status.value and "report" in panel.status.value
    assert panel.progress.bar_style == "success" and panel.progress.value == panel.progress.max > 1
    assert "passed" in panel.progress_label.value
    assert registry.passing_gate(mv1) is not None
    row = row_of(panel, 1)
    assert "&#10003; passed" in row and 'href="file://' in row
    report = row.split('title="', 2)[2].split('"', 1)[0]
    assert Path(report).is_file() and report.endswith("report.html")

    panel.promote_button.click()
    assert not is_error(panel), panel.status.value
    assert registry.aliases(MODEL).production == 1
    assert "kit-b-production" in row_of(panel, 1)

    # A second version: the panel picks it up on refresh, validates it, and the slider starts a canary.
    model, split, acc = digits_model
    mv2 = registry.register(MODEL, model, torch.from_numpy(split.x_test[:2]), metrics={"accuracy": acc})
    panel.refresh_button.click()
    assert panel.version.value == 2  # the newest non-production version is what one acts on next
    panel.canary.value = 0.25  # no gate for v2 yet: refused, and the slider snaps back
    assert is_error(panel) and "no passing gate" in panel.status.value
    assert registry.aliases(MODEL).canary is None and panel.canary.value == 0.0

    panel.validate_button.click()
    assert registry.passing_gate(mv2) is not None
    serial = registry.aliases(MODEL).serial
    panel.canary.value = 0.25
    a = registry.aliases(MODEL)
    assert not is_error(panel), panel.status.value
    assert (a.production, a.canary, a.canary_weight) == (1, 2, pytest.approx(0.25)) and a.serial == serial + 1
    assert "canary 25%" in row_of(panel, 2)
    panel.canary.value = 0.6
    assert registry.aliases(MODEL).canary_weight == pytest.approx(0.6)
    panel.canary.value = 0.0
    assert registry.aliases(MODEL).canary is None
    assert [e["event"] for e in registry.history(MODEL)][-3:] == ["canary", "canary", "canary_end"]

    # Promote v2, roll back to v1; rolling back again has nowhere to go and says so, red.
    panel.version.value = 2
    panel.promote_button.click()
    assert registry.aliases(MODEL).production == 2
    panel.rollback_button.click()
    assert registry.aliases(MODEL).production == 1 and not is_error(panel)
    panel.rollback_button.click()
    assert is_error(panel) and "no previous production" in panel.status.value
    assert registry.aliases(MODEL).production == 1


def test_a_failing_gate_is_shown_red(registered, validation_nb):
    registry, mv1 = registered
    panel = RegistryPanel(registry, MODEL, notebooks=[validation_nb], params={"min_accuracy": 1.01})
    panel.validate_button.click()
    assert is_error(panel) and "FAILED validation" in panel.status.value
    assert panel.progress.bar_style == "danger"
    assert "&#10007; failed" in row_of(panel, 1)
    assert registry.passing_gate(mv1) is None


def test_unexpected_errors_stay_in_the_panel(registered):
    registry, _ = registered

    def broken_gate(*args, **kwargs):
        kwargs["progress"]("[1/1] starting ...")
        raise RuntimeError("kernel exploded")

    panel = RegistryPanel(registry, MODEL, run_gate=broken_gate)
    panel.validate_button.click()  # must not raise out of the callback
    assert is_error(panel) and "RuntimeError: kernel exploded" in panel.status.value
    assert panel.progress.bar_style == "danger" and not panel.validate_button.disabled
    # The traceback is kept in the panel's Output area, under the red line.
    texts = [o.get("text", "") for o in panel.out.outputs]
    assert any("Traceback" in t and "kernel exploded" in t for t in texts), panel.out.outputs


def test_from_config_gates_with_kit_toml_notebooks_and_gate_table(registered, tmp_path):
    """The panel's Validate runs what `kit validate` and %deploy run: kit.toml's notebooks and [gate]."""
    from kit.config import load_config

    registry, _ = registered
    project = tmp_path / "project"
    project.mkdir()
    write_validation_notebook(project / "checks.ipynb")
    (project / "kit.toml").write_text('validation = ["checks.ipynb"]\n[gate]\nmax_p95_ms_batch1 = 250.0\n')
    cfg = load_config(cwd=project, registry=registry.root)
    panel = RegistryPanel.from_config(MODEL, cfg)
    assert panel.params == {"max_p95_ms_batch1": 250.0}
    assert [Path(n).name for n in panel.notebooks] == ["checks.ipynb"]


def test_missing_model_is_a_clear_error(registry):
    with pytest.raises(LookupError, match="No model 'nope'"):
        RegistryPanel(registry, "nope")


def test_versions_html_escapes_metrics(registered, digits_model):
    registry, _ = registered
    model, split, _acc = digits_model
    registry.register(MODEL, model, torch.from_numpy(split.x_test[:2]),
                      metrics={"<i>note</i>": "<script>alert(1)</script>"})
    html = versions_html(registry, MODEL)
    assert html.count("<tr") == 3  # header + two versions, newest first
    assert html.index('data-version="2"') < html.index('data-version="1"')
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html

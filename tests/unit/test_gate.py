"""kit.gate without a kernel: the recording API, parameters, records, the report and the CLI's parsing."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kit import gate
from kit.cli import cli
from kit.errors import GateError
from kit.gate import kernel as gate_kernel
from kit.gate import record

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "notebooks" / "gate"


pytestmark = pytest.mark.usefixtures("fresh_gate_recorder")  # tests/unit/conftest.py


# ---------------------------------------------------------------- recording API


def test_check_by_hand_prints_a_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gate.check("accuracy", passed=0.97 >= 0.9, value=0.97, threshold=0.9) is None
    gate.check("latency", passed=False, value=120.0, threshold=50, detail="ms, p95")
    out = capsys.readouterr().out.splitlines()
    assert out == ["✓ PASS  accuracy = 0.97 (threshold 0.9)", "✗ FAIL  latency = 120 (threshold 50): ms, p95"]
    assert list(tmp_path.iterdir()) == []
    assert not gate.running_under_gate()
    assert [c.name for c in gate.checks()] == ["accuracy", "latency"]
    table = gate.summary()
    assert "FAIL    latency   120    50         ms, p95" in repr(table)
    assert "PASS" in table._repr_html_() and "#b00020" in table._repr_html_()


def test_check_under_a_run_appends_records(tmp_path, capsys):
    records = tmp_path / "nb.checks.jsonl"
    gate._begin_run(str(records), "nb.ipynb", "run-1")
    gate.check("parity", passed=np.bool_(True), value=np.float32(0.5), threshold=torch.tensor(1e-5))
    gate.check("finite", passed=torch.tensor(False), value=float("nan"))
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert recs[0]["kind"] == "kernel" and recs[0]["run_id"] == "run-1" and recs[0]["executable"]
    assert recs[1] == {"kind": "check", "name": "parity", "passed": True, "value": 0.5,
                       "threshold": pytest.approx(1e-5), "detail": None, "notebook": "nb.ipynb"}
    assert recs[2]["passed"] is False and recs[2]["value"] == "nan"  # strict JSON has no NaN
    assert gate.running_under_gate()


@pytest.mark.parametrize("bad", [None, "yes", 1, [True], torch.tensor([True, False])])
def test_check_refuses_a_verdict_that_is_not_a_bool(bad):
    with pytest.raises(GateError, match=r"check 'x': passed must be"):
        gate.check("x", passed=bad)


def test_check_needs_a_name():
    with pytest.raises(GateError, match="non-empty name"):
        gate.check("  ", passed=True)


def test_artifact_accepts_a_sha_and_refuses_anything_else(tmp_path):
    records = tmp_path / "r.jsonl"
    gate._begin_run(str(records), "nb.ipynb", "r")
    assert gate.artifact("a" * 64) == "a" * 64
    assert json.loads(records.read_text().splitlines()[-1])["sha256"] == "a" * 64
    with pytest.raises(GateError, match="sha256"):
        gate.artifact("not-a-sha")


def test_check_line_and_json_values():
    c = gate.Check("acc", True, value=0.97331, threshold=0.9)
    assert c.line() == "PASS  acc = 0.9733 (threshold 0.9)"
    assert record._jsonable(math.inf) == "inf"
    assert record._jsonable(np.int64(3)) == 3
    assert record._jsonable((2, 63)) == [2, 63]
    assert record._jsonable(object()).startswith("<object")


# ---------------------------------------------------------------- parameters


def test_parse_params_reads_json_values_and_falls_back_to_text():
    assert gate.parse_params(["a=0.95", "b=3", "c=true", "d=None", "e=/tmp/x.npz", "f=[1, 2]", 'g="7"']) == {
        "a": 0.95, "b": 3, "c": True, "d": None, "e": "/tmp/x.npz", "f": [1, 2], "g": "7"}


@pytest.mark.parametrize("item", ["novalue", "=3", "bad-key=1", "1x=2"])
def test_parse_params_refuses_malformed_items(item):
    with pytest.raises(GateError, match="key=value"):
        gate.parse_params([item])


def test_parse_params_takes_python_literals_too():
    """One rule for %deploy --param and kit validate -p: JSON, else a Python literal, else text."""
    assert gate.parse_params(["a='x.npz'", "b=(1, 2)", "c=False", "d={'k': 1}", "e=0.5 ", "f=a b"]) == {
        "a": "x.npz", "b": [1, 2], "c": False, "d": {"k": 1}, "e": 0.5, "f": "a b"}
    assert gate.parse_params(["s={1, 2}"]) == {"s": "{1, 2}"}  # a set is no JSON value: kept as text


@pytest.mark.parametrize("item", ["x=NaN", "x=1e999", "x=[Infinity]", "x=float('nan')"])
def test_parse_params_refuses_non_finite_numbers(item):
    if item == "x=float('nan')":  # a call is no literal: it stays text
        assert gate.parse_params([item]) == {"x": "float('nan')"}
        return
    with pytest.raises(GateError, match="not a finite number"):
        gate.parse_params([item])


def test_parse_params_refuses_a_key_given_twice():
    with pytest.raises(GateError, match="given twice"):
        gate.parse_params(["a=1", "a=2"])


def test_the_magic_and_the_cli_share_the_parser():
    from kit.magics import _parse_params

    items = ["a='x.npz'", "b=(1, 2)", "c=true", "d=None", "e=/tmp/x.npz"]
    assert _parse_params(items) == gate.parse_params(items)


def test_check_params_names_the_unknown_and_the_known():
    with pytest.raises(GateError) as e:
        gate.check_params(FIXTURES / "passes.ipynb", {"treshold": 0.9, "label": "x"})
    msg = str(e.value)
    assert "does not declare parameter(s) treshold" in msg and "it declares: label, threshold" in msg
    assert set(gate.check_params(FIXTURES / "passes.ipynb", {"threshold": 0.1})) == {"label", "threshold"}


def _notebook(tmp_path: Path, source: str | None, name: str = "nb.ipynb") -> Path:
    nb = nbformat.v4.new_notebook(metadata={"language_info": {"name": "python"},
                                            "kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    if source is not None:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells.append(nbformat.v4.new_code_cell("from kit import gate\ngate.check('ok', passed=True)"))
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_a_notebook_without_a_parameters_cell_declares_nothing(tmp_path):
    with pytest.raises(GateError, match=r"declares: none \(it has no cell tagged 'parameters'\)"):
        gate.check_params(_notebook(tmp_path, None), {"x": 1})


def test_an_assignment_papermill_cannot_parse_is_an_error(tmp_path):
    # papermill drops this line with only a log warning; the parameter would silently keep its default
    path = _notebook(tmp_path, 'registry = ""   # "" = the configured one\nmin_accuracy = 0.9')
    with pytest.raises(GateError, match="cannot parse the assignment of registry"):
        gate.declared_params(path)


def test_the_default_notebook_declares_its_parameters():
    path = gate.DEFAULT_NOTEBOOK
    assert path == ROOT / "kit" / "notebooks" / "validation" / "default.ipynb"  # package data: in the wheel
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    declared = gate.declared_params(path)
    assert set(gate.AUTO_PARAMS) <= set(declared)
    assert {"data", "metric", "min_accuracy", "min_metric", "max_metric", "output", "max_p95_ms_batch1",
            "max_p95_ms_batch_n", "batch_n"} <= set(declared)
    assert "kit.demo" not in path.read_text()  # model-agnostic: nothing of the demo
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.ipynb")), ids=lambda p: p.name)
def test_failure_mode_notebooks_are_valid(path):
    nbformat.validate(nbformat.read(path, as_version=4))
    assert set(gate.declared_params(path)) == {"threshold", "label"}


def test_evidence_problems_catch_another_interpreter_and_another_artifact(tmp_path):
    import sys

    good = [{"kind": "kernel", "executable": sys.executable, "prefix": sys.prefix},
            {"kind": "artifact", "sha256": "a" * 64, "ref": "m@1"}, {"kind": "check", "name": "x"}]
    assert gate.evidence_problems(good, "m@1", "a" * 64, sys.prefix) == []
    bad = [{"kind": "kernel", "executable": "/opt/other/bin/python", "prefix": "/opt/other"},
           {"kind": "artifact", "sha256": "b" * 64, "ref": "m@2"}]
    problems = gate.evidence_problems(bad, "m@1", "a" * 64, sys.prefix)
    assert problems == [
        f"the kernel ran /opt/other/bin/python (prefix /opt/other), not this environment ({sys.prefix}); "
        "validate in the environment that will serve",
        "it loaded artifact m@2 sha256 bbbbbbbbbbbb, not m@1 (aaaaaaaaaaaa)",
    ]



def test_a_loaded_model_records_who_signed_it_and_a_signed_gate_requires_it(tmp_path):
    """gate.artifact(model) with what Registry.load returns records the verified key; under a gate whose
    registry checks signatures, a model loaded without checking (signed_by None) is a problem."""
    from kit.registry.loaded import LoadedModel

    records = tmp_path / "r.jsonl"
    gate._begin_run(str(records), "nb.ipynb", "r")
    mv = types.SimpleNamespace(artifact_sha256="a" * 64, ref="m@1")  # the two fields artifact() reads
    for signed_by in ("0123456789abcdef", None):
        gate.artifact(LoadedModel(mv, None, None, (), (), signed_by=signed_by), backend="torch")  # type: ignore[arg-type]
    recs = [json.loads(line) for line in records.read_text().splitlines()[-2:]]
    assert [(r["sha256"], r["ref"], r["signed_by"]) for r in recs] == [("a" * 64, "m@1", "0123456789abcdef"),
                                                                       ("a" * 64, "m@1", None)]
    kernel = {"kind": "kernel", "executable": sys.executable, "prefix": sys.prefix}
    assert gate.evidence_problems([kernel, recs[0]], "m@1", "a" * 64, sys.prefix, signed=True) == []
    assert gate.evidence_problems([kernel, recs[1]], "m@1", "a" * 64, sys.prefix, signed=False) == []
    assert gate.evidence_problems([kernel, recs[1]], "m@1", "a" * 64, sys.prefix, signed=True) == [
        "it loaded m@1 without checking its signature; load it through kit.gate.open_registry(registry), which "
        "verifies it against the gate's trusted keys"]
    # a ModelVersion (or a sha) says nothing about loading: not held against it
    assert gate.evidence_problems([kernel, {"kind": "artifact", "sha256": "a" * 64}], "m@1", "a" * 64, sys.prefix,
                                  signed=True) == []


def test_open_registry_under_a_gate_verifies_with_the_gates_keys_only(tmp_path):
    from kit.signing import KeyStore

    key = KeyStore(tmp_path / "keys").new()
    gate._begin_run(str(tmp_path / "r.jsonl"), "nb.ipynb", "r", [key.public.text()])
    reg = gate.open_registry(str(tmp_path / "registry"))
    assert reg.keyring is not None and reg.keyring.trust().key_ids == (key.key_id,)
    assert not reg.keyring.can_sign()  # the kernel verifies; it never signs
    gate._begin_run(str(tmp_path / "r.jsonl"), "nb.ipynb", "r")  # a gate whose registry has no keyring
    assert gate.open_registry(str(tmp_path / "registry")).keyring is None


# ---------------------------------------------------------------- kernels


def test_default_kernel_is_a_private_spec_for_this_interpreter():
    assert gate.ensure_kernel(None) == gate.PRIVATE_KERNEL


def test_an_unknown_kernel_is_a_gate_error_naming_the_fix():
    with pytest.raises(GateError, match=r"No Jupyter kernel named 'no-such-kernel-xyz' \(have: .*ipykernel install"):
        gate.ensure_kernel("no-such-kernel-xyz")


def test_the_private_kernel_runs_this_interpreter(tmp_path):
    import sys

    km = gate_kernel._kernel_manager_class(gate.PRIVATE_KERNEL, tmp_path / "k.log")(kernel_name=gate.PRIVATE_KERNEL)
    assert km.kernel_spec.argv[0] == sys.executable
    assert km.kernel_spec.argv[1:3] == ["-m", "ipykernel_launcher"]


# ---------------------------------------------------------------- result, report, CLI


def _result(tmp_path: Path, passed: bool) -> gate.GateResult:
    run_dir = tmp_path / "reg" / "m" / "versions" / "1" / "gates" / "run-1"
    run_dir.mkdir(parents=True)
    executed = run_dir / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# hello <b>there</b>")]), executed)
    checks = (gate.Check("accuracy", passed, 0.5, 0.9, "rows", "nb.ipynb"), gate.Check("parity", True, 0, 1e-5))
    run = gate.NotebookRun("/x/nb.ipynb", executed, "passed" if passed else "failed", 1.5, 2,
                           None if passed else "nb.ipynb: check(s) failed: accuracy = 0.5 (threshold 0.9)")
    return gate.GateResult("run-1", passed, "m", 1, "f" * 64, run_dir, run_dir / "report.html", checks, (run,),
                           run.error, 2.0, started="2026-01-01T00:00:00Z", registry_root=tmp_path / "reg")


def test_result_dict_has_the_contract_fields_with_registry_relative_paths(tmp_path):
    d = _result(tmp_path, False).to_dict()
    assert {"run_id", "passed", "artifact_sha256", "name", "version", "checks", "report", "error",
            "seconds"} <= set(d)
    assert d["report"] == "m/versions/1/gates/run-1/report.html"
    assert d["notebooks"][0]["executed"] == "m/versions/1/gates/run-1/nb.ipynb"
    assert d["checks"][0] == {"name": "accuracy", "passed": False, "value": 0.5, "threshold": 0.9,
                              "detail": "rows", "notebook": "nb.ipynb"}
    json.dumps(d, allow_nan=False)


def test_report_shows_the_verdict_and_a_table_of_checks(tmp_path):
    res = _result(tmp_path, False)
    gate.write_report(res)
    page = res.report.read_text()
    assert "Gate FAILED: m@1" in page and "kit-gate-checks" in page
    assert page.index("accuracy") < page.index("hello")  # the verdict first, then the notebook
    assert "check(s) failed: accuracy = 0.5 (threshold 0.9)" in page
    text = gate.render_text(res)
    assert "FAIL    accuracy" in text and f"report: {res.report}" in text


def test_cli_refuses_a_malformed_parameter_before_anything_runs(tmp_path):
    r = CliRunner().invoke(cli, ["--registry", str(tmp_path / "reg"), "validate", "m@1", "-p", "oops"])
    assert r.exit_code == 2
    assert "kit: error: Parameter 'oops' is not key=value" in r.output


def test_cli_validate_help_names_the_exit_codes():
    r = CliRunner().invoke(cli, ["validate", "--help"])
    assert r.exit_code == 0 and "NAME@VERSION" in r.output and "--notebook" in r.output and "-p" in r.output
    assert "0 the gate passed, 1 it failed (a verdict), 2 it could not run" in " ".join(r.output.split())
